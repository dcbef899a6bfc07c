//! `cw run`: options to a run request, the monitor started, and the foreground part
//! (a terminal's relay, docker's sig-proxy, the exit code).

use super::{auto_gc, platform, Ctx};
use anyhow::{bail, Context, Result};
use clap::Args;
use cw::config;
use cw::image::reference::Reference;
use cw::progress::Progress;
use cw::pull::{self, PullOptions};
use cw::registry::Client;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Image to run (pulled if missing, see --pull); without --image, the first argument is the
    /// image (docker's `run IMAGE CMD`)
    #[arg(long)]
    pub(crate) image: Option<String>,
    /// Connect stdin to the container
    #[arg(short, long)]
    pub(crate) interactive: bool,
    /// Give the container a terminal (with -i: an interactive shell)
    #[arg(short, long)]
    pub(crate) tty: bool,
    /// Keys that detach from a run's terminal, leaving it running (`cw attach` comes back)
    #[arg(long, default_value = "ctrl-p,ctrl-q")]
    pub(crate) detach_keys: String,
    /// Pass SIGINT, SIGTERM and SIGHUP sent to cw on to the container (a second SIGINT kills it)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) sig_proxy: bool,
    /// Environment variable NAME=VALUE (NAME alone copies it from here); repeatable
    #[arg(short = 'e', long = "env")]
    pub(crate) env: Vec<String>,
    /// Bind mount SRC:DST[:ro|rw]; repeatable
    #[arg(short = 'v', long = "volume")]
    pub(crate) volume: Vec<String>,
    /// Working directory inside the container [default: the image's, else /]
    #[arg(short = 'w', long)]
    pub(crate) workdir: Option<String>,
    /// UID[:GID] or NAME[:GROUP] from the image's /etc/passwd [default: the image's user]
    #[arg(short = 'u', long)]
    pub(crate) user: Option<String>,
    /// Memory limit, e.g. 512m, 2g
    #[arg(short = 'm', long)]
    pub(crate) memory: Option<String>,
    /// Memory plus swap (docker's --memory-swap): default twice --memory; equal to it for no
    /// swap; -1 for unlimited swap
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) memory_swap: Option<String>,
    /// CPU quota in CPUs, e.g. 1.5
    #[arg(long)]
    pub(crate) cpus: Option<f64>,
    /// CPUs the run may use, e.g. 0-3,7
    #[arg(long)]
    pub(crate) cpuset: Option<String>,
    /// Maximum number of processes and threads (0 or -1: no limit)
    #[arg(long, default_value_t = cw_runtime::request::DEFAULT_PIDS_LIMIT, allow_negative_numbers = true)]
    pub(crate) pids_limit: i64,
    /// Size of /dev/shm
    #[arg(long, default_value = "64m")]
    pub(crate) shm_size: String,
    /// none: a network namespace with only loopback; private: its own namespace with outbound
    /// access through pasta (no host loopback, no inbound); host: the host's network
    #[arg(long, default_value = "none", value_parser = ["none", "private", "host"])]
    pub(crate) network: String,
    /// Kill the run after this long, e.g. 30s, 30m, 2h
    #[arg(long)]
    pub(crate) time_limit: Option<String>,
    /// Time between SIGTERM and SIGKILL when a run is stopped
    #[arg(long, default_value = "10s")]
    pub(crate) stop_timeout: String,
    /// Run name (id) [default: random]
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Write the container's stdout to this file
    #[arg(long)]
    pub(crate) stdout: Option<PathBuf>,
    /// Write the container's stderr to this file
    #[arg(long)]
    pub(crate) stderr: Option<PathBuf>,
    /// Start and print the run id; output goes to files in the run directory unless given
    #[arg(short, long)]
    pub(crate) detach: bool,
    /// Keep the run directory after the run ends (cw rm removes it)
    #[arg(long)]
    pub(crate) keep: bool,
    /// When to pull the image: missing, always, never
    #[arg(long, default_value = "missing", value_parser = ["missing", "always", "never"])]
    pub(crate) pull: String,
    /// Platform os/arch[/variant] when pulling
    #[arg(long)]
    pub(crate) platform: Option<String>,
    /// cgroup under which the run's cgroup is made
    #[arg(long, default_value = "/cw")]
    pub(crate) cgroup_parent: String,
    /// Mount the root filesystem read-only
    #[arg(long)]
    pub(crate) read_only: bool,
    /// Without root and without a cgroup this user may write (cgroup v1, no delegation): run
    /// anyway, --memory enforced by sampling the run's processes every 0.5 s, --cpuset-cpus as
    /// their affinity, --cpus and --pids-limit not applied (otherwise such a run fails)
    #[arg(long, env = "CW_ALLOW_NO_CGROUP")]
    pub(crate) allow_no_cgroup: bool,
    /// Copy the layers instead of mounting overlayfs
    #[arg(long)]
    pub(crate) no_overlay: bool,
    /// GPUs: a count (N free ones), all, none, or indexes/UUIDs (0,2 or GPU-3bb1…, MIG-…)
    #[arg(long)]
    pub(crate) gpus: Option<String>,
    /// Pass a host device node through: HOST[:CONTAINER[:PERMS]] (PERMS ⊆ rwm); repeatable
    #[arg(long = "device", value_parser = parse_device_arg)]
    pub(crate) devices: Vec<cw_runtime::request::Device>,
    /// CDI spec directory for --gpus; repeatable (default: /etc/cdi, /var/run/cdi)
    #[arg(long = "cdi-spec-dir")]
    pub(crate) cdi_spec_dirs: Vec<PathBuf>,
    /// Command and arguments; one argument with spaces or shell syntax runs under /bin/sh -c
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) command: Vec<String>,
}

pub(crate) fn duration(s: &str, what: &str) -> Result<u64> {
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    humantime::parse_duration(t)
        .map(|d| d.as_secs())
        .with_context(|| format!("{what} {s:?} is not a duration like 30s, 5m, 2h"))
}

type Sealing = std::thread::JoinHandle<std::io::Result<cw_runtime::launch::SealedMonitor>>;
static EARLY: std::sync::Mutex<Option<Sealing>> = std::sync::Mutex::new(None);

/// Start what a run's critical path waits for, in threads, as `cw run` starts: the monitor's
/// sealed copy (5 MB, made while the command line is parsed, the image looked up and the rootfs
/// prepared) and the grace period of the first move between cgroups
/// ([`cw_runtime::cgroup::warm_attach`]). [`cmd_run`] takes the copy.
pub(crate) fn start_early() {
    *EARLY.lock().unwrap_or_else(|e| e.into_inner()) = Some(start());
}

fn start() -> Sealing {
    cw_runtime::cgroup::warm_attach();
    std::thread::spawn(cw_runtime::launch::SealedMonitor::new)
}

fn take_early() -> Option<Sealing> {
    EARLY.lock().unwrap_or_else(|e| e.into_inner()).take()
}

pub(crate) fn cmd_run(ctx: Ctx, mut a: RunArgs) -> Result<()> {
    if a.image.is_none() {
        if a.command.is_empty() {
            bail!("cw run needs an image: --image IMAGE, or IMAGE as the first argument");
        }
        a.image = Some(a.command.remove(0));
    }
    let image_name = a.image.clone().unwrap_or_default();
    let detach_keys = cw::attach::parse_detach_keys(&a.detach_keys).map_err(anyhow::Error::msg)?;
    if a.tty && a.interactive && !a.detach && !cw::attach::stdin_is_terminal() {
        bail!("cw run -it: stdin is not a terminal (-i alone connects a pipe or a file)");
    }
    if a.detach && a.interactive && !a.tty {
        bail!(
            "cw run -d -i needs -t: a detached run's stdin is its terminal, reached by cw attach"
        );
    }
    let a = a;
    let sealing = take_early().unwrap_or_else(start);
    let network = match a.network.as_str() {
        "host" => cw_runtime::request::Network::Host,
        "private" => cw_runtime::request::Network::Private,
        _ => cw_runtime::request::Network::None,
    };
    // as root, the run's network namespace is made here, beside the monitor's copy, and the
    // monitor joins it (creating one took 0.5 ms of the monitor's start); a user's run needs
    // one its own user namespace owns, which only its monitor can make
    let net_ns = (network != cw_runtime::request::Network::Host && !cw_runtime::userns::needed())
        .then(cw_runtime::net::make_namespace);
    let r = Reference::parse(&image_name)?;
    cw::run::recover_lost(&ctx.store);
    let image = match (a.pull.as_str(), ctx.store.lookup(&image_name)) {
        ("never", Ok(i)) => i,
        ("never", Err(e)) => return Err(e.into()),
        ("missing", Ok(i)) if ctx.store.image_complete(&i.manifest).is_some() => i,
        _ => {
            let opts = PullOptions {
                platform: platform(&a.platform)?,
                progress: Progress::auto(false),
                max_unpacked: ctx.max_image_size,
                ..Default::default()
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let client = Client::new(ctx.registry.clone());
            let res = rt.block_on(pull::pull(&client, &ctx.store, &r, &opts))?;
            drop(rt);
            auto_gc(&ctx);
            res.image
        }
    };
    ctx.store.touch(&image.manifest);
    let mounts = a
        .volume
        .iter()
        .map(|v| cw::run::parse_volume(v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let memory = a
        .memory
        .as_deref()
        .map(config::parse_size)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let memory_swap = match a.memory_swap.as_deref() {
        None => None,
        Some("-1") => Some(-1),
        Some(v) => {
            let total = config::parse_size(v).map_err(anyhow::Error::msg)?;
            match memory {
                Some(m) if total >= m => Some(total as i64),
                Some(_) => bail!("--memory-swap {v} must be at least --memory"),
                None => bail!("--memory-swap needs --memory"),
            }
        }
    };
    if let Some(c) = a.cpus {
        if !(c > 0.0 && c.is_finite()) {
            bail!("--cpus {c} must be a positive number");
        }
    }
    let opts = cw::run::RunOptions {
        name: a.name.clone(),
        args: a.command.clone(),
        env: a.env.clone(),
        mounts,
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        limits: cw_runtime::request::Limits {
            memory,
            memory_swap,
            cpus: a.cpus,
            cpuset: a.cpuset.clone(),
            pids: (a.pids_limit > 0).then_some(a.pids_limit),
            shm_size: config::parse_size(&a.shm_size).map_err(anyhow::Error::msg)?,
            without_cgroup_ok: a.allow_no_cgroup,
        },
        network,
        time_limit: a
            .time_limit
            .as_deref()
            .map(|t| duration(t, "--time-limit"))
            .transpose()?,
        kill_grace_secs: duration(&a.stop_timeout, "--stop-timeout")?,
        stdout: a.stdout.clone(),
        stderr: a.stderr.clone(),
        cgroup_parent: a.cgroup_parent.clone(),
        readonly_rootfs: a.read_only,
        force_copy: a.no_overlay,
        devices: a.devices.clone(),
        cdi_dirs: a.cdi_spec_dirs.clone(),
        stdin: a.interactive,
        tty: a.tty.then(cw::attach::our_size),
        // GPUs below, once the rest has been checked
        ..Default::default()
    };
    let mut opts = opts;
    if let Some(spec) = &a.gpus {
        let inv = cw_runtime::gpu::discover();
        let all = [inv.gpus.clone(), inv.mig_devices.clone()].concat();
        opts.gpus = cw_runtime::gpu::select(&all, &inv.gpus, spec).map_err(|e| {
            anyhow::anyhow!(
                "--gpus {spec}: {e}{}",
                inv.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            )
        })?;
        opts.driver_version = inv.driver_version.unwrap_or_default();
    }
    let (rd, mut req) = cw::run::prepare(&ctx.store, &image, &opts)?;
    let meta = serde_json::json!({"image": r.familiar(), "manifest": image.manifest, "created": cw::store::now()});
    cw::store::replace_file(&rd.path.join("meta.json"), meta.to_string().as_bytes())?;
    // in the foreground the monitor reports the run's end on a pipe before its teardown (the
    // unmount, the cgroups, the removals), and removes the run's directory after it unless
    // --keep: this process returns at the end of the run, not of its teardown. Made (and the
    // request written) while the monitor's copy may still be under way.
    let exit_pipe = if a.detach {
        if req.stdout.is_none() {
            req.stdout = Some(rd.path.join("stdout"));
        }
        if req.stderr.is_none() {
            req.stderr = Some(rd.path.join("stderr"));
        }
        None
    } else {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context("creating the run's exit pipe")?;
        req.exit_pipe = Some(w.as_raw_fd());
        req.remove_when_done = !a.keep;
        Some((r, w))
    };
    // where it could not be made, the monitor makes its own
    let net_ns = net_ns.and_then(|t| t.join().ok()?.ok());
    req.net_ns = net_ns.as_ref().map(|f| f.as_raw_fd());
    rd.write_request(&req)?;
    let exe = sealing
        .join()
        .map_err(|_| anyhow::anyhow!("the run's monitor: its copy panicked"))?
        .map_err(|e| anyhow::anyhow!("the run's monitor: {e}"))?;
    // detached: the monitor must not hold our stdout/stderr open (a `$(cw run -d …)` would hang)
    let stdio = || {
        if a.detach {
            std::process::Stdio::null()
        } else {
            std::process::Stdio::inherit()
        }
    };
    // the monitor's stdin: our end of the terminal's first client (-t), our stdin (-i), or none
    let mut client = None;
    let stdin = if a.detach {
        std::process::Stdio::null()
    } else if a.tty {
        let (ours, theirs) = cw_runtime::console::pair().context("creating a socket pair")?;
        client = Some(ours);
        std::process::Stdio::from(theirs)
    } else if a.interactive {
        std::process::Stdio::inherit()
    } else {
        std::process::Stdio::null()
    };
    let mut child = cw_runtime::launch::spawn(
        &exe,
        &rd.path,
        stdin,
        stdio(),
        stdio(),
        &exit_pipe
            .as_ref()
            .map(|(_, w)| w.as_raw_fd())
            .into_iter()
            .chain(req.net_ns)
            .collect::<Vec<_>>(),
    )
    .with_context(|| "starting the run's monitor process")?;
    drop(net_ns);
    let exit_reader = exit_pipe.map(|(r, _)| std::fs::File::from(r));
    if a.detach {
        // as `docker run -d`: back once the container has started (so what follows can rely on
        // it: `cw exec`, its cgroup's limits), or with the error that kept it from starting
        let log_tail = || {
            cw::run::last_log_error(&rd)
                .map(|l| format!("; its log ends: {l}"))
                .unwrap_or_default()
        };
        loop {
            if rd.state().and_then(|s| s.pid).is_some() {
                println!("{}", req.id);
                return Ok(());
            }
            // Lost (no live monitor by its pid file) is settled below by whether our child has
            // exited: it is ours, and a wait here would block for as long as a live one runs,
            // should its pid file ever be read in a moment it cannot be matched
            if let cw_runtime::rundir::Status::Ended(ex) = rd.status() {
                // the run stays, as every detached run does, for cw ps, logs and rm
                if let Some(msg) = cw::run::describe_exit(&ex, memory) {
                    eprintln!("cw: {msg}");
                }
                std::process::exit(ex.exit_code);
            }
            if let Ok(Some(st)) = child.try_wait() {
                if rd.exit().is_none() && rd.state().and_then(|s| s.pid).is_none() {
                    anyhow::bail!(
                        "run {}: its monitor exited ({st}) before the container started{}",
                        req.id,
                        log_tail()
                    );
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    if a.sig_proxy {
        cw::attach::proxy_signals(child.id() as i32);
    }
    // the run's start (for the signals passed on) and its end, from the monitor's pipe
    let events = exit_reader.map(cw::attach::follow);
    if let Some(sock) = client {
        let raw = a.interactive.then(cw::attach::RawMode::enter).transpose();
        let outcome = cw::attach::relay(&sock, a.interactive, detach_keys);
        drop(raw);
        if outcome? == cw::attach::Outcome::Detached {
            eprintln!(
                "cw: detached from {}; `cw attach {}` comes back",
                req.id, req.id
            );
            return Ok(());
        }
    }
    // the exit record from the monitor's pipe; without one (the monitor died before it wrote
    // it: end of file once it and the container are gone), from the run's directory
    let reported = events.and_then(|t| t.join().ok().flatten());
    let ex = match reported {
        Some(ex) => {
            // the teardown goes on after the exit record, off cw's path, where nothing kills
            // what is left of cw once it returns
            if ended_with_its_caller() {
                let _ = child.wait();
            }
            ex
        }
        None => {
            let _ = child.wait();
            let ex = rd.wait(std::time::Duration::from_millis(20))?;
            if !a.keep {
                let _ = cw::run::remove(&ctx.store, &rd);
            }
            ex
        }
    };
    if let Some(msg) = cw::run::describe_exit(&ex, memory) {
        eprintln!("cw: {msg}");
    }
    std::process::exit(ex.exit_code);
}

/// Whether what is left of `cw run` is killed as soon as it returns: a batch job's step (Slurm,
/// PBS, LSF, Flux) SIGKILLs what is left in its cgroup, and a systemd unit stops its cgroup with
/// its main process. The monitor would die in the middle of its teardown (mounts, upper dir and
/// cgroups left until the next cw, a job's cgroup that its manager cannot remove), so there `cw
/// run` returns after it; elsewhere 3-5 ms sooner here, as the teardown goes on without it.
fn ended_with_its_caller() -> bool {
    [
        "SLURM_JOB_ID",
        "PBS_JOBID",
        "LSB_JOBID",
        "FLUX_JOB_ID",
        "INVOCATION_ID",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

pub(crate) fn parse_device_arg(s: &str) -> Result<cw_runtime::request::Device, String> {
    cw::run::parse_device(s)
}
