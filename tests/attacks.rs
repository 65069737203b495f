//! A hostile local user against the real daemon: real bus, polkitd, QEMU,
//! qemu-img and real users (root, `nobody`, `daemon`).
//!
//! - Swaps: a name swapped after the service looked (the image, a directory
//!   on its path, a backing file) never redirects a check or a repair, and
//!   never gets a check past the in-use refusal. The swap happens while a
//!   stand-in qemu-img waits at a gate, so the race is won every time.
//! - Oracles: pairs of paths that differ only in what the caller cannot see
//!   get the same answers and the same signals.
//! - Starvation: one user's hanging checks never keep another's from being
//!   answered in time, and a killed client's checks end.

use crate::common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::images::{LEAKED_CLUSTERS, make_clean_qcow2, make_leaky_qcow2, qemu_img_check};
use common::util::{
    ChildGuard, alive, busctl_call_in_background, command_as, fd_count, give, make_dir,
    public_tempdir, run, wait_until, write_file,
};
use common::world::{Report, World, json, split_error, str_of, u64_of};
use common::{CmdOutput, DaemonConfig, NOBODY, Polkit, Vm};
use futures_util::StreamExt;
use tempfile::TempDir;
use zbus::Variant;

const NOBODY_USER: Option<(u32, u32)> = Some((NOBODY, NOBODY));
/// Clusters of the 64 MiB test images, and of a 1 GiB one: which image was
/// checked shows in `total-clusters`.
const SMALL_CLUSTERS: u64 = 1024;
const BIG_CLUSTERS: u64 = 16384;

/// A qemu-img stand-in that says it started, waits until the test opens
/// the gate, then becomes the real qemu-img (same arguments, same inherited
/// descriptors). Between the two, the test changes the file system.
struct Gate {
    dir: TempDir,
}

impl Gate {
    fn new() -> Gate {
        let dir = public_tempdir("vmm-gate-");
        // The stand-in runs as the caller (nobody too) and writes here.
        common::util::set_mode(dir.path(), 0o777);
        let d = dir.path().display();
        write_file(
            &dir.path().join("qemu-img"),
            format!(
                "#!/bin/sh\necho $$ >> {d}/started\n\
                 while [ ! -e {d}/open ]; do sleep 0.02; done\nexec /usr/bin/qemu-img \"$@\"\n"
            ),
            0o755,
        );
        Gate { dir }
    }

    fn qemu_img(&self) -> PathBuf {
        self.dir.path().join("qemu-img")
    }

    fn wait_started(&self) {
        let started = self.dir.path().join("started");
        wait_until(
            Duration::from_secs(20),
            "qemu-img to reach the gate",
            || started.exists(),
            String::new,
        );
    }

    fn open(&self) {
        write_file(&self.dir.path().join("open"), "", 0o644);
    }
}

/// Runs `script` with `sh -c` as `nobody` (the attacker), `args` as $1….
fn as_attacker(script: &str, args: &[&Path]) {
    let mut cmd = command_as(NOBODY_USER, "sh");
    cmd.arg("-c").arg(script).arg("sh").args(args);
    run(&mut cmd).expect_success("the attacker's swap");
}

fn make_big_qcow2(path: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("1G"));
    out.expect_success("qemu-img create");
}

fn digest(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .expect_success("sha256sum")
        .to_owned()
}

/// CheckDisk as root in the background.
fn check_in_background(
    w: &World,
    image: &Path,
    options: HashMap<&'static str, Variant<'static>>,
) -> tokio::task::JoinHandle<Result<Report, (String, String)>> {
    let connection = w.connection.clone();
    let image = image.to_str().unwrap().to_owned();
    tokio::spawn(async move {
        let manager = vmmanager_client::ManagerProxy::new(&connection)
            .await
            .unwrap();
        manager
            .check_disk(&image, options)
            .await
            .map_err(split_error)
    })
}

/// `vmctl --no-ask-password ARGS…` as `user`, in the background.
fn vmctl_in_background(
    w: &World,
    user: Option<(u32, u32)>,
    args: &[&str],
) -> tokio::task::JoinHandle<CmdOutput> {
    let mut cmd = command_as(user, common::world::VMCTL);
    cmd.arg("--bus-address")
        .arg(w.stack.bus.address())
        .arg("--no-ask-password")
        .args(args);
    tokio::task::spawn_blocking(move || run(&mut cmd))
}

/// A directory anyone may rename entries in (mode 0777, not sticky): the
/// image lives where the attacker can swap names.
fn shared_dir(w: &World) -> PathBuf {
    let shared = w.path("shared");
    make_dir(&shared, 0o777, None);
    shared
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_image_name_never_redirects_a_repair() {
    let gate = Gate::new();
    let config = DaemonConfig::default().qemu_img(gate.qemu_img());
    let w = World::with(Polkit::builder(), config).await;
    let shared = shared_dir(&w);
    let image = shared.join("disk.qcow2");
    make_leaky_qcow2(&image);
    // The victim: another user's (daemon, uid 1) 0600 image in a 0700 dir.
    let private = w.path("private");
    make_dir(&private, 0o700, Some(1));
    let victim = private.join("disk.qcow2");
    make_leaky_qcow2(&victim);
    give(&victim, 1, 0o600);
    let before = digest(&victim);

    let options = HashMap::from([("repair", Variant::from("leaks"))]);
    let call = check_in_background(&w, &image, options);
    gate.wait_started();
    as_attacker(
        r#"mv "$1" "$1.orig" && ln -s "$2" "$1""#,
        &[&image, &victim],
    );
    gate.open();
    let report = call.await.unwrap().unwrap();

    assert_eq!(str_of(&report, "result"), "clean", "{:#}", json(&report));
    assert_eq!(u64_of(&report, "leaks-fixed"), LEAKED_CLUSTERS);
    assert_eq!(digest(&victim), before, "the victim's image was rewritten");
    assert_eq!(qemu_img_check(&victim).0, 3, "the victim still leaks");
    let original = shared.join("disk.qcow2.orig");
    assert_eq!(
        qemu_img_check(&original).0,
        0,
        "the image asked for was repaired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_directory_never_redirects_a_check() {
    let gate = Gate::new();
    let config = DaemonConfig::default().qemu_img(gate.qemu_img());
    let w = World::with(Polkit::builder(), config).await;
    let sub = shared_dir(&w).join("vm");
    make_dir(&sub, 0o777, None);
    let image = sub.join("disk.qcow2");
    make_leaky_qcow2(&image);
    let elsewhere = w.path("elsewhere");
    make_dir(&elsewhere, 0o755, None);
    make_big_qcow2(&elsewhere.join("disk.qcow2"));

    let call = check_in_background(&w, &image, HashMap::new());
    gate.wait_started();
    as_attacker(
        r#"mv "$1" "$1.orig" && ln -s "$2" "$1""#,
        &[&sub, &elsewhere],
    );
    gate.open();
    let report = call.await.unwrap().unwrap();
    assert_eq!(str_of(&report, "result"), "leaks", "{:#}", json(&report));
    assert_eq!(u64_of(&report, "total-clusters"), SMALL_CLUSTERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_name_never_bypasses_the_in_use_refusal() {
    let gate = Gate::new();
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    let config = DaemonConfig::default().qemu_img(gate.qemu_img());
    let w = World::with(polkit, config).await;
    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));
    // nobody's image that a VM holds read-only: a direct check is refused.
    let held = home.join("held.qcow2");
    make_clean_qcow2(&held);
    give(&held, NOBODY, 0o644);
    let _vm = Vm::builder("ro-vm", &held).readonly(true).start();
    let out = w.check_as_nobody(&[], &held);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    // nobody's own free (and bigger) image, then the swap.
    let own = home.join("own.qcow2");
    make_big_qcow2(&own);
    give(&own, NOBODY, 0o644);

    let args = ["check-disk", "--json", own.to_str().unwrap()];
    let call = vmctl_in_background(&w, NOBODY_USER, &args);
    gate.wait_started();
    as_attacker(r#"mv "$1" "$1.orig" && ln -s "$2" "$1""#, &[&own, &held]);
    gate.open();
    let out = call.await.unwrap();
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["total-clusters"], BIG_CLUSTERS, "{doc:#}");
    assert_eq!(doc["users"], serde_json::json!([]), "{doc:#}");
    assert_eq!(doc["result"], "clean", "{doc:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_file_swapped_for_a_fifo_mid_check_cannot_hang_it() {
    let gate = Gate::new();
    let config = DaemonConfig::default().qemu_img(gate.qemu_img());
    let w = World::with(Polkit::builder(), config).await;
    let shared = shared_dir(&w);
    let base = shared.join("base.qcow2");
    make_clean_qcow2(&base);
    let overlay = shared.join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay))
    .expect_success("qemu-img create overlay");

    let options = HashMap::from([("timeout-sec", Variant::from(15u32))]);
    let started = Instant::now();
    let call = check_in_background(&w, &overlay, options);
    gate.wait_started();
    as_attacker(r#"rm "$1" && mkfifo "$1""#, &[&base]);
    gate.open();
    let report = call.await.unwrap().unwrap();
    assert_eq!(str_of(&report, "result"), "clean", "{:#}", json(&report));
    eprintln!(
        "checked in {:?} with a FIFO as backing file",
        started.elapsed()
    );
}

// --- oracles ------------------------------------------------------------

/// What an oracle test compares: the error name and message, or the report
/// without its timing.
fn answer(out: &CmdOutput) -> serde_json::Value {
    let mut doc: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("vmctl printed no JSON ({e}): {out:?}"));
    if let Some(map) = doc.as_object_mut() {
        map.remove("duration-ms");
        // vmctl echoes the path it was given; the service's answer is the rest.
        map.remove("image");
    }
    doc
}

/// Paths that differ only in what `nobody` cannot see, inside a directory
/// only root can enter: a file, a missing name, a directory, a FIFO, and
/// the same file through a root process's `/proc/PID/cwd` and `fd` links.
struct Secrets {
    _dir: TempDir,
    _holder: ChildGuard,
    paths: Vec<PathBuf>,
    /// A PID file nobody cannot read, naming a live process, and one that
    /// does not exist.
    pidfiles: [PathBuf; 2],
}

fn secrets() -> Secrets {
    let dir = tempfile::Builder::new()
        .prefix("vmm-secret-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let d = dir.path();
    let file = d.join("file.qcow2");
    make_clean_qcow2(&file);
    std::fs::create_dir(d.join("dir")).unwrap();
    let fifo = d.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // A root process that sits in the directory with the file open on fd 3.
    let holder = Command::new("sh")
        .arg("-c")
        .arg(r#"exec 3<"$1"; exec sleep 600"#)
        .arg("sh")
        .arg(&file)
        .current_dir(d)
        .spawn()
        .unwrap();
    let holder = ChildGuard::new(holder, "secret holder");
    let pid = holder.pid();
    wait_until(
        Duration::from_secs(10),
        "the holder to open the file",
        || std::fs::read_link(format!("/proc/{pid}/fd/3")).is_ok_and(|t| t == file),
        String::new,
    );
    let pidfile = d.join("vm.pid");
    write_file(&pidfile, format!("{pid}\n"), 0o600);
    Secrets {
        paths: vec![
            file.clone(),
            d.join("missing.qcow2"),
            d.join("dir"),
            fifo,
            PathBuf::from(format!("/proc/{pid}/cwd/file.qcow2")),
            PathBuf::from(format!("/proc/{pid}/fd/3")),
        ],
        pidfiles: [pidfile, d.join("missing.pid")],
        _dir: dir,
        _holder: holder,
    }
}

/// `vmctl check-disk --json` and `disk-users --json` as nobody for every
/// secret path: one answer each, all alike.
fn assert_same_answers(w: &World, secrets: &Secrets, who: &str) {
    for command in ["check-disk", "disk-users"] {
        let answers: Vec<(PathBuf, serde_json::Value)> = secrets
            .paths
            .iter()
            .map(|p| {
                let args = ["--no-ask-password", command, "--json", p.to_str().unwrap()];
                (p.clone(), answer(&w.vmctl(NOBODY_USER, &args)))
            })
            .collect();
        let first = &answers[0].1;
        assert_eq!(
            first["error"], "org.example.VmManager1.Error.NotAuthorized",
            "{who} {command}: {first:#}"
        );
        for (path, other) in &answers[1..] {
            assert_eq!(other, first, "{who} {command}: {path:?} tells itself apart");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_revealed_before_polkit_or_beyond_it() {
    let secrets = secrets();
    // No rules: nobody may do nothing, and learns nothing.
    let w = World::start().await;
    assert_same_answers(&w, &secrets, "unauthorized");
    drop(w);

    // Allowed check-disk (its own images): still nothing about root's.
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    let w = World::with(polkit, DaemonConfig::default()).await;
    assert_same_answers(&w, &secrets, "check-disk");

    // The pidfile option on nobody's own image: a PID file it cannot read
    // and a missing one give the same report and the same signal.
    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));
    let own = home.join("own.qcow2");
    make_clean_qcow2(&own);
    give(&own, NOBODY, 0o644);
    let manager = w.manager().await;
    let mut signals = manager.receive_disk_checked().await.unwrap();
    let mut reports = Vec::new();
    let mut signalled = Vec::new();
    for pidfile in &secrets.pidfiles {
        let args = [
            "--no-ask-password",
            "check-disk",
            "--json",
            "--pidfile",
            pidfile.to_str().unwrap(),
            own.to_str().unwrap(),
        ];
        let out = w.vmctl(NOBODY_USER, &args);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        reports.push(answer(&out));
        let signal = tokio::time::timeout(Duration::from_secs(10), signals.next())
            .await
            .expect("DiskChecked")
            .unwrap();
        let mut report = signal.args().unwrap().report().clone();
        report.remove("duration-ms");
        signalled.push(json(&report));
    }
    assert_eq!(reports[0], reports[1]);
    assert_eq!(reports[0]["stale-pidfiles"], serde_json::json!([]));
    assert_eq!(signalled[0], signalled[1]);
}

/// In the common case (the caller's own image, found by its own lookup)
/// the in-use scan starts while polkit is asked. A refusal still says
/// nothing about what it found: a VM on the image and an unused image get
/// the same NotAuthorized, and no DiskChecked tells anyone about either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_says_nothing_about_the_scan_that_ran_meanwhile() {
    // No rules: nobody, without a session or a password, is refused.
    let w = World::start().await;
    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));
    let (used, unused) = (home.join("used.qcow2"), home.join("unused.qcow2"));
    for image in [&used, &unused] {
        make_clean_qcow2(image);
        give(image, NOBODY, 0o644);
    }
    let _vm = Vm::start("held", &used);
    let manager = w.manager().await;
    let mut signals = manager.receive_disk_checked().await.unwrap();
    for command in ["check-disk", "disk-users"] {
        let answers: Vec<serde_json::Value> = [&used, &unused]
            .iter()
            .map(|image| answer(&w.vmctl_json_as(NOBODY, command, image)))
            .collect();
        assert_eq!(
            answers[0]["error"], "org.example.VmManager1.Error.NotAuthorized",
            "{command}: {:#}",
            answers[0]
        );
        assert_eq!(answers[0], answers[1], "{command}: the VM shows through");
    }
    let signal = tokio::time::timeout(Duration::from_millis(500), signals.next()).await;
    assert!(signal.is_err(), "a refused check was announced");
}

// --- fair share ---------------------------------------------------------

/// A stand-in that hangs for the checks of any non-root user and is the
/// real qemu-img for root's; it records the PIDs of the hanging runs.
fn hang_for_users(dir: &Path) -> PathBuf {
    common::util::set_mode(dir, 0o777);
    let script = dir.join("qemu-img");
    write_file(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$(id -u)\" != 0 ]; then echo $$ >> {d}/hanging; \
             exec sleep 600; fi\nexec /usr/bin/qemu-img \"$@\"\n",
            d = dir.display()
        ),
        0o755,
    );
    script
}

fn hanging_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("hanging"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_hanging_checks_never_starve_another() {
    let tools = public_tempdir("vmm-hang-");
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    let config = DaemonConfig::default()
        .qemu_img(hang_for_users(tools.path()))
        .max_concurrent_checks(2);
    let w = World::with(polkit, config).await;
    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));

    // nobody starts more checks than it may have (1 running + 4 waiting).
    let mut clients = Vec::new();
    for i in 0..6 {
        let image = home.join(format!("own{i}.qcow2"));
        make_clean_qcow2(&image);
        give(&image, NOBODY, 0o644);
        clients.push(busctl_call_in_background(
            w.stack.bus.address(),
            NOBODY_USER,
            "CheckDisk",
            &image,
            std::process::Stdio::null(),
        ));
    }
    wait_until(
        Duration::from_secs(20),
        "nobody's first check to hang",
        || !hanging_pids(tools.path()).is_empty(),
        String::new,
    );
    // One of the six was refused at once.
    wait_until(
        Duration::from_secs(20),
        "nobody's sixth check to be refused",
        || clients.iter_mut().any(|c| !c.is_running()),
        String::new,
    );

    // root's check, with a 5 s limit, is answered (and done) at once.
    let image = w.path("roots.qcow2");
    make_clean_qcow2(&image);
    let started = Instant::now();
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        w.check(&image, &[("timeout-sec", Variant::from(5u32))]),
    )
    .await
    .expect("root's check was starved")
    .unwrap();
    assert_eq!(str_of(&report, "result"), "clean");
    eprintln!(
        "root's check beside nobody's hanging ones: {:?}",
        started.elapsed()
    );
    // nobody's own waiting check, with a 2 s limit, times out in time.
    let own = home.join("own0.qcow2");
    let args = [
        "check-disk",
        "--json",
        "--timeout",
        "2",
        own.to_str().unwrap(),
    ];
    let started = Instant::now();
    let out = w.vmctl(NOBODY_USER, &args);
    let doc = answer(&out);
    assert!(
        doc["error"] == "org.example.VmManager1.Error.Timeout"
            || doc["error"] == "org.example.VmManager1.Error.Busy",
        "{doc:#}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    // Killing nobody's clients ends their checks: no job, no qemu-img left.
    let hanging = hanging_pids(tools.path());
    for client in &mut clients {
        client.kill_and_wait();
    }
    let started = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the killed clients' qemu-img runs to end",
        || hanging.iter().all(|p| !alive(*p)),
        || format!("still hanging: {hanging:?}"),
    );
    let manager = w.manager().await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while !manager.jobs().await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("jobs left after their clients died");
    eprintln!(
        "killed clients' checks ended within {:?}",
        started.elapsed()
    );
}

/// Two users, one hanging check each, on the default two slots: one slot is
/// always kept for root (and administrators), so root is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_hanging_checks_never_starve_root() {
    let tools = public_tempdir("vmm-hang-");
    let polkit = Polkit::builder()
        .allow_user("org.example.vmmanager.check-disk", "nobody")
        .allow_user("org.example.vmmanager.check-disk", "daemon");
    let config = DaemonConfig::default()
        .qemu_img(hang_for_users(tools.path()))
        .max_concurrent_checks(2);
    let w = World::with(polkit, config).await;
    let mut clients = Vec::new();
    for uid in [NOBODY, 1] {
        let home = w.path(&format!("home{uid}"));
        make_dir(&home, 0o755, Some(uid));
        let image = home.join("own.qcow2");
        make_clean_qcow2(&image);
        give(&image, uid, 0o644);
        // Their own limit ends them after root's check was answered.
        let args = [
            "check-disk",
            "--json",
            "--timeout",
            "8",
            image.to_str().unwrap(),
        ];
        clients.push(vmctl_in_background(&w, Some((uid, uid)), &args));
    }
    wait_until(
        Duration::from_secs(20),
        "a user's check to hang",
        || !hanging_pids(tools.path()).is_empty(),
        String::new,
    );
    let image = w.path("roots.qcow2");
    make_clean_qcow2(&image);
    let report = tokio::time::timeout(
        Duration::from_secs(20),
        w.check(&image, &[("timeout-sec", Variant::from(5u32))]),
    )
    .await
    .expect("root's check was starved")
    .unwrap_or_else(|e| panic!("root's check: {e:?}"));
    assert_eq!(str_of(&report, "result"), "clean");
    for client in clients {
        let doc = answer(&client.await.unwrap());
        assert_eq!(
            doc["error"], "org.example.VmManager1.Error.Timeout",
            "{doc:#}"
        );
    }
}

// --- load ---------------------------------------------------------------

/// Who calls (root when None), vmctl's arguments, and the answers allowed
/// (a result, "users", or an error's short name).
type PlannedCall = (Option<(u32, u32)>, Vec<String>, &'static [&'static str]);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_of_several_users_are_all_answered_and_leave_nothing() {
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    let w = World::with(polkit, DaemonConfig::default().max_concurrent_checks(2)).await;
    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));
    let roots: Vec<PathBuf> = (0..3).map(|i| w.path(&format!("root{i}.qcow2"))).collect();
    let owns: Vec<PathBuf> = (0..3).map(|i| home.join(format!("own{i}.qcow2"))).collect();
    for image in &roots {
        make_leaky_qcow2(image);
    }
    for image in &owns {
        make_clean_qcow2(image);
        give(image, NOBODY, 0o644);
    }
    // One call of each kind first, so lazily created state is there.
    w.check(&roots[0], &[]).await.unwrap();
    let daemon = w.stack.daemon.pid();
    let fds_before = fd_count(daemon);

    const DAEMON_USER: Option<(u32, u32)> = Some((1, 1));
    // A component longer than any file system allows: refused from its text.
    let too_long = format!("/{}.qcow2", "x".repeat(300));
    let started = Instant::now();
    let mut calls = Vec::new();
    for round in 0..8 {
        let root_image = &roots[round % roots.len()];
        let own = &owns[round % owns.len()];
        let root_image_str = root_image.to_str().unwrap();
        let own_str = own.to_str().unwrap();
        let plan: Vec<PlannedCall> = vec![
            (
                None,
                vec!["check-disk".into(), root_image_str.into()],
                &["leaks", "Busy"],
            ),
            (
                None,
                vec!["disk-users".into(), root_image_str.into()],
                &["users"],
            ),
            (
                NOBODY_USER,
                vec!["check-disk".into(), own_str.into()],
                &["clean", "Busy"],
            ),
            (
                NOBODY_USER,
                vec!["check-disk".into(), root_image_str.into()],
                &["NotAuthorized"],
            ),
            (
                DAEMON_USER,
                vec!["check-disk".into(), own_str.into()],
                &["NotAuthorized"],
            ),
            (
                NOBODY_USER,
                vec!["check-disk".into(), too_long.clone()],
                &["InvalidArgument"],
            ),
            (
                NOBODY_USER,
                vec![
                    "check-disk".into(),
                    "--repair".into(),
                    "leaks".into(),
                    own_str.into(),
                ],
                &["NotAuthorized"],
            ),
            (
                DAEMON_USER,
                vec!["disk-users".into(), "/root/x".into()],
                &["NotAuthorized"],
            ),
        ];
        for (who, mut args, expected) in plan {
            args.insert(1, "--json".into());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            calls.push((
                vmctl_in_background(&w, who, &args),
                expected,
                args.join(" "),
            ));
        }
    }
    let total = calls.len();
    for (call, expected, what) in calls {
        let out = tokio::time::timeout(Duration::from_secs(120), call)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer"))
            .unwrap();
        let doc: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{what}: no JSON ({e}): {out:?}"));
        let got = if doc.is_array() {
            "users".to_owned()
        } else if let Some(error) = doc["error"].as_str() {
            error.rsplit('.').next().unwrap().to_owned()
        } else {
            doc["result"].as_str().unwrap_or_default().to_owned()
        };
        assert!(expected.contains(&got.as_str()), "{what}: {got} ({doc:#})");
    }
    eprintln!(
        "{total} calls of 3 users answered in {:?}",
        started.elapsed()
    );

    // Nothing left: no job, no child, no descriptor.
    let manager = w.manager().await;
    assert!(manager.jobs().await.unwrap().is_empty());
    assert_eq!(
        vmmanager::procfs::children(Path::new("/proc"), daemon),
        Vec::<u32>::new()
    );
    wait_until(
        Duration::from_secs(5),
        "the daemon's descriptors to return to their count",
        || fd_count(daemon) <= fds_before,
        || format!("{} fds now, {fds_before} before", fd_count(daemon)),
    );
    eprintln!(
        "daemon fds: {fds_before} before, {} after",
        fd_count(daemon)
    );
}

/// A lookup as the caller still runs inside the service's process, where
/// `/proc/self` is the service: its descriptors (another check's image in a
/// directory the caller cannot enter) must not be reachable by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_services_own_descriptors_are_not_reachable_through_proc_self() {
    let gate = Gate::new();
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    let config = DaemonConfig::default().qemu_img(gate.qemu_img());
    let w = World::with(polkit, config).await;
    // nobody's image, kept by root in a directory nobody cannot enter.
    let vault = w.path("vault");
    make_dir(&vault, 0o700, None);
    let hidden = vault.join("hidden-name.qcow2");
    make_clean_qcow2(&hidden);
    give(&hidden, NOBODY, 0o644);
    let call = check_in_background(&w, &hidden, HashMap::new());
    gate.wait_started();

    let missing = answer(&w.check_as_nobody(&[], &w.path("missing.qcow2")));
    for fd in 0..64 {
        for path in [
            format!("/proc/self/fd/{fd}"),
            format!("/proc/thread-self/fd/{fd}"),
        ] {
            let got = answer(&w.check_as_nobody(&[], Path::new(&path)));
            assert_eq!(got, missing, "{path} reached {got:#}");
        }
    }
    gate.open();
    assert_eq!(str_of(&call.await.unwrap().unwrap(), "result"), "clean");
}

/// A sparse VMDK (magic `KDMV`) with no capacity of its own and an embedded
/// descriptor: QEMU reads it as a descriptor and opens the extents it names,
/// by name. Such an image is refused before qemu-img runs, so an extent
/// that is a FIFO (or another user's image a VM holds) is never opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmdk_whose_embedded_descriptor_names_files_is_refused() {
    let w = World::start().await;
    let fifo = w.path("extent.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRW 32768 FLAT \"{}\" 0\n",
        fifo.display()
    );
    // Header: magic, version 1, flags 3, capacity 0, grain 128 sectors,
    // descriptor at sector 1 for 20 sectors, 512 grain table entries.
    let mut image = b"KDMV".to_vec();
    for v in [1u32, 3] {
        image.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0u64, 128, 1, 20] {
        image.extend_from_slice(&v.to_le_bytes());
    }
    image.extend_from_slice(&512u32.to_le_bytes());
    image.resize(512, 0);
    let mut text = descriptor.into_bytes();
    text.resize(20 * 512, 0);
    image.extend_from_slice(&text);
    let path = w.path("wrapper.vmdk");
    write_file(&path, image, 0o644);

    let started = Instant::now();
    let (name, message) = w
        .check(&path, &[("timeout-sec", Variant::from(20u32))])
        .await
        .unwrap_err();
    assert_eq!(name, "NotSupported", "{message}");
    assert!(message.contains("extents"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// `{image_dir}` is looked up by name when the PID files are read, after
/// the wait for a slot. A directory swapped meanwhile (here: to a root-only
/// directory) must not have its PID files listed in root's public report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_image_directory_lends_no_pidfiles() {
    let gate = Gate::new();
    let config = DaemonConfig::default()
        .qemu_img(gate.qemu_img())
        .max_concurrent_checks(1);
    let w = World::with(Polkit::builder(), config).await;
    // The first check holds the only slot at the gate.
    let first = w.path("first.qcow2");
    make_clean_qcow2(&first);
    let holding = check_in_background(&w, &first, HashMap::new());
    gate.wait_started();
    // Root's image in a directory the attacker may rename entries of.
    let vm = shared_dir(&w).join("vm");
    make_dir(&vm, 0o755, None);
    let image = vm.join("disk.qcow2");
    make_clean_qcow2(&image);
    let secret = w.path("secret");
    make_dir(&secret, 0o700, None);
    write_file(&secret.join("root-only-secret-name.pid"), "garbage", 0o600);
    let waiting = check_in_background(&w, &image, HashMap::new());
    let manager = w.manager().await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while manager.jobs().await.unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the second check to wait");
    as_attacker(r#"mv "$1" "$1.orig" && ln -s "$2" "$1""#, &[&vm, &secret]);
    gate.open();
    holding.await.unwrap().unwrap();
    let report = waiting.await.unwrap().unwrap();
    assert_eq!(
        json(&report)["stale-pidfiles"],
        serde_json::json!([]),
        "{:#}",
        json(&report)
    );
}

/// The `pidfile` option is read when the scan runs, as the caller: a
/// directory on its path swapped during the wait for a slot (to a root-only
/// one) reveals nothing of what is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_pidfile_directory_reveals_nothing() {
    let gate = Gate::new();
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    let config = DaemonConfig::default()
        .qemu_img(gate.qemu_img())
        .max_concurrent_checks(1);
    let w = World::with(polkit, config).await;
    let first = w.path("first.qcow2");
    make_clean_qcow2(&first);
    let holding = check_in_background(&w, &first, HashMap::new());
    gate.wait_started();

    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));
    let image = home.join("own.qcow2");
    make_clean_qcow2(&image);
    give(&image, NOBODY, 0o644);
    let run = home.join("run");
    make_dir(&run, 0o755, Some(NOBODY));
    let secret = w.path("secret");
    make_dir(&secret, 0o700, None);
    write_file(&secret.join("vm.pid"), "garbage", 0o644);
    let pidfile = run.join("vm.pid");
    let args = [
        "check-disk",
        "--json",
        "--pidfile",
        pidfile.to_str().unwrap(),
        image.to_str().unwrap(),
    ];
    let call = vmctl_in_background(&w, NOBODY_USER, &args);
    let manager = w.manager().await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while manager.jobs().await.unwrap().len() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("nobody's check to wait");
    as_attacker(r#"mv "$1" "$1.orig" && ln -s "$2" "$1""#, &[&run, &secret]);
    gate.open();
    holding.await.unwrap().unwrap();
    let doc = answer(&call.await.unwrap());
    assert_eq!(doc["result"], "clean", "{doc:#}");
    assert_eq!(doc["stale-pidfiles"], serde_json::json!([]), "{doc:#}");
}

/// libvirt's dynamic ownership, reproduced: nobody's image, chowned to
/// another user (as libvirt chowns it to `libvirt-qemu`), carrying
/// libvirt's record of its owner (`trusted.libvirt.security.dac`, which
/// only root can write), and held by that user's QEMU. The remembered owner
/// is told which VM uses it; a file in the caller's own directory without
/// that record (renamed in, say), or remembering someone else, tells the
/// caller nothing; and nothing the caller could not open itself is ever
/// checked for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirts_remembered_owner_is_told_which_vm_uses_its_image() {
    const QEMU_USER: u32 = 1; // `daemon`, standing in for libvirt-qemu
    const BIN: u32 = 2;
    // Both may check their own images: what they are refused below is the
    // other-user action.
    let polkit = Polkit::builder()
        .allow_user("org.example.vmmanager.check-disk", "nobody")
        .allow_user("org.example.vmmanager.check-disk", "bin");
    let w = World::with(polkit, DaemonConfig::default()).await;
    let other_user = "not authorized for org.example.vmmanager.check-disk-other-user";
    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));
    // 0600: nobody cannot even read it any more.
    let image = home.join("disk.qcow2");
    make_clean_qcow2(&image);
    give(&image, QEMU_USER, 0o600);
    remember_libvirt_owner(&image, NOBODY);
    let renamed_in = home.join("renamed-in.qcow2");
    make_clean_qcow2(&renamed_in);
    give(&renamed_in, QEMU_USER, 0o644);
    let bins = home.join("bins.qcow2");
    make_clean_qcow2(&bins);
    give(&bins, QEMU_USER, 0o644);
    remember_libvirt_owner(&bins, BIN);
    let run = w.path("run");
    make_dir(&run, 0o755, Some(QEMU_USER));
    let vm = Vm::builder("lvhome", &image)
        .drive(&renamed_in, false)
        .drive(&bins, false)
        .user(QEMU_USER, QEMU_USER)
        .pidfile(run.join("lvhome.pid"))
        .start();
    let in_use_by_lvhome = |answer: &serde_json::Value| {
        assert_eq!(
            answer["error"], "org.example.VmManager1.Error.InUse",
            "{answer:#}"
        );
        let message = answer["error-message"].as_str().unwrap();
        let named = format!("VM \"lvhome\" (PID {}", vm.pid());
        assert!(message.contains(&named), "{message}");
    };

    in_use_by_lvhome(&answer(&w.check_as_nobody(&[], &image)));
    let check = |uid: u32, image: &Path| answer(&w.vmctl_json_as(uid, "check-disk", image));
    in_use_by_lvhome(&check(BIN, &bins));
    for (uid, path) in [(BIN, &image), (NOBODY, &bins), (NOBODY, &renamed_in)] {
        let refused = check(uid, path);
        assert_eq!(
            refused["error-message"],
            other_user,
            "uid {uid}, {}: {refused:#}",
            path.display()
        );
    }

    // Once the VM is gone, qemu-img runs as the remembered owner and
    // reopens the image with its permissions: a file it cannot read is not
    // checked for it, one it can read is.
    drop(vm);
    let unreadable = answer(&w.check_as_nobody(&[], &image));
    assert_eq!(
        unreadable["error"], "org.example.VmManager1.Error.CheckFailed",
        "{unreadable:#}"
    );
    assert!(
        unreadable["error-message"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{unreadable:#}"
    );
    assert_eq!(unreadable.get("result"), None, "{unreadable:#}");
    give(&image, QEMU_USER, 0o644);
    let readable = answer(&w.check_as_nobody(&[], &image));
    assert_eq!(readable["result"], "clean", "{readable:#}");
}

/// What libvirt's dynamic ownership writes when it chowns an image to
/// `libvirt-qemu` (`remember_owner`): the owner to give it back to.
fn remember_libvirt_owner(path: &Path, uid: u32) {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let value = format!("+{uid}:+{uid}");
    // SAFETY: NUL-terminated path and name; `value` is readable for its length.
    let rc = unsafe {
        libc::setxattr(
            c_path.as_ptr(),
            c"trusted.libvirt.security.dac".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}
