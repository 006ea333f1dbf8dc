//! How much the buffer file may still grow on its filesystem.
//!
//! Why: `max_size` is what the operator allows, but the filesystem may hold less (a
//! small partition, other files growing). The writer narrows the budget to what the
//! disk can take, so `when_full` (reject-new, or drop-oldest with a gap notice) applies
//! before the filesystem says ENOSPC — not a failed commit per message. ENOSPC can
//! still happen (another process fills the disk between two looks); the writer's
//! reopen handles that.
//!
//! Invariants: looked up at most every `REFRESH`; `RESERVE` bytes are kept free for the
//! copy-on-write pages of the transaction in flight; where the filesystem cannot be
//! asked, there is no disk limit (the configured budget stands).

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Free space kept for redb's copy-on-write pages and the free list of a commit.
pub const RESERVE: u64 = 2 << 20;
/// Share of the largest file the disk allows that record data may take. Lower than
/// `max_size`'s (retention::DATA_FRACTION_PERCENT): at the disk's limit, drop-oldest
/// evicts and appends in one transaction, which cannot reuse the pages it frees, and
/// the file grows in steps. Measured on a 16 MiB tmpfs (tests/tests/disk_full.rs).
pub const DATA_PERCENT: u64 = 33;
const REFRESH: Duration = Duration::from_millis(200);

#[derive(Debug)]
pub struct DiskRoom {
    file: PathBuf,
    checked: Option<Instant>,
    max_file: Option<u64>,
}

impl DiskRoom {
    pub fn new(file: PathBuf) -> Self {
        Self {
            file,
            checked: None,
            max_file: None,
        }
    }

    /// The largest the buffer file may become: its size now plus the free space left
    /// for it, less the reserve (pages freed inside the file are reused, so a file that
    /// cannot grow still takes new records as old ones leave). None: unknown.
    pub fn max_file(&mut self) -> Option<u64> {
        if self.checked.is_none_or(|t| t.elapsed() >= REFRESH) {
            self.checked = Some(Instant::now());
            let dir = self
                .file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let len = std::fs::metadata(&self.file).map_or(0, |m| m.len());
            self.max_file = available(dir).map(|a| len + a.saturating_sub(RESERVE));
        }
        self.max_file
    }

    /// Bytes of record data the disk can take (see DATA_PERCENT); None: unknown.
    pub fn data_cap(&mut self) -> Option<u64> {
        self.max_file().map(|f| f / 100 * DATA_PERCENT)
    }

    /// Forget the last look (after a commit failed for lack of space, say).
    pub fn invalidate(&mut self) {
        self.checked = None;
    }
}

fn available(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    crate::link::sys::statvfs_available(&c)
}
