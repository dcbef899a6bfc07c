//! Manifests, indexes and image configs from registries: no panic, whatever the bytes and the
//! claimed media type; platform selection over whatever index parsed.
#![no_main]
use cw::image::manifest::{self, Parsed, Platform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (ct, body) = match data.split_first() {
        Some((k, rest)) => (
            match k % 6 {
                0 => None,
                1 => Some("application/vnd.docker.distribution.manifest.v2+json"),
                2 => Some("application/vnd.oci.image.manifest.v1+json"),
                3 => Some("application/vnd.docker.distribution.manifest.list.v2+json"),
                4 => Some("application/vnd.oci.image.index.v1+json"),
                _ => Some("text/plain"),
            },
            rest,
        ),
        None => return,
    };
    if let Ok(Parsed::Index(entries)) = manifest::parse(body, ct) {
        let _ = manifest::select_platform(&entries, &Platform::host());
    }
    let _ = manifest::parse_config(body);
});
