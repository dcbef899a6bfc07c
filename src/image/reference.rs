//! Image references, normalised like docker: `ubuntu` → `docker.io/library/ubuntu:latest`.

use super::digest::Digest;
use std::fmt;

pub const DOCKER_HUB: &str = "docker.io";
const MAX_NAME_LEN: usize = 255;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host\[:port\], `docker.io` for Docker Hub.
    pub registry: String,
    /// Repository path, `library/ubuntu` for official Docker Hub images.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

fn err(input: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: ".", "_", "__" or "-+"
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) if !h.starts_with('[') || h.ends_with(']') => (h, Some(p)),
        _ => (d, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    if host.starts_with('[') {
        return host.ends_with(']')
            && host[1..host.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok();
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

impl Reference {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(err(input, "it is empty"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(Digest::parse(d).map_err(|e| err(input, e.to_string()))?),
            ),
            None => (s, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let t = &rest[last_slash + i + 1..];
                if !valid_tag(t) {
                    return Err(err(
                        input,
                        format!(
                            "tag {t:?} is not valid (letters, digits, '_', '.', '-'; at most 128)"
                        ),
                    ));
                }
                (&rest[..last_slash + i], Some(t.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(err(input, "the repository name is empty"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, p))
                if first.contains('.')
                    || first.contains(':')
                    || first == "localhost"
                    || first.starts_with('[') =>
            {
                if !valid_domain(first) {
                    return Err(err(input, format!("registry host {first:?} is not valid")));
                }
                (first.to_string(), p.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
                DOCKER_HUB.to_string()
            }
            _ => registry,
        };
        if path.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(err(input, "repository names must be lower case"));
        }
        for c in path.split('/') {
            if !valid_path_component(c) {
                return Err(err(input, format!("path component {c:?} is not valid (lower-case letters, digits and single separators)")));
            }
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(err(
                input,
                format!("the name is longer than {MAX_NAME_LEN} characters"),
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask the registry's manifest endpoint for: the digest if pinned, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// Short form as docker prints it: `ubuntu:22.04`, `codalab/ubuntu:1.9`, `host:5000/x:y`.
    pub fn familiar(&self) -> String {
        let name = if self.registry == DOCKER_HUB {
            self.repository
                .strip_prefix("library/")
                .unwrap_or(&self.repository)
                .to_string()
        } else {
            self.name()
        };
        let mut s = name;
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(&d.to_string());
        }
        s
    }

    pub fn with_digest(&self, d: Digest) -> Reference {
        Reference {
            digest: Some(d),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    const D: &str = "sha256:4bc5124505390c90aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn p(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalises_like_docker() {
        assert_eq!(p("ubuntu"), "docker.io/library/ubuntu:latest");
        assert_eq!(p("ubuntu:22.04"), "docker.io/library/ubuntu:22.04");
        assert_eq!(p("codalab/ubuntu:1.9"), "docker.io/codalab/ubuntu:1.9");
        assert_eq!(p("docker.io/ubuntu"), "docker.io/library/ubuntu:latest");
        assert_eq!(
            p("index.docker.io/library/ubuntu"),
            "docker.io/library/ubuntu:latest"
        );
        assert_eq!(p("localhost/foo"), "localhost/foo:latest");
        assert_eq!(p("127.0.0.1:5000/tiny:amd64"), "127.0.0.1:5000/tiny:amd64");
        assert_eq!(p("ghcr.io/a/b/c:v1.2-rc_3"), "ghcr.io/a/b/c:v1.2-rc_3");
        assert_eq!(
            p(&format!("host:5000/ns/name@{D}")),
            format!("host:5000/ns/name@{D}")
        );
        assert_eq!(
            p(&format!("ubuntu:22.04@{D}")),
            format!("docker.io/library/ubuntu:22.04@{D}")
        );
        assert_eq!(p("a__b/c--d/e.f_g"), "docker.io/a__b/c--d/e.f_g:latest");
        assert_eq!(p("[::1]:5000/x"), "[::1]:5000/x:latest");
    }

    #[test]
    fn familiar_names() {
        assert_eq!(
            Reference::parse("ubuntu").unwrap().familiar(),
            "ubuntu:latest"
        );
        assert_eq!(
            Reference::parse("codalab/ubuntu:1.9").unwrap().familiar(),
            "codalab/ubuntu:1.9"
        );
        assert_eq!(Reference::parse("h:1/x:y").unwrap().familiar(), "h:1/x:y");
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Ubuntu",
            "ubuntu:",
            "ubuntu:-x",
            "a//b",
            "a/../b",
            "-a",
            "a-",
            "a...b",
            "ubuntu@sha256:zz",
            "ubuntu@md5:abc",
            "host:99999999/x",
            ":tag",
            "a/b:c:d",
            &format!("x/{}", "a".repeat(300)),
            &format!("u:{}", "t".repeat(129)),
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn error_names_the_input_and_reason() {
        let e = Reference::parse("Ubuntu").unwrap_err().to_string();
        assert!(e.contains("\"Ubuntu\"") && e.contains("lower case"), "{e}");
    }
}
