//! Image names, digests and manifest formats: pure parsing, no I/O.
pub mod digest;
pub mod manifest;
pub mod reference;
