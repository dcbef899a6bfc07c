//! Every run's seccomp filter, as the BPF program libseccomp compiled when cw was built
//! (runtime/build/seccomp.rs, from the profile in runtime/build/seccomp_profile.rs: docker's
//! refusals for a container without CAP_SYS_ADMIN, io_uring, namespace flags to clone(2), and
//! clone3). The run's init loads it right before it reports ready ([`load`], from the monitor's
//! executor), and so does each `cw exec`'d process before its exec: one seccomp(2) call where
//! libcontainer, given the profile in the spec, compiled it in every init (0.6 ms of each
//! start). The tests check that the program is what libcontainer loads for that profile.

use std::io;

/// The program: `struct sock_filter` entries in this machine's byte order.
const PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp.bpf"));

const _: () = assert!(
    !PROGRAM.is_empty() && PROGRAM.len().is_multiple_of(8) && PROGRAM.len() / 8 <= 4096,
    "libseccomp's program is a whole number of instructions, at most BPF_MAXINSNS"
);

fn instructions() -> Vec<libc::sock_filter> {
    PROGRAM
        .chunks_exact(8)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect()
}

/// Load the filter into the calling thread, for it and what it executes. It needs
/// no_new_privs (libcontainer sets it first: every run's spec asks for it) or CAP_SYS_ADMIN.
pub fn load() -> io::Result<()> {
    let insns = instructions();
    let prog = libc::sock_fprog {
        len: insns.len() as u16,
        filter: insns.as_ptr() as *mut libc::sock_filter,
    };
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // the profile's data, as the build script compiles it
    include!("../build/seccomp_profile.rs");

    /// The profile as the spec's `linux.seccomp` (what the monitor gave libcontainer before).
    fn profile() -> oci_spec::runtime::LinuxSeccomp {
        let arch = std::env::consts::ARCH;
        let mut syscalls = vec![
            serde_json::json!({ "names": seccomp_denied(arch).collect::<Vec<_>>(),
                "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM }),
            serde_json::json!({ "names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS }),
        ];
        for f in CLONE_NAMESPACE_FLAGS {
            syscalls.push(
                serde_json::json!({ "names": ["clone"], "action": "SCMP_ACT_ERRNO",
                "errnoRet": libc::EPERM, "args": [{ "index": seccomp_clone_flags_arg(arch),
                "value": f, "valueTwo": f, "op": "SCMP_CMP_MASKED_EQ" }] }),
            );
        }
        serde_json::from_value(serde_json::json!({ "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": seccomp_arches(arch), "syscalls": syscalls }))
        .unwrap()
    }

    fn errno_of(r: libc::c_long) -> i32 {
        if r == -1 {
            io::Error::last_os_error().raw_os_error().unwrap()
        } else {
            0
        }
    }

    /// In a thread of its own (a filter and no_new_privs are the thread's, and die with it).
    #[test]
    fn the_filter_refuses_what_the_profile_refuses_and_allows_the_rest() {
        let got = std::thread::spawn(|| {
            assert_eq!(
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
                0
            );
            load().unwrap();
            let null = std::ptr::null::<u8>();
            unsafe {
                [
                    ("unshare", errno_of(libc::unshare(libc::CLONE_NEWUTS) as _)),
                    ("clone3", errno_of(libc::syscall(libc::SYS_clone3, null, 0))),
                    (
                        "io_uring_setup",
                        errno_of(libc::syscall(libc::SYS_io_uring_setup, 1, null)),
                    ),
                    (
                        "mount",
                        errno_of(libc::syscall(libc::SYS_mount, null, null, null, 0, null)),
                    ),
                    ("keyctl", errno_of(libc::syscall(libc::SYS_keyctl, 0, 0))),
                    // a namespace flag: refused before the kernel sees the invalid CLONE_FS
                    (
                        "clone(NEWUSER|FS)",
                        errno_of(libc::syscall(
                            libc::SYS_clone,
                            libc::CLONE_NEWUSER | libc::CLONE_FS,
                            0,
                        )),
                    ),
                    // an invalid clone without one reaches the kernel, which refuses it
                    (
                        "clone(SIGHAND)",
                        errno_of(libc::syscall(libc::SYS_clone, libc::CLONE_SIGHAND, 0)),
                    ),
                    ("getppid", errno_of(libc::getppid() as _)),
                ]
            }
        })
        .join()
        .unwrap();
        let want = [
            ("unshare", libc::EPERM),
            ("clone3", libc::ENOSYS),
            ("io_uring_setup", libc::EPERM),
            ("mount", libc::EPERM),
            ("keyctl", libc::EPERM),
            ("clone(NEWUSER|FS)", libc::EPERM),
            ("clone(SIGHAND)", libc::EINVAL),
            ("getppid", 0),
        ];
        assert_eq!(got, want);
    }

    /// Run in a child of the test below: loads libcontainer's compilation of the profile into
    /// this thread, says which thread it is, and stops for the parent (its tracer) to read the
    /// filter back.
    #[test]
    #[ignore = "run by the_program_is_what_libcontainer_loads_for_the_profile"]
    fn libcontainer_loads_the_profile_and_stops() {
        if std::env::var_os("CW_SECCOMP_HELPER").is_none() {
            return;
        }
        let profile = profile();
        unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0), 0);
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        }
        libcontainer::seccomp::initialize_seccomp(&profile).unwrap();
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "\nhelper-tid={}", unsafe { libc::gettid() });
        let _ = out.flush();
        unsafe { libc::raise(libc::SIGSTOP) };
    }

    /// The filter the kernel holds for a thread that libcontainer gave the profile (read back
    /// with PTRACE_SECCOMP_GET_FILTER, which needs CAP_SYS_ADMIN) is [`PROGRAM`], byte for byte.
    #[test]
    fn the_program_is_what_libcontainer_loads_for_the_profile() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: reading a filter back (PTRACE_SECCOMP_GET_FILTER) needs root");
            return;
        }
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp::tests::libcontainer_loads_the_profile_and_stops",
            ])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env("CW_SECCOMP_HELPER", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let tid: libc::pid_t = lines
            .map_while(|l| l.ok())
            .find_map(|l| l.strip_prefix("helper-tid=").map(|t| t.parse().unwrap()))
            .expect("the helper names its thread");
        let read_back = (|| unsafe {
            let mut st = 0;
            if libc::waitpid(tid, &mut st, libc::__WALL) != tid || !libc::WIFSTOPPED(st) {
                return Err(format!("the helper did not stop: {st:#x}"));
            }
            const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
            let n = libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0, 0);
            if n <= 0 {
                return Err(format!("{}", io::Error::last_os_error()));
            }
            let mut buf = vec![0u8; n as usize * 8];
            let m = libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0, buf.as_mut_ptr());
            if m != n {
                return Err(format!("read {m} of {n}: {}", io::Error::last_os_error()));
            }
            Ok(buf)
        })();
        // the traced thread's end goes to its tracer, this thread, before its process can end
        let _ = child.kill();
        loop {
            let mut st = 0;
            let r = unsafe { libc::waitpid(tid, &mut st, libc::__WALL) };
            if r != tid || libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                break;
            }
        }
        let _ = child.wait();
        let kernel = read_back.unwrap();
        assert_eq!(kernel.len(), PROGRAM.len(), "instructions: kernel vs built");
        assert!(
            kernel == PROGRAM,
            "the built program differs from libcontainer's"
        );
    }
}
