// Included by runtime/build.rs: every run's seccomp filter, compiled once, when cw is built.
// libseccomp turns the profile (build/seccomp_profile.rs) into a BPF program; the runtime embeds it
// (`cw_runtime::seccomp::PROGRAM`) and each run's init loads it with one seccomp(2) call.
// Compiling it in each init, as libcontainer does from a spec's `linux.seccomp`, took 0.6 ms of
// every run's start (BENCHMARKS.md). The same profile compiled by libcontainer loads the same
// program, byte for byte: `cw_runtime::seccomp`'s tests check that against the kernel's copy.

/// The filter for `target_arch` (Cargo's `CARGO_CFG_TARGET_ARCH`), written to `out` as the BPF
/// program seccomp(2) loads. Built as libcontainer builds one from a spec (its
/// `initialize_seccomp`): default action, architectures, then the rules in order; syscalls
/// libseccomp does not know for this architecture are left out, as libcontainer leaves them.
fn compile_seccomp(target_arch: &str, out: &std::path::Path) {
    use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
    use std::str::FromStr;
    let arches: Vec<ScmpArch> = seccomp_arches(target_arch)
        .iter()
        .map(|a| ScmpArch::from_str(a).expect("libseccomp: an architecture"))
        .collect();
    if arches.is_empty() && std::env::var("TARGET") != std::env::var("HOST") {
        panic!("cw's seccomp filter: no architectures known for a cross build to {target_arch}");
    }
    let eperm = ScmpAction::Errno(libc::EPERM);
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).expect("libseccomp: a new filter");
    for &a in &arches {
        ctx.add_arch(a).expect("libseccomp: adding an architecture");
    }
    // built on another architecture: the filter is the target's alone
    if !arches.is_empty() && !arches.contains(&ScmpArch::native()) {
        ctx.remove_arch(ScmpArch::native()).expect("libseccomp: removing the host's architecture");
    }
    ctx.set_ctl_nnp(false).expect("libseccomp: no automatic no_new_privs");
    for name in seccomp_denied(target_arch) {
        if let Ok(sc) = ScmpSyscall::from_name(name) {
            ctx.add_rule(eperm, sc).expect("libseccomp: adding a rule");
        }
    }
    // clone3 hides its flags in memory: make libc fall back to clone(2), which is filtered
    let clone3 = ScmpSyscall::from_name("clone3").expect("libseccomp: clone3");
    ctx.add_rule(ScmpAction::Errno(libc::ENOSYS), clone3).expect("libseccomp: the clone3 rule");
    // (flags & F) == F for any namespace flag F → EPERM
    let clone = ScmpSyscall::from_name("clone").expect("libseccomp: clone");
    for f in CLONE_NAMESPACE_FLAGS {
        let cmp = ScmpArgCompare::new(seccomp_clone_flags_arg(target_arch), ScmpCompareOp::MaskedEqual(f), f);
        ctx.add_rule_conditional(eperm, clone, &[cmp]).expect("libseccomp: a clone rule");
    }
    let f = std::fs::File::create(out).expect("creating the seccomp program's file");
    ctx.export_bpf(&f).expect("libseccomp: exporting the BPF program");
}
