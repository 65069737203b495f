//! Job objects: one per running check, at `/org/example/VmManager/jobs/N`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use vmmanager_client::names::polkit_detail;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{OwnedObjectPath, OwnedVariant, interface};

use super::JOBS_PATH;
use super::callers::Callers;
use super::error::{JobEnded, VmError};
use super::options::parse_interactive_only;
use crate::auth::{Action, Authority};

/// Hands out job numbers. Owned by the manager; numbers never repeat within
/// one daemon run, so a client never confuses an old job with a new one.
#[derive(Debug, Default)]
pub struct JobIds {
    next: AtomicU64,
}

impl JobIds {
    pub fn next_path(&self) -> OwnedObjectPath {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        OwnedObjectPath::try_from(format!("{JOBS_PATH}/{n}")).expect("valid object path")
    }
}

/// What a job is and who started it.
#[derive(Debug, Clone)]
pub struct JobInfo {
    pub operation: &'static str,
    pub target: String,
    pub started_by_uid: u32,
    pub start_time_us: u64,
}

impl JobInfo {
    pub fn new(operation: &'static str, target: String, started_by_uid: u32) -> Self {
        let start_time_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        JobInfo {
            operation,
            target,
            started_by_uid,
            start_time_us,
        }
    }
}

pub struct Job {
    info: JobInfo,
    cancel: CancellationToken,
    /// Set when the job has ended: its object may outlive the answer to the
    /// call that started it by a moment, and Cancel must already say "no
    /// such job" then, as it does once the object is gone.
    ended: Arc<AtomicBool>,
    authority: Arc<Authority>,
    /// So that a Cancel caller who leaves is no longer waited for.
    callers: Arc<Callers>,
}

impl Job {
    pub fn new(
        info: JobInfo,
        cancel: CancellationToken,
        ended: Arc<AtomicBool>,
        authority: Arc<Authority>,
        callers: Arc<Callers>,
    ) -> Self {
        Job {
            info,
            cancel,
            ended,
            authority,
            callers,
        }
    }
}

/// A running operation of the service.
#[interface(name = "org.example.VmManager1.Job")]
impl Job {
    // Signals first (see "Member order" in the `service` module docs).
    /// Emitted once when the job ends, just before the object goes away.
    #[zbus(signal)]
    pub async fn completed(
        emitter: &SignalEmitter<'_>,
        success: bool,
        message: &str,
    ) -> zbus::Result<()>;

    /// What the job does: `check-disk`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn operation(&self) -> &str {
        self.info.operation
    }

    /// What the job works on: the canonical image path.
    #[zbus(property(emits_changed_signal = "const"))]
    fn target(&self) -> &str {
        &self.info.target
    }

    /// The uid of the caller that started the job.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_by_uid(&self) -> u32 {
        self.info.started_by_uid
    }

    /// When the job started, in microseconds since the epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn start_time(&self) -> u64 {
        self.info.start_time_us
    }

    /// Whether `Cancel` can stop the job (always true for checks).
    #[zbus(property(emits_changed_signal = "const"))]
    fn cancelable(&self) -> bool {
        true
    }

    /// Stops the job: qemu-img and its whole process group are killed and
    /// the call that started the job returns `Cancelled`. Only the starter
    /// may cancel, or a caller authorized for
    /// `org.example.vmmanager.check-disk-other-user`.
    async fn cancel(
        &self,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), VmError> {
        let interactive = parse_interactive_only("Cancel", options)?;
        if self.ended.load(Ordering::Acquire) {
            return Err(JobEnded {
                target: self.info.target.clone(),
            }
            .into());
        }
        let guard = self.callers.guard(&header)?;
        let caller = self.authority.caller(&header).await?;
        if caller.uid != self.info.started_by_uid {
            let details = HashMap::from([(polkit_detail::IMAGE, self.info.target.as_str())]);
            let action = Action::CheckDiskOtherUser;
            let check = self
                .authority
                .check(&header, &caller, action, interactive, &details);
            guard.until_gone(check).await?;
        }
        tracing::info!(target = %self.info.target, caller = caller.uid, "job cancelled");
        self.cancel.cancel();
        Ok(())
    }
}
