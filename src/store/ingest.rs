//! How content enters the store, whatever it comes from (a registry stream in `pull`, a file in
//! `load`): a layer is *staged* (decompressed, hashed and unpacked into `tmp/`), then *committed*
//! (its uncompressed digest checked against the config's diff id, then renamed into `layers/`);
//! an image is committed once every layer is in, its manifest, config and record written under
//! the index lock. A staged layer that is not committed is removed when it is dropped, so no
//! error path leaves a half-checked tree behind.

use super::unpack::{self, Options, UnpackError, UnpackStats};
use super::{now, now_ns, ImageRecord, LayerRecord, Store, StoreError};
use crate::image::digest::Digest;
use crate::image::manifest::ImageConfig;
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("layer {layer}: {source}")]
    Unpack { layer: Digest, source: UnpackError },
    #[error("layer {layer}: uncompressed content has digest {actual}, but the image config says {expected}")]
    DiffIdMismatch {
        layer: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// sha256 of everything read through it (a diff id, or a blob's digest as it is read).
pub struct HashingReader<R> {
    pub inner: R,
    pub hasher: Sha256,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }
    pub fn digest(self) -> Digest {
        Digest::from_hasher(self.hasher)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.hasher.update(&buf[..k]);
        Ok(k)
    }
}

/// A layer unpacked into `tmp/`, not yet checked against its diff id. Dropped uncommitted, it is
/// removed.
pub struct StagedLayer {
    tmp: PathBuf,
    diff_id: Digest,
    stats: UnpackStats,
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            super::discard(&self.tmp);
        }
    }
}

impl StagedLayer {
    /// Publish as layer `expected` after checking its uncompressed digest; `compressed` is the
    /// verified digest of the blob it came from (named in errors, recorded for reuse).
    pub fn commit(
        mut self,
        store: &Store,
        expected: &Digest,
        compressed: &Digest,
    ) -> Result<LayerRecord, IngestError> {
        if &self.diff_id != expected {
            return Err(IngestError::DiffIdMismatch {
                layer: compressed.clone(),
                expected: expected.clone(),
                actual: self.diff_id.clone(),
            });
        }
        let rec = LayerRecord {
            diff_id: expected.clone(),
            size: self.stats.bytes,
            entries: self.stats.entries,
            compressed: vec![compressed.clone()],
            unpacked_at: now(),
            boot: super::boot_id().map(str::to_string),
            synced: false,
        };
        let tmp = std::mem::take(&mut self.tmp);
        if let Err(e) = store.publish_layer(&tmp, &rec) {
            super::discard(&tmp);
            return Err(e.into());
        }
        Ok(rec)
    }
}

impl Store {
    /// Decompress (gzip, zstd or none, by magic), hash and unpack the layer blob `r` into a fresh
    /// temp dir, within `budget`. `layer` names it in errors.
    pub fn stage_layer<R: Read>(
        &self,
        r: R,
        budget: &Arc<unpack::Budget>,
        layer: &Digest,
    ) -> Result<StagedLayer, IngestError> {
        let tmp = self.staging_dir()?;
        let mut staged = StagedLayer {
            tmp,
            diff_id: layer.clone(),
            stats: UnpackStats::default(),
        };
        let unpack_err = |source| IngestError::Unpack {
            layer: layer.clone(),
            source,
        };
        let dec = unpack::decompressor(r).map_err(|e| unpack_err(UnpackError::Read(e)))?;
        let mut hr = HashingReader::new(dec);
        let opts = Options {
            budget: Some(budget.clone()),
            ..Options::default()
        };
        staged.stats = unpack::unpack(&mut hr, &staged.tmp, opts).map_err(unpack_err)?;
        staged.diff_id = hr.digest();
        Ok(staged)
    }

    /// Record an image whose layers are all in the store: its blobs (index, manifest, config),
    /// its record and its `names`, under the index lock. A record already there keeps its names
    /// and the time it first arrived.
    pub fn commit_image(&self, img: &NewImage) -> Result<ImageRecord, StoreError> {
        let size = img
            .config
            .diff_ids
            .iter()
            .filter_map(|d| self.layer(d))
            .map(|l| l.size)
            .sum();
        let _g = self.lock_index()?;
        self.put_blob(&img.config_digest, img.config_bytes)?;
        self.put_blob(&img.manifest_digest, img.manifest_bytes)?;
        if let Some((d, bytes)) = img.index {
            self.put_blob(d, bytes)?;
        }
        let old = self.image(&img.manifest_digest);
        let t = now();
        let rec = ImageRecord {
            manifest: img.manifest_digest.clone(),
            index: img.index.map(|(d, _)| d.clone()),
            config: img.config_digest.clone(),
            layers: img.config.diff_ids.clone(),
            platform: format!("{}/{}", img.config.os, img.config.arch),
            run: img.config.run.clone(),
            names: old.as_ref().map(|o| o.names.clone()).unwrap_or_default(),
            size,
            pulled_at: old.as_ref().map(|o| o.pulled_at).unwrap_or(t),
            last_used: t,
            used_ns: now_ns(),
        };
        self.put_image(&rec)?;
        for n in img.names {
            self.tag(n, &rec.manifest)?;
        }
        Ok(self.image(&rec.manifest).unwrap_or(rec))
    }
}

/// An image ready to commit: every blob verified by whoever read it.
pub struct NewImage<'a> {
    pub manifest_digest: Digest,
    pub manifest_bytes: &'a [u8],
    /// The index it was chosen from, if any.
    pub index: Option<(&'a Digest, &'a [u8])>,
    pub config_digest: Digest,
    pub config_bytes: &'a [u8],
    pub config: &'a ImageConfig,
    pub names: &'a [String],
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An uncompressed one-file tar and its sha256 (its diff id).
    fn layer_tar() -> (Vec<u8>, Digest) {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_path("hello").unwrap();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"hi\n"[..]).unwrap();
        let t = b.into_inner().unwrap();
        let d = Digest::of(&t);
        (t, d)
    }

    fn tmp_entries(s: &Store) -> usize {
        std::fs::read_dir(s.root().join("tmp")).unwrap().count()
    }

    #[test]
    fn a_layer_is_committed_only_under_its_own_diff_id() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("store")).unwrap();
        let budget = unpack::Budget::for_dir(&s.root().join("tmp"), None, "test");
        let (t, diff) = layer_tar();
        let blob = Digest::of(b"the compressed blob");

        // the config names another diff id: refused, and nothing is left in tmp/ or layers/
        let staged = s.stage_layer(&t[..], &budget, &blob).unwrap();
        assert_eq!(tmp_entries(&s), 1);
        let other = Digest::of(b"another layer");
        let e = staged.commit(&s, &other, &blob).unwrap_err();
        assert!(
            matches!(&e, IngestError::DiffIdMismatch { actual, .. } if actual == &diff),
            "{e}"
        );
        assert!(e.to_string().contains(&blob.to_string()), "{e}");
        assert_eq!(tmp_entries(&s), 0);
        assert!(s.layer(&other).is_none() && s.layer(&diff).is_none());

        // dropped without a commit (another error on the caller's side): removed too
        drop(s.stage_layer(&t[..], &budget, &blob).unwrap());
        assert_eq!(tmp_entries(&s), 0);

        // the right one: published with its record
        let rec = s
            .stage_layer(&t[..], &budget, &blob)
            .unwrap()
            .commit(&s, &diff, &blob)
            .unwrap();
        assert_eq!((rec.size, rec.compressed.clone()), (3, vec![blob.clone()]));
        assert_eq!(s.layer(&diff), Some(rec));
        assert_eq!(
            std::fs::read(s.root().join("layers").join(diff.hex()).join("hello")).unwrap(),
            b"hi\n"
        );
        assert_eq!(tmp_entries(&s), 0);
    }

    /// A layer is unpacked without fsync; the settle pass syncs the filesystem and marks it. A
    /// record that says it was unpacked in another boot and never marked may name a torn tree:
    /// not used, still counted and collectable, and replaced by the next commit of the layer.
    #[test]
    fn a_layer_of_an_earlier_boot_is_trusted_only_once_synced() {
        let Some(now) = crate::store::boot_id() else {
            eprintln!("SKIP: no /proc/sys/kernel/random/boot_id");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("store")).unwrap();
        let budget = unpack::Budget::for_dir(&s.root().join("tmp"), None, "test");
        let (t, diff) = layer_tar();
        let blob = Digest::of(b"blob");
        let commit = || {
            s.stage_layer(&t[..], &budget, &blob)
                .unwrap()
                .commit(&s, &diff, &blob)
                .unwrap()
        };
        let rec = commit();
        assert_eq!((rec.boot.as_deref(), rec.synced), (Some(now), false));
        assert!(
            s.layer(&diff).is_some(),
            "this boot's unsynced layer is used"
        );

        assert_eq!(s.settle_layers().unwrap(), 1);
        assert!(s.layer(&diff).unwrap().synced);
        assert_eq!(s.settle_layers().unwrap(), 0, "marked twice");

        let path = s.root().join("layers").join(format!("{}.json", diff.hex()));
        let write = |boot: Option<&str>, synced: bool| {
            let mut r = rec.clone();
            r.boot = boot.map(str::to_string);
            r.synced = synced;
            std::fs::write(&path, serde_json::to_vec(&r).unwrap()).unwrap();
        };
        // an earlier boot, synced then; a record of cw before this (neither): used
        write(Some("an-earlier-boot"), true);
        assert!(s.layer(&diff).is_some());
        write(None, false);
        assert!(s.layer(&diff).is_some());
        // an earlier boot, never synced: not used, but seen by the store's accounting and GC
        write(Some("an-earlier-boot"), false);
        assert!(s.layer(&diff).is_none());
        assert!(s.layer_record(&diff).unwrap().maybe_torn());
        assert_eq!(s.layers().len(), 1);
        assert_eq!(
            s.settle_layers().unwrap(),
            0,
            "another boot's layer was marked"
        );
        assert!(s.layer(&diff).is_none());
        // pulled again: the tree is replaced and the record is this boot's
        std::fs::write(s.layer_dir(&diff).join("hello"), b"").unwrap();
        let again = commit();
        assert_eq!(again.boot.as_deref(), Some(now));
        assert!(s.layer(&diff).is_some());
        assert_eq!(
            std::fs::read(s.layer_dir(&diff).join("hello")).unwrap(),
            b"hi\n"
        );
    }

    #[test]
    fn a_broken_layer_names_itself_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("store")).unwrap();
        let budget = unpack::Budget::for_dir(&s.root().join("tmp"), None, "test");
        let (t, _) = layer_tar();
        let blob = Digest::of(b"blob");
        // gzip magic, then garbage
        let bad = [&[0x1f, 0x8b, 8, 0][..], &t[..100]].concat();
        let e = s.stage_layer(&bad[..], &budget, &blob).err().unwrap();
        assert!(matches!(e, IngestError::Unpack { .. }), "{e}");
        assert!(e.to_string().starts_with(&format!("layer {blob}: ")), "{e}");
        assert_eq!(tmp_entries(&s), 0);
    }
}
