//! The CodaLab worker protocol's data: messages from the server, the checkin body, the
//! run-state entry, and the server's formatting of sizes and durations (the limit messages must
//! match byte for byte). Field names follow `codalab/worker/bundle_state.py`.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// Numbers from the server may be ints or floats (`time`, `disk` come from duration/size parsing).
fn num_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match v {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .unwrap_or(0),
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map(|f| f.max(0.0) as u64)
            .unwrap_or(0),
        _ => 0,
    })
}

fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Dependency {
    pub parent_uuid: String,
    #[serde(default, deserialize_with = "null_default")]
    pub parent_path: String,
    pub child_path: String,
    #[serde(default, deserialize_with = "null_default")]
    pub child_uuid: String,
    #[serde(default, deserialize_with = "null_default")]
    pub parent_name: String,
    /// Only for shared-file-system workers: where the parent lives.
    #[serde(default)]
    pub location: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BundleInfo {
    pub uuid: String,
    #[serde(default, deserialize_with = "null_default")]
    pub bundle_type: String,
    #[serde(default, deserialize_with = "null_default")]
    pub command: String,
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default, deserialize_with = "null_default")]
    pub dependencies: Vec<Dependency>,
    #[serde(default)]
    pub location: Option<String>,
}

impl BundleInfo {
    pub fn exclude_patterns(&self) -> Vec<String> {
        match self.metadata.get("exclude_patterns") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => vec![],
        }
    }
    pub fn store(&self) -> String {
        self.metadata
            .get("store")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Resources {
    #[serde(default, deserialize_with = "num_u64")]
    pub cpus: u64,
    #[serde(default, deserialize_with = "num_u64")]
    pub gpus: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub docker_image: String,
    /// Seconds; 0 = unlimited.
    #[serde(default, deserialize_with = "num_u64")]
    pub time: u64,
    /// Bytes.
    #[serde(default, deserialize_with = "num_u64")]
    pub memory: u64,
    /// Bytes; 0 = unlimited.
    #[serde(default, deserialize_with = "num_u64")]
    pub disk: u64,
    #[serde(default)]
    pub network: bool,
    #[serde(default)]
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ReadArgs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub depth: Option<u64>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub length: Option<u64>,
    #[serde(default)]
    pub num_head_lines: Option<u64>,
    #[serde(default)]
    pub num_tail_lines: Option<u64>,
    #[serde(default)]
    pub max_line_length: Option<u64>,
    #[serde(default)]
    pub truncation_text: Option<String>,
}

/// One item of the checkin response array.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Run {
        bundle: BundleInfo,
        resources: Resources,
    },
    Kill {
        uuid: String,
        #[serde(default)]
        kill_message: Option<String>,
    },
    MarkFinalized {
        uuid: String,
    },
    Read {
        socket_id: i64,
        uuid: String,
        #[serde(default, deserialize_with = "null_default")]
        path: String,
        read_args: ReadArgs,
    },
    Netcat {
        socket_id: i64,
        uuid: String,
        port: u16,
        #[serde(default, deserialize_with = "null_default")]
        message: String,
    },
    Write {
        uuid: String,
        #[serde(default, deserialize_with = "null_default")]
        subpath: String,
        #[serde(default, deserialize_with = "null_default")]
        string: String,
    },
}

/// Parse a checkin response: an array of messages (nulls skipped) or, for old servers, one object.
/// Items that cannot be understood are returned as errors, not dropped silently.
pub fn parse_messages(body: &[u8]) -> Result<Vec<Result<Message, String>>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("checkin response is not JSON: {e}"))?;
    let items = match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Null => vec![],
        o @ serde_json::Value::Object(_) => vec![o],
        other => {
            return Err(format!(
                "checkin response is neither a list nor an object: {other}"
            ))
        }
    };
    Ok(items
        .into_iter()
        .filter(|i| !i.is_null())
        .map(|i| {
            let kind = i
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("?")
                .to_string();
            serde_json::from_value::<Message>(i)
                .map_err(|e| format!("message of type {kind:?}: {e}"))
        })
        .collect())
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    #[serde(rename = "RUN_STAGE.PREPARING")]
    Preparing,
    #[serde(rename = "RUN_STAGE.RUNNING")]
    Running,
    #[serde(rename = "RUN_STAGE.CLEANING_UP")]
    CleaningUp,
    #[serde(rename = "RUN_STAGE.UPLOADING_RESULTS")]
    UploadingResults,
    #[serde(rename = "RUN_STAGE.FINALIZING")]
    Finalizing,
    #[serde(rename = "RUN_STAGE.FINISHED")]
    Finished,
    #[serde(rename = "RUN_STAGE.RESTAGED")]
    Restaged,
}

impl Stage {
    pub fn key(self) -> &'static str {
        match self {
            Stage::Preparing => "RUN_STAGE.PREPARING",
            Stage::Running => "RUN_STAGE.RUNNING",
            Stage::CleaningUp => "RUN_STAGE.CLEANING_UP",
            Stage::UploadingResults => "RUN_STAGE.UPLOADING_RESULTS",
            Stage::Finalizing => "RUN_STAGE.FINALIZING",
            Stage::Finished => "RUN_STAGE.FINISHED",
            Stage::Restaged => "RUN_STAGE.RESTAGED",
        }
    }
    /// The server state reported for this stage (spec §7.1).
    pub fn server_state(self) -> &'static str {
        match self {
            Stage::Preparing => "preparing",
            Stage::Running | Stage::CleaningUp | Stage::UploadingResults => "running",
            Stage::Finalizing => "finalizing",
            Stage::Finished => "ready",
            Stage::Restaged => "staged",
        }
    }
    pub const PROFILED: [Stage; 5] = [
        Stage::Preparing,
        Stage::Running,
        Stage::CleaningUp,
        Stage::UploadingResults,
        Stage::Finalizing,
    ];
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct StageStat {
    pub start: Option<f64>,
    pub end: Option<f64>,
    pub elapsed: Option<f64>,
}

/// The per-run entry of a checkin (`BundleCheckinState`), every key the server reads present.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CheckinRun {
    pub uuid: String,
    pub run_status: String,
    pub bundle_start_time: f64,
    pub container_time_total: f64,
    pub container_time_user: f64,
    pub container_time_system: f64,
    pub docker_image: Option<String>,
    pub state: String,
    pub remote: String,
    pub exitcode: Option<i64>,
    pub failure_message: Option<String>,
    pub bundle_profile_stats: BTreeMap<String, StageStat>,
    pub cpu_usage: f64,
    pub memory_usage: f64,
    pub disk_utilization: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Checkin {
    pub tag: Option<String>,
    pub group_name: Option<String>,
    pub cpus: u64,
    pub gpus: u64,
    pub memory_bytes: u64,
    pub free_disk_bytes: u64,
    pub dependencies: Vec<(String, String)>,
    pub hostname: String,
    pub runs: Vec<CheckinRun>,
    pub shared_file_system: bool,
    pub tag_exclusive: bool,
    pub exit_after_num_runs: u64,
    pub is_terminating: bool,
    pub preemptible: bool,
}

/// `codalab.lib.formatting.size_str`: 1024-based, suffixes '', k, m, g, t; an integer when the
/// value is ≥ 100 or whole, else one decimal.
pub fn size_str(size: f64) -> String {
    let mut s = size;
    for unit in ["", "k", "m", "g"] {
        if s < 100.0 && s != s.trunc() {
            return format!("{s:.1}{unit}");
        }
        if s < 1024.0 {
            return format!("{}{unit}", s as i64);
        }
        s /= 1024.0;
    }
    if s < 100.0 && s != s.trunc() {
        format!("{s:.1}t")
    } else {
        format!("{}t", s as i64)
    }
}

/// `codalab.lib.formatting.duration_str`: `12.3s`, `1m40s`, `2h46m`, `3d4h`, `1y2d`.
pub fn duration_str(s: f64) -> String {
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let mut m = (s / 60.0) as i64;
    if m < 60 {
        return format!("{m}m{}s", s as i64 % 60);
    }
    let mut h = m / 60;
    m %= 60;
    if h < 24 {
        return format!("{h}h{m}m");
    }
    let mut d = h / 24;
    h %= 24;
    if d < 365 {
        return format!("{d}d{h}h");
    }
    let y = d / 365;
    d %= 365;
    format!("{y}y{d}d")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_codalab() {
        assert_eq!(size_str(50.0 * 1024.0 * 1024.0), "50m");
        assert_eq!(size_str(2.0 * 1024.0 * 1024.0), "2m");
        assert_eq!(size_str(0.0), "0");
        assert_eq!(size_str(999.0), "999");
        assert_eq!(size_str(1536.0), "1.5k");
        assert_eq!(size_str(2147483648.0), "2g");
        assert_eq!(size_str(150.5 * 1024.0), "150k");
    }

    #[test]
    fn durations_like_codalab() {
        assert_eq!(duration_str(12.34), "12.3s");
        assert_eq!(duration_str(100.0), "1m40s");
        assert_eq!(duration_str(10000.0), "2h46m");
        assert_eq!(duration_str(3.0 * 86400.0 + 4.0 * 3600.0), "3d4h");
        assert_eq!(duration_str(367.0 * 86400.0), "1y2d");
    }

    #[test]
    fn messages_parse() {
        let body = br#"[{"type":"run","bundle":{"uuid":"0x1","bundle_type":"run","owner_id":"0","command":"echo hi","state":"starting","frozen":null,"is_anonymous":false,"metadata":{"exclude_patterns":["*.tmp"],"store":""},"args":"","dependencies":[{"parent_name":"h","parent_path":"","parent_uuid":"0x2","child_path":"hello.txt","child_uuid":"0x1","location":null}],"location":null},"resources":{"cpus":1,"gpus":0,"docker_image":"codalab/ubuntu:1.9","time":1.5,"memory":2147483648,"disk":0,"network":true,"tag":"","tag_exclusive":false,"runs_left":null}}, null, {"type":"kill","uuid":"0x1"}, {"type":"bogus"}]"#;
        let m = parse_messages(body).unwrap();
        assert_eq!(m.len(), 3);
        match &m[0] {
            Ok(Message::Run { bundle, resources }) => {
                assert_eq!(bundle.dependencies[0].child_path, "hello.txt");
                assert_eq!(bundle.exclude_patterns(), vec!["*.tmp"]);
                assert_eq!(resources.time, 1);
                assert_eq!(resources.memory, 2147483648);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &m[1],
            Ok(Message::Kill {
                kill_message: None,
                ..
            })
        ));
        assert!(m[2].as_ref().unwrap_err().contains("bogus"));
        assert!(parse_messages(b"{").is_err());
        assert!(parse_messages(b"[null]").unwrap().is_empty());
        // a bare object (old servers)
        assert_eq!(
            parse_messages(br#"{"type":"mark_finalized","uuid":"0x1"}"#)
                .unwrap()
                .len(),
            1
        );
    }
}
