// Included by build.rs and runtime/build.rs: link the package's executables with their
// relative relocations packed (DT_RELR, `-z pack-relative-relocs`) where the host that builds
// them loads such executables (glibc 2.36 and later; binutils 2.38 or lld 15 link them).
// cw-monitor is copied into a sealed memfd and executed at every run's start, and cw starts
// with every command: packed, cw-monitor's 15 000 relocations (368 KB) become a few KB, and
// neither spends its start applying them one by one (bench/start.sh, BENCHMARKS.md).
// Executables linked so need glibc 2.36 wherever they run: `CW_PACK_RELOCS=0 cargo build`
// links them as before, for older hosts.
fn pack_relocs(this_file: &str) {
    println!("cargo:rerun-if-env-changed=CW_PACK_RELOCS");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={this_file}");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CW_PACK_RELOCS") == "0"
        || var("TARGET") != var("HOST")
        || !var("TARGET").ends_with("-linux-gnu")
    {
        return;
    }
    // a program linked so that runs here is the proof: the linker packed it (or ignored the
    // option, which is as before) and this host's loader takes it
    let out = std::path::PathBuf::from(var("OUT_DIR"));
    let (src, exe) = (out.join("relr-probe.c"), out.join("relr-probe"));
    let linked = std::fs::write(&src, "int main(void) { return 0; }\n").is_ok()
        && std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .arg("-Wl,-z,pack-relative-relocs")
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if linked && std::process::Command::new(&exe).status().is_ok_and(|s| s.success()) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
