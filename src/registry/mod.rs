//! Registry client (distribution API v2): auth challenges, retries with backoff, mirrors,
//! size-bounded manifest fetches and range-resumable blob streams. Every byte is verified by the
//! caller against the digest it was asked for.

pub mod auth;
pub mod config;

use crate::image::digest::Digest;
use crate::image::manifest::{self, ManifestError};
use crate::image::reference::Reference;
use auth::{parse_challenge, Challenge, TokenResponse};
use config::{ConfigError, Credential, Endpoint, RegistryConfig};
use futures_util::StreamExt;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RANGE, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MAX_ATTEMPTS: u32 = 6;
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
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .build()
            .expect("building the HTTP client");
        Arc::new(Client {
            http,
            cfg,
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
    async fn send(&self, method: Method, url: &str, headers: HeaderMap) -> Result<Response> {
        let client = &self.client;
        let mut answered_challenge = false;
        let mut last_err = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            let mut rb = client
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(h) = client.auth.lock().unwrap().get(&self.key()) {
                rb = rb.header(AUTHORIZATION, h.clone());
            }
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(e) => {
                    last_err = error_chain(&e);
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
        let resp = self.send(Method::HEAD, &url, h).await?;
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
        let resp = self.send(Method::GET, &url, h).await?;
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
        let resp = self.send(Method::GET, &url, HeaderMap::new()).await?;
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
        // Foreign layers: their own URLs first, never with our credentials.
        for u in urls
            .iter()
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        {
            match self.client.http.get(u).headers(h.clone()).send().await {
                Ok(r) if r.status().is_success() => {
                    let ranged = r.status() == StatusCode::PARTIAL_CONTENT;
                    return Ok((r, ranged));
                }
                Ok(r) => tracing::warn!("foreign layer URL {u}: HTTP {}", r.status().as_u16()),
                Err(e) => tracing::warn!("foreign layer URL {u}: {e}"),
            }
        }
        let url = self.url("blobs", &digest.to_string());
        let resp = self.send(Method::GET, &url, h).await?;
        let resp = self.check(resp, &format!("blob {digest}")).await?;
        let ranged = resp.status() == StatusCode::PARTIAL_CONTENT;
        Ok((resp, ranged))
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
        let chunk = chunk.map_err(|e| RegistryError::Http {
            url: url.to_string(),
            msg: error_chain(&e),
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

/// An error with its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
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
