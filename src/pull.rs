//! `cw pull`: reference → registry → verified manifest/config → layers streamed, verified and
//! unpacked in parallel → published into the store.

use crate::bridge::ChannelReader;
use crate::image::digest::Digest;
use crate::image::manifest::{self, LayerDesc, Parsed, Platform};
use crate::image::reference::Reference;
use crate::progress::Progress;
use crate::registry::{Client, Download, FetchedManifest, RegistryError, Repo};
use crate::store::ingest::{IngestError, NewImage};
use crate::store::unpack;
use crate::store::{ImageRecord, Store, StoreError};
use futures_util::StreamExt;
use std::sync::Arc;

/// Layers downloaded at once.
pub const DEFAULT_PARALLEL: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pulling {reference}: {source}")]
    Registry {
        reference: String,
        source: RegistryError,
    },
    #[error(transparent)]
    Ingest(#[from] IngestError),
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
    let (st, layer) = (store.clone(), desc.digest.clone());
    let unpacker = tokio::task::spawn_blocking(move || {
        st.stage_layer(ChannelReader::new(rx), &budget, &layer)
    });
    let downloaded = repo
        .download(&desc, &tx, |n| progress.layer_bytes(&id, n))
        .await;
    drop(tx);
    let staged = unpacker
        .await
        .map_err(|e| PullError::Other(format!("unpacker task: {e}")))?;
    // a download that failed is the error to report, also when the unpacker then failed on the
    // truncated stream; an unpacker that failed first made the download stop (ReceiverGone)
    let res = match (downloaded, staged) {
        (Err(e), _) => Err(PullError::Registry {
            reference: format!("layer {}", desc.digest),
            source: e,
        }),
        (Ok(_), Err(e)) => Err(e.into()),
        (Ok(Download::ReceiverGone), Ok(_)) => Err(PullError::Other(format!(
            "layer {}: the unpacker stopped reading before the end",
            desc.digest
        ))),
        (Ok(Download::Verified), Ok(staged)) => {
            let st = store.clone();
            tokio::task::spawn_blocking(move || staged.commit(&st, &diff_id, &desc.digest))
                .await
                .map_err(|e| PullError::Other(e.to_string()))?
                .map(|_| true)
                .map_err(PullError::from)
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
    let config = manifest::parse_config_for(&config_bytes, m.layers.len())?;

    store.clean_tmp();
    let mut todo: Vec<(LayerDesc, Digest)> = m
        .layers
        .iter()
        .cloned()
        .zip(config.diff_ids.iter().cloned())
        .collect();
    // largest first: the pull lasts as long as its slowest layer, and a large layer started
    // last (ubuntu-like's 174 MB one is its fourth) runs alone at the end while the other
    // core idles. Sizes are the manifest's, untrusted, and only order the work.
    todo.sort_by_key(|(desc, _)| std::cmp::Reverse(desc.size));
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
    // the new layers' files reach the disk in the background (a pull does not wait for it);
    // until then a restart would leave them untrusted, to be pulled again
    if fetched > 0 {
        store.settle_in_background();
    }
    if let Some(e) = first_err {
        return Err(e);
    }

    let names = [name];
    let image = store.commit_image(&NewImage {
        manifest_digest: man.digest.clone(),
        manifest_bytes: &man.bytes,
        index: index.as_ref().map(|i| (&i.digest, &i.bytes[..])),
        config_digest: m.config.clone(),
        config_bytes: &config_bytes,
        config: &config,
        names: &names,
    })?;
    Ok(PullResult {
        image,
        fetched_layers: fetched,
        reused_layers: reused,
        up_to_date: false,
    })
}
