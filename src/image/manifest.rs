//! Manifests, indexes and image configs as registries serve them: Docker schema 2, OCI manifest,
//! Docker manifest list, OCI index. Parsing is strict about what later becomes a path or a size.

use super::digest::Digest;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use std::fmt;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1";

/// The Accept header for manifest requests: every form cw understands.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Manifests larger than this are refused (containerd uses the same bound).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Image configs larger than this are refused.
pub const MAX_CONFIG_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("manifest is not valid JSON: {0}")]
    BadJson(String),
    #[error("Docker schema 1 manifests are not supported (the image must be re-pushed with a current client)")]
    Schema1,
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedType(String),
    #[error("manifest {what} is invalid: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("unsupported layer media type {0:?}")]
    UnsupportedLayer(String),
    #[error("no image for platform {wanted} in the index; it has: {available}")]
    NoPlatform { wanted: String, available: String },
    #[error("image config is invalid: {0}")]
    BadConfig(String),
    #[error("image config lists {diff_ids} layer diff ids but the manifest has {layers} layers")]
    LayerCountMismatch { diff_ids: usize, layers: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One layer as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub compression: Compression,
    /// Foreign / non-distributable layers may name URLs to fetch from (without credentials).
    pub urls: Vec<String>,
}

/// A single-platform image manifest reduced to what a pull needs.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub config: Digest,
    pub config_size: u64,
    pub layers: Vec<LayerDesc>,
}

#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone)]
pub enum Parsed {
    Image(Manifest),
    Index(Vec<IndexEntry>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this process: linux/<GOARCH name>.
    pub fn host() -> Platform {
        let arch = normalize_arch(std::env::consts::ARCH);
        let variant = default_variant(&arch);
        Platform {
            os: "linux".into(),
            arch,
            variant,
        }
    }

    /// `os/arch[/variant]`, e.g. `linux/arm64/v8`.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "platform {s:?} is not of the form os/arch[/variant]"
            ));
        }
        let arch = normalize_arch(&parts[1].to_ascii_lowercase());
        let variant = parts
            .get(2)
            .map(|v| v.to_ascii_lowercase())
            .or_else(|| default_variant(&arch));
        Ok(Platform {
            os: parts[0].to_ascii_lowercase(),
            arch,
            variant,
        })
    }

    fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.arch != normalize_arch(&other.arch) {
            return false;
        }
        let theirs = other
            .variant
            .clone()
            .or_else(|| default_variant(&other.arch));
        match (&self.variant, theirs) {
            (Some(a), Some(b)) => *a == b,
            _ => true,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn normalize_arch(a: &str) -> String {
    match a {
        "x86_64" | "x86-64" => "amd64".into(),
        "aarch64" => "arm64".into(),
        "armhf" => "arm".into(),
        "i386" | "i686" | "x86" => "386".into(),
        "powerpc64le" => "ppc64le".into(),
        other => other.into(),
    }
}

fn default_variant(arch: &str) -> Option<String> {
    match arch {
        "arm64" => Some("v8".into()),
        "arm" => Some("v7".into()),
        _ => None,
    }
}

/// Media types of layers that registries need not serve (their `urls` say where they are).
pub fn is_foreign(mt: &str) -> bool {
    mt == "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        || mt.starts_with("application/vnd.oci.image.layer.nondistributable.")
}

fn layer_compression(mt: &str) -> Result<Compression, ManifestError> {
    Ok(match mt {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
        | "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Compression::Zstd,
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
        other => return Err(ManifestError::UnsupportedLayer(other.to_string())),
    })
}

fn digest_of(d: &oci_spec::image::Digest, what: &'static str) -> Result<Digest, ManifestError> {
    Digest::parse(d.as_ref()).map_err(|e| ManifestError::Invalid {
        what,
        reason: e.to_string(),
    })
}

/// Parse a manifest document. `content_type` is the registry's Content-Type header, used only when
/// the document does not carry its own `mediaType`.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(bytes.len()));
    }
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::BadJson(e.to_string()))?;
    if !v.is_object() {
        return Err(ManifestError::BadJson("top level is not an object".into()));
    }
    if v.get("schemaVersion").and_then(|s| s.as_u64()) == Some(1) {
        return Err(ManifestError::Schema1);
    }
    let declared = v
        .get("mediaType")
        .and_then(|m| m.as_str())
        .map(str::to_string);
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .filter(|c| !c.is_empty());
    let mt = match (declared, header) {
        (Some(d), _) => d,
        (None, Some(h))
            if h != "application/json" && h != "text/plain" && h != "application/octet-stream" =>
        {
            h
        }
        _ if v.get("manifests").is_some() => OCI_INDEX.to_string(),
        _ if v.get("layers").is_some() => OCI_MANIFEST.to_string(),
        _ => return Err(ManifestError::UnsupportedType("(none given)".into())),
    };
    if mt.starts_with(DOCKER_SCHEMA1) {
        return Err(ManifestError::Schema1);
    }
    match mt.as_str() {
        DOCKER_MANIFEST | OCI_MANIFEST => {
            let m: ImageManifest =
                serde_json::from_value(v).map_err(|e| ManifestError::Invalid {
                    what: "document",
                    reason: e.to_string(),
                })?;
            let config = digest_of(m.config().digest(), "config digest")?;
            let mut layers = Vec::with_capacity(m.layers().len());
            for l in m.layers() {
                let media_type = l.media_type().to_string();
                layers.push(LayerDesc {
                    digest: digest_of(l.digest(), "layer digest")?,
                    size: l.size(),
                    compression: layer_compression(&media_type)?,
                    // a layer's own URLs are for layers a registry may not serve; on any
                    // other layer they would only let an image point cw elsewhere
                    urls: if is_foreign(&media_type) {
                        l.urls().clone().unwrap_or_default()
                    } else {
                        vec![]
                    },
                    media_type,
                });
            }
            Ok(Parsed::Image(Manifest {
                media_type: mt,
                config,
                config_size: m.config().size(),
                layers,
            }))
        }
        DOCKER_LIST | OCI_INDEX => {
            let idx: ImageIndex =
                serde_json::from_value(v).map_err(|e| ManifestError::Invalid {
                    what: "index",
                    reason: e.to_string(),
                })?;
            let mut out = Vec::new();
            for m in idx.manifests() {
                out.push(IndexEntry {
                    digest: digest_of(m.digest(), "index entry digest")?,
                    size: m.size(),
                    media_type: m.media_type().to_string(),
                    platform: m.platform().as_ref().map(|p| Platform {
                        os: p.os().to_string(),
                        arch: p.architecture().to_string(),
                        variant: p.variant().clone(),
                    }),
                });
            }
            Ok(Parsed::Index(out))
        }
        other => Err(ManifestError::UnsupportedType(other.to_string())),
    }
}

/// Pick the entry of an index for `want`. Attestation manifests (unknown/unknown) never match.
pub fn select_platform<'a>(
    entries: &'a [IndexEntry],
    want: &Platform,
) -> Result<&'a IndexEntry, ManifestError> {
    let usable = |e: &&IndexEntry| e.media_type == DOCKER_MANIFEST || e.media_type == OCI_MANIFEST;
    if let Some(e) = entries
        .iter()
        .filter(usable)
        .find(|e| e.platform.as_ref().is_some_and(|p| want.matches(p)))
    {
        return Ok(e);
    }
    let available: Vec<String> = entries
        .iter()
        .filter_map(|e| e.platform.as_ref())
        .filter(|p| p.os != "unknown")
        .map(|p| p.to_string())
        .collect();
    Err(ManifestError::NoPlatform {
        wanted: want.to_string(),
        available: if available.is_empty() {
            "no platforms".into()
        } else {
            available.join(", ")
        },
    })
}

/// What cw needs from an image config.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct RunConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub diff_ids: Vec<Digest>,
    pub os: String,
    pub arch: String,
    pub run: RunConfig,
}

/// [`parse_config`] of an image whose manifest (or archive) lists `layers` layers: the config
/// must name one diff id for each.
pub fn parse_config_for(bytes: &[u8], layers: usize) -> Result<ImageConfig, ManifestError> {
    let c = parse_config(bytes)?;
    if c.diff_ids.len() != layers {
        return Err(ManifestError::LayerCountMismatch {
            diff_ids: c.diff_ids.len(),
            layers,
        });
    }
    Ok(c)
}

pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, ManifestError> {
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(ManifestError::BadConfig(format!(
            "{} bytes is more than the {MAX_CONFIG_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let c: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::BadConfig(e.to_string()))?;
    let mut diff_ids = Vec::new();
    for d in c.rootfs().diff_ids() {
        diff_ids
            .push(Digest::parse(d).map_err(|e| ManifestError::BadConfig(format!("diff id: {e}")))?);
    }
    let run = c
        .config()
        .as_ref()
        .map(|cc| RunConfig {
            env: cc.env().clone().unwrap_or_default(),
            entrypoint: cc.entrypoint().clone().unwrap_or_default(),
            cmd: cc.cmd().clone().unwrap_or_default(),
            working_dir: cc.working_dir().clone().unwrap_or_default(),
            user: cc.user().clone().unwrap_or_default(),
        })
        .unwrap_or_default();
    Ok(ImageConfig {
        diff_ids,
        os: c.os().to_string(),
        arch: c.architecture().to_string(),
        run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest(layer_mt: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","size":10,"digest":"{D1}"}},"layers":[{{"mediaType":"{layer_mt}","size":5,"digest":"{D2}"}}]}}"#
        )
    }

    #[test]
    fn parses_docker_manifest() {
        let Parsed::Image(m) = parse(
            manifest("application/vnd.docker.image.rootfs.diff.tar.gzip").as_bytes(),
            None,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(m.config.to_string(), D1);
        assert_eq!(m.layers[0].compression, Compression::Gzip);
        assert_eq!(m.layers[0].size, 5);
    }

    #[test]
    fn rejects_bad_layer_type_and_digest() {
        assert!(matches!(
            parse(manifest("application/x-evil").as_bytes(), None),
            Err(ManifestError::UnsupportedLayer(_))
        ));
        let bad = manifest("application/vnd.oci.image.layer.v1.tar").replace(D2, "sha256:../../x");
        assert!(parse(bad.as_bytes(), None).is_err());
    }

    #[test]
    fn rejects_schema1_bad_json_and_size() {
        assert!(matches!(
            parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, None),
            Err(ManifestError::Schema1)
        ));
        assert!(matches!(
            parse(b"{not json", None),
            Err(ManifestError::BadJson(_))
        ));
        assert!(matches!(
            parse(b"[1,2]", None),
            Err(ManifestError::BadJson(_))
        ));
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(matches!(parse(&big, None), Err(ManifestError::TooLarge(_))));
    }

    #[test]
    fn selects_platform_skipping_attestations() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","size":1,"digest":"{D1}","platform":{{"os":"unknown","architecture":"unknown"}}}},
            {{"mediaType":"{OCI_MANIFEST}","size":1,"digest":"{D2}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","size":1,"digest":"{D1}","platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Parsed::Index(e) = parse(idx.as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(
            select_platform(&e, &Platform::parse("linux/amd64").unwrap())
                .unwrap()
                .digest
                .to_string(),
            D1
        );
        assert_eq!(
            select_platform(&e, &Platform::parse("linux/arm64").unwrap())
                .unwrap()
                .digest
                .to_string(),
            D2
        );
        assert_eq!(
            select_platform(&e, &Platform::parse("linux/aarch64").unwrap())
                .unwrap()
                .digest
                .to_string(),
            D2
        );
        let err = select_platform(&e, &Platform::parse("linux/s390x").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linux/s390x")
                && err.contains("linux/arm64/v8")
                && !err.contains("unknown"),
            "{err}"
        );
        assert!(select_platform(&e, &Platform::parse("linux/arm64/v9").unwrap()).is_err());
    }

    #[test]
    fn platform_parse_errors() {
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//").is_err());
        assert_eq!(
            Platform::parse("linux/arm").unwrap().to_string(),
            "linux/arm/v7"
        );
    }

    #[test]
    fn parses_config() {
        let cfg = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/w","User":"1000"}},"rootfs":{{"type":"layers","diff_ids":["{D1}"]}}}}"#
        );
        let c = parse_config(cfg.as_bytes()).unwrap();
        assert_eq!(c.diff_ids.len(), 1);
        assert_eq!(c.run.cmd, vec!["/bin/sh"]);
        assert_eq!(c.run.user, "1000");
        assert!(parse_config(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:xx"]}}"#).is_err());
    }
}
