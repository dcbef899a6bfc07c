//! Paths and read args from the server against a bundle directory holding symlinks that point
//! out of it: whatever the path, a resolved target lies inside the bundle (checked through the
//! fd's /proc link), and reads never panic.
#![no_main]
use cw::worker::files;
use libfuzzer_sys::fuzz_target;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

fn bundle() -> &'static (tempfile::TempDir, std::path::PathBuf) {
    static B: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    B.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let b = t.path().join("0xbundle");
        std::fs::create_dir_all(b.join("d/e")).unwrap();
        std::fs::write(b.join("stdout"), "line 1\nline 2\n").unwrap();
        std::fs::write(b.join("d/e/f"), "x".repeat(5000)).unwrap();
        std::os::unix::fs::symlink("/etc", b.join("etc")).unwrap();
        std::os::unix::fs::symlink("../..", b.join("d/up")).unwrap();
        std::os::unix::fs::symlink("stdout", b.join("ln")).unwrap();
        std::fs::write(t.path().join("secret"), "outside").unwrap();
        (t, b)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (_, b) = bundle();
    let (path, args) = s.split_once('\n').unwrap_or((s, ""));
    let Ok(t) = files::resolve(b, "0xbundle", path) else {
        return;
    };
    let dir = std::fs::read_link(format!("/proc/self/fd/{}", t.dir.as_raw_fd())).unwrap();
    assert!(dir.starts_with(b), "{path:?} resolved to {}", dir.display());
    let _ = files::target_info(&t, 2);
    if let Ok(fd) = t.open("0xbundle", path) {
        let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(real.starts_with(b), "{path:?} opened {}", real.display());
        let n: Vec<u64> = args
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect();
        let mut f = std::fs::File::from(fd);
        if !t.is_dir() {
            let _ = files::read_section(&mut f, *n.first().unwrap_or(&0), *n.get(1).unwrap_or(&10));
            let _ = files::summarize(
                &mut f,
                *n.first().unwrap_or(&1) % 50,
                *n.get(1).unwrap_or(&1) % 50,
                n.get(2).copied().unwrap_or(16) % 4096 + 1,
                "...",
            );
        }
    }
});
