//! Where to fetch from: mirrors, plain-http registries and credentials.
//!
//! Settings come from the TOML config file (`[registry."docker.io"] mirrors = [...]`), flags and
//! environment (`--registry-mirror [REGISTRY=]URL`, `--insecure-registry HOST`), and credentials from
//! `~/.docker/config.json` (auths, credHelpers, credsStore) or `$DOCKER_CONFIG/config.json`.

use crate::image::reference::DOCKER_HUB;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use url::Url;

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    /// Base URLs tried in order before the registry itself (pulls only).
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Speak plain http to this registry.
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    pub registries: HashMap<String, RegistrySettings>,
    /// Explicit credentials (`--creds user:pass`) for every registry of this invocation.
    pub creds: Option<(String, String)>,
    /// Where docker's config.json lives; None = `$DOCKER_CONFIG` or `~/.docker`.
    pub docker_config_dir: Option<PathBuf>,
    /// See [`crate::registry::DEFAULT_TIMEOUT`] (config `registry_timeout`, `CW_REGISTRY_TIMEOUT`).
    pub timeout: Option<std::time::Duration>,
    /// Let a foreign layer's own URLs name loopback, link-local or unspecified addresses
    /// (config `foreign_layer_urls_local = true`); off, such a URL from a manifest could make cw
    /// probe the node's own services.
    pub local_foreign_urls: bool,
}

/// One place to fetch a repository from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `http://127.0.0.1:5000` or `https://registry-1.docker.io`, no trailing slash.
    pub base: Url,
    /// The host\[:port\] credentials are looked up by.
    pub host: String,
    pub mirror: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Basic(String, String),
    /// An identity token from `docker login` (OAuth refresh token).
    IdentityToken(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("registry mirror {0:?} is not a valid http(s) URL")]
    BadMirror(String),
}

fn is_loopback(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .map(|(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
        .unwrap_or(host);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

pub fn parse_mirror_url(s: &str) -> Result<Url, ConfigError> {
    let with_scheme = if s.contains("://") {
        s.to_string()
    } else {
        format!("https://{s}")
    };
    let u = Url::parse(&with_scheme).map_err(|_| ConfigError::BadMirror(s.to_string()))?;
    if !(u.scheme() == "http" || u.scheme() == "https") || u.host_str().is_none() {
        return Err(ConfigError::BadMirror(s.to_string()));
    }
    Ok(u)
}

impl RegistryConfig {
    /// Add `--registry-mirror` values: `URL` (a mirror for docker.io, as dockerd's flag) or `REGISTRY=URL`.
    pub fn add_mirror_arg(&mut self, arg: &str) -> Result<(), ConfigError> {
        let (reg, url) = match arg.split_once('=') {
            Some((r, u)) => (r.trim().to_string(), u.trim()),
            None => (DOCKER_HUB.to_string(), arg.trim()),
        };
        parse_mirror_url(url)?;
        self.registries
            .entry(reg)
            .or_default()
            .mirrors
            .push(url.to_string());
        Ok(())
    }

    pub fn add_insecure(&mut self, host: &str) {
        self.registries
            .entry(host.trim().to_string())
            .or_default()
            .insecure = true;
    }

    fn insecure(&self, host: &str) -> bool {
        self.registries.get(host).is_some_and(|r| r.insecure) || is_loopback(host)
    }

    /// Endpoints to try for `registry`, in order: its mirrors, then the registry itself.
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, ConfigError> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        if let Some(s) = self.registries.get(registry) {
            for m in &s.mirrors {
                let mut u = parse_mirror_url(m)?;
                let host = host_port(&u);
                if !m.contains("://") && self.insecure(&host) {
                    let _ = u.set_scheme("http");
                }
                if seen.insert(u.to_string()) {
                    out.push(Endpoint {
                        base: trim(u),
                        host,
                        mirror: true,
                    });
                }
            }
        }
        let (scheme, api_host) = if registry == DOCKER_HUB {
            ("https", "registry-1.docker.io".to_string())
        } else if self.insecure(registry) {
            ("http", registry.to_string())
        } else {
            ("https", registry.to_string())
        };
        let u = Url::parse(&format!("{scheme}://{api_host}"))
            .map_err(|_| ConfigError::BadMirror(registry.to_string()))?;
        out.push(Endpoint {
            base: trim(u),
            host: registry.to_string(),
            mirror: false,
        });
        Ok(out)
    }

    /// Credentials for `host`, from `--creds` or docker's config.json (helpers included).
    pub fn credential(&self, host: &str) -> Option<Credential> {
        if let Some((u, p)) = &self.creds {
            return Some(Credential::Basic(u.clone(), p.clone()));
        }
        let dir = self
            .docker_config_dir
            .clone()
            .or_else(|| std::env::var_os("DOCKER_CONFIG").map(PathBuf::from))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
        let text = std::fs::read(dir.join("config.json")).ok()?;
        let keys: Vec<String> = if host == DOCKER_HUB {
            vec![
                "https://index.docker.io/v1/".into(),
                "index.docker.io".into(),
                "docker.io".into(),
                "registry-1.docker.io".into(),
            ]
        } else {
            vec![
                host.to_string(),
                format!("https://{host}"),
                format!("http://{host}"),
                format!("https://{host}/v1/"),
            ]
        };
        for k in keys {
            match docker_credential::get_credential_from_reader(&text[..], &k) {
                Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
                    return Some(Credential::Basic(u, p))
                }
                Ok(docker_credential::DockerCredential::IdentityToken(t)) => {
                    return Some(Credential::IdentityToken(t))
                }
                Err(docker_credential::CredentialRetrievalError::NoCredentialConfigured) => {
                    continue
                }
                Err(e) => {
                    tracing::warn!(
                        "credentials for {host} from {}: {e:?}",
                        dir.join("config.json").display()
                    );
                    return None;
                }
            }
        }
        None
    }
}

fn host_port(u: &Url) -> String {
    match u.port() {
        Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
        None => u.host_str().unwrap_or_default().to_string(),
    }
}

fn trim(mut u: Url) -> Url {
    let p = u.path().trim_end_matches('/').to_string();
    u.set_path(&p);
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_first_then_registry() {
        let mut c = RegistryConfig::default();
        c.add_mirror_arg("http://127.0.0.1:5000").unwrap();
        c.add_mirror_arg("quay.io=https://mirror.example/").unwrap();
        let e = c.endpoints("docker.io").unwrap();
        assert_eq!(e.len(), 2);
        assert!(e[0].mirror && e[0].base.as_str().starts_with("http://127.0.0.1:5000"));
        assert_eq!(e[1].base.host_str(), Some("registry-1.docker.io"));
        assert_eq!(c.endpoints("quay.io").unwrap()[0].host, "mirror.example");
        assert!(c.add_mirror_arg("ftp://x").is_err());
    }

    #[test]
    fn loopback_and_insecure_use_http() {
        let mut c = RegistryConfig::default();
        assert_eq!(
            c.endpoints("127.0.0.1:5000").unwrap()[0].base.scheme(),
            "http"
        );
        assert_eq!(
            c.endpoints("localhost:5000").unwrap()[0].base.scheme(),
            "http"
        );
        assert_eq!(
            c.endpoints("reg.example:5000").unwrap()[0].base.scheme(),
            "https"
        );
        c.add_insecure("reg.example:5000");
        assert_eq!(
            c.endpoints("reg.example:5000").unwrap()[0].base.scheme(),
            "http"
        );
    }

    #[test]
    fn credentials_from_docker_config() {
        let d = tempfile::tempdir().unwrap();
        // dGVzdHVzZXI6dGVzdHBhc3M= is testuser:testpass
        std::fs::write(
            d.path().join("config.json"),
            r#"{"auths":{"127.0.0.1:5001":{"auth":"dGVzdHVzZXI6dGVzdHBhc3M="},"https://index.docker.io/v1/":{"auth":"dTpw"}}}"#,
        )
        .unwrap();
        let c = RegistryConfig {
            docker_config_dir: Some(d.path().into()),
            ..Default::default()
        };
        assert_eq!(
            c.credential("127.0.0.1:5001"),
            Some(Credential::Basic("testuser".into(), "testpass".into()))
        );
        assert_eq!(
            c.credential("docker.io"),
            Some(Credential::Basic("u".into(), "p".into()))
        );
        assert_eq!(c.credential("other:1"), None);
    }
}
