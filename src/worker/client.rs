//! The REST side of the protocol (spec §3–4): OAuth password grant with refresh, checkin,
//! start_bundle, replies, dependency downloads and the results upload. Every request carries
//! `X-Requested-With: XMLHttpRequest` (without it the server answers 302 to a login page).

use super::proto::Checkin;
use reqwest::{Body, Method, StatusCode};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{method} {url}: HTTP {status}: {body}")]
    Http {
        method: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{method} {url}: {source}")]
    Net {
        method: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("login as {user:?} at {url} failed: {reason}")]
    Auth {
        user: String,
        url: String,
        reason: String,
    },
    #[error("{0}")]
    Protocol(String),
}

impl ClientError {
    /// 5xx and network errors are worth retrying; 4xx are not (the official worker's classes).
    pub fn retriable(&self) -> bool {
        match self {
            ClientError::Http { status, .. } => *status >= 500,
            ClientError::Net { .. } => true,
            _ => false,
        }
    }
}

/// `urllib.parse.quote` with its default safe characters (letters, digits, `_.-~/`).
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub struct Server {
    http: reqwest::Client,
    /// `<server>/rest`
    base: String,
    user: String,
    password: String,
    token: Mutex<Option<(String, Instant)>>,
    timeout: Duration,
}

fn xhr(b: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    b.header("X-Requested-With", "XMLHttpRequest")
}

impl Server {
    pub fn new(server: &str, user: String, password: String) -> Result<Server, ClientError> {
        let timeout = std::env::var("CODALAB_URLOPEN_TIMEOUT_SECONDS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(300);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("cw-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Protocol(format!("HTTP client: {e}")))?;
        Ok(Server {
            http,
            base: format!("{}/rest", server.trim_end_matches('/')),
            user,
            password,
            token: Mutex::new(None),
            timeout: Duration::from_secs(timeout),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The OAuth2 password grant of the built-in client `codalab_worker_client` (no secret).
    pub async fn login(&self) -> Result<(), ClientError> {
        let url = format!("{}/oauth2/token", self.base);
        let resp = xhr(self.http.post(&url))
            .basic_auth("codalab_worker_client", Some(""))
            .form(&[
                ("grant_type", "password"),
                ("username", &self.user),
                ("password", &self.password),
            ])
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|source| ClientError::Net {
                method: "POST".into(),
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let with = |reason: String| ClientError::Auth {
            user: self.user.clone(),
            url: url.clone(),
            reason,
        };
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            if status.is_server_error() {
                return Err(ClientError::Http {
                    method: "POST".into(),
                    url,
                    status: status.as_u16(),
                    body: text,
                });
            }
            return Err(with(format!("HTTP {status}: {text}")));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| with(format!("the token response is not JSON: {e}")))?;
        if v["token_type"].as_str() != Some("Bearer") {
            return Err(with(format!(
                "token_type {} is not Bearer",
                v["token_type"]
            )));
        }
        let token = v["access_token"]
            .as_str()
            .ok_or_else(|| with("no access_token in the response".into()))?
            .to_string();
        let life = v["expires_in"].as_u64().unwrap_or(3600);
        *self.token.lock().unwrap() = Some((token, Instant::now() + Duration::from_secs(life)));
        Ok(())
    }

    /// A valid token; logs in again when fewer than 5 minutes of it are left.
    async fn bearer(&self) -> Result<String, ClientError> {
        let cur = self.token.lock().unwrap().clone();
        if let Some((t, exp)) = cur {
            if exp > Instant::now() + Duration::from_secs(300) {
                return Ok(t);
            }
        }
        self.login().await?;
        Ok(self.token.lock().unwrap().as_ref().unwrap().0.clone())
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        timeout: Duration,
        f: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{}", self.base, path);
        let token = self.bearer().await?;
        let b = xhr(self.http.request(method.clone(), &url))
            .bearer_auth(token)
            .timeout(timeout);
        let resp = f(b).send().await.map_err(|source| ClientError::Net {
            method: method.to_string(),
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED {
            *self.token.lock().unwrap() = None;
        }
        Err(ClientError::Http {
            method: method.to_string(),
            url,
            status: status.as_u16(),
            body: body.chars().take(500).collect(),
        })
    }

    /// The whole body; a failure while reading it is a network error on `url`.
    async fn body(resp: reqwest::Response, method: &str) -> Result<Vec<u8>, ClientError> {
        let url = resp.url().to_string();
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|source| ClientError::Net {
                method: method.into(),
                url,
                source,
            })
    }

    async fn json(resp: reqwest::Response) -> Result<serde_json::Value, ClientError> {
        let url = resp.url().to_string();
        let b = Self::body(resp, "read").await?;
        serde_json::from_slice(&b)
            .map_err(|e| ClientError::Protocol(format!("{url}: response is not JSON: {e}")))
    }

    /// The long-poll checkin: the server holds it up to 5 s for a message.
    pub async fn checkin(&self, id: &str, body: &Checkin) -> Result<Vec<u8>, ClientError> {
        let resp = self
            .request(
                Method::POST,
                &format!("/workers/{}/checkin", quote(id)),
                Duration::from_secs(90),
                |b| b.json(body),
            )
            .await?;
        Self::body(resp, "POST").await
    }

    pub async fn start_bundle(
        &self,
        id: &str,
        uuid: &str,
        hostname: &str,
    ) -> Result<bool, ClientError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let resp = self
            .request(
                Method::POST,
                &format!("/workers/{}/start_bundle/{}", quote(id), quote(uuid)),
                self.timeout,
                |b| b.json(&serde_json::json!({"hostname": hostname, "start_time": now})),
            )
            .await?;
        Ok(Self::json(resp).await?.as_bool().unwrap_or(false))
    }

    pub async fn reply(
        &self,
        id: &str,
        socket_id: i64,
        msg: &serde_json::Value,
    ) -> Result<(), ClientError> {
        self.request(
            Method::POST,
            &format!("/workers/{}/reply/{socket_id}", quote(id)),
            self.timeout,
            |b| b.json(msg),
        )
        .await?;
        Ok(())
    }

    pub async fn reply_error(
        &self,
        id: &str,
        socket_id: i64,
        code: u16,
        message: &str,
    ) -> Result<(), ClientError> {
        self.reply(
            id,
            socket_id,
            &serde_json::json!({"error_code": code, "error_message": message}),
        )
        .await
    }

    /// Raw bytes for a read or netcat: header `{}` in the query, the body streamed.
    pub async fn reply_data(
        &self,
        id: &str,
        socket_id: i64,
        body: Body,
    ) -> Result<(), ClientError> {
        self.request(
            Method::POST,
            &format!("/workers/{}/reply_data/{socket_id}", quote(id)),
            self.timeout,
            |b| b.query(&[("header_message", "{}")]).body(body),
        )
        .await?;
        Ok(())
    }

    /// Whether the server still has the bundle: `GET /bundles/<uuid>` (404: deleted; any other
    /// answer that is not a success is an error, not an answer).
    pub async fn bundle_exists(&self, uuid: &str) -> Result<bool, ClientError> {
        match self
            .request(
                Method::GET,
                &format!("/bundles/{}", quote(uuid)),
                self.timeout * 2,
                |b| b,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(ClientError::Http { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `GET /bundles/<uuid>/contents/info/<path>` → `data`.
    pub async fn contents_info(
        &self,
        uuid: &str,
        path: &str,
    ) -> Result<serde_json::Value, ClientError> {
        let resp = self
            .request(
                Method::GET,
                &format!("/bundles/{}/contents/info/{}", quote(uuid), quote(path)),
                self.timeout * 2,
                |b| b,
            )
            .await?;
        let v = Self::json(resp).await?;
        Ok(v.get("data").cloned().unwrap_or(serde_json::Value::Null))
    }

    /// `GET /bundles/<uuid>/contents/blob/<path>?support_redirect=1`. The caller decodes
    /// `Content-Encoding: gzip` itself (so bytes over the wire can be counted).
    pub async fn contents_blob(
        &self,
        uuid: &str,
        path: &str,
    ) -> Result<reqwest::Response, ClientError> {
        self.request(
            Method::GET,
            &format!("/bundles/{}/contents/blob/{}", quote(uuid), quote(path)),
            Duration::from_secs(24 * 3600),
            |b| {
                b.query(&[("support_redirect", "1")])
                    .header("Accept-Encoding", "gzip")
            },
        )
        .await
    }

    /// The results: a chunked tar.gz PUT to `/bundles/<uuid>/contents/blob/`.
    pub async fn upload(&self, uuid: &str, store: &str, body: Body) -> Result<(), ClientError> {
        self.request(
            Method::PUT,
            &format!("/bundles/{}/contents/blob/", quote(uuid)),
            Duration::from_secs(24 * 3600),
            |b| {
                b.query(&[
                    ("filename", "bundle.tar.gz"),
                    ("finalize_on_success", "0"),
                    ("store", store),
                ])
                .body(body)
            },
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quote_like_python() {
        assert_eq!(super::quote("host(12)"), "host%2812%29");
        assert_eq!(super::quote("a b/c~d"), "a%20b/c~d");
        assert_eq!(super::quote("0xabc"), "0xabc");
    }
}
