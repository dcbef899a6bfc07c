//! For tests that measure their own process (its descriptors, its memory): the test runs again in
//! a fresh run of the test binary with nothing but itself in it, as the other tests of the binary
//! open descriptors and allocate beside it in the same process.

use std::path::PathBuf;
use std::process::{Command, Stdio};

const MARK: &str = "CW_TEST_ALONE";

/// `let Some(done) = run_alone!(the_test_fn, pid_ns) else { return };` at the top of a test:
/// [`alone`] for the test of that name in the calling module.
macro_rules! run_alone {
    ($test:ident, $pid_ns:expr) => {
        crate::alone::alone(concat!(module_path!(), "::", stringify!($test)), $pid_ns)
    };
}
pub(crate) use run_alone;

/// The child's proof that the test's body ran to its end: a file the parent looks for.
pub struct Passed(PathBuf);

impl Passed {
    pub fn mark(self) {
        std::fs::write(&self.0, "").unwrap();
    }
}

/// In the parent: run `test` (as `module_path!()` plus the function's name) alone in a fresh run
/// of this binary, in a pid namespace of its own when `pid_ns` (util-linux's unshare, as root),
/// assert that its body passed, and return None. In that child: Some, and the body goes on.
/// The child's output is the parent's own, not piped: the parent holds no descriptors while it
/// runs, and a failure's message is in the log.
pub fn alone(test: &str, pid_ns: bool) -> Option<Passed> {
    if let Some(done) = std::env::var_os(MARK) {
        return Some(Passed(done.into()));
    }
    // libtest names a test without its crate
    let name = test.split_once("::").map_or(test, |(_, n)| n);
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("passed");
    let exe = std::env::current_exe().unwrap();
    let mut c = if pid_ns {
        let mut c = Command::new("unshare");
        c.args(["--pid", "--fork", "--mount-proc"]).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    let st = c
        .args(["--exact", name, "--test-threads", "1", "-q"])
        .env(MARK, &done)
        .stdout(Stdio::inherit())
        .status()
        .unwrap();
    assert!(
        st.success() && done.exists(),
        "{name} alone in a run of its own: {st}"
    );
    None
}
