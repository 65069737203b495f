//! `dbus/org.example.VmManager1.xml` is what clients and docs rely on; this
//! test fails when the live service and the file disagree about any method,
//! argument, signal, property or annotation of our interfaces.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::sysfs::FakeSysfs;
use common::util::{public_tempdir, write_file};
use common::{DaemonConfig, Polkit, Stack};
use vmmanager::config::EventsSetting;

const XML_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dbus/org.example.VmManager1.xml"
);

/// Interface name → canonical one-line descriptions of its members.
type Shape = BTreeMap<String, BTreeSet<String>>;

fn annotations(node: roxmltree::Node<'_, '_>) -> String {
    let mut list: Vec<String> = node
        .children()
        .filter(|c| c.has_tag_name("annotation"))
        .map(|a| {
            format!(
                "@{}={}",
                a.attribute("name").unwrap_or(""),
                a.attribute("value").unwrap_or("")
            )
        })
        .collect();
    list.sort();
    list.join(" ")
}

/// Our interfaces (`org.example.*`) of an introspection document, with docs
/// and comments ignored.
fn shape(xml: &str) -> Shape {
    let doc = roxmltree::Document::parse_with_options(
        xml,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("invalid introspection XML: {e}\n{xml}"));
    let mut shape = Shape::new();
    // Only the object's own interfaces: zbus also describes child nodes.
    for iface in doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("interface"))
    {
        let name = iface.attribute("name").unwrap().to_owned();
        if !name.starts_with("org.example.") {
            continue;
        }
        let mut members = BTreeSet::new();
        for member in iface.children().filter(|n| n.is_element()) {
            let kind = member.tag_name().name();
            if !matches!(kind, "method" | "signal" | "property") {
                continue;
            }
            let member_name = member.attribute("name").unwrap_or("");
            let description = if kind == "property" {
                format!(
                    "property {member_name}: {} {} {}",
                    member.attribute("type").unwrap_or(""),
                    member.attribute("access").unwrap_or(""),
                    annotations(member)
                )
            } else {
                let args: Vec<String> = member
                    .children()
                    .filter(|c| c.has_tag_name("arg"))
                    .map(|a| {
                        // Signal arguments have no direction; "in" is the default for methods.
                        let direction = match (kind, a.attribute("direction")) {
                            ("signal", _) => "",
                            (_, Some(d)) => d,
                            (_, None) => "in",
                        };
                        format!(
                            "{} {}:{}",
                            direction,
                            a.attribute("name").unwrap_or(""),
                            a.attribute("type").unwrap_or("")
                        )
                    })
                    .collect();
                format!(
                    "{kind} {member_name}({}) {}",
                    args.join(", "),
                    annotations(member)
                )
            };
            members.insert(description.trim_end().to_owned());
        }
        let previous = shape.insert(name.clone(), members);
        assert!(previous.is_none(), "interface {name} described twice");
    }
    shape
}

fn introspect(stack: &Stack, path: &str) -> String {
    let out = stack.bus.busctl(&[
        "--json=short",
        "call",
        "org.example.VmManager",
        path,
        "org.freedesktop.DBus.Introspectable",
        "Introspect",
    ]);
    let doc: serde_json::Value = serde_json::from_str(out.expect_success("Introspect")).unwrap();
    doc["data"][0].as_str().unwrap().to_owned()
}

/// The service with a check hanging in a fake qemu-img, so that a job
/// object exists beside the manager and the device objects.
struct WithAJob {
    stack: Stack,
    connection: zbus::Connection,
    job: zbus::OwnedObjectPath,
    call: tokio::task::JoinHandle<zbus::Result<vmmanager_client::dict::Dict>>,
    _tools: tempfile::TempDir,
    _images: tempfile::TempDir,
}

impl WithAJob {
    async fn start(config: DaemonConfig) -> WithAJob {
        let tools = public_tempdir("vmm-tools-");
        let slow = tools.path().join("slow-qemu-img");
        write_file(&slow, "#!/bin/sh\nexec sleep 600\n", 0o755);
        let stack = tokio::task::spawn_blocking(move || {
            Stack::start(Polkit::builder(), &config.qemu_img(slow))
        })
        .await
        .unwrap();
        let images = public_tempdir("vmm-images-");
        let image = images.path().join("disk.qcow2");
        common::images::make_clean_qcow2(&image);

        let connection = stack.bus.connect().await;
        let manager = vmmanager_client::ManagerProxy::new(&connection)
            .await
            .unwrap();
        let call = {
            let manager = manager.clone();
            let image = image.to_str().unwrap().to_owned();
            tokio::spawn(async move { manager.check_disk(&image, Default::default()).await })
        };
        let mut job = None;
        for _ in 0..500 {
            if let Some(path) = manager.jobs().await.unwrap().into_iter().next() {
                job = Some(path);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let job = job.expect("a job object appears while qemu-img runs");
        WithAJob {
            stack,
            connection,
            job,
            call,
            _tools: tools,
            _images: images,
        }
    }

    /// Cancels the job; the check's call fails.
    async fn cancel(self) {
        let out = self.stack.bus.busctl(&[
            "call",
            "org.example.VmManager",
            self.job.as_str(),
            "org.example.VmManager1.Job",
            "Cancel",
            "a{sv}",
            "0",
        ]);
        out.expect_success("Cancel");
        assert!(self.call.await.unwrap().is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_introspection_matches_the_shipped_xml() {
    let world = WithAJob::start(DaemonConfig::default()).await;
    let (stack, connection, job) = (&world.stack, &world.connection, &world.job);
    let mut live = shape(&introspect(stack, "/org/example/VmManager"));
    live.extend(shape(&introspect(stack, job.as_str())));
    // A device object: every host has PCI devices, and the daemon exports /sys.
    let objects = common::bus::managed_objects(connection).await;
    let device = objects
        .keys()
        .find(|p| p.as_str().starts_with("/org/example/VmManager/devices/"))
        .expect("a device object");
    live.extend(shape(&introspect(stack, device.as_str())));
    let file = shape(&std::fs::read_to_string(XML_FILE).unwrap());

    let live_names: BTreeSet<_> = live.keys().collect();
    let file_names: BTreeSet<_> = file.keys().collect();
    assert_eq!(
        live_names, file_names,
        "interfaces differ between the service and {XML_FILE}"
    );
    for (name, members) in &live {
        let documented = &file[name];
        let missing: Vec<_> = members.difference(documented).collect();
        let extra: Vec<_> = documented.difference(members).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: live but not in the XML file: {missing:#?}\nin the XML file but not live: {extra:#?}"
        );
    }

    // Every member in the file is documented.
    let xml = std::fs::read_to_string(XML_FILE).unwrap();
    let doc = roxmltree::Document::parse_with_options(
        &xml,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .unwrap();
    for member in doc.descendants().filter(|n| {
        n.has_tag_name("method")
            || n.has_tag_name("signal")
            || n.has_tag_name("property")
            || n.has_tag_name("interface")
    }) {
        assert!(
            member.children().any(|c| c.tag_name().name() == "doc"),
            "{} {:?} has no <doc:doc>",
            member.tag_name().name(),
            member.attribute("name")
        );
    }

    world.cancel().await;
}

/// `busctl introspect` of every object prints nothing on stderr. busctl
/// (seen with systemd 252) keeps a method argument's `direction` across
/// the members of a child `<node>`, so a signal after a method whose last
/// argument is `direction="in"` was reported once per device (and job) by
/// the introspection of every parent object, `/` included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_introspects_every_object_without_complaint() {
    let sysfs = FakeSysfs::new();
    sysfs
        .add("0000:01:00.0", 0x8086, 0x10c9, 0x020000)
        .driver("igb")
        .iommu_group(1)
        .sriov(7, 1);
    sysfs
        .add("0000:01:10.0", 0x8086, 0x10ca, 0x020000)
        .driver("vfio-pci")
        .iommu_group(2)
        .physfn("0000:01:00.0");
    let config = DaemonConfig::default()
        .sysfs_root(sysfs.root())
        .events(EventsSetting::None);
    let world = WithAJob::start(config).await;
    let bus = &world.stack.bus;

    let tree = bus.busctl(&["--list", "tree", "org.example.VmManager"]);
    assert!(tree.success() && tree.stderr.is_empty(), "{tree:#?}");
    let paths: Vec<&str> = tree.stdout.lines().collect();
    for expected in [
        "/",
        "/org/example/VmManager",
        "/org/example/VmManager/devices/pci_0000_01_00_0",
        "/org/example/VmManager/devices/pci_0000_01_10_0",
        world.job.as_str(),
    ] {
        assert!(paths.contains(&expected), "{expected} not in {paths:#?}");
    }
    for path in paths {
        let out = bus.busctl(&["introspect", "org.example.VmManager", path]);
        assert!(
            out.success() && out.stderr.is_empty(),
            "busctl introspect {path}: {out:#?}"
        );
    }
    world.cancel().await;
}
