//! What a bundle gets (cl-worker's container contract): the command under bash in its bundle
//! directory, dependencies read-only, the limits, its CPUs and GPUs, the network it asked for.

use super::files;
use super::Ctx;
use crate::store::ImageRecord;
use cw_runtime::request::{BindMount, Limits, Network};
use cw_runtime::rundir::RunDir;
use std::path::PathBuf;

use super::record::Run;

/// Where a dependency with an absolute key goes in the container: the key, normalised; not the
/// root and not inside the kernel's own trees (/proc, /sys, /dev).
pub(super) fn absolute_dependency_path(child: &str) -> Result<String, String> {
    let c = files::normalize(child)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("dependency path {child:?} is not a path in the container"))?;
    if matches!(c[0].as_str(), "proc" | "sys" | "dev") {
        return Err(format!(
            "dependency path {child:?} would cover the container's /{}",
            c[0]
        ));
    }
    Ok(format!("/{}", c.join("/")))
}

/// A dependency's child path as given by the server, checked: relative, no `..`, not empty
/// (`.` means "each top-level entry").
pub(super) fn child_components(child: &str) -> Result<Vec<String>, String> {
    if child == "." {
        return Ok(vec![]);
    }
    let c = files::normalize(child)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| format!("dependency path {child:?} is not a path inside the bundle"))?;
    Ok(c)
}

/// The container contract (spec §8): `/bin/bash -c "( cmd ) >stdout 2>stderr"` in `/<uuid>`
/// (rw bind of the bundle dir, HOME there), dependencies read-only under `/<uuid>_dependencies`
/// with symlinks from the bundle dir, CODALAB=true, memory limit, assigned cpuset and GPUs,
/// shm size, no network unless asked for.
pub(super) fn start_container(
    ctx: &Ctx,
    run: &Run,
    image: &ImageRecord,
    deps: &[(String, PathBuf)],
    gpus: Vec<cw_runtime::gpu::Gpu>,
) -> Result<(String, Vec<PathBuf>), String> {
    let uuid = run.uuid();
    let bp = &run.bundle_path;
    std::fs::create_dir_all(bp).map_err(|e| format!("creating {}: {e}", bp.display()))?;
    let bp = std::fs::canonicalize(bp).map_err(|e| format!("{}: {e}", bp.display()))?;
    let mut mounts = vec![BindMount {
        source: bp.clone(),
        destination: format!("/{uuid}"),
        readonly: false,
    }];
    let mut to_remove: Vec<PathBuf> = vec![];
    let bundle_dir = std::fs::File::open(&bp).map_err(|e| format!("{}: {e}", bp.display()))?;
    for (child, src) in deps {
        if child.starts_with('/') && !ctx.shared_fs {
            // an absolute key names a path in the container, as cl-worker's
            // os.path.join("/<uuid>_dependencies", key) does: mounted there, read-only; nothing
            // is made on the host (cl-worker would make its symlink at that host path)
            mounts.push(BindMount {
                source: src.clone(),
                destination: absolute_dependency_path(child)?,
                readonly: true,
            });
            continue;
        }
        let entries: Vec<(Vec<String>, PathBuf)> = if child == "." {
            std::fs::read_dir(src)
                .map_err(|e| format!("dependency {}: {e}", src.display()))?
                .flatten()
                .map(|e| (vec![e.file_name().to_string_lossy().into_owned()], e.path()))
                .collect()
        } else {
            vec![(child_components(child)?, src.clone())]
        };
        for (comps, src) in entries {
            let rel = comps.join("/");
            if ctx.shared_fs {
                mounts.push(BindMount {
                    source: src,
                    destination: format!("/{uuid}/{rel}"),
                    readonly: true,
                });
                to_remove.push(bp.join(&comps[0]));
                continue;
            }
            let target = format!("/{uuid}_dependencies/{rel}");
            mounts.push(BindMount {
                source: src,
                destination: target.clone(),
                readonly: true,
            });
            // the symlink <bundle>/<child> → /<uuid>_dependencies/<child>: made through fds,
            // parents created, nothing followed (the directory may hold a previous attempt's files)
            let (name, parents) = comps.split_last().unwrap();
            let parent = if parents.is_empty() {
                bundle_dir.try_clone().map_err(|e| e.to_string())?.into()
            } else {
                let mut tree = crate::store::unpack::Tree::open(&bp).map_err(|e| e.to_string())?;
                let p: Vec<&[u8]> = parents.iter().map(|s| s.as_bytes()).collect();
                tree.resolve_dir(&p, true)
                    .map_err(|e| format!("{}: {e}", parents.join("/")))?
            };
            use std::os::fd::AsRawFd;
            let _ = cw_runtime::fsx::remove_all_at(parent.as_raw_fd(), name.as_bytes());
            nix::unistd::symlinkat(target.as_str(), Some(parent.as_raw_fd()), name.as_str())
                .map_err(|e| format!("linking {rel}: {e}"))?;
            to_remove.push(bp.join(&comps[0]));
        }
    }
    let mut cmd = run.bundle.command.trim_end().to_string();
    if !cmd.ends_with(';') {
        cmd.push(';');
    }
    let mut img = image.clone();
    img.run.entrypoint.clear();
    let name = format!("codalab_run_{uuid}");
    if !cw_runtime::request::valid_id(&name) {
        return Err(format!("bundle uuid {uuid:?} cannot name a run"));
    }
    // a previous attempt's run directory (worker restarted before cleaning up): remove it
    let old = RunDir::new(crate::run::runs_dir(&ctx.store).join(&name));
    if old.path.exists() {
        let _ = old.kill();
        let _ = crate::run::remove(&ctx.store, &old);
    }
    let mut env = vec![format!("HOME=/{uuid}"), "CODALAB=true".to_string()];
    if !gpus.is_empty() {
        env.push(format!(
            "NVIDIA_VISIBLE_DEVICES={}",
            gpus.iter()
                .map(|g| g.uuid.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    let opts = crate::run::RunOptions {
        name: Some(name.clone()),
        args: vec![
            "/bin/bash".into(),
            "-c".into(),
            format!("( {cmd} ) >stdout 2>stderr"),
        ],
        env,
        mounts,
        workdir: Some(format!("/{uuid}")),
        // the worker's own ids, as cl-worker runs bundles; without root the run's user namespace
        // maps root to them (its only id), so its files on the host are the worker's all the same
        user: Some(if cw_runtime::userns::needed() {
            "0:0".to_string()
        } else {
            format!("{}:{}", nix::unistd::getuid(), nix::unistd::getgid())
        }),
        limits: Limits {
            memory: (run.resources.memory > 0).then_some(run.resources.memory),
            // docker's default, so cl-worker's: memory+swap = 2 × memory
            memory_swap: None,
            cpus: None,
            cpuset: Some(
                run.cpuset
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .filter(|s| !s.is_empty()),
            pids: Some(cw_runtime::request::DEFAULT_PIDS_LIMIT),
            shm_size: ctx.shm_size,
            // a worker without root and without a cgroup it may write still holds its bundles
            // to their memory (sampled) and CPUs (affinity); it said so as it started
            without_cgroup_ok: true,
        },
        network: match (run.resources.network, ctx.private_network) {
            (false, _) => Network::None,
            (true, true) => Network::Private,
            (true, false) => Network::Host,
        },
        // the monitor enforces the time limit too, so it holds while the worker is down
        time_limit: (run.resources.time > 0).then_some(run.resources.time + 1),
        kill_grace_secs: 1,
        cgroup_parent: ctx.cgroup_parent.clone(),
        gpus,
        driver_version: ctx.driver_version.clone(),
        cdi_dirs: ctx.args.cdi_spec_dirs.clone(),
        // the rest as docker's defaults: a writable overlay rootfs, no extra devices, and no
        // terminal or stdin (CodaLab's netcat and reads work on the bundle's files); the
        // container's stdout/stderr go to the run dir (below)
        ..Default::default()
    };
    let (rd, mut req) =
        crate::run::prepare(&ctx.store, &img, &opts).map_err(|e| format!("{e:#}"))?;
    req.stdout = Some(rd.path.join("container.out"));
    req.stderr = Some(rd.path.join("container.err"));
    rd.write_request(&req).map_err(|e| e.to_string())?;
    let meta = serde_json::json!({"image": run.resources.docker_image, "manifest": image.manifest, "created": crate::store::now(), "codalab_bundle": uuid});
    let _ = crate::store::replace_file(&rd.path.join("meta.json"), meta.to_string().as_bytes());
    let child = cw_runtime::launch::spawn(
        &ctx.exe,
        &rd.path,
        std::process::Stdio::null(),
        std::process::Stdio::null(),
        std::process::Stdio::null(),
        &[],
    )
    .map_err(|e| format!("starting the monitor: {e}"))?;
    let wake = ctx.wake_runs.clone();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
        wake.notify_one();
    });
    Ok((name, to_remove))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_dependency_keys_name_container_paths() {
        assert_eq!(absolute_dependency_path("/foo/bar").unwrap(), "/foo/bar");
        assert_eq!(
            absolute_dependency_path("/foo/./x/../bar/").unwrap(),
            "/foo/bar"
        );
        assert!(absolute_dependency_path("/").is_err());
        assert!(absolute_dependency_path("/../..").is_err());
        assert!(absolute_dependency_path("/proc/self").is_err());
        assert!(absolute_dependency_path("/dev").is_err());
        assert_eq!(absolute_dependency_path("/devices").unwrap(), "/devices");
    }

    #[test]
    fn child_paths() {
        assert_eq!(child_components("a/b").unwrap(), vec!["a", "b"]);
        assert!(child_components("../x").is_err());
        assert!(child_components("").is_err());
        assert_eq!(child_components(".").unwrap(), Vec::<String>::new());
        assert_eq!(child_components("/abs").unwrap(), vec!["abs"]);
    }
}
