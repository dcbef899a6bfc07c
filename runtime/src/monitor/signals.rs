//! The monitor's signals: inherited dispositions reset, and signals taken through a self-pipe.

use super::stdio::pipe;
use crate::{Error, Result};
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
    }
}

extern "C" fn on_sigpipe(_: libc::c_int) {}

/// Set every signal that arrived ignored back to its default. An ignored signal stays ignored
/// across fork and exec, so what cw was started with (nohup's SIGHUP; the SIG_IGN glibc's
/// posix_spawn leaves on its internal signals 32 and 33 in every child a Rust program spawns)
/// would otherwise reach the container. Raw rt_sigaction: glibc refuses to touch 32 and 33,
/// which this single-threaded process never needs.
pub(super) fn reset_ignored_signals() {
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = KernelSigaction {
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        let got = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                std::ptr::null::<KernelSigaction>(),
                &mut old as *mut KernelSigaction,
                8usize,
            )
        };
        if got == 0 && old.handler == libc::SIG_IGN {
            let dfl = KernelSigaction {
                handler: libc::SIG_DFL,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &dfl as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                )
            };
        }
    }
}

/// Take SIGTERM, SIGINT, SIGHUP and SIGCHLD through a self-pipe; returns its read end.
pub(super) fn install() -> Result<OwnedFd> {
    // signals arrive through a self-pipe; handlers (not a blocked mask) so children start clean
    let (sig_r, sig_w) = pipe().map_err(|e| Error::Host(format!("creating a pipe: {e}")))?;
    SIGNAL_PIPE.store(sig_w.into_raw_fd(), Ordering::Relaxed);
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        unsafe { signal::sigaction(s, &act) }.ok();
    }
    // A broken stdout pipe must not kill the monitor, but SIGPIPE must not be *ignored* either:
    // an ignored signal stays ignored across exec, and the container (forked from here) would
    // start with it (`yes | head -1` printing "Broken pipe" instead of ending quietly). A
    // handler that does nothing gives the monitor EPIPE and is reset to the default by exec.
    let noop = SigAction::new(
        SigHandler::Handler(on_sigpipe),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    unsafe { signal::sigaction(Signal::SIGPIPE, &noop) }.ok();
    Ok(sig_r)
}
