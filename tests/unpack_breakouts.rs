//! Layer extraction must never create or change anything outside its root, whatever the layer
//! holds. Each case is a crafted tar (raw headers, no sanitising by the tar writer) unpacked into
//! a sandbox: `root/` is the target, `outside/` a canary directory beside it. Cases follow
//! containerd's TestBreakouts and umoci's extraction tests, plus overlay whiteout tricks.

use cw::store::unpack::{unpack, Options, UnpackError, UnpackStats, Whiteouts};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tar::EntryType as E;

struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn raw(mut self, name: &str, kind: E, link: &str, data: &[u8], mode: u32) -> Layer {
        let mut h = tar::Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            assert!(name.len() < 100 && link.len() < 100);
            g.name[..name.len()].copy_from_slice(name.as_bytes());
            g.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn file(self, name: &str, data: &str) -> Layer {
        self.raw(name, E::Regular, "", data.as_bytes(), 0o644)
    }
    fn dir(self, name: &str) -> Layer {
        self.raw(name, E::Directory, "", b"", 0o755)
    }
    fn symlink(self, name: &str, target: &str) -> Layer {
        self.raw(name, E::Symlink, target, b"", 0o777)
    }
    fn hardlink(self, name: &str, target: &str) -> Layer {
        self.raw(name, E::Link, target, b"", 0o644)
    }
    fn pax_file(mut self, name: &str, data: &str, pax: &[(&str, &[u8])]) -> Layer {
        self.0
            .append_pax_extensions(pax.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self.file(name, data)
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/file"), "original").unwrap();
        Sandbox { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn unpack(&self, layer: Layer) -> Result<UnpackStats, UnpackError> {
        self.unpack_mode(layer, Whiteouts::Overlay)
    }
    fn unpack_mode(&self, layer: Layer, w: Whiteouts) -> Result<UnpackStats, UnpackError> {
        unpack(
            &layer.bytes()[..],
            &self.root(),
            Options {
                whiteouts: w,
                chown: true,
                budget: None,
            },
        )
    }
    /// Nothing outside root changed: the canary file, the canary dir, the sandbox's own entries.
    fn assert_contained(&self) {
        let d = self.dir.path();
        assert_eq!(
            std::fs::read_to_string(d.join("outside/file")).unwrap(),
            "original",
            "canary file changed"
        );
        assert_eq!(
            std::fs::metadata(d.join("outside/file")).unwrap().nlink(),
            1,
            "canary file got a hard link"
        );
        let outside: Vec<_> = std::fs::read_dir(d.join("outside"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            outside.len(),
            1,
            "new entries in the canary dir: {outside:?}"
        );
        let top: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(top.len(), 2, "new entries beside root: {top:?}");
        assert!(
            !Path::new("/cw-breakout-evil").exists(),
            "wrote into the host's /"
        );
        assert!(
            !Path::new("/tmp/cw-breakout-evil").exists(),
            "wrote into the host's /tmp"
        );
    }
    /// `../../..` from root reaches `/`; this is the relative path from root to the canary.
    fn up(&self) -> String {
        let depth = self.root().components().count() - 1;
        "../".repeat(depth + 3)
    }
    fn outside_abs(&self) -> String {
        self.dir.path().join("outside").display().to_string()
    }
}

fn root_only() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (chown, whiteout device nodes, trusted xattrs)");
        return false;
    }
    true
}

#[test]
fn dotdot_file_is_clamped_to_root() {
    let s = Sandbox::new();
    s.unpack(Layer::new().file("../../../../cw-breakout-evil", "x"))
        .unwrap();
    assert!(s.root().join("cw-breakout-evil").is_file());
    s.assert_contained();
}

#[test]
fn dotdot_to_canary_is_clamped() {
    let s = Sandbox::new();
    let name = format!("{}outside/file", "../");
    s.unpack(Layer::new().file(&name, "evil")).unwrap();
    assert_eq!(
        std::fs::read_to_string(s.root().join("outside/file")).unwrap(),
        "evil"
    );
    s.assert_contained();
}

#[test]
fn absolute_path_is_rooted() {
    let s = Sandbox::new();
    s.unpack(Layer::new().file("/tmp/cw-breakout-evil", "x"))
        .unwrap();
    assert!(s.root().join("tmp/cw-breakout-evil").is_file());
    s.assert_contained();
}

#[test]
fn symlink_parent_relative_escape() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("a", &format!("{}outside", s.up()))
        .file("a/file", "evil");
    s.unpack(l).unwrap();
    s.assert_contained();
}

#[test]
fn symlink_parent_absolute_escape() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("a", &s.outside_abs())
        .file("a/file", "evil");
    s.unpack(l).unwrap();
    // followed inside the root: the absolute target is taken relative to root
    assert!(s
        .root()
        .join(s.outside_abs().trim_start_matches('/'))
        .join("file")
        .is_file());
    s.assert_contained();
}

#[test]
fn symlink_chain_escape() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("a", "b")
        .symlink("b", "c/../..")
        .dir("c")
        .file("a/cw-breakout-evil", "x");
    s.unpack(l).unwrap();
    s.assert_contained();
}

#[test]
fn symlink_to_slash_then_dotdot() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("r", "/")
        .file(&format!("r/{}cw-breakout-evil", "../".repeat(10)), "x");
    s.unpack(l).unwrap();
    assert!(s.root().join("cw-breakout-evil").is_file());
    s.assert_contained();
}

#[test]
fn symlink_loop_is_an_error() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", "x");
    let e = s.unpack(l).unwrap_err().to_string();
    assert!(e.contains("a/x"), "{e}");
    s.assert_contained();
}

#[test]
fn file_over_symlink_replaces_the_link() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("f", &format!("{}/file", s.outside_abs()))
        .file("f", "evil");
    s.unpack(l).unwrap();
    assert!(std::fs::symlink_metadata(s.root().join("f"))
        .unwrap()
        .is_file());
    s.assert_contained();
}

#[test]
fn relative_file_over_symlink_replaces_the_link() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("f", &format!("{}outside/file", s.up()))
        .file("f", "evil");
    s.unpack(l).unwrap();
    s.assert_contained();
}

#[test]
fn dir_over_symlink_replaces_the_link() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("d", &s.outside_abs())
        .dir("d")
        .file("d/x", "evil");
    s.unpack(l).unwrap();
    assert!(std::fs::symlink_metadata(s.root().join("d"))
        .unwrap()
        .is_dir());
    s.assert_contained();
}

#[test]
fn hardlink_to_outside_file_is_refused() {
    let s = Sandbox::new();
    let l = Layer::new().hardlink("h", &format!("{}outside/file", s.up()));
    let e = s.unpack(l).unwrap_err().to_string();
    assert!(e.contains("hard link") || e.contains("link target"), "{e}");
    s.assert_contained();
}

#[test]
fn hardlink_to_absolute_host_file_is_refused() {
    let s = Sandbox::new();
    let l = Layer::new().hardlink("h", &format!("{}/file", s.outside_abs()));
    assert!(s.unpack(l).is_err());
    s.assert_contained();
}

#[test]
fn hardlink_through_symlink_is_resolved_in_root() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("s", &s.outside_abs())
        .hardlink("h", "s/file");
    assert!(
        s.unpack(l).is_err(),
        "the target does not exist inside the root"
    );
    s.assert_contained();
}

#[test]
fn hardlink_to_symlink_then_write_does_not_follow() {
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("s", &format!("{}/file", s.outside_abs()))
        .hardlink("h", "s")
        .file("h", "evil");
    s.unpack(l).unwrap();
    assert_eq!(std::fs::read_to_string(s.root().join("h")).unwrap(), "evil");
    s.assert_contained();
}

#[test]
fn write_through_hardlinked_file_stays_inside() {
    let s = Sandbox::new();
    let l = Layer::new()
        .file("a", "one")
        .hardlink("b", "a")
        .file("b", "two");
    s.unpack(l).unwrap();
    assert_eq!(
        std::fs::read_to_string(s.root().join("a")).unwrap(),
        "one",
        "rewriting one name must not change the other"
    );
    assert_eq!(std::fs::read_to_string(s.root().join("b")).unwrap(), "two");
    s.assert_contained();
}

#[test]
fn whiteout_naming_dotdot_is_refused() {
    if !root_only() {
        return;
    }
    let s = Sandbox::new();
    let e = s
        .unpack(Layer::new().file("sub/.wh...", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("whiteout"), "{e}");
    s.assert_contained();
    let s = Sandbox::new();
    assert!(s.unpack(Layer::new().file(".wh..", "")).is_err());
    s.assert_contained();
}

#[test]
fn whiteout_through_symlink_stays_inside() {
    if !root_only() {
        return;
    }
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("s", &s.outside_abs())
        .file("s/.wh.file", "");
    s.unpack(l).unwrap();
    s.assert_contained();
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("s", &s.outside_abs())
        .file("s/.wh.file", "");
    s.unpack_mode(l, Whiteouts::Apply).unwrap();
    s.assert_contained();
}

#[test]
fn whiteout_with_dotdot_parent_is_clamped() {
    if !root_only() {
        return;
    }
    let s = Sandbox::new();
    s.unpack(Layer::new().file(&format!("{}outside/.wh.file", s.up()), ""))
        .unwrap();
    let wh = std::fs::symlink_metadata(s.root().join("outside/file")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "an overlay whiteout inside the root"
    );
    s.assert_contained();
    let s = Sandbox::new();
    s.unpack_mode(
        Layer::new().file(&format!("{}outside/.wh.file", s.up()), ""),
        Whiteouts::Apply,
    )
    .unwrap();
    s.assert_contained();
}

#[test]
fn opaque_marker_through_symlink_stays_inside() {
    if !root_only() {
        return;
    }
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("s", &s.outside_abs())
        .file("s/.wh..wh..opq", "");
    s.unpack(l).unwrap();
    s.assert_contained();
    let s = Sandbox::new();
    let l = Layer::new()
        .symlink("s", &s.outside_abs())
        .file("s/.wh..wh..opq", "");
    s.unpack_mode(l, Whiteouts::Apply).unwrap();
    s.assert_contained();
}

#[test]
fn device_nodes_are_never_created() {
    let s = Sandbox::new();
    let l = Layer::new()
        .raw("dev/sda", E::Block, "", b"", 0o660)
        .raw("dev/mem", E::Char, "", b"", 0o660)
        .raw("evil-null", E::Char, "", b"", 0o666);
    let st = s.unpack(l).unwrap();
    assert_eq!(st.skipped_devices, 3);
    assert!(!s.root().join("dev/mem").exists() && !s.root().join("evil-null").exists());
    s.assert_contained();
}

#[test]
fn overlay_xattrs_from_layers_are_dropped() {
    if !root_only() {
        return;
    }
    let s = Sandbox::new();
    let l = Layer::new().pax_file(
        "f",
        "x",
        &[
            ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
            ("SCHILY.xattr.user.ok", b"1"),
        ],
    );
    let st = s.unpack(l).unwrap();
    assert!(st.skipped_xattrs >= 1);
    let p = std::ffi::CString::new(s.root().join("f").display().to_string()).unwrap();
    let n = std::ffi::CString::new("trusted.overlay.redirect").unwrap();
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(r < 0, "trusted.overlay.redirect was set from a layer");
    s.assert_contained();
}

#[test]
fn pax_long_names_and_owners() {
    if !root_only() {
        return;
    }
    let s = Sandbox::new();
    let long = format!("{}/{}", "d".repeat(150), "f".repeat(200));
    let l = Layer::new().pax_file(
        "placeholder",
        "content",
        &[
            ("path", long.as_bytes()),
            ("uid", b"3000000"),
            ("gid", b"3000001"),
            ("mtime", b"1700000000.25"),
        ],
    );
    s.unpack(l).unwrap();
    let m = std::fs::metadata(s.root().join(&long)).unwrap();
    assert_eq!((m.uid(), m.gid()), (3_000_000, 3_000_001));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 250_000_000));
    s.assert_contained();
}

#[test]
fn special_modes_are_kept() {
    if !root_only() {
        return;
    }
    let s = Sandbox::new();
    let l = Layer::new()
        .raw("suid", E::Regular, "", b"x", 0o4755)
        .raw("none", E::Regular, "", b"x", 0o000)
        .raw("sticky", E::Directory, "", b"", 0o1777)
        .raw("fifo", E::Fifo, "", b"", 0o640);
    s.unpack(l).unwrap();
    let mode = |n: &str| {
        std::fs::symlink_metadata(s.root().join(n))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("suid"), 0o4755);
    assert_eq!(mode("none"), 0);
    assert_eq!(mode("sticky"), 0o1777);
    assert_eq!(mode("fifo"), 0o640);
    assert!(std::fs::symlink_metadata(s.root().join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    s.assert_contained();
}

#[test]
fn file_replaces_directory_with_contents() {
    let s = Sandbox::new();
    let l = Layer::new()
        .dir("x")
        .file("x/y", "1")
        .symlink("x/z", &s.outside_abs())
        .file("x", "now a file");
    s.unpack(l).unwrap();
    assert_eq!(
        std::fs::read_to_string(s.root().join("x")).unwrap(),
        "now a file"
    );
    s.assert_contained();
}

#[test]
fn truncated_archive_is_an_error() {
    let s = Sandbox::new();
    let mut b = Layer::new().file("a", &"x".repeat(5000)).bytes();
    b.truncate(2000);
    assert!(matches!(
        unpack(&b[..], &s.root(), Options::default()),
        Err(UnpackError::Read(_)) | Err(UnpackError::Entry { .. })
    ));
    s.assert_contained();
}

#[test]
fn same_path_twice_last_wins() {
    let s = Sandbox::new();
    s.unpack(Layer::new().file("a", "first").file("./a", "second"))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(s.root().join("a")).unwrap(),
        "second"
    );
    s.assert_contained();
}

#[test]
fn apply_mode_whiteouts_delete_lower_content() {
    if !root_only() {
        return;
    }
    let s = Sandbox::new();
    s.unpack_mode(
        Layer::new()
            .dir("d")
            .file("d/a", "1")
            .file("d/b", "2")
            .file("gone", "x"),
        Whiteouts::Apply,
    )
    .unwrap();
    s.unpack_mode(
        Layer::new()
            .file("d/.wh..wh..opq", "")
            .file("d/c", "3")
            .file(".wh.gone", ""),
        Whiteouts::Apply,
    )
    .unwrap();
    let mut names: Vec<_> = std::fs::read_dir(s.root().join("d"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["c"]);
    assert!(!s.root().join("gone").exists());
    s.assert_contained();
}
