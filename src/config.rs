//! cw's configuration file (TOML), merged with flags and environment.
//!
//! ```toml
//! store = "/var/lib/cw"          # image store and run state
//! max_store_size = "50GB"        # automatic GC: above this, LRU images go until 80 % is left
//! max_image_size = "30GB"        # what one image may unpack to (the free space bounds it anyway)
//! registry_timeout = "60s"       # a manifest's whole time; a blob must send 64 KiB per window
//! [registry."docker.io"]
//! mirrors = ["http://127.0.0.1:5000"]
//! [registry."registry.internal:5000"]
//! insecure = true                # plain http
//! ```

use crate::registry::config::{RegistryConfig, RegistrySettings};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub store: Option<PathBuf>,
    pub max_store_size: Option<String>,
    pub max_image_size: Option<String>,
    /// How long a manifest may take, and the window a blob must make progress in ("60s").
    pub registry_timeout: Option<String>,
    #[serde(default)]
    pub foreign_layer_urls_local: bool,
    #[serde(default)]
    pub registry: HashMap<String, RegistrySettings>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("config file {path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

/// The config file to read: `--config`/`CW_CONFIG`, else the default for this user (may not exist).
pub fn default_path() -> PathBuf {
    if cw_runtime::userns::host_root() {
        PathBuf::from("/etc/cw/config.toml")
    } else {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|x| !x.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into()))
                    .join(".config")
            });
        base.join("cw/config.toml")
    }
}

pub fn load(path: &Path, explicit: bool) -> Result<FileConfig, ConfigFileError> {
    match std::fs::read_to_string(path) {
        Ok(s) => toml::from_str(&s).map_err(|e| ConfigFileError::Bad {
            path: path.into(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(ConfigFileError::Bad {
            path: path.into(),
            reason: e.to_string(),
        }),
    }
}

impl FileConfig {
    pub fn registry_config(&self) -> RegistryConfig {
        RegistryConfig {
            registries: self.registry.clone(),
            local_foreign_urls: self.foreign_layer_urls_local,
            ..Default::default()
        }
    }
}

/// Parse sizes like `512m`, `2g`, `1.5GB`, `1000` (bytes). Binary units for k/m/g/t (as docker).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("size {s:?} is not a number with an optional unit (k, m, g, t)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("size {s:?} must be a non-negative number"));
    }
    Ok((v * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("50mb").unwrap(), 50 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1g").is_err());
    }

    #[test]
    fn config_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        std::fs::write(
            &p,
            "store = \"/x\"\n[registry.\"docker.io\"]\nmirrors = [\"http://127.0.0.1:5000\"]\n",
        )
        .unwrap();
        let c = load(&p, true).unwrap();
        assert_eq!(c.store.as_deref(), Some(Path::new("/x")));
        assert_eq!(c.registry["docker.io"].mirrors.len(), 1);
        std::fs::write(&p, "bogus = 1\n").unwrap();
        let e = load(&p, true).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("bogus"), "{e}");
        assert!(load(&d.path().join("missing.toml"), false).is_ok());
        assert!(load(&d.path().join("missing.toml"), true).is_err());
    }
}
