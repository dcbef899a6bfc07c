//! Layer extraction: whatever the tar holds, nothing is created outside the target root (a
//! sibling directory stays empty and the parent gains nothing), no device nodes, no panic.
#![no_main]
use cw::store::unpack::{self, Options, Whiteouts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, tar)) = data.split_first() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let whiteouts = match mode % 3 {
        0 => Whiteouts::Overlay,
        1 => Whiteouts::Apply,
        _ => Whiteouts::Keep,
    };
    let _ = unpack::unpack(
        tar,
        &root,
        Options {
            whiteouts,
            chown: false,
            budget: Some(unpack::Budget::new(64 << 20, "the fuzz input")),
        },
    );
    let top: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        top.len(),
        2,
        "something was created beside the root: {top:?}"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was created outside the root"
    );
    // no device nodes other than overlay whiteouts (char 0/0)
    fn walk(p: &std::path::Path) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            let t = m.file_type();
            if t.is_block_device() || (t.is_char_device() && m.rdev() != 0) {
                panic!("device node extracted: {}", e.path().display());
            }
            if t.is_dir() {
                walk(&e.path());
            }
        }
    }
    walk(&root);
});
