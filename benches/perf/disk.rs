//! CheckDisk against a direct `qemu-img check --output=json -f qcow2` on
//! the same image, through a real dbus-daemon, polkitd and `vmmanagerd`;
//! `vmctl check-disk` beside them; and 16 checks at once on 16 images
//! against 16 qemu-img runs at once.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use futures_util::future::join_all;
use tokio::runtime::Runtime;
use vmmanager_client::names::{BUS_NAME, MANAGER_PATH, action};
use vmmanager_client::{CheckReport, CheckResult, ManagerProxy};
use zbus::{Connection, Variant};

use crate::Mode;
use crate::common::images::qemu_img_check;
use crate::common::util::{public_tempdir, run};
use crate::common::world::VMCTL;
use crate::common::{DaemonConfig, Polkit, Stack};
use crate::measure::{children_cpu_millis, cpu_millis, interleave};
use crate::report::{Condition, Figure, Group, Summary, Unit};

/// Images checked at once in the concurrency figure.
const BATCH: usize = 16;

pub fn group(mode: Mode, rt: &Runtime) -> Group {
    // Room for the whole batch at once, so the service is compared with
    // 16 qemu-img running at once (the defaults on 2 CPUs run 1 check of a
    // user at a time and queue 4).
    let config = DaemonConfig::default()
        .max_concurrent_checks(BATCH as u32)
        .max_checks_per_user(BATCH as u32);
    let stack = Stack::start(Polkit::builder(), &config);
    let dir = public_tempdir("vmm-bench-disk-");
    let image = dir.path().join("disk.qcow2");
    make_image(&image);
    let connection = rt.block_on(stack.bus.connect());
    let manager = rt
        .block_on(ManagerProxy::new(&connection))
        .expect("manager proxy");

    let qemu_img = || expect_clean_qemu_img(&image);
    let check_disk = || {
        rt.block_on(check_clean(&manager, &image));
    };
    let vmctl = || {
        let out = run(Command::new(VMCTL)
            .arg("--bus-address")
            .arg(stack.bus.address())
            .args(["--no-ask-password", "check-disk"])
            .arg(&image));
        assert!(out.success(), "vmctl check-disk: {out:#?}");
    };
    // What CheckDisk cannot do without: one method call to the service and
    // polkit's answer to the service's question (same subject kind, action
    // and flags), one after the other.
    let floor = || {
        rt.block_on(async {
            ping(&connection).await;
            ask_polkit(&connection).await;
        });
    };
    let rounds = mode.pick(300, 20);
    let times = interleave(3, rounds, &[&qemu_img, &check_disk, &vmctl, &floor]);
    let [direct, service, cli, floor] = <[Vec<f64>; 4]>::try_from(times).expect("four contenders");

    let copies: Vec<PathBuf> = (0..BATCH)
        .map(|i| {
            let copy = dir.path().join(format!("copy{i}.qcow2"));
            std::fs::copy(&image, &copy).expect("copy the image");
            copy
        })
        .collect();
    // CPU per check of each process involved, per batch: it tells how
    // much of the batch's wall time the CPUs alone must take.
    let direct_cpu = RefCell::new(Vec::new());
    let service_cpu = RefCell::new(Vec::new());
    let bus_pid = rt
        .block_on(async {
            let dbus = zbus::fdo::DBusProxy::new(&connection).await?;
            dbus.get_connection_unix_process_id("org.freedesktop.DBus".try_into()?)
                .await
        })
        .expect("dbus-daemon's own PID");
    let involved = [stack.daemon.pid(), stack.polkit.pid(), bus_pid];
    let qemu_img_batch = || {
        let before = children_cpu_millis();
        let children: Vec<_> = copies
            .iter()
            .map(|image| {
                Command::new("qemu-img")
                    .args(["check", "--output=json", "-f", "qcow2", "--"])
                    .arg(image)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn qemu-img")
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("wait for qemu-img");
            assert!(out.status.success(), "qemu-img check: {out:?}");
        }
        let per_check = (children_cpu_millis() - before) / BATCH as f64;
        direct_cpu.borrow_mut().push(per_check);
    };
    let check_batch = || {
        let before = involved.map(cpu_millis);
        rt.block_on(join_all(copies.iter().map(|i| check_clean(&manager, i))));
        let after = involved.map(cpu_millis);
        let per_check = |used: f64| used / BATCH as f64;
        let [daemon, polkit, bus] = [0, 1, 2].map(|i| per_check(after[i].0 - before[i].0));
        let qemu_img = per_check(after[0].1 - before[0].1);
        service_cpu.borrow_mut().push([
            daemon + qemu_img + polkit + bus,
            daemon,
            qemu_img,
            polkit,
            bus,
        ]);
    };
    let batches = mode.pick(40, 3);
    let times = interleave(1, batches, &[&qemu_img_batch, &check_batch]);
    let [direct_batch, service_batch] = <[Vec<f64>; 2]>::try_from(times).expect("two contenders");

    let qemu_img_name = "`qemu-img check --output=json -f qcow2` (process)";
    Group {
        name: "disk",
        title: "Checking a clean 1 GiB qcow2 (80 MiB written), nobody using it",
        figures: vec![
            Figure::new(
                "`CheckDisk` over D-Bus (polkit, in-use scan, lock probe, qemu-img)",
                Unit::Millis,
                service,
            )
            .against(qemu_img_name, direct.clone())
            .target(Condition::DiffAtMost(1.5))
            .target(Condition::RatioAtMost(1.3)),
            Figure::new(
                "floor of CheckDisk's extra: `Peer.Ping` to the service + polkit `CheckAuthorization`",
                Unit::Millis,
                floor,
            )
            .note("the same polkit question the service asks (system-bus-name subject, check-disk, no interaction)"),
            Figure::new("`vmctl check-disk` (whole CLI process)", Unit::Millis, cli)
                .against(qemu_img_name, direct),
            Figure::new(
                format!("{BATCH} concurrent `CheckDisk` on {BATCH} images (batch wall time)"),
                Unit::Millis,
                service_batch,
            )
            .against(
                format!("{BATCH} concurrent `qemu-img check` (batch wall time)"),
                direct_batch,
            )
            .target(Condition::RatioAtMost(1.3))
            .note(format!(
                "daemon configured with max-concurrent-checks = max-checks-per-user = {BATCH}"
            )),
            cpu_figure(&service_cpu.into_inner(), direct_cpu.into_inner()),
        ],
    }
}

/// CPU per check in the batches: everything a `CheckDisk` made run
/// (`[total, vmmanagerd, its qemu-img, polkitd, dbus-daemon]` per batch)
/// against a direct qemu-img's.
fn cpu_figure(service: &[[f64; 5]], direct: Vec<f64>) -> Figure {
    let part = |i: usize| Summary::of(&service.iter().map(|s| s[i]).collect::<Vec<_>>()).median;
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    Figure::new(
        "CPU per `CheckDisk` in the batches (vmmanagerd + its qemu-img + polkitd + dbus-daemon)",
        Unit::Millis,
        service.iter().map(|s| s[0]).collect(),
    )
    .against("CPU per direct `qemu-img check` in the batches", direct)
    .note(format!(
        "medians per check: vmmanagerd {:.2} ms, its qemu-img {:.2} ms, polkitd {:.2} ms, \
         dbus-daemon {:.2} ms (clock ticks of 10 ms, summed over each batch of {BATCH}); \
         on {cpus} CPUs a batch takes at least {BATCH} × the total / {cpus}",
        part(1),
        part(2),
        part(3),
        part(4),
    ))
}

/// One empty method call to the service and its reply.
async fn ping(connection: &Connection) {
    connection
        .call_method(
            Some(BUS_NAME),
            MANAGER_PATH,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        )
        .await
        .expect("Peer.Ping");
}

/// polkit's answer, for this connection, to the question the service asks
/// for a CheckDisk of the caller's own image.
async fn ask_polkit(connection: &Connection) {
    let me = connection.unique_name().expect("a unique name").to_string();
    let subject = (
        "system-bus-name",
        HashMap::from([("name", Variant::from(me))]),
    );
    let details: HashMap<&str, &str> = HashMap::new();
    let reply = connection
        .call_method(
            Some("org.freedesktop.PolicyKit1"),
            "/org/freedesktop/PolicyKit1/Authority",
            Some("org.freedesktop.PolicyKit1.Authority"),
            "CheckAuthorization",
            &(subject, action::CHECK_DISK, details, 0u32, ""),
        )
        .await
        .expect("CheckAuthorization");
    let (authorized, _, _): (bool, bool, HashMap<String, String>) = reply
        .body()
        .deserialize()
        .expect("CheckAuthorization reply");
    assert!(authorized, "polkit refused root check-disk");
}

/// qemu-img itself finds `image` clean.
fn expect_clean_qemu_img(image: &Path) {
    let (code, json) = qemu_img_check(image);
    assert_eq!(code, 0, "qemu-img check {}: {json}", image.display());
}

/// CheckDisk as root finds `image` clean and unused.
async fn check_clean(manager: &ManagerProxy<'_>, image: &Path) {
    let path = image.to_str().expect("UTF-8 image path");
    let dict = manager
        .check_disk(path, HashMap::<&str, Variant<'_>>::new())
        .await
        .unwrap_or_else(|e| panic!("CheckDisk {path}: {e}"));
    let report = CheckReport::from_dict(&dict);
    assert!(
        report.result == Some(CheckResult::Clean) && report.consistent && report.users.is_empty(),
        "CheckDisk {path}: {report:?}"
    );
}

/// 1 GiB virtual, 64 MiB of data at the start and 16 MiB in the middle, so
/// the check has real L2 tables and refcounts to walk.
pub fn make_image(path: &Path) {
    let create = run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("1G"));
    create.expect_success("qemu-img create");
    let write = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 0 64M"])
        .args(["-c", "write -P 0xcd 512M 16M"])
        .arg(path));
    write.expect_success("qemu-io write");
    expect_clean_qemu_img(path);
}
