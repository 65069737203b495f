//! CheckDisk and GetDiskUsers end to end: the real `vmmanagerd` on a private
//! system-like bus with a real polkitd, real qemu-img, real QEMU guests
//! holding real images, and `busctl`/`vmctl` as real clients.

use crate::common;

use std::collections::HashMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::images::{LEAKED_CLUSTERS, make_clean_qcow2, make_corrupt_qcow2, make_leaky_qcow2};
use common::util::{ChildGuard, alive, hold_open, public_tempdir, run, wait_until, write_file};
use common::world::{Report, VMCTL, World, bool_of, json, split_error, str_of, u64_of};
use common::{DaemonConfig, NOBODY, Polkit, Vm};
use vmmanager_client::JobProxy;
use zbus::Variant;

const ALL_REPORT_KEYS: &[&str] = &[
    "image",
    "format",
    "result",
    "consistent",
    "check-errors",
    "corruptions",
    "leaks",
    "corruptions-fixed",
    "leaks-fixed",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
    "users",
    "stale-pidfiles",
    "run-as-uid",
    "started-by-uid",
    "duration-ms",
];

fn assert_all_keys(report: &Report) {
    for key in ALL_REPORT_KEYS {
        assert!(
            report.contains_key(*key),
            "report lacks {key}: {:#}",
            json(report)
        );
    }
}

fn make_raw(path: &Path) {
    std::fs::write(path, vec![0u8; 1 << 20]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_leaky_corrupt_and_raw_images() {
    let w = World::start().await;
    let (clean, leaky, corrupt, raw) = (
        w.path("clean.qcow2"),
        w.path("leaky.qcow2"),
        w.path("corrupt.qcow2"),
        w.path("raw.img"),
    );
    make_clean_qcow2(&clean);
    make_leaky_qcow2(&leaky);
    make_corrupt_qcow2(&corrupt);
    make_raw(&raw);

    let r = w.check(&clean, &[]).await.unwrap();
    assert_all_keys(&r);
    assert_eq!(str_of(&r, "result"), "clean");
    assert_eq!(str_of(&r, "format"), "qcow2");
    assert_eq!(str_of(&r, "image"), clean.to_str().unwrap());
    assert!(bool_of(&r, "consistent"));
    assert_eq!(u64_of(&r, "run-as-uid"), 0);
    assert!(u64_of(&r, "total-clusters") > 0 && u64_of(&r, "allocated-clusters") > 0);
    assert_eq!(json(&r)["users"], serde_json::json!([]));

    let r = w.check(&leaky, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "leaks");
    assert_eq!(u64_of(&r, "leaks"), LEAKED_CLUSTERS);
    assert_eq!(u64_of(&r, "corruptions"), 0);

    let r = w.check(&corrupt, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "corrupt");
    assert_eq!(u64_of(&r, "corruptions"), 1);

    let r = w.check(&raw, &[]).await.unwrap();
    assert_all_keys(&r);
    assert_eq!(str_of(&r, "result"), "not-supported");
    assert_eq!(str_of(&r, "format"), "raw");

    // The same through busctl, a real client that knows nothing of zbus.
    let out = w.stack.bus.busctl(&[
        "--json=short",
        "call",
        "org.example.VmManager",
        "/org/example/VmManager",
        "org.example.VmManager1",
        "CheckDisk",
        "sa{sv}",
        leaky.to_str().unwrap(),
        "0",
    ]);
    let doc: serde_json::Value =
        serde_json::from_str(out.expect_success("busctl CheckDisk")).unwrap();
    assert_eq!(doc["data"][0]["result"]["data"], "leaks");
    assert_eq!(doc["data"][0]["leaks"]["data"], LEAKED_CLUSTERS);

    // vmctl: human output and exit codes a script can use.
    let out = w.vmctl(None, &["check-disk", clean.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("no errors found"), "{out:?}");
    let out = w.vmctl(None, &["check-disk", leaky.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.contains("3 leaked cluster(s)"), "{out:?}");
    let out = w.vmctl(None, &["check-disk", corrupt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = w.vmctl(None, &["check-disk", "--json", raw.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(63), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["result"], "not-supported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_vm_blocks_check_and_is_named() {
    let w = World::start().await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let mut vm = Vm::start("win11", &image);
    let pid = vm.pid();

    let (name, message) = w.check(&image, &[]).await.unwrap_err();
    assert_eq!(name, "InUse");
    assert!(message.contains("VM \"win11\""), "{message}");
    assert!(message.contains(&format!("PID {pid}")), "{message}");
    assert!(message.contains("qemu-system-x86_64"), "{message}");
    assert!(
        message.contains("found by pidfile, proc, lock"),
        "{message}"
    );

    let users = w.users(&image, &[]).await.unwrap();
    assert_eq!(users.len(), 1, "{users:?}");
    let user = json(&users[0]);
    assert_eq!(user["pid"], pid);
    assert_eq!(user["vm-name"], "win11");
    assert_eq!(user["writable"], true);
    assert_eq!(
        user["found-by"],
        serde_json::json!(["pidfile", "proc", "lock"])
    );
    assert_eq!(user["pidfile"], vm.pidfile().to_str().unwrap());
    assert!(
        user["exe"]
            .as_str()
            .unwrap()
            .ends_with("qemu-system-x86_64")
    );

    // force-share: a read-only check that says it may be inconsistent.
    let r = w
        .check(&image, &[("force-share", Variant::from(true))])
        .await
        .unwrap();
    assert_eq!(str_of(&r, "result"), "clean");
    assert!(!bool_of(&r, "consistent"));
    assert_eq!(json(&r)["users"][0]["pid"], pid);

    // vmctl says the same and exits 4.
    let out = w.vmctl(None, &["check-disk", image.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(out.stderr.contains("VM \"win11\""), "{out:?}");
    let out = w.vmctl(None, &["disk-users", image.to_str().unwrap()]);
    assert!(
        out.stdout.contains(&format!(
            "PID {pid} qemu-system-x86_64, VM \"win11\", writing"
        )),
        "{out:?}"
    );

    // The VM stops cleanly: the image is free again.
    vm.terminate();
    let r = w.check(&image, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "clean");
    assert_eq!(json(&r)["stale-pidfiles"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_without_pidfile_is_found_through_proc_and_lock() {
    let w = World::start().await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    // PID file somewhere no pattern looks.
    let elsewhere = public_tempdir("vmm-elsewhere-");
    let vm = Vm::builder("nopidfile", &image)
        .pidfile(elsewhere.path().join("x.pid"))
        .start();
    let users = w.users(&image, &[]).await.unwrap();
    let user = json(&users[0]);
    assert_eq!(user["pid"], vm.pid());
    assert_eq!(user["found-by"], serde_json::json!(["proc", "lock"]));
    assert_eq!(user["pidfile"], "");
    let (name, _) = w.check(&image, &[]).await.unwrap_err();
    assert_eq!(name, "InUse");
    // An explicit pidfile option is used instead of the patterns.
    let users = w
        .users(
            &image,
            &[("pidfile", Variant::from(vm.pidfile().to_str().unwrap()))],
        )
        .await
        .unwrap();
    assert_eq!(
        json(&users[0])["found-by"],
        serde_json::json!(["pidfile", "proc", "lock"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pidfiles_never_block() {
    let w = World::start().await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);

    // A VM killed with SIGKILL leaves its PID file behind.
    let mut vm = Vm::start("killed", &image);
    let pidfile = vm.pidfile().to_owned();
    vm.kill9();
    assert!(pidfile.exists());
    let r = w.check(&image, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "clean");
    assert_eq!(
        json(&r)["stale-pidfiles"],
        serde_json::json!([pidfile.to_str().unwrap()])
    );

    // A PID file naming a live process that is not QEMU (a recycled PID).
    let mut sleeper = ChildGuard::new(Command::new("sleep").arg("600").spawn().unwrap(), "sleep");
    write_file(&pidfile, format!("{}\n", sleeper.pid()), 0o644);
    let r = w.check(&image, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "clean");
    assert_eq!(
        json(&r)["stale-pidfiles"],
        serde_json::json!([pidfile.to_str().unwrap()])
    );
    sleeper.kill_and_wait();

    // A FIFO and a symlink as PID files: stale, and nothing hangs.
    std::fs::remove_file(&pidfile).unwrap();
    let fifo = w.path("fifo.pid");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let link = w.path("link.pid");
    let live_vm_image = w.path("other.qcow2");
    make_clean_qcow2(&live_vm_image);
    let other = Vm::start("other", &live_vm_image);
    symlink(other.pidfile(), &link).unwrap();
    let r = w.check(&image, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "clean");
    let mut stale: Vec<String> =
        serde_json::from_value(json(&r)["stale-pidfiles"].clone()).unwrap();
    stale.sort();
    // other.pid names a live VM that simply uses another image: not stale,
    // and not a user of this image either.
    let expected = vec![
        fifo.to_str().unwrap().to_owned(),
        link.to_str().unwrap().to_owned(),
    ];
    assert_eq!(stale, expected);

    // The explicit pidfile option pointing at a FIFO: stale, no hang.
    let r = w
        .check(
            &image,
            &[("pidfile", Variant::from(fifo.to_str().unwrap()))],
        )
        .await
        .unwrap();
    assert_eq!(
        json(&r)["stale-pidfiles"],
        serde_json::json!([fifo.to_str().unwrap()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_resolve_readers_are_listed_and_writers_block() {
    let w = World::start().await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);

    // Reached through a symlink, the image is the same image.
    let link_dir = public_tempdir("vmm-link-");
    let link = link_dir.path().join("alias.qcow2");
    symlink(&image, &link).unwrap();
    let vm = Vm::start("linked", &image);
    let (name, message) = w.check(&link, &[]).await.unwrap_err();
    assert_eq!(name, "InUse");
    assert!(message.contains(&format!("PID {}", vm.pid())), "{message}");
    drop(vm);

    // A VM that opened the image read-only still blocks (it is a running VM)
    // and is reported as not writing.
    let vm = Vm::builder("reader", &image).readonly(true).start();
    let users = w.users(&link, &[]).await.unwrap();
    let user = json(&users[0]);
    assert_eq!(user["pid"], vm.pid());
    assert_eq!(user["writable"], false);
    assert_eq!(w.check(&image, &[]).await.unwrap_err().0, "InUse");
    drop(vm);

    // Another process holding it open for writing blocks.
    let mut writer = hold_open(&image, true);
    let (name, message) = w.check(&image, &[]).await.unwrap_err();
    assert_eq!(name, "InUse");
    assert!(
        message.contains(&format!("another process (PID {}", writer.pid())),
        "{message}"
    );
    writer.kill_and_wait();

    // A read-only reader (a backup tool, say) is reported but does not block.
    let mut reader = hold_open(&image, false);
    let r = w.check(&image, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "clean");
    assert!(bool_of(&r, "consistent"));
    assert_eq!(json(&r)["users"][0]["pid"], reader.pid());
    assert_eq!(json(&r)["users"][0]["writable"], false);
    reader.kill_and_wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_leaks_and_refuse_repair_in_use() {
    let w = World::start().await;
    let leaky = w.path("leaky.qcow2");
    make_leaky_qcow2(&leaky);
    let r = w
        .check(&leaky, &[("repair", Variant::from("leaks"))])
        .await
        .unwrap();
    assert_eq!(u64_of(&r, "leaks-fixed"), LEAKED_CLUSTERS, "{:#}", json(&r));
    assert_eq!(str_of(&r, "result"), "clean", "{:#}", json(&r));
    let r = w.check(&leaky, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "clean");

    let busy = w.path("busy.qcow2");
    make_leaky_qcow2(&busy);
    let vm = Vm::start("running", &busy);
    let (name, message) = w
        .check(&busy, &[("repair", Variant::from("leaks"))])
        .await
        .unwrap_err();
    assert_eq!(name, "InUse");
    assert!(message.contains("repair"), "{message}");
    drop(vm);
    // Nothing was written: still leaky.
    assert_eq!(
        str_of(&w.check(&busy, &[]).await.unwrap(), "result"),
        "leaks"
    );
}

/// An image owned by `nobody` in a directory only they can write.
fn nobody_image(w: &World, name: &str) -> PathBuf {
    let path = w.path(name);
    make_leaky_qcow2(&path);
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_callers_are_decided_by_polkit() {
    // Without rules: nobody (no active session) may do nothing.
    let w = World::start().await;
    let own = nobody_image(&w, "own.qcow2");
    let roots = w.path("root.qcow2");
    make_clean_qcow2(&roots);
    for image in [&own, &roots] {
        let out = w.check_as_nobody(&[], image);
        assert_eq!(out.status.code(), Some(5), "{out:?}");
        let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(
            doc["error"], "org.example.VmManager1.Error.NotAuthorized",
            "{doc}"
        );
    }
    // Nor may they learn whether a path exists or what it is.
    for path in ["/root/secret.qcow2", "/nonexistent/disk.qcow2", "/dev/null"] {
        let out = w.check_as_nobody(&[], Path::new(path));
        let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(
            doc["error"], "org.example.VmManager1.Error.NotAuthorized",
            "{path}: {doc}"
        );
    }
    // busctl as nobody sees the same refusal.
    let out = w.stack.bus.busctl_as_nobody(&[
        "call",
        "org.example.VmManager",
        "/org/example/VmManager",
        "org.example.VmManager1",
        "GetDiskUsers",
        "sa{sv}",
        own.to_str().unwrap(),
        "0",
    ]);
    assert!(
        !out.success() && out.stderr.contains("not authorized"),
        "{out:?}"
    );
    drop(w);

    // With a rule for check-disk: nobody checks their own image, qemu-img
    // runs as nobody; someone else's image and repair stay refused.
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    let w = World::with(polkit, DaemonConfig::default()).await;
    let own = nobody_image(&w, "own.qcow2");
    let roots = w.path("root.qcow2");
    make_clean_qcow2(&roots);
    let out = w.check_as_nobody(&[], &own);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["run-as-uid"], NOBODY);
    assert_eq!(doc["started-by-uid"], NOBODY);
    assert_eq!(doc["result"], "leaks");
    let out = w.check_as_nobody(&[], &roots);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let out = w.check_as_nobody(&["--repair", "leaks"], &own);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(out.stdout.contains("repair-disk"), "{out:?}");
    drop(w);

    // The other-user action lets nobody check root's image, as its owner
    // (root); root checking nobody's image runs qemu-img as nobody.
    let polkit =
        Polkit::builder().allow_user("org.example.vmmanager.check-disk-other-user", "nobody");
    let w = World::with(polkit, DaemonConfig::default()).await;
    let roots = w.path("root.qcow2");
    make_clean_qcow2(&roots);
    let out = w.check_as_nobody(&[], &roots);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["run-as-uid"], 0);
    assert_eq!(doc["started-by-uid"], NOBODY, "who asked, not whose image");
    let own = nobody_image(&w, "theirs.qcow2");
    let r = w.check(&own, &[]).await.unwrap();
    assert_eq!(u64_of(&r, "run-as-uid"), u64::from(NOBODY));
    assert_eq!(u64_of(&r, "started-by-uid"), 0);

    // polkitd gone: fail closed, even for root.
    let mut w = w;
    w.stack.polkit.stop();
    let (name, message) = w.check(&roots, &[]).await.unwrap_err();
    assert_eq!(name, "NotAuthorized");
    assert!(message.contains("polkit"), "{message}");
}

/// A stand-in for qemu-img that records its PID and a grandchild's, then
/// hangs: for cancel, timeout and shutdown tests.
fn slow_qemu_img(dir: &Path) -> PathBuf {
    let script = dir.join("slow-qemu-img");
    write_file(
        &script,
        format!(
            "#!/bin/sh\necho $$ > {d}/qemu-img.pid\nsleep 600 &\necho $! > {d}/grandchild.pid\nwait\n",
            d = dir.display()
        ),
        0o755,
    );
    script
}

fn recorded_pids(dir: &Path) -> Vec<u32> {
    ["qemu-img.pid", "grandchild.pid"]
        .iter()
        .map(|f| {
            let path = dir.join(f);
            wait_until(
                Duration::from_secs(10),
                "the stand-in to record its PIDs",
                || std::fs::read_to_string(&path).is_ok_and(|s| s.trim().parse::<u32>().is_ok()),
                String::new,
            );
            std::fs::read_to_string(&path)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect()
}

fn assert_all_gone(pids: &[u32]) {
    wait_until(
        Duration::from_secs(5),
        "qemu-img and its children to be gone",
        || pids.iter().all(|p| !alive(*p)),
        || {
            format!(
                "still alive: {:?}",
                pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
            )
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_can_be_cancelled_a_second_check_is_busy_and_signals_follow() {
    let tools = public_tempdir("vmm-tools-");
    let config = DaemonConfig::default().qemu_img(slow_qemu_img(tools.path()));
    let w = World::with(Polkit::builder(), config).await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);

    let manager = w.manager().await;
    let mut checked = manager.receive_disk_checked().await.unwrap();
    let call = {
        let manager = manager.clone();
        let image = image.clone();
        tokio::spawn(async move {
            manager
                .check_disk(image.to_str().unwrap(), HashMap::new())
                .await
        })
    };
    let job_path = w.wait_for_job().await;
    let pids = recorded_pids(tools.path());

    // The job object describes the check.
    let job = JobProxy::builder(&w.connection)
        .path(job_path.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(job.operation().await.unwrap(), "check-disk");
    assert_eq!(job.target().await.unwrap(), image.to_str().unwrap());
    assert_eq!(job.started_by_uid().await.unwrap(), 0);
    assert!(job.cancelable().await.unwrap());
    assert!(job.start_time().await.unwrap() > 1_700_000_000_000_000);

    // A second check of the same image, even through a symlink, is Busy.
    let link = w.path("alias.qcow2");
    symlink(&image, &link).unwrap();
    assert_eq!(w.check(&link, &[]).await.unwrap_err().0, "Busy");

    // nobody may not cancel root's job.
    let out = w.stack.bus.busctl_as_nobody(&[
        "call",
        "org.example.VmManager",
        job_path.as_str(),
        "org.example.VmManager1.Job",
        "Cancel",
        "a{sv}",
        "1",
        "auth.no-user-interaction",
        "b",
        "true",
    ]);
    assert!(
        !out.success() && out.stderr.contains("not authorized"),
        "{out:?}"
    );

    // Cancel through busctl: the call ends with Cancelled, qemu-img's whole
    // process group is gone, the job object is gone.
    let out = w.stack.bus.busctl(&[
        "call",
        "org.example.VmManager",
        job_path.as_str(),
        "org.example.VmManager1.Job",
        "Cancel",
        "a{sv}",
        "0",
    ]);
    out.expect_success("Cancel");
    let (name, _) = split_error(call.await.unwrap().unwrap_err());
    assert_eq!(name, "Cancelled");
    assert_all_gone(&pids);
    assert!(manager.jobs().await.unwrap().is_empty());

    use futures_util::StreamExt;
    let signal = tokio::time::timeout(Duration::from_secs(5), checked.next())
        .await
        .unwrap()
        .unwrap();
    let args = signal.args().unwrap();
    assert_eq!(args.image(), image.to_str().unwrap());
    assert_eq!(
        str_of(args.report(), "error"),
        "org.example.VmManager1.Error.Cancelled"
    );
    assert_all_keys(args.report());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_qemu_img() {
    let tools = public_tempdir("vmm-tools-");
    let config = DaemonConfig::default()
        .qemu_img(slow_qemu_img(tools.path()))
        .timeout_sec(1);
    let w = World::with(Polkit::builder(), config).await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let (name, message) = w.check(&image, &[]).await.unwrap_err();
    assert_eq!(name, "Timeout", "{message}");
    assert_all_gone(&recorded_pids(tools.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_check_leaves_no_child() {
    let tools = public_tempdir("vmm-tools-");
    let config = DaemonConfig::default().qemu_img(slow_qemu_img(tools.path()));
    let mut w = World::with(Polkit::builder(), config).await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let call = {
        let manager = w.manager().await;
        let image = image.clone();
        tokio::spawn(async move {
            manager
                .check_disk(image.to_str().unwrap(), HashMap::new())
                .await
        })
    };
    w.wait_for_job().await;
    let pids = recorded_pids(tools.path());
    let status = tokio::task::block_in_place(|| w.stack.daemon.sigterm_and_wait());
    assert_eq!(status.code(), Some(0), "{}", w.stack.daemon.output());
    assert_all_gone(&pids);
    assert!(call.await.unwrap().is_err());
    assert!(!w.stack.bus.name_has_owner("org.example.VmManager"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_exact_errors_and_never_hangs() {
    let w = World::start().await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let fifo = w.path("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let socket_path = w.path("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let long = format!("/{}", "a".repeat(5000));
    let cases: Vec<(&str, &str)> = vec![
        ("relative.qcow2", "InvalidArgument"),
        ("", "InvalidArgument"),
        ("/nonexistent/disk.qcow2", "NotFound"),
        (w.dir.path().to_str().unwrap(), "InvalidArgument"),
        (fifo.to_str().unwrap(), "InvalidArgument"),
        (socket_path.to_str().unwrap(), "InvalidArgument"),
        ("/dev/null", "InvalidArgument"),
        (&long, "InvalidArgument"),
    ];
    for (path, expected) in &cases {
        let manager = w.manager().await;
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            manager.check_disk(path, HashMap::new()),
        )
        .await
        .unwrap_or_else(|_| panic!("CheckDisk({path:?}) hung"));
        let (name, message) = split_error(result.unwrap_err());
        assert_eq!(&name, expected, "CheckDisk({path:.40}): {message}");
        let (name, _) = w.users(Path::new(path), &[]).await.unwrap_err();
        assert_eq!(&name, expected, "GetDiskUsers({path:.40})");
    }
    let bad_options: Vec<(&str, Variant<'_>)> = vec![
        ("no-such-option", Variant::from(true)),
        ("force-share", Variant::from("yes")),
        ("timeout-sec", Variant::from(-1i32)),
        ("timeout-sec", Variant::from(0u32)),
        ("repair", Variant::from("everything")),
        ("repair", Variant::from(true)),
        ("pidfile", Variant::from("relative.pid")),
        ("pidfile", Variant::from(7u32)),
        ("auth.no-user-interaction", Variant::from("true")),
    ];
    for (key, value) in bad_options {
        let (name, message) = w.check(&image, &[(key, value.clone())]).await.unwrap_err();
        assert_eq!(name, "InvalidArgument", "{key}={value:?}: {message}");
    }
    let (name, _) = w
        .check(
            &image,
            &[
                ("repair", Variant::from("leaks")),
                ("force-share", Variant::from(true)),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(name, "InvalidArgument");
    // Nothing above changed the image or left a job behind.
    assert_eq!(
        str_of(&w.check(&image, &[]).await.unwrap(), "result"),
        "clean"
    );
    assert!(w.manager().await.jobs().await.unwrap().is_empty());
}

/// The in-use scan of a caller's own image starts while polkit is asked,
/// but its answer counts only if polkit answered within moments: a VM
/// started while polkit deliberates (a password dialog stays open for
/// seconds) is found by a fresh look, and named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_started_while_polkit_deliberates_is_found() {
    let gate = public_tempdir("vmm-polkit-gate-");
    common::util::set_mode(gate.path(), 0o777);
    let (asked, go) = (gate.path().join("asked"), gate.path().join("go"));
    // polkitd (as its own user) says it was asked, waits for the test, then
    // says yes.
    let rule = format!(
        "polkit.addRule(function(action, subject) {{ \
         if (action.id == \"org.example.vmmanager.check-disk\" && subject.user == \"nobody\") {{ \
         polkit.spawn([\"/bin/sh\", \"-c\", \"touch {asked}; \
         while [ ! -e {go} ]; do sleep 0.02; done\"]); \
         return polkit.Result.YES; }} }});",
        asked = asked.display(),
        go = go.display(),
    );
    let w = World::with(Polkit::builder().rule(rule), DaemonConfig::default()).await;
    let home = w.path("home");
    common::util::make_dir(&home, 0o755, Some(NOBODY));
    let image = home.join("disk.qcow2");
    make_clean_qcow2(&image);
    common::util::give(&image, NOBODY, 0o644);

    let mut vmctl = ChildGuard::new(
        common::util::command_as(Some((NOBODY, NOBODY)), VMCTL)
            .arg("--bus-address")
            .arg(w.stack.bus.address())
            .args(["--no-ask-password", "check-disk", "--json"])
            .arg(&image)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
        "vmctl",
    );
    wait_until(
        Duration::from_secs(30),
        "polkitd to be asked",
        || asked.exists(),
        || w.stack.polkit.stderr(),
    );
    // Whatever was scanned meanwhile is older than its answer may be.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let vm = Vm::start("late", &image);
    write_file(&go, "", 0o644);

    let status = tokio::task::block_in_place(|| vmctl.wait_timeout(Duration::from_secs(30)))
        .expect("vmctl ends once polkit has answered");
    let mut out = String::new();
    use std::io::Read;
    vmctl
        .take_stdout()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("vmctl printed no JSON ({e}, {status}): {out}"));
    assert_eq!(
        answer["error"], "org.example.VmManager1.Error.InUse",
        "{answer:#}"
    );
    let message = answer["error-message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("PID {}", vm.pid())),
        "the VM is not named: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmctl_ctrl_c_cancels_its_check() {
    let tools = public_tempdir("vmm-tools-");
    let config = DaemonConfig::default().qemu_img(slow_qemu_img(tools.path()));
    let w = World::with(Polkit::builder(), config).await;
    let image = w.path("disk.qcow2");
    make_clean_qcow2(&image);
    let mut vmctl = ChildGuard::new(
        Command::new(VMCTL)
            .arg("--bus-address")
            .arg(w.stack.bus.address())
            .arg("check-disk")
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        "vmctl",
    );
    w.wait_for_job().await;
    let pids = recorded_pids(tools.path());
    vmctl.signal(libc::SIGINT);
    let status = tokio::task::block_in_place(|| vmctl.wait_timeout(Duration::from_secs(10)))
        .expect("vmctl exits after Ctrl-C");
    assert_eq!(status.code(), Some(130));
    assert_all_gone(&pids);
    let manager = w.manager().await;
    for _ in 0..200 {
        if manager.jobs().await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the job outlived vmctl's Ctrl-C");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_runs_with_the_callers_uid_gid_and_groups() {
    // A stand-in qemu-img that records its credentials and reports "clean".
    let tools = public_tempdir("vmm-tools-");
    let record = tools.path().join("credentials");
    std::fs::write(&record, "").unwrap();
    std::os::unix::fs::chown(&record, Some(NOBODY), Some(NOBODY)).unwrap();
    let script = tools.path().join("qemu-img");
    write_file(
        &script,
        format!(
            "#!/bin/sh\necho \"$(id -u) $(id -g) $(id -G)\" > {}\necho '{{\"check-errors\": 0}}'\n",
            record.display()
        ),
        0o755,
    );
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "nobody");
    let w = World::with(polkit, DaemonConfig::default().qemu_img(&script)).await;
    let image = nobody_image(&w, "own.qcow2");
    // The caller runs with supplementary groups the group database does not
    // give nobody: qemu-img must get exactly these, as the bus saw them.
    let out = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--groups=4242,4343"])
        .arg(VMCTL)
        .arg("--bus-address")
        .arg(w.stack.bus.address())
        .args(["--no-ask-password", "check-disk", "--json"])
        .arg(&image));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let recorded = std::fs::read_to_string(&record).unwrap();
    let fields: Vec<&str> = recorded.split_whitespace().collect();
    assert_eq!(fields[0], "65534", "uid: {recorded}");
    assert_eq!(fields[1], "65534", "gid: {recorded}");
    let mut groups: Vec<&str> = fields[2..].to_vec();
    groups.sort();
    assert!(
        groups.contains(&"4242") && groups.contains(&"4343"),
        "groups: {recorded}"
    );
    assert!(!groups.contains(&"0"), "root's group leaked: {recorded}");
}

/// Two VMs on one image (libvirt's `<shareable/>`, or two read-only
/// guests): InUse names both, not only the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_use_names_every_vm_sharing_the_image() {
    let w = World::start().await;
    let image = w.path("shared.qcow2");
    make_clean_qcow2(&image);
    let first = Vm::builder("first", &image).readonly(true).start();
    let second = Vm::builder("second", &image).readonly(true).start();
    let (name, message) = w.check(&image, &[]).await.unwrap_err();
    assert_eq!(name, "InUse");
    for vm in [&first, &second] {
        assert!(
            message.contains(&format!("VM \"{}\" (PID {}", vm.name(), vm.pid())),
            "{message}"
        );
    }
    assert!(
        message.ends_with("stop the VMs or pass force-share"),
        "{message}"
    );
}

/// Root checking an image a libvirt pool left behind: the overlay belongs to
/// `libvirt-qemu` (here `daemon`), its backing file is root's and 0600, in a
/// directory like `/var/lib/libvirt/images` (0711). qemu-img runs as the
/// overlay's owner, never as root, and never opens the backing file, so the
/// check succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_check_of_a_pool_overlay_with_a_root_only_backing_file() {
    const QEMU_USER: u32 = 1;
    let w = World::start().await;
    let pool = w.path("images");
    common::util::make_dir(&pool, 0o711, None);
    let base = pool.join("base.qcow2");
    make_clean_qcow2(&base);
    common::util::give(&base, 0, 0o600);
    let overlay = pool.join("vm.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay))
    .expect_success("qemu-img create");
    common::util::give(&overlay, QEMU_USER, 0o600);
    // What qemu-img would say if it opened the chain as the owner.
    let as_owner = run(
        common::util::command_as(Some((QEMU_USER, QEMU_USER)), "qemu-img")
            .args(["check", "--output=json"])
            .arg(&overlay),
    );
    assert!(
        as_owner.stderr.contains("Permission denied"),
        "{as_owner:?}"
    );

    let r = w.check(&overlay, &[]).await.unwrap();
    assert_eq!(str_of(&r, "result"), "clean");
    assert_eq!(u64_of(&r, "run-as-uid"), u64::from(QEMU_USER));
}
