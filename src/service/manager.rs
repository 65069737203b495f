//! The manager object: `org.example.VmManager1` at `/org/example/VmManager`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, interface};

use super::MANAGER_PATH;
use super::error::VmError;
use super::job::{Job, JobIds, JobInfo};
use super::options::{self, DiskOptions};
use super::values::{Dict, report_dict, users_list};
use crate::auth::{Action, Authority};
use crate::disk::checker::{CheckErrorKind, DiskChecker, DiskReport};
use crate::disk::image::ImageFile;
use crate::disk::qemu_img::RunAs;

/// State shared by the manager object and the daemon that owns it.
pub struct ManagerState {
    pub checker: DiskChecker,
    pub authority: Arc<Authority>,
    job_ids: JobIds,
    jobs: Mutex<Vec<OwnedObjectPath>>,
    /// Cancelled on daemon shutdown; every job's token is a child of it.
    shutdown: CancellationToken,
    /// Every check runs in a task of this tracker, so shutdown can wait for
    /// all of them (and their qemu-img children) to be gone.
    tasks: TaskTracker,
}

impl ManagerState {
    pub fn new(checker: DiskChecker, authority: Authority) -> Arc<Self> {
        Arc::new(ManagerState {
            checker,
            authority: Arc::new(authority),
            job_ids: JobIds::default(),
            jobs: Mutex::new(Vec::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Cancels every job and returns when all of them (qemu-img included)
    /// have ended. A check that arrives after this ends at once as
    /// `Cancelled` (its token is a child of the cancelled one).
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn job_paths(&self) -> Vec<OwnedObjectPath> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_job(&self, path: &OwnedObjectPath, present: bool) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if present {
            jobs.push(path.clone());
        } else {
            jobs.retain(|p| p != path);
        }
    }
}

pub struct Manager {
    state: Arc<ManagerState>,
}

impl Manager {
    pub fn new(state: Arc<ManagerState>) -> Self {
        Manager { state }
    }

    /// Validates the path and decides, with polkit, whose credentials the
    /// work runs with: the caller's for their own image, the owner's for
    /// anyone else's (never root for a non-root user's image).
    async fn authorize_image(
        &self,
        header: &Header<'_>,
        image: &str,
        options: &DiskOptions,
    ) -> Result<(Arc<ImageFile>, u32, RunAs), VmError> {
        let path = image.to_owned();
        let opened = tokio::task::spawn_blocking(move || ImageFile::open(&path))
            .await
            .map_err(|e| VmError::CheckFailed(format!("internal error: {e}")))?;
        let image = match opened {
            Ok(image) => image,
            Err(e) if e.is_about_the_text() => return Err(e.into()),
            Err(e) => {
                // Whether a path exists and what it is tells about
                // directories the caller may not be able to read: only a
                // caller polkit lets check disks learn it.
                let details = HashMap::from([("image", image)]);
                self.state
                    .authority
                    .check(header, Action::CheckDisk, options.interactive, &details)
                    .await?;
                return Err(e.into());
            }
        };
        let caller = self.state.authority.caller(header).await?;
        let image_path = image.path.to_string_lossy().into_owned();
        let details = HashMap::from([("image", image_path.as_str())]);
        let (action, run_as_uid) = if caller.uid == image.uid {
            (Action::CheckDisk, caller.uid)
        } else {
            (Action::CheckDiskOtherUser, image.uid)
        };
        let authority = &self.state.authority;
        authority
            .check(header, action, options.interactive, &details)
            .await?;
        if options.check.repair.is_some() {
            authority
                .check(header, Action::RepairDisk, options.interactive, &details)
                .await?;
        }
        // getpwuid_r may ask NSS (LDAP, …): keep it off the async threads.
        let mut run_as = tokio::task::spawn_blocking(move || RunAs::for_user(run_as_uid))
            .await
            .map_err(|e| VmError::CheckFailed(format!("internal error: {e}")))?
            .map_err(|e| VmError::CheckFailed(e.to_string()))?;
        // The caller's own groups as the bus saw them, not the group
        // database's idea of them (newgrp, sg, systemd's SupplementaryGroups).
        if run_as_uid == caller.uid
            && let Some(groups) = caller.groups
        {
            run_as.groups = groups;
        }
        Ok((Arc::new(image), caller.uid, run_as))
    }
}

/// Checks VM disk images without ever fighting a running VM, and (with the
/// PciDevice objects below this path) manages PCI passthrough.
#[interface(name = "org.example.VmManager1")]
impl Manager {
    /// Checks a VM disk image with `qemu-img check`, unless a running VM or
    /// another process uses it (then the error `InUse` names the VM and PID).
    /// Options: `pidfile` (s), `force-share` (b), `repair` (s: `leaks` or
    /// `all`), `timeout-sec` (u), `auth.no-user-interaction` (b). Returns the
    /// report dictionary described in API.md. While it runs, the check is a
    /// Job object listed in `Jobs`.
    #[zbus(out_args("report"))]
    async fn check_disk(
        &self,
        image: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] connection: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<Dict, VmError> {
        let started = Instant::now();
        let options = options::parse_check_disk(options)?;
        let (image, caller, run_as) = self.authorize_image(&header, image, &options).await?;
        // Busy is refused here, before a job or a DiskChecked signal exists:
        // the check that is running is the one that will report.
        let reservation = self.state.checker.reserve(image.clone())?;

        let state = self.state.clone();
        let connection = connection.clone();
        let emitter = emitter.into_owned();
        // The whole job, signals and clean-up included, is one tracked task:
        // it finishes even if this method call is dropped, and shutdown waits
        // for it.
        let job = self.state.tasks.spawn(async move {
            let path = state.job_ids.next_path();
            let cancel = state.shutdown.child_token();
            let info = JobInfo::new(
                "check-disk",
                image.path.to_string_lossy().into_owned(),
                caller,
            );
            let server = connection.object_server();
            let job = Job::new(info, cancel.clone(), state.authority.clone());
            if let Err(e) = server.at(&path, job).await {
                tracing::warn!("cannot export job {path}: {e}");
            }
            state.set_job(&path, true);
            emit_jobs_changed(&connection).await;

            tracing::info!(image = %image.path.display(), caller, uid = run_as.uid, "checking disk");
            let outcome = state
                .checker
                .check(reservation, &options.check, run_as, &cancel)
                .await;
            let (mut report, error): (DiskReport, Option<VmError>) = match outcome {
                Ok(report) => (report, None),
                Err(e) => {
                    let report = *e.report.clone();
                    (report, Some(VmError::from(e)))
                }
            };
            report.duration = started.elapsed();
            let dict = report_dict(&report, error.as_ref());
            log_outcome(&report, error.as_ref());

            let image_path = report.image.to_string_lossy().into_owned();
            if let Err(e) = Manager::disk_checked(&emitter, &image_path, dict.clone()).await {
                tracing::warn!("cannot emit DiskChecked: {e}");
            }
            if let Ok(job_emitter) = SignalEmitter::new(&connection, &path) {
                let message = error.as_ref().map_or_else(String::new, VmError::message);
                let _ = Job::completed(&job_emitter, error.is_none(), &message).await;
            }
            let _ = server.remove::<Job, _>(&path).await;
            state.set_job(&path, false);
            emit_jobs_changed(&connection).await;
            match error {
                None => Ok(dict),
                Some(e) => Err(e),
            }
        });
        job.await
            .map_err(|e| VmError::CheckFailed(format!("internal error: {e}")))?
    }

    /// Who uses the image now (PID files, /proc, QEMU's lock bytes), without
    /// running qemu-img. Options: `pidfile` (s), `auth.no-user-interaction`
    /// (b). Each entry: `pid` (u), `exe` (s), `vm-name` (s), `writable` (b),
    /// `found-by` (as), `pidfile` (s).
    #[zbus(out_args("users"))]
    async fn get_disk_users(
        &self,
        image: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<Vec<Dict>, VmError> {
        let options = options::parse_get_disk_users(options)?;
        let (image, _, _) = self.authorize_image(&header, image, &options).await?;
        let usage = self
            .state
            .checker
            .users(image, options.check.pidfile.clone(), &self.state.shutdown)
            .await
            .map_err(|e| VmError::from(CheckErrorKind::Scan(e)))?;
        Ok(users_list(&usage.users))
    }

    /// Emitted after every finished check (the report, plus `error` and
    /// `error-message` when the check ended in an error).
    #[zbus(signal)]
    async fn disk_checked(
        emitter: &SignalEmitter<'_>,
        image: &str,
        report: Dict,
    ) -> zbus::Result<()>;

    /// The service's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    /// The job objects of the checks running now.
    #[zbus(property)]
    fn jobs(&self) -> Vec<OwnedObjectPath> {
        self.state.job_paths()
    }
}

async fn emit_jobs_changed(connection: &Connection) {
    let server = connection.object_server();
    match server.interface::<_, Manager>(MANAGER_PATH).await {
        Ok(iface) => {
            let manager = iface.get().await;
            if let Err(e) = manager.jobs_changed(iface.signal_emitter()).await {
                tracing::warn!("cannot emit Jobs change: {e}");
            }
        }
        Err(e) => tracing::warn!("manager object missing: {e}"),
    }
}

fn log_outcome(report: &DiskReport, error: Option<&VmError>) {
    let image = report.image.display();
    match error {
        None => tracing::info!(
            %image,
            result = report.result.map_or("", |r| r.as_str()),
            leaks = report.counts.leaks,
            corruptions = report.counts.corruptions,
            "check finished"
        ),
        Some(e) => {
            tracing::info!(%image, error = e.short_name(), message = %e.message(), "check failed")
        }
    }
}
