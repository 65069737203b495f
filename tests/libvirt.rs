//! VM Manager against VMs started by the real libvirt 11: root's
//! `qemu:///system` (QEMU as libvirt-qemu, PID files in /run/libvirt/qemu,
//! images chowned while a domain runs) and a user's `qemu:///session` (PID
//! files in the user's runtime dir). Each test has its own libvirtd in a
//! private mount namespace and the daemon in that namespace, with the
//! daemon's real default PID-file patterns (see `common::libvirt`).
//!
//! What is asserted is what a user sees: CheckDisk's error name and message,
//! GetDiskUsers' entries, CheckDisk's report, `vmctl`'s answer.

use crate::common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::images::make_clean_qcow2;
use common::libvirt::{Disk, LIBVIRT_QEMU, Libvirt};
use common::util::{CmdOutput, alive, give, make_dir, run, wait_until};
use common::world::{World, json};
use common::{NOBODY, Polkit, PolkitBuilder};
use serde_json::json;
use zbus::Variant;

const IN_USE: &str = "org.example.VmManager1.Error.InUse";
use vmmanager_client::names::action::CHECK_DISK as CHECK_DISK_ACTION;
/// `daemon`: a second non-root user, owning neither image nor directory.
const DAEMON_USER: u32 = 1;

/// Both files of a chain are VM `name`'s: the top one written, its backing
/// file read-only.
async fn assert_chain_in_use(
    w: &World,
    lv: &Libvirt,
    [top, backing]: [&Path; 2],
    name: &str,
    pid: u32,
) {
    for (image, writable) in [(top, true), (backing, false)] {
        assert_in_use(w, image, &[(name, pid)]).await;
        assert_libvirt_user(w, lv, image, name, pid, writable).await;
    }
}

/// The system libvirt, and the daemon's world in its namespace.
async fn system(polkit: PolkitBuilder) -> (Libvirt, World) {
    let lv = tokio::task::spawn_blocking(Libvirt::system).await.unwrap();
    let w = World::with(polkit, lv.daemon_config()).await;
    (lv, w)
}

/// CheckDisk's InUse message for libvirt VMs `(name, pid)`, in that order.
fn in_use(image: &Path, vms: &[(&str, u32)]) -> String {
    let named: Vec<String> = vms
        .iter()
        .map(|(name, pid)| {
            format!("VM \"{name}\" (PID {pid}, qemu-system-x86_64, found by pidfile, proc, lock)")
        })
        .collect();
    let action = if vms.len() == 1 {
        "stop the VM"
    } else {
        "stop the VMs"
    };
    format!(
        "{} is in use by {}; {action} or pass force-share",
        image.file_name().unwrap().to_str().unwrap(),
        named.join(" and ")
    )
}

async fn only_user(w: &World, image: &Path) -> serde_json::Value {
    let users = w.users(image, &[]).await.unwrap();
    assert_eq!(users.len(), 1, "{users:?}");
    json(&users[0])
}

/// Asserts the one user of `image` is libvirt's QEMU `pid` of VM `name`.
async fn assert_libvirt_user(
    w: &World,
    lv: &Libvirt,
    image: &Path,
    name: &str,
    pid: u32,
    writable: bool,
) {
    let user = only_user(w, image).await;
    assert_eq!(user["pid"], pid, "{user}");
    assert_eq!(user["vm-name"], name, "{user}");
    assert_eq!(user["exe"], "/usr/bin/qemu-system-x86_64", "{user}");
    assert_eq!(user["writable"], writable, "{user}");
    assert_eq!(
        user["found-by"],
        json!(["pidfile", "proc", "lock"]),
        "{user}"
    );
    assert_eq!(
        user["pidfile"],
        lv.pidfile(name).to_str().unwrap(),
        "{user}"
    );
}

async fn assert_in_use(w: &World, image: &Path, vms: &[(&str, u32)]) {
    let (error, message) = w.check(image, &[]).await.unwrap_err();
    assert_eq!(error, "InUse", "{message}");
    assert_eq!(message, in_use(image, vms));
}

/// (uid, gid, permission bits) of `path`.
fn owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// The real uid of process `pid`.
fn uid_of(pid: u32) -> u32 {
    std::fs::metadata(format!("/proc/{pid}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}: {e}"))
        .uid()
}

/// vmctl's JSON answer (a report, users, or an error document).
fn answer(out: &CmdOutput) -> serde_json::Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("vmctl printed no JSON ({e}): {out:?}"))
}

/// `qemu-img create -q OPTIONS IMAGE [SIZE]`.
fn qemu_img_create(image: &Path, options: &[&str], size: Option<&str>) {
    run(Command::new("qemu-img")
        .args(["create", "-q"])
        .args(options)
        .arg(image)
        .args(size))
    .expect_success("qemu-img create");
}

/// A running domain blocks the check; CheckDisk, GetDiskUsers and vmctl
/// name it with libvirt's PID file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_domain_is_named_with_its_libvirt_pidfile() {
    let (lv, w) = system(Polkit::builder()).await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let pid = lv.create("lv1", &[Disk::qcow2(&image)]);
    assert_eq!(uid_of(pid), LIBVIRT_QEMU, "QEMU runs as libvirt-qemu");
    // Dynamic ownership: the image is QEMU's while the domain runs.
    assert_eq!(owner(&image), (LIBVIRT_QEMU, LIBVIRT_QEMU, 0o644));

    assert_in_use(&w, &image, &[("lv1", pid)]).await;
    assert_libvirt_user(&w, &lv, &image, "lv1", pid, true).await;
    assert_eq!(
        lv.pidfile("lv1"),
        Path::new("/run/libvirt/qemu/lv1.pid"),
        "libvirt's system PID file"
    );

    let out = w.vmctl(None, &["check-disk", "--json", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let doc = answer(&out);
    assert_eq!(doc["error"], IN_USE, "{doc}");
    assert_eq!(doc["error-message"], in_use(&image, &[("lv1", pid)]));
}

/// `<readonly/>`: QEMU takes only shared locks, yet a running VM still
/// blocks the check; it is reported as not writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readonly_disk_still_blocks_the_check() {
    let (lv, w) = system(Polkit::builder()).await;
    let image = w.path("ro.qcow2");
    make_clean_qcow2(&image);
    let pid = lv.create("lvro", &[Disk::qcow2(&image).readonly()]);

    assert_in_use(&w, &image, &[("lvro", pid)]).await;
    assert_libvirt_user(&w, &lv, &image, "lvro", pid, false).await;
}

/// An overlay on a backing file: libvirt opens the whole chain; both the
/// overlay (written) and its base (read) are the VM's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlay_and_its_backing_file_are_both_in_use() {
    let (lv, w) = system(Polkit::builder()).await;
    let base = w.path("base.qcow2");
    make_clean_qcow2(&base);
    let overlay = w.path("overlay.qcow2");
    let backing = ["-f", "qcow2", "-F", "qcow2", "-b", base.to_str().unwrap()];
    qemu_img_create(&overlay, &backing, None);
    let pid = lv.create("lvchain", &[Disk::qcow2(&overlay)]);

    assert_chain_in_use(&w, &lv, [&overlay, &base], "lvchain", pid).await;
}

/// `<shareable/>`: two domains on one raw disk; both are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shareable_disk_names_both_domains() {
    let (lv, w) = system(Polkit::builder()).await;
    let image = w.path("shared.img");
    qemu_img_create(&image, &["-f", "raw"], Some("16M"));
    let a = lv.create("lva", &[Disk::raw(&image).shareable()]);
    let b = lv.create("lvb", &[Disk::raw(&image).shareable()]);
    let mut vms = [("lva", a), ("lvb", b)];
    // Listed in PID order.
    vms.sort_by_key(|&(_, pid)| pid);

    assert_in_use(&w, &image, &vms).await;
    let users: Vec<serde_json::Value> = w
        .users(&image, &[])
        .await
        .unwrap()
        .iter()
        .map(json)
        .collect();
    assert_eq!(users.len(), 2, "{users:?}");
    for (user, (name, pid)) in users.iter().zip(vms) {
        assert_eq!(user["pid"], pid, "{user}");
        assert_eq!(user["vm-name"], name, "{user}");
        assert_eq!(user["writable"], true, "{user}");
        assert_eq!(
            user["found-by"],
            json!(["pidfile", "proc", "lock"]),
            "{user}"
        );
        assert_eq!(
            user["pidfile"],
            lv.pidfile(name).to_str().unwrap(),
            "{user}"
        );
    }
}

/// An external disk-only snapshot: QEMU switches to a new overlay that
/// libvirt creates; the old image becomes its read-only backing file. Both
/// are still the VM's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_snapshot_keeps_both_images_in_use() {
    let (lv, w) = system(Polkit::builder()).await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let pid = lv.create("lvsnap", &[Disk::qcow2(&image)]);
    let overlay = w.path("disk.s1.qcow2");
    let diskspec = format!("vda,file={}", overlay.display());
    let out = lv.virsh(&[
        "snapshot-create-as",
        "lvsnap",
        "s1",
        "--disk-only",
        "--atomic",
        "--no-metadata",
        "--diskspec",
        &diskspec,
    ]);
    assert!(out.success(), "{out:#?}\n{}", lv.logs());
    assert_eq!(lv.qemu_pid("lvsnap"), pid, "the same QEMU");

    assert_chain_in_use(&w, &lv, [&overlay, &image], "lvsnap", pid).await;
}

/// After `virsh destroy` the image is its owner's again and free: checked
/// (clean), with nobody using it and no stale PID file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroyed_domain_leaves_a_free_image_to_its_owner() {
    let (lv, w) = system(Polkit::builder()).await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    give(&image, NOBODY, 0o640);
    let pid = lv.create("lv6", &[Disk::qcow2(&image)]);
    assert_eq!(owner(&image), (LIBVIRT_QEMU, LIBVIRT_QEMU, 0o640));
    assert_in_use(&w, &image, &[("lv6", pid)]).await;

    lv.destroy("lv6");
    wait_until(
        Duration::from_secs(10),
        "the destroyed domain's QEMU to die",
        || !alive(pid),
        String::new,
    );
    assert!(
        !lv.in_namespace(lv.pidfile("lv6")).exists(),
        "libvirt removes the PID file"
    );
    assert_eq!(owner(&image), (NOBODY, NOBODY, 0o640), "owner restored");

    assert!(w.users(&image, &[]).await.unwrap().is_empty());
    let report = json(&w.check(&image, &[]).await.unwrap());
    assert_eq!(report["result"], "clean", "{report}");
    assert_eq!(report["users"], json!([]), "{report}");
    assert_eq!(report["stale-pidfiles"], json!([]), "{report}");
    // Root checks nobody's image as nobody.
    assert_eq!(report["run-as-uid"], NOBODY, "{report}");
}

/// libvirtd stopped, then its QEMU SIGKILLed: the PID file stays in
/// /run/libvirt/qemu and the image stays libvirt-qemu's. The image is free
/// and checked (as libvirt-qemu, its owner, never as root). A dead VM's file
/// in libvirt's directory is not blamed on every image; named explicitly,
/// it is reported stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_leaves_a_stale_pidfile_that_blocks_nothing() {
    let (mut lv, w) = system(Polkit::builder()).await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let pid = lv.create("lv7", &[Disk::qcow2(&image)]);
    tokio::task::block_in_place(|| lv.stop_libvirtd());
    assert!(alive(pid), "QEMU outlives libvirtd");
    // SAFETY: kill(2) of the QEMU whose PID libvirt wrote; it is alive.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    wait_until(
        Duration::from_secs(10),
        "QEMU to die",
        || !alive(pid),
        String::new,
    );
    assert_eq!(lv.qemu_pid("lv7"), pid, "the PID file stays");
    assert_eq!(owner(&image).0, LIBVIRT_QEMU, "nobody restored the owner");

    let report = json(&w.check(&image, &[]).await.unwrap());
    assert_eq!(report["result"], "clean", "{report}");
    assert_eq!(report["users"], json!([]), "{report}");
    assert_eq!(report["stale-pidfiles"], json!([]), "{report}");
    assert_eq!(report["run-as-uid"], LIBVIRT_QEMU, "{report}");

    let pidfile = lv.pidfile("lv7");
    let pidfile = pidfile.to_str().unwrap();
    let report = json(
        &w.check(&image, &[("pidfile", Variant::from(pidfile))])
            .await
            .unwrap(),
    );
    assert_eq!(report["result"], "clean", "{report}");
    assert_eq!(report["stale-pidfiles"], json!([pidfile]), "{report}");

    let out = w.vmctl(None, &["check-disk", "--json", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(answer(&out)["result"], "clean");
}

/// A user's image in their home directory, used by a system domain: libvirt
/// chowns it to libvirt-qemu (keeping its mode: 0600 makes it unreadable to
/// the user) and remembers the user as its owner, so the user is still told
/// which VM uses it. Another user learns nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_image_chowned_by_libvirt_is_named_to_its_remembered_owner() {
    let polkit = Polkit::builder()
        .allow_user(CHECK_DISK_ACTION, "nobody")
        .allow_user(CHECK_DISK_ACTION, "daemon");
    let (lv, w) = system(polkit).await;
    let home = w.path("home");
    make_dir(&home, 0o755, Some(NOBODY));
    let image = home.join("disk.qcow2");
    make_clean_qcow2(&image);
    give(&image, NOBODY, 0o600);
    let pid = lv.create("lvhome", &[Disk::qcow2(&image)]);
    assert_eq!(owner(&image), (LIBVIRT_QEMU, LIBVIRT_QEMU, 0o600));

    let out = w.vmctl_json_as(DAEMON_USER, "check-disk", &image);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let doc = answer(&out);
    assert_eq!(
        doc["error"], "org.example.VmManager1.Error.NotAuthorized",
        "{doc}"
    );
    assert!(!out.stdout.contains("lvhome"), "{out:?}");

    let out = w.check_as_nobody(&[], &image);
    let doc = answer(&out);
    assert_eq!(doc["error"], IN_USE, "{out:?}");
    assert_eq!(doc["error-message"], in_use(&image, &[("lvhome", pid)]));
    assert_eq!(out.status.code(), Some(4), "{out:?}");
}

/// GNOME Boxes' way: a user's own libvirtd (`qemu:///session`) runs QEMU as
/// them with the PID file in their runtime dir; the user asks vmctl and is
/// told which VM holds their image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_domain_is_named_to_its_user() {
    let lv = tokio::task::spawn_blocking(|| Libvirt::session(NOBODY))
        .await
        .unwrap();
    let polkit = Polkit::builder().allow_user(CHECK_DISK_ACTION, "nobody");
    let w = World::with(polkit, lv.daemon_config()).await;
    let boxes = w.path("boxes");
    make_dir(&boxes, 0o755, Some(NOBODY));
    let image = boxes.join("disk.qcow2");
    make_clean_qcow2(&image);
    give(&image, NOBODY, 0o644);
    let pid = lv.create("lvs", &[Disk::qcow2(&image)]);
    assert_eq!(uid_of(pid), NOBODY, "session QEMU runs as its user");
    assert_eq!(
        owner(&image),
        (NOBODY, NOBODY, 0o644),
        "no chown in session mode"
    );
    assert_eq!(
        lv.pidfile("lvs"),
        Path::new("/run/user/65534/libvirt/qemu/run/lvs.pid")
    );

    let out = w.check_as_nobody(&[], &image);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let doc = answer(&out);
    assert_eq!(doc["error"], IN_USE, "{doc}");
    assert_eq!(doc["error-message"], in_use(&image, &[("lvs", pid)]));

    let out = w.vmctl_json_as(NOBODY, "disk-users", &image);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let users = answer(&out);
    assert_eq!(users.as_array().map(Vec::len), Some(1), "{users}");
    let user = &users[0];
    assert_eq!(user["pid"], pid, "{user}");
    assert_eq!(user["vm-name"], "lvs", "{user}");
    assert_eq!(user["writable"], true, "{user}");
    assert_eq!(
        user["found-by"],
        json!(["pidfile", "proc", "lock"]),
        "{user}"
    );
    assert_eq!(
        user["pidfile"], "/run/user/65534/libvirt/qemu/run/lvs.pid",
        "{user}"
    );
}
