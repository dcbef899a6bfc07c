//! A layer's compression, told by its first bytes, and the reader that undoes it.

use std::io::{self, BufRead, BufReader, Read};

/// Compression detected from the first bytes of a layer.
pub fn sniff<R: BufRead>(r: &mut R) -> io::Result<crate::image::manifest::Compression> {
    use crate::image::manifest::Compression;
    let b = r.fill_buf()?;
    Ok(if b.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if b.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// Decompress (by content, whatever the media type claims) and hand back a reader of the tar.
pub fn decompressor<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    use crate::image::manifest::Compression;
    let mut br = BufReader::with_capacity(256 << 10, r);
    Ok(match sniff(&mut br)? {
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(br)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(br)?),
        Compression::None => Box::new(br),
    })
}
