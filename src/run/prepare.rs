//! A run's preparation: the image's user, working dir and command checked against its rootfs,
//! the overlay mounted, /etc files written, and the request the monitor reads.

use super::manage::release_abandoned;
use super::{command, environment, new_id, runs_dir, RunOptions};
use crate::image::manifest::RunConfig;
use crate::image_view::View;
use crate::rootfs;
use crate::store::{ImageRecord, Store};
use cw_runtime::request::{BindMount, Cleanup, Network, RunRequest};
use cw_runtime::rundir::RunDir;
use std::path::{Path, PathBuf};

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
    let dir = create_run_dir(&runs_dir(store), &id)?;
    let rd = RunDir::new(&dir);
    let res = (|| {
        let rf = rootfs::create(store, &id, &dir, &image.layers, o.force_copy)?;
        let view = rf.view();
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
            rootfs::resolve_user(&view, &user).map_err(anyhow::Error::msg)?;
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
        dir_in_image(&view, &cwd, "working directory", false, true)?;
        for m in &o.mounts {
            dir_in_image(&view, &m.destination, "mount destination", true, false)?;
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
        check_executable(&view, &args[0], &env, &cwd, &mounted, &image_name)?;
        Ok(RunRequest {
            id: id.clone(),
            rootfs: rf.path.clone(),
            overlay: rf.deferred.clone(),
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
            exit_pipe: None,
            net_ns: None,
            remove_when_done: false,
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

/// As docker does at create: the command must exist in the image (for a bare name, in a
/// directory of the run's PATH) and be executable. Paths under a bind mount cannot be told
/// before the start and are let through.
pub fn check_executable(
    rootfs: &View,
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
        match rootfs.stat(c)? {
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
    view: &View,
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
    match view.dir(comps, create) {
        Ok(_) => Ok(()),
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

/// Make `runs/<id>` with its `creator` record already in it: made as `runs/.new-…` (not a run
/// id, so no other cw lists it), then renamed into place without replacing anything. Another
/// cw's [`super::recover_lost`] must never see the directory without its creator (it would take
/// it for one whose cw died and release it: seen with 50 `cw run -d` at once), and of two runs
/// given the same name at once only one may get it.
fn create_run_dir(runs: &Path, id: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(runs)?;
    let dir = runs.join(id);
    let exists = || {
        anyhow::anyhow!(
            "a run named {id:?} already exists ({}); remove it with `cw rm {id}`",
            dir.display()
        )
    };
    // the run of that name that has just ended, still being torn down by its monitor
    if dir.exists() && RunDir::new(&dir).settle(super::manage::SETTLE_WITHIN) && dir.exists() {
        return Err(exists());
    }
    let tmp = runs.join(format!(".new-{id}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir(&tmp)?;
    let placed = RunDir::new(&tmp).write_creator().and_then(|_| {
        nix::fcntl::renameat2(
            None,
            &tmp,
            None,
            &dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(std::io::Error::from)
    });
    match placed {
        Ok(()) => Ok(dir),
        Err(e) => {
            let _ = std::fs::remove_file(tmp.join("creator"));
            let _ = std::fs::remove_dir(&tmp);
            if e.raw_os_error() == Some(libc::EEXIST) {
                Err(exists())
            } else {
                Err(anyhow::anyhow!("creating {}: {e}", dir.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_run_dir_is_never_seen_without_its_creator_and_a_name_is_taken_once() {
        let d = tempfile::tempdir().unwrap();
        let runs = d.path().join("runs");
        std::fs::create_dir_all(&runs).unwrap();
        // another cw's recover_lost, listing as fast as it can: a run dir it sees must already
        // say who is preparing it
        let stop = Arc::new(AtomicBool::new(false));
        let (r2, s2) = (runs.clone(), stop.clone());
        let watcher = std::thread::spawn(move || {
            let mut bare = 0;
            while !s2.load(Ordering::Relaxed) {
                for e in std::fs::read_dir(&r2).unwrap().flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if cw_runtime::request::valid_id(&name)
                        && e.path().is_dir()
                        && !e.path().join("creator").exists()
                        && e.path().exists()
                    {
                        bare += 1;
                    }
                }
            }
            bare
        });
        for i in 0..300 {
            let id = format!("r{i}");
            let dir = create_run_dir(&runs, &id).unwrap();
            assert!(RunDir::new(&dir).being_prepared());
            let again = create_run_dir(&runs, &id).unwrap_err().to_string();
            assert!(again.contains("already exists"), "{again}");
            // gone the way `cw rm` must not be seen either: out of the listing first
            let gone = runs.join(format!(".gone-{i}"));
            std::fs::rename(&dir, &gone).unwrap();
            std::fs::remove_file(gone.join("creator")).unwrap();
            std::fs::remove_dir(&gone).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert_eq!(
            watcher.join().unwrap(),
            0,
            "run dirs seen without a creator"
        );
        // nothing but the runs themselves was left
        assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 0);
    }
}
