//! The API as desktop applets consume it, through the client programs they
//! are built on, against the real `vmmanagerd` on a private system-like bus:
//!
//! - GLib: `tests/clients/glib_watch.py` (python3-gi,
//!   `Gio.DBusObjectManagerClient` and `Gio.DBusProxy` with cached
//!   properties) sees every device object with all its properties, device
//!   changes, removals and additions caused by real kernel uevents, job
//!   objects and the `Jobs` property while a check runs, and a daemon
//!   restart; `GetAll` returns every property the XML lists;
//! - GJS: the README's applet example, `tests/clients/gjs_applet.js`, run
//!   as-is with `gjs -m`;
//! - `gdbus introspect` / `gdbus call`, Qt's `qdbus` and `dbus-send`;
//! - every error a user might see reads as a sentence.
//!
//! Device events: the daemon reads a prepared sysfs tree (tests/common/sysfs.rs)
//! that contains one device at the address of a real PCI device of this
//! machine, and listens to real kernel uevents. Writing `change` to the real
//! device's `uevent` file makes the kernel send an event for that address;
//! the daemon then re-reads the prepared tree, so whatever the test did there
//! (rebind, remove, add back) reaches the clients exactly as a hot-plug would.
//! Only `change` is ever written to the host's /sys.
//!
//! Needs root, python3-gi, gjs, libglib2.0-bin (gdbus) and qdbus-qt5 (see
//! `scripts/install-deps`).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use common::daemon::{MANAGER_IFACE, MANAGER_PATH, SERVICE_NAME};
use common::images::make_clean_qcow2;
use common::sysfs::FakeSysfs;
use common::udevd::{self, write_change};
use common::util::{ChildGuard, command_as, public_tempdir, read_lossy, run, write_file};
use common::{CmdOutput, Daemon, DaemonConfig, NOBODY, Polkit, Stack};
use serde_json::Value;
use tempfile::TempDir;
use vmmanager::config::EventsSetting;

const PYTHON: &str = "/usr/bin/python3";
const QDBUS: &str = "/usr/lib/qt5/bin/qdbus";
use vmmanager_client::names::{DEVICE_INTERFACE as DEVICE_IFACE, JOB_INTERFACE as JOB_IFACE};
const JOBS_PREFIX: &str = "/org/example/VmManager/jobs/";
const XML: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dbus/org.example.VmManager1.xml"
);
const WAIT: Duration = Duration::from_secs(30);

fn client_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Property names per interface, from the shipped introspection XML.
fn xml_properties() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(XML).unwrap();
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&text, options).unwrap();
    doc.descendants()
        .filter(|n| n.has_tag_name("interface"))
        .map(|iface| {
            let props = iface
                .children()
                .filter(|n| n.has_tag_name("property"))
                .map(|p| p.attribute("name").unwrap().to_owned())
                .collect();
            (iface.attribute("name").unwrap().to_owned(), props)
        })
        .collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    match v {
        Value::Object(m) => m.keys().cloned().collect(),
        Value::Array(a) => a.iter().map(|k| k.as_str().unwrap().to_owned()).collect(),
        other => panic!("expected an object or a list of names, got {other}"),
    }
}

fn device_path(address: &str) -> String {
    let address: vmmanager_client::PciAddress = address.parse().unwrap();
    address.object_path().to_string()
}

/// A qemu-img for the daemon: images whose name contains "slow" hang until
/// the daemon kills the process group (a check that stays visible as a Job);
/// everything else is the real qemu-img. qemu-img gets the image as an
/// inherited descriptor, never by name, so the name is read from its fds.
///
/// The wrapper records the process group of every slow check. Dropping this
/// kills whatever is left of those groups: when a test fails mid-check, the
/// harness SIGKILLs the daemon, which then cannot kill its qemu-img.
struct QemuImgWrapper {
    dir: TempDir,
}

impl QemuImgWrapper {
    fn new() -> QemuImgWrapper {
        let dir = public_tempdir("vmm-tools-");
        write_file(
            &dir.path().join("qemu-img"),
            format!(
                "#!/bin/sh\ncase \"$(ls -l /proc/$$/fd/)\" in *slow*) echo $$ >> {}; \
                 {SLOW_SLEEP} & wait; exit 1;; esac\nexec /usr/bin/qemu-img \"$@\"\n",
                dir.path().join("pgids").display()
            ),
            0o755,
        );
        QemuImgWrapper { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("qemu-img")
    }
}

/// What a slow check runs; the guard kills only processes running exactly this.
const SLOW_SLEEP: &str = "/bin/sleep 600";

impl Drop for QemuImgWrapper {
    fn drop(&mut self) {
        let text = std::fs::read_to_string(self.dir.path().join("pgids")).unwrap_or_default();
        let pgids: BTreeSet<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let ours = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .eq(SLOW_SLEEP.split(' ').map(str::as_bytes));
            // SAFETY: plain syscalls on a pid we just saw running our sleep.
            if ours && pgids.contains(&unsafe { libc::getpgid(pid) }) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// The GLib client: every line it prints, parsed, kept in order.
struct GlibClient {
    child: ChildGuard,
    lines: Receiver<String>,
    events: Vec<Value>,
    stderr: PathBuf,
    _dir: TempDir,
}

impl GlibClient {
    fn start(address: &str) -> GlibClient {
        let dir = public_tempdir("vmm-glib-");
        let stderr = dir.path().join("stderr");
        let child = Command::new(PYTHON)
            .arg(client_script("glib_watch.py"))
            .arg(address)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("run python3 (python3-gi)");
        let mut child = ChildGuard::new(child, "glib_watch.py");
        let stdout = child.take_stdout().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        GlibClient {
            child,
            lines,
            events: Vec::new(),
            stderr,
            _dir: dir,
        }
    }

    /// Index of the next event to come: wait for what follows an action
    /// with `wait_from(mark, …)`, in whatever order the events arrive.
    fn mark(&self) -> usize {
        self.events.len()
    }

    fn diag(&self) -> String {
        let events: Vec<String> = self.events.iter().map(Value::to_string).collect();
        format!(
            "events so far:\n{}\nclient stderr:\n{}",
            events.join("\n"),
            read_lossy(&self.stderr)
        )
    }

    /// The first event from `mark` on that satisfies `pred`.
    #[track_caller]
    fn wait_from(&mut self, mark: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        let mut checked = mark;
        loop {
            if let Some(e) = self.events[checked..].iter().find(|e| pred(e)) {
                return e.clone();
            }
            checked = self.events.len();
            let left = WAIT.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let event = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{}", self.diag()));
                    self.events.push(event);
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("timed out waiting for {what}\n{}", self.diag())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait();
                    panic!(
                        "the client exited ({status:?}) before {what}\n{}",
                        self.diag()
                    )
                }
            }
        }
    }
}

fn is(event: &Value, kind: &str, path: &str) -> bool {
    event["event"] == kind && event["path"] == path
}

#[test]
fn glib_object_manager_client_follows_devices_jobs_and_restarts() {
    let props = xml_properties();
    let real = udevd::device();
    let x = real.to_string();
    let x_path = device_path(&x);
    let gpu = "0000:7e:00.0";
    let audio = "0000:7e:00.1";

    let tree = FakeSysfs::new();
    tree.device(&x, 0x1af4, 0x1005, 0x00ff00)
        .driver("virtio-pci")
        .iommu_group(7);
    tree.device(gpu, 0x10de, 0x2204, 0x030000)
        .driver("vfio-pci")
        .iommu_group(12);
    tree.device(audio, 0x10de, 0x1aef, 0x040300)
        .driver("snd_hda_intel")
        .iommu_group(12);
    let wrapper = QemuImgWrapper::new();
    let config = DaemonConfig::default()
        .sysfs_root(tree.root())
        .events(EventsSetting::Kernel)
        .permit("10de:2204", "gpu")
        .qemu_img(wrapper.path());
    let mut stack = Stack::start(Polkit::builder(), &config);
    let mut client = GlibClient::start(stack.bus.address());

    // Everything at start, from the proxies' property caches.
    let ready = client.wait_from(0, "ready", |e| e["event"] == "ready");
    assert!(ready["name-owner"].is_string(), "{ready}");
    assert_eq!(ready["manager"]["Version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ready["manager"]["Jobs"], serde_json::json!([]));
    assert_eq!(keys(&ready["manager"]), props[MANAGER_IFACE]);
    let objects = ready["objects"].as_object().unwrap();
    // zbus also lists the intermediate node .../devices, with no
    // interfaces; clients pick objects by interface, as this one does.
    let devices: BTreeMap<&String, &Value> = objects
        .iter()
        .filter_map(|(path, ifaces)| Some((path, ifaces.get(DEVICE_IFACE)?)))
        .collect();
    let expected: BTreeSet<String> = [&x, gpu, audio].iter().map(|a| device_path(a)).collect();
    assert_eq!(
        devices
            .keys()
            .map(|p| p.to_string())
            .collect::<BTreeSet<_>>(),
        expected
    );
    for (path, device) in &devices {
        assert_eq!(keys(device), props[DEVICE_IFACE], "{path}");
        assert_eq!(
            keys(&ready["getall"][path.as_str()][DEVICE_IFACE]),
            props[DEVICE_IFACE],
            "GetAll on {path}"
        );
    }
    assert_eq!(
        keys(&ready["getall"][MANAGER_PATH][MANAGER_IFACE]),
        props[MANAGER_IFACE]
    );
    let g = devices[&device_path(gpu)];
    assert_eq!(g["Address"], gpu);
    assert_eq!(g["VendorId"], 0x10de);
    assert_eq!(g["DeviceId"], 0x2204);
    assert_eq!(g["Class"], 0x030000);
    assert_eq!(g["Driver"], "vfio-pci");
    assert_eq!(g["IommuGroup"], 12);
    assert_eq!(g["IommuGroupDevices"], serde_json::json!([gpu, audio]));
    assert_eq!(g["Permitted"], true);
    assert_eq!(g["ResourceName"], "gpu");
    assert_eq!(g["PassthroughReady"], false);
    assert!(g["PassthroughBlockers"].to_string().contains(audio), "{g}");
    assert_eq!(g["InUseBy"], serde_json::json!([]));
    assert_eq!(devices[&x_path]["Driver"], "virtio-pci");

    // A driver change: PropertiesChanged, the cache follows, then Uevent.
    let mark = client.mark();
    tree.rebind(&x, "vfio-pci");
    write_change(&real);
    let changed = client.wait_from(mark, "Driver to change", |e| {
        is(e, "properties-changed", &x_path) && e["changed"]["Driver"] == "vfio-pci"
    });
    assert_eq!(changed["interface"], DEVICE_IFACE);
    assert_eq!(changed["cached"]["Driver"], "vfio-pci", "{changed}");
    assert_eq!(changed["changed"]["PassthroughReady"], true, "{changed}");
    client.wait_from(mark, "the Uevent signal", |e| {
        is(e, "signal", &x_path) && e["name"] == "Uevent" && e["args"][0] == "change"
    });

    // Hot-unplug and hot-plug: object-removed, object-added with every property.
    let mark = client.mark();
    tree.remove(&x);
    write_change(&real);
    let removed = client.wait_from(mark, "the device to go", |e| {
        is(e, "object-removed", &x_path)
    });
    assert_eq!(removed["interfaces"], serde_json::json!([DEVICE_IFACE]));
    let mark = client.mark();
    tree.device(&x, 0x1af4, 0x1005, 0x00ff00)
        .driver("virtio-pci")
        .iommu_group(7);
    write_change(&real);
    let added = client.wait_from(mark, "the device to come back", |e| {
        is(e, "object-added", &x_path)
    });
    assert_eq!(
        keys(&added["interfaces"][DEVICE_IFACE]),
        props[DEVICE_IFACE]
    );
    assert_eq!(added["interfaces"][DEVICE_IFACE]["Driver"], "virtio-pci");
    assert_eq!(keys(&added["getall"][DEVICE_IFACE]), props[DEVICE_IFACE]);

    // A running check: a Job object with every property, Jobs changes.
    let images = public_tempdir("vmm-images-");
    let image = images.path().join("slow.qcow2");
    make_clean_qcow2(&image);
    let image_str = image.to_str().unwrap();
    let mark = client.mark();
    let mut call = ChildGuard::new(
        Command::new("busctl")
            .arg(format!("--address={}", stack.bus.address()))
            .args(["call", "--timeout=120", SERVICE_NAME, MANAGER_PATH])
            .args([MANAGER_IFACE, "CheckDisk", "sa{sv}", image_str, "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        "busctl CheckDisk",
    );
    let job = client.wait_from(mark, "a job object", |e| {
        e["event"] == "object-added" && e["path"].as_str().unwrap().starts_with(JOBS_PREFIX)
    });
    let job_path = job["path"].as_str().unwrap().to_owned();
    let j = &job["interfaces"][JOB_IFACE];
    assert_eq!(keys(j), props[JOB_IFACE], "{job}");
    assert_eq!(keys(&job["getall"][JOB_IFACE]), props[JOB_IFACE], "{job}");
    assert_eq!(j["Operation"], "check-disk");
    assert_eq!(j["Target"], image_str);
    assert_eq!(j["StartedByUid"], 0);
    assert_eq!(j["Cancelable"], true);
    assert!(j["StartTime"].as_u64().unwrap() > 1_700_000_000_000_000);
    let jobs = client.wait_from(mark, "Jobs to list the job", |e| {
        is(e, "properties-changed", MANAGER_PATH) && e["changed"]["Jobs"][0] == job_path.as_str()
    });
    assert_eq!(jobs["cached"]["Jobs"], serde_json::json!([job_path]));

    let mark = client.mark();
    stack
        .bus
        .busctl(&[
            "call",
            SERVICE_NAME,
            &job_path,
            JOB_IFACE,
            "Cancel",
            "a{sv}",
            "0",
        ])
        .expect_success("Job.Cancel");
    let completed = client.wait_from(mark, "Completed", |e| {
        is(e, "signal", &job_path) && e["name"] == "Completed"
    });
    assert_eq!(completed["args"][0], false);
    assert!(!completed["args"][1].as_str().unwrap().is_empty());
    client.wait_from(mark, "the job object to go", |e| {
        is(e, "object-removed", &job_path)
    });
    client.wait_from(mark, "Jobs to be empty", |e| {
        is(e, "properties-changed", MANAGER_PATH)
            && e["changed"]["Jobs"] == serde_json::json!([])
            && e["cached"]["Jobs"] == serde_json::json!([])
    });
    let checked = client.wait_from(mark, "DiskChecked", |e| {
        is(e, "signal", MANAGER_PATH) && e["name"] == "DiskChecked"
    });
    assert_eq!(checked["args"][0], image_str);
    assert_eq!(
        checked["args"][1]["error"], "org.example.VmManager1.Error.Cancelled",
        "{checked}"
    );
    assert!(
        call.wait_timeout(WAIT).is_some(),
        "CheckDisk did not return"
    );

    // The daemon restarts: every object goes with its name and comes back.
    let mark = client.mark();
    stack.daemon.sigterm_and_wait();
    client.wait_from(mark, "the name to lose its owner", |e| {
        e["event"] == "name-owner" && e["owner"].is_null()
    });
    for path in &expected {
        client.wait_from(mark, &format!("{path} to go"), |e| {
            is(e, "object-removed", path)
        });
    }
    let mark = client.mark();
    stack.daemon = Daemon::start(&stack.bus, &config);
    client.wait_from(mark, "a new owner", |e| {
        e["event"] == "name-owner" && e["owner"].is_string()
    });
    for path in &expected {
        let added = client.wait_from(mark, &format!("{path} to come back"), |e| {
            is(e, "object-added", path)
        });
        assert_eq!(
            keys(&added["interfaces"][DEVICE_IFACE]),
            props[DEVICE_IFACE]
        );
    }
    let stderr = read_lossy(&client.stderr);
    assert!(!stderr.contains("Traceback"), "{stderr}");
}

/// `gdbus ARGS…` against the test bus as `user` (root when None).
fn gdbus(address: &str, user: Option<(u32, u32)>, args: &[&str]) -> CmdOutput {
    let mut cmd = command_as(user, "gdbus");
    cmd.arg(args[0])
        .args(["--address", address])
        .args(&args[1..]);
    run(&mut cmd)
}

fn gdbus_call(
    address: &str,
    user: Option<(u32, u32)>,
    path: &str,
    method: &str,
    args: &[&str],
) -> CmdOutput {
    let mut all = vec![
        "call",
        "--dest",
        SERVICE_NAME,
        "--object-path",
        path,
        "--method",
        method,
    ];
    all.extend_from_slice(args);
    gdbus(address, user, &all)
}

/// Polls the `Jobs` property until it names one job; returns its path.
fn wait_for_job(stack: &Stack) -> String {
    let start = Instant::now();
    loop {
        let out = stack.bus.busctl(&[
            "get-property",
            SERVICE_NAME,
            MANAGER_PATH,
            MANAGER_IFACE,
            "Jobs",
        ]);
        if let Some(path) = out.stdout.split('"').nth(1) {
            return path.to_owned();
        }
        assert!(start.elapsed() < WAIT, "no job appeared: {out:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a check of `image` that hangs until cancelled (the wrapper).
fn start_slow_check(stack: &Stack, image: &str) -> ChildGuard {
    let child = Command::new("busctl")
        .arg(format!("--address={}", stack.bus.address()))
        .args(["call", "--timeout=120", SERVICE_NAME, MANAGER_PATH])
        .args([MANAGER_IFACE, "CheckDisk", "sa{sv}", image, "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard::new(child, "busctl CheckDisk")
}

#[test]
fn gdbus_introspects_and_calls_the_service() {
    let wrapper = QemuImgWrapper::new();
    let config = DaemonConfig::default().qemu_img(wrapper.path());
    let stack = Stack::start(Polkit::builder(), &config);
    let address = stack.bus.address();
    let images = public_tempdir("vmm-images-");
    let clean = images.path().join("clean.qcow2");
    make_clean_qcow2(&clean);
    let slow = images.path().join("slow.qcow2");
    make_clean_qcow2(&slow);

    // With a check running, the tree has all three interfaces.
    let mut call = start_slow_check(&stack, slow.to_str().unwrap());
    let job = wait_for_job(&stack);
    let out = gdbus(
        address,
        None,
        &[
            "introspect",
            "--dest",
            SERVICE_NAME,
            "--object-path",
            MANAGER_PATH,
            "--recurse",
        ],
    );
    let text = out.expect_success("gdbus introspect");
    for iface in [
        "interface org.example.VmManager1 {",
        "interface org.example.VmManager1.Job {",
        "interface org.example.VmManager1.PciDevice {",
        "interface org.freedesktop.DBus.ObjectManager {",
        "CheckDisk(in  s image,",
        "readonly ao Jobs",
        "DiskChecked(s image,",
        "readonly s Target",
    ] {
        assert!(text.contains(iface), "no {iface:?} in:\n{text}");
    }
    let out = gdbus_call(
        address,
        None,
        &job,
        "org.freedesktop.DBus.Properties.GetAll",
        &[JOB_IFACE],
    );
    let text = out.expect_success("GetAll on the job");
    for p in &xml_properties()[JOB_IFACE] {
        assert!(text.contains(&format!("'{p}': <")), "no {p} in {text}");
    }
    gdbus_call(
        address,
        None,
        &job,
        "org.example.VmManager1.Job.Cancel",
        &["{}"],
    )
    .expect_success("Job.Cancel");
    assert!(call.wait_timeout(WAIT).is_some(), "the check did not end");

    // A clean image: the report as GVariant text.
    let out = gdbus_call(
        address,
        None,
        MANAGER_PATH,
        "org.example.VmManager1.CheckDisk",
        &[clean.to_str().unwrap(), "{}"],
    );
    let text = out.expect_success("CheckDisk");
    for field in [
        "'result': <'clean'>",
        "'format': <'qcow2'>",
        "'consistent': <true>",
        "'users': <@aa{sv} []>",
    ] {
        assert!(text.contains(field), "no {field} in {text}");
    }
    // Options in GVariant text syntax.
    let out = gdbus_call(
        address,
        None,
        MANAGER_PATH,
        "org.example.VmManager1.CheckDisk",
        &[
            clean.to_str().unwrap(),
            "{'force-share': <false>, 'timeout-sec': <uint32 60>}",
        ],
    );
    assert!(
        out.expect_success("CheckDisk with options")
            .contains("'result': <'clean'>")
    );
    let out = gdbus_call(
        address,
        None,
        MANAGER_PATH,
        "org.example.VmManager1.GetDiskUsers",
        &[clean.to_str().unwrap(), "{}"],
    );
    assert_eq!(out.expect_success("GetDiskUsers").trim(), "(@aa{sv} [],)");

    // An error carries the D-Bus error name.
    let out = gdbus_call(
        address,
        None,
        MANAGER_PATH,
        "org.example.VmManager1.CheckDisk",
        &[clean.to_str().unwrap(), "{'bogus': <true>}"],
    );
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("GDBus.Error:org.example.VmManager1.Error.InvalidArgument: "),
        "{out:?}"
    );
}

#[test]
fn qdbus_and_dbus_send_read_the_service() {
    let stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let address = stack.bus.address();
    let qdbus = |args: &[&str]| {
        let mut cmd = Command::new(QDBUS);
        cmd.args(["--bus", address]).arg(SERVICE_NAME).args(args);
        run(&mut cmd)
    };

    // Object paths, then the manager's members.
    let out = qdbus(&[]);
    let paths = out.expect_success("qdbus SERVICE");
    let device = udevd::device().to_string();
    let dev_path = device_path(&device);
    assert!(paths.lines().any(|l| l == MANAGER_PATH), "{paths}");
    assert!(paths.lines().any(|l| l == dev_path), "{paths}");
    let out = qdbus(&[MANAGER_PATH]);
    let members = out.expect_success("qdbus SERVICE PATH");
    for m in [
        "method QVariantMap org.example.VmManager1.CheckDisk(QString image, QVariantMap options)",
        "signal void org.example.VmManager1.DiskChecked(QString image, QVariantMap report)",
        "property read QString org.example.VmManager1.Version",
        "property read QList<QDBusObjectPath> org.example.VmManager1.Jobs",
    ] {
        assert!(members.lines().any(|l| l == m), "no {m:?} in:\n{members}");
    }

    // Properties, through org.freedesktop.DBus.Properties and directly.
    let version = env!("CARGO_PKG_VERSION");
    let get = "org.freedesktop.DBus.Properties.Get";
    let out = qdbus(&[MANAGER_PATH, get, MANAGER_IFACE, "Version"]);
    assert_eq!(out.expect_success("qdbus Get Version").trim(), version);
    let out = qdbus(&[MANAGER_PATH, "org.example.VmManager1.Version"]);
    assert_eq!(out.expect_success("qdbus Version").trim(), version);
    let out = qdbus(&[&dev_path, get, DEVICE_IFACE, "Address"]);
    assert_eq!(out.expect_success("qdbus Get Address").trim(), device);
    let out = qdbus(&[
        &dev_path,
        "org.freedesktop.DBus.Properties.GetAll",
        DEVICE_IFACE,
    ]);
    let all = out.expect_success("qdbus GetAll");
    for p in &xml_properties()[DEVICE_IFACE] {
        assert!(all.contains(&format!("{p}: ")), "no {p} in:\n{all}");
    }

    // qdbus cannot build an a{sv}: every method of the API takes one.
    let out = qdbus(&[
        MANAGER_PATH,
        "org.example.VmManager1.CheckDisk",
        "/x.qcow2",
        "{}",
    ]);
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("QVariantMap"), "{out:?}");

    // dbus-send: properties and the object tree; it cannot send a{sv} either.
    let dbus_send = |path: &str, args: &[&str]| {
        let mut cmd = Command::new("dbus-send");
        cmd.arg(format!("--bus={address}"))
            .args(["--print-reply", &format!("--dest={SERVICE_NAME}"), path])
            .args(args);
        run(&mut cmd)
    };
    let out = dbus_send(
        MANAGER_PATH,
        &[get, &format!("string:{MANAGER_IFACE}"), "string:Version"],
    );
    assert!(
        out.expect_success("dbus-send Get")
            .contains(&format!("string \"{version}\"")),
        "{out:?}"
    );
    let out = dbus_send(
        MANAGER_PATH,
        &["org.freedesktop.DBus.ObjectManager.GetManagedObjects"],
    );
    assert!(
        out.expect_success("dbus-send GetManagedObjects")
            .contains(&format!("object path \"{dev_path}\"")),
        "{out:?}"
    );
    let out = dbus_send(
        MANAGER_PATH,
        &[
            "org.example.VmManager1.CheckDisk",
            "string:/x.qcow2",
            "dict:string:string:",
        ],
    );
    assert!(!out.success());
    assert!(
        out.stderr
            .contains("org.freedesktop.DBus.Error.InvalidArgs"),
        "{out:?}"
    );
}

/// What a user might see must read as a sentence, not as Rust Debug output.
#[track_caller]
fn assert_human(what: &str, out: &CmdOutput, error: &str) -> String {
    assert!(!out.success(), "{what} succeeded: {out:?}");
    let prefix = format!("GDBus.Error:org.example.VmManager1.Error.{error}: ");
    let message = out
        .stderr
        .split_once(&prefix)
        .unwrap_or_else(|| panic!("{what}: not {error}: {out:?}"))
        .1
        .trim()
        .to_owned();
    assert!(message.len() > 10, "{what}: {message:?}");
    for bad in ["{", "}", "Error {", "Os", "kind:", "code:", "Some(", "None"] {
        assert!(
            !message.contains(bad),
            "{what}: message {message:?} contains {bad:?}"
        );
    }
    eprintln!("{what}: {error}: {message}");
    message
}

#[test]
fn error_messages_are_fit_to_show_a_user() {
    let wrapper = QemuImgWrapper::new();
    let config = DaemonConfig::default().qemu_img(wrapper.path());
    let stack = Stack::start(Polkit::builder(), &config);
    let address = stack.bus.address();
    let images = public_tempdir("vmm-images-");
    let clean = images.path().join("clean.qcow2");
    make_clean_qcow2(&clean);
    let clean = clean.to_str().unwrap();
    let fifo = images.path().join("fifo.qcow2");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let check = |user, image: &str, options: &str| {
        gdbus_call(
            address,
            user,
            MANAGER_PATH,
            "org.example.VmManager1.CheckDisk",
            &[image, options],
        )
    };
    let nobody = Some((NOBODY, NOBODY));
    let no_ask = "{'auth.no-user-interaction': <true>}";
    let dir = images.path().to_str().unwrap();

    let mut cases = vec![
        (
            "nonexistent image",
            check(None, "/nonexistent/disk.qcow2", "{}"),
            "NotFound",
        ),
        ("directory", check(None, dir, "{}"), "InvalidArgument"),
        (
            "relative path",
            check(None, "disk.qcow2", "{}"),
            "InvalidArgument",
        ),
        (
            "FIFO",
            check(None, fifo.to_str().unwrap(), "{}"),
            "InvalidArgument",
        ),
        (
            "unknown option",
            check(None, clean, "{'bogus': <true>}"),
            "InvalidArgument",
        ),
        (
            "option of the wrong type",
            check(None, clean, "{'force-share': <'yes'>}"),
            "InvalidArgument",
        ),
        (
            "bad repair mode",
            check(None, clean, "{'repair': <'everything'>}"),
            "InvalidArgument",
        ),
        (
            "relative pidfile",
            check(None, clean, "{'pidfile': <'vm.pid'>}"),
            "InvalidArgument",
        ),
        (
            "nobody checks root's image",
            check(nobody, clean, no_ask),
            "NotAuthorized",
        ),
        (
            "nobody asks who uses root's image",
            gdbus_call(
                address,
                nobody,
                MANAGER_PATH,
                "org.example.VmManager1.GetDiskUsers",
                &[clean, no_ask],
            ),
            "NotAuthorized",
        ),
        (
            "nobody detaches a device",
            gdbus_call(
                address,
                nobody,
                &device_path(&udevd::device().to_string()),
                "org.example.VmManager1.PciDevice.Detach",
                &[no_ask],
            ),
            "NotAuthorized",
        ),
    ];

    // Busy, and nobody cancelling root's job, while a check runs.
    let slow = images.path().join("slow.qcow2");
    make_clean_qcow2(&slow);
    let mut call = start_slow_check(&stack, slow.to_str().unwrap());
    let job = wait_for_job(&stack);
    cases.push((
        "second check of the same image",
        check(None, slow.to_str().unwrap(), "{}"),
        "Busy",
    ));
    cases.push((
        "nobody cancels root's job",
        gdbus_call(
            address,
            nobody,
            &job,
            "org.example.VmManager1.Job.Cancel",
            &[no_ask],
        ),
        "NotAuthorized",
    ));
    stack
        .bus
        .busctl(&[
            "call",
            SERVICE_NAME,
            &job,
            JOB_IFACE,
            "Cancel",
            "a{sv}",
            "0",
        ])
        .expect_success("Job.Cancel");
    assert!(call.wait_timeout(WAIT).is_some(), "the check did not end");

    for (what, out, error) in &cases {
        assert_human(what, out, error);
    }
}

#[test]
fn the_gjs_applet_example_runs() {
    let stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let images = public_tempdir("vmm-images-");
    let clean = images.path().join("clean.qcow2");
    make_clean_qcow2(&clean);
    let dir = public_tempdir("vmm-gjs-");
    let stdout = dir.path().join("stdout");
    let stderr = dir.path().join("stderr");
    let child = Command::new("gjs")
        .arg("-m")
        .arg(client_script("gjs_applet.js"))
        .arg(&clean)
        .env("VMMANAGER_BUS_ADDRESS", stack.bus.address())
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("run gjs");
    let mut child = ChildGuard::new(child, "gjs");
    let status = child.wait_timeout(WAIT);
    let (out, err) = (read_lossy(&stdout), read_lossy(&stderr));
    assert!(
        status.is_some_and(|s| s.success()),
        "gjs: {status:?}\n{out}\n{err}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!("VM Manager {}, 0 checks running", env!("CARGO_PKG_VERSION")),
        "{out}"
    );
    for address in udevd::devices() {
        let prefix = format!("device {address} driver=");
        assert!(lines.iter().any(|l| l.starts_with(&prefix)), "{out}");
    }
    let done = format!(
        "checked {}: clean (0 leaks, 0 corruptions)",
        clean.display()
    );
    assert!(lines.contains(&done.as_str()), "{out}\n{err}");
}
