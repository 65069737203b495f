//! One disk check from start to end, and the rules that hold across checks:
//! one check per image at a time, a bounded number of checks at once, and
//! never a check of an image that a VM uses.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::image::{ImageFile, ImageFormat};
use super::qemu_img::{
    self, CheckCounts, CheckOutcome, CheckRequest, CheckResult, QemuImgChildren, QemuImgError,
    RepairMode, RunAs,
};
use super::usage::{DiskUsage, DiskUser, UsageScanner};

/// What the caller asked for, already validated.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    pub pidfile: Option<PathBuf>,
    pub force_share: bool,
    pub repair: Option<RepairMode>,
    pub timeout: Option<Duration>,
}

/// Everything known about a check, whether it succeeded or not.
#[derive(Debug, Clone)]
pub struct DiskReport {
    pub image: PathBuf,
    pub format: ImageFormat,
    /// `None` until qemu-img has produced a result (or for raw images, which
    /// are `NotSupported` without running it).
    pub result: Option<CheckResult>,
    pub counts: CheckCounts,
    /// False when checked with `force-share` while in use.
    pub consistent: bool,
    pub usage: DiskUsage,
    pub run_as_uid: u32,
    pub duration: Duration,
}

impl DiskReport {
    /// The report before anything is known but the image itself.
    pub fn unchecked(image: &ImageFile, run_as_uid: u32) -> Self {
        DiskReport {
            image: image.path.clone(),
            format: image.format,
            result: None,
            counts: CheckCounts::default(),
            consistent: true,
            usage: DiskUsage::default(),
            run_as_uid,
            duration: Duration::ZERO,
        }
    }
}

/// Upper bound for finding out who uses an image.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the users of an image are unknown.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum ScanError {
    #[error(
        "could not find out within {} s who uses the image (a process on this host does not \
         answer /proc reads, e.g. one stuck on a hung network or FUSE file system)",
        SCAN_TIMEOUT.as_secs()
    )]
    TimedOut,
    #[error("internal error while finding out who uses the image")]
    Failed,
    #[error("cancelled")]
    Cancelled,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckErrorKind {
    #[error("{}", in_use_message(.image, .user))]
    InUse { image: PathBuf, user: Box<DiskUser> },
    #[error("{0} is in use: repair is refused while anything uses the image")]
    RepairInUse(PathBuf),
    #[error("a check of {0} is already running")]
    Busy(PathBuf),
    #[error("{0}")]
    QemuImg(#[from] QemuImgError),
    #[error("{0}")]
    Scan(#[from] ScanError),
}

/// A failed check keeps the partial report (users, stale PID files, …), so
/// the `DiskChecked` signal can still say what was found.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct CheckError {
    pub kind: CheckErrorKind,
    pub report: Box<DiskReport>,
}

fn file_name(image: &std::path::Path) -> String {
    image.file_name().map_or_else(
        || image.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// `disk.qcow2 is in use by VM "win11" (PID 4242, qemu-system-x86_64, found
/// by pidfile); stop the VM or pass force-share`
fn in_use_message(image: &std::path::Path, user: &DiskUser) -> String {
    let name = file_name(image);
    let found_by = user
        .found_by
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if user.pid == 0 {
        let mode = if user.writable { "for writing" } else { "" };
        return format!(
            "{name} is locked {mode} by a QEMU process this service cannot see (another PID \
             namespace, e.g. a container; found by {found_by}); stop the VM or pass force-share"
        )
        .replace("  ", " ");
    }
    let exe = file_name(std::path::Path::new(&user.exe));
    let who = match (user.is_qemu, user.vm_name.is_empty()) {
        (true, false) => format!("VM \"{}\"", user.vm_name),
        (true, true) => "a VM".to_owned(),
        (false, _) => "another process".to_owned(),
    };
    let action = if user.is_qemu {
        "stop the VM"
    } else {
        "close it"
    };
    format!(
        "{name} is in use by {who} (PID {}, {exe}, found by {found_by}); {action} or pass force-share",
        user.pid
    )
}

/// Shared state of all checks. Cheap to clone.
#[derive(Clone)]
pub struct DiskChecker {
    inner: Arc<Inner>,
}

struct Inner {
    scanner: UsageScanner,
    qemu_img: PathBuf,
    default_timeout: Duration,
    slots: Semaphore,
    /// (st_dev, st_ino) of images being checked: the same image reached
    /// through another path is still the same image.
    running: Mutex<HashSet<(u64, u64)>>,
    /// Every qemu-img this checker runs, and what they leave behind.
    children: QemuImgChildren,
}

/// The right to check one image: while it exists, any other check of the
/// same image is `Busy`. Dropping it (however the check ends) frees the image.
pub struct Reservation {
    checker: DiskChecker,
    image: Arc<ImageFile>,
}

impl Reservation {
    fn key(&self) -> (u64, u64) {
        (self.image.dev, self.image.ino)
    }

    pub fn image(&self) -> &Arc<ImageFile> {
        &self.image
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        lock(&self.checker.inner.running).remove(&self.key());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the set half-updated
    // (single insert/remove), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl DiskChecker {
    pub fn new(
        scanner: UsageScanner,
        qemu_img: PathBuf,
        default_timeout: Duration,
        max_concurrent: usize,
    ) -> Self {
        DiskChecker {
            inner: Arc::new(Inner {
                scanner,
                qemu_img,
                default_timeout,
                slots: Semaphore::new(max_concurrent.max(1)),
                running: Mutex::new(HashSet::new()),
                children: QemuImgChildren::new(),
            }),
        }
    }

    /// Who uses `image` right now. The scan reads /proc, where a read can
    /// hang (a process stuck on FUSE or dead NFS holds its mm lock), so it is
    /// bounded by [`SCAN_TIMEOUT`] and by `cancel`; an unfinished or failed
    /// scan is an error, never "nobody uses it".
    pub async fn users(
        &self,
        image: Arc<ImageFile>,
        pidfile: Option<PathBuf>,
        cancel: &CancellationToken,
    ) -> Result<DiskUsage, ScanError> {
        let scanner = self.inner.scanner.clone();
        let scan = tokio::task::spawn_blocking(move || scanner.scan(&image, pidfile.as_deref()));
        tokio::select! {
            result = tokio::time::timeout(SCAN_TIMEOUT, scan) => match result {
                Ok(Ok(usage)) => Ok(usage),
                Ok(Err(e)) => {
                    tracing::error!("usage scan panicked: {e}");
                    Err(ScanError::Failed)
                }
                // The blocking thread is left to finish on its own; only its
                // answer is abandoned.
                Err(_) => Err(ScanError::TimedOut),
            },
            () = cancel.cancelled() => Err(ScanError::Cancelled),
        }
    }

    /// Claims `image` for one check, or `Busy` when a check of the same
    /// file (by device and inode, whatever the path) is running.
    pub fn reserve(&self, image: Arc<ImageFile>) -> Result<Reservation, CheckErrorKind> {
        if !lock(&self.inner.running).insert((image.dev, image.ino)) {
            return Err(CheckErrorKind::Busy(image.path.clone()));
        }
        Ok(Reservation {
            checker: self.clone(),
            image,
        })
    }

    /// Runs one check of a reserved image. `cancel` stops it at any point
    /// (qemu-img included).
    pub async fn check(
        &self,
        reservation: Reservation,
        options: &CheckOptions,
        run_as: RunAs,
        cancel: &CancellationToken,
    ) -> Result<DiskReport, CheckError> {
        let started = Instant::now();
        let image = reservation.image.clone();
        let mut report = DiskReport::unchecked(&image, run_as.uid);
        let fail = |kind: CheckErrorKind, mut report: DiskReport| {
            report.duration = started.elapsed();
            CheckError {
                kind,
                report: Box::new(report),
            }
        };

        let _reservation = reservation;

        // Wait for a slot first, then look at the users: the answer must be
        // fresh when qemu-img starts, not from before a long wait.
        let _slot = tokio::select! {
            permit = self.inner.slots.acquire() => permit.expect("semaphore is never closed"),
            () = cancel.cancelled() => {
                return Err(fail(QemuImgError::Cancelled.into(), report));
            }
        };

        report.usage = match self
            .users(image.clone(), options.pidfile.clone(), cancel)
            .await
        {
            Ok(usage) => usage,
            Err(ScanError::Cancelled) => {
                return Err(fail(QemuImgError::Cancelled.into(), report));
            }
            Err(e) => return Err(fail(e.into(), report)),
        };
        if let Some(user) = report.usage.blocking_user() {
            if options.repair.is_some() {
                return Err(fail(
                    CheckErrorKind::RepairInUse(image.path.clone()),
                    report,
                ));
            }
            if !options.force_share {
                let kind = CheckErrorKind::InUse {
                    image: image.path.clone(),
                    user: Box::new(user.clone()),
                };
                return Err(fail(kind, report));
            }
            report.consistent = false;
        }
        if options.repair.is_some() && !report.usage.users.is_empty() {
            // Even a reader must not see the image while it is rewritten.
            return Err(fail(
                CheckErrorKind::RepairInUse(image.path.clone()),
                report,
            ));
        }

        if image.format == ImageFormat::Raw {
            report.result = Some(CheckResult::NotSupported);
            report.duration = started.elapsed();
            return Ok(report);
        }

        let request = CheckRequest {
            qemu_img: self.inner.qemu_img.clone(),
            image: image.path.clone(),
            format: image.format,
            force_share: options.force_share,
            repair: options.repair,
            run_as,
            // The configured limit is the administrator's upper bound; a
            // caller may only ask for less.
            timeout: options.timeout.map_or(self.inner.default_timeout, |t| {
                t.min(self.inner.default_timeout)
            }),
        };
        match qemu_img::run_check(&request, &self.inner.children, cancel).await {
            Ok(CheckOutcome { result, counts }) => {
                report.result = Some(result);
                report.counts = counts;
                report.duration = started.elapsed();
                Ok(report)
            }
            Err(QemuImgError::LockConflict { stderr }) => {
                // Something we could not see took the lock between our scan
                // and qemu-img's open: still "in use", never a plain failure.
                let user = DiskUser {
                    pid: 0,
                    exe: String::new(),
                    vm_name: String::new(),
                    writable: true,
                    found_by: vec![super::usage::FoundBy::Lock],
                    pidfile: None,
                    is_qemu: true,
                };
                tracing::info!(image = %image.path.display(), %stderr, "qemu-img hit a lock conflict");
                report.usage.users.push(user.clone());
                let kind = CheckErrorKind::InUse {
                    image: image.path.clone(),
                    user: Box::new(user),
                };
                Err(fail(kind, report))
            }
            Err(e) => Err(fail(e.into(), report)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::usage::FoundBy;

    fn user(pid: u32, is_qemu: bool, vm_name: &str) -> DiskUser {
        DiskUser {
            pid,
            exe: "/usr/bin/qemu-system-x86_64".into(),
            vm_name: vm_name.into(),
            writable: true,
            found_by: vec![FoundBy::Pidfile, FoundBy::Proc, FoundBy::Lock],
            pidfile: None,
            is_qemu,
        }
    }

    #[test]
    fn in_use_message_names_vm_pid_and_how_it_was_found() {
        let image = std::path::Path::new("/var/lib/vms/win11/disk.qcow2");
        assert_eq!(
            in_use_message(image, &user(4242, true, "win11")),
            "disk.qcow2 is in use by VM \"win11\" (PID 4242, qemu-system-x86_64, found by \
             pidfile, proc, lock); stop the VM or pass force-share"
        );
        let msg = in_use_message(image, &user(7, false, ""));
        assert!(msg.contains("another process (PID 7"), "{msg}");
        let msg = in_use_message(image, &user(0, true, ""));
        assert!(msg.contains("cannot see"), "{msg}");
    }
}
