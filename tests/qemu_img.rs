//! `disk::qemu_img::run_check` against the real qemu-img and against shell
//! stand-ins (slow, lying, crashing). Every test has its own temp dir and kills
//! whatever it started on drop, panics included, so they run in parallel.

use crate::common::NOBODY;
use crate::common::images;
use crate::common::util::ChildGuard;

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vmmanager::disk::image::{ImageFile, ImageFormat};
use vmmanager::disk::qemu_img::{
    CheckCounts, CheckOutcome, CheckRequest, CheckResult, QemuImgChildren, QemuImgError,
    RepairMode, RunAs, run_check,
};

const QEMU_IMG: &str = "/usr/bin/qemu-img";
const WAIT: Duration = Duration::from_secs(10);

/// A test's scratch directory (the harness's temp dir, 0755 so `nobody`
/// can reach images and stand-ins in it), with stand-in helpers.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new(test: &str) -> TempDir {
        TempDir(crate::common::util::public_tempdir(&format!(
            "vmm-qemu-img-{test}-"
        )))
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// A subdirectory anyone may write (for stand-ins running as nobody).
    fn open_subdir(&self, name: &str) -> PathBuf {
        let dir = self.join(name);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        dir
    }

    /// An executable `#!/bin/sh` stand-in for qemu-img. Written by a child
    /// process: had this process held a write fd, a fork in a parallel test
    /// could inherit it and exec would fail with ETXTBSY.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.join(name);
        let mut child = Command::new("sh")
            .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            write!(stdin, "#!/bin/sh\n{body}\n").unwrap();
        }
        assert!(child.wait().unwrap().success());
        path
    }
}

/// Kills the process group whose leader's pid a stand-in wrote to `pidfile`,
/// so a failing test leaves no `sleep 600` behind.
struct GroupKiller(PathBuf);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = read_pid(&self.0).filter(|&p| p > 1) {
            // SAFETY: plain syscall on a group this test created.
            unsafe {
                libc::killpg(pgid, libc::SIGKILL);
            }
        }
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Polls until `f` holds or `WAIT` passes.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn wait_for_pid(path: &Path) -> i32 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(pid) = read_pid(path) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `(state, pgrp)` of a process, None when it does not exist.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    fields.next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// Exists and is not a zombie (this host's init does not reap orphans).
fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

/// Pids of live processes in group `pgid`.
fn live_group_members(pgid: i32) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(s, g)| g == pgid && !matches!(s, 'Z' | 'X')))
        .collect()
}

fn is_root() -> bool {
    // SAFETY: cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The test process's own uid/gid: no switch needed outside root.
fn me() -> RunAs {
    // SAFETY: cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    RunAs {
        uid,
        gid,
        groups: vec![],
    }
}

fn nobody() -> RunAs {
    RunAs {
        uid: NOBODY,
        gid: NOBODY,
        groups: vec![],
    }
}

/// A real image, opened the way the service opens it.
fn opened(path: &Path) -> Arc<ImageFile> {
    Arc::new(ImageFile::open(path.to_str().unwrap()).unwrap())
}

/// An image for stand-ins that never read it: a name, a format, and
/// /dev/null as its descriptor.
fn pretend(path: &str, format: ImageFormat) -> Arc<ImageFile> {
    Arc::new(ImageFile {
        path: PathBuf::from(path),
        dev: 0,
        ino: 0,
        uid: 0,
        gid: 0,
        format,
        other_files: None,
        file: fs::File::open("/dev/null").unwrap(),
    })
}

fn request(qemu_img: impl Into<PathBuf>, image: Arc<ImageFile>) -> CheckRequest {
    CheckRequest {
        qemu_img: qemu_img.into(),
        image,
        reopen: None,
        force_share: false,
        repair: None,
        run_as: me(),
        timeout: Duration::from_secs(60),
    }
}

async fn check(req: &CheckRequest) -> Result<CheckOutcome, QemuImgError> {
    run_check(req, &QemuImgChildren::new(), &CancellationToken::new()).await
}

// --- the real qemu-img -----------------------------------------------------

#[tokio::test]
async fn a_clean_qcow2_is_clean_and_consistent() {
    let dir = TempDir::new("clean");
    let image = dir.join("clean.qcow2");
    images::make_clean_qcow2(&image);
    let outcome = check(&request(QEMU_IMG, opened(&image))).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean);
    assert_eq!(
        outcome.counts,
        CheckCounts {
            image_end_offset: 7 * 65536,
            total_clusters: 1024,
            allocated_clusters: 2,
            ..CheckCounts::default()
        }
    );
}

#[tokio::test]
async fn leaked_clusters_are_counted_as_leaks() {
    let dir = TempDir::new("leaky");
    let image = dir.join("leaky.qcow2");
    let leaked = images::make_leaky_qcow2(&image);
    let outcome = check(&request(QEMU_IMG, opened(&image))).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Leaks);
    assert_eq!(outcome.counts.leaks, leaked);
    assert_eq!(outcome.counts.corruptions, 0);
    assert_eq!(outcome.counts.leaks_fixed, 0);
}

#[tokio::test]
async fn a_broken_refcount_is_reported_as_corruption() {
    let dir = TempDir::new("corrupt");
    let image = dir.join("corrupt.qcow2");
    images::make_corrupt_qcow2(&image);
    let outcome = check(&request(QEMU_IMG, opened(&image))).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Corrupt);
    assert_eq!(outcome.counts.corruptions, 1);
}

#[tokio::test]
async fn repair_leaks_fixes_leaked_clusters() {
    let dir = TempDir::new("repair-leaks");
    let image = dir.join("leaky.qcow2");
    let leaked = images::make_leaky_qcow2(&image);
    let mut req = request(QEMU_IMG, opened(&image));
    req.repair = Some(RepairMode::Leaks);
    // qemu-img re-checks after repairing: exit 0, `leaks` 0, `leaks-fixed` n.
    let outcome = check(&req).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean, "{outcome:?}");
    assert_eq!(outcome.counts.leaks_fixed, leaked);
    assert_eq!(outcome.counts.leaks, 0);
    // And it stays repaired.
    let outcome = check(&request(QEMU_IMG, opened(&image))).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean);
    assert_eq!(outcome.counts.leaks_fixed, 0);
}

#[tokio::test]
async fn repair_all_fixes_corruption() {
    let dir = TempDir::new("repair-all");
    let image = dir.join("corrupt.qcow2");
    images::make_corrupt_qcow2(&image);
    let mut req = request(QEMU_IMG, opened(&image));
    req.repair = Some(RepairMode::All);
    let outcome = check(&req).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean, "{outcome:?}");
    assert!(outcome.counts.corruptions_fixed >= 1, "{outcome:?}");
    assert_eq!(outcome.counts.corruptions, 0);
    let outcome = check(&request(QEMU_IMG, opened(&image))).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean);
}

#[tokio::test]
async fn repair_leaks_cannot_fix_refcount_corruption() {
    let dir = TempDir::new("repair-leaks-corrupt");
    let image = dir.join("corrupt.qcow2");
    images::make_corrupt_qcow2(&image);
    let mut req = request(QEMU_IMG, opened(&image));
    req.repair = Some(RepairMode::Leaks);
    match check(&req).await {
        Err(QemuImgError::Failed { code: 1, stderr }) => {
            assert!(stderr.contains("Check failed"), "{stderr}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn format_mismatch_fails() {
    let dir = TempDir::new("format-mismatch");
    let image = dir.join("clean.qcow2");
    images::make_clean_qcow2(&image);
    let image = ImageFile {
        format: ImageFormat::Vdi,
        ..ImageFile::open(image.to_str().unwrap()).unwrap()
    };
    let req = request(QEMU_IMG, Arc::new(image));
    match check(&req).await {
        Err(QemuImgError::Failed { code: 1, stderr }) => {
            assert!(stderr.contains("VDI"), "{stderr}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// qemu-img checks the inode the service opened, whatever the name means
/// by the time it runs: renamed away, replaced, deleted.
#[tokio::test]
async fn checks_the_opened_inode_not_the_name() {
    let dir = TempDir::new("opened-inode");
    let image = dir.join("disk.qcow2");
    images::make_leaky_qcow2(&image);
    let req = request(QEMU_IMG, opened(&image));
    // Another image (clean, another size) now answers to the name.
    fs::rename(&image, dir.join("moved.qcow2")).unwrap();
    let out = Command::new(QEMU_IMG)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1G")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let outcome = check(&req).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Leaks, "{outcome:?}");
    assert_eq!(outcome.counts.total_clusters, 1024, "the 64 MiB original");
    // Deleted altogether: still that inode.
    fs::remove_file(dir.join("moved.qcow2")).unwrap();
    fs::remove_file(&image).unwrap();
    let outcome = check(&req).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Leaks, "{outcome:?}");
}

/// The backing chain is never opened: not a missing backing file, not a
/// FIFO (which would block qemu-img until the timeout).
#[tokio::test]
async fn backing_files_are_never_opened() {
    let dir = TempDir::new("backing");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (name, backing) in [
        ("fifo-backed.qcow2", fifo.to_str().unwrap()),
        ("missing-backed.qcow2", "no-such-base.qcow2"),
        ("json-backed.qcow2", "json:{\"driver\": \"null-co\"}"),
    ] {
        let image = dir.join(name);
        let out = Command::new(QEMU_IMG)
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
            .arg(backing)
            .arg(&image)
            .arg("64M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        let mut req = request(QEMU_IMG, opened(&image));
        req.timeout = Duration::from_secs(20);
        let outcome = check(&req).await;
        assert!(
            matches!(&outcome, Ok(o) if o.result == CheckResult::Clean),
            "{name}: {outcome:?}"
        );
    }
}

#[tokio::test]
async fn a_lock_conflict_is_reported_and_force_share_checks_anyway() {
    let dir = TempDir::new("force-share");
    let image = dir.join("held.qcow2");
    images::make_clean_qcow2(&image);
    // qemu-io keeps the image open (and locked) while its stdin stays open;
    // its first prompt means the image is open. No check runs before that: it
    // would hold the lock and make qemu-io give up.
    let mut holder = ChildGuard::new(
        Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(&image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        "qemu-io",
    );
    let mut stdout = holder.take_stdout().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while !seen.windows(8).any(|w| w == b"qemu-io>") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
    });
    let prompt = rx.recv_timeout(WAIT).expect("qemu-io did not start");
    assert!(prompt.contains("qemu-io>"), "qemu-io failed: {prompt:?}");

    let req = request(QEMU_IMG, opened(&image));
    match check(&req).await {
        Err(QemuImgError::LockConflict { stderr }) => {
            assert!(stderr.contains("lock"), "{stderr}")
        }
        other => panic!("expected a lock conflict, got {other:?}"),
    }

    let mut shared = req.clone();
    shared.force_share = true;
    let outcome = check(&shared).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean);
    assert_eq!(outcome.counts.total_clusters, 1024);
}

#[tokio::test]
async fn nobody_cannot_read_root_only_image() {
    assert!(is_root(), "needs root: the test suite runs as root");
    let dir = TempDir::new("nobody-unreadable");
    let image = dir.join("private.qcow2");
    images::make_clean_qcow2(&image);
    fs::set_permissions(&image, fs::Permissions::from_mode(0o600)).unwrap();
    let mut req = request(QEMU_IMG, opened(&image));
    req.run_as = nobody();
    match check(&req).await {
        Err(QemuImgError::Failed { code: 1, stderr }) => {
            assert!(stderr.contains("Permission denied"), "{stderr}");
            assert!(stderr.contains("private.qcow2"), "{stderr}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn nobody_checks_readable_image() {
    assert!(is_root(), "needs root: the test suite runs as root");
    let dir = TempDir::new("nobody-readable");
    let image = dir.join("public.qcow2");
    images::make_clean_qcow2(&image);
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
    let mut req = request(QEMU_IMG, opened(&image));
    req.run_as = RunAs::for_user(NOBODY).unwrap();
    let outcome = check(&req).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean);
}

// --- credentials, argv, environment (stand-ins that report) ----------------

const REPORTING: &str = r#"
out="$(dirname "$0")/out"
id -u > "$out/uid"
id -g > "$out/gid"
id -G > "$out/groups"
echo $$ > "$out/pid"
for fd in /proc/$$/fd/*; do readlink "$fd"; done > "$out/fds"
cut -d' ' -f5 /proc/$$/stat > "$out/pgid"
pwd > "$out/cwd"
env > "$out/env"
for a in "$@"; do printf '%s\n' "$a"; done > "$out/argv"
[ -t 0 ] || cat > "$out/stdin"
echo '{"total-clusters": 16, "filename": "x", "format": "qcow2"}'
"#;

fn read(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .trim_end()
        .to_owned()
}

#[tokio::test]
async fn runs_as_nobody_in_own_group_with_clean_environment() {
    assert!(is_root(), "needs root: the test suite runs as root");
    let dir = TempDir::new("reporting-nobody");
    let out = dir.open_subdir("out");
    let stand_in = dir.script("qemu-img", REPORTING);
    let image = dir.join("disk.qcow2");
    images::make_clean_qcow2(&image);
    let mut req = request(&stand_in, opened(&image));
    req.run_as = RunAs::for_user(NOBODY).unwrap();
    let outcome = check(&req).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean);
    assert_eq!(outcome.counts.total_clusters, 16);

    assert_eq!(read(&out, "uid"), "65534");
    assert_eq!(read(&out, "gid"), "65534");
    assert_eq!(read(&out, "groups"), "65534");
    assert_eq!(read(&out, "pgid"), read(&out, "pid"), "own process group");
    assert_eq!(read(&out, "cwd"), "/");
    assert_eq!(read(&out, "stdin"), "");
    let env = read(&out, "env");
    let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    assert!(env.lines().any(|l| l == "LC_ALL=C"), "{env}");
    assert!(
        env.lines()
            .any(|l| l == "PATH=/usr/sbin:/usr/bin:/sbin:/bin"),
        "{env}"
    );
    // Only the two we set plus what sh adds itself.
    for name in &names {
        assert!(
            ["LC_ALL", "PATH", "PWD", "OLDPWD", "SHLVL", "_"].contains(name),
            "unexpected variable {name} in {env}"
        );
    }
    let fd = req.image.file.as_raw_fd();
    assert_eq!(
        read(&out, "argv"),
        format!(
            "check\n--output=json\n--\njson:{{\"backing\":null,\"driver\":\"qcow2\",\
             \"file\":{{\"driver\":\"file\",\"filename\":\"/proc/self/fd/{fd}\"}}}}"
        )
    );
    // It inherited the image's descriptor, and nothing else of the service's.
    let fds = read(&out, "fds");
    assert!(
        fds.lines().any(|l| Path::new(l) == image),
        "{image:?} not among {fds}"
    );
}

#[tokio::test]
async fn sets_supplementary_groups() {
    assert!(is_root(), "needs root: the test suite runs as root");
    let dir = TempDir::new("reporting-groups");
    let out = dir.open_subdir("out");
    let stand_in = dir.script("qemu-img", REPORTING);
    let mut req = request(&stand_in, pretend("/img", ImageFormat::Qcow2));
    req.run_as = RunAs {
        uid: 4242,
        gid: 4343,
        groups: vec![4343, 10, 20],
    };
    check(&req).await.unwrap();
    assert_eq!(read(&out, "uid"), "4242");
    assert_eq!(read(&out, "gid"), "4343");
    let mut groups: Vec<u32> = read(&out, "groups")
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    groups.sort_unstable();
    assert_eq!(groups, [10, 20, 4343]);
}

#[tokio::test]
async fn argv_with_force_share_and_repair() {
    let dir = TempDir::new("reporting-argv");
    let out = dir.open_subdir("out");
    let stand_in = dir.script("qemu-img", REPORTING);
    let mut req = request(
        &stand_in,
        pretend("/images/-rf disk.vmdk", ImageFormat::Vmdk),
    );
    req.force_share = true;
    req.repair = Some(RepairMode::Leaks);
    check(&req).await.unwrap();
    let fd = req.image.file.as_raw_fd();
    assert_eq!(
        read(&out, "argv"),
        format!(
            "check\n--output=json\n-U\n-r\nleaks\n--\njson:{{\"backing\":null,\"driver\":\"vmdk\",\
             \"file\":{{\"driver\":\"file\",\"filename\":\"/proc/self/fd/{fd}\"}}}}"
        )
    );
}

// --- stopping: timeout, cancel, drop ---------------------------------------

/// Leaves a grandchild that also holds the pipes, then sleeps.
const SLOW: &str = r#"
dir="$(dirname "$0")"
sleep 600 &
echo $! > "$dir/grandchild.pid"
echo $$ > "$dir/leader.pid"
sleep 600
"#;

/// Fields drop in order: the killer reads its pid file before `dir` goes.
struct Slow {
    _killer: GroupKiller,
    dir: TempDir,
    req: CheckRequest,
}

fn slow(test: &str, timeout: Duration) -> Slow {
    let dir = TempDir::new(test);
    let stand_in = dir.script("qemu-img", SLOW);
    let killer = GroupKiller(dir.join("leader.pid"));
    let mut req = request(stand_in, pretend("/img.qcow2", ImageFormat::Qcow2));
    req.timeout = timeout;
    Slow {
        _killer: killer,
        dir,
        req,
    }
}

impl Slow {
    /// Leader and grandchild pids, once the stand-in has written them.
    async fn pids(&self) -> (i32, i32) {
        let leader = wait_for_pid(&self.dir.join("leader.pid")).await;
        let grandchild = wait_for_pid(&self.dir.join("grandchild.pid")).await;
        (leader, grandchild)
    }

    fn assert_all_dead_now(&self, leader: i32, grandchild: i32) {
        assert!(!alive(leader), "leader {leader} survived");
        assert!(!alive(grandchild), "grandchild {grandchild} survived");
        assert_eq!(live_group_members(leader), Vec::<i32>::new());
    }
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let s = slow("timeout", Duration::from_millis(1500));
    let started = Instant::now();
    let r = check(&s.req).await;
    assert!(
        matches!(r, Err(QemuImgError::Timeout(t)) if t == Duration::from_millis(1500)),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let (leader, grandchild) = s.pids().await;
    s.assert_all_dead_now(leader, grandchild);
}

#[tokio::test]
async fn cancel_kills_the_whole_group() {
    let s = slow("cancel", Duration::from_secs(600));
    let cancel = CancellationToken::new();
    let children = QemuImgChildren::new();
    let run = run_check(&s.req, &children, &cancel);
    let cancel_later = async {
        let pids = s.pids().await;
        assert!(alive(pids.0) && alive(pids.1), "stand-in not running");
        cancel.cancel();
        pids
    };
    let (r, (leader, grandchild)) = tokio::join!(run, cancel_later);
    assert!(matches!(r, Err(QemuImgError::Cancelled)), "{r:?}");
    s.assert_all_dead_now(leader, grandchild);
}

#[tokio::test]
async fn dropping_the_future_kills_the_whole_group() {
    let s = slow("drop", Duration::from_secs(600));
    let cancel = CancellationToken::new();
    let children = QemuImgChildren::new();
    {
        let run = run_check(&s.req, &children, &cancel);
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => panic!("finished early: {r:?}"),
            _ = s.pids() => {}
        }
        // `run` is dropped here, mid-run.
    }
    let (leader, grandchild) = s.pids().await;
    // Drop cannot wait, so SIGKILL may take a moment to land.
    wait_until("the group to die", || {
        !alive(leader) && !alive(grandchild) && live_group_members(leader).is_empty()
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parallel_timeouts_leave_nothing() {
    let runs: Vec<Slow> = (0..4)
        .map(|i| slow(&format!("parallel-{i}"), Duration::from_millis(800)))
        .collect();
    let tasks: Vec<_> = runs
        .iter()
        .map(|s| {
            let req = s.req.clone();
            tokio::spawn(async move {
                run_check(&req, &QemuImgChildren::new(), &CancellationToken::new()).await
            })
        })
        .collect();
    for (s, task) in runs.iter().zip(tasks) {
        let r = task.await.unwrap();
        assert!(matches!(r, Err(QemuImgError::Timeout(_))), "{r:?}");
        let (leader, grandchild) = s.pids().await;
        s.assert_all_dead_now(leader, grandchild);
    }
}

// --- garbage and failures from stand-ins -----------------------------------

async fn stand_in(test: &str, body: &str) -> (TempDir, Result<CheckOutcome, QemuImgError>) {
    let dir = TempDir::new(test);
    let path = dir.script("qemu-img", body);
    let r = check(&request(path, pretend("/img.qcow2", ImageFormat::Qcow2))).await;
    (dir, r)
}

#[tokio::test]
async fn non_json_with_exit_0_is_garbage() {
    let (_d, r) = stand_in("garbage-text", "echo 'No errors were found'; echo oops >&2").await;
    match r {
        Err(QemuImgError::Garbage { detail, stderr }) => {
            assert!(detail.contains("invalid JSON"), "{detail}");
            assert_eq!(stderr, "oops");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn no_output_with_exit_3_is_garbage() {
    let (_d, r) = stand_in("garbage-empty", "exit 3").await;
    match r {
        Err(QemuImgError::Garbage { detail, .. }) => {
            assert!(detail.contains("no JSON"), "{detail}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn huge_stdout_is_garbage() {
    let (_d, r) = stand_in(
        "garbage-huge",
        "echo '{'; head -c 3000000 /dev/zero | tr '\\0' ' '; echo '}'",
    )
    .await;
    match r {
        Err(QemuImgError::Garbage { detail, .. }) => {
            assert!(detail.contains("more than"), "{detail}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn huge_stderr_is_bounded() {
    let (_d, r) = stand_in(
        "huge-stderr",
        "echo FIRST >&2; head -c 2000000 /dev/zero | tr '\\0' x >&2; echo; echo 'qemu-img: LAST' >&2; exit 1",
    )
    .await;
    match r {
        Err(QemuImgError::Failed { code: 1, stderr }) => {
            assert!(stderr.len() <= 4200, "{} bytes kept", stderr.len());
            assert!(stderr.starts_with("FIRST"), "{stderr}");
            assert!(stderr.ends_with("qemu-img: LAST"), "{stderr}");
            assert!(stderr.contains("omitted"), "{stderr}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn exit_1_is_failed_with_stderr() {
    let (_d, r) = stand_in(
        "exit-1",
        "echo \"qemu-img: Could not open '/img.qcow2': Permission denied\" >&2; exit 1",
    )
    .await;
    match r {
        Err(QemuImgError::Failed { code: 1, stderr }) => assert_eq!(
            stderr,
            "qemu-img: Could not open '/img.qcow2': Permission denied"
        ),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn exit_1_with_lock_message_is_lock_conflict() {
    let (_d, r) = stand_in(
        "exit-1-lock",
        "echo \"qemu-img: Could not open '/img.qcow2': Failed to get shared \\\"write\\\" lock\" >&2; exit 1",
    )
    .await;
    assert!(matches!(r, Err(QemuImgError::LockConflict { .. })), "{r:?}");
}

#[tokio::test]
async fn exit_7_is_failed() {
    let (_d, r) = stand_in("exit-7", "echo '{}'; exit 7").await;
    assert!(
        matches!(r, Err(QemuImgError::Failed { code: 7, .. })),
        "{r:?}"
    );
}

#[tokio::test]
async fn exit_63_is_not_supported() {
    let (_d, r) = stand_in(
        "exit-63",
        "echo 'qemu-img: This image format does not support checks' >&2; exit 63",
    )
    .await;
    let outcome = r.unwrap();
    assert_eq!(outcome.result, CheckResult::NotSupported);
    assert_eq!(outcome.counts, CheckCounts::default());
}

#[tokio::test]
async fn exit_2_and_3_take_counts_from_json() {
    let (_d, r) = stand_in(
        "exit-2",
        r#"echo '{"corruptions": 4, "leaks": 1, "check-errors": 0, "format": "qcow2"}'; exit 2"#,
    )
    .await;
    let outcome = r.unwrap();
    assert_eq!(outcome.result, CheckResult::Corrupt);
    assert_eq!((outcome.counts.corruptions, outcome.counts.leaks), (4, 1));
}

#[tokio::test]
async fn killed_by_signal() {
    let (_d, r) = stand_in("signal", "kill -KILL $$").await;
    assert!(
        matches!(r, Err(QemuImgError::Killed { signal: 9 })),
        "{r:?}"
    );
}

#[tokio::test]
async fn leftover_background_process_is_killed_on_normal_exit() {
    // A stand-in that exits but leaves a child holding stdout: the run must
    // still finish promptly (the group is killed once the leader exits).
    let dir = TempDir::new("leftover");
    let stand_in = dir.script(
        "qemu-img",
        r#"d="$(dirname "$0")"; echo $$ > "$d/leader.pid"; sleep 600 & echo $! > "$d/grandchild.pid"; echo '{}'"#,
    );
    let _killer = GroupKiller(dir.join("leader.pid"));
    let mut req = request(stand_in, pretend("/img.qcow2", ImageFormat::Qcow2));
    req.timeout = Duration::from_secs(30);
    let started = Instant::now();
    let outcome = check(&req).await.unwrap();
    assert_eq!(outcome.result, CheckResult::Clean);
    assert!(started.elapsed() < Duration::from_secs(10));
    let grandchild = read_pid(&dir.join("grandchild.pid")).unwrap();
    wait_until("the leftover to die", || !alive(grandchild));
}

#[tokio::test]
async fn missing_program_is_spawn_error() {
    let dir = TempDir::new("missing-program");
    let r = check(&request(
        dir.join("no-qemu-img"),
        pretend("/img.qcow2", ImageFormat::Qcow2),
    ))
    .await;
    assert!(matches!(r, Err(QemuImgError::Spawn { .. })), "{r:?}");
}
