//! The runs already in a store: list, find, recover, remove, read their logs and exits.

use super::runs_dir;
use crate::store::Store;
use cw_runtime::rundir::{self as monitor, ExitStatus, RunDir};
use std::path::{Path, PathBuf};

/// All runs in the store, with their state.
pub fn list(store: &Store) -> Vec<(String, RunDir)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(runs_dir(store)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if cw_runtime::request::valid_id(&name) {
                out.push((name, RunDir::new(e.path())));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Release what runs whose monitor died (killed by hand, by the OOM killer, with a batch job)
/// still hold: their overlay mounts, cgroups and network helpers. Their containers died with the
/// monitor; [`RunDir::recover`] records them `lost` and the directories stay for `cw ps` and
/// `cw rm`. A run whose monitor has not written its pid yet is starting, not lost. Called as a
/// run starts and as a worker starts, so a node that lost its monitors (a cancelled Slurm job)
/// is cleaned by the next `cw run` or `cw worker` that uses the store.
pub fn recover_lost(store: &Store) {
    sweep_unplaced(store);
    for (id, rd) in list(store) {
        if rd.abandoned() {
            tracing::warn!("run {id}: the cw that prepared it died before it started; its mount and directory were released");
            release_abandoned(store, &id, &rd);
            continue;
        }
        if rd.monitor_pid().is_some() || !rd.monitor_started() {
            continue;
        }
        // a `cw run` without --keep left the directory's removal to its monitor
        let remove = rd.exit().is_some() && rd.to_be_removed();
        if !rd.cleaned() {
            match rd.recover() {
                Ok(()) => tracing::warn!("run {id}: its monitor had died; its container was stopped and its mounts and cgroups released"),
                Err(e) => {
                    tracing::warn!("run {id}: its monitor had died; cleaning up: {e}");
                    continue;
                }
            }
        }
        if remove {
            crate::store::discard(&rd.path);
        }
    }
}

/// Wait a moment (at most 10 s) for the runs that have ended and are still being torn down by
/// their monitors (`cw run` returns before that): until then their layers are in use and their
/// names taken.
pub fn settle(store: &Store) {
    for (_, rd) in list(store) {
        rd.settle(SETTLE_WITHIN);
    }
}

/// How long a cw waits for a run's teardown by its monitor before it goes on without it.
pub(crate) const SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Remove what a cw killed while it made a run's directory left (`runs/.new-…`, see
/// `prepare::create_run_dir`): one whose creator is gone, after a minute (a live cw renames its
/// own within microseconds of making it); and what a monitor killed while it removed its run's
/// directory left (`runs/.gone-<id>-<monitor pid>`), once that monitor is gone.
fn sweep_unplaced(store: &Store) {
    let Ok(rd) = std::fs::read_dir(runs_dir(store)) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(".gone-") {
            let remover = rest
                .rsplit_once('-')
                .and_then(|(_, pid)| pid.parse::<u32>().ok());
            if remover.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                crate::store::discard(&e.path());
            }
            continue;
        }
        if !name.starts_with(".new-") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|d| d > std::time::Duration::from_secs(60));
        if old && !RunDir::new(e.path()).being_prepared() {
            crate::store::discard(&e.path());
        }
    }
}

pub fn find(store: &Store, id: &str) -> anyhow::Result<RunDir> {
    if !cw_runtime::request::valid_id(id) {
        anyhow::bail!("{id:?} is not a valid run id");
    }
    let p = runs_dir(store).join(id);
    if !p.join("request.json").exists() && !p.join("creator").exists() {
        anyhow::bail!("no run {id:?} (cw ps lists them)");
    }
    Ok(RunDir::new(p))
}

/// Release and remove a run that never got its request written: its rootfs mount, its in-use
/// record, its directory.
pub(super) fn release_abandoned(store: &Store, id: &str, rd: &RunDir) {
    let rootfs = rd.path.join("rootfs");
    // a user's cw mounted nothing (a run's overlay is its monitor's, in its user namespace)
    let mounted_here = !cw_runtime::userns::needed();
    if let Err(e) = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH) {
        if mounted_here && e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
            tracing::warn!("unmounting {}: {e}", rootfs.display());
        }
    }
    store.clear_in_use(id);
    crate::store::discard(&rd.path);
}

/// Remove a finished run's directory.
pub fn remove(store: &Store, rd: &RunDir) -> anyhow::Result<()> {
    if !rd.path.join("request.json").exists() {
        if rd.being_prepared() {
            anyhow::bail!("run {} is still being prepared", rd.path.display());
        }
        let id = rd.path.file_name().unwrap_or_default().to_string_lossy();
        release_abandoned(store, &id, rd);
        return Ok(());
    }
    // its monitor tearing it down (a `cw run` that returned a moment ago): its own teardown
    // then, not a second one beside it
    rd.settle(SETTLE_WITHIN);
    if !rd.path.exists() {
        return Ok(());
    }
    if rd.status().is_running() {
        anyhow::bail!(
            "run {} is still running (cw kill it first)",
            rd.path.display()
        );
    }
    if !rd.cleaned() {
        rd.recover()?;
    }
    crate::store::remove_tree(&rd.path)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", rd.path.display()))?;
    Ok(())
}

/// Where the last `n` lines of `f` start (0 when it has fewer).
fn tail_offset(f: &mut std::fs::File, n: usize) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    if n == 0 {
        return Ok(len);
    }
    let mut end = len;
    let mut seen = 0;
    let mut buf = vec![0u8; 64 << 10];
    // a final newline ends the last line, it does not start another
    let mut skip_last = true;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let k = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..k])?;
        for i in (0..k).rev() {
            if buf[i] == b'\n' {
                if skip_last && start + i as u64 == len - 1 {
                    skip_last = false;
                    continue;
                }
                seen += 1;
                if seen == n {
                    return Ok(start + i as u64 + 1);
                }
            }
        }
        skip_last = false;
        end = start;
    }
    Ok(0)
}

/// `cw logs`: the run's output files, from the start (or their last `tail` lines); with
/// `follow`, what is written next, until the run has ended and nothing more comes.
pub fn logs(rd: &RunDir, follow: bool, tail: Option<usize>) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let req = rd.request()?;
    let outs: Vec<(PathBuf, bool)> = [(req.stdout.clone(), true), (req.stderr.clone(), false)]
        .into_iter()
        .filter_map(|(p, o)| p.map(|p| (p, o)))
        .collect();
    if outs.is_empty() {
        anyhow::bail!(
            "run {}'s output went to the cw that started it, not to files: there are no logs (cw run -d keeps them)",
            rd.path.file_name().unwrap_or_default().to_string_lossy()
        );
    }
    let mut files: Vec<(Option<std::fs::File>, u64, bool, PathBuf)> =
        outs.into_iter().map(|(p, o)| (None, 0, o, p)).collect();
    let mut buf = vec![0u8; 64 << 10];
    let mut first = true;
    loop {
        let ended = rd.exit().is_some();
        let mut got = false;
        for (f, off, is_out, p) in files.iter_mut() {
            if f.is_none() {
                match std::fs::File::open(&*p) {
                    Ok(mut h) => {
                        if let (Some(n), true) = (tail, first) {
                            *off = tail_offset(&mut h, n)?;
                        }
                        *f = Some(h);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => anyhow::bail!("{}: {e}", p.display()),
                }
            }
            let h = f.as_mut().expect("opened above");
            h.seek(SeekFrom::Start(*off))?;
            loop {
                let k = h.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                got = true;
                *off += k as u64;
                if *is_out {
                    std::io::stdout().write_all(&buf[..k])?;
                } else {
                    std::io::stderr().write_all(&buf[..k])?;
                }
            }
        }
        first = false;
        std::io::stdout().flush()?;
        if !follow || (ended && !got) {
            return Ok(());
        }
        if !got {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// The last error the run's monitor logged (or its last line), for a run found without its
/// monitor: read from the log's last 64 KiB, at most 400 characters.
pub fn last_log_error(rd: &RunDir) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(rd.path.join("monitor.log")).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 << 10))).ok()?;
    let mut b = vec![];
    f.read_to_end(&mut b).ok()?;
    let s = String::from_utf8_lossy(&b);
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains(" ERROR "))
        .or(lines.last())?;
    Some(line.chars().take(400).collect())
}

pub fn describe_exit(e: &ExitStatus, memory: Option<u64>) -> Option<String> {
    if let Some(err) = &e.error {
        return Some(err.clone());
    }
    if e.reason == monitor::Reason::MemoryLimit {
        let lim = memory
            .map(|m| format!(" of {}", crate::progress::human(m)))
            .unwrap_or_default();
        return Some(format!(
            "the run was killed for holding more than its memory limit{lim} (it has no cgroup: its processes' memory was sampled)"
        ));
    }
    if e.oom_killed {
        let lim = memory
            .map(|m| format!(" (limit {})", crate::progress::human(m)))
            .unwrap_or_default();
        return Some(format!(
            "the kernel killed a process of the run for exceeding its memory limit{lim}"
        ));
    }
    match e.reason {
        monitor::Reason::TimeLimit => {
            Some("the run was killed for exceeding its time limit".into())
        }
        monitor::Reason::Killed => Some("the run was killed on request".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_offsets() {
        use std::io::{Read, Seek, SeekFrom};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let last = |content: &str, n: usize| {
            std::fs::write(&p, content).unwrap();
            let mut f = std::fs::File::open(&p).unwrap();
            let o = tail_offset(&mut f, n).unwrap();
            f.seek(SeekFrom::Start(o)).unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(last("a\nb\nc\n", 1), "c\n");
        assert_eq!(last("a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(last("a\nb\nc", 1), "c");
        assert_eq!(last("a\nb\n", 5), "a\nb\n");
        assert_eq!(last("", 3), "");
        assert_eq!(last("a\nb\n", 0), "");
        let big: String = (0..100_000).map(|i| format!("line{i}\n")).collect();
        assert_eq!(last(&big, 2), "line99998\nline99999\n");
    }

    #[test]
    fn status_of_a_run_without_an_exit() {
        let d = tempfile::tempdir().unwrap();
        let rd = RunDir::new(d.path());
        // no request and nobody preparing it: a cw died while it prepared the run
        assert_eq!(rd.status().to_string(), "abandoned");
        rd.write_creator().unwrap();
        assert_eq!(rd.status().to_string(), "created");
        // a pid whose start time does not match: that monitor is gone
        std::fs::write(
            d.path().join("monitor.pid"),
            format!("{} 1", std::process::id()),
        )
        .unwrap();
        assert_eq!(rd.status().to_string(), "lost");
    }
}
