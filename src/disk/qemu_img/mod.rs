//! Running `qemu-img check` as a given user, in its own process group.
//!
//! The command is always
//! `<qemu_img> check --output=json [-U] [-r leaks|all] -- 'json:{"driver":
//! FORMAT, "backing": null, "file": {"driver": "file", "filename":
//! "/proc/self/fd/N"}}'`:
//!
//! - qemu-img never gets the image's *name*. It inherits the descriptor the
//!   service opened, authorized and scanned (fd N), and reopens exactly that
//!   inode through `/proc/self/fd/N`, with its own (the caller's or owner's)
//!   permissions. A name swapped after the service looked cannot redirect it.
//!   For a repair on a mount that is read-only for the service, fd N is
//!   instead an `O_PATH` handle of the same inode on a writable mount
//!   ([`CheckRequest::reopen`], from [`super::writable`]).
//! - The format comes from the header magic (qemu-img never probes it).
//! - `"backing": null`: qemu-img does not open the backing chain at all.
//!   `check` (and `-r`) only reads and fixes the image's own metadata, so
//!   nothing is lost, and a backing file named in the header (relative,
//!   absolute, `json:`, missing, a FIFO, root-only, swapped mid-check) can
//!   neither hang the check nor redirect it. Images whose own data lives in
//!   other files (VMDK descriptors, qcow2 external data files) are refused
//!   before qemu-img runs (see [`super::image::ImageFile::other_files`]).
//!
//! qemu-img runs with the requested uid/gid/groups, an empty environment
//! (fixed `PATH`, `LC_ALL=C`), stdin from /dev/null and cwd `/`, as the leader
//! of a new process group. That whole group is killed with SIGKILL on timeout,
//! on cancel and when the [`run_check`] future is dropped: an orphaned
//! qemu-img would keep the image lock and stop the VM from starting.
//!
//! - `credentials`: the passwd/group lookup and the `pre_exec` credential
//!   switch;
//! - `group`: the process-group kill guard;
//! - `spawner`: the long-lived thread every qemu-img is forked on (its
//!   parent-death signal follows the forking thread);
//! - `strays`: descendants that left the group: the service is their
//!   subreaper and kills them when the check ends;
//! - `output`: bounded capture of stdout/stderr and the mapping of exit
//!   status and JSON to a result.

mod credentials;
mod group;
mod output;
mod spawner;
mod strays;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::image::ImageFile;

pub use credentials::UserLookupError;
pub use strays::{QemuImgChildren, become_subreaper};

use credentials::CredentialSwitch;
use output::{STDERR_KEEP, STDOUT_LIMIT};
use spawner::Spawned;

/// The only environment qemu-img gets besides `LC_ALL=C`.
const CHILD_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Credentials qemu-img runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups; empty means none (root's are dropped, not kept).
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
    /// The opened image: qemu-img checks this inode, whatever its name is now.
    pub image: Arc<ImageFile>,
    /// What qemu-img reopens instead of `image.file`: a handle of the same
    /// inode on a writable mount, for a repair where the service's own
    /// mount is read-only (see [`super::writable`]); `None` otherwise.
    pub reopen: Option<Arc<OwnedFd>>,
    /// `-U`: read-only check of an image someone else holds. qemu-img itself
    /// refuses it together with `repair`.
    pub force_share: bool,
    pub repair: Option<RepairMode>,
    pub run_as: RunAs,
    pub timeout: Duration,
}

/// What qemu-img found. A closed set (qemu-img's exit codes); the contract's
/// [`vmmanager_client::CheckResult`] spells it and also keeps values a
/// newer service might send, which the domain never produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Clean,
    Leaks,
    Corrupt,
    NotSupported,
}

/// The one mapping to the contract's value.
impl From<CheckResult> for vmmanager_client::CheckResult {
    fn from(result: CheckResult) -> Self {
        match result {
            CheckResult::Clean => Self::Clean,
            CheckResult::Leaks => Self::Leaks,
            CheckResult::Corrupt => Self::Corrupt,
            CheckResult::NotSupported => Self::NotSupported,
        }
    }
}

/// Counts from qemu-img's JSON; 0 where it omits them.
///
/// With a repair, qemu-img re-checks the image afterwards: `leaks` and
/// `corruptions` describe the repaired image, the `*_fixed` counts what the
/// repair did.
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
    /// From qemu-img's exit code (after a repair: the state of the repaired image).
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
    #[error("cancelled before qemu-img started")]
    CancelledBeforeStart,
}

/// Why the run was stopped before qemu-img finished.
enum Stop {
    Timeout,
    Cancelled,
}

/// Runs the check; kills qemu-img's whole process group on timeout, on
/// `cancel`, and when this future is dropped. On timeout and cancel it returns
/// only after qemu-img has been reaped and no live process of its group is
/// left. qemu-img is spawned through `children` (off the async threads),
/// which kills and reaps its strays (descendants outside the group)
/// whenever it ends. Raw images have nothing to check: the checker answers
/// `NotSupported` for them without calling this (qemu-img's own answer,
/// exit code 63, would map to the same).
pub async fn run_check(
    request: &CheckRequest,
    children: &QemuImgChildren,
    cancel: &CancellationToken,
) -> Result<CheckOutcome, QemuImgError> {
    let spawn_error = |source: io::Error| QemuImgError::Spawn {
        path: request.qemu_img.clone(),
        source,
    };
    if cancel.is_cancelled() {
        return Err(QemuImgError::CancelledBeforeStart);
    }

    let switch = CredentialSwitch::plan(&request.run_as).map_err(spawn_error)?;
    let mut command = build_command(request);
    inherit_fd(&mut command, request.image_fd());
    switch.install(&mut command);
    tracing::debug!(
        qemu_img = %request.qemu_img.display(),
        image = %request.image.path.display(),
        args = ?check_args(request),
        uid = request.run_as.uid,
        "running qemu-img check"
    );

    // Armed from the moment it exists: dropped anywhere (this future
    // included), the whole group is killed first.
    let mut spawned = children.spawn(command).await.map_err(spawn_error)?;
    let Spawned {
        group,
        child,
        leader,
    } = &mut spawned;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(spawn_error(io::Error::other("qemu-img pipes missing")));
    };

    let stop = tokio::select! {
        biased;
        (stdout, stderr, status) = async {
            tokio::join!(
                output::read_capped(stdout, STDOUT_LIMIT),
                output::read_head_tail(stderr, STDERR_KEEP),
                async {
                    let status = child.wait().await;
                    // Anything qemu-img left behind (it forks nothing, a
                    // stand-in might) would hold the pipes open: kill it now,
                    // in its group or not.
                    group.kill();
                    leader.reaped().await;
                    status
                },
            )
        } => {
            group.disarm();
            let status = status.map_err(spawn_error)?;
            // qemu-img names the image by its spec; the user knows it by path.
            let stderr = stderr.replace(
                &image_spec(request),
                &request.image.path.display().to_string(),
            );
            return output::interpret(status, &stdout, &stderr, request.repair.is_some());
        }
        () = tokio::time::sleep(request.timeout) => Stop::Timeout,
        () = cancel.cancelled() => Stop::Cancelled,
    };

    group.kill();
    if let Err(e) = child.wait().await {
        tracing::warn!(error = %e, "could not reap qemu-img");
    }
    group.wait_gone().await;
    leader.reaped().await;
    group.disarm();
    Err(match stop {
        Stop::Timeout => QemuImgError::Timeout(request.timeout),
        Stop::Cancelled => QemuImgError::Cancelled,
    })
}

impl CheckRequest {
    /// The descriptor qemu-img inherits and reopens.
    fn image_fd(&self) -> RawFd {
        match &self.reopen {
            Some(handle) => handle.as_raw_fd(),
            None => self.image.file.as_raw_fd(),
        }
    }
}

/// The path through which qemu-img reopens the inherited image descriptor.
fn fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// The image as qemu-img is told about it: the inherited descriptor, the
/// format from the header, and no backing chain (see the module docs).
fn image_spec(request: &CheckRequest) -> String {
    let spec = serde_json::json!({
        "driver": request.image.format.as_str(),
        "backing": null,
        "file": {
            "driver": "file",
            "filename": fd_path(request.image_fd()),
        },
    });
    format!("json:{spec}")
}

/// Arguments after the program name.
fn check_args(request: &CheckRequest) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["check".into(), "--output=json".into()];
    if request.force_share {
        args.push("-U".into());
    }
    if let Some(mode) = request.repair {
        args.push("-r".into());
        args.push(mode.as_str().into());
    }
    args.push("--".into());
    args.push(image_spec(request).into());
    args
}

/// Lets the child keep `fd` across exec (it is close-on-exec in the service,
/// so no other child ever gets it).
fn inherit_fd(command: &mut Command, fd: RawFd) {
    let hook = move || -> io::Result<()> {
        // SAFETY: fcntl on an fd number is async-signal-safe and touches no
        // memory; this runs in the forked child only.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook makes one async-signal-safe syscall and does not allocate.
    unsafe {
        command.pre_exec(hook);
    }
}

/// Everything but the credential switch.
fn build_command(request: &CheckRequest) -> Command {
    let mut command = Command::new(&request.qemu_img);
    command
        .args(check_args(request))
        .env_clear()
        .env("PATH", CHILD_PATH)
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    command
}

impl RunAs {
    /// The credentials of `uid`'s passwd entry: its primary gid and every group
    /// it belongs to (`getgrouplist`). A uid without a passwd entry gets gid
    /// 65534 and no supplementary groups.
    ///
    /// Blocking (NSS may ask a network service): call it from
    /// `spawn_blocking`.
    pub fn for_user(uid: u32) -> Result<RunAs, UserLookupError> {
        credentials::lookup(uid, None)
    }

    /// [`RunAs::for_user`], but with `groups` (a caller's actual groups, as
    /// the bus saw them) when known, instead of asking the group database.
    /// Blocking, like it.
    pub fn for_user_with_groups(
        uid: u32,
        groups: Option<Vec<u32>>,
    ) -> Result<RunAs, UserLookupError> {
        credentials::lookup(uid, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::image::ImageFormat;

    /// An image that only pretends: its descriptor is /dev/null.
    fn image(format: ImageFormat) -> Arc<ImageFile> {
        Arc::new(ImageFile {
            path: PathBuf::from("/var/lib/vms/-x.qcow2"),
            dev: 0,
            ino: 0,
            uid: 0,
            gid: 0,
            format,
            other_files: None,
            file: std::fs::File::open("/dev/null").unwrap(),
        })
    }

    fn request(format: ImageFormat) -> CheckRequest {
        CheckRequest {
            qemu_img: PathBuf::from("/nonexistent/qemu-img"),
            image: image(format),
            reopen: None,
            force_share: false,
            repair: None,
            run_as: RunAs {
                uid: 0,
                gid: 0,
                groups: vec![],
            },
            timeout: Duration::from_secs(5),
        }
    }

    /// The spec qemu-img must get for `r`: parsed back, so the test does not
    /// depend on JSON key order.
    fn spec_of(arg: &OsString) -> serde_json::Value {
        let text = arg.to_str().unwrap().strip_prefix("json:").unwrap();
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn args_plain_name_the_inherited_fd_and_no_backing_chain() {
        let r = request(ImageFormat::Qcow2);
        let args = check_args(&r);
        assert_eq!(args[..3], ["check", "--output=json", "--"]);
        assert_eq!(args.len(), 4);
        assert_eq!(
            spec_of(&args[3]),
            serde_json::json!({
                "driver": "qcow2",
                "backing": null,
                "file": {
                    "driver": "file",
                    "filename": format!("/proc/self/fd/{}", r.image.file.as_raw_fd()),
                },
            })
        );
        // The name itself never reaches qemu-img.
        assert!(
            !args
                .iter()
                .any(|a| a.to_string_lossy().contains("-x.qcow2"))
        );
    }

    #[test]
    fn args_force_share_and_repair() {
        let mut r = request(ImageFormat::Vmdk);
        r.force_share = true;
        r.repair = Some(RepairMode::All);
        let args = check_args(&r);
        assert_eq!(
            args[..6],
            ["check", "--output=json", "-U", "-r", "all", "--"]
        );
        assert_eq!(spec_of(&args[6])["driver"], "vmdk");
    }

    #[tokio::test]
    async fn cancelled_before_start_does_not_spawn() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let r = run_check(
            &request(ImageFormat::Qcow2),
            &QemuImgChildren::new(),
            &cancel,
        )
        .await;
        assert!(
            matches!(r, Err(QemuImgError::CancelledBeforeStart)),
            "{r:?}"
        );
    }

    /// qemu-img's parent-death signal follows the thread that forked it. A
    /// runtime whose idle blocking threads end after 20 ms would kill a
    /// qemu-img forked on one of them mid-check; the spawner thread lives
    /// on.
    #[test]
    fn qemu_img_outlives_idle_runtime_threads() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("qemu-img");
        std::fs::write(
            &script,
            "#!/bin/sh\nsleep 0.5\necho '{\"check-errors\": 0}'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut r = request(ImageFormat::Qcow2);
        r.qemu_img = script;
        r.run_as = credentials::tests::current();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_keep_alive(Duration::from_millis(20))
            .enable_all()
            .build()
            .unwrap();
        let children = QemuImgChildren::new();
        let outcome = runtime
            .block_on(run_check(&r, &children, &CancellationToken::new()))
            .unwrap();
        assert_eq!(outcome.result, CheckResult::Clean);
    }

    #[tokio::test]
    async fn missing_binary_is_a_spawn_error() {
        let mut r = request(ImageFormat::Qcow2);
        r.run_as = credentials::tests::current();
        match run_check(&r, &QemuImgChildren::new(), &CancellationToken::new()).await {
            Err(QemuImgError::Spawn { path, source }) => {
                assert_eq!(path, PathBuf::from("/nonexistent/qemu-img"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
