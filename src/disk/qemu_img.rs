//! Running `qemu-img check` as a given user, in its own process group.
//!
//! OWNER: helper B (qemu-img runner). Placeholder bodies until implemented.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::image::ImageFormat;

/// Credentials qemu-img runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    Leaks,
    All,
}

impl RepairMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairMode::Leaks => "leaks",
            RepairMode::All => "all",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub qemu_img: PathBuf,
    pub image: PathBuf,
    pub format: ImageFormat,
    pub force_share: bool,
    pub repair: Option<RepairMode>,
    pub run_as: RunAs,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Clean,
    Leaks,
    Corrupt,
    NotSupported,
}

impl CheckResult {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Clean => "clean",
            CheckResult::Leaks => "leaks",
            CheckResult::Corrupt => "corrupt",
            CheckResult::NotSupported => "not-supported",
        }
    }
}

/// Counts from qemu-img's JSON; 0 where it omits them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckCounts {
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub result: CheckResult,
    pub counts: CheckCounts,
}

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("cannot start {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img could not check the image (exit code {code}): {stderr}")]
    Failed { code: i32, stderr: String },
    #[error("qemu-img produced unusable output ({detail}): {stderr}")]
    Garbage { detail: String, stderr: String },
    #[error("the image is locked by another process: {stderr}")]
    LockConflict { stderr: String },
    #[error("qemu-img was killed by signal {signal}")]
    Killed { signal: i32 },
    #[error("qemu-img did not finish within {0:?}")]
    Timeout(Duration),
    #[error("cancelled")]
    Cancelled,
}

/// Runs the check; kills qemu-img's whole process group on timeout, on
/// `cancel`, and when this future is dropped.
pub async fn run_check(
    request: &CheckRequest,
    cancel: &CancellationToken,
) -> Result<CheckOutcome, QemuImgError> {
    let _ = cancel;
    Err(QemuImgError::Spawn {
        path: request.qemu_img.clone(),
        source: std::io::Error::other("not implemented yet"),
    })
}
