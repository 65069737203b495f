//! The ways real VM managers launch QEMU, against the real daemon: Quickemu's
//! daemonized QEMU with a relative `-pidfile`, a QEMU in its own PID
//! namespace, a PID file whose number was recycled by another VM, a VM
//! starting during a scan, libvirt session PID files, Proxmox's `kvm`,
//! qemu-nbd and qemu-storage-daemon exports, and `file.locking=off`.
//! (The real libvirt: `tests/libvirt.rs`.)

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::images::make_clean_qcow2;
use common::util::{ChildGuard, alive, run, wait_until};
use common::world::{World, json};
use zbus::Variant;

const QEMU_ARGS: &[&str] = &[
    "-accel",
    "kvm",
    "-accel",
    "tcg",
    "-m",
    "64",
    "-nodefaults",
    "-display",
    "none",
];

/// Starts `program` (QEMU, or a wrapper that execs it: `unshare …`, a `kvm`
/// symlink) with `args` then QEMU's options for a VM `name` on `image`
/// (with `drive_options` appended to its `-drive`), with `-pidfile` when
/// given; killed on drop.
fn start_qemu(
    program: &Path,
    args: &[&str],
    name: &str,
    pidfile: Option<&Path>,
    image: &Path,
    drive_options: &str,
) -> ChildGuard {
    let mut cmd = Command::new(program);
    cmd.args(args).args(QEMU_ARGS).args(["-name", name]);
    if let Some(pidfile) = pidfile {
        cmd.arg("-pidfile").arg(pidfile);
    }
    let child = cmd
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2{drive_options}",
            image.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    ChildGuard::new(child, format!("QEMU {name}"))
}

/// A QEMU that is not our child (it daemonized): SIGKILLed on drop.
struct Daemonized(u32);

impl Drop for Daemonized {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of a PID we read from QEMU's own PID file.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
        wait_until(
            Duration::from_secs(10),
            "the daemonized QEMU to die",
            || !alive(self.0),
            String::new,
        );
    }
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Waits until QEMU `pid` holds `image` open (it is up).
fn wait_holding(pid: u32, image: &Path) {
    let image = std::fs::canonicalize(image).unwrap();
    wait_until(
        Duration::from_secs(30),
        "QEMU to open its image",
        || {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|fds| {
                    fds.flatten()
                        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == image))
                })
                .unwrap_or(false)
        },
        String::new,
    );
}

/// Waits until QEMU `pid` holds `image` and has written `pidfile`.
fn wait_up(pid: u32, image: &Path, pidfile: &Path) {
    wait_holding(pid, image);
    wait_until(
        Duration::from_secs(30),
        "QEMU to write its PID file",
        || std::fs::read_to_string(pidfile).is_ok_and(|s| s.trim() == pid.to_string()),
        String::new,
    );
}

async fn only_user(w: &World, image: &Path) -> serde_json::Value {
    let users = w.users(image, &[]).await.unwrap();
    assert_eq!(users.len(), 1, "{users:?}");
    json(&users[0])
}

async fn stale_pidfiles(w: &World, image: &Path) -> serde_json::Value {
    let report = w
        .check(image, &[("force-share", Variant::from(true))])
        .await
        .unwrap();
    json(&report)["stale-pidfiles"].clone()
}

/// Quickemu's way: `cd` into the VM directory, `-daemonize`, relative
/// `-pidfile` and drive. A daemonized QEMU's cwd is `/`, so the relative name
/// no longer resolves through /proc; the lock QEMU holds on it still says
/// whose file it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonized_qemu_with_a_relative_pidfile_is_found_by_it() {
    let w = World::start().await;
    let vm_dir = w.path("quick");
    std::fs::create_dir(&vm_dir).unwrap();
    let image = vm_dir.join("disk.qcow2");
    make_clean_qcow2(&image);
    let out = run(Command::new("sh")
        .arg("-c")
        .arg(r#"cd "$1" && shift && exec "$@""#)
        .arg("sh")
        .arg(&vm_dir)
        .arg(common::vm::QEMU)
        .args(QEMU_ARGS)
        .args(["-name", "quick", "-daemonize", "-pidfile", "quick.pid"])
        .args(["-drive", "file=disk.qcow2,if=virtio,format=qcow2"]));
    out.expect_success("qemu -daemonize");
    let pidfile = vm_dir.join("quick.pid");
    let vm = Daemonized(read_pid(&pidfile));
    wait_holding(vm.0, &image);

    let user = only_user(&w, &image).await;
    assert_eq!(user["pid"], vm.0);
    assert_eq!(user["vm-name"], "quick");
    assert_eq!(
        user["found-by"],
        serde_json::json!(["pidfile", "proc", "lock"])
    );
    assert_eq!(user["pidfile"], pidfile.to_str().unwrap());
    assert_eq!(stale_pidfiles(&w, &image).await, serde_json::json!([]));
}

/// A QEMU in its own PID namespace writes its namespace PID (1) into the PID
/// file next to the image; the lock's holder is its PID as the service sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_namespaced_qemu_owns_its_pidfile() {
    let w = World::start().await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let pidfile = w.path("ns.pid");
    let _unshare = start_qemu(
        Path::new("unshare"),
        &[
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            common::vm::QEMU,
        ],
        "contained",
        Some(&pidfile),
        &image,
        "",
    );
    wait_until(
        Duration::from_secs(30),
        "the namespaced QEMU to write its PID file",
        || std::fs::read_to_string(&pidfile).is_ok_and(|s| s.trim() == "1"),
        String::new,
    );
    let qemu = qemu_holding(&image);

    let user = only_user(&w, &image).await;
    assert_eq!(user["pid"], qemu);
    assert_eq!(
        user["found-by"],
        serde_json::json!(["pidfile", "proc", "lock"])
    );
    assert_eq!(user["pidfile"], pidfile.to_str().unwrap());
    assert_eq!(stale_pidfiles(&w, &image).await, serde_json::json!([]));
}

/// The PID of the process (as this test sees it) that holds `image` open.
fn qemu_holding(image: &Path) -> u32 {
    let image = std::fs::canonicalize(image).unwrap();
    let mut found = None;
    wait_until(
        Duration::from_secs(30),
        "a QEMU to hold the image",
        || {
            found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|p| {
                let pid: u32 = p.file_name().to_str()?.parse().ok()?;
                let exe = std::fs::read_link(p.path().join("exe")).ok()?;
                if !exe.to_string_lossy().contains("qemu-system") {
                    return None;
                }
                std::fs::read_dir(p.path().join("fd"))
                    .ok()?
                    .flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == image))
                    .then_some(pid)
            });
            found.is_some()
        },
        String::new,
    );
    found.unwrap()
}

/// A VM died and left its PID file; its number now belongs to another VM
/// (started without `-pidfile`, as some launchers do). Nobody holds the file:
/// stale, and listed as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_number_does_not_make_a_dead_vms_pidfile_valid() {
    let w = World::start().await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let elsewhere = common::util::public_tempdir("vmm-other-");
    let other_image = elsewhere.path().join("other.qcow2");
    make_clean_qcow2(&other_image);
    let other = start_qemu(
        Path::new(common::vm::QEMU),
        &[],
        "other",
        None,
        &other_image,
        "",
    );
    wait_holding(other.pid(), &other_image);
    let leftover: PathBuf = w.path("dead.pid");
    std::fs::write(&leftover, format!("{}\n", other.pid())).unwrap();

    assert_eq!(
        stale_pidfiles(&w, &image).await,
        serde_json::json!([leftover.to_str().unwrap()])
    );
}

/// A VM starting while the service looks: the lock may appear after /proc
/// was read. The service looks again before it blames an invisible holder,
/// so a QEMU it can see is never reported as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_starting_during_a_scan_is_never_an_anonymous_holder() {
    let w = World::start().await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let (mut answers, mut anonymous) = (0, Vec::new());
    for round in 0..25 {
        let starting = {
            let image = image.clone();
            tokio::task::spawn_blocking(move || {
                common::Vm::builder(&format!("starting{round}"), &image).start()
            })
        };
        while !starting.is_finished() {
            let users = w.users(&image, &[]).await.unwrap();
            answers += 1;
            anonymous.extend(
                users
                    .iter()
                    .map(json)
                    .filter(|u| u["pid"] == 0)
                    .map(|u| format!("round {round}: {u}")),
            );
        }
        drop(starting.await.unwrap());
    }
    eprintln!("{answers} answers during 25 VM starts");
    assert!(anonymous.is_empty(), "{anonymous:#?}");
}

/// libvirt's session mode (GNOME Boxes) keeps PID files in the VM owner's
/// runtime directory: `{owner_uid}` in a pattern is the image owner's uid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pidfiles_are_found_in_the_owners_runtime_dir() {
    let runtime = common::util::public_tempdir("vmm-run-user-");
    let pattern = format!(
        "{}/{{owner_uid}}/libvirt/qemu/run/*.pid",
        runtime.path().display()
    );
    let config = common::DaemonConfig::default().pidfile_patterns([pattern]);
    let w = World::with(common::Polkit::builder(), config).await;
    let run_dir = runtime
        .path()
        .join(common::NOBODY.to_string())
        .join("libvirt/qemu/run");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::os::unix::fs::chown(&run_dir, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    let image = w.path("boxes.qcow2");
    make_clean_qcow2(&image);
    std::os::unix::fs::chown(&image, Some(common::NOBODY), Some(common::NOBODY)).unwrap();
    let pidfile = run_dir.join("boxes.pid");
    let vm = common::Vm::builder("boxes", &image)
        .user(common::NOBODY, common::NOBODY)
        .pidfile(&pidfile)
        .start();
    let user = only_user(&w, &image).await;
    assert_eq!(user["pid"], vm.pid());
    assert_eq!(
        user["found-by"],
        serde_json::json!(["pidfile", "proc", "lock"])
    );
    assert_eq!(user["pidfile"], pidfile.to_str().unwrap());
}

/// Proxmox's launch: the binary is called `kvm`, `-name vm100,debug-threads=on`,
/// `-pidfile` in a directory of its own (here a temp dir standing in for
/// `/run/qemu-server`, configured as a global pattern).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxmox_style_launch_is_named_by_its_vm_id() {
    let run = common::util::public_tempdir("vmm-qemu-server-");
    let pattern = format!("{}/*.pid", run.path().display());
    let config = common::DaemonConfig::default().pidfile_patterns([pattern]);
    let w = World::with(common::Polkit::builder(), config).await;
    let image = w.path("vm-100-disk-0.qcow2");
    make_clean_qcow2(&image);
    let kvm = run.path().join("kvm");
    std::os::unix::fs::symlink(
        run_output("sh", &["-c", "command -v qemu-system-x86_64"]),
        &kvm,
    )
    .unwrap();
    let pidfile = run.path().join("100.pid");
    let vm = start_qemu(
        &kvm,
        &[],
        "vm100,debug-threads=on",
        Some(&pidfile),
        &image,
        "",
    );
    wait_up(vm.pid(), &image, &pidfile);
    let user = only_user(&w, &image).await;
    assert_eq!(user["pid"], vm.pid());
    assert_eq!(user["vm-name"], "vm100");
    assert_eq!(
        user["found-by"],
        serde_json::json!(["pidfile", "proc", "lock"])
    );
    assert_eq!(user["pidfile"], pidfile.to_str().unwrap());
    let (name, message) = w.check(&image, &[]).await.unwrap_err();
    assert_eq!(name, "InUse");
    assert!(message.contains("VM \"vm100\""), "{message}");
}

/// Images exported by `qemu-nbd` or `qemu-storage-daemon` are in use (they
/// hold them for writing): named, and never checked underneath them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_and_storage_daemon_exports_block_the_check() {
    let w = World::start().await;
    let sockets = common::util::public_tempdir("vmm-nbd-");
    for (tool, args) in [
        (
            "qemu-nbd",
            vec!["--persistent", "--shared=1", "-f", "qcow2", "-k"],
        ),
        ("qemu-storage-daemon", vec![]),
    ] {
        let image = w.path(&format!("{tool}.qcow2"));
        make_clean_qcow2(&image);
        let socket = sockets.path().join(format!("{tool}.sock"));
        let mut cmd = Command::new(tool);
        if tool == "qemu-nbd" {
            cmd.args(&args).arg(&socket).arg(&image);
        } else {
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=file0,filename={}",
                    image.display()
                ))
                .arg("--blockdev")
                .arg("driver=qcow2,node-name=disk0,file=file0")
                .arg("--nbd-server")
                .arg(format!("addr.type=unix,addr.path={}", socket.display()))
                .arg("--export")
                .arg("type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let exporter = ChildGuard::new(child, tool);
        wait_holding(exporter.pid(), &image);
        let user = only_user(&w, &image).await;
        assert_eq!(user["pid"], exporter.pid(), "{tool}");
        assert_eq!(user["writable"], true, "{tool}");
        let (name, message) = w.check(&image, &[]).await.unwrap_err();
        assert_eq!(name, "InUse", "{tool}: {message}");
        assert!(
            message.contains(&format!("PID {}", exporter.pid())),
            "{tool}: {message}"
        );
    }
}

/// `file.locking=off` (some launchers set it for NFS or shared storage):
/// QEMU takes no image lock at all, so its PID file and /proc find it, and
/// the check is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_that_takes_no_image_lock_still_blocks_the_check() {
    let w = World::start().await;
    let image = w.path("unlocked.qcow2");
    make_clean_qcow2(&image);
    let pidfile = w.path("unlocked.pid");
    let vm = start_qemu(
        Path::new(common::vm::QEMU),
        &[],
        "unlocked",
        Some(&pidfile),
        &image,
        ",file.locking=off",
    );
    wait_up(vm.pid(), &image, &pidfile);
    let user = only_user(&w, &image).await;
    assert_eq!(user["pid"], vm.pid());
    assert_eq!(user["vm-name"], "unlocked");
    assert_eq!(user["writable"], true);
    assert_eq!(user["found-by"], serde_json::json!(["pidfile", "proc"]));
    let (name, message) = w.check(&image, &[]).await.unwrap_err();
    assert_eq!(name, "InUse");
    assert!(message.contains("VM \"unlocked\""), "{message}");
}

fn run_output(program: &str, args: &[&str]) -> PathBuf {
    PathBuf::from(
        run(Command::new(program).args(args))
            .expect_success(program)
            .trim(),
    )
}
