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
