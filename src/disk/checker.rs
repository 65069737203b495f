//! One disk check from start to end, and the rules that hold across checks:
//! one check per image at a time, a bounded number of checks at once, and
//! never a check of an image that a VM uses.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::image::{ImageFile, ImageFormat};
use super::qemu_img::{
    self, CheckCounts, CheckOutcome, CheckRequest, CheckResult, QemuImgChildren, QemuImgError,
    RepairMode, RunAs,
};
use super::usage::{DiskUsage, DiskUser, UsageScanner};
use super::view::View;
use super::writable::{self, NotWritable};
use crate::procfs::{HoldersError, SCAN_TIMEOUT};
use crate::uid_counts::{self, Counted, StoppableJob, UidCounts, Unfinished};

/// How much checking the service does at once, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Upper bound for one check, from the moment it is accepted (waiting
    /// for a slot included); a caller's `timeout-sec` may only lower it.
    pub timeout: Duration,
    /// Checks running at once, all callers together.
    pub concurrent: usize,
    /// Checks running at once for one caller (uid): below `concurrent`, so
    /// one user's hanging checks always leave slots to others.
    pub per_user: usize,
    /// Checks one caller may have waiting for a slot; more are `Busy`.
    pub queued_per_user: usize,
}

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

/// GetDiskUsers calls one uid may have scanning at once; more are
/// [`ScanError::TooMany`] (`Busy`). A count of its own rather than the
/// checks' admission: a query is a short read of /proc that must not be
/// refused because the same user's checks wait for slots or run qemu-img
/// for minutes, nor use up their queue. More than an applet or vmctl asks
/// at once; a flood gets `Busy` and at most this many scanning threads.
pub const SCANS_PER_USER: usize = 8;

/// How much older a speculative scan may be than the scan a check (or
/// GetDiskUsers) would start itself once authorized: its answer counts
/// only if it started at most this long before. Enough for polkit's answer
/// without a prompt (about a millisecond); a password prompt takes
/// seconds, and then the users are looked at again.
pub const SPECULATION_FRESH: Duration = Duration::from_millis(50);

/// Speculative scans one uid may have running at once, and all callers
/// together. Beyond these a call simply scans after authorization: a
/// caller polkit refuses must not get more /proc reading out of the
/// service than a few scans cut short by the refusal.
const SPECULATIONS_PER_USER: usize = 4;
const SPECULATIONS: usize = 16;

/// A scan running in a blocking thread. Dropped, it tells the thread to
/// stop, so an abandoned scan does not go on holding a thread, the image
/// and /proc descriptors.
struct RunningScan {
    image: PathBuf,
    job: StoppableJob<Result<DiskUsage, HoldersError>>,
}

/// A scan started before polkit has answered, in the one case where it is
/// exactly the scan the work would do after authorization (see
/// [`DiskChecker::speculate`]). Nothing about its answer is looked at
/// before the work is authorized; dropping it stops the scan.
pub struct Speculation {
    image: Arc<ImageFile>,
    pidfile: Option<PathBuf>,
    view: View,
    started: Instant,
    scan: RunningScan,
    /// The speculation's count, shared with the scan's thread: the scan
    /// counts as long as either is alive (see [`DiskChecker::start_scan`]).
    _held_until_done: Arc<Counted>,
}

impl Speculation {
    /// The answer for this scan, if it is the same scan (image, PID file,
    /// view) and fresh: at most [`SPECULATION_FRESH`] older than one
    /// started now. Otherwise it is dropped, which stops it.
    fn take_for(
        self,
        image: &Arc<ImageFile>,
        pidfile: &Option<PathBuf>,
        view: &View,
    ) -> Option<RunningScan> {
        let same =
            Arc::ptr_eq(&self.image, image) && self.pidfile == *pidfile && self.view == *view;
        (same && self.started.elapsed() <= SPECULATION_FRESH).then_some(self.scan)
    }
}

/// Why the users of an image are unknown.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum ScanError {
    #[error(
        "could not find out within {} s who uses the image (a process on this host does not \
         answer /proc reads, e.g. one stuck on a hung network or FUSE file system)",
        SCAN_TIMEOUT.as_secs()
    )]
    TimedOut,
    #[error(
        "could not find out who uses the image (the service is out of resources, or an \
         internal error; see its log)"
    )]
    Failed,
    #[error("cancelled")]
    Cancelled,
    #[error(
        "uid {uid} already has {limit} GetDiskUsers calls running; try again when one has \
         finished"
    )]
    TooMany { uid: u32, limit: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum CheckErrorKind {
    /// `users`: every user that blocks the check, never empty.
    #[error("{}", in_use_message(.image, .users))]
    InUse {
        image: PathBuf,
        users: Vec<DiskUser>,
    },
    /// qemu-img itself found the image locked: something took the lock
    /// after the service looked (a VM starting just then).
    #[error(
        "{} was locked by another program just as the check started (a VM starting?); \
         try again, or pass force-share ({stderr})",
        file_name(.image)
    )]
    LockedMeanwhile { image: PathBuf, stderr: String },
    #[error("{0} is in use: repair is refused while anything uses the image")]
    RepairInUse(PathBuf),
    #[error("a check of {0} is already running")]
    Busy(PathBuf),
    #[error(
        "uid {uid} already has {limit} checks running or waiting; try again when one has \
         finished"
    )]
    TooManyChecks { uid: u32, limit: usize },
    #[error("no check slot became free within {} ({running} checks running)", seconds(*.limit))]
    NoSlot { limit: Duration, running: usize },
    #[error("the check did not finish within {}", seconds(*.0))]
    Timeout(Duration),
    #[error("{image} cannot be checked: {reason}")]
    OtherFiles {
        image: PathBuf,
        reason: &'static str,
    },
    /// A repair of an image on a mount that is read-only for the service,
    /// and no writable handle of it to be had (see [`writable`]).
    #[error("{}", not_writable_message(.image, .socket, .reason))]
    NotWritable {
        image: PathBuf,
        /// Where the opener was asked.
        socket: PathBuf,
        reason: NotWritable,
    },
    #[error("cancelled before qemu-img started")]
    CancelledBeforeStart,
    #[error("{0}")]
    QemuImg(#[from] QemuImgError),
    #[error("{0}")]
    Scan(#[from] ScanError),
}

/// Which directory a repair needs, why it cannot write there, and how an
/// administrator allows it.
fn not_writable_message(
    image: &std::path::Path,
    socket: &std::path::Path,
    reason: &NotWritable,
) -> String {
    // The reason stays in the log: what the opener met on a name the
    // caller may have changed since would tell them about paths they
    // cannot see.
    let dir = image.parent().unwrap_or(image);
    if !reason.is_configuration() {
        return format!(
            "{} cannot be repaired now: {} is read-only for the service, and no writable \
             handle on the image could be had; try again",
            image.display(),
            dir.display()
        );
    }
    format!(
        "{} cannot be repaired: {} is not a directory the service may repair in. Checks \
         without repair work there; {}",
        image.display(),
        dir.display(),
        reason.remedy(socket, dir)
    )
}

/// "5 s", or "0.3 s" for limits below a second.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
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

/// How many users an InUse message names before "and N more".
const NAMED_USERS: usize = 3;

/// `disk.qcow2 is in use by VM "win11" (PID 4242, qemu-system-x86_64, found
/// by pidfile); stop the VM or pass force-share` — every blocking user, up
/// to [`NAMED_USERS`].
fn in_use_message(image: &std::path::Path, users: &[DiskUser]) -> String {
    let name = file_name(image);
    let mut named: Vec<String> = users.iter().take(NAMED_USERS).map(describe).collect();
    if users.len() > NAMED_USERS {
        named.push(format!("{} more", users.len() - NAMED_USERS));
    }
    let list = match named.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => "something".to_owned(),
    };
    let vms = users.iter().filter(|u| u.is_qemu).count();
    let action = match (vms, users.len()) {
        (0, 1) => "close it",
        (0, _) => "close them",
        (1, 1) => "stop the VM",
        (_, _) if vms == users.len() => "stop the VMs",
        _ => "stop them",
    };
    format!("{name} is in use by {list}; {action} or pass force-share")
}

/// One user as InUse names it: `VM "win11" (PID 4242, qemu-system-x86_64,
/// found by pidfile, proc, lock)`.
fn describe(user: &DiskUser) -> String {
    let found_by = user
        .found_by
        .iter()
        .map(|&f| vmmanager_client::FoundBy::from(f).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if user.pid == 0 {
        let mode = if user.writable { ", writing" } else { "" };
        return format!(
            "a QEMU process this service cannot see (another PID namespace, e.g. a container{mode}; \
             found by {found_by})"
        );
    }
    let exe = file_name(std::path::Path::new(&user.exe));
    let who = match (user.is_qemu, user.vm_name.is_empty()) {
        (true, false) => format!("VM \"{}\"", user.vm_name),
        (true, true) => "a VM".to_owned(),
        (false, _) => "another process".to_owned(),
    };
    format!("{who} (PID {}, {exe}, found by {found_by})", user.pid)
}

/// Shared state of all checks. Cheap to clone.
#[derive(Clone)]
pub struct DiskChecker {
    inner: Arc<Inner>,
}

struct Inner {
    scanner: UsageScanner,
    qemu_img: PathBuf,
    /// `vmmanager-opener`'s socket, asked for repairs on read-only mounts.
    opener_socket: PathBuf,
    limits: Limits,
    /// Owned permits: a check's scan thread holds its slots until it has
    /// ended (see [`DiskChecker::check`]).
    slots: Arc<Semaphore>,
    /// The shared slots ordinary users may take: all but one (when there
    /// are two or more), so that users, however many, never keep root or an
    /// administrator from checking.
    user_slots: Arc<Semaphore>,
    /// Checks per caller uid, running or waiting, each count carrying that
    /// uid's own slots (made for its first check, kept while it has any).
    users: UidCounts<Arc<Semaphore>>,
    /// (st_dev, st_ino) of images being checked: the same image reached
    /// through another path is still the same image.
    running: Mutex<HashSet<(u64, u64)>>,
    /// Every qemu-img this checker runs, and what they leave behind.
    children: QemuImgChildren,
    /// GetDiskUsers scans per caller uid.
    scans: UidCounts,
    /// Speculative scans per caller uid.
    speculations: UidCounts,
}

/// The slots one running check holds, released when it ends.
struct Slots {
    _own: OwnedSemaphorePermit,
    _users: Option<OwnedSemaphorePermit>,
    _shared: OwnedSemaphorePermit,
}

/// One admitted check of a caller: counts against its limits until
/// dropped, and carries the caller's own slots.
type Admission = Counted<Arc<Semaphore>>;

/// The right to check one image for one caller: while it exists, any other
/// check of the same image is `Busy`, and it counts against the caller's
/// limits. Dropping it (however the check ends) frees both.
pub struct Reservation {
    checker: DiskChecker,
    image: Arc<ImageFile>,
    admission: Admission,
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

/// The answer of `scan`, bounded by `limit` and by `cancel`: an unfinished
/// or failed scan is an error, never "nobody uses it". When the answer is
/// abandoned (timeout, `cancel`, or this future dropped), the scan is told
/// to stop as well.
async fn finish_scan(
    scan: RunningScan,
    limit: Duration,
    cancel: &CancellationToken,
) -> Result<DiskUsage, ScanError> {
    match scan.job.finish(limit, cancel).await {
        Ok(Ok(usage)) => Ok(usage),
        Ok(Err(HoldersError::Cancelled)) | Err(Unfinished::Cancelled) => Err(ScanError::Cancelled),
        Ok(Err(e)) => {
            let image = scan.image.display();
            tracing::error!(%image, "cannot find out who uses the image: {e}");
            Err(ScanError::Failed)
        }
        Err(e @ Unfinished::Panicked(_)) => {
            tracing::error!("usage scan {e}");
            Err(ScanError::Failed)
        }
        Err(Unfinished::TimedOut) => Err(ScanError::TimedOut),
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
        opener_socket: PathBuf,
        limits: Limits,
    ) -> Self {
        let limits = Limits {
            concurrent: limits.concurrent.max(1),
            per_user: limits.per_user.max(1),
            ..limits
        };
        DiskChecker {
            inner: Arc::new(Inner {
                scanner,
                qemu_img,
                opener_socket,
                limits,
                slots: Arc::new(Semaphore::new(limits.concurrent)),
                user_slots: Arc::new(Semaphore::new(limits.concurrent.saturating_sub(1).max(1))),
                users: UidCounts::default(),
                running: Mutex::new(HashSet::new()),
                children: QemuImgChildren::new(),
                scans: UidCounts::default(),
                speculations: UidCounts::default(),
            }),
        }
    }

    /// Counts one more check for `uid`, or refuses it when that uid already
    /// has as many running and waiting as it may.
    fn admit(&self, uid: u32) -> Result<Admission, CheckErrorKind> {
        let limits = self.inner.limits;
        let limit = limits.per_user + limits.queued_per_user;
        let own_slots = || Arc::new(Semaphore::new(limits.per_user));
        (self.inner.users.admit_with(uid, limit, own_slots))
            .map_err(|_| CheckErrorKind::TooManyChecks { uid, limit })
    }

    /// The slots [`DiskChecker::wait_for_slot`] would give, if all are free
    /// now and nobody waits for them; no place in any line is taken.
    fn free_slots(&self, admission: &Admission, administrator: bool) -> Option<Slots> {
        let own = admission.payload().clone().try_acquire_owned().ok()?;
        let users = match administrator {
            true => None,
            false => Some(self.inner.user_slots.clone().try_acquire_owned().ok()?),
        };
        let shared = self.inner.slots.clone().try_acquire_owned().ok()?;
        Some(Slots {
            _own: own,
            _users: users,
            _shared: shared,
        })
    }

    /// Waits for one of the caller's own slots, then (for an ordinary user)
    /// for one of the users' share, then for a shared one. Every queue is
    /// first come, first served; the wait ends at `deadline`.
    async fn wait_for_slot(
        &self,
        admission: &Admission,
        administrator: bool,
        deadline: Instant,
        limit: Duration,
        cancel: &CancellationToken,
    ) -> Result<Slots, CheckErrorKind> {
        let never_closed = "semaphore is never closed";
        let wait = async {
            let own = (admission.payload().clone())
                .acquire_owned()
                .await
                .expect(never_closed);
            let users = match administrator {
                true => None,
                false => {
                    Some((self.inner.user_slots.clone().acquire_owned().await).expect(never_closed))
                }
            };
            let shared = (self.inner.slots.clone().acquire_owned().await).expect(never_closed);
            Slots {
                _own: own,
                _users: users,
                _shared: shared,
            }
        };
        tokio::select! {
            slots = tokio::time::timeout_at(deadline.into(), wait) => slots.map_err(|_| {
                let free = self.inner.slots.available_permits();
                CheckErrorKind::NoSlot {
                    limit,
                    running: self.inner.limits.concurrent.saturating_sub(free),
                }
            }),
            () = cancel.cancelled() => Err(CheckErrorKind::CancelledBeforeStart),
        }
    }

    /// Who uses `image` right now, for GetDiskUsers by caller `uid`: at most
    /// [`SCANS_PER_USER`] of these per uid at once, each bounded by
    /// [`SCAN_TIMEOUT`] and `cancel`. A `speculation` started for this very
    /// scan is its answer if still fresh (see [`Speculation`]).
    ///
    /// PID files the caller names or that sit next to the image are read in
    /// `view`, so they reveal nothing the caller could not read itself.
    pub async fn users(
        &self,
        uid: u32,
        image: Arc<ImageFile>,
        pidfile: Option<PathBuf>,
        view: View,
        cancel: &CancellationToken,
        speculation: Option<Speculation>,
    ) -> Result<DiskUsage, ScanError> {
        let counted = Arc::new(self.admit_scan(uid)?);
        let scan = speculation
            .and_then(|s| s.take_for(&image, &pidfile, &view))
            .unwrap_or_else(|| self.start_scan(image, pidfile, view, cancel, counted.clone()));
        finish_scan(scan, SCAN_TIMEOUT, cancel).await
    }

    fn admit_scan(&self, uid: u32) -> Result<Counted, ScanError> {
        (self.inner.scans.admit(uid, SCANS_PER_USER, None)).map_err(|_| ScanError::TooMany {
            uid,
            limit: SCANS_PER_USER,
        })
    }

    /// Starts, while polkit is still being asked, the scan that a check or
    /// GetDiskUsers of `image` by `uid` in `view` would start once
    /// authorized, so that the two overlap. The caller must only ask for it
    /// when that later scan would be exactly this one, and must not look at
    /// it before the work is authorized: the answer is only read by
    /// [`DiskChecker::check`] and [`DiskChecker::users`], and only if fresh.
    /// Stopped when dropped or when `cancel` fires.
    ///
    /// `None` (the work then scans after authorization, as always) for an
    /// image that is refused before any scan, or when `uid` or everyone has
    /// as many speculative scans running as allowed.
    pub fn speculate(
        &self,
        uid: u32,
        image: Arc<ImageFile>,
        pidfile: Option<PathBuf>,
        view: View,
        cancel: &CancellationToken,
    ) -> Option<Speculation> {
        if image.other_files.is_some() {
            return None;
        }
        let counted = (self.inner.speculations)
            .admit(uid, SPECULATIONS_PER_USER, Some(SPECULATIONS))
            .ok()?;
        let counted = Arc::new(counted);
        let started = Instant::now();
        let scan = self.start_scan(
            image.clone(),
            pidfile.clone(),
            view.clone(),
            cancel,
            counted.clone(),
        );
        Some(Speculation {
            image,
            pidfile,
            view,
            started,
            scan,
            _held_until_done: counted,
        })
    }

    /// Starts finding out who uses `image`, in a blocking thread: the scan
    /// reads /proc, where a read can hang (a process stuck on FUSE or dead
    /// NFS holds its mm lock), and so can opening the caller's PID file on
    /// its own FUSE mount. It stops when `cancel` fires or the returned
    /// scan is dropped.
    ///
    /// A read stuck in the kernel does not see that stop, so
    /// `held_until_done` (the scan's count, or the check's slots) goes with
    /// the thread and counts until the thread has really ended
    /// ([`uid_counts::spawn_stoppable`]): the limits bound threads, not
    /// answers still awaited, and a caller who abandons scans (a refused
    /// one: at once) cannot pile up threads.
    fn start_scan(
        &self,
        image: Arc<ImageFile>,
        pidfile: Option<PathBuf>,
        view: View,
        cancel: &CancellationToken,
        held_until_done: impl Send + 'static,
    ) -> RunningScan {
        let scanner = self.inner.scanner.clone();
        let path = image.path.clone();
        let job = uid_counts::spawn_stoppable(held_until_done, cancel, move |stop| {
            scanner.scan(&image, pidfile.as_deref(), &view, stop)
        });
        RunningScan { image: path, job }
    }

    /// For a repair: the handle qemu-img must reopen instead of the image's
    /// own descriptor, when that is on a read-only mount
    /// ([`writable::handle_for_repair`]); `None` when it is not. In a
    /// blocking thread that holds the check's `slots` until it has ended
    /// (fstatvfs on a hung FUSE mount does not return), by the check's
    /// deadline (and its `limit`, for the message).
    async fn writable_handle(
        &self,
        image: &Arc<ImageFile>,
        (deadline, limit): (Instant, Duration),
        cancel: &CancellationToken,
        slots: &Arc<Slots>,
    ) -> Result<Option<std::os::fd::OwnedFd>, CheckErrorKind> {
        let socket = self.inner.opener_socket.clone();
        let job = uid_counts::spawn_stoppable(slots.clone(), cancel, {
            let (image, socket) = (image.clone(), socket.clone());
            move |_| writable::handle_for_repair(&image, &socket, writable::OPENER_TIMEOUT)
        });
        let not_writable = |reason| CheckErrorKind::NotWritable {
            image: image.path.clone(),
            socket: socket.clone(),
            reason,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match job.finish(left, cancel).await {
            Ok(Ok(handle)) => Ok(handle),
            Ok(Err(reason)) => {
                tracing::warn!(
                    "no writable handle for a repair of {}: {reason}",
                    image.path.display()
                );
                Err(not_writable(reason))
            }
            Err(Unfinished::Cancelled) => Err(CheckErrorKind::CancelledBeforeStart),
            Err(Unfinished::TimedOut) => Err(CheckErrorKind::Timeout(limit)),
            Err(Unfinished::Panicked(e)) => Err(not_writable(NotWritable::Inspect(
                std::io::Error::other(e.to_string()),
            ))),
        }
    }

    /// Claims `image` for one check by caller `uid`: `Busy` when a check of
    /// the same file (by device and inode, whatever the path) is running,
    /// `TooManyChecks` when that caller has as many as it may.
    pub fn reserve(&self, image: Arc<ImageFile>, uid: u32) -> Result<Reservation, CheckErrorKind> {
        let admission = self.admit(uid)?;
        if !lock(&self.inner.running).insert((image.dev, image.ino)) {
            return Err(CheckErrorKind::Busy(image.path.clone()));
        }
        Ok(Reservation {
            checker: self.clone(),
            image,
            admission,
        })
    }

    /// Runs one check of a reserved image, as `check_as`.
    /// `cancel` stops it at any point (qemu-img included). The whole check,
    /// waiting for a slot included, ends within the caller's `timeout` (at
    /// most the configured one). A `speculation` started for this check's
    /// scan is its answer if the check got its slot at once and the
    /// speculation is fresh (see [`Speculation`]); otherwise it is stopped
    /// and the check scans itself.
    pub async fn check(
        &self,
        reservation: Reservation,
        options: &CheckOptions,
        check_as: &CheckAs,
        cancel: &CancellationToken,
        speculation: Option<Speculation>,
    ) -> Result<DiskReport, CheckError> {
        let started = Instant::now();
        let image = reservation.image.clone();
        let mut report = DiskReport::unchecked(&image, check_as.run_as.uid);
        let fail = |kind: CheckErrorKind, mut report: DiskReport| {
            report.duration = started.elapsed();
            CheckError {
                kind,
                report: Box::new(report),
            }
        };
        if let Some(reason) = image.other_files {
            let kind = CheckErrorKind::OtherFiles {
                image: image.path.clone(),
                reason,
            };
            return Err(fail(kind, report));
        }
        // The configured limit is the administrator's upper bound; a caller
        // may only ask for less.
        let limit = options.timeout.map_or(self.inner.limits.timeout, |t| {
            t.min(self.inner.limits.timeout)
        });
        let deadline = started + limit;

        // Wait for a slot first, then look at the users: the answer must be
        // fresh when qemu-img starts, not from before a long wait. So a
        // speculative scan is kept only if the slots are free at once.
        let mut speculation = speculation;
        let slots = match self.free_slots(&reservation.admission, check_as.administrator) {
            Some(slots) => slots,
            None => {
                speculation = None;
                match self
                    .wait_for_slot(
                        &reservation.admission,
                        check_as.administrator,
                        deadline,
                        limit,
                        cancel,
                    )
                    .await
                {
                    Ok(slots) => slots,
                    Err(kind) => return Err(fail(kind, report)),
                }
            }
        };
        // Held by the check and by its own scan's thread: a check cancelled
        // (or its caller gone) while that scan is stuck in the kernel frees
        // its slots only once the thread has ended.
        let slots = Arc::new(slots);
        let scan = speculation
            .and_then(|s| s.take_for(&image, &options.pidfile, &check_as.view))
            .unwrap_or_else(|| {
                let (pidfile, view) = (options.pidfile.clone(), check_as.view.clone());
                self.start_scan(image.clone(), pidfile, view, cancel, slots.clone())
            });

        // The scan, too, ends by the check's deadline.
        let scan_limit = deadline
            .saturating_duration_since(Instant::now())
            .min(SCAN_TIMEOUT);
        report.usage = match finish_scan(scan, scan_limit, cancel).await {
            Ok(usage) => usage,
            Err(ScanError::Cancelled) => {
                return Err(fail(CheckErrorKind::CancelledBeforeStart, report));
            }
            Err(ScanError::TimedOut) if scan_limit < SCAN_TIMEOUT => {
                return Err(fail(CheckErrorKind::Timeout(limit), report));
            }
            Err(e) => return Err(fail(e.into(), report)),
        };
        let blocking = report.usage.blocking_users();
        if !blocking.is_empty() {
            if options.repair.is_some() {
                return Err(fail(
                    CheckErrorKind::RepairInUse(image.path.clone()),
                    report,
                ));
            }
            if !options.force_share {
                let kind = CheckErrorKind::InUse {
                    image: image.path.clone(),
                    users: blocking,
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

        let reopen = match options.repair {
            None => None,
            Some(_) => match self
                .writable_handle(&image, (deadline, limit), cancel, &slots)
                .await
            {
                Ok(handle) => handle.map(Arc::new),
                Err(kind) => return Err(fail(kind, report)),
            },
        };
        let Some(remaining) = deadline.checked_duration_since(Instant::now()) else {
            return Err(fail(CheckErrorKind::Timeout(limit), report));
        };
        let request = CheckRequest {
            qemu_img: self.inner.qemu_img.clone(),
            image: image.clone(),
            reopen,
            force_share: options.force_share,
            repair: options.repair,
            run_as: check_as.run_as.clone(),
            timeout: remaining,
        };
        match qemu_img::run_check(&request, &self.inner.children, cancel).await {
            Ok(CheckOutcome { result, counts }) => {
                report.result = Some(result);
                report.counts = counts;
                report.duration = started.elapsed();
                Ok(report)
            }
            Err(QemuImgError::LockConflict { stderr }) => {
                // Something took the lock between the scan and qemu-img's
                // open: still "in use", never a plain failure — but who it
                // is, the scan did not see.
                tracing::info!(image = %image.path.display(), %stderr, "qemu-img hit a lock conflict");
                let kind = CheckErrorKind::LockedMeanwhile {
                    image: image.path.clone(),
                    stderr,
                };
                Err(fail(kind, report))
            }
            Err(QemuImgError::Timeout(_)) => Err(fail(CheckErrorKind::Timeout(limit), report)),
            Err(QemuImgError::CancelledBeforeStart) => {
                Err(fail(CheckErrorKind::CancelledBeforeStart, report))
            }
            Err(e) => Err(fail(e.into(), report)),
        }
    }
}

/// Whose check it is: the credentials qemu-img runs with, the view in
/// which the caller's PID files are read, and whether the caller is an
/// administrator (root, or authorized for other users' images), for whom
/// a check slot is kept free.
#[derive(Debug, Clone)]
pub struct CheckAs {
    pub run_as: RunAs,
    pub view: View,
    pub administrator: bool,
}

impl CheckAs {
    /// For a caller authorized to act on other users' images: qemu-img runs
    /// as `run_as` (the owner), files are looked at as the service.
    pub fn service(run_as: RunAs) -> CheckAs {
        CheckAs {
            run_as,
            view: View::Service,
            administrator: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::usage::FoundBy;
    use crate::test_support::{DeadFuse, eventually};

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
            in_use_message(image, &[user(4242, true, "win11")]),
            "disk.qcow2 is in use by VM \"win11\" (PID 4242, qemu-system-x86_64, found by \
             pidfile, proc, lock); stop the VM or pass force-share"
        );
        let msg = in_use_message(image, &[user(7, false, "")]);
        assert!(msg.contains("another process (PID 7"), "{msg}");
        assert!(msg.ends_with("close it or pass force-share"), "{msg}");
        let msg = in_use_message(image, &[user(0, true, "")]);
        assert!(msg.contains("cannot see"), "{msg}");
    }

    #[test]
    fn in_use_message_names_every_vm_up_to_three() {
        let image = std::path::Path::new("/srv/shared.qcow2");
        let msg = in_use_message(image, &[user(10, true, "a"), user(11, true, "b")]);
        assert_eq!(
            msg,
            "shared.qcow2 is in use by VM \"a\" (PID 10, qemu-system-x86_64, found by pidfile, \
             proc, lock) and VM \"b\" (PID 11, qemu-system-x86_64, found by pidfile, proc, \
             lock); stop the VMs or pass force-share"
        );
        let five: Vec<DiskUser> = (0..5).map(|i| user(20 + i, true, "v")).collect();
        let msg = in_use_message(image, &five);
        assert!(msg.contains("PID 22") && !msg.contains("PID 23"), "{msg}");
        assert!(msg.contains(", VM \"v\" (PID 21"), "{msg}");
        assert!(msg.contains(" and 2 more; stop the VMs"), "{msg}");
    }

    /// A checker whose qemu-img is a stand-in, with one slot in all and one
    /// per user, and one waiting check per user.
    struct Fixture {
        dir: tempfile::TempDir,
        checker: DiskChecker,
    }

    impl Fixture {
        /// qemu-img hangs.
        fn hanging() -> Fixture {
            Fixture::new("exec sleep 600")
        }

        /// qemu-img says "clean" at once.
        fn clean() -> Fixture {
            Fixture::new("echo '{\"check-errors\": 0}'")
        }

        fn new(script_body: &str) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let script = dir.path().join("qemu-img");
            std::fs::write(&script, format!("#!/bin/sh\n{script_body}\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            let limits = Limits {
                timeout: Duration::from_secs(600),
                concurrent: 1,
                per_user: 1,
                queued_per_user: 1,
            };
            let scanner = UsageScanner::new("/proc".into(), Vec::new());
            let opener = dir.path().join("no-opener.socket");
            let checker = DiskChecker::new(scanner, script, opener, limits);
            Fixture { dir, checker }
        }

        fn image(&self, name: &str) -> Arc<ImageFile> {
            let path = self.dir.path().join(name);
            let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
            header.resize(4096, 0);
            std::fs::write(&path, header).unwrap();
            Arc::new(ImageFile::open(path.to_str().unwrap()).unwrap())
        }

        fn check_as(&self) -> CheckAs {
            // SAFETY: plain getters.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            CheckAs::service(RunAs {
                uid,
                gid,
                groups: vec![],
            })
        }
    }

    /// A process of this test holding `image` open for writing: a user that
    /// blocks a check. Killed on drop.
    struct Writer(std::process::Child);

    impl Writer {
        fn start(image: &ImageFile) -> Writer {
            let child = std::process::Command::new("sh")
                .arg("-c")
                .arg(r#"exec 3<>"$1"; exec sleep 600"#)
                .arg("sh")
                .arg(&image.path)
                .spawn()
                .unwrap();
            let fd = format!("/proc/{}/fd/3", child.id());
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_link(&fd).map_or(true, |target| target != image.path) {
                assert!(
                    Instant::now() < deadline,
                    "the writer did not open the image"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Writer(child)
        }
    }

    impl Drop for Writer {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A speculative scan of `image` by uid 1000 in the service's view,
    /// finished.
    async fn finished_speculation(h: &Fixture, image: &Arc<ImageFile>) -> Speculation {
        let never = CancellationToken::new();
        let view = h.check_as().view;
        let speculation = h
            .checker
            .speculate(1000, image.clone(), None, view, &never)
            .expect("within the limits");
        while !speculation.scan.job.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        speculation
    }

    async fn check_with(
        h: &Fixture,
        image: &Arc<ImageFile>,
        speculation: Speculation,
    ) -> Result<DiskReport, CheckError> {
        let reservation = h.checker.reserve(image.clone(), 1000).unwrap();
        let never = CancellationToken::new();
        let options = CheckOptions::default();
        h.checker
            .check(
                reservation,
                &options,
                &h.check_as(),
                &never,
                Some(speculation),
            )
            .await
    }

    #[tokio::test]
    async fn a_speculative_scan_answers_only_when_fresh_and_no_slot_was_waited_for() {
        let h = Fixture::clean();
        let image = h.image("a");
        // Four scans that found nobody...
        let mut fresh = finished_speculation(&h, &image).await;
        let mut stale = finished_speculation(&h, &image).await;
        let mut after_a_wait = finished_speculation(&h, &image).await;
        let mut other_pidfile = finished_speculation(&h, &image).await;
        // ...and from now on a writer holds the image.
        let _writer = Writer::start(&image);
        let in_use = |r: Result<DiskReport, CheckError>| {
            matches!(
                r,
                Err(CheckError {
                    kind: CheckErrorKind::InUse { .. },
                    ..
                })
            )
        };

        // Fresh: its answer is the check's (it saw nobody).
        fresh.started = Instant::now();
        let report = check_with(&h, &image, fresh).await.unwrap();
        assert_eq!(report.result, Some(CheckResult::Clean));
        assert!(report.usage.users.is_empty());

        // Older than SPECULATION_FRESH: the check looks again.
        stale.started = Instant::now() - SPECULATION_FRESH - Duration::from_millis(10);
        assert!(in_use(check_with(&h, &image, stale).await));

        // Fresh, but the check waited for its slot: it looks again.
        let slot = h.checker.inner.slots.try_acquire().unwrap();
        after_a_wait.started = Instant::now();
        let free_the_slot = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(slot);
        };
        let (result, ()) = tokio::join!(check_with(&h, &image, after_a_wait), free_the_slot);
        assert!(in_use(result));

        // Fresh, but not this check's scan (another PID file): not used.
        other_pidfile.pidfile = Some("/nonexistent/vm.pid".into());
        other_pidfile.started = Instant::now();
        assert!(in_use(check_with(&h, &image, other_pidfile).await));
        assert!(h.checker.inner.speculations.total() == 0);
    }

    #[tokio::test]
    async fn speculative_scans_are_bounded_per_user_and_in_all() {
        let h = Fixture::hanging();
        let image = h.image("a");
        let never = CancellationToken::new();
        let speculate = |uid: u32| {
            h.checker
                .speculate(uid, image.clone(), None, View::Service, &never)
        };
        let mine: Vec<Speculation> = (0..SPECULATIONS_PER_USER)
            .map(|_| speculate(1000).expect("within the limits"))
            .collect();
        assert!(speculate(1000).is_none());
        let others: Vec<Speculation> = (0..SPECULATIONS - SPECULATIONS_PER_USER)
            .map(|i| speculate(2000 + i as u32).expect("within the limits"))
            .collect();
        assert!(speculate(5000).is_none());
        // Stopped scans stop counting once their threads have ended.
        drop(mine);
        eventually("uid 1000's scans end", || {
            h.checker.inner.speculations.of(1000) == 0
        })
        .await;
        assert!(speculate(1000).is_some());
        drop(others);
        eventually("every scan ends", || {
            h.checker.inner.speculations.total() == 0
        })
        .await;
    }

    fn nobodys_view() -> View {
        View::User(RunAs {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        })
    }

    /// A fixture, an image, and a PID file path whose lookup hangs.
    fn with_a_pidfile_that_hangs() -> (Fixture, Arc<ImageFile>, DeadFuse, Option<PathBuf>) {
        let h = Fixture::clean();
        let image = h.image("a");
        let fuse = DeadFuse::mount();
        let pidfile = Some(fuse.path().join("vm.pid"));
        (h, image, fuse, pidfile)
    }

    /// A caller polkit refuses drops each speculation at once, but a scan
    /// stuck in the kernel (here: reading the caller's PID file on its own
    /// FUSE mount) cannot be stopped. Such a scan still counts: otherwise
    /// every refused call would pin one more blocking thread, without end.
    #[tokio::test]
    async fn a_speculative_scan_counts_until_its_thread_has_ended() {
        let (h, image, fuse, pidfile) = with_a_pidfile_that_hangs();
        let nobody = nobodys_view();
        let never = CancellationToken::new();
        let speculate = || {
            h.checker
                .speculate(1000, image.clone(), pidfile.clone(), nobody.clone(), &never)
        };
        for _ in 0..SPECULATIONS_PER_USER {
            let refused = speculate().expect("within the limits");
            // Past /proc, into the PID file, and stuck there.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!refused.scan.job.is_finished(), "the scan is stuck");
            drop(refused);
        }
        assert!(
            speculate().is_none(),
            "{SPECULATIONS_PER_USER} stuck scans, and a refused caller may start another"
        );
        drop(fuse);
        eventually("the stuck scans end and stop counting", || {
            h.checker.inner.speculations.total() == 0
        })
        .await;
        assert!(speculate().is_some());
    }

    /// The same for GetDiskUsers: a caller who leaves (or times out) while
    /// its scan is stuck has not freed that scan's place.
    #[tokio::test]
    async fn an_abandoned_get_disk_users_scan_counts_until_its_thread_has_ended() {
        let (h, image, fuse, pidfile) = with_a_pidfile_that_hangs();
        let never = CancellationToken::new();
        let users = || {
            h.checker.users(
                1000,
                image.clone(),
                pidfile.clone(),
                nobodys_view(),
                &never,
                None,
            )
        };
        for _ in 0..SCANS_PER_USER {
            // The caller gives up: the answer is dropped, the thread stays.
            let gave_up = tokio::time::timeout(Duration::from_millis(300), users()).await;
            assert!(gave_up.is_err(), "the scan is stuck");
        }
        let next = tokio::time::timeout(Duration::from_secs(5), users()).await;
        assert!(
            matches!(next, Ok(Err(ScanError::TooMany { uid: 1000, .. }))),
            "{SCANS_PER_USER} stuck scans, and the caller may start another"
        );
        drop(fuse);
        eventually("the stuck scans end and stop counting", || {
            h.checker.inner.scans.total() == 0
        })
        .await;
    }

    /// The same for CheckDisk's own scan: a check cancelled (Job.Cancel, its
    /// caller gone, its deadline) while its scan is stuck frees its slot
    /// only once that scan's thread has ended. Otherwise cancelling would
    /// pin one more thread per check, past every check limit.
    #[tokio::test]
    async fn a_cancelled_checks_scan_holds_its_slot_until_its_thread_has_ended() {
        let (h, image, fuse, pidfile) = with_a_pidfile_that_hangs();
        let check_as = CheckAs {
            view: nobodys_view(),
            ..h.check_as()
        };
        let options = CheckOptions {
            pidfile,
            ..CheckOptions::default()
        };
        let cancel = CancellationToken::new();
        let reservation = h.checker.reserve(image, 1000).unwrap();
        let check = h
            .checker
            .check(reservation, &options, &check_as, &cancel, None);
        let cancel_once_stuck = async {
            // Past /proc, into the PID file, and stuck there.
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        };
        let (cancelled, ()) = tokio::join!(check, cancel_once_stuck);
        let e = cancelled.unwrap_err();
        assert!(
            matches!(e.kind, CheckErrorKind::CancelledBeforeStart),
            "{e}"
        );

        // The one slot is still the stuck scan's: another check waits in vain.
        let never = CancellationToken::new();
        let next = h.checker.reserve(h.image("b"), 2000).unwrap();
        let briefly = CheckOptions {
            timeout: Some(Duration::from_millis(300)),
            ..CheckOptions::default()
        };
        let e = (h.checker)
            .check(next, &briefly, &h.check_as(), &never, None)
            .await
            .unwrap_err();
        assert!(matches!(e.kind, CheckErrorKind::NoSlot { .. }), "{e}");

        drop(fuse);
        eventually("the stuck scan ends and frees its slot", || {
            h.checker.inner.slots.available_permits() == 1
        })
        .await;
        let next = h.checker.reserve(h.image("c"), 2000).unwrap();
        let options = CheckOptions::default();
        let report = (h.checker)
            .check(next, &options, &h.check_as(), &never, None)
            .await
            .unwrap();
        assert_eq!(report.result, Some(CheckResult::Clean));
    }

    #[tokio::test]
    async fn get_disk_users_scans_are_limited_per_user_apart_from_checks() {
        let h = Fixture::hanging();
        let held: Vec<Counted> = (0..SCANS_PER_USER)
            .map(|_| h.checker.admit_scan(1000).unwrap())
            .collect();
        let never = CancellationToken::new();
        let users = |uid| {
            let view = h.check_as().view;
            h.checker.users(uid, h.image("a"), None, view, &never, None)
        };
        assert!(matches!(
            users(1000).await,
            Err(ScanError::TooMany {
                uid: 1000,
                limit: SCANS_PER_USER
            })
        ));
        // Another user, and the same user's checks, are not affected.
        assert!(users(2000).await.unwrap().users.is_empty());
        drop(h.checker.reserve(h.image("b"), 1000).unwrap());
        drop(held);
        assert!(users(1000).await.is_ok());
        assert!(h.checker.inner.scans.total() == 0);
    }

    #[tokio::test]
    async fn limits_per_user_waiting_and_cancelling_before_start() {
        let h = Fixture::hanging();
        let hang = CancellationToken::new();
        let first = h.checker.reserve(h.image("a"), 1000).unwrap();
        let running = {
            let (checker, check_as, hang) = (h.checker.clone(), h.check_as(), hang.clone());
            tokio::spawn(async move {
                checker
                    .check(first, &CheckOptions::default(), &check_as, &hang, None)
                    .await
            })
        };
        while h.checker.inner.slots.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        // The same image, whatever the caller: Busy.
        assert!(matches!(
            h.checker.reserve(h.image("a"), 2000),
            Err(CheckErrorKind::Busy(_))
        ));
        // uid 1000 may have one more waiting, not two.
        let waiting = h.checker.reserve(h.image("b"), 1000).unwrap();
        assert!(matches!(
            h.checker.reserve(h.image("c"), 1000),
            Err(CheckErrorKind::TooManyChecks {
                uid: 1000,
                limit: 2
            })
        ));
        // The waiting check gives up at its deadline: no slot came free.
        let options = CheckOptions {
            timeout: Some(Duration::from_millis(300)),
            ..CheckOptions::default()
        };
        let never = CancellationToken::new();
        let e = h
            .checker
            .check(waiting, &options, &h.check_as(), &never, None)
            .await
            .unwrap_err();
        assert!(matches!(e.kind, CheckErrorKind::NoSlot { .. }), "{e}");
        // Cancelled while waiting: says qemu-img never started.
        let waiting = h.checker.reserve(h.image("d"), 3000).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let e = h
            .checker
            .check(
                waiting,
                &CheckOptions::default(),
                &h.check_as(),
                &cancel,
                None,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e.kind, CheckErrorKind::CancelledBeforeStart),
            "{e}"
        );
        // The hanging one is stopped; then every limit is free again.
        hang.cancel();
        let e = running.await.unwrap().unwrap_err();
        assert!(
            matches!(e.kind, CheckErrorKind::QemuImg(QemuImgError::Cancelled)),
            "{e}"
        );
        assert_eq!(h.checker.inner.users.total(), 0);
        assert!(lock(&h.checker.inner.running).is_empty());
        assert_eq!(h.checker.inner.slots.available_permits(), 1);
    }
}
