//! cw: a daemonless container runner and CodaLab Worksheets worker.
//!
//! Data flow: [`image::reference`] → [`registry`] → [`store`] (+ [`store::unpack`]) →
//! `rootfs` → `cw_runtime` (spec → monitor → container) → `worker`.

pub mod attach;
pub mod bridge;
pub mod config;
pub mod exec;
pub mod image;
pub mod image_view;
pub mod load;
pub mod progress;
pub mod pull;
pub mod registry;
pub mod rootfs;
pub mod run;
pub mod store;
pub mod worker;
