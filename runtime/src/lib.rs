//! cw's container runtime: the OCI spec of a run ([`spec`]), the single-threaded monitor that
//! creates it through libcontainer and records its end ([`monitor`]), cgroup accounting
//! ([`cgroup`]). This crate never depends on the `cw` binary crate.

pub mod cgroup;
pub mod gpu;
pub mod monitor;
pub mod request;
pub mod spec;
