//! What the unit tests of several modules share.

mod capabilities;
mod dead_fuse;
mod fd_copies;
mod seccomp;
mod sleeper;
// The integration tests use all of it; the unit tests only a part.
#[allow(dead_code)]
mod sysfs;

use std::time::{Duration, Instant};

pub use capabilities::{
    CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, without_capabilities,
};
pub use dead_fuse::DeadFuse;
pub use fd_copies::sleep_holding_copies;
pub use seccomp::with_failing_syscalls;
pub use sleeper::Sleeper;
pub use sysfs::FakeSysfs;

/// Waits (up to 10 s) until `done` holds.
pub async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
