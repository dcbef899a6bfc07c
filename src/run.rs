//! `cw run` and the commands on runs (`ps`, `kill`, `rm`, `stats`): image config + flags →
//! rootfs → [`cw_runtime::request::RunRequest`] → a monitor process.

use crate::image::manifest::RunConfig;
use crate::rootfs;
use crate::store::{ImageRecord, Store};
use cw_runtime::request::{BindMount, Cleanup, Limits, Network, RunRequest};
use cw_runtime::rundir::{self as monitor, ExitStatus, RunDir};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub name: Option<String>,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub mounts: Vec<BindMount>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub limits: Limits,
    pub network: Network,
    pub time_limit: Option<u64>,
    pub kill_grace_secs: u64,
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    pub cgroup_parent: String,
    pub readonly_rootfs: bool,
    pub force_copy: bool,
    pub hostname: Option<String>,
    /// GPUs assigned to the run (empty: none) and the driver version their libraries must have.
    pub gpus: Vec<cw_runtime::gpu::Gpu>,
    pub driver_version: String,
    /// Host device nodes passed through (`--device`).
    pub devices: Vec<cw_runtime::request::Device>,
    /// CDI spec directories for GPU runs (empty: /etc/cdi and /var/run/cdi).
    pub cdi_dirs: Vec<PathBuf>,
    /// Connect the container's stdin (`-i`) and give it a terminal (`-t`).
    pub stdin: bool,
    pub tty: Option<cw_runtime::console::Size>,
}

pub fn runs_dir(store: &Store) -> PathBuf {
    store.root().join("runs")
}

/// Parse `--device HOST[:CONTAINER[:PERMS]]`: a host character or block device node, created at
/// CONTAINER (default: the same path) and allowed with PERMS (default `rwm`) in the device cgroup.
pub fn parse_device(s: &str) -> Result<cw_runtime::request::Device, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, dst, perms) = match parts.as_slice() {
        [h] => (*h, *h, "rwm"),
        [h, d] => (*h, *d, "rwm"),
        [h, d, p] => (*h, *d, *p),
        _ => return Err(format!("device {s:?} is not HOST[:CONTAINER[:PERMS]]")),
    };
    cw_runtime::request::Device::from_host(host, dst, perms)
        .map_err(|e| format!("--device {s:?}: {e}"))
}

/// Parse `-v SRC:DST[:ro|rw]`.
pub fn parse_volume(s: &str) -> Result<BindMount, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let (src, dst, ro) = match parts.as_slice() {
        [s, d] => (*s, *d, false),
        [s, d, "ro"] => (*s, *d, true),
        [s, d, "rw"] => (*s, *d, false),
        _ => return Err(format!("volume {s:?} is not SRC:DST[:ro|rw]")),
    };
    if !dst.starts_with('/') {
        return Err(format!(
            "volume {s:?}: the destination must be an absolute path"
        ));
    }
    let source =
        std::fs::canonicalize(src).map_err(|e| format!("volume {s:?}: source {src:?}: {e}"))?;
    Ok(BindMount {
        source,
        destination: dst.to_string(),
        readonly: ro,
    })
}

/// Docker's rules: user args replace Cmd; Entrypoint stays in front. A single argument that
/// contains whitespace or shell syntax is a shell command (`/bin/sh -c`).
pub fn command(cfg: &RunConfig, args: &[String]) -> Vec<String> {
    let user: Vec<String> = if args.len() == 1
        && args[0]
            .chars()
            .any(|c| c.is_whitespace() || "|&;<>()$`\\\"'*?[#~=%".contains(c))
    {
        vec!["/bin/sh".into(), "-c".into(), args[0].clone()]
    } else {
        args.to_vec()
    };
    let mut out = cfg.entrypoint.clone();
    if user.is_empty() {
        out.extend(cfg.cmd.iter().cloned());
    } else {
        out.extend(user);
    }
    out
}

/// Image env, then defaults, then the user's `-e` (a bare `-e NAME` copies the host's value).
pub fn environment(
    cfg: &RunConfig,
    user_env: &[String],
    home: &str,
    hostname: &str,
) -> Result<Vec<String>, String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |kv: &str, whose: &str| -> Result<(), String> {
        if let Some((k, v)) = env_entry(kv, whose)? {
            env.retain(|(ek, _)| *ek != k);
            env.push((k, v));
        }
        Ok(())
    };
    set(
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "",
    )?;
    set(&format!("HOSTNAME={hostname}"), "")?;
    set(&format!("HOME={home}"), "")?;
    for e in &cfg.env {
        set(e, "the image's Env entry")?;
    }
    for e in user_env {
        set(e, "environment variable")?;
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// One `-e` entry: NAME=VALUE, or NAME alone copied from our environment (None when it is not
/// set here).
pub fn env_entry(kv: &str, whose: &str) -> Result<Option<(String, String)>, String> {
    let (k, v) = match kv.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => match std::env::var(kv) {
            Ok(v) => (kv.to_string(), v),
            Err(_) => return Ok(None),
        },
    };
    // an empty name or a NUL cannot be passed to execve (the container's init would fail)
    if k.is_empty() || kv.contains('\0') {
        return Err(format!(
            "{whose} {kv:?}: a variable needs a name and no NUL byte"
        ));
    }
    Ok(Some((k, v)))
}

pub fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Prepare everything and write the request; the caller then spawns the monitor.
pub fn prepare(
    store: &Store,
    image: &ImageRecord,
    o: &RunOptions,
) -> anyhow::Result<(RunDir, RunRequest)> {
    let id = o.name.clone().unwrap_or_else(new_id);
    if !cw_runtime::request::valid_id(&id) {
        anyhow::bail!("run name {id:?} is not a valid run id (1-64 of letters, digits, '_', '.', '-', not starting with '.' or '-')");
    }
    let dir = runs_dir(store).join(&id);
    if dir.exists() {
        anyhow::bail!(
            "a run named {id:?} already exists ({}); remove it with `cw rm {id}`",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    let rd = RunDir::new(&dir);
    rd.write_creator()?;
    let res = (|| {
        let rf = rootfs::create(store, &id, &dir, &image.layers, o.force_copy)?;
        let mut cleanup = Cleanup::default();
        if rf.overlay {
            cleanup.unmount.push(rf.path.clone());
        }
        cleanup.remove.extend(rf.scratch.iter().cloned());
        cleanup.remove.push(rf.path.clone());
        cleanup
            .remove
            .push(store.root().join("inuse").join(format!("{id}.json")));
        let user = o.user.clone().unwrap_or_else(|| image.run.user.clone());
        let (uid, gid, extra, home) =
            rootfs::resolve_user(&rf.path, &user).map_err(anyhow::Error::msg)?;
        let hostname = o
            .hostname
            .clone()
            .unwrap_or_else(|| id.chars().take(12).collect());
        let args = command(&image.run, &o.args);
        if args.is_empty() {
            anyhow::bail!("no command given and the image has neither Entrypoint nor Cmd");
        }
        let cwd = o
            .workdir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| {
                if image.run.working_dir.is_empty() {
                    "/".into()
                } else {
                    image.run.working_dir.clone()
                }
            });
        if !cwd.starts_with('/') {
            anyhow::bail!("working directory {cwd:?} must be absolute");
        }
        // what the container's init would fail on with no path named ("failed to unix
        // syscall", "failed to prepare rootfs"): checked here, inside the rootfs, by name
        dir_in_image(&rf.path, &cwd, "working directory", false, true)?;
        for m in &o.mounts {
            dir_in_image(&rf.path, &m.destination, "mount destination", true, false)?;
        }
        let mut host_files = etc_files(&dir, &hostname, o.network)?;
        let mut env =
            environment(&image.run, &o.env, &home, &hostname).map_err(anyhow::Error::msg)?;
        if o.tty.is_some() && !env.iter().any(|e| e.starts_with("TERM=")) {
            // docker's default for a terminal; the image's Env or -e win
            env.push("TERM=xterm".into());
        }
        let mut devices = o.devices.clone();
        let mut ldconfig_dirs = vec![];
        if !o.gpus.is_empty() {
            let get = |k: &str| {
                env.iter()
                    .find_map(|e| e.strip_prefix(&format!("{k}=")))
                    .map(str::to_string)
            };
            let caps = get("NVIDIA_DRIVER_CAPABILITIES")
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| cw_runtime::gpu::DEFAULT_CAPS.into());
            let inj = cw_runtime::gpu::injection(
                &o.gpus,
                &o.driver_version,
                &caps,
                &if o.cdi_dirs.is_empty() {
                    cw_runtime::cdi::default_dirs()
                } else {
                    o.cdi_dirs.clone()
                },
            )
            .map_err(|e| anyhow::anyhow!("GPUs: {e}"))?;
            for n in &inj.notes {
                tracing::warn!("{n}");
            }
            for d in inj.devices {
                if !devices.iter().any(|x| x.path == d.path) {
                    devices.push(d);
                }
            }
            host_files.extend(inj.files);
            ldconfig_dirs = inj.ldconfig_dirs;
            let genv = inj.env;
            let ld = match get("LD_LIBRARY_PATH") {
                Some(l) if !l.is_empty() => format!("{}:{l}", cw_runtime::gpu::CONTAINER_LIB_DIR),
                _ => cw_runtime::gpu::CONTAINER_LIB_DIR.to_string(),
            };
            let path = format!(
                "{}:{}",
                get("PATH").unwrap_or_default(),
                cw_runtime::gpu::CONTAINER_BIN_DIR
            );
            env = environment(
                &RunConfig {
                    env,
                    ..Default::default()
                },
                &[
                    genv,
                    vec![format!("LD_LIBRARY_PATH={ld}"), format!("PATH={path}")],
                ]
                .concat(),
                &home,
                &hostname,
            )
            .map_err(anyhow::Error::msg)?;
        } else {
            env.push("NVIDIA_VISIBLE_DEVICES=void".into());
        }
        let mounted: Vec<&str> = o
            .mounts
            .iter()
            .map(|m| m.destination.as_str())
            .chain(host_files.iter().map(|m| m.destination.as_str()))
            .collect();
        let image_name = image
            .names
            .first()
            .cloned()
            .unwrap_or_else(|| image.manifest.short().to_string());
        check_executable(&rf.path, &args[0], &env, &cwd, &mounted, &image_name)?;
        Ok(RunRequest {
            id: id.clone(),
            rootfs: rf.path.clone(),
            readonly_rootfs: o.readonly_rootfs,
            env,
            args,
            cwd,
            uid,
            gid,
            additional_gids: extra,
            hostname,
            mounts: o.mounts.clone(),
            limits: o.limits.clone(),
            network: o.network,
            time_limit: o.time_limit,
            kill_grace_secs: o.kill_grace_secs,
            stdout: o.stdout.clone(),
            stderr: o.stderr.clone(),
            cgroup_parent: o.cgroup_parent.clone(),
            devices,
            host_files,
            ldconfig_dirs,
            cleanup,
            stdin: o.stdin && o.tty.is_none(),
            tty: o.tty,
        })
    })();
    match res {
        Ok(req) => {
            rd.write_request(&req)?;
            Ok((rd, req))
        }
        Err(e) => {
            // nothing may be left behind: unmount and remove what was made
            release_abandoned(store, &id, &rd);
            Err(e)
        }
    }
}

/// A command that cannot run: docker's exit codes, 127 for not found and 126 for not
/// executable, with a message naming the command and the image.
#[derive(Debug)]
pub struct ExecError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for ExecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ExecError {}

/// What `path` in the image is, symlinks followed inside the rootfs (at most 40): None when it
/// does not exist.
fn stat_in_image(rootfs: &Path, path: &str) -> std::io::Result<Option<libc::stat>> {
    use crate::store::unpack::{clean_components, lstatat, Tree};
    let mut t = Tree::open(rootfs)?;
    let mut p = path.to_string();
    for _ in 0..40 {
        let comps = clean_components(p.as_bytes());
        let Some((name, parent)) = comps.split_last() else {
            return Ok(None);
        };
        let dir = match t.resolve_dir(parent, false) {
            Ok(d) => d,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        use std::os::fd::AsRawFd;
        let Some(st) = lstatat(dir.as_raw_fd(), name)? else {
            return Ok(None);
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Ok(Some(st));
        }
        let target = cw_runtime::fsx::readlinkat(dir.as_raw_fd(), name)?;
        let target = String::from_utf8_lossy(&target).into_owned();
        p = if target.starts_with('/') {
            target
        } else {
            let parent: Vec<String> = parent
                .iter()
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            format!("/{}/{target}", parent.join("/"))
        };
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

/// As docker does at create: the command must exist in the image (for a bare name, in a
/// directory of the run's PATH) and be executable. Paths under a bind mount cannot be told
/// before the start and are let through.
pub fn check_executable(
    rootfs: &Path,
    cmd: &str,
    env: &[String],
    cwd: &str,
    mounted: &[&str],
    image: &str,
) -> anyhow::Result<()> {
    let under_mount = |p: &str| {
        mounted.iter().any(|m| {
            let m = m.trim_end_matches('/');
            p == m || p.starts_with(&format!("{m}/"))
        })
    };
    let candidates: Vec<String> = if cmd.contains('/') {
        vec![if cmd.starts_with('/') {
            cmd.to_string()
        } else {
            format!("{}/{cmd}", cwd.trim_end_matches('/'))
        }]
    } else {
        let path = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        path.split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{}/{cmd}", d.trim_end_matches('/')))
            .collect()
    };
    let mut not_executable = None;
    for c in &candidates {
        if under_mount(c) {
            return Ok(());
        }
        match stat_in_image(rootfs, c)? {
            Some(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_mode & 0o111 != 0 => {
                return Ok(())
            }
            Some(_) => {
                not_executable.get_or_insert_with(|| c.clone());
            }
            None => {}
        }
    }
    Err(match not_executable {
        Some(c) => ExecError {
            code: 126,
            message: format!(
                "{cmd}: {c} in image {image} cannot be executed (not an executable file)"
            ),
        },
        None if cmd.contains('/') => ExecError {
            code: 127,
            message: format!("{cmd}: no such file in image {image}"),
        },
        None => ExecError {
            code: 127,
            message: format!("{cmd}: not found in the PATH of image {image}"),
        },
    }
    .into())
}

/// `path` (or with `parent_only` its parent) is a directory in the image, or does not exist yet
/// (with `create` it is made now, as docker makes a missing working directory; else it is made
/// at the start); through a file or a device, it is an error that names it.
fn dir_in_image(
    rootfs: &Path,
    path: &str,
    what: &str,
    parent_only: bool,
    create: bool,
) -> anyhow::Result<()> {
    let comps = crate::store::unpack::clean_components(path.as_bytes());
    let comps = if parent_only {
        &comps[..comps.len().saturating_sub(1)]
    } else {
        &comps[..]
    };
    let mut t = crate::store::unpack::Tree::open(rootfs)?;
    match t.resolve_dir(comps, create) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            anyhow::bail!("{what} {path}: the image has a file where it needs a directory")
        }
        Err(e) => anyhow::bail!("{what} {path}: {e}"),
    }
}

/// /etc/hostname, /etc/hosts and /etc/resolv.conf for the run, bind-mounted read-only.
fn etc_files(dir: &Path, hostname: &str, net: Network) -> anyhow::Result<Vec<BindMount>> {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(etc.join("hostname"), format!("{hostname}\n"))?;
    std::fs::write(etc.join("hosts"), format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"))?;
    let resolv = match net {
        Network::Host | Network::Private => {
            std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
        }
        Network::None => String::new(),
    };
    std::fs::write(etc.join("resolv.conf"), resolv)?;
    Ok(["hostname", "hosts", "resolv.conf"]
        .iter()
        .map(|f| BindMount {
            source: etc.join(f),
            destination: format!("/etc/{f}"),
            readonly: true,
        })
        .collect())
}

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
    for (id, rd) in list(store) {
        if rd.abandoned() {
            tracing::warn!("run {id}: the cw that prepared it died before it started; its mount and directory were released");
            release_abandoned(store, &id, &rd);
            continue;
        }
        if rd.monitor_pid().is_some() || !rd.monitor_started() || rd.cleaned() {
            continue;
        }
        match rd.recover() {
            Ok(()) => tracing::warn!("run {id}: its monitor had died; its container was stopped and its mounts and cgroups released"),
            Err(e) => tracing::warn!("run {id}: its monitor had died; cleaning up: {e}"),
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
fn release_abandoned(store: &Store, id: &str, rd: &RunDir) {
    let rootfs = rd.path.join("rootfs");
    if let Err(e) = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH) {
        if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
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

    #[test]
    fn command_rules() {
        let cfg = RunConfig {
            cmd: vec!["/bin/sh".into()],
            ..Default::default()
        };
        assert_eq!(command(&cfg, &[]), vec!["/bin/sh"]);
        assert_eq!(command(&cfg, &["true".into()]), vec!["true"]);
        assert_eq!(
            command(&cfg, &["echo hi".into()]),
            vec!["/bin/sh", "-c", "echo hi"]
        );
        assert_eq!(command(&cfg, &["ls".into(), "-l".into()]), vec!["ls", "-l"]);
        let ep = RunConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["x".into()],
            ..Default::default()
        };
        assert_eq!(command(&ep, &[]), vec!["/ep", "x"]);
        assert_eq!(command(&ep, &["y".into()]), vec!["/ep", "y"]);
    }

    #[test]
    fn env_precedence() {
        let cfg = RunConfig {
            env: vec!["PATH=/img".into(), "A=1".into()],
            ..Default::default()
        };
        let e = environment(&cfg, &["A=2".into(), "B=3".into()], "/root", "h").unwrap();
        assert!(e.contains(&"PATH=/img".to_string()));
        assert!(e.contains(&"A=2".to_string()) && !e.contains(&"A=1".to_string()));
        assert!(e.contains(&"HOME=/root".to_string()) && e.contains(&"B=3".to_string()));
    }

    #[test]
    fn env_names_must_be_nonempty_and_nul_free() {
        let cfg = RunConfig::default();
        let e = environment(&cfg, &["=x".into()], "/", "h").unwrap_err();
        assert!(e.contains("\"=x\"") && e.contains("needs a name"), "{e}");
        assert!(environment(&cfg, &["A=a\0b".into()], "/", "h").is_err());
        let bad = RunConfig {
            env: vec!["=y".into()],
            ..Default::default()
        };
        let e = environment(&bad, &[], "/", "h").unwrap_err();
        assert!(e.contains("the image's Env entry"), "{e}");
    }

    #[test]
    fn volumes() {
        assert!(parse_volume("/tmp:/x:ro").unwrap().readonly);
        assert!(parse_volume("/tmp:x").is_err());
        assert!(parse_volume("/nonexistent-cw:/x").is_err());
        assert!(parse_volume("/tmp:/x:bad").is_err());
    }
}
