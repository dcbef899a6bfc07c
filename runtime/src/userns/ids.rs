//! The ids a user's namespaces map: the user's subordinate ids (shadow's `getsubids`, else
//! /etc/subuid and /etc/subgid), the setuid helpers that map them (newuidmap, newgidmap), the
//! namespace of those ids a user's cw enters first ([`enter_subordinate`]), and what this
//! process's own maps hold.

use super::{enters_subordinate, inside};
use crate::error::{Error, Result};
use nix::sched::{unshare, CloneFlags};
use std::fs;

/// A user's range of subordinate ids (a line `name-or-uid:start:count` of /etc/subuid or
/// /etc/subgid, as `useradd` and `usermod --add-subuids` write them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRange {
    pub start: u32,
    pub count: u32,
}

/// The first range in `text` (/etc/subuid's format) for the user named `name` or numbered `id`.
/// Malformed lines are skipped, as shadow's own tools skip them; a range that would pass 2^32-1
/// or that holds the host's root is no range.
pub fn parse_subids(text: &str, name: Option<&str>, id: u32) -> Option<SubRange> {
    let id = id.to_string();
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        if f.next().is_some() || !(Some(who) == name || who == id) {
            return None;
        }
        let (start, count) = (start.parse::<u32>().ok()?, count.parse::<u32>().ok()?);
        (start > 0 && count > 0 && start.checked_add(count).is_some())
            .then_some(SubRange { start, count })
    })
}

/// Where the setuid helpers are (PATH, then /usr/bin).
fn helper_path(name: &str) -> Option<std::path::PathBuf> {
    crate::net::find_program(name, &["/usr/bin"])
}

/// The first range in `getsubids`'s output (`0: alice 100000 65536`).
pub fn parse_getsubids(out: &str) -> Option<SubRange> {
    let f: Vec<&str> = out.lines().next()?.split_whitespace().collect();
    let [_, _, start, count] = f[..] else {
        return None;
    };
    let (start, count) = (start.parse::<u32>().ok()?, count.parse::<u32>().ok()?);
    (start > 0 && count > 0 && start.checked_add(count).is_some())
        .then_some(SubRange { start, count })
}

/// This user's subordinate ids and the helpers that map them, or why a run gets a single-id
/// mapping instead. Asked of shadow's `getsubids` where it is installed (libsubid: the sources
/// /etc/nsswitch.conf names for `subid`, e.g. a site's directory through sssd, which newuidmap
/// itself checks), else read from /etc/subuid and /etc/subgid.
pub fn subordinate_ids(
) -> std::result::Result<(SubRange, SubRange, [std::path::PathBuf; 2]), String> {
    let uid = nix::unistd::getuid();
    let Some(name) = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
    else {
        return Err(format!(
            "uid {uid} has no name in the user database, which newuidmap needs"
        ));
    };
    let (u, g) = match helper_path("getsubids") {
        Some(gs) => {
            let ask = |flag: Option<&str>| {
                std::process::Command::new(&gs)
                    .args(flag)
                    .arg(&name)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .and_then(|o| parse_getsubids(&String::from_utf8_lossy(&o.stdout)))
            };
            let u = ask(None)
                .ok_or_else(|| format!("no subordinate uids for {name} (getsubids {name})"))?;
            let g = ask(Some("-g"))
                .ok_or_else(|| format!("no subordinate gids for {name} (getsubids -g {name})"))?;
            (u, g)
        }
        None => {
            let read = |f: &str| fs::read_to_string(f).unwrap_or_default();
            let u = parse_subids(&read("/etc/subuid"), Some(&name), uid.as_raw())
                .ok_or_else(|| format!("no subordinate uids for {name} in /etc/subuid"))?;
            let g = parse_subids(&read("/etc/subgid"), Some(&name), uid.as_raw())
                .ok_or_else(|| format!("no subordinate gids for {name} in /etc/subgid"))?;
            (u, g)
        }
    };
    let nu = helper_path("newuidmap")
        .ok_or("newuidmap is not installed (Debian/Ubuntu package uidmap)")?;
    let ng = helper_path("newgidmap")
        .ok_or("newgidmap is not installed (Debian/Ubuntu package uidmap)")?;
    Ok((u, g, [nu, ng]))
}

/// unshare(CLONE_NEWUSER), the new namespace's maps written by a child forked before it: the
/// child stays in the namespace we leave, where writing maps of more than one id is allowed
/// (newuidmap's setuid, or CAP_SETUID there). `write` runs in that child with our pid. The
/// caller must be single-threaded.
pub(super) fn unshare_mapped_by_helper(
    write: impl FnOnce(i32) -> std::result::Result<(), String>,
) -> Result<()> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let me = std::process::id() as i32;
    let host = |e: nix::errno::Errno| Error::Host(format!("starting the id-mapping helper: {e}"));
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(host)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(host)?;
    match unsafe { nix::unistd::fork() }.map_err(host)? {
        nix::unistd::ForkResult::Child => {
            drop(go_w);
            drop(err_r);
            let mut b = [0u8; 1];
            let n = unsafe { libc::read(go_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            let code = if n != 1 {
                1
            } else if let Err(m) = write(me) {
                let _ = nix::unistd::write(&err_w, m.as_bytes());
                1
            } else {
                0
            };
            unsafe { libc::_exit(code) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(go_r);
            drop(err_w);
            let un = unshare(CloneFlags::CLONE_NEWUSER);
            if un.is_ok() {
                let _ = nix::unistd::write(&go_w, b"g");
            }
            drop(go_w);
            let mut msg = String::new();
            let _ = fs::File::from(err_r).read_to_string(&mut msg);
            let st = nix::sys::wait::waitpid(child, None);
            un.map_err(|e| {
                Error::Host(format!(
                    "creating a user namespace for a run without root: {e} (the kernel must allow unprivileged user namespaces: user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor's restrict_unprivileged_userns)"
                ))
            })?;
            match st {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
                st => Err(Error::Host(format!(
                    "mapping the user namespace's ids failed ({st:?}): {}",
                    msg.trim()
                ))),
            }
        }
    }
}

/// For a user with subordinate ids (and newuidmap/newgidmap): move this process into a user
/// namespace where 0 is the user and 1..=N their subordinate ids, as rootless podman does. Run
/// first thing by the cw commands that write or remove the store's trees or start runs, so that
/// layers keep the image's owners (subordinate ids on the host) and the trees can be removed
/// again; the monitors they start nest each run's namespace inside it with the same ids. Does
/// nothing as root, inside a namespace already, or without subordinate ids (then every run has
/// a single-id mapping); says which at `--log info`. Must be called before any thread exists.
pub fn enter_subordinate() -> Result<()> {
    if !enters_subordinate() {
        return Ok(());
    }
    let (u, g, [nu, ng]) = match subordinate_ids() {
        Ok(x) => x,
        Err(why) => {
            tracing::info!(
                "user namespace: single-id mapping (the image's files and processes all belong to root inside, which is you): {why}"
            );
            return Ok(());
        }
    };
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    let run = move |me: i32| -> std::result::Result<(), String> {
        for (tool, id, r) in [(&nu, uid.as_raw(), u), (&ng, gid.as_raw(), g)] {
            let out = std::process::Command::new(tool)
                .args([me, 0, id as i32, 1, 1].map(|x| x.to_string()))
                .args([r.start.to_string(), r.count.to_string()])
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("{}: {e}", tool.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} ({}): {}",
                    tool.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    };
    unshare_mapped_by_helper(run).map_err(|e| {
        e.context(format!(
            "entering the user namespace of uid {uid}'s subordinate ids (/etc/subuid {}:{}, /etc/subgid {}:{})",
            u.start, u.count, g.start, g.count
        ))
    })?;
    tracing::info!(
        "user namespace: root inside is you (uid {uid}, gid {gid}); ids 1-{} are your subordinate uids {}-{} and gids {}-{}",
        u.count.min(g.count),
        u.start,
        u.start as u64 + u.count as u64 - 1,
        g.start,
        g.start as u64 + g.count as u64 - 1
    );
    Ok(())
}

/// The ranges of ids this process's user namespace has, as (first id inside, count), from
/// `/proc/self/{uid,gid}_map`.
pub(super) fn own_ranges(which: &str) -> Vec<(u32, u32)> {
    fs::read_to_string(format!("/proc/self/{which}_map"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<u32> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.len() == 3).then(|| (f[0], f[2]))
        })
        .collect()
}

/// How many ids from 0 up this process's namespace maps without a gap (1 in a single-id one).
pub(super) fn contiguous(ranges: &[(u32, u32)]) -> u32 {
    let mut r = ranges.to_vec();
    r.sort();
    let mut n: u32 = 0;
    for (first, count) in r {
        if first != n {
            break;
        }
        n = n.saturating_add(count);
    }
    n
}

/// What a user's runs are, for a report: "root is this user and the only id" or the subordinate
/// ids they have.
pub fn describe() -> String {
    let (u, g) = (own_ranges("uid"), own_ranges("gid"));
    let (nu, ng) = (contiguous(&u), contiguous(&g));
    if inside() && nu > 1 {
        format!(
            "root is this user, and ids 1-{} its subordinate ids",
            nu.min(ng) - 1
        )
    } else {
        format!(
            "root is this user ({}:{}) and the only id",
            nix::unistd::getuid(),
            nix::unistd::getgid()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ids_are_found_by_name_or_uid_and_bad_lines_are_no_range() {
        let t = "# comment\nalice:100000:65536\n1001:165536:65536\nbob:x:1\ncarol:0:65536\n\
                 dave:4294967295:2\neve:200000:0\nalice:300000:10\n";
        let r = |start, count| Some(SubRange { start, count });
        // the first line for the name wins
        assert_eq!(parse_subids(t, Some("alice"), 1000), r(100000, 65536));
        // a numeric line for a user whose name is elsewhere
        assert_eq!(parse_subids(t, Some("frank"), 1001), r(165536, 65536));
        assert_eq!(parse_subids(t, None, 1001), r(165536, 65536));
        // not a number; a range holding the host's root; past 2^32-1; empty
        for who in ["bob", "carol", "dave", "eve"] {
            assert_eq!(parse_subids(t, Some(who), 4242), None, "{who}");
        }
        assert_eq!(parse_subids(t, Some("zed"), 1000), None);
    }

    #[test]
    fn getsubids_output_gives_the_first_range() {
        let r = parse_getsubids("0: alice 100000 65536\n1: alice 300000 10\n");
        assert_eq!(
            r,
            Some(SubRange {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(parse_getsubids(""), None);
        assert_eq!(parse_getsubids("0: alice 0 65536\n"), None);
        assert_eq!(parse_getsubids("Error fetching ranges\n"), None);
    }

    #[test]
    fn a_namespace_counts_its_ids_from_zero_up_to_the_first_gap() {
        assert_eq!(contiguous(&[(0, 1)]), 1);
        assert_eq!(contiguous(&[(1, 65536), (0, 1)]), 65537);
        assert_eq!(contiguous(&[(0, 1), (2, 10)]), 1);
        assert_eq!(contiguous(&[(5, 10)]), 0);
        assert_eq!(contiguous(&[(0, 4294967295)]), 4294967295);
    }
}
