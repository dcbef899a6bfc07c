//! A run's terminal (`cw run -t`): the monitor owns the pty master and relays it to attached
//! clients over a `SOCK_SEQPACKET` socket; `cw run -it` is the first client, `cw attach` a later
//! one. The container outlives any client: with none attached, its output still goes to the
//! run's stdout file (a detached run's `cw logs`) or is read and dropped, so it never blocks.
//!
//! The pty itself is made by libcontainer inside the container's own devpts instance (so
//! /dev/console and /dev/tty there are right) and its master is handed to the monitor over the
//! console socket (`console.sock`, a stream socket, as runc's `--console-socket`).
//!
//! Frames, one per packet, first byte the kind:
//! ```text
//! client -> monitor  DATA  0, bytes...        keystrokes for the container
//!                    SIZE  1, rows u16 BE, cols u16 BE
//! monitor -> client  DATA  0, bytes...        what the container wrote
//! ```
//! Everything here is non-blocking: the monitor never waits on a client. A client that reads
//! too slowly (more than [`CLIENT_QUEUE`] behind) is disconnected.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

pub const DATA: u8 = 0;
pub const SIZE: u8 = 1;
/// The largest frame either side sends.
pub const FRAME: usize = 8192;
/// How far (bytes) a client may fall behind before it is dropped.
const CLIENT_QUEUE: usize = 1 << 20;
/// The attach socket in the run directory.
pub const ATTACH_SOCKET: &str = "attach.sock";
/// libcontainer's console socket in the run directory.
pub const CONSOLE_SOCKET: &str = "console.sock";

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Size {
    pub rows: u16,
    pub cols: u16,
}

pub fn size_frame(s: Size) -> [u8; 5] {
    let r = s.rows.to_be_bytes();
    let c = s.cols.to_be_bytes();
    [SIZE, r[0], r[1], c[0], c[1]]
}

/// A client's frame, decoded; None for one the monitor does not know (ignored).
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Data(&'a [u8]),
    Size(Size),
}

pub fn decode(p: &[u8]) -> Option<Frame<'_>> {
    match p {
        [DATA, rest @ ..] => Some(Frame::Data(rest)),
        [SIZE, r0, r1, c0, c1] => Some(Frame::Size(Size {
            rows: u16::from_be_bytes([*r0, *r1]),
            cols: u16::from_be_bytes([*c0, *c1]),
        })),
        _ => None,
    }
}

/// The size of the terminal on `fd`, if it is one.
pub fn terminal_size(fd: RawFd) -> Option<Size> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } != 0 || ws.ws_row == 0 {
        return None;
    }
    Some(Size {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

pub fn set_size(fd: RawFd, s: Size) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: s.rows,
        ws_col: s.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn socket(kind: libc::c_int) -> io::Result<OwnedFd> {
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sockaddr_un` for `dir/name` spelled through /proc/self/fd (run directories can be longer
/// than sun_path's 108 bytes); `dir_fd` must stay open while it is used.
fn addr(dir_fd: &File, name: &str) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let p = format!("/proc/self/fd/{}/{name}", dir_fd.as_raw_fd());
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if p.len() >= a.sun_path.len() {
        return Err(io::Error::other("socket path too long"));
    }
    for (i, b) in p.bytes().enumerate() {
        a.sun_path[i] = b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + p.len() + 1;
    Ok((a, len as libc::socklen_t))
}

/// A listening socket `dir/name`, mode 0600 (the run directory is closed to others as well).
pub fn listen(dir: &Path, name: &str, kind: libc::c_int) -> io::Result<OwnedFd> {
    let d = File::open(dir)?;
    let _ = std::fs::remove_file(dir.join(name));
    let s = socket(kind)?;
    let (a, len) = addr(&d, name)?;
    let old = unsafe { libc::umask(0o177) };
    let r = unsafe { libc::bind(s.as_raw_fd(), &a as *const _ as *const libc::sockaddr, len) };
    unsafe { libc::umask(old) };
    cvt(r)?;
    cvt(unsafe { libc::listen(s.as_raw_fd(), 8) })?;
    Ok(s)
}

/// Connect to the run's attach socket (blocking).
pub fn connect(dir: &Path) -> io::Result<OwnedFd> {
    let d = File::open(dir)?;
    let s = socket(libc::SOCK_SEQPACKET)?;
    let (a, len) = addr(&d, ATTACH_SOCKET)?;
    let r = unsafe { libc::connect(s.as_raw_fd(), &a as *const _ as *const libc::sockaddr, len) };
    cvt(r)?;
    set_nonblocking(s.as_raw_fd(), false)?;
    Ok(s)
}

/// A connected pair of SEQPACKET sockets: the first client of a run (`cw run -it` keeps one end
/// and gives the other to the monitor as its stdin).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let fl = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, fl) })?;
    Ok(())
}

/// Whether `fd` is a SEQPACKET socket (the monitor's stdin when `cw run -it` started it).
pub fn is_seqpacket(fd: RawFd) -> bool {
    let mut t: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut t as *mut _ as *mut libc::c_void,
            &mut len,
        ) == 0
            && t == libc::SOCK_SEQPACKET
    }
}

/// Accept libcontainer's connection on the console socket and take the pty master it sends.
pub fn receive_master(listener: &OwnedFd, timeout_ms: i32) -> io::Result<OwnedFd> {
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    if unsafe { libc::poll(&mut p, 1, timeout_ms) } <= 0 {
        return Err(io::Error::other(
            "the container did not send its terminal in time",
        ));
    }
    let c = cvt(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    })?;
    let conn = unsafe { OwnedFd::from_raw_fd(c) };
    let mut buf = [0u8; 256];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg = [0u64; 8];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    cvt(unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) } as i32)?;
    let mut fds = Vec::new();
    unsafe {
        let mut h = libc::CMSG_FIRSTHDR(&msg);
        while !h.is_null() {
            if (*h).cmsg_level == libc::SOL_SOCKET && (*h).cmsg_type == libc::SCM_RIGHTS {
                let n = ((*h).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(h) as *const RawFd;
                for i in 0..n {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            h = libc::CMSG_NXTHDR(&msg, h);
        }
    }
    let master = fds
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::other("the console socket got no terminal"))?;
    // only a pty master will do (what arrives came from inside the container)
    let mut n: libc::c_uint = 0;
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) } != 0 {
        return Err(io::Error::other(
            "the container sent something that is not a terminal",
        ));
    }
    set_nonblocking(master.as_raw_fd(), true)?;
    Ok(master)
}

/// The uid of a connected unix socket's peer.
fn peer_uid(fd: RawFd) -> Option<u32> {
    let mut c: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut c as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(c.uid)
}

struct Client {
    fd: OwnedFd,
    queue: VecDeque<Vec<u8>>,
    queued: usize,
}

/// The monitor's side: the pty master, the attach listener and the clients.
pub struct Console {
    master: OwnedFd,
    listener: Option<OwnedFd>,
    clients: Vec<Client>,
    /// A copy of all output (a detached run's stdout file).
    log: Option<File>,
    master_open: bool,
}

/// Which of the console's fds a poll entry is.
#[derive(Clone, Copy)]
pub enum Slot {
    Master,
    Listener,
    Client(usize),
}

impl Console {
    pub fn new(master: OwnedFd, listener: Option<OwnedFd>, log: Option<File>) -> Console {
        Console {
            master,
            listener,
            clients: Vec::new(),
            log,
            master_open: true,
        }
    }

    pub fn master_fd(&self) -> RawFd {
        self.master.as_raw_fd()
    }

    /// Add a client already connected (the monitor's stdin from `cw run -it`).
    pub fn add_client(&mut self, fd: OwnedFd) {
        let _ = set_nonblocking(fd.as_raw_fd(), true);
        self.clients.push(Client {
            fd,
            queue: VecDeque::new(),
            queued: 0,
        });
    }

    /// The fds to poll, with what each is.
    pub fn poll_fds(&self) -> Vec<(libc::pollfd, Slot)> {
        let mut v = Vec::new();
        if self.master_open {
            v.push((pfd(self.master.as_raw_fd(), libc::POLLIN), Slot::Master));
        }
        if let Some(l) = &self.listener {
            v.push((pfd(l.as_raw_fd(), libc::POLLIN), Slot::Listener));
        }
        for (i, c) in self.clients.iter().enumerate() {
            let ev = libc::POLLIN | if c.queued > 0 { libc::POLLOUT } else { 0 };
            v.push((pfd(c.fd.as_raw_fd(), ev), Slot::Client(i)));
        }
        v
    }

    /// Act on poll's answer for the fds [`poll_fds`] gave.
    pub fn handle(&mut self, ready: &[(libc::pollfd, Slot)]) {
        let mut gone = Vec::new();
        for (p, slot) in ready {
            if p.revents == 0 {
                continue;
            }
            match *slot {
                Slot::Master => {
                    self.read_master();
                }
                Slot::Listener => self.accept(),
                Slot::Client(i) => {
                    if !self.client_io(i, p.revents) {
                        gone.push(i);
                    }
                }
            }
        }
        gone.sort_unstable();
        for i in gone.into_iter().rev() {
            self.clients.remove(i);
        }
    }

    fn accept(&mut self) {
        let Some(l) = self.listener.as_ref().map(|l| l.as_raw_fd()) else {
            return;
        };
        loop {
            let c = unsafe {
                libc::accept4(
                    l,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if c < 0 {
                return;
            }
            let fd = unsafe { OwnedFd::from_raw_fd(c) };
            // the run dir is closed to others; this is a second lock on the same door
            let me = unsafe { libc::geteuid() };
            match peer_uid(c) {
                Some(u) if u == me || u == 0 => self.add_client(fd),
                _ => tracing::warn!("refused an attach from another user"),
            }
        }
    }

    /// Read what the container wrote; false when the terminal is closed.
    fn read_master(&mut self) -> bool {
        let mut buf = [0u8; FRAME];
        loop {
            let n = unsafe {
                libc::read(
                    self.master.as_raw_fd(),
                    buf[1..].as_mut_ptr() as *mut libc::c_void,
                    FRAME - 1,
                )
            };
            if n > 0 {
                let data = &buf[1..1 + n as usize];
                if let Some(f) = &mut self.log {
                    let _ = f.write_all(data);
                }
                buf[0] = DATA;
                let frame = &buf[..1 + n as usize];
                for c in &mut self.clients {
                    c.queue.push_back(frame.to_vec());
                    c.queued += frame.len();
                }
                continue;
            }
            let e = io::Error::last_os_error();
            if n < 0 && e.kind() == io::ErrorKind::WouldBlock {
                break;
            }
            if n < 0 && e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // EIO: no process holds the terminal any more
            self.master_open = false;
            break;
        }
        self.clients
            .retain_mut(|c| flush(c) && c.queued <= CLIENT_QUEUE);
        self.master_open
    }

    /// A client's socket is ready; false when it is gone.
    fn client_io(&mut self, i: usize, revents: libc::c_short) -> bool {
        let master = self.master.as_raw_fd();
        let c = &mut self.clients[i];
        if revents & libc::POLLOUT != 0 && !flush(c) {
            return false;
        }
        if revents & libc::POLLIN != 0 {
            let mut buf = [0u8; FRAME];
            loop {
                let n = unsafe {
                    libc::recv(
                        c.fd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        FRAME,
                        0,
                    )
                };
                if n == 0 {
                    return false;
                }
                if n < 0 {
                    let e = io::Error::last_os_error();
                    return matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    );
                }
                match decode(&buf[..n as usize]) {
                    Some(Frame::Data(d)) => write_all_nb(master, d),
                    Some(Frame::Size(s)) => {
                        let _ = set_size(master, s);
                    }
                    None => {}
                }
            }
        }
        revents & (libc::POLLHUP | libc::POLLERR) == 0
    }

    /// After the container's end: read what is left in the terminal, give it to the clients
    /// (waiting at most `ms` for slow ones), and close them.
    pub fn finish(mut self, ms: u64) {
        if self.master_open {
            self.read_master();
        }
        let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
        while self.clients.iter().any(|c| c.queued > 0) && std::time::Instant::now() < until {
            let mut p: Vec<libc::pollfd> = self
                .clients
                .iter()
                .filter(|c| c.queued > 0)
                .map(|c| pfd(c.fd.as_raw_fd(), libc::POLLOUT))
                .collect();
            unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, 50) };
            self.clients.retain_mut(flush);
        }
    }
}

fn pfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Send what is queued; false when the client is gone.
fn flush(c: &mut Client) -> bool {
    while let Some(f) = c.queue.front() {
        let n = unsafe {
            libc::send(
                c.fd.as_raw_fd(),
                f.as_ptr() as *const libc::c_void,
                f.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            );
        }
        c.queued -= f.len();
        c.queue.pop_front();
    }
    true
}

/// Keystrokes into the terminal. Its input buffer is 4 KiB; what does not fit now is dropped
/// rather than stall the monitor (a paste of more than that into a program not reading).
fn write_all_nb(fd: RawFd, mut d: &[u8]) {
    let mut tries = 0;
    while !d.is_empty() && tries < 100 {
        let n = unsafe { libc::write(fd, d.as_ptr() as *const libc::c_void, d.len()) };
        if n > 0 {
            d = &d[n as usize..];
            continue;
        }
        tries += 1;
        let mut p = pfd(fd, libc::POLLOUT);
        unsafe { libc::poll(&mut p, 1, 10) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let s = Size {
            rows: 40,
            cols: 132,
        };
        assert_eq!(decode(&size_frame(s)), Some(Frame::Size(s)));
        assert_eq!(decode(&[DATA, b'l', b's']), Some(Frame::Data(b"ls")));
        assert_eq!(decode(&[DATA]), Some(Frame::Data(b"")));
        assert_eq!(decode(&[SIZE, 1, 2]), None);
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[7, 1]), None);
    }

    #[test]
    fn a_pty_relays_both_ways_through_the_console() {
        let pty = nix::pty::openpty(None, None).unwrap();
        set_nonblocking(pty.master.as_raw_fd(), true).unwrap();
        let (ours, theirs) = pair().unwrap();
        let mut con = Console::new(pty.master, None, None);
        con.add_client(theirs);
        // the client sets the size and types a line
        let s = Size { rows: 33, cols: 99 };
        unsafe {
            libc::send(ours.as_raw_fd(), size_frame(s).as_ptr() as *const _, 5, 0);
            libc::send(ours.as_raw_fd(), b"\0hi\n".as_ptr() as *const _, 4, 0);
        }
        let step = |con: &mut Console| {
            let mut fds = con.poll_fds();
            let mut raw: Vec<libc::pollfd> = fds.iter().map(|f| f.0).collect();
            unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as _, 200) };
            for (f, r) in fds.iter_mut().zip(raw) {
                f.0 = r;
            }
            con.handle(&fds);
        };
        step(&mut con);
        assert_eq!(terminal_size(pty.slave.as_raw_fd()), Some(s));
        let mut got = [0u8; 64];
        let n = unsafe { libc::read(pty.slave.as_raw_fd(), got.as_mut_ptr() as *mut _, 64) };
        assert_eq!(&got[..n as usize], b"hi\n");
        // the container writes: the client gets a DATA frame
        unsafe { libc::write(pty.slave.as_raw_fd(), b"out".as_ptr() as *const _, 3) };
        step(&mut con);
        step(&mut con);
        // frames: the terminal's echo of "hi", then "out"
        let mut all = Vec::new();
        loop {
            let n = unsafe {
                libc::recv(
                    ours.as_raw_fd(),
                    got.as_mut_ptr() as *mut _,
                    64,
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
            assert_eq!(got[0], DATA);
            all.extend_from_slice(&got[1..n as usize]);
        }
        assert_eq!(all, b"hi\r\nout", "{:?}", String::from_utf8_lossy(&all));
    }
}
