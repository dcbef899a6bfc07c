//! Blobs: a range-resumable stream (foreign URLs first, never with credentials), and the
//! verified download a layer pull makes of it — every byte counted against the manifest's size
//! and hashed against its digest, a connection that stalls or drips cut off.

use super::{error_chain, RegistryError, Repo, Result, MIN_PROGRESS};
use crate::image::digest::Digest;
use crate::image::manifest::LayerDesc;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, RANGE};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use std::time::Duration;

/// Times a blob download resumes after its connection drops.
const BLOB_RESUMES: u32 = 5;

/// How a [`Repo::download`] ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum Download {
    /// Every byte arrived, the size and digest match the descriptor.
    Verified,
    /// The receiver hung up first: its own error is the one to report.
    ReceiverGone,
}

impl Repo {
    /// Open a blob stream at `offset`. Returns the response and whether it honoured the range
    /// (`false`: the body starts at byte 0 and the caller must skip `offset` bytes).
    pub async fn open_blob(
        &self,
        digest: &Digest,
        offset: u64,
        urls: &[String],
    ) -> Result<(Response, bool)> {
        let mut h = HeaderMap::new();
        if offset > 0 {
            h.insert(
                RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-")).unwrap(),
            );
        }
        // Foreign layers: their own URLs first, never with our credentials (the manifest
        // parser keeps `urls` only for foreign and non-distributable media types)
        for u in urls {
            let u = match foreign_url(u, self.client.cfg.local_foreign_urls) {
                Ok(u) => u,
                Err(why) => {
                    tracing::warn!("foreign layer URL {u:?} not used: {why}");
                    continue;
                }
            };
            match self
                .client
                .http
                .get(u.clone())
                .headers(h.clone())
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    let ranged = r.status() == StatusCode::PARTIAL_CONTENT;
                    return Ok((r, ranged));
                }
                Ok(r) => tracing::warn!("foreign layer URL {u}: HTTP {}", r.status().as_u16()),
                Err(e) => tracing::warn!("foreign layer URL {u}: {e}"),
            }
        }
        let url = self.url("blobs", &digest.to_string());
        let resp = self.send(Method::GET, &url, h, false).await?;
        let resp = self.check(resp, &format!("blob {digest}")).await?;
        let ranged = resp.status() == StatusCode::PARTIAL_CONTENT;
        Ok((resp, ranged))
    }

    /// Stream the blob `desc` into `tx`, resuming from the byte it stopped at when the connection
    /// drops (up to [`BLOB_RESUMES`] times), and check its size and digest once it has all
    /// arrived. `on_bytes` sees each chunk's length (progress). The blob must deliver
    /// [`MIN_PROGRESS`] bytes in every window: a registry that drips a byte now and then never
    /// trips the read timeout, and would hold the pull for ever.
    pub async fn download(
        &self,
        desc: &LayerDesc,
        tx: &tokio::sync::mpsc::Sender<bytes::Bytes>,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<Download> {
        let what = format!("layer {}", desc.digest);
        let mut hasher = Hasher::default();
        let mut offset: u64 = 0;
        let mut resumes = 0;
        let window = self.progress_window();
        'outer: loop {
            let (resp, ranged) = self.open_blob(&desc.digest, offset, &desc.urls).await?;
            let mut skip = if offset > 0 && !ranged { offset } else { 0 };
            let mut stream = resp.bytes_stream();
            let (mut since, mut got) = (tokio::time::Instant::now(), 0u64);
            loop {
                let chunk = match tokio::time::timeout_at(since + window, stream.next()).await {
                    Ok(Some(c)) => c,
                    Ok(None) => break 'outer,
                    Err(_) if got >= MIN_PROGRESS => {
                        (since, got) = (tokio::time::Instant::now(), 0);
                        continue;
                    }
                    Err(_) => {
                        return Err(RegistryError::Http {
                            url: desc.digest.to_string(),
                            msg: format!(
                                "the registry sent {got} bytes in {}s, less than the {MIN_PROGRESS} a download must make in that time (registry_timeout)",
                                window.as_secs(),
                            ),
                        })
                    }
                };
                let mut b = match chunk {
                    Ok(b) => b,
                    Err(e) if resumes < BLOB_RESUMES => {
                        resumes += 1;
                        tracing::info!(
                            "{what}: connection lost at byte {offset} ({}); resuming",
                            error_chain(&e)
                        );
                        tokio::time::sleep(Duration::from_millis(200 * resumes as u64)).await;
                        continue 'outer;
                    }
                    Err(e) => {
                        return Err(RegistryError::Http {
                            url: desc.digest.to_string(),
                            msg: error_chain(&e),
                        })
                    }
                };
                got += b.len() as u64;
                if since.elapsed() >= window {
                    (since, got) = (tokio::time::Instant::now(), 0);
                }
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
                    return Err(RegistryError::SizeMismatch {
                        what,
                        expected: desc.size,
                        actual: offset,
                    });
                }
                hasher.update(&b);
                on_bytes(b.len() as u64);
                if tx.send(b).await.is_err() {
                    return Ok(Download::ReceiverGone);
                }
            }
        }
        if offset != desc.size {
            return Err(RegistryError::SizeMismatch {
                what,
                expected: desc.size,
                actual: offset,
            });
        }
        let actual = hasher.finish();
        if actual != desc.digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(Download::Verified)
    }
}

/// A foreign layer URL cw may fetch: http(s) only, and not on a loopback, link-local or
/// unspecified address (or `localhost`) unless `allow_local`. A manifest is untrusted input:
/// its URLs would otherwise let any image make cw send requests to the node's own services.
pub fn foreign_url(u: &str, allow_local: bool) -> std::result::Result<url::Url, String> {
    let url = url::Url::parse(u).map_err(|e| format!("not a URL: {e}"))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(format!("scheme {:?} is not http(s)", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("it carries credentials".into());
    }
    let local = match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback() || a.is_link_local() || a.is_unspecified(),
        Some(url::Host::Ipv6(a)) => {
            a.is_loopback()
                || a.is_unspecified()
                || (a.segments()[0] & 0xffc0) == 0xfe80
                || a.to_ipv4_mapped()
                    .is_some_and(|v| v.is_loopback() || v.is_link_local())
        }
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        None => return Err("no host".into()),
    };
    if local && !allow_local {
        return Err(
            "a loopback or link-local address (foreign_layer_urls_local = true allows it)".into(),
        );
    }
    Ok(url)
}

/// sha256 over a stream, for callers verifying blobs chunk by chunk.
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    pub fn finish(self) -> Digest {
        Digest::from_hasher(self.0)
    }
}
