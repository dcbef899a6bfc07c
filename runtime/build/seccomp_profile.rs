// The runs' seccomp profile, as data: included by runtime/build.rs, which compiles it into the
// BPF program every run loads (build/seccomp.rs), and by `cw_runtime::seccomp`'s tests, which
// check that program against libcontainer's compilation of the same profile.

/// Syscalls refused with EPERM: what docker's default profile leaves out for a container without
/// CAP_SYS_ADMIN and friends (kernel modules, mounts, namespaces, keyrings, bpf, clock, reboot…).
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    // io_uring runs I/O from kernel workers outside seccomp's view, and has been a steady source
    // of kernel exploits; docker's default profile refuses it since moby 25
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vhangup",
];

/// Refused as well on x86_64 (with its 32-bit ABIs).
const DENIED_X86_64: &[&str] = &["iopl", "ioperm", "vm86", "vm86old", "_sysctl", "umount"];

/// CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET: clone(2) with any is refused.
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

/// The architectures whose syscalls the filter sees, libseccomp's names, for Cargo's
/// `CARGO_CFG_TARGET_ARCH` (empty: the target's own alone). x86_64 keeps its 32-bit ABIs
/// filtered rather than killed, as docker's default profile does.
fn seccomp_arches(target_arch: &str) -> &'static [&'static str] {
    match target_arch {
        "x86_64" => &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        _ => &[],
    }
}

/// The syscalls refused with EPERM on `target_arch`.
fn seccomp_denied(target_arch: &str) -> impl Iterator<Item = &'static str> {
    let extra = if target_arch == "x86_64" { DENIED_X86_64 } else { &[] };
    DENIED_SYSCALLS.iter().chain(extra).copied()
}

/// clone(2)'s flags argument: the second on s390x, else the first.
fn seccomp_clone_flags_arg(target_arch: &str) -> u32 {
    if target_arch == "s390x" { 1 } else { 0 }
}
