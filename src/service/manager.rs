//! The manager object: `org.example.VmManager1` at `/org/example/VmManager`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vmmanager_client::CheckResult;
use vmmanager_client::names::polkit_detail;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, interface};

use super::MANAGER_PATH;
use super::callers::Callers;
use super::error::{ServiceFault, VmError};
use super::job::{Job, JobIds, JobInfo};
use super::options::{self, DiskOptions};
use super::values::{Dict, path_text, report_dict, users_list};
use crate::auth::{Action, Authority, Caller};
use crate::disk::checker::{CheckAs, CheckErrorKind, DiskChecker, DiskReport, Speculation};
use crate::disk::image::{self, ImageError, ImageFile};
use crate::disk::qemu_img::RunAs;
use crate::disk::view::View;
use crate::uid_counts::{self, Counted, OverLimit, UidCounts};
use zbus::DBusError;

/// Image lookups (the caller's path, opened off the async threads) one uid
/// may have running at once; more are [`TooManyLookups`] (`Busy`). A lookup
/// on a file system that never answers (the caller's own FUSE mount) is
/// stuck in the kernel for good, and it runs before polkit is asked, so
/// any local user could otherwise pin one thread per call. A lookup takes
/// milliseconds: a person, or a client asking in parallel, needs few.
pub const LOOKUPS_PER_USER: usize = 4;
/// Lookups of all callers but root together, so that many uids cannot use
/// up the service's blocking threads either. root is bounded only by its
/// own [`LOOKUPS_PER_USER`], so users cannot lock it out.
pub const LOOKUPS: usize = 32;
/// How long a lookup beyond those limits waits for one to end before it is
/// `Busy`: a burst of parallel calls (lookups take milliseconds) gets
/// through, while a caller's stuck lookups cost its next call only this.
const LOOKUP_WAIT: Duration = Duration::from_secs(2);

/// Why an image lookup was refused before it started: a limit of
/// [`LOOKUPS_PER_USER`] or [`LOOKUPS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooManyLookups {
    #[error(
        "uid {uid} already has {limit} image lookups running (a file system that does not \
         answer?); try again when one has finished"
    )]
    Caller { uid: u32, limit: usize },
    #[error(
        "{limit} image lookups of users other than root are running; try again when one has \
         finished"
    )]
    All { limit: usize },
}

/// State shared by the manager object and the daemon that owns it.
pub struct ManagerState {
    pub checker: DiskChecker,
    pub authority: Arc<Authority>,
    job_ids: JobIds,
    jobs: Mutex<Vec<OwnedObjectPath>>,
    /// Held while a change of Jobs is read and sent, so that the changes go
    /// out in the order they were read: the last one a client gets lists
    /// the jobs as they are (jobs start and end in tasks of their own).
    jobs_announcement: tokio::sync::Mutex<()>,
    /// Cancelled on daemon shutdown; every job's token is a child of it.
    shutdown: CancellationToken,
    /// Every check runs in a task of this tracker, so shutdown can wait for
    /// all of them (and their qemu-img children) to be gone.
    tasks: TaskTracker,
    /// Callers with work in progress; their work stops when they leave.
    pub callers: Arc<Callers>,
    /// Image lookups per caller uid, each counted until its thread has
    /// ended (see [`LOOKUPS_PER_USER`]).
    lookups: UidCounts,
}

impl ManagerState {
    /// The state, with the watch for departing callers already subscribed
    /// (so it must be created before the objects are served).
    pub async fn start(
        checker: DiskChecker,
        authority: Authority,
        connection: &Connection,
    ) -> zbus::Result<Arc<Self>> {
        let shutdown = CancellationToken::new();
        let callers = Callers::new(shutdown.clone());
        let watch = callers.watch(connection).await?;
        let tasks = TaskTracker::new();
        tasks.spawn(watch);
        Ok(Arc::new(ManagerState {
            checker,
            authority: Arc::new(authority),
            job_ids: JobIds::default(),
            jobs: Mutex::new(Vec::new()),
            jobs_announcement: tokio::sync::Mutex::new(()),
            shutdown,
            tasks,
            callers,
            lookups: UidCounts::default(),
        }))
    }

    /// Cancels every job and returns when all of them (qemu-img included)
    /// have ended. A check that arrives after this ends at once as
    /// `Cancelled` (its token is a child of the cancelled one).
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.authority.stop().await;
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

    /// Opens the image the caller names and decides, with polkit, whose
    /// credentials the work runs with — revealing nothing before polkit has
    /// said yes, and nothing beyond what it said yes to.
    ///
    /// The path is first looked up with the caller's own permissions. Only
    /// if that finds a file the caller owns is `check-disk` asked for; in
    /// every other case (missing, unreachable for the caller, not a regular
    /// file, someone else's) it is `check-disk-other-user`. The choice thus
    /// depends only on what the caller could see itself, and a refusal is
    /// the same whatever is there. A caller authorized for other users'
    /// images may then see what the service sees: only then is the path
    /// looked up as root (when the caller's own lookup failed), and polkit
    /// is asked again if that lookup lands somewhere other than the path
    /// the caller named, so a rule that trusts a directory sees where the
    /// check really goes.
    ///
    /// In the common case, a caller's own image found by its own lookup,
    /// the in-use scan runs while polkit is asked: it is the very scan the
    /// work would start once authorized (same file, PID file and caller's
    /// view), so it may start early. Its answer stays unread unless
    /// authorized (it is dropped, and stopped, on any refusal or error);
    /// the refusal is the same and comes as soon, whatever it finds.
    /// `cancel` stops it too.
    async fn authorize_image(
        &self,
        header: &Header<'_>,
        path: &str,
        options: &DiskOptions,
        cancel: &CancellationToken,
    ) -> Result<Authorized, VmError> {
        image::validate_path(path)?;
        let authority = &self.state.authority;
        let caller = authority.caller(header).await?;
        let lookups = &self.state.lookups;
        let counted = admit_lookup(lookups, caller.uid, LOOKUP_WAIT).await?;
        let (own, seen) = look_as_caller(&caller, path, counted).await?;
        let own_view = View::User(own.clone());
        let ask = |action: Action, image: String| {
            let caller = &caller;
            async move {
                let details = HashMap::from([(polkit_detail::IMAGE, image.as_str())]);
                authority
                    .check(header, caller, action, options.interactive, &details)
                    .await
            }
        };
        // libvirt's dynamic ownership: while a system VM runs, the caller's
        // image belongs to libvirt-qemu, and libvirt remembers the caller.
        let libvirt_owned = |owner: Option<u32>| caller.uid != 0 && owner == Some(caller.uid);
        let mut speculation = None;
        let (image, check_as) = match seen {
            Seen::Readable(image, _) if image.uid == caller.uid => {
                let image = Arc::new(image);
                speculation = self.state.checker.speculate(
                    caller.uid,
                    image.clone(),
                    options.check.pidfile.clone(),
                    own_view.clone(),
                    cancel,
                );
                ask(Action::CheckDisk, path_text(&image.path)).await?;
                let check_as = CheckAs {
                    run_as: own,
                    view: own_view,
                    administrator: caller.uid == 0,
                };
                (image, check_as)
            }
            Seen::Readable(image, owner) | Seen::Unreadable(image, owner)
                if libvirt_owned(owner) =>
            {
                ask(Action::CheckDisk, path_text(&image.path)).await?;
                // qemu-img reopens the image with the caller's own
                // permissions: a file it may not read is not checked for it.
                let check_as = CheckAs {
                    run_as: own,
                    view: own_view,
                    administrator: false,
                };
                (Arc::new(image), check_as)
            }
            Seen::Readable(image, _) | Seen::Unreadable(image, _) => {
                ask(Action::CheckDiskOtherUser, path_text(&image.path)).await?;
                let run_as = run_as_owner(&caller, own, image.uid).await?;
                (Arc::new(image), CheckAs::service(run_as))
            }
            Seen::Unreachable => {
                ask(Action::CheckDiskOtherUser, path.to_owned()).await?;
                let counted = admit_lookup(lookups, caller.uid, LOOKUP_WAIT).await?;
                let image = open_in(path, View::Service, counted).await??;
                if path_text(&image.path) != path {
                    ask(Action::CheckDiskOtherUser, path_text(&image.path)).await?;
                }
                let run_as = run_as_owner(&caller, own, image.uid).await?;
                (Arc::new(image), CheckAs::service(run_as))
            }
        };
        if options.check.repair.is_some() {
            ask(Action::RepairDisk, path_text(&image.path)).await?;
        }
        Ok(Authorized {
            image,
            caller_uid: caller.uid,
            check_as,
            speculation,
        })
    }
}

/// An opened image, whose it is to check, and the in-use scan that may
/// already be running for it.
struct Authorized {
    image: Arc<ImageFile>,
    caller_uid: u32,
    check_as: CheckAs,
    speculation: Option<Speculation>,
}

fn internal(e: tokio::task::JoinError) -> VmError {
    ServiceFault::Task(e).into()
}

/// One more image lookup for `uid` in `lookups`: within
/// [`LOOKUPS_PER_USER`], and (but for root) within [`LOOKUPS`], once one
/// has ended if need be, waiting up to `wait`; else `Busy`. The count must
/// go into the lookup's own thread.
async fn admit_lookup(lookups: &UidCounts, uid: u32, wait: Duration) -> Result<Counted, VmError> {
    let all = (uid != 0).then_some(LOOKUPS);
    let refused = match lookups.admit_within(uid, LOOKUPS_PER_USER, all, wait).await {
        Ok(counted) => return Ok(counted),
        Err(OverLimit::Caller) => TooManyLookups::Caller {
            uid,
            limit: LOOKUPS_PER_USER,
        },
        Err(OverLimit::All) => TooManyLookups::All { limit: LOOKUPS },
    };
    Err(refused.into())
}

/// Opens `path` in `view`, off the async threads (a lookup can block on a
/// slow file system, for good on a dead FUSE mount: so `counted` goes with
/// the thread and counts until it has ended). The outer error is the
/// service's own failure.
async fn open_in(
    path: &str,
    view: View,
    counted: Counted,
) -> Result<Result<ImageFile, ImageError>, VmError> {
    let path = path.to_owned();
    uid_counts::spawn_holding(counted, move || ImageFile::open_in(&path, &view))
        .await
        .map_err(internal)
}

/// What a caller's own lookup of an image found, as the service sees it:
/// with the owner libvirt remembers for it ([`ImageFile::libvirt_owner`]).
enum Seen {
    /// A regular file the caller may read.
    Readable(ImageFile, Option<u32>),
    /// A regular file the caller found but may not read, opened by the
    /// service through the caller's own lookup.
    Unreadable(ImageFile, Option<u32>),
    /// Nothing the caller can reach: missing, forbidden, not a regular file.
    Unreachable,
}

/// The caller's credentials, and what its own lookup of `path` found (see
/// [`Seen`]), in one trip off the async threads: getpwuid_r may ask NSS
/// (LDAP, …), and a lookup or an attribute read can wait on a slow file
/// system. Only the service's own trouble is an error.
///
/// The credentials are the caller's passwd entry with its actual groups as
/// the bus saw them (newgrp, sg, systemd's SupplementaryGroups) rather than
/// the group database's idea.
///
/// This runs before polkit is asked, for any caller, and a lookup on a file
/// system that never answers cannot be stopped: `counted` (the caller's
/// lookup count) goes with the thread and counts until it has ended, not
/// until the caller gives up.
async fn look_as_caller(
    caller: &Caller,
    path: &str,
    counted: Counted,
) -> Result<(RunAs, Seen), VmError> {
    let (uid, groups, path) = (caller.uid, caller.groups.clone(), path.to_owned());
    uid_counts::spawn_holding(counted, move || {
        let own = RunAs::for_user_with_groups(uid, groups).map_err(ServiceFault::UserLookup)?;
        let seen = seen_as_service(ImageFile::open_in(&path, &View::User(own.clone())))?;
        Ok((own, seen))
    })
    .await
    .map_err(internal)?
}

/// Turns the caller's lookup into [`Seen`]; the service's own trouble is an
/// error, never "nothing the caller can reach". Blocking.
fn seen_as_service(seen: Result<ImageFile, ImageError>) -> Result<Seen, VmError> {
    let seen = match seen {
        Err(e) if e.is_service_fault() => return Err(e.into()),
        Ok(image) => {
            let owner = image.libvirt_owner();
            Seen::Readable(image, owner)
        }
        Err(ImageError::Unreadable { pinned, .. }) => match ImageFile::open_pinned(*pinned) {
            Ok(image) => {
                let owner = image.libvirt_owner();
                Seen::Unreadable(image, owner)
            }
            Err(e) if e.is_service_fault() => return Err(e.into()),
            Err(_) => Seen::Unreachable,
        },
        Err(_) => Seen::Unreachable,
    };
    Ok(seen)
}

/// Who qemu-img runs as for an image owned by `owner`: the owner (never
/// root for someone else's image), or the caller itself for its own.
async fn run_as_owner(caller: &Caller, own: RunAs, owner: u32) -> Result<RunAs, VmError> {
    if owner == caller.uid {
        return Ok(own);
    }
    lookup_user(owner).await
}

/// `uid`'s passwd credentials. getpwuid_r may ask NSS (LDAP, …): it runs
/// off the async threads.
async fn lookup_user(uid: u32) -> Result<RunAs, VmError> {
    tokio::task::spawn_blocking(move || RunAs::for_user(uid))
        .await
        .map_err(internal)?
        .map_err(|e| ServiceFault::UserLookup(e).into())
}

/// Checks VM disk images without ever fighting a running VM, and (with the
/// PciDevice objects below this path) manages PCI passthrough.
#[interface(name = "org.example.VmManager1")]
impl Manager {
    // Signals first (see "Member order" in the `service` module docs).
    /// Emitted after every finished check (the report, plus `error` and
    /// `error-message` when the check ended in an error).
    #[zbus(signal)]
    async fn disk_checked(
        emitter: &SignalEmitter<'_>,
        image: &str,
        report: Dict,
    ) -> zbus::Result<()>;

    /// Checks a VM disk image with `qemu-img check`, unless a running VM or
    /// another process uses it (then the error `InUse` names the VM and PID).
    /// Options: `pidfile` (s), `force-share` (b), `repair` (s: `leaks` or
    /// `all`), `timeout-sec` (u), `auth.no-user-interaction` (b). Returns the
    /// report dictionary described in `dbus/org.example.VmManager1.xml`. While it runs, the check is a
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
        let guard = self.state.callers.guard(&header)?;
        let Authorized {
            image,
            caller_uid: caller,
            check_as,
            speculation,
        } = guard
            .until_gone(self.authorize_image(&header, image, &options, guard.token()))
            .await?;
        // Busy is refused here, before a job or a DiskChecked signal exists:
        // the check that is running is the one that will report.
        let reservation = self.state.checker.reserve(image.clone(), caller)?;

        let state = self.state.clone();
        let connection = connection.clone();
        let emitter = emitter.into_owned();
        // The whole job, signals included, is one tracked task: it finishes
        // even if this method call is dropped, and shutdown waits for it.
        // Its answer comes once DiskChecked and Completed are sent; removing
        // the job object and announcing that is a tracked task of its own,
        // which the caller does not wait for.
        let job = self.state.tasks.spawn(async move {
            let path = state.job_ids.next_path();
            // Cancelled by Job.Cancel, by the caller leaving, or by shutdown.
            let cancel = guard.token().child_token();
            let info = JobInfo::new("check-disk", path_text(&image.path), caller);
            let server = connection.object_server();
            let ended = Arc::new(AtomicBool::new(false));
            let job = Job::new(
                info,
                cancel.clone(),
                ended.clone(),
                state.authority.clone(),
                state.callers.clone(),
            );
            // The job object is exported and announced while the check runs:
            // Cancel works as soon as Jobs lists it (its token exists).
            let announce = async {
                if let Err(e) = server.at(&path, job).await {
                    tracing::warn!("cannot export job {path}: {e}");
                }
                state.set_job(&path, true);
                emit_jobs_changed(&state, &connection).await;
            };
            let check = async {
                tracing::info!(
                    image = %image.path.display(),
                    caller,
                    uid = check_as.run_as.uid,
                    "checking disk"
                );
                state
                    .checker
                    .check(reservation, &options.check, &check_as, &cancel, speculation)
                    .await
            };
            // The check first: it hands qemu-img's spawn (or the scan) to
            // its own thread before the announcement takes its turn.
            let (outcome, ()) = tokio::join!(check, announce);
            let (mut report, error): (DiskReport, Option<VmError>) = match outcome {
                Ok(report) => (report, None),
                Err(e) => {
                    let report = *e.report.clone();
                    (report, Some(VmError::from(e)))
                }
            };
            report.duration = started.elapsed();
            let dict = report_dict(&report, caller, error.as_ref());
            log_outcome(&report, error.as_ref());

            let image_path = path_text(&report.image);
            if let Err(e) = Manager::disk_checked(&emitter, &image_path, dict.clone()).await {
                tracing::warn!("cannot emit DiskChecked: {e}");
            }
            if let Ok(job_emitter) = SignalEmitter::new(&connection, &path) {
                let message = error
                    .as_ref()
                    .and_then(|e| e.description())
                    .unwrap_or_default();
                let _ = Job::completed(&job_emitter, error.is_none(), message).await;
            }
            // Before the answer goes out, the job is over for everyone:
            // Jobs no longer lists it and Cancel says it is gone.
            ended.store(true, Ordering::Release);
            state.set_job(&path, false);
            let cleanup_state = state.clone();
            state.tasks.spawn(async move {
                let _ = connection.object_server().remove::<Job, _>(&path).await;
                emit_jobs_changed(&cleanup_state, &connection).await;
            });
            match error {
                None => Ok(dict),
                Some(e) => Err(e),
            }
        });
        job.await.map_err(internal)?
    }

    /// Who uses the image now (PID files, /proc, QEMU's lock bytes), without
    /// running qemu-img. Options: `pidfile` (s), `auth.no-user-interaction`
    /// (b). Each entry: `pid` (u), `exe` (s), `vm-name` (s), `writable` (b),
    /// `found-by` (as), `pidfile` (s). `Busy` when the caller's uid already
    /// has `SCANS_PER_USER` of these running.
    #[zbus(out_args("users"))]
    async fn get_disk_users(
        &self,
        image: &str,
        options: HashMap<String, OwnedVariant>,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<Vec<Dict>, VmError> {
        let options = options::parse_get_disk_users(options)?;
        let guard = self.state.callers.guard(&header)?;
        let authorized = guard
            .until_gone(self.authorize_image(&header, image, &options, guard.token()))
            .await?;
        let usage = self
            .state
            .checker
            .users(
                authorized.caller_uid,
                authorized.image,
                options.check.pidfile.clone(),
                authorized.check_as.view,
                guard.token(),
                authorized.speculation,
            )
            .await
            .map_err(|e| VmError::from(CheckErrorKind::Scan(e)))?;
        Ok(users_list(&usage.users))
    }

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

async fn emit_jobs_changed(state: &ManagerState, connection: &Connection) {
    let _in_order = state.jobs_announcement.lock().await;
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
    let result = report.result.map(CheckResult::from);
    match error {
        None => tracing::info!(
            %image,
            result = result.as_ref().map_or("", CheckResult::as_str),
            leaks = report.counts.leaks,
            corruptions = report.counts.corruptions,
            "check finished"
        ),
        Some(e) => {
            tracing::info!(%image, error = %e.name(), message = e.description().unwrap_or_default(), "check failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{DeadFuse, eventually, with_failing_syscalls};

    fn user(uid: u32) -> Caller {
        Caller {
            uid,
            groups: Some(vec![uid]),
        }
    }

    /// Any caller's lookup runs before polkit is asked, and one on the
    /// caller's own dead FUSE mount cannot be stopped. It still counts once
    /// the caller has given up (left the bus, timed out): otherwise every
    /// abandoned call would pin one more blocking thread, without end.
    #[tokio::test]
    async fn a_lookup_counts_until_its_thread_has_ended() {
        let fuse = DeadFuse::mount();
        let lookups = UidCounts::default();
        let path = fuse.path().join("disk.qcow2");
        let path = path.to_str().unwrap();
        let nobody = user(65534);
        let look = || async {
            let counted = admit_lookup(&lookups, nobody.uid, LOOKUP_WAIT).await?;
            look_as_caller(&nobody, path, counted).await
        };
        for _ in 0..LOOKUPS_PER_USER {
            let gave_up = tokio::time::timeout(Duration::from_millis(300), look()).await;
            assert!(gave_up.is_err(), "the lookup is stuck");
        }
        // Waits for one of them to end, in vain, then is Busy.
        let next = tokio::time::timeout(LOOKUP_WAIT * 3, look()).await;
        let busy = format!("uid 65534 already has {LOOKUPS_PER_USER} image lookups running");
        assert!(
            matches!(&next, Ok(Err(VmError::Busy(m))) if m.starts_with(&busy)),
            "{LOOKUPS_PER_USER} stuck lookups, and the caller may start another"
        );
        // Another user is not affected.
        let daemon = user(1);
        let counted = admit_lookup(&lookups, daemon.uid, LOOKUP_WAIT)
            .await
            .unwrap();
        let elsewhere = look_as_caller(&daemon, "/nonexistent/disk.qcow2", counted).await;
        assert!(matches!(elsewhere, Ok((_, Seen::Unreachable))));
        drop(fuse);
        eventually("the stuck lookups end and stop counting", || {
            lookups.total() == 0
        })
        .await;
    }

    /// systemd's `RestrictSUIDSGID=yes` makes openat2 fail with ENOSYS: a
    /// caller's own image is still the caller's own (`check-disk`, not
    /// `check-disk-other-user`). A lookup that cannot be done at all is
    /// the service's fault, never someone else's image.
    #[test]
    fn a_callers_own_image_is_its_own_where_a_seccomp_filter_refuses_openat2() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let image = dir.path().join("disk.qcow2");
        std::fs::write(&image, b"QFI\xfb").unwrap();
        std::os::unix::fs::chown(&image, Some(65534), Some(65534)).unwrap();
        let path = image.to_str().unwrap();
        let nobody = View::User(RunAs {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        });
        let look = || seen_as_service(ImageFile::open_in(path, &nobody));
        let seen = with_failing_syscalls(&[libc::SYS_openat2], libc::ENOSYS, look);
        assert!(matches!(
            seen,
            Ok(Seen::Readable(ImageFile { uid: 65534, .. }, None))
        ));

        let no_lookup = [libc::SYS_openat2, libc::SYS_openat];
        match with_failing_syscalls(&no_lookup, libc::ENOSYS, look) {
            Err(VmError::CheckFailed(message)) => {
                assert!(message.contains("Function not implemented"), "{message}")
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("a lookup that cannot be done is seen as something"),
        }
    }

    #[tokio::test]
    async fn lookups_are_bounded_per_user_and_for_all_users_but_root() {
        let lookups = UidCounts::default();
        let admit = |uid| admit_lookup(&lookups, uid, Duration::ZERO);
        let mut held = Vec::new();
        for i in 0..LOOKUPS {
            let uid = 1000 + (i / LOOKUPS_PER_USER) as u32;
            held.push(admit(uid).await.expect("within the limits"));
        }
        let busy = async |uid| match admit(uid).await {
            Err(VmError::Busy(message)) => message,
            other => panic!("uid {uid}: {other:?}"),
        };
        assert!(
            busy(1000)
                .await
                .starts_with("uid 1000 already has 4 image lookups")
        );
        assert!(
            busy(5000)
                .await
                .starts_with("32 image lookups of users other than root")
        );
        for _ in 0..LOOKUPS_PER_USER {
            held.push(admit(0).await.expect("root is not locked out"));
        }
        assert!(
            busy(0)
                .await
                .starts_with("uid 0 already has 4 image lookups")
        );
        drop(held);
        assert_eq!(lookups.total(), 0);
    }
}
