//! `cw pull`: reference → registry → verified manifest/config → layers streamed, verified and
//! unpacked in parallel → published into the store.

use crate::image::digest::Digest;
use crate::image::manifest::{self, LayerDesc, Parsed, Platform};
use crate::image::reference::Reference;
use crate::progress::Progress;
use crate::registry::{error_chain, Client, FetchedManifest, Hasher, RegistryError, Repo};
use crate::store::unpack::{self, Options, UnpackError};
use crate::store::{now, ImageRecord, LayerRecord, Store, StoreError};
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

/// Layers downloaded at once.
pub const DEFAULT_PARALLEL: usize = 3;
const BLOB_RESUMES: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pulling {reference}: {source}")]
    Registry {
        reference: String,
        source: RegistryError,
    },
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
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error("{0}")]
    Other(String),
}

#[derive(Clone)]
pub struct PullOptions {
    pub platform: Platform,
    pub parallel: usize,
    pub progress: Progress,
    /// Skip the registry when the name is already in the store (`--pull missing`).
    pub only_if_missing: bool,
    /// Bytes the image may unpack to (the config's `max_image_size`, the worker's
    /// `--max-image-size`); the store's free space bounds it in any case.
    pub max_unpacked: Option<u64>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::host(),
            parallel: DEFAULT_PARALLEL,
            progress: Progress::quiet(),
            only_if_missing: false,
            max_unpacked: None,
        }
    }
}

/// What a pull did, for the caller (tests count GETs through `fetched_blobs`).
#[derive(Debug, Clone)]
pub struct PullResult {
    pub image: ImageRecord,
    pub fetched_layers: usize,
    pub reused_layers: usize,
    /// True when the tag's digest was unchanged and nothing but a HEAD was needed.
    pub up_to_date: bool,
}

fn reg(r: &Reference) -> impl Fn(RegistryError) -> PullError + '_ {
    move |source| PullError::Registry {
        reference: r.to_string(),
        source,
    }
}

/// Bytes from an async downloader to a blocking consumer (unpacker, decompressor).
pub struct ChannelReader {
    pub rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    pub cur: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// sha256 of everything read through it (the diff id of an uncompressed layer).
pub struct HashingReader<R> {
    pub inner: R,
    pub hasher: Sha256,
    pub n: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.hasher.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
}

/// Decompress, hash and unpack `r` into a fresh temp dir; returns the dir, diff id and stats.
pub fn unpack_to_tmp<R: Read>(
    store: &Store,
    r: R,
    budget: &Arc<unpack::Budget>,
) -> Result<(std::path::PathBuf, Digest, unpack::UnpackStats), (std::path::PathBuf, UnpackError)> {
    let tmp = store.tmp_dir("layer").map_err(|e| {
        (
            std::path::PathBuf::new(),
            UnpackError::Read(io::Error::other(e.to_string())),
        )
    })?;
    let res = (|| {
        let dec = unpack::decompressor(r).map_err(UnpackError::Read)?;
        let mut hr = HashingReader {
            inner: dec,
            hasher: Sha256::new(),
            n: 0,
        };
        let opts = Options {
            budget: Some(budget.clone()),
            ..Options::default()
        };
        let stats = unpack::unpack(&mut hr, &tmp, opts)?;
        Ok((Digest::from_hasher(hr.hasher), stats))
    })();
    match res {
        Ok((d, s)) => Ok((tmp, d, s)),
        Err(e) => Err((tmp, e)),
    }
}

/// Publish an unpacked temp dir as layer `diff_id` after checking its digest.
pub fn publish(
    store: &Store,
    tmp: &std::path::Path,
    expected: &Digest,
    actual: Digest,
    compressed: &Digest,
    stats: &unpack::UnpackStats,
) -> Result<LayerRecord, PullError> {
    if &actual != expected {
        crate::store::discard(tmp);
        return Err(PullError::DiffIdMismatch {
            layer: compressed.clone(),
            expected: expected.clone(),
            actual,
        });
    }
    let rec = LayerRecord {
        diff_id: expected.clone(),
        size: stats.bytes,
        entries: stats.entries,
        compressed: vec![compressed.clone()],
        unpacked_at: now(),
    };
    store.publish_layer(tmp, &rec)?;
    Ok(rec)
}

async fn fetch_layer(
    repo: Repo,
    store: Store,
    desc: LayerDesc,
    diff_id: Digest,
    progress: Progress,
    budget: Arc<unpack::Budget>,
) -> Result<bool, PullError> {
    let s2 = store.clone();
    let d2 = diff_id.clone();
    let lock = tokio::task::spawn_blocking(move || s2.lock_layer(&d2))
        .await
        .map_err(|e| PullError::Other(e.to_string()))??;
    if store.layer(&diff_id).is_some() {
        store.note_compressed(&diff_id, &desc.digest)?;
        drop(lock);
        return Ok(false);
    }
    let id = desc.digest.short().to_string();
    progress.layer_start(&id, desc.size);
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(32);
    let st = store.clone();
    let unpacker = tokio::task::spawn_blocking(move || {
        unpack_to_tmp(
            &st,
            ChannelReader {
                rx,
                cur: bytes::Bytes::new(),
            },
            &budget,
        )
    });

    let what = format!("layer {}", desc.digest);
    let mut hasher = Hasher::default();
    let mut offset: u64 = 0;
    let mut resumes = 0;
    let mut download_err: Option<PullError> = None;
    let mut receiver_gone = false;
    'outer: loop {
        let (resp, ranged) = match repo.open_blob(&desc.digest, offset, &desc.urls).await {
            Ok(x) => x,
            Err(e) => {
                download_err = Some(PullError::Registry {
                    reference: what.clone(),
                    source: e,
                });
                break;
            }
        };
        let mut skip = if offset > 0 && !ranged { offset } else { 0 };
        let mut stream = resp.bytes_stream();
        // a blob must deliver MIN_PROGRESS bytes in every window: a registry that drips a byte
        // now and then never trips the read timeout, and would hold the pull for ever
        let window = repo.progress_window();
        let (mut since, mut got) = (tokio::time::Instant::now(), 0u64);
        loop {
            let chunk = match tokio::time::timeout_at(since + window, stream.next()).await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) if got >= crate::registry::MIN_PROGRESS => {
                    (since, got) = (tokio::time::Instant::now(), 0);
                    continue;
                }
                Err(_) => {
                    download_err = Some(PullError::Registry {
                        reference: what.clone(),
                        source: RegistryError::Http {
                            url: desc.digest.to_string(),
                            msg: format!(
                                "the registry sent {got} bytes in {}s, less than the {} a download must make in that time (registry_timeout)",
                                window.as_secs(),
                                crate::registry::MIN_PROGRESS
                            ),
                        },
                    });
                    break 'outer;
                }
            };
            if let Ok(b) = &chunk {
                got += b.len() as u64;
                if since.elapsed() >= window {
                    (since, got) = (tokio::time::Instant::now(), 0);
                }
            }
            match chunk {
                Ok(mut b) => {
                    if skip > 0 {
                        let k = skip.min(b.len() as u64) as usize;
                        let _ = b.split_to(k);
                        skip -= k as u64;
                        if b.is_empty() {
                            continue;
                        }
                    }
                    offset += b.len() as u64;
                    if offset > desc.size {
                        download_err = Some(PullError::Registry {
                            reference: what.clone(),
                            source: RegistryError::SizeMismatch {
                                what: what.clone(),
                                expected: desc.size,
                                actual: offset,
                            },
                        });
                        break 'outer;
                    }
                    hasher.update(&b);
                    progress.layer_bytes(&id, b.len() as u64);
                    if tx.send(b).await.is_err() {
                        receiver_gone = true; // the unpacker failed: its error is the one to report
                        break 'outer;
                    }
                }
                Err(e) => {
                    if resumes >= BLOB_RESUMES {
                        download_err = Some(PullError::Registry {
                            reference: what.clone(),
                            source: RegistryError::Http {
                                url: desc.digest.to_string(),
                                msg: error_chain(&e),
                            },
                        });
                        break 'outer;
                    }
                    resumes += 1;
                    tracing::info!(
                        "{what}: connection lost at byte {offset} ({}); resuming",
                        error_chain(&e)
                    );
                    tokio::time::sleep(Duration::from_millis(200 * resumes as u64)).await;
                    continue 'outer;
                }
            }
        }
        break;
    }
    drop(tx);
    if download_err.is_none() && !receiver_gone {
        if offset != desc.size {
            download_err = Some(PullError::Registry {
                reference: what.clone(),
                source: RegistryError::SizeMismatch {
                    what: what.clone(),
                    expected: desc.size,
                    actual: offset,
                },
            });
        } else {
            let actual = hasher.finish();
            if actual != desc.digest {
                download_err = Some(PullError::Registry {
                    reference: what.clone(),
                    source: RegistryError::DigestMismatch {
                        what: what.clone(),
                        expected: desc.digest.clone(),
                        actual,
                    },
                });
            }
        }
    }
    let unpacked = unpacker
        .await
        .map_err(|e| PullError::Other(format!("unpacker task: {e}")))?;
    let res = match (download_err, unpacked) {
        (Some(e), Ok((tmp, _, _))) | (Some(e), Err((tmp, _))) => {
            crate::store::discard(&tmp);
            Err(e)
        }
        (None, Err((tmp, e))) => {
            crate::store::discard(&tmp);
            Err(PullError::Unpack {
                layer: desc.digest.clone(),
                source: e,
            })
        }
        (None, Ok((tmp, actual, stats))) => {
            let st = store.clone();
            let (d, dd) = (diff_id.clone(), desc.digest.clone());
            tokio::task::spawn_blocking(move || publish(&st, &tmp, &d, actual, &dd, &stats))
                .await
                .map_err(|e| PullError::Other(e.to_string()))?
                .map(|_| true)
        }
    };
    progress.layer_done(&id, if res.is_ok() { "done" } else { "failed" });
    drop(lock);
    res
}

/// Read a manifest from the store when its digest is known and cached, else from the registry.
async fn manifest_by_digest(
    repo: &Repo,
    store: &Store,
    d: &Digest,
) -> Result<FetchedManifest, RegistryError> {
    if let Some(bytes) = store.read_blob(d) {
        return Ok(FetchedManifest {
            bytes,
            digest: d.clone(),
            content_type: None,
        });
    }
    repo.get_manifest(&d.to_string()).await
}

/// Whether the store holds the image (or index) `d` under a name of `r`'s repository: only then
/// does a HEAD that answers `d` bind `r` without a GET.
fn pulled_from(store: &Store, d: &Digest, r: &Reference) -> bool {
    let ours = |i: &ImageRecord| {
        i.names.iter().any(|n| {
            Reference::parse(n)
                .is_ok_and(|x| x.registry == r.registry && x.repository == r.repository)
        })
    };
    // a platform manifest's record is read directly; only an index needs the scan
    match store.image(d) {
        Some(i) => ours(&i),
        None => store
            .images()
            .iter()
            .any(|i| i.index.as_ref() == Some(d) && ours(i)),
    }
}

/// Resolve the reference on one endpoint: the top-level manifest (HEAD first when by tag).
async fn resolve(
    repo: &Repo,
    store: &Store,
    r: &Reference,
) -> Result<(FetchedManifest, bool), RegistryError> {
    if let Some(d) = &r.digest {
        return Ok((manifest_by_digest(repo, store, d).await?, false));
    }
    let tag = r.manifest_ref();
    if let Some(d) = repo.head_manifest(&tag).await? {
        if store.read_blob(&d).is_some() {
            if pulled_from(store, &d, r) {
                return Ok((manifest_by_digest(repo, store, &d).await?, true));
            }
            // the store has that image from elsewhere: this repository must show that it has it
            // too (a HEAD alone could name any image a registry knows is cached here)
            return Ok((repo.get_manifest(&d.to_string()).await?, true));
        }
    }
    Ok((repo.get_manifest(&tag).await?, false))
}

pub async fn pull(
    client: &Arc<Client>,
    store: &Store,
    r: &Reference,
    opts: &PullOptions,
) -> Result<PullResult, PullError> {
    let name = r.to_string();
    if opts.only_if_missing {
        if let Ok(img) = store.lookup(&name) {
            if store.image_complete(&img.manifest).is_some() {
                store.touch(&img.manifest);
                return Ok(PullResult {
                    image: img,
                    fetched_layers: 0,
                    reused_layers: 0,
                    up_to_date: true,
                });
            }
        }
    }
    let repos = client.repos(r).map_err(reg(r))?;
    let mut last_err = None;
    let mut chosen = None;
    for repo in repos {
        match resolve(&repo, store, r).await {
            Ok(x) => {
                chosen = Some((repo, x));
                break;
            }
            Err(e) if e.try_next_endpoint() => {
                if repo.endpoint.mirror {
                    tracing::info!(
                        "mirror {} failed for {name}: {e}; trying the next endpoint",
                        repo.endpoint.base
                    );
                }
                last_err = Some(e);
            }
            Err(e) => return Err(reg(r)(e)),
        }
    }
    let Some((repo, (top, cached_top))) = chosen else {
        return Err(reg(r)(last_err.expect("at least one endpoint")));
    };

    // index → platform manifest
    let mut index = None;
    let mut man = top;
    let mut parsed = manifest::parse(&man.bytes, man.content_type.as_deref())?;
    if let Parsed::Index(entries) = &parsed {
        let e = manifest::select_platform(entries, &opts.platform)?;
        index = Some(man.clone());
        man = manifest_by_digest(&repo, store, &e.digest)
            .await
            .map_err(reg(r))?;
        if man.bytes.len() as u64 != e.size && e.size != 0 {
            return Err(reg(r)(RegistryError::SizeMismatch {
                what: format!("manifest {}", e.digest),
                expected: e.size,
                actual: man.bytes.len() as u64,
            }));
        }
        parsed = manifest::parse(&man.bytes, man.content_type.as_deref())?;
    }
    let Parsed::Image(m) = parsed else {
        return Err(PullError::Other(format!(
            "{name}: an index points at another index, which cw does not follow"
        )));
    };

    // a known image whose manifest is unchanged: nothing to fetch
    if cached_top {
        if let Some(img) = store.image_complete(&man.digest) {
            let _g = store.lock_index()?;
            store.tag(&name, &img.manifest)?;
            store.touch(&img.manifest);
            return Ok(PullResult {
                image: store.image(&img.manifest).unwrap_or(img),
                fetched_layers: 0,
                reused_layers: 0,
                up_to_date: true,
            });
        }
    }

    let config_bytes = match store.read_blob(&m.config) {
        Some(b) => b,
        None => repo
            .get_blob_bytes(&m.config, manifest::MAX_CONFIG_BYTES)
            .await
            .map_err(reg(r))?,
    };
    if config_bytes.len() as u64 != m.config_size {
        return Err(reg(r)(RegistryError::SizeMismatch {
            what: format!("config {}", m.config),
            expected: m.config_size,
            actual: config_bytes.len() as u64,
        }));
    }
    let config = manifest::parse_config(&config_bytes)?;
    if config.diff_ids.len() != m.layers.len() {
        return Err(manifest::ManifestError::LayerCountMismatch {
            diff_ids: config.diff_ids.len(),
            layers: m.layers.len(),
        }
        .into());
    }

    store.clean_tmp();
    let todo: Vec<(LayerDesc, Digest)> = m
        .layers
        .iter()
        .cloned()
        .zip(config.diff_ids.iter().cloned())
        .collect();
    let mut fetched = 0;
    let mut reused = 0;
    let budget = unpack::Budget::for_dir(
        &store.root().join("tmp"),
        opts.max_unpacked,
        &format!("image {name}"),
    );
    let mut stream = futures_util::stream::iter(todo.into_iter().map(|(desc, diff)| {
        let (repo, store, progress) = (repo.clone(), store.clone(), opts.progress.clone());
        let budget = budget.clone();
        async move {
            if store.layer(&diff).is_some() {
                store.note_compressed(&diff, &desc.digest)?;
                return Ok(false);
            }
            fetch_layer(repo, store, desc, diff, progress, budget).await
        }
    }))
    .buffer_unordered(opts.parallel.max(1));
    let mut first_err = None;
    while let Some(res) = stream.next().await {
        match res {
            Ok(true) => fetched += 1,
            Ok(false) => reused += 1,
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }

    let size: u64 = config
        .diff_ids
        .iter()
        .filter_map(|d| store.layer(d))
        .map(|l| l.size)
        .sum();
    let _g = store.lock_index()?;
    store.put_blob(&m.config, &config_bytes)?;
    store.put_blob(&man.digest, &man.bytes)?;
    if let Some(i) = &index {
        store.put_blob(&i.digest, &i.bytes)?;
    }
    let old = store.image(&man.digest);
    let t = now();
    let rec = ImageRecord {
        manifest: man.digest.clone(),
        index: index.map(|i| i.digest),
        config: m.config.clone(),
        layers: config.diff_ids.clone(),
        platform: format!("{}/{}", config.os, config.arch),
        run: config.run.clone(),
        names: old.as_ref().map(|o| o.names.clone()).unwrap_or_default(),
        size,
        pulled_at: old.as_ref().map(|o| o.pulled_at).unwrap_or(t),
        last_used: t,
        used_ns: crate::store::now_ns(),
    };
    store.put_image(&rec)?;
    store.tag(&name, &rec.manifest)?;
    Ok(PullResult {
        image: store.image(&rec.manifest).unwrap_or(rec),
        fetched_layers: fetched,
        reused_layers: reused,
        up_to_date: false,
    })
}
