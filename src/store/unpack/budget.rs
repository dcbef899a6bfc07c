//! How many bytes a set of unpacks may still write.

use super::UnpackError;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes that a set of unpacks may write together (one image's layers, unpacked in parallel;
/// one archive): a layer that claims a few bytes can expand without bound (a sparse entry, a
/// bomb), and must fail with this error long before the store's filesystem is full.
#[derive(Debug)]
pub struct Budget {
    left: AtomicU64,
    /// What running out means, for the error ("image X unpacks to more than …").
    pub exceeded: String,
}

impl Budget {
    pub fn new(bytes: u64, exceeded: impl Into<String>) -> Arc<Budget> {
        Arc::new(Budget {
            left: AtomicU64::new(bytes),
            exceeded: exceeded.into(),
        })
    }

    /// A budget of at most `max` bytes (if any) and of the free space of the filesystem at
    /// `dir` less a reserve (2 % of the filesystem, at most 1 GiB), naming `what` when spent.
    // fsblkcnt_t is u64 here but not on every target
    #[allow(clippy::useless_conversion)]
    pub fn for_dir(dir: &Path, max: Option<u64>, what: &str) -> Arc<Budget> {
        let free = nix::sys::statvfs::statvfs(dir).ok().map(|v| {
            let frs = u64::from(v.fragment_size());
            let total = u64::from(v.blocks()) * frs;
            let reserve = (1u64 << 30).min(total / 50);
            (u64::from(v.blocks_available()) * frs).saturating_sub(reserve)
        });
        match (max, free) {
            (Some(m), Some(f)) if m <= f => {
                Budget::new(m, format!("{what} unpacks to more than {m} bytes, the limit"))
            }
            (_, Some(f)) => Budget::new(
                f,
                format!(
                    "{what} unpacks to more than the {f} bytes its filesystem can spare ({} has no more free, less a reserve of 2 %)",
                    dir.display()
                ),
            ),
            (Some(m), None) => {
                Budget::new(m, format!("{what} unpacks to more than {m} bytes, the limit"))
            }
            (None, None) => Budget::new(u64::MAX, what.to_string()),
        }
    }

    pub(super) fn take(&self, n: u64) -> Result<(), UnpackError> {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(n))
            .map(|_| ())
            .map_err(|_| UnpackError::Limit(self.exceeded.clone()))
    }
}
