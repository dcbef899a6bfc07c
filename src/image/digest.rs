//! Content digests (`sha256:<64 hex>`): parsed and validated before any use as a path.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::str::FromStr;

/// A validated `sha256:` digest. Only lower-case hex of the exact length is accepted, so the
/// hex part can be used as a file name without further checks.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form sha256:<64 lower-case hex digits>")]
    Malformed(String),
    #[error("digest algorithm {algo:?} in {full:?} is not supported (only sha256)")]
    Unsupported { algo: String, full: String },
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let (algo, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(s.to_string()))?;
        if algo != "sha256" {
            if !algo.is_empty()
                && algo
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
            {
                return Err(DigestError::Unsupported {
                    algo: algo.to_string(),
                    full: s.to_string(),
                });
            }
            return Err(DigestError::Malformed(s.to_string()));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Malformed(s.to_string()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }

    /// Digest of a byte slice.
    pub fn of(data: &[u8]) -> Self {
        Digest {
            hex: hex::encode(Sha256::digest(data)),
        }
    }

    pub fn from_hasher(h: Sha256) -> Self {
        Digest {
            hex: hex::encode(h.finalize()),
        }
    }

    /// The 64 hex digits; safe as a single path component.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// First 12 hex digits, as docker shows image ids.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid() {
        let s = "sha256:4bc5124505390c90aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(Digest::parse(s).unwrap().to_string(), s);
    }

    #[test]
    fn rejects_path_tricks_and_bad_hex() {
        for bad in [
            "sha256:../../etc/passwd",
            "sha256:",
            "sha256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
            "sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef012345678",
            "sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef01234567890",
            "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
            "sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef012345678/",
            "",
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(DigestError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Digest::parse("sha512:abcd"),
            Err(DigestError::Unsupported { .. })
        ));
    }

    #[test]
    fn of_bytes() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
