//! A confined ldconfig over a run's rootfs, so driver libraries bound into the container
//! (`/usr/local/nvidia/lib64/libcuda.so.1`, or where a CDI spec puts them) are in the image's
//! own ld.so.cache and `dlopen("libcuda.so.1")` finds them without LD_LIBRARY_PATH.
//!
//! The image is untrusted and ldconfig parses its files, so the host's (static) ldconfig runs
//! the way libnvidia-container runs it, only tighter:
//! - in new mount, PID, network, IPC and UTS namespaces (it can signal or reach nothing on the
//!   host), chrooted into the rootfs (paths in the image resolve inside it);
//! - with the libraries bound read-only (`nosuid,nodev`) into that private mount namespace only;
//!   the bind targets are created from inside the chroot, and the binds made through
//!   `/proc/self/fd` links to descriptors opened there, so no image symlink can aim them at the
//!   host;
//! - with every capability dropped (bounding, ambient, effective, permitted, inheritable),
//!   no_new_privs, an empty environment (the image's never reaches it), only the log file open,
//!   executed from a descriptor opened on the host (`fexecve`): the image cannot substitute it;
//! - killed when it outlives a timeout.
//!
//! Everything between fork and exec is raw system calls on memory prepared before the fork, so
//! it is safe to call from a threaded process too.

use crate::request::BindMount;
use crate::{Error, Result};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The host's ldconfig, when it is statically linked (a dynamic one cannot run in the rootfs).
pub fn host_ldconfig() -> Result<PathBuf> {
    let p = ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Gpu("no ldconfig in /sbin or /usr/sbin".into()))?;
    let mut head = vec![0u8; 4096];
    let n = File::open(&p)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| Error::Gpu(format!("{}: {e}", p.display())))?;
    head.truncate(n);
    match elf_has_interp(&head) {
        Some(false) => Ok(p),
        Some(true) => Err(Error::Gpu(format!(
            "{} is dynamically linked; it cannot run inside a container's rootfs",
            p.display()
        ))),
        None => Err(Error::Gpu(format!(
            "{} is not a 64-bit ELF executable",
            p.display()
        ))),
    }
}

/// Whether a 64-bit little-endian ELF image has a PT_INTERP program header (None: not one).
fn elf_has_interp(b: &[u8]) -> Option<bool> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(b.get(0x20..0x28)?.try_into().ok()?) as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        let o = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let t = u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?);
        if t == 3 {
            return Some(true);
        }
    }
    Some(false)
}

fn cstr(s: &[u8]) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Gpu("a path holds a NUL byte".into()))
}

/// A container path that is absolute, normal and holds no `..`.
fn container_path(p: &str) -> Result<()> {
    if !p.starts_with('/') || p.split('/').any(|c| c == ".." || c == ".") || p.contains('\0') {
        return Err(Error::Gpu(format!(
            "{p:?} is not an absolute, normal container path"
        )));
    }
    Ok(())
}

struct Item {
    /// The host file, opened in the child (a descriptor from before its unshare would name a
    /// mount of the old namespace, which mount(2) refuses to bind).
    src: CString,
    dest: CString,
    mkdirs: Vec<CString>,
    is_dir: bool,
}

struct Prepared {
    /// Opened in the child after its unshare, like every descriptor it mounts with or chroots to.
    rootfs_path: CString,
    rootfs: libc::c_int,
    host_root: libc::c_int,
    ldconfig: File,
    items: Vec<Item>,
    /// Owns the strings `argv_ptrs` points into.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// source and target descriptors, filled in the child
    sfds: Vec<libc::c_int>,
    tfds: Vec<libc::c_int>,
}

// SAFETY: the raw pointers point into `_argv`, owned by the same value and never moved after.
unsafe impl Send for Prepared {}
unsafe impl Sync for Prepared {}

/// Add `dirs` (container paths) to the ld cache of `rootfs` (a mounted, writable root), with
/// those of `binds` that land in one of `dirs` visible to ldconfig. ldconfig's output goes to
/// `log`. Err: why it failed (the run can still use LD_LIBRARY_PATH).
pub fn update(rootfs: &Path, binds: &[BindMount], dirs: &[String], log: &Path) -> Result<()> {
    if dirs.is_empty() {
        return Ok(());
    }
    for d in dirs {
        container_path(d)?;
    }
    let ldconfig = host_ldconfig()?;
    let mut items = Vec::new();
    for b in binds {
        let Some((parent, _)) = b.destination.rsplit_once('/') else {
            continue;
        };
        if !dirs.iter().any(|d| d.trim_end_matches('/') == parent) {
            continue;
        }
        container_path(&b.destination)?;
        let is_dir = std::fs::metadata(&b.source)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        let mut mkdirs = Vec::new();
        let mut acc = String::new();
        for c in parent.split('/').filter(|c| !c.is_empty()) {
            acc.push('/');
            acc.push_str(c);
            mkdirs.push(cstr(acc.as_bytes())?);
        }
        items.push(Item {
            src: cstr(b.source.as_os_str().as_bytes())?,
            dest: cstr(b.destination.as_bytes())?,
            mkdirs,
            is_dir,
        });
    }
    let argv: Vec<CString> = std::iter::once(cstr(b"ldconfig")?)
        .chain(
            dirs.iter()
                .map(|d| cstr(d.as_bytes()))
                .collect::<Result<Vec<_>, _>>()?,
        )
        .collect();
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let n = items.len();
    let mut prep = Prepared {
        rootfs_path: cstr(rootfs.as_os_str().as_bytes())?,
        rootfs: -1,
        host_root: -1,
        ldconfig: File::open(&ldconfig)
            .map_err(|e| Error::Gpu(format!("{}: {e}", ldconfig.display())))?,
        items,
        _argv: argv,
        argv_ptrs,
        envp: vec![std::ptr::null()],
        sfds: vec![-1; n],
        tfds: vec![-1; n],
    };
    let out = File::create(log).map_err(|e| Error::Gpu(format!("{}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| Error::Gpu(e.to_string()))?;
    let mut cmd = std::process::Command::new(&ldconfig);
    cmd.env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: `child` makes only async-signal-safe system calls on memory prepared above.
    unsafe {
        cmd.pre_exec(move || child(&mut prep));
    }
    let mut ch = cmd.spawn().map_err(|e| {
        Error::Gpu(format!(
            "preparing the confined ldconfig: {e} (see {})",
            log.display()
        ))
    })?;
    let t0 = Instant::now();
    let status = loop {
        match ch.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t0.elapsed() > TIMEOUT => {
                let _ = ch.kill();
                let _ = ch.wait();
                return Err(Error::Gpu(format!(
                    "ldconfig ran over {} s; killed",
                    TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(Error::Gpu(e.to_string())),
        }
    };
    if status.success() {
        Ok(())
    } else {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        Err(Error::Gpu(format!(
            "ldconfig exited with {status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        )))
    }
}

/// Write a fixed message to stderr and turn errno into the error (no allocation).
unsafe fn fail(msg: &[u8]) -> io::Error {
    let e = io::Error::last_os_error();
    libc::write(2, msg.as_ptr().cast(), msg.len());
    e
}

/// `/proc/self/fd/N` into `buf`, NUL-terminated, without allocating.
fn fd_link(fd: libc::c_int, buf: &mut [u8; 32]) -> *const libc::c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd.max(0) as u32;
    let mut k = 0;
    loop {
        digits[k] = b'0' + (n % 10) as u8;
        k += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut i = prefix.len();
    while k > 0 {
        k -= 1;
        buf[i] = digits[k];
        i += 1;
    }
    buf[i] = 0;
    buf.as_ptr().cast()
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Runs between fork and exec: only raw system calls.
unsafe fn child(p: &mut Prepared) -> io::Result<()> {
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    if libc::unshare(flags) != 0 {
        return Err(fail(b"cw ldconfig: unshare failed\n"));
    }
    let root = c"/";
    let dot = c".";
    if libc::mount(
        std::ptr::null(),
        root.as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ) != 0
    {
        return Err(fail(b"cw ldconfig: making mounts private failed\n"));
    }
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    p.rootfs = libc::open(p.rootfs_path.as_ptr(), dir_flags);
    p.host_root = libc::open(root.as_ptr(), dir_flags);
    if p.rootfs < 0 || p.host_root < 0 {
        return Err(fail(b"cw ldconfig: opening the rootfs failed\n"));
    }
    for (i, it) in p.items.iter().enumerate() {
        let s = libc::open(it.src.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
        if s < 0 {
            return Err(fail(b"cw ldconfig: opening a host library failed\n"));
        }
        p.sfds[i] = s;
    }
    // 1. inside the rootfs: create the bind targets, resolving every path in the image's root
    if libc::fchdir(p.rootfs) != 0 || libc::chroot(dot.as_ptr()) != 0 {
        return Err(fail(b"cw ldconfig: entering the rootfs failed\n"));
    }
    libc::mkdir(c"/etc".as_ptr(), 0o755);
    for (i, it) in p.items.iter().enumerate() {
        for m in &it.mkdirs {
            libc::mkdir(m.as_ptr(), 0o755);
        }
        if it.is_dir {
            libc::mkdir(it.dest.as_ptr(), 0o755);
        } else {
            let fd = libc::open(
                it.dest.as_ptr(),
                libc::O_CREAT
                    | libc::O_RDONLY
                    | libc::O_NOFOLLOW
                    | libc::O_CLOEXEC
                    | libc::O_NONBLOCK,
                0o644,
            );
            if fd >= 0 {
                libc::close(fd);
            }
        }
        let t = libc::open(
            it.dest.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        );
        if t < 0 {
            return Err(fail(
                b"cw ldconfig: creating a bind target in the rootfs failed\n",
            ));
        }
        p.tfds[i] = t;
    }
    // 2. back at the host root: bind each library onto its target, by descriptor
    if libc::fchdir(p.host_root) != 0 || libc::chroot(dot.as_ptr()) != 0 {
        return Err(fail(b"cw ldconfig: leaving the rootfs failed\n"));
    }
    let (mut sbuf, mut tbuf) = ([0u8; 32], [0u8; 32]);
    for i in 0..p.items.len() {
        let src = fd_link(p.sfds[i], &mut sbuf);
        let tgt = fd_link(p.tfds[i], &mut tbuf);
        if libc::mount(src, tgt, std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
            return Err(fail(b"cw ldconfig: binding a library failed\n"));
        }
        libc::close(p.tfds[i]);
        libc::close(p.sfds[i]);
    }
    // 3. into the rootfs for good; the binds read-only
    if libc::fchdir(p.rootfs) != 0
        || libc::chroot(dot.as_ptr()) != 0
        || libc::chdir(root.as_ptr()) != 0
    {
        return Err(fail(b"cw ldconfig: entering the rootfs failed\n"));
    }
    for it in &p.items {
        if libc::mount(
            std::ptr::null(),
            it.dest.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail(b"cw ldconfig: making a bind read-only failed\n"));
        }
    }
    libc::close(p.host_root);
    libc::close(p.rootfs);
    // 4. the first child in the new PID namespace runs ldconfig; this process waits for it
    let pid = libc::fork();
    if pid < 0 {
        return Err(fail(b"cw ldconfig: fork failed\n"));
    }
    if pid > 0 {
        let mut st: libc::c_int = 0;
        loop {
            let r = libc::waitpid(pid, &mut st, 0);
            if r == pid {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(125);
            }
        }
        if libc::WIFEXITED(st) {
            libc::_exit(libc::WEXITSTATUS(st));
        }
        libc::_exit(128 + libc::WTERMSIG(st));
    }
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        libc::write(2, b"cw ldconfig: no_new_privs failed\n".as_ptr().cast(), 33);
        libc::_exit(126);
    }
    for cap in 0..64 {
        libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
    }
    libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL,
        0,
        0,
        0,
    );
    let mut hdr = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
        libc::write(
            2,
            b"cw ldconfig: dropping capabilities failed\n"
                .as_ptr()
                .cast(),
            42,
        );
        libc::_exit(126);
    }
    libc::fexecve(
        p.ldconfig.as_raw_fd(),
        p.argv_ptrs.as_ptr(),
        p.envp.as_ptr(),
    );
    libc::write(2, b"cw ldconfig: exec failed\n".as_ptr().cast(), 25);
    libc::_exit(127);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_links_and_elf_headers() {
        let mut b = [0u8; 32];
        let p = fd_link(1234, &mut b);
        let s = unsafe { std::ffi::CStr::from_ptr(p) };
        assert_eq!(s.to_str().unwrap(), "/proc/self/fd/1234");
        fd_link(0, &mut b);
        assert_eq!(&b[..16], b"/proc/self/fd/0\0");
        assert_eq!(elf_has_interp(b"not an elf"), None);
        let me = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(
            elf_has_interp(&me[..4096.min(me.len())]),
            Some(true),
            "test binaries are dynamic"
        );
        assert!(container_path("/usr/local/nvidia/lib64").is_ok());
        assert!(container_path("/usr/../etc").is_err());
        assert!(container_path("lib").is_err());
    }
}
