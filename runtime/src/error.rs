//! The runtime's one error type. Its message names the operation and the thing it was done to
//! (what `cw` prints and what a run's `exit.json` records); its variant says whose the fault is,
//! which is what a caller decides on: the run's request, the host, the GPU setup, or the
//! container that libcontainer could not make.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run asks for something that cannot be given as written: a device, a mount, a CPU
    /// list, a name whose cgroup is in use.
    #[error("{0}")]
    Request(String),
    /// An operation on the host failed (a file, a system call, a helper program).
    #[error("{0}")]
    Host(String),
    /// The GPUs a run was given cannot be set up: a CDI spec, the driver's files, the ld cache.
    #[error("{0}")]
    Gpu(String),
    /// libcontainer could not create, start or enter the container; the message carries its
    /// error chain and what the container's init logged.
    #[error("{0}")]
    Container(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A host operation's failure: what was done ("opening /dev/null") and why it failed.
    pub fn host(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
        Error::Host(format!("{what}: {e}"))
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(self, what: impl std::fmt::Display) -> Error {
        match self {
            Error::Request(m) => Error::Request(format!("{what}: {m}")),
            Error::Host(m) => Error::Host(format!("{what}: {m}")),
            Error::Gpu(m) => Error::Gpu(format!("{what}: {m}")),
            Error::Container(m) => Error::Container(format!("{what}: {m}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Device;

    #[test]
    fn context_keeps_the_variant_and_prefixes_the_message() {
        let e = Error::Gpu("no nvidia-caps driver".into()).context("MIG device GPU-1");
        assert!(matches!(e, Error::Gpu(_)));
        assert_eq!(e.to_string(), "MIG device GPU-1: no nvidia-caps driver");
        let e = Error::host("opening /dev/null", "EMFILE").context("the run's stdio");
        assert!(matches!(e, Error::Host(_)));
        assert_eq!(e.to_string(), "the run's stdio: opening /dev/null: EMFILE");
    }

    #[test]
    fn a_bad_device_is_the_requests_fault_and_says_which() {
        let mut d = Device::char("/dev/null", 1, 3, 0o666);
        d.access = "rwx".into();
        let e = d.validate().unwrap_err();
        assert!(matches!(e, Error::Request(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "device /dev/null: permissions \"rwx\" are not a subset of rwm"
        );
        let e = Device::from_host("/etc/hostname", "/dev/x", "rwm").unwrap_err();
        assert!(matches!(e, Error::Request(_)), "{e:?}");
        assert!(
            e.to_string().contains("/etc/hostname is not a device node"),
            "{e}"
        );
    }
}
