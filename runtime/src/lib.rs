//! cw's container runtime: the OCI spec of a run ([`spec`]), the single-threaded monitor that
//! creates it through libcontainer and records its end ([`monitor`]), cgroup accounting
//! ([`cgroup`]), GPUs ([`gpu`], [`cdi`], [`ldcache`]); one error type, [`Error`]. This crate never depends on the `cw`
//! binary crate.

pub mod cdi;
pub mod cgroup;
pub mod console;
pub mod error;
pub mod exec;
pub mod fsx;
pub mod gpu;
pub mod initlog;
pub mod launch;
pub mod ldcache;
pub mod monitor;
pub mod net;
pub mod overlay;
pub mod request;
pub mod rundir;
pub mod sample;
pub mod seccomp;
pub mod spec;
pub mod userns;

pub use error::{Error, Result};

#[cfg(test)]
mod alone;
