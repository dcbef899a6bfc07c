//! `cw load` of an untrusted archive (docker save or OCI layout tar): no panic, and the store is
//! left without temporary directories whatever happens.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.tar");
    std::fs::write(&input, data).unwrap();
    let store = cw::store::Store::open(tmp.path().join("store")).unwrap();
    let _ = cw::load::load(
        &store,
        &input,
        &cw::image::manifest::Platform::host(),
        Some(64 << 20),
    );
    let leftovers = std::fs::read_dir(tmp.path().join("store/tmp"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "temporary files left in the store");
});
