//! Interactive runs (root): `cw run -i/-t/-it`, docker's sig-proxy, `cw attach` with detach keys,
//! `cw exec`, `cw logs -f`, and the 126/127 exit codes. The terminal tests drive cw through a
//! real pty that the test opens (cw's controlling terminal, as a shell's would be) and type
//! into the container's shell.

mod common;
use common::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TINY: &str = "127.0.0.1:5000/tiny:amd64";

fn runner() -> Option<Cw> {
    runner_with(TINY)
}

/// A command on a pty of its own: the pty is its controlling terminal and its stdio.
struct Term {
    master: File,
    /// Kept open so the terminal's settings can be read after cw has gone.
    slave: OwnedFd,
    child: Child,
    seen: Vec<u8>,
}

fn set_winsize(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    assert_eq!(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }, 0);
}

fn termios(fd: i32) -> libc::termios {
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
    t
}

fn same_termios(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

impl Term {
    fn spawn(mut cmd: Command, rows: u16, cols: u16) -> Term {
        let pty = nix::pty::openpty(None, None).unwrap();
        set_winsize(pty.master.as_raw_fd(), rows, cols);
        let slave = pty.slave;
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()));
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let fl = unsafe { libc::fcntl(pty.master.as_raw_fd(), libc::F_GETFL) };
        unsafe { libc::fcntl(pty.master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
        Term {
            master: File::from(pty.master),
            slave,
            child,
            seen: vec![],
        }
    }

    fn read_some(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.master.read(&mut buf) {
            if n == 0 {
                break;
            }
            self.seen.extend_from_slice(&buf[..n]);
        }
    }

    /// Wait until the screen has shown `needle` since the last expect; panics after `secs`.
    fn expect(&mut self, needle: &str, secs: u64) -> String {
        let t0 = Instant::now();
        loop {
            self.read_some();
            let text = String::from_utf8_lossy(&self.seen).into_owned();
            if let Some(i) = text.find(needle) {
                self.seen.drain(..(i + needle.len()).min(self.seen.len()));
                return text;
            }
            if t0.elapsed() > Duration::from_secs(secs) {
                panic!("no {needle:?} on the terminal after {secs}s; it showed:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, s: &[u8]) {
        self.master.write_all(s).unwrap();
    }

    /// The exit code of cw, which must end within `secs`.
    fn exit_code(&mut self, secs: u64) -> i32 {
        let t0 = Instant::now();
        loop {
            self.read_some();
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if t0.elapsed() > Duration::from_secs(secs) {
                let _ = self.child.kill();
                panic!(
                    "cw still running after {secs}s; the terminal showed:\n{}",
                    String::from_utf8_lossy(&self.seen)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_interactive_shell_in_a_terminal() {
    let Some(cw) = runner() else { return };
    let mut t = Term::spawn(cw.cmd(&["run", "-it", TINY, "sh"]), 31, 101);
    let before = termios(t.slave.as_raw_fd());
    // the shell's prompt, then a pts of the container's own devpts at our size
    t.expect("# ", 20);
    t.send(b"tty; stty size; echo TERM=$TERM\r");
    t.expect("/dev/pts/0", 10);
    t.expect("31 101", 10);
    t.expect("TERM=xterm", 10);
    // /dev/tty and /dev/console are that terminal (pts 0: char 136,0)
    t.send(b"echo via-$((1+1)) > /dev/tty; stat -c con=%t:%T /dev/console\r");
    t.expect("via-2", 10);
    t.expect("con=88:0", 10);
    // raw mode while cw runs: no echo by our terminal, the container's pty echoes
    let during = termios(t.slave.as_raw_fd());
    assert_eq!(
        during.c_lflag & libc::ECHO,
        0,
        "cw did not put the terminal in raw mode"
    );
    // a resize reaches the container (SIGWINCH to cw, TIOCSWINSZ on the run's pty)
    set_winsize(t.master.as_raw_fd(), 47, 133);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.child.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    );
    std::thread::sleep(Duration::from_millis(300));
    t.send(b"stty size\r");
    t.expect("47 133", 10);
    // Ctrl-C interrupts the container's foreground job, not cw
    t.send(b"sleep 30\r");
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    t.send(b"\x03");
    t.send(b"echo slept $?\r");
    t.expect("slept 130", 10);
    assert!(t0.elapsed() < Duration::from_secs(5));
    // job control: a background job is listed
    t.send(b"sleep 60 & jobs\r");
    t.expect("Running", 10);
    // line editing: a typed line corrected with backspace
    t.send(b"echo abx\x7fc\r");
    t.expect("abc", 10);
    // `exit 5` ends the shell with its code (Ctrl-D is checked below)
    t.send(b"kill %1; exit 5\r");
    assert_eq!(t.exit_code(20), 5);
    let after = termios(t.slave.as_raw_fd());
    assert!(
        same_termios(&before, &after),
        "the terminal's mode was not restored"
    );
    assert!(
        cw.entries("runs").is_empty(),
        "run left: {:?}",
        cw.entries("runs")
    );

    let mut t = Term::spawn(cw.cmd(&["run", "-it", TINY, "sh"]), 24, 80);
    t.expect("# ", 20);
    t.send(b"\x04");
    assert_eq!(t.exit_code(20), 0, "Ctrl-D did not end the shell");
}

#[test]
fn the_terminal_is_restored_when_the_run_is_killed() {
    let Some(cw) = runner() else { return };
    let mut t = Term::spawn(
        cw.cmd(&["run", "-it", "--name", "victim", TINY, "sh"]),
        24,
        80,
    );
    let before = termios(t.slave.as_raw_fd());
    t.expect("# ", 20);
    cw.ok(&["kill", "victim"]);
    let code = t.exit_code(30);
    assert_ne!(code, 0);
    assert!(same_termios(&before, &termios(t.slave.as_raw_fd())));
}

#[test]
fn a_terminal_run_outlives_its_cw_and_is_attached_again() {
    let Some(cw) = runner() else { return };
    let mut t = Term::spawn(
        cw.cmd(&["run", "-it", "--name", "orphan", TINY, "sh"]),
        24,
        80,
    );
    t.expect("# ", 20);
    t.send(b"echo before > /tmp/f\r");
    std::thread::sleep(Duration::from_millis(300));
    // the cw at the keyboard dies; the monitor holds the terminal
    t.child.kill().unwrap();
    t.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(cw.ok(&["ps"]).contains("running"), "{}", cw.ok(&["ps"]));
    let mut t = Term::spawn(cw.cmd(&["attach", "orphan"]), 24, 80);
    t.send(b"cat /tmp/f\r");
    t.expect("before", 10);
    t.send(b"exit 2\r");
    assert_eq!(t.exit_code(10), 2);
    cw.ok(&["rm", "orphan"]);
}

#[test]
fn piped_stdin_reaches_eof() {
    let Some(cw) = runner() else { return };
    let run = |args: &[&str]| {
        let mut c = cw.cmd(args);
        c.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut ch = c.spawn().unwrap();
        ch.stdin.take().unwrap().write_all(b"a\nb\n").unwrap();
        let o = ch.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
    };
    assert_eq!(
        run(&["run", "-i", "--image", TINY, "wc", "-l"]),
        (Some(0), "2".into())
    );
    // without -i the container's stdin is /dev/null, as docker's
    assert_eq!(
        run(&["run", "--image", TINY, "wc", "-l"]),
        (Some(0), "0".into())
    );
    // -it needs a terminal; -d -i needs -t
    let e = cw.fails(&["run", "-it", TINY, "true"]);
    assert!(e.contains("not a terminal"), "{e}");
    let e = cw.fails(&["run", "-d", "-i", TINY, "true"]);
    assert!(e.contains("needs -t"), "{e}");
}

fn signal(c: &Child, s: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), s).unwrap();
}

fn wait_for_line(c: &mut Child, line: &str) {
    let mut out = c.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !String::from_utf8_lossy(&got).contains(line) {
        assert_eq!(out.read(&mut b).unwrap(), 1, "no {line:?}: {got:?}");
        got.push(b[0]);
    }
    c.stdout = Some(out);
}

#[test]
fn signals_to_a_foreground_run_reach_the_container() {
    let Some(cw) = runner() else { return };
    use nix::sys::signal::Signal;
    for (sig, name, code) in [
        (Signal::SIGINT, "INT", 3),
        (Signal::SIGTERM, "TERM", 4),
        (Signal::SIGHUP, "HUP", 5),
    ] {
        let script = format!(
            "trap 'echo got {name}; exit {code}' {name}; echo ready; while :; do sleep 0.1; done"
        );
        let mut c = cw.cmd(&["run", TINY, "sh", "-c", &script]);
        c.stdout(Stdio::piped());
        let mut ch = c.spawn().unwrap();
        wait_for_line(&mut ch, "ready");
        signal(&ch, sig);
        let o = ch.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(code), "{name}");
        assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("got {name}")));
    }
    // an init with no handler ignores SIGINT (pid 1): the second one kills it
    let mut c = cw.cmd(&["run", TINY, "sh", "-c", "echo ready; exec sleep 100"]);
    c.stdout(Stdio::piped());
    let mut ch = c.spawn().unwrap();
    wait_for_line(&mut ch, "ready");
    std::thread::sleep(Duration::from_millis(200));
    signal(&ch, Signal::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        ch.try_wait().unwrap().is_none(),
        "one SIGINT ended a run that ignores it"
    );
    signal(&ch, Signal::SIGINT);
    let t0 = Instant::now();
    let st = ch.wait().unwrap();
    assert_eq!(st.code(), Some(137));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // SIGTERM also stops the run as `docker stop` does (what a batch system's cancel sends): an
    // init that ignores it is killed after the stop timeout
    let mut c = cw.cmd(&[
        "run",
        "--stop-timeout",
        "1s",
        TINY,
        "sh",
        "-c",
        "echo ready; exec sleep 100",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut ch = c.spawn().unwrap();
    wait_for_line(&mut ch, "ready");
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    signal(&ch, Signal::SIGTERM);
    let o = ch.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(137));
    assert!(String::from_utf8_lossy(&o.stderr).contains("killed on request"));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_detached_terminal_run_is_attached_detached_and_attached_again() {
    let Some(cw) = runner() else { return };
    let id = cw.ok(&["run", "-dit", TINY, "sh"]).trim().to_string();
    let mut t = Term::spawn(cw.cmd(&["attach", &id]), 24, 80);
    t.send(b"echo first-$((40+2))\r");
    t.expect("first-42", 10);
    // ctrl-p ctrl-q: cw attach leaves, the run goes on
    t.send(b"\x10\x11");
    assert_eq!(t.exit_code(10), 0);
    assert!(cw.ok(&["ps"]).contains("running"));
    let mut t = Term::spawn(cw.cmd(&["attach", "--detach-keys", "ctrl-x", &id]), 24, 80);
    t.send(b"echo second-$((40+3))\r");
    t.expect("second-43", 10);
    t.send(b"exit 3\r");
    assert_eq!(
        t.exit_code(10),
        3,
        "cw attach did not give the run's exit code"
    );
    // what the terminal showed is the run's log
    let logs = cw.ok(&["logs", &id]);
    assert!(
        logs.contains("first-42") && logs.contains("second-43"),
        "{logs}"
    );
    let e = cw.fails(&["attach", &id]);
    assert!(e.contains("has ended"), "{e}");
    let plain = cw
        .ok(&["run", "-d", TINY, "sleep", "30"])
        .trim()
        .to_string();
    let e = cw.fails(&["attach", &plain]);
    assert!(e.contains("no terminal"), "{e}");
    cw.ok(&["rm", "-f", &plain, &id]);
}

/// `/proc/self/status` lines of a process inside a run.
fn status_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            [
                "CapInh",
                "CapPrm",
                "CapEff",
                "CapBnd",
                "CapAmb",
                "NoNewPrivs",
                "Seccomp:",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn exec_joins_the_run_and_gets_no_more_than_it() {
    let Some(cw) = runner() else { return };
    let id = cw
        .ok(&[
            "run",
            "-d",
            "-m",
            "40m",
            "-u",
            "1000:1000",
            TINY,
            "sh",
            "-c",
            "echo run-was-here > /tmp/mark; exec sleep 120",
        ])
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(500));
    // its processes, its files
    let ps = cw.ok(&["exec", &id, "ps"]);
    assert!(ps.contains("sleep 120"), "{ps}");
    assert_eq!(cw.ok(&["exec", &id, "cat", "/tmp/mark"]), "run-was-here\n");
    // the run's user, capabilities, no_new_privs and seccomp: the same lines as the run's init
    let init = cw.ok(&["exec", &id, "cat", "/proc/1/status"]);
    let mine = cw.ok(&["exec", &id, "cat", "/proc/self/status"]);
    assert_eq!(status_lines(&init), status_lines(&mine));
    assert!(
        mine.contains("Seccomp:\t2") && mine.contains("NoNewPrivs:\t1"),
        "{mine}"
    );
    assert_eq!(cw.ok(&["exec", &id, "id", "-u"]), "1000\n");
    // and as root in the run, the run's bounding set still holds
    let root = cw.ok(&["exec", "-u", "0", &id, "cat", "/proc/self/status"]);
    let bnd = |t: &str| {
        status_lines(t)
            .into_iter()
            .find(|l| l.starts_with("CapBnd"))
            .unwrap()
    };
    assert_eq!(bnd(&root), bnd(&init));
    assert!(cw.ok(&["exec", "-u", "0", &id, "id", "-u"]) == "0\n");
    // its cgroup: the same as the init's, and the run's memory limit holds for it
    let cg = |pid: &str| cw.ok(&["exec", &id, "cat", &format!("/proc/{pid}/cgroup")]);
    assert_eq!(cg("1"), cg("self"));
    let o = cw.run(&[
        "exec",
        &id,
        "sh",
        "-c",
        "head -c 150m /dev/zero | tail > /dev/null",
    ]);
    assert_ne!(
        o.status.code(),
        Some(0),
        "150 MB in a 40m run was not refused"
    );
    // -e, -w, stdin, exit codes
    assert_eq!(
        cw.ok(&[
            "exec",
            "-e",
            "X=y",
            "-w",
            "/tmp",
            &id,
            "sh",
            "-c",
            "echo $X $PWD"
        ]),
        "y /tmp\n"
    );
    let mut c = cw.cmd(&["exec", "-i", &id, "wc", "-l"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut ch = c.spawn().unwrap();
    ch.stdin.take().unwrap().write_all(b"1\n2\n3\n").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ch.wait_with_output().unwrap().stdout).trim(),
        "3"
    );
    assert_eq!(
        cw.run(&["exec", &id, "sh", "-c", "exit 9"]).status.code(),
        Some(9)
    );
    let o = cw.run(&["exec", &id, "/nonexistent"]);
    assert_eq!(o.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent: no such file in image"));
    assert_eq!(
        cw.run(&["exec", &id, "/etc/passwd"]).status.code(),
        Some(126)
    );
    // -it: a shell in the run on a terminal
    let mut t = Term::spawn(cw.cmd(&["exec", "-it", &id, "sh"]), 28, 90);
    let before = termios(t.slave.as_raw_fd());
    t.expect("$ ", 20);
    t.send(b"stty size; ps\r");
    t.expect("28 90", 10);
    t.expect("sleep 120", 10);
    t.send(b"exit 6\r");
    assert_eq!(t.exit_code(10), 6);
    assert!(same_termios(&before, &termios(t.slave.as_raw_fd())));
    cw.ok(&["rm", "-f", &id]);
    let e = cw.fails(&["exec", &id, "true"]);
    assert!(e.contains("no run"), "{e}");
}

#[test]
fn logs_follow_a_run_to_its_end_and_missing_commands_are_127() {
    let Some(cw) = runner() else { return };
    let id = cw
        .ok(&[
            "run",
            "-d",
            TINY,
            "sh",
            "-c",
            "for i in 1 2 3; do echo line$i; sleep 0.5; done; echo bye >&2",
        ])
        .trim()
        .to_string();
    let o = cw.run(&["logs", "-f", &id]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "line1\nline2\nline3\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "bye\n");
    let o = cw.run(&["run", TINY, "no-such-command"]);
    assert_eq!(o.status.code(), Some(127));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("no-such-command: not found in the PATH of image"),
        "{e}"
    );
    assert!(
        !e.contains("libcontainer") && !e.contains("error in executing"),
        "{e}"
    );
    assert_eq!(
        cw.run(&["run", TINY, "/etc/passwd"]).status.code(),
        Some(126)
    );
    // docker's positional image: `cw run IMAGE CMD`
    assert_eq!(cw.ok(&["run", TINY, "echo", "positional"]), "positional\n");
    let e = cw.fails(&["run"]);
    assert!(e.contains("needs an image"), "{e}");
}

#[test]
fn an_ordinary_users_interactive_shell_in_a_terminal() {
    if !is_root() {
        skip("the test starts as root to become an ordinary user");
        return;
    }
    // a uid with no privileges: its own store, the image pulled by it
    const USER: u32 = 64_126;
    let cw = Cw::new();
    std::os::unix::fs::chown(cw.dir.path(), Some(USER), Some(USER)).unwrap();
    let as_user = |args: &[&str]| {
        let mut c = cw.cmd(args);
        c.uid(USER).gid(USER).env("HOME", cw.dir.path());
        c
    };
    let o = as_user(&["pull", "-q", TINY]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut t = Term::spawn(as_user(&["run", "-it", TINY, "sh"]), 30, 100);
    let before = termios(t.slave.as_raw_fd());
    t.expect("# ", 20);
    // the run's own pty, at our size; root inside is the user
    t.send(b"tty; stty size; id -u; cat /proc/self/uid_map\r");
    t.expect("/dev/pts/0", 10);
    t.expect("30 100", 10);
    t.expect(&format!("{USER}          1"), 10);
    // Ctrl-C reaches the container's foreground job
    t.send(b"sleep 30\r");
    std::thread::sleep(Duration::from_millis(500));
    t.send(b"\x03");
    t.send(b"echo slept $?\r");
    t.expect("slept 130", 10);
    t.send(b"exit 3\r");
    assert_eq!(t.exit_code(20), 3);
    assert!(same_termios(&before, &termios(t.slave.as_raw_fd())));
    assert!(cw.entries("runs").is_empty(), "{:?}", cw.entries("runs"));
    // a detached terminal run, attached by the user, left with the detach keys and ended
    let o = as_user(&["run", "-dit", "--name", "ud", TINY, "sh"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut t = Term::spawn(as_user(&["attach", "ud"]), 24, 80);
    t.send(b"echo first-$((40+2))\r");
    t.expect("first-42", 10);
    t.send(b"\x10\x11");
    assert_eq!(t.exit_code(10), 0);
    // cw exec joins the user's run: its user namespace (root is the user), its processes, its
    // root, and no more than the run's init has
    let exec = |args: &[&str]| {
        let mut a = vec!["exec", "ud"];
        a.extend_from_slice(args);
        let o = as_user(&a).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let map: Vec<String> = exec(&["cat", "/proc/self/uid_map"])
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(map, ["0", &USER.to_string(), "1"]);
    assert!(exec(&["ps"]).contains(" sh"), "{}", exec(&["ps"]));
    // the run's pid namespace (its pid 1 is the run's sh) and its root (the image's busybox)
    assert_eq!(
        exec(&[
            "sh",
            "-c",
            "cat /proc/1/comm; test -x /bin/busybox && echo image"
        ]),
        "sh\nimage\n"
    );
    let init = exec(&["cat", "/proc/1/status"]);
    let mine = exec(&["cat", "/proc/self/status"]);
    assert_eq!(status_lines(&init), status_lines(&mine));
    assert!(
        mine.contains("Seccomp:\t2") && mine.contains("NoNewPrivs:\t1"),
        "{mine}"
    );
    let o = as_user(&["exec", "ud", "sh", "-c", "exit 5"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5));
    let mut t = Term::spawn(as_user(&["attach", "ud"]), 24, 80);
    t.send(b"exit 4\r");
    assert_eq!(t.exit_code(10), 4);
    let o = as_user(&["rm", "ud"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
