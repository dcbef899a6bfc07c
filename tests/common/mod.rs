//! Shared test harness: the fixture registries (started by tests/fixtures/build.sh on 127.0.0.1),
//! a `cw` runner with a private store, a fault-injecting HTTP proxy, and tree comparison.
#![allow(dead_code)]

pub mod codalab;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, Once};

pub const REG: &str = "127.0.0.1:5000";
pub const REG_BASIC: &str = "127.0.0.1:5001";
pub const REG_TOKEN: &str = "127.0.0.1:5002";

pub fn fixtures_root() -> PathBuf {
    PathBuf::from(std::env::var("CW_FIXTURES").unwrap_or_else(|_| "/var/tmp/cw-fixtures".into()))
}

fn registry_has(port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = write!(s, "HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/vnd.docker.distribution.manifest.v2+json\r\nConnection: close\r\n\r\n");
    let mut b = String::new();
    let _ = s.read_to_string(&mut b);
    b.starts_with("HTTP/1.1 200") || b.starts_with("HTTP/1.1 401")
}

/// Make sure the fixture registries are up with their images (idempotent; builds on first use).
pub fn fixtures() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if registry_has(5000, "/v2/tiny/manifests/config")
            && registry_has(5000, "/v2/codalab/ubuntu/manifests/1.9")
            && registry_has(5001, "/v2/")
            && registry_has(5002, "/v2/")
            && fixtures_root().join("ref/edge/.done").exists()
        {
            return;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/build.sh");
        let lock = std::fs::File::create("/tmp/cw-fixtures.lock").unwrap();
        let _l = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
        let st = Command::new("bash")
            .arg(&script)
            .status()
            .expect("running tests/fixtures/build.sh");
        assert!(
            st.success(),
            "tests/fixtures/build.sh failed: the fixture registries are needed"
        );
    });
}

/// The cw under test: this build's, or `CW_BIN` (to show that a test fails on an older build).
pub fn cw_bin() -> PathBuf {
    std::env::var_os("CW_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_cw")))
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Say why a test does not run here. The suite's own command (scripts/test.sh, on a machine
/// scripts/setup.sh made) sets CW_NO_SKIP=1: everything a test needs is then meant to be there,
/// and a skip is a failure, so a missing kernel, daemon or package cannot pass CI unseen.
pub fn skip(why: &str) {
    if std::env::var_os("CW_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("this test must run here (CW_NO_SKIP=1) but: {why}");
    }
    eprintln!("SKIP: {why}");
}

/// A cw with its own store holding `image`, for tests that run containers (root); None, after
/// saying so, otherwise.
pub fn runner_with(image: &str) -> Option<Cw> {
    if !is_root() {
        skip("cw run needs root");
        return None;
    }
    let cw = Cw::new();
    cw.ok(&["pull", "-q", image]);
    Some(cw)
}

/// A cw with its own store.
pub struct Cw {
    pub dir: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

impl Drop for Cw {
    /// What a test leaves may be a tree no recursive removal survives (the hostile-input tests
    /// make them): removed with cw's bounded walk before TempDir's own removal runs.
    fn drop(&mut self) {
        // a test that failed may have left runs going (a terminal run outlives its cw): stopped
        // and removed first, so their monitors, mounts and cgroups do not outlive the test
        if self.store().join("runs").is_dir() {
            for id in self.entries("runs") {
                let _ = self.cmd(&["rm", "-f", &id]).output();
            }
        }
        // and the store's background sync, which writes into layers/ as it ends
        wait_for_settle(&self.store());
        let _ = cw_runtime::fsx::remove_tree(self.dir.path());
    }
}

impl Cw {
    pub fn new() -> Cw {
        fixtures();
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-stores");
        std::fs::create_dir_all(&base).unwrap();
        Cw {
            dir: tempfile::tempdir_in(base).unwrap(),
            env: vec![],
        }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(cw_bin());
        c.arg("--store")
            .arg(self.store())
            .arg("--config")
            .arg(self.dir.path().join("none.toml"));
        std::fs::write(self.dir.path().join("none.toml"), "").unwrap();
        c.args(args);
        c.env_remove("CW_REGISTRY_MIRROR")
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .env_remove("RUST_BACKTRACE");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// A `cw run` returns when its run has ended, and its monitor then tears the run down
    /// (unmount, cgroups, the run's directory): what a test checks after it, it checks once that
    /// is done ([`Cw::settle`]).
    pub fn run(&self, args: &[&str]) -> Output {
        let o = self.cmd(args).output().unwrap();
        if args.first() == Some(&"run") {
            self.settle();
        }
        o
    }

    /// Wait for the store's background sync of new layers ([`wait_for_settle`]).
    pub fn settle_store(&self) {
        wait_for_settle(&self.store());
    }

    /// Wait for the teardown of every run of the store that has ended (`RunDir::settle`).
    pub fn settle(&self) {
        // a run found under its own name may be renamed aside (`.gone-…`) as it is looked at:
        // another pass then finds that
        while self.settle_pass() {}
    }

    /// One pass of [`Cw::settle`]; whether it waited for anything.
    fn settle_pass(&self) -> bool {
        let Ok(rd) = std::fs::read_dir(self.store().join("runs")) else {
            return false;
        };
        let mut waited = false;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".gone-") {
                // a run's directory its monitor is removing
                let t = std::time::Instant::now();
                while e.path().exists() {
                    assert!(
                        t.elapsed() < std::time::Duration::from_secs(30),
                        "{} was not removed within 30 s",
                        e.path().display()
                    );
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                waited = true;
            } else if !name.starts_with('.') {
                let r = cw_runtime::rundir::RunDir::new(e.path());
                waited |= r.tearing_down() || !e.path().exists();
                assert!(
                    r.settle(std::time::Duration::from_secs(30)),
                    "run {} was not torn down within 30 s",
                    e.path().display()
                );
            }
        }
        waited
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "cw {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "cw {args:?} should have failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    pub fn image_json(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["inspect", name])).unwrap()
    }

    /// Names of entries in a store subdirectory.
    pub fn entries(&self, sub: &str) -> Vec<String> {
        if sub == "runs" {
            self.settle();
        } else {
            self.settle_store();
        }
        std::fs::read_dir(self.store().join(sub))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Assert the store holds nothing from a failed pull.
    pub fn assert_store_empty(&self) {
        for sub in ["layers", "images", "tmp", "blobs/sha256"] {
            assert!(
                self.entries(sub).is_empty(),
                "store {sub}/ not empty after a failed pull: {:?}",
                self.entries(sub)
            );
        }
        let refs = std::fs::read_to_string(self.store().join("refs.json")).unwrap_or_default();
        assert!(
            refs.is_empty() || refs.trim() == "{}",
            "refs after a failed pull: {refs}"
        );
    }

    /// Mount the image's layers as overlay at a temp dir; returns the mount point (unmount with
    /// [`umount`]).
    pub fn mount_image(&self, name: &str) -> PathBuf {
        let img = self.image_json(name);
        let lowers: Vec<String> = img["layers"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .map(|d| {
                self.store()
                    .join("layers")
                    .join(&d.as_str().unwrap()[7..])
                    .display()
                    .to_string()
            })
            .collect();
        let m = self.dir.path().join(format!("mnt-{}", rand_suffix()));
        for d in ["u", "w", "m"] {
            std::fs::create_dir_all(m.join(d)).unwrap();
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            m.join("u").display(),
            m.join("w").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &m.join("m"),
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .expect("mounting overlay");
        m.join("m")
    }
}

pub fn umount(p: &Path) {
    nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

pub fn rand_suffix() -> String {
    format!(
        "{:08x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            ^ std::process::id()
    )
}

fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let cp = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = unsafe {
        libc::llistxattr(
            cp.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    };
    if n <= 0 {
        return vec![];
    }
    let mut out = vec![];
    for name in buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
    {
        let s = String::from_utf8_lossy(name).into_owned();
        if s.starts_with("trusted.overlay.") || s.starts_with("security.selinux") {
            continue;
        }
        let cn = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 4096];
        let k = unsafe {
            libc::lgetxattr(
                cp.as_ptr(),
                cn.as_ptr(),
                v.as_mut_ptr() as *mut libc::c_void,
                v.len(),
            )
        };
        v.truncate(k.max(0) as usize);
        out.push((s, v));
    }
    out.sort();
    out
}

/// One line per entry: path, type, mode, owner, size, content hash, link target, xattrs, and for
/// non-directories the mtime; paths that share an inode are grouped by the first of them.
///
/// Two known umoci 0.4.7 divergences are normalised: it writes mtimes past 2038 wrapped to 32
/// bits (ext4 clamps ours at 2446 instead), and it drops xattrs whose value is empty.
pub fn describe_tree(root: &Path) -> Vec<String> {
    use sha2::Digest;
    let mut out = vec![];
    let mut inodes: std::collections::HashMap<(u64, u64), String> = Default::default();
    let mut shared: std::collections::HashMap<(u64, u64), usize> = Default::default();
    let mut stack = vec![PathBuf::new()];
    let mut all = vec![];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(root.join(&rel))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let m = std::fs::symlink_metadata(root.join(&r)).unwrap();
            if m.is_dir() {
                stack.push(r.clone());
            }
            all.push((r, m));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, m) in &all {
        if m.is_file() {
            *shared.entry((m.dev(), m.ino())).or_default() += 1;
        }
    }
    for (r, m) in all {
        let p = root.join(&r);
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "d"
        } else if ft.is_symlink() {
            "l"
        } else if ft.is_file() {
            "f"
        } else {
            "o"
        };
        let mut line = format!(
            "{} {kind} {:o} {}:{}",
            r.display(),
            m.mode() & 0o7777,
            m.uid(),
            m.gid()
        );
        if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            line += &format!(
                " {} {}",
                data.len(),
                hex::encode(&sha2::Sha256::digest(&data)[..8])
            );
            if shared[&(m.dev(), m.ino())] > 1 {
                let first = inodes
                    .entry((m.dev(), m.ino()))
                    .or_insert_with(|| r.display().to_string());
                line += &format!(" link={first}");
            }
        }
        if ft.is_symlink() {
            line += &format!(" -> {}", std::fs::read_link(&p).unwrap().display());
        }
        if !ft.is_dir() && (0..=i32::MAX as i64).contains(&m.mtime()) {
            line += &format!(" mtime={}", m.mtime());
        }
        for (k, v) in xattrs(&p).into_iter().filter(|(_, v)| !v.is_empty()) {
            line += &format!(" {k}={}", hex::encode(v));
        }
        out.push(line);
    }
    out
}

pub fn assert_same_tree(ours: &Path, reference: &Path) {
    let a = describe_tree(ours);
    let b = describe_tree(reference);
    if a != b {
        let sa: std::collections::BTreeSet<_> = a.iter().collect();
        let sb: std::collections::BTreeSet<_> = b.iter().collect();
        let only_a: Vec<_> = sa.difference(&sb).take(20).collect();
        let only_b: Vec<_> = sb.difference(&sa).take(20).collect();
        panic!("trees differ ({} vs {} entries)\nonly in cw's:\n{only_a:#?}\nonly in the reference:\n{only_b:#?}", a.len(), b.len());
    }
}

// ---------------------------------------------------------------- fault-injecting proxy

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Forward faithfully.
    None,
    /// Flip a byte in the middle of every blob body.
    CorruptBlobs,
    /// Cut blob bodies after this many bytes, the first `times` times.
    TruncateBlobs { after: usize, times: usize },
    /// Serve `{not json` for manifests.
    BadManifest,
    /// Serve a 5 MiB manifest.
    HugeManifest,
    /// Serve different JSON for small blobs (configs).
    WrongConfig,
    /// Answer every request with this status.
    Status(u16),
    /// Send blob bodies slowly: 16 KiB every 20 ms (~800 KB/s).
    SlowBlobs,
    /// Send one byte every 500 ms: of manifests when `min_blob` is 0, else of blobs of at least
    /// `min_blob` bytes (layers, not configs).
    Drip { min_blob: usize },
    /// Answer HEAD of any manifest with this digest, and GET of it with 404: a registry that
    /// claims an image it does not have.
    HeadClaims(String),
}

pub struct Proxy {
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
    pub fault: Arc<Mutex<Fault>>,
}

fn read_head(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        buf.push(b[0]);
        if buf.len() > 65536 {
            return None;
        }
    }
    Some((String::from_utf8_lossy(&buf).into_owned(), buf))
}

impl Proxy {
    /// A proxy on a free loopback port in front of `upstream` (host:port).
    pub fn start(upstream: &str, fault: Fault) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let fault = Arc::new(Mutex::new(fault));
        let (lg, ft, up) = (log.clone(), fault.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(c) = conn else { continue };
                let (lg, ft, up) = (lg.clone(), ft.clone(), up.clone());
                std::thread::spawn(move || handle(c, &up, &lg, &ft));
            }
        });
        Proxy { addr, log, fault }
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn count(&self, method: &str, part: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with(method) && r.contains(part))
            .count()
    }
}

fn handle(mut c: TcpStream, upstream: &str, log: &Mutex<Vec<String>>, fault: &Mutex<Fault>) {
    let Some((head, _)) = read_head(&mut c) else {
        return;
    };
    let first = head.lines().next().unwrap_or("").to_string();
    let range = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("range:"))
        .map(|l| l.to_string());
    let mut entry = first.clone();
    if let Some(r) = &range {
        entry += &format!(" [{r}]");
    }
    log.lock().unwrap().push(entry);
    let path = first.split(' ').nth(1).unwrap_or("").to_string();
    let method = first.split(' ').next().unwrap_or("").to_string();
    let f = fault.lock().unwrap().clone();
    if let Fault::HeadClaims(d) = &f {
        if path.contains("/manifests/") {
            let _ = if method == "HEAD" {
                write!(c, "HTTP/1.1 200 OK\r\nDocker-Content-Digest: {d}\r\nContent-Type: application/vnd.docker.distribution.manifest.v2+json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            } else {
                write!(
                    c,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            };
            return;
        }
    }
    if let Fault::Status(code) = f {
        let _ = write!(
            c,
            "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    // forward with Connection: close, read the whole answer
    let mut req = String::new();
    for l in head.split("\r\n").filter(|l| !l.is_empty()) {
        if l.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        req.push_str(l);
        req.push_str("\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    let Ok(mut u) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = u.write_all(req.as_bytes());
    let mut resp = Vec::new();
    let _ = u.read_to_end(&mut resp);
    let Some(split) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return;
    };
    let (rhead, body) = (
        String::from_utf8_lossy(&resp[..split]).into_owned(),
        resp[split + 4..].to_vec(),
    );
    let is_blob = path.contains("/blobs/sha256:") && method == "GET";
    let is_manifest = path.contains("/manifests/") && method == "GET";
    let ok = rhead.starts_with("HTTP/1.1 200") || rhead.starts_with("HTTP/1.1 206");
    let replace = |c: &mut TcpStream, body: &[u8], drop_digest: bool| {
        let mut h = String::new();
        for l in rhead.split("\r\n") {
            let ll = l.to_ascii_lowercase();
            if ll.starts_with("content-length:")
                || (drop_digest && ll.starts_with("docker-content-digest:"))
                || ll.starts_with("connection:")
            {
                continue;
            }
            h.push_str(l);
            h.push_str("\r\n");
        }
        h.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        let _ = c.write_all(h.as_bytes());
        let _ = c.write_all(body);
    };
    match f {
        Fault::CorruptBlobs if is_blob && ok && !body.is_empty() => {
            let mut b = body.clone();
            let i = b.len() / 2;
            b[i] ^= 0x55;
            replace(&mut c, &b, false);
        }
        Fault::TruncateBlobs { after, times }
            if is_blob && ok && body.len() > after && times > 0 =>
        {
            *fault.lock().unwrap() = Fault::TruncateBlobs {
                after,
                times: times - 1,
            };
            let _ = c.write_all(&resp[..split + 4]);
            let _ = c.write_all(&body[..after]);
            let _ = c.flush();
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        Fault::SlowBlobs if is_blob && ok => {
            let _ = c.write_all(&resp[..split + 4]);
            for chunk in body.chunks(16 << 10) {
                if c.write_all(chunk).is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Fault::Drip { min_blob }
            if ok
                && ((min_blob == 0 && is_manifest)
                    || (min_blob > 0 && is_blob && body.len() >= min_blob)) =>
        {
            let _ = c.write_all(&resp[..split + 4]);
            for b in body.iter().take(120) {
                if c.write_all(&[*b]).is_err() {
                    return;
                }
                let _ = c.flush();
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
        Fault::BadManifest if is_manifest && ok => replace(&mut c, b"{not json", true),
        Fault::HugeManifest if is_manifest && ok => replace(&mut c, &vec![b' '; 5 << 20], true),
        Fault::WrongConfig if is_blob && ok && body.len() < 10000 => replace(
            &mut c,
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
            false,
        ),
        _ => {
            let _ = c.write_all(&resp);
        }
    }
}

/// A detached run started by `c` (`cw --store STORE run -d ...`): its id, directory, monitor pid
/// and init pid, once both are up.
pub fn started(store: &Path, mut c: Command) -> (String, cw_runtime::rundir::RunDir, i32, i32) {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let rd = cw_runtime::rundir::RunDir::new(store.join("runs").join(&id));
    let t = std::time::Instant::now();
    loop {
        if let (Some(m), Some(p)) = (rd.monitor_pid(), rd.state().and_then(|s| s.pid)) {
            return (id, rd, m, p);
        }
        // a wait, not a timing claim: on 2 loaded cores (4 test threads of containers and a
        // compile beside them) a detached start once took longer than 15 s
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "the run did not start within 30 s: monitor pid {:?}, state {:?}\nmonitor.log: {}",
            rd.monitor_pid(),
            rd.state(),
            std::fs::read_to_string(rd.path.join("monitor.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// SIGKILL a run's monitor and wait until it is gone.
pub fn kill_monitor(rd: &cw_runtime::rundir::RunDir, monitor: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = std::time::Instant::now();
    while rd.monitor_pid().is_some() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "the monitor lives on"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

// ---- hostile images, built here from raw layers

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A layer tar from raw entries: (path, kind, link target, data, mode); long paths through GNU
/// long-name records (the tar crate writes them).
pub fn layer_tar(entries: &[(&str, tar::EntryType, &str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, link, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                b.append_link(&mut h, path, link).unwrap()
            }
            _ => b.append_data(&mut h, path, *data).unwrap(),
        }
    }
    b.into_inner().unwrap()
}

/// The host's static busybox as a layer: /bin/busybox and /bin/sh (Debian's busybox-static).
pub fn busybox_layer() -> Vec<u8> {
    let bb = std::fs::read("/bin/busybox").expect("busybox-static is installed by setup.sh");
    let mut e: Vec<(&str, tar::EntryType, &str, &[u8], u32)> = vec![
        ("bin/", tar::EntryType::Directory, "", b"", 0o755),
        ("tmp/", tar::EntryType::Directory, "", b"", 0o1777),
        ("etc/", tar::EntryType::Directory, "", b"", 0o755),
        ("bin/busybox", tar::EntryType::Regular, "", &bb, 0o755),
    ];
    for a in [
        "sh", "mkdir", "cat", "cp", "chmod", "sleep", "head", "ls", "id", "rm", "true",
    ] {
        e.push((
            Box::leak(format!("bin/{a}").into_boxed_str()),
            tar::EntryType::Symlink,
            "busybox",
            b"",
            0o777,
        ));
    }
    layer_tar(&e)
}

/// Write an OCI image layout at `dir` named `name` (its ref.name annotation) with these
/// uncompressed layers and config `config` (the image config's "config" object). With
/// `wrong_diff_ids`, the config claims diff ids the layers do not have.
pub fn oci_layout(
    dir: &Path,
    name: &str,
    layers: &[Vec<u8>],
    config: serde_json::Value,
    wrong_diff_ids: bool,
) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| -> String {
        let h = sha256_hex(b);
        std::fs::write(blobs.join(&h), b).unwrap();
        format!("sha256:{h}")
    };
    let mut descs = vec![];
    let mut diffs = vec![];
    for l in layers {
        let d = put(l);
        diffs.push(if wrong_diff_ids {
            format!("sha256:{}", sha256_hex(format!("not {d}").as_bytes()))
        } else {
            d.clone()
        });
        descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": d, "size": l.len()
        }));
    }
    let cfg = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diffs}
    }))
    .unwrap();
    let cd = put(&cfg);
    let man = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cfg.len()},
        "layers": descs
    }))
    .unwrap();
    let md = put(&man);
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md, "size": man.len(),
                "annotations": {"org.opencontainers.image.ref.name": name}}]
        }))
        .unwrap(),
    )
    .unwrap();
}

/// Push an OCI layout made by [`oci_layout`] to the fixture registry as `repo:tag`.
pub fn push_layout(dir: &Path, name: &str, repo_tag: &str) {
    let o = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{name}", dir.display()))
        .arg(format!("docker://{REG}/{repo_tag}"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "skopeo copy to {repo_tag}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A layer with one file at the bottom of `n` nested directories `d/d/…/d/bottom` (the
/// unpacker makes the missing parents), named through a GNU long-name record.
pub fn chain_layer(n: usize) -> Vec<u8> {
    let p = format!("{}bottom", "d/".repeat(n));
    layer_tar(&[(&p, tar::EntryType::Regular, "", b"bottom\n", 0o644)])
}

/// A command run as another user (uid:gid), for what a local attacker could do.
pub fn as_user(uid: u32, prog: &Path, args: &[&str]) -> std::io::Result<Output> {
    use std::os::unix::process::CommandExt;
    Command::new(prog).args(args).uid(uid).gid(uid).output()
}

/// A file of a running run's cgroup (`/cw/<name>`), waited for: `v1` in the `controller`
/// hierarchy, else `v2` in the unified one. Returns its trimmed content and whether it was v2.
pub fn run_cgroup_file(name: &str, controller: &str, v1: &str, v2: &str) -> (String, bool) {
    let p1 = format!("/sys/fs/cgroup/{controller}/cw/{name}/{v1}");
    let p2 = format!("/sys/fs/cgroup/cw/{name}/{v2}");
    let t = std::time::Instant::now();
    loop {
        if let Ok(v) = std::fs::read_to_string(&p1) {
            return (v.trim().to_string(), false);
        }
        if let Ok(v) = std::fs::read_to_string(&p2) {
            return (v.trim().to_string(), true);
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "no {p1} or {p2}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Poll `done` every 20 ms until it holds or `within` has passed; whether it held. The caller
/// asserts, with its own message (what a background teardown was still to remove).
pub fn eventually(within: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let t = std::time::Instant::now();
    loop {
        if done() {
            return true;
        }
        if t.elapsed() >= within {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Wait for the `cw __settle-store` a pull or load of `store` started in the background (it
/// syncs the new layers and rewrites their records, through temp files in layers/).
pub fn wait_for_settle(store: &Path) {
    let store = store.display().to_string();
    let t = std::time::Instant::now();
    loop {
        let busy = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.contains(&&b"__settle-store"[..]) && args.contains(&store.as_bytes())
            })
        });
        if !busy {
            return;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "cw __settle-store of {store} did not end within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// No process's command line names `p` (a store: pasta's pid file is in its run dirs), once
/// the store's background sync has ended.
pub fn assert_no_process_names(p: &Path) {
    wait_for_settle(p);
    let o = Command::new("pgrep")
        .args(["-f", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// Make `uid` a user with `count` subordinate ids from `start` (a name in the user database,
/// which newuidmap needs, and its lines in /etc/subuid and /etc/subgid), once.
pub fn subid_user(uid: u32, start: u32, count: u32) {
    // one at a time: useradd fails while another holds /etc/passwd's lock
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let name = format!("cwsub{uid}");
    let have = std::process::Command::new("getent")
        .args(["passwd", &uid.to_string()])
        .output()
        .unwrap();
    if !have.status.success() {
        // a system user (useradd gives it no subordinate ids of its own) whose group is its
        // uid, as the tests run it (newuidmap checks the process's gid against the passwd one)
        let id = uid.to_string();
        for (tool, args) in [
            ("groupadd", vec!["--system", "--gid", &id, &name]),
            (
                "useradd",
                vec![
                    "--system",
                    "--no-create-home",
                    "--gid",
                    &id,
                    "--shell",
                    "/usr/sbin/nologin",
                    "--uid",
                    &id,
                    &name,
                ],
            ),
        ] {
            let o = std::process::Command::new(tool)
                .args(args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                o.status.success() || err.contains("already"),
                "{tool}: {err}"
            );
        }
    }
    add_subids(uid, start, count);
}

/// `uid`'s line in /etc/subuid and /etc/subgid (added once; the tests of this file share them).
pub fn add_subids(uid: u32, start: u32, count: u32) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap();
    for f in ["/etc/subuid", "/etc/subgid"] {
        let have = std::fs::read_to_string(f).unwrap_or_default();
        let line = format!("{uid}:{start}:{count}");
        if !have.lines().any(|l| l == line) {
            assert!(
                !have.lines().any(|l| l.starts_with(&format!("{uid}:"))),
                "{f} has another range for {uid}"
            );
            let mut o = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(f)
                .unwrap();
            std::io::Write::write_all(&mut o, format!("{line}\n").as_bytes()).unwrap();
        }
    }
}
