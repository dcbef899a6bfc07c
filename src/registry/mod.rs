//! Registry client (distribution API v2): auth challenges, retries with backoff, mirrors,
//! size-bounded manifest fetches and range-resumable blob streams. Every byte is verified by the
//! caller against the digest it was asked for.

pub mod auth;
mod blob;
pub mod config;

pub use blob::{foreign_url, Download, Hasher};

use crate::image::digest::Digest;
use crate::image::manifest::{self, ManifestError};
use crate::image::reference::Reference;
use auth::{parse_challenge, Challenge, TokenResponse};
use config::{ConfigError, Credential, Endpoint, RegistryConfig};
use futures_util::StreamExt;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAX_ATTEMPTS: u32 = 6;
/// The default of [`RegistryConfig::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes a blob download must deliver in each timeout window.
pub const MIN_PROGRESS: u64 = 64 << 10;
const USER_AGENT: &str = concat!("cw/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{url}: {msg}")]
    Http { url: String, msg: String },
    #[error("{what} not found at {url} (HTTP 404)")]
    NotFound { what: String, url: String },
    #[error("{url}: access denied (HTTP {status}){detail}; check the credentials (~/.docker/config.json or --creds)")]
    Denied {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} from {url} is larger than the {limit}-byte limit")]
    TooLarge {
        what: String,
        url: String,
        limit: usize,
    },
    #[error("token server {realm}: {reason}")]
    Token { realm: String, reason: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl RegistryError {
    /// Worth trying the next mirror/endpoint for.
    pub fn try_next_endpoint(&self) -> bool {
        matches!(
            self,
            RegistryError::Http { .. }
                | RegistryError::NotFound { .. }
                | RegistryError::Status { .. }
                | RegistryError::Denied { .. }
        )
    }
}

type Result<T> = std::result::Result<T, RegistryError>;

pub struct Client {
    http: reqwest::Client,
    cfg: RegistryConfig,
    /// How long a manifest or config may take in all, and the window in which a blob must make
    /// progress ([`MIN_PROGRESS`] bytes): a registry that sends one byte every few seconds must
    /// not hold a pull (and a worker's bundle) for ever.
    timeout: Duration,
    /// Authorization header value by (endpoint base, repository).
    auth: Mutex<HashMap<(String, String), HeaderValue>>,
}

/// A repository on one endpoint.
#[derive(Clone)]
pub struct Repo {
    client: Arc<Client>,
    pub endpoint: Endpoint,
    pub repository: String,
}

/// A manifest as fetched: raw bytes (digest-verified), its digest and content type.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub content_type: Option<String>,
}

fn backoff(attempt: u32) -> Duration {
    let base = 250u64 << attempt.min(5);
    Duration::from_millis(base.min(8000) + rand::random::<u64>() % 100)
}

impl Client {
    pub fn new(cfg: RegistryConfig) -> Arc<Client> {
        let timeout = cfg.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(15).min(timeout))
            .read_timeout(timeout)
            .build()
            .expect("building the HTTP client");
        Arc::new(Client {
            http,
            cfg,
            timeout,
            auth: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// The places to pull `r` from, mirrors first.
    pub fn repos(self: &Arc<Self>, r: &Reference) -> Result<Vec<Repo>> {
        Ok(self
            .cfg
            .endpoints(&r.registry)?
            .into_iter()
            .map(|endpoint| Repo {
                client: self.clone(),
                endpoint,
                repository: r.repository.clone(),
            })
            .collect())
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<HeaderValue> {
        let terr = |reason: String| RegistryError::Token {
            realm: realm.to_string(),
            reason,
        };
        let cred = self.cfg.credential(&ep.host);
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let req = match &cred {
                Some(Credential::IdentityToken(t)) => {
                    let mut form = vec![
                        ("grant_type", "refresh_token"),
                        ("refresh_token", t.as_str()),
                        ("client_id", "cw"),
                        ("scope", scope),
                    ];
                    if let Some(s) = service {
                        form.push(("service", s));
                    }
                    self.http.post(realm).form(&form)
                }
                other => {
                    let mut q = vec![("scope", scope)];
                    if let Some(s) = service {
                        q.push(("service", s));
                    }
                    let mut rb = self.http.get(realm).query(&q);
                    if let Some(Credential::Basic(u, p)) = other {
                        rb = rb.basic_auth(u, Some(p));
                    }
                    rb
                }
            };
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    let body = resp.bytes().await.map_err(|e| terr(e.to_string()))?;
                    let t: TokenResponse = serde_json::from_slice(&body)
                        .map_err(|e| terr(format!("bad token response: {e}")))?;
                    let tok = t
                        .into_token()
                        .ok_or_else(|| terr("the response has no token".into()))?;
                    return HeaderValue::from_str(&format!("Bearer {tok}"))
                        .map_err(|_| terr("token has invalid characters".into()));
                }
                Ok(resp)
                    if resp.status() == StatusCode::UNAUTHORIZED
                        || resp.status() == StatusCode::FORBIDDEN =>
                {
                    return Err(terr(format!(
                        "credentials refused (HTTP {})",
                        resp.status().as_u16()
                    )));
                }
                Ok(resp)
                    if resp.status().is_server_error()
                        || resp.status() == StatusCode::TOO_MANY_REQUESTS =>
                {
                    last = format!("HTTP {}", resp.status().as_u16());
                }
                Ok(resp) => return Err(terr(format!("HTTP {}", resp.status().as_u16()))),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        Err(terr(last))
    }
}

impl Repo {
    fn url(&self, kind: &str, reference: &str) -> String {
        format!(
            "{}/v2/{}/{kind}/{reference}",
            self.endpoint.base.as_str().trim_end_matches('/'),
            self.repository
        )
    }

    fn key(&self) -> (String, String) {
        (self.endpoint.base.to_string(), self.repository.clone())
    }

    /// Send with auth and retries. 401 → answer the challenge once; 429/5xx/transport errors →
    /// back off and retry. Returns the final response whatever its status.
    /// The window in which a blob download must deliver [`MIN_PROGRESS`] bytes.
    pub fn progress_window(&self) -> Duration {
        self.client.timeout
    }

    /// A request with retries; `whole` bounds each attempt from connecting to its body's end
    /// (manifests and configs: small documents that must arrive in time).
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        whole: bool,
    ) -> Result<Response> {
        let client = &self.client;
        let mut answered_challenge = false;
        let mut last_err = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let mut rb = client
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if whole {
                rb = rb.timeout(client.timeout);
            }
            if let Some(h) = client.auth.lock().unwrap().get(&self.key()) {
                rb = rb.header(AUTHORIZATION, h.clone());
            }
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(e) => {
                    last_err = error_chain(&e);
                    if e.is_timeout() {
                        return Err(too_slow(url, client.timeout));
                    }
                    if e.is_connect() && self.endpoint.mirror && attempt >= 1 {
                        break; // a dead mirror: let the caller try the next endpoint soon
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !answered_challenge {
                answered_challenge = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(parse_challenge);
                let value = match challenge {
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope,
                    }) => {
                        let default_scope = format!("repository:{}:pull", self.repository);
                        let scope = scope
                            .filter(|s| s.contains(&self.repository))
                            .unwrap_or(default_scope);
                        client
                            .fetch_token(&self.endpoint, &realm, service.as_deref(), &scope)
                            .await?
                    }
                    Some(Challenge::Basic) => match client.cfg.credential(&self.endpoint.host) {
                        Some(Credential::Basic(u, p)) => {
                            use base64::Engine;
                            let enc = base64::engine::general_purpose::STANDARD
                                .encode(format!("{u}:{p}"));
                            HeaderValue::from_str(&format!("Basic {enc}"))
                                .expect("base64 is a valid header")
                        }
                        _ => {
                            return Err(RegistryError::Denied {
                                url: url.to_string(),
                                status: 401,
                                detail: format!(
                                    ": {} wants a user name and password and none is configured",
                                    self.endpoint.host
                                ),
                            })
                        }
                    },
                    None => return Ok(resp),
                };
                client.auth.lock().unwrap().insert(self.key(), value);
                continue;
            }
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                let wait = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s.min(30)))
                    .unwrap_or_else(|| backoff(attempt));
                last_err = format!("HTTP {}", status.as_u16());
                tracing::debug!("{url}: {last_err}, retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                continue;
            }
            return Ok(resp);
        }
        Err(RegistryError::Http {
            url: url.to_string(),
            msg: format!("gave up after retries: {last_err}"),
        })
    }

    async fn check(&self, resp: Response, what: &str) -> Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let url = resp.url().to_string();
        let body: String = resp
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        Err(match status {
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                what: what.to_string(),
                url,
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Denied {
                url,
                status: status.as_u16(),
                detail: if body.is_empty() {
                    String::new()
                } else {
                    format!(": {body}")
                },
            },
            _ => RegistryError::Status {
                url,
                status: status.as_u16(),
                body,
            },
        })
    }

    /// HEAD the manifest: its digest if the registry tells it (Docker-Content-Digest).
    pub async fn head_manifest(&self, reference: &str) -> Result<Option<Digest>> {
        let url = self.url("manifests", reference);
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(manifest::ACCEPT));
        let resp = self.send(Method::HEAD, &url, h, true).await?;
        let resp = self.check(resp, &format!("manifest {reference}")).await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok()))
    }

    /// GET a manifest, bounded in size and verified: against the digest when `reference` is one,
    /// and against Docker-Content-Digest when the registry sends it.
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let url = self.url("manifests", reference);
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(manifest::ACCEPT));
        let resp = self.send(Method::GET, &url, h, true).await?;
        let resp = self.check(resp, &format!("manifest {reference}")).await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let what = format!("manifest {}@{reference}", self.repository);
        let bytes = read_bounded(resp, &url, &what, manifest::MAX_MANIFEST_BYTES).await?;
        let digest = Digest::of(&bytes);
        let expected = match Digest::parse(reference) {
            Ok(d) => Some(d),
            Err(_) => header_digest,
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected,
                    actual: digest,
                });
            }
        }
        Ok(FetchedManifest {
            bytes,
            digest,
            content_type,
        })
    }

    /// A small blob (config) fully in memory, verified.
    pub async fn get_blob_bytes(&self, digest: &Digest, limit: usize) -> Result<Vec<u8>> {
        let url = self.url("blobs", &digest.to_string());
        let resp = self.send(Method::GET, &url, HeaderMap::new(), true).await?;
        let resp = self.check(resp, &format!("blob {digest}")).await?;
        let bytes = read_bounded(resp, &url, &format!("blob {digest}"), limit).await?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob {digest}"),
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

async fn read_bounded(resp: Response, url: &str, what: &str, limit: usize) -> Result<Vec<u8>> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(RegistryError::TooLarge {
            what: what.to_string(),
            url: url.to_string(),
            limit,
        });
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if e.is_timeout() {
                RegistryError::Http {
                    url: url.to_string(),
                    msg: format!("{what} did not arrive in time ({})", error_chain(&e)),
                }
            } else {
                RegistryError::Http {
                    url: url.to_string(),
                    msg: error_chain(&e),
                }
            }
        })?;
        if out.len() + chunk.len() > limit {
            return Err(RegistryError::TooLarge {
                what: what.to_string(),
                url: url.to_string(),
                limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn too_slow(url: &str, t: Duration) -> RegistryError {
    RegistryError::Http {
        url: url.to_string(),
        msg: format!(
            "no complete answer within {}s (the registry timeout)",
            t.as_secs()
        ),
    }
}

/// An error with its sources, one line (the runtime's, so that both read alike).
pub use cw_runtime::monitor::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_urls_are_checked() {
        assert!(foreign_url("https://cdn.example.org/layer", false).is_ok());
        for bad in [
            "http://127.0.0.1:2900/rest/",
            "http://localhost/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]/x",
            "http://0.0.0.0/x",
            "http://[::ffff:127.0.0.1]/x",
            "file:///etc/shadow",
            "https://user:pw@cdn.example.org/x",
        ] {
            assert!(foreign_url(bad, false).is_err(), "{bad}");
        }
        assert!(foreign_url("http://127.0.0.1:5000/x", true).is_ok());
    }
}
