//! The command line as a newcomer meets it: every subcommand has a description, completions and
//! the man page are generated from the same definitions.

use std::process::Command;

fn cw(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_cw"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cw {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_subcommand_is_described() {
    let help = cw(&["--help"]);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    for want in [
        "pull",
        "images",
        "rmi",
        "prune",
        "inspect",
        "gpus",
        "run",
        "ps",
        "kill",
        "rm",
        "stats",
        "load",
        "worker",
        "completions",
        "man",
    ] {
        let line = commands
            .iter()
            .find(|l| l.split_whitespace().next() == Some(want))
            .unwrap_or_else(|| panic!("{want} missing from cw --help:\n{help}"));
        assert!(
            line.split_whitespace().count() > 2,
            "{want} has no description: {line:?}"
        );
        // and its own --help works
        assert!(cw(&[want, "--help"]).contains("Usage: cw"), "{want} --help");
    }
    assert!(
        !help.contains("__monitor"),
        "the internal monitor command is hidden"
    );
}

#[test]
fn completions_and_man_page() {
    let bash = cw(&["completions", "bash"]);
    assert!(
        bash.contains("complete") && bash.contains("worker") && bash.contains("--registry-mirror")
    );
    assert!(cw(&["completions", "zsh"]).contains("#compdef cw"));
    let man = cw(&["man"]);
    assert!(
        man.contains(".TH cw 1") && man.contains("worker"),
        "{}",
        &man[..man.len().min(500)]
    );
}

/// Worker managers pass cl-worker 1.7.5's flags: `--bundle-runtime docker` (and Kubernetes
/// options, which cl-worker ignores then) is taken; `kubernetes` is refused with the reason.
#[test]
fn cl_worker_runtime_flags() {
    let d = tempfile::tempdir().unwrap();
    let worker = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cw"))
            .args(["--store", d.path().join("s").to_str().unwrap(), "worker"])
            .args(["--server", "http://127.0.0.1:9", "--work-dir"])
            .arg(d.path().join("w"))
            .args(extra)
            .env("CODALAB_USERNAME", "u")
            .env("CODALAB_PASSWORD", "p")
            .output()
            .unwrap()
    };
    let o = worker(&["--bundle-runtime", "kubernetes"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--bundle-runtime kubernetes is not supported"),
        "{err}"
    );
    // docker: past the flags, to the (absent) server
    let o = worker(&[
        "--bundle-runtime",
        "docker",
        "--kubernetes-cluster-host",
        "https://k8s.example.org",
        "--kubernetes-cert-path",
        "/dev/null",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--kubernetes-cluster-host is ignored"),
        "{err}"
    );
    assert!(err.contains("Cannot log into the bundle service"), "{err}");
    // a log that is not a terminal has no colour codes (a worker under systemd logs to a file)
    assert!(
        !err.contains('\u{1b}'),
        "escape sequences in a non-terminal log: {err:?}"
    );
    let o = worker(&["--bundle-runtime", "singularity"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
