//! The real CodaLab server (PyPI codalab 1.7.5 + MariaDB on 127.0.0.1, started once per test
//! binary by tests/fixtures/codalab/server.sh) and its `cl` client. Bundle states are read from
//! the server's database (each `cl` call costs seconds of imports).

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Server {
    pub env: Vec<(String, String)>,
    pub cl: String,
    pub mycnf: PathBuf,
    pub url: String,
    pub ws: String,
}

pub fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        fixtures();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/codalab/server.sh");
        let lock = std::fs::File::create("/tmp/cw-codalab.lock").unwrap();
        let _l = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
        let st = Command::new("bash")
            .arg(&script)
            .arg("start")
            .status()
            .unwrap();
        assert!(
            st.success(),
            "tests/fixtures/codalab/server.sh start failed"
        );
        let out = Command::new("bash")
            .arg(&script)
            .arg("env")
            .output()
            .unwrap();
        let mut env = vec![];
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            for kv in line.trim_start_matches("export ").split(' ') {
                if let Some((k, v)) = kv.split_once('=') {
                    env.push((k.to_string(), v.to_string()));
                }
            }
        }
        let get = |k: &str| {
            env.iter()
                .find(|(a, _)| a == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let home = get("CODALAB_HOME");
        Server {
            cl: get("CL"),
            url: get("CL_URL"),
            ws: get("CL_WS"),
            mycnf: Path::new(&home).parent().unwrap().join("my.cnf"),
            env,
        }
    })
}

impl Server {
    pub fn cl_output(&self, args: &[&str]) -> Output {
        Command::new(&self.cl)
            .args(args)
            .envs(self.env.iter().cloned())
            .output()
            .expect("running cl")
    }
    pub fn cl(&self, args: &[&str]) -> String {
        let o = self.cl_output(args);
        assert!(
            o.status.success(),
            "cl {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
    pub fn sql(&self, q: &str) -> String {
        let o = Command::new("mariadb")
            .arg(format!("--defaults-file={}", self.mycnf.display()))
            .args(["-uroot", "codalab_bundles", "-N", "-B", "-e", q])
            .output()
            .expect("mariadb");
        assert!(
            o.status.success(),
            "{q}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
    pub fn state(&self, uuid: &str) -> String {
        self.sql(&format!("select state from bundle where uuid='{uuid}'"))
    }
    pub fn meta(&self, uuid: &str, key: &str) -> String {
        self.sql(&format!(
            "select metadata_value from bundle_metadata where bundle_uuid='{uuid}' and metadata_key='{key}'"
        ))
    }
    pub fn wait_state(&self, uuid: &str, want: &[&str], secs: u64) -> String {
        let t = Instant::now();
        loop {
            let s = self.state(uuid);
            if want.contains(&s.as_str()) {
                return s;
            }
            if t.elapsed() > Duration::from_secs(secs) {
                panic!(
                    "bundle {uuid} is {s:?} after {secs}s, wanted {want:?}; run_status {:?}, failure {:?}",
                    self.meta(uuid, "run_status"),
                    self.meta(uuid, "failure_message")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    /// Wait for the end of a run the worker ended with a failure (`want`: "failed" or "killed")
    /// and return the failure message it recorded, with `log` in any panic.
    ///
    /// CodaLab 1.7.5 itself sometimes records such a run `ready` although the worker reported
    /// the failure. Its checkin commits the `finalizing` state before the failure message and
    /// exit code: `increment_user_disk_used` ends its own `engine.begin()` block with an explicit
    /// `commit()`, which on the server's thread-local engine pops and commits the checkin's outer
    /// transaction, so every later write commits on its own. A bundle-manager pass in those few
    /// milliseconds finishes the bundle from metadata without the message (the same race gives
    /// its "'Metadata' object has no attribute 'last_updated'" tracebacks). The message is then
    /// written all the same. So `ready` with a non-empty failure message is what the worker sent,
    /// the server's state aside; it is accepted and said, the message is still checked.
    pub fn wait_failure(
        &self,
        uuid: &str,
        want: &str,
        secs: u64,
        log: &dyn Fn() -> String,
    ) -> String {
        let got = self.wait_state(uuid, &["ready", "failed", "killed"], secs);
        let msg = self.meta(uuid, "failure_message");
        if got == "ready" && !msg.is_empty() {
            eprintln!(
                "NOTE: CodaLab recorded {uuid} ready with the failure message {msg:?} \
                 (its checkin commits the state before the message)"
            );
        } else {
            assert_eq!(
                got,
                want,
                "bundle {uuid}, failure message {msg:?}\n{}",
                log()
            );
        }
        msg
    }
    /// `cl run` on a worker's queue; returns the uuid.
    pub fn run(&self, tag: &str, extra: &[&str], cmd: &str) -> String {
        let mut args = vec![
            "run",
            "--request-queue",
            tag,
            "--request-docker-image",
            "codalab/ubuntu:1.9",
        ];
        args.extend_from_slice(extra);
        args.push(cmd);
        let uuid = self.cl(&args);
        assert!(uuid.starts_with("0x"), "{uuid}");
        uuid
    }
    pub fn cat(&self, target: &str) -> String {
        self.cl(&["cat", target])
    }
}
