//! The client side of a run's terminal and signals: `cw run -it`, `cw attach`, and docker's
//! sig-proxy for a foreground `cw run`.
//!
//! The monitor owns the pty (see `cw_runtime::console`); this end puts the user's terminal in
//! raw mode, relays keystrokes and output, sends the window size at start and on SIGWINCH, and
//! restores the terminal on every way out it can see (the run's end, a detach, an error, a
//! panic). Signals sent to cw itself (SIGTERM, SIGHUP, and SIGINT where the terminal is not raw)
//! are passed to the container's init; a second SIGINT kills it, and SIGTERM also stops the run
//! as `docker stop` does (SIGKILL after the stop timeout), so a batch system's cancel ends it.

use cw_runtime::console::{self, Size};
use cw_runtime::rundir::{ExitStatus, RunDir, RunEvent};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// The container's init (host pid) once it is known; 0 before.
static CONTAINER_PID: AtomicI32 = AtomicI32::new(0);
/// Signals that arrived before the container's start, as a bit set, for it once it starts.
static PENDING: AtomicU64 = AtomicU64::new(0);
static INTERRUPTS: AtomicI32 = AtomicI32::new(0);
/// The run's monitor, asked to stop the run by a second SIGINT before the container started.
static MONITOR_PID: AtomicI32 = AtomicI32::new(0);
/// The write end of the relay's self-pipe (SIGWINCH), or -1.
static WAKE: AtomicI32 = AtomicI32::new(-1);

/// docker's sig-proxy: to the container's init. An init without a handler for a signal ignores
/// it (pid 1), so the second Ctrl-C is SIGKILL.
fn deliver(pid: i32, sig: i32) {
    if sig == libc::SIGINT && INTERRUPTS.load(Ordering::Relaxed) >= 2 {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    } else {
        unsafe { libc::kill(pid, sig) };
    }
}

fn deliver_pending(pid: i32) {
    let p = PENDING.swap(0, Ordering::SeqCst);
    for sig in 1..64 {
        if p & (1u64 << sig) != 0 {
            deliver(pid, sig);
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGWINCH {
        let fd = WAKE.load(Ordering::Relaxed);
        if fd >= 0 {
            let b = sig as u8;
            unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
        }
        return;
    }
    if sig == libc::SIGINT {
        INTERRUPTS.fetch_add(1, Ordering::SeqCst);
    }
    let pid = CONTAINER_PID.load(Ordering::SeqCst);
    if sig == libc::SIGTERM {
        // as `docker stop` after the forward: the monitor stops the run (SIGTERM to all of its
        // processes, SIGKILL after the stop timeout), so a batch system's or a user's SIGTERM
        // ends a run whose init ignores it, cleanly and recorded
        let monitor = MONITOR_PID.load(Ordering::SeqCst);
        if monitor > 0 {
            unsafe { libc::kill(monitor, libc::SIGTERM) };
        }
    }
    if pid > 0 {
        deliver(pid, sig);
        return;
    }
    PENDING.fetch_or(1u64 << sig, Ordering::SeqCst);
    let monitor = MONITOR_PID.load(Ordering::SeqCst);
    if sig == libc::SIGINT && INTERRUPTS.load(Ordering::SeqCst) >= 2 && monitor > 0 {
        unsafe { libc::kill(monitor, libc::SIGTERM) };
    }
    // the start may have been recorded in between
    let pid = CONTAINER_PID.load(Ordering::SeqCst);
    if pid > 0 {
        deliver_pending(pid);
    }
}

/// Pass SIGINT, SIGTERM and SIGHUP sent to this process to the run (see the module's text), and
/// take SIGWINCH for the relay. What arrives before the container has started is given to it
/// when it starts (a second SIGINT before then asks `monitor`, when not 0, to stop the run).
pub fn proxy_signals(monitor: i32) {
    MONITOR_PID.store(monitor, Ordering::SeqCst);
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGWINCH,
    ] {
        unsafe { sigaction(s, &act) }.ok();
    }
}

/// The container's init is `pid` from now on.
pub fn container_started(pid: i32) {
    CONTAINER_PID.store(pid, Ordering::SeqCst);
    deliver_pending(pid);
}

/// Follow a foreground run on its monitor's pipe ([`RunEvent`]), in a thread: its start goes to
/// [`container_started`] (the signals passed on reach the init from then on), and the thread
/// returns its exit record, or None where the pipe closed without one (the monitor died).
pub fn follow(pipe: std::fs::File) -> std::thread::JoinHandle<Option<ExitStatus>> {
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(pipe);
        let mut line = String::new();
        loop {
            line.clear();
            match std::io::BufRead::read_line(&mut r, &mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            match RunEvent::parse(&line) {
                Some(RunEvent::Started(pid)) => container_started(pid),
                Some(RunEvent::Exited(ex)) => return Some(ex),
                None => {}
            }
        }
    })
}

/// `cw attach`: connect to a running run's terminal until it ends (its exit code) or the user
/// detaches (0).
pub fn attach(rd: &RunDir, id: &str, keys: Vec<u8>) -> anyhow::Result<i32> {
    let req = rd.request()?;
    if req.tty.is_none() {
        anyhow::bail!(
            "run {id} has no terminal (it was started without -t); `cw logs -f {id}` follows its output"
        );
    }
    if rd.exit().is_some() {
        anyhow::bail!("run {id} has ended; `cw logs {id}` shows its output");
    }
    let sock = console::connect(&rd.path).map_err(|e| {
        anyhow::anyhow!(
            "connecting to run {id}'s terminal ({}): {e}",
            rd.path.join(console::ATTACH_SOCKET).display()
        )
    })?;
    proxy_signals(rd.monitor_pid().unwrap_or(0));
    if let Some(pid) = rd.state().and_then(|s| s.pid) {
        container_started(pid);
    }
    let raw = stdin_is_terminal().then(RawMode::enter).transpose();
    let outcome = relay(&sock, true, keys);
    drop(raw);
    if outcome? == Outcome::Detached {
        eprintln!("cw: detached from {id}");
        return Ok(0);
    }
    Ok(rd.wait(std::time::Duration::from_millis(20))?.exit_code)
}

/// The terminal on fd 0 in raw mode until this is dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    pub fn enter() -> io::Result<RawMode> {
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let saved = t;
        unsafe { libc::cfmakeraw(&mut t) };
        if unsafe { libc::tcsetattr(0, libc::TCSADRAIN, &t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        unsafe { libc::tcsetattr(0, libc::TCSADRAIN, &self.saved) };
    }
}

/// Docker's detach keys (`ctrl-p,ctrl-q`): a comma list of `ctrl-<letter>`, `ctrl-@`, `ctrl-[`
/// … `ctrl-_`, or single characters.
pub fn parse_detach_keys(s: &str) -> Result<Vec<u8>, String> {
    if s.is_empty() {
        return Ok(vec![]);
    }
    s.split(',')
        .map(|k| {
            let k = k.trim();
            if let Some(c) = k.strip_prefix("ctrl-") {
                let b = match c.as_bytes() {
                    [b] if b.is_ascii_alphabetic() => b.to_ascii_lowercase() - b'a' + 1,
                    [b'@'] => 0,
                    [b @ b'['..=b'_'] => b - b'[' + 27,
                    _ => {
                        return Err(format!(
                            "detach key {k:?}: not ctrl-a..z, ctrl-@ or ctrl-[ … ctrl-_"
                        ))
                    }
                };
                Ok(b)
            } else if k.len() == 1 {
                Ok(k.as_bytes()[0])
            } else {
                Err(format!("detach key {k:?}: one character or ctrl-<c>"))
            }
        })
        .collect()
}

/// Watches keystrokes for the detach sequence. Bytes of a partial match are held back and sent
/// on as typed when the sequence breaks off (docker does the same).
pub struct Detach {
    keys: Vec<u8>,
    matched: usize,
}

impl Detach {
    pub fn new(keys: Vec<u8>) -> Detach {
        Detach { keys, matched: 0 }
    }

    /// What to send on for `input`, and whether the sequence is complete (what follows it in
    /// `input` is dropped).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        if self.keys.is_empty() {
            out.extend_from_slice(input);
            return (out, false);
        }
        for &b in input {
            if b == self.keys[self.matched] {
                self.matched += 1;
                if self.matched == self.keys.len() {
                    self.matched = 0;
                    return (out, true);
                }
                continue;
            }
            out.extend_from_slice(&self.keys[..self.matched]);
            self.matched = 0;
            if b == self.keys[0] {
                self.matched = 1;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The monitor closed the terminal: the run is over.
    Ended,
    /// The user typed the detach keys.
    Detached,
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn pollin(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Empty the self-pipe a signal handler wrote to.
fn drain(fd: RawFd) {
    let mut b = [0u8; 64];
    while unsafe { libc::read(fd, b.as_mut_ptr() as *mut libc::c_void, b.len()) } > 0 {}
}

fn send(sock: RawFd, frame: &[u8]) -> io::Result<()> {
    let n = unsafe {
        libc::send(
            sock,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Relay between this process's stdin/stdout and a run's terminal socket until the run ends or
/// the user detaches. `input`: read stdin (`-i`); `detach`: the detach keys (with `input`).
pub fn relay(sock: &OwnedFd, input: bool, detach: Vec<u8>) -> io::Result<Outcome> {
    let (wake_r, wake_w) = pipe()?;
    WAKE.store(wake_w.as_raw_fd(), Ordering::Relaxed);
    let res = relay_loop(sock.as_raw_fd(), input, detach, wake_r.as_raw_fd());
    WAKE.store(-1, Ordering::Relaxed);
    drop(wake_w);
    res
}

fn relay_loop(sock: RawFd, input: bool, detach: Vec<u8>, wake: RawFd) -> io::Result<Outcome> {
    if let Some(s) = console::terminal_size(1).or_else(|| console::terminal_size(0)) {
        send(sock, &console::size_frame(s))?;
    }
    let mut detach = Detach::new(detach);
    let mut stdin_open = input;
    let mut buf = vec![0u8; console::FRAME];
    let mut out = io::stdout().lock();
    loop {
        let mut p = vec![pollin(sock), pollin(wake)];
        if stdin_open {
            p.push(libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if p[0].revents != 0 {
            let n =
                unsafe { libc::recv(sock, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n == 0 {
                return Ok(Outcome::Ended);
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => {}
                    io::ErrorKind::ConnectionReset => return Ok(Outcome::Ended),
                    _ => return Err(e),
                }
            } else if let Some(console::Frame::Data(d)) = console::decode(&buf[..n as usize]) {
                out.write_all(d)?;
                out.flush()?;
            }
        }
        if p[1].revents != 0 {
            drain(wake);
            if let Some(s) = console::terminal_size(1).or_else(|| console::terminal_size(0)) {
                let _ = send(sock, &console::size_frame(s));
            }
        }
        if stdin_open && p[2].revents != 0 {
            let n =
                unsafe { libc::read(0, buf[1..].as_mut_ptr() as *mut libc::c_void, buf.len() - 1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    stdin_open = false;
                }
                continue;
            }
            if n == 0 {
                // end of our input: the terminal stays (Ctrl-D in raw mode is a byte, not this)
                stdin_open = false;
                continue;
            }
            let (keys, detached) = detach.feed(&buf[1..1 + n as usize]);
            if !keys.is_empty() {
                for chunk in keys.chunks(console::FRAME - 1) {
                    let mut frame = Vec::with_capacity(chunk.len() + 1);
                    frame.push(console::DATA);
                    frame.extend_from_slice(chunk);
                    send(sock, &frame)?;
                }
            }
            if detached {
                return Ok(Outcome::Detached);
            }
        }
    }
}

/// `cw exec -t`: relay between this process's stdin/stdout and a pty master of our own until
/// the process `pid` (our child) has ended and its output is read.
pub fn relay_pty(master: &OwnedFd, pid: i32, input: bool) -> io::Result<()> {
    let (wake_r, wake_w) = pipe()?;
    WAKE.store(wake_w.as_raw_fd(), Ordering::Relaxed);
    let res = relay_pty_loop(master.as_raw_fd(), pid, input, wake_r.as_raw_fd());
    WAKE.store(-1, Ordering::Relaxed);
    res
}

fn relay_pty_loop(master: RawFd, pid: i32, input: bool, wake: RawFd) -> io::Result<()> {
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let _ = console::set_size(master, our_size());
    let mut stdin_open = input;
    let mut buf = vec![0u8; console::FRAME];
    let mut out = io::stdout().lock();
    let mut ended = false;
    loop {
        let mut p = vec![pollin(master), pollin(wake), pollin(pidfd.as_raw_fd())];
        if stdin_open {
            p.push(libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // after the end: only what is already in the terminal (a background process that
        // keeps it open does not keep cw)
        let timeout = if ended { 0 } else { -1 };
        let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if p[0].revents != 0 {
            let n = unsafe { libc::read(master, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n <= 0 {
                return Ok(());
            }
            out.write_all(&buf[..n as usize])?;
            out.flush()?;
        } else if ended {
            return Ok(());
        }
        if p[1].revents != 0 {
            drain(wake);
            let _ = console::set_size(master, our_size());
        }
        if p[2].revents != 0 {
            ended = true;
        }
        if stdin_open && p[3].revents != 0 {
            let n = unsafe { libc::read(0, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n <= 0 {
                stdin_open = false;
                continue;
            }
            let mut d = &buf[..n as usize];
            while !d.is_empty() {
                let w = unsafe { libc::write(master, d.as_ptr() as *const libc::c_void, d.len()) };
                if w < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    break;
                }
                d = &d[w as usize..];
            }
        }
    }
}

/// The size of the terminal this process writes to, for a new run's pty (24×80 when there is
/// none).
pub fn our_size() -> Size {
    console::terminal_size(1)
        .or_else(|| console::terminal_size(0))
        .unwrap_or(Size { rows: 24, cols: 80 })
}

/// Whether fd 0 is a terminal.
pub fn stdin_is_terminal() -> bool {
    unsafe { libc::isatty(0) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_parse_like_dockers() {
        assert_eq!(parse_detach_keys("ctrl-p,ctrl-q").unwrap(), vec![16, 17]);
        assert_eq!(
            parse_detach_keys("ctrl-@,ctrl-[,ctrl-_").unwrap(),
            vec![0, 27, 31]
        );
        assert_eq!(parse_detach_keys("a,ctrl-A").unwrap(), vec![b'a', 1]);
        assert_eq!(parse_detach_keys("").unwrap(), Vec::<u8>::new());
        assert!(parse_detach_keys("ctrl-1").is_err());
        assert!(parse_detach_keys("ab").is_err());
    }

    #[test]
    fn detach_sequence_is_held_back_and_given_on_when_broken() {
        let mut d = Detach::new(vec![16, 17]);
        assert_eq!(d.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        // ctrl-p alone is held until the next key says what it was
        assert_eq!(d.feed(&[16]), (vec![], false));
        assert_eq!(d.feed(b"x"), (vec![16, b'x'], false));
        // ctrl-p ctrl-p ctrl-q: the first is given on, the last two detach
        assert_eq!(d.feed(&[16, 16, 17, b'z']), (vec![16], true));
        // split across reads
        assert_eq!(d.feed(&[b'a', 16]), (vec![b'a'], false));
        assert_eq!(d.feed(&[17]), (vec![], true));
        // no keys: everything goes through
        let mut none = Detach::new(vec![]);
        assert_eq!(none.feed(&[16, 17]), (vec![16, 17], false));
    }
}
