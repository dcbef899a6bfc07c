//! `cw-monitor __monitor <run-dir>`: a run's monitor as an executable of its own, installed
//! beside `cw`. It holds only the runtime (no registry client, no worker, no CLI), so the sealed
//! copy of itself that it runs from (CVE-2019-5736: a container must never be able to overwrite
//! the binary that created it) is a fraction of `cw`'s size, and `cw` itself needs no seal.
//! `cw` starts it when it is there (`cw_runtime::launch::monitor_exe`), else `cw __monitor`.

fn main() {
    if let Err(e) = pentacle::ensure_sealed() {
        eprintln!("cw-monitor: sealing the binary against CVE-2019-5736 failed: {e}");
        std::process::exit(125);
    }
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.as_slice() {
        [_, verb, dir] if verb == "__monitor" => {
            std::process::exit(cw_runtime::monitor::process_main(std::path::Path::new(dir)))
        }
        _ => {
            eprintln!("usage: cw-monitor __monitor RUN_DIR (cw starts it; it is not for people)");
            std::process::exit(2);
        }
    }
}
