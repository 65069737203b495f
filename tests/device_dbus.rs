//! The PCI device objects end to end: a real private dbus-daemon and a real
//! polkitd (the harness), the device component running in this process on a
//! prepared sysfs tree, events injected through `EventSource::Channel`, and
//! clients on the bus (zbus and `busctl`, as root and as `nobody`).
//!
//! The kernel's part is faked (a prepared tree and `FakeKernel`): unbinding
//! real devices would take this machine's disk or network away.

use crate::common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::time::Duration;

use common::bus::busctl_at;
use common::fake_kernel::FakeKernel;
use common::inproc::{self, DEVICE_IFACE, InProcService, Sig, Signals, Val, val, vals};
use common::sysfs::FakeSysfs;
use common::util::{CmdOutput, NOBODY, hold_open};
use common::{Polkit, PolkitBuilder, TestBus};
use futures_util::StreamExt;
use vmmanager::devices::{DeviceAction, DeviceEvent, MonitorMessage};
use vmmanager_client::names::{BUS_NAME, MANAGER_PATH};
use vmmanager_client::{PciAddress, PciDeviceProxy};
use zbus::fdo::ObjectManagerProxy;
use zbus::proxy::CacheProperties;
use zbus::{Connection, Variant};

const BRIDGE: &str = "0000:00:01.0";
const USB: &str = "0000:00:14.0";
const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";
const PF: &str = "0000:02:00.0";
const VF0: &str = "0000:02:02.0";
const VF1: &str = "0000:02:02.1";
const ALL: [&str; 7] = [BRIDGE, USB, GPU, AUDIO, PF, VF0, VF1];

const BRIDGE_BLOCKER: &str = "is a PCI bridge; bridges cannot be passed through";
const NO_GROUP_BLOCKER: &str =
    "no IOMMU group (is the IOMMU enabled? intel_iommu=on / amd_iommu=on)";
const NO_DRIVER_BLOCKER: &str = "not bound to any driver, not vfio-pci";

const ERROR_PREFIX: &str = "org.example.VmManager1.Error.";

/// `/org/example/VmManager/devices/pci_0000_01_00_0` for `0000:01:00.0`
/// (spelled out, to check the client crate's codec against).
fn path(address: &str) -> String {
    let p = format!(
        "/org/example/VmManager/devices/pci_{}",
        address.replace([':', '.'], "_")
    );
    let address: PciAddress = address.parse().unwrap();
    assert_eq!(address.object_path().as_str(), p);
    p
}

fn ev(action: DeviceAction, address: &str) -> MonitorMessage {
    MonitorMessage::Event(DeviceEvent {
        action,
        address: address.parse().unwrap(),
        vendor_name: None,
        device_name: None,
    })
}

fn s(text: &str) -> Val {
    Val::S(text.to_owned())
}

fn strs(items: &[&str]) -> Val {
    Val::As(items.iter().map(|i| (*i).to_owned()).collect())
}

fn props(pairs: &[(&str, Val)]) -> BTreeMap<String, Val> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

const PERMITTED: &[(&str, &str)] = &[
    ("10de:1eb8", "nvidia.com/TU104GL_TESLA_T4"),
    ("10de:*", "nvidia.com/any"),
    ("8086:154c", "intel.com/xl710_vf"),
];

/// A root port, a GPU with its audio function (group 1), a USB controller
/// without a group, an SR-IOV NIC (PF in group 2, VF0 on vfio-pci alone in
/// group 3, VF1 unbound in group 4).
fn host() -> FakeSysfs {
    let fs = FakeSysfs::new();
    fs.device(BRIDGE, 0x8086, 0x1901, 0x060400)
        .driver("pcieport")
        .iommu_group(1);
    fs.device(USB, 0x8086, 0xa36d, 0x0c0330).driver("xhci_hcd");
    fs.device(GPU, 0x10de, 0x1eb8, 0x030000)
        .driver("nvidia")
        .iommu_group(1)
        .numa(0)
        .subsystem(0x10de, 0x12a2)
        .names("NVIDIA Corporation", "TU104GL [Tesla T4]");
    fs.device(AUDIO, 0x10de, 0x10f8, 0x040300)
        .driver("snd_hda_intel")
        .iommu_group(1)
        .numa(0);
    fs.device(PF, 0x8086, 0x1572, 0x020000)
        .driver("i40e")
        .iommu_group(2)
        .numa(1)
        .sriov(64, 2);
    fs.device(VF0, 0x8086, 0x154c, 0x020000)
        .driver("vfio-pci")
        .iommu_group(3)
        .numa(1)
        .physfn(PF);
    fs.device(VF1, 0x8086, 0x154c, 0x020000)
        .iommu_group(4)
        .numa(1)
        .physfn(PF);
    fs
}

/// Every property of `address` in [`host`] with [`PERMITTED`].
fn expected(address: &str) -> BTreeMap<String, Val> {
    let group1 = strs(&[BRIDGE, GPU, AUDIO]);
    let (vendor, device, sv, sd, class) = match address {
        BRIDGE => (0x8086, 0x1901, 0, 0, 0x060400),
        USB => (0x8086, 0xa36d, 0, 0, 0x0c0330),
        GPU => (0x10de, 0x1eb8, 0x10de, 0x12a2, 0x030000),
        AUDIO => (0x10de, 0x10f8, 0, 0, 0x040300),
        PF => (0x8086, 0x1572, 0, 0, 0x020000),
        VF0 | VF1 => (0x8086, 0x154c, 0, 0, 0x020000),
        other => panic!("{other} is not in the host tree"),
    };
    let (names, driver, group, members, numa) = match address {
        BRIDGE => (("", ""), "pcieport", 1, group1, -1),
        USB => (("", ""), "xhci_hcd", -1, strs(&[]), -1),
        GPU => (
            ("NVIDIA Corporation", "TU104GL [Tesla T4]"),
            "nvidia",
            1,
            group1,
            0,
        ),
        AUDIO => (("", ""), "snd_hda_intel", 1, group1, 0),
        PF => (("", ""), "i40e", 2, strs(&[PF]), 1),
        VF0 => (("", ""), "vfio-pci", 3, strs(&[VF0]), 1),
        _ => (("", ""), "", 4, strs(&[VF1]), 1),
    };
    let (permitted, resource) = match address {
        GPU => (true, "nvidia.com/TU104GL_TESLA_T4"),
        AUDIO => (true, "nvidia.com/any"),
        VF0 | VF1 => (true, "intel.com/xl710_vf"),
        _ => (false, ""),
    };
    let (sriov_total, sriov_num, pf) = match address {
        PF => (64, 2, ""),
        VF0 | VF1 => (0, 0, PF),
        _ => (0, 0, ""),
    };
    let blockers: Vec<String> = match address {
        BRIDGE => vec![
            BRIDGE_BLOCKER.into(),
            "0000:01:00.0 in the same IOMMU group is bound to nvidia".into(),
            "0000:01:00.1 in the same IOMMU group is bound to snd_hda_intel".into(),
        ],
        USB => vec![
            NO_GROUP_BLOCKER.into(),
            "bound to xhci_hcd, not vfio-pci".into(),
        ],
        GPU => vec![
            "bound to nvidia, not vfio-pci".into(),
            "0000:01:00.1 in the same IOMMU group is bound to snd_hda_intel".into(),
        ],
        AUDIO => vec![
            "bound to snd_hda_intel, not vfio-pci".into(),
            "0000:01:00.0 in the same IOMMU group is bound to nvidia".into(),
        ],
        PF => vec!["bound to i40e, not vfio-pci".into()],
        VF0 => vec![],
        _ => vec![NO_DRIVER_BLOCKER.into()],
    };
    props(&[
        ("Address", s(address)),
        ("VendorId", Val::Q(vendor)),
        ("DeviceId", Val::Q(device)),
        ("SubsystemVendorId", Val::Q(sv)),
        ("SubsystemDeviceId", Val::Q(sd)),
        ("Class", Val::U(class)),
        ("VendorName", s(names.0)),
        ("DeviceName", s(names.1)),
        ("Driver", s(driver)),
        ("IommuGroup", Val::I(group)),
        ("IommuGroupDevices", members),
        ("NumaNode", Val::I(numa)),
        ("SriovTotalVfs", Val::U(sriov_total)),
        ("SriovNumVfs", Val::U(sriov_num)),
        ("PhysicalFunction", s(pf)),
        ("Permitted", Val::B(permitted)),
        ("ResourceName", s(resource)),
        ("PassthroughReady", Val::B(blockers.is_empty())),
        ("PassthroughBlockers", Val::As(blockers)),
        ("InUseBy", Val::Dicts(vec![])),
        ("HostUsers", Val::Dicts(vec![])),
        ("AutoReturn", Val::B(false)),
        ("PersistentDriver", s("")),
        ("PersistentOrigin", s("")),
    ])
}

/// One test's world. Field order is drop order: the service stops first
/// (also when the test panics), then the client, polkitd, the bus, the tree.
struct DeviceWorld {
    svc: InProcService,
    client: Connection,
    _polkit: Option<Polkit>,
    bus: TestBus,
    fs: FakeSysfs,
}

impl DeviceWorld {
    /// Bus (+ polkitd when `polkit` is given) and the service on `fs`
    /// with [`PERMITTED`]; writes go to `kernel` (default: a FakeKernel
    /// nobody looks at).
    async fn start(
        fs: FakeSysfs,
        polkit: Option<PolkitBuilder>,
        kernel: Option<FakeKernel>,
    ) -> DeviceWorld {
        let (bus, polkit) = tokio::task::spawn_blocking(move || {
            let bus = TestBus::start();
            let polkit = polkit.map(|p| p.start(&bus));
            (bus, polkit)
        })
        .await
        .unwrap();
        let kernel = kernel.unwrap_or_else(|| FakeKernel::new(&fs.root()));
        let svc = InProcService::start(&bus, &fs, PERMITTED, kernel).await;
        let client = bus.connect().await;
        DeviceWorld {
            svc,
            client,
            _polkit: polkit,
            bus,
            fs,
        }
    }

    async fn signals(&self) -> Signals {
        Signals::subscribe(&self.client, &self.svc.unique_name()).await
    }

    async fn managed(&self) -> Managed {
        let proxy = ObjectManagerProxy::builder(&self.client)
            .destination(BUS_NAME)
            .path(MANAGER_PATH)
            .build()
            .await
            .unwrap();
        proxy
            .get_managed_objects()
            .await
            .unwrap()
            .into_iter()
            .map(|(path, ifaces)| {
                let ifaces = ifaces
                    .into_iter()
                    .map(|(i, p)| (i.to_string(), vals(&p)))
                    .collect();
                (path.to_string(), ifaces)
            })
            .collect()
    }

    async fn device(&self, address: &str) -> PciDeviceProxy<'static> {
        PciDeviceProxy::builder(&self.client)
            .path(path(address))
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .unwrap()
    }

    /// `Properties.Get(PciDevice, name)` on `path` as a [`Val`].
    async fn get(&self, object: &str, name: &str) -> Result<Val, zbus::Error> {
        let reply = self
            .client
            .call_method(
                Some(BUS_NAME),
                object,
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &(DEVICE_IFACE, name),
            )
            .await?;
        let v: zbus::OwnedVariant = reply.body().deserialize()?;
        Ok(val(&v))
    }

    /// `busctl` as root (`None`) or `user`, off the async workers.
    async fn busctl(&self, user: Option<(u32, u32)>, args: &[&str]) -> CmdOutput {
        let address = self.bus.address().to_owned();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            busctl_at(&address, user, &args)
        })
        .await
        .unwrap()
    }

    /// `busctl call SERVICE PATH PciDevice METHOD a{sv} ARGS…`.
    async fn call(
        &self,
        user: Option<(u32, u32)>,
        address: &str,
        method: &str,
        options: &[&str],
    ) -> CmdOutput {
        let object = path(address);
        let mut args = vec![
            "call",
            BUS_NAME,
            object.as_str(),
            DEVICE_IFACE,
            method,
            "a{sv}",
        ];
        args.extend_from_slice(options);
        self.busctl(user, &args).await
    }

    async fn driver(&self, address: &str) -> String {
        let out = self
            .busctl(
                None,
                &[
                    "get-property",
                    BUS_NAME,
                    &path(address),
                    DEVICE_IFACE,
                    "Driver",
                ],
            )
            .await;
        let text = out.expect_success("get-property Driver").trim().to_owned();
        text.strip_prefix("s ")
            .unwrap_or_else(|| panic!("not a string: {text}"))
            .trim_matches('"')
            .to_owned()
    }
}

type Managed = BTreeMap<String, BTreeMap<String, BTreeMap<String, Val>>>;

/// The paths of the objects with the device interface.
fn device_objects(managed: &Managed) -> BTreeSet<String> {
    managed
        .iter()
        .filter(|(_, ifaces)| ifaces.contains_key(DEVICE_IFACE))
        .map(|(p, _)| p.clone())
        .collect()
}

/// `(error name, message)` of a failed zbus call.
fn method_error(e: zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, message, _) => {
            (name.to_string(), message.unwrap_or_default())
        }
        zbus::Error::FDO(e) => {
            let name = zbus::DBusError::name(&*e).to_string();
            (
                name,
                zbus::DBusError::description(&*e)
                    .unwrap_or_default()
                    .to_owned(),
            )
        }
        other => panic!("not a method error: {other:?}"),
    }
}

fn opts<'a>(pairs: &[(&'a str, Variant<'a>)]) -> HashMap<&'a str, Variant<'a>> {
    pairs.iter().map(|(k, v)| (*k, v.clone())).collect()
}

fn w(path: &str, value: &str) -> (String, String) {
    (path.to_owned(), value.to_owned())
}

fn detach_writes(address: &str) -> Vec<(String, String)> {
    vec![
        w(
            &format!("bus/pci/devices/{address}/driver_override"),
            "vfio-pci",
        ),
        w(&format!("bus/pci/devices/{address}/driver/unbind"), address),
        w("bus/pci/drivers_probe", address),
    ]
}

fn reattach_writes(address: &str, original: &str) -> Vec<(String, String)> {
    vec![
        w(&format!("bus/pci/devices/{address}/driver_override"), "\n"),
        w("bus/pci/drivers/vfio-pci/unbind", address),
        w(&format!("bus/pci/drivers/{original}/bind"), address),
    ]
}

/// `(path, sorted changed names, values)` of a PropertiesChanged of the
/// device interface with nothing invalidated.
fn changed(sig: &Sig) -> (String, BTreeMap<String, Val>) {
    match sig {
        Sig::Changed {
            path,
            interface,
            changed,
            invalidated,
        } => {
            assert_eq!(interface, DEVICE_IFACE, "{sig:?}");
            assert!(invalidated.is_empty(), "{sig:?}");
            (path.clone(), vals(changed))
        }
        other => panic!("expected PropertiesChanged, got {other:?}"),
    }
}

fn changes(sigs: &[Sig]) -> Vec<(String, BTreeMap<String, Val>)> {
    sigs.iter().map(changed).collect()
}

/// What binding AUDIO of [`host`] to vfio-pci changes: AUDIO's own
/// properties first, then each other group member's (address order).
fn audio_on_vfio_pci() -> Vec<(String, BTreeMap<String, Val>)> {
    let gpu_nvidia = "0000:01:00.0 in the same IOMMU group is bound to nvidia";
    vec![
        (
            path(AUDIO),
            props(&[
                ("Driver", s("vfio-pci")),
                ("PassthroughBlockers", strs(&[gpu_nvidia])),
            ]),
        ),
        (
            path(BRIDGE),
            props(&[("PassthroughBlockers", strs(&[BRIDGE_BLOCKER, gpu_nvidia]))]),
        ),
        (
            path(GPU),
            props(&[(
                "PassthroughBlockers",
                strs(&["bound to nvidia, not vfio-pci"]),
            )]),
        ),
    ]
}

// ---------------------------------------------------------------------------
// 1. Objects and properties
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_device_is_an_object_with_all_properties() {
    let world = DeviceWorld::start(host(), None, None).await;
    let managed = world.managed().await;
    assert_eq!(
        device_objects(&managed),
        ALL.iter().map(|a| path(a)).collect()
    );
    // zbus also lists the intermediate node `…/devices`; it must carry no
    // interface of ours.
    for (object, ifaces) in &managed {
        if !object.starts_with("/org/example/VmManager/devices/pci_") {
            assert_eq!(object, "/org/example/VmManager/devices");
            assert!(
                ifaces
                    .keys()
                    .all(|i| i.starts_with("org.freedesktop.DBus.")),
                "{object}: {ifaces:?}"
            );
        }
    }
    for address in ALL {
        let ifaces = &managed[&path(address)];
        let props = ifaces
            .get(DEVICE_IFACE)
            .unwrap_or_else(|| panic!("{address}: no {DEVICE_IFACE} in {ifaces:?}"));
        assert_eq!(props, &expected(address), "{address}");
    }

    // Typed proxies agree.
    let audio = world.device(AUDIO).await;
    assert_eq!(audio.address().await.unwrap(), AUDIO);
    assert_eq!(audio.driver().await.unwrap(), "snd_hda_intel");
    assert!(!audio.passthrough_ready().await.unwrap());
    assert!(world.device(VF0).await.passthrough_ready().await.unwrap());

    // Reading needs no authorization: nobody, with no polkitd at all.
    let world = &world;
    let get = |address: &str, name: &str| {
        let object = path(address);
        let name = name.to_owned();
        async move {
            let out = world
                .busctl(
                    Some((NOBODY, NOBODY)),
                    &["get-property", BUS_NAME, &object, DEVICE_IFACE, &name],
                )
                .await;
            out.expect_success("get-property as nobody")
                .trim()
                .to_owned()
        }
    };
    assert_eq!(get(GPU, "Driver").await, "s \"nvidia\"");
    assert_eq!(get(GPU, "VendorId").await, "q 4318");
    assert_eq!(get(GPU, "Class").await, "u 196608");
    assert_eq!(get(USB, "IommuGroup").await, "i -1");
    assert_eq!(get(VF1, "PhysicalFunction").await, "s \"0000:02:00.0\"");
    assert_eq!(get(PF, "SriovTotalVfs").await, "u 64");
    assert_eq!(get(VF0, "PassthroughReady").await, "b true");
    assert_eq!(get(AUDIO, "ResourceName").await, "s \"nvidia.com/any\"");
    assert_eq!(get(USB, "InUseBy").await, "aa{sv} 0");
    assert_eq!(
        get(GPU, "IommuGroupDevices").await,
        "as 3 \"0000:00:01.0\" \"0000:01:00.0\" \"0000:01:00.1\""
    );
    assert_eq!(
        get(GPU, "PassthroughBlockers").await,
        "as 2 \"bound to nvidia, not vfio-pci\" \
         \"0000:01:00.1 in the same IOMMU group is bound to snd_hda_intel\""
    );
    let out = world
        .busctl(
            Some((NOBODY, NOBODY)),
            &[
                "call",
                BUS_NAME,
                MANAGER_PATH,
                "org.freedesktop.DBus.ObjectManager",
                "GetManagedObjects",
            ],
        )
        .await;
    let listing = out.expect_success("GetManagedObjects as nobody");
    for address in ALL {
        assert!(
            listing.contains(&path(address)),
            "{address} missing: {listing}"
        );
    }
    // Properties cannot be set, by nobody or root.
    for user in [Some((NOBODY, NOBODY)), None] {
        let out = world
            .busctl(
                user,
                &[
                    "set-property",
                    BUS_NAME,
                    &path(GPU),
                    DEVICE_IFACE,
                    "Driver",
                    "s",
                    "vfio-pci",
                ],
            )
            .await;
        assert!(!out.success(), "{out:#?}");
    }
    assert_eq!(world.driver(GPU).await, "nvidia");
}

// ---------------------------------------------------------------------------
// 2. Events → signals
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_produce_exactly_the_signals_of_the_changes() {
    let world = DeviceWorld::start(host(), None, None).await;
    let fs = &world.fs;
    let mut signals = world.signals().await;

    // add → InterfacesAdded with the full dict, then Uevent("add").
    const NEW: &str = "0000:05:00.0";
    fs.add(NEW, 0x1b36, 0x000d, 0x0c0330)
        .driver("xhci_hcd")
        .iommu_group(5)
        .names("Red Hat, Inc.", "QEMU XHCI Host Controller");
    world.svc.send(ev(DeviceAction::Add, NEW)).await;
    let before = signals.until_uevent(&path(NEW), "add").await;
    let [
        Sig::Added {
            path: p,
            interfaces,
        },
    ] = before.as_slice()
    else {
        panic!("expected one InterfacesAdded: {before:#?}")
    };
    assert_eq!(p, &path(NEW));
    let want = props(&[
        ("Address", s(NEW)),
        ("VendorId", Val::Q(0x1b36)),
        ("DeviceId", Val::Q(0x000d)),
        ("SubsystemVendorId", Val::Q(0)),
        ("SubsystemDeviceId", Val::Q(0)),
        ("Class", Val::U(0x0c0330)),
        ("VendorName", s("Red Hat, Inc.")),
        ("DeviceName", s("QEMU XHCI Host Controller")),
        ("Driver", s("xhci_hcd")),
        ("IommuGroup", Val::I(5)),
        ("IommuGroupDevices", strs(&[NEW])),
        ("NumaNode", Val::I(-1)),
        ("SriovTotalVfs", Val::U(0)),
        ("SriovNumVfs", Val::U(0)),
        ("PhysicalFunction", s("")),
        ("Permitted", Val::B(false)),
        ("ResourceName", s("")),
        ("PassthroughReady", Val::B(false)),
        (
            "PassthroughBlockers",
            strs(&["bound to xhci_hcd, not vfio-pci"]),
        ),
        ("InUseBy", Val::Dicts(vec![])),
        ("HostUsers", Val::Dicts(vec![])),
        ("AutoReturn", Val::B(false)),
        ("PersistentDriver", s("")),
        ("PersistentOrigin", s("")),
    ]);
    let device_props = interfaces
        .get(DEVICE_IFACE)
        .unwrap_or_else(|| panic!("no {DEVICE_IFACE}: {interfaces:?}"));
    assert_eq!(vals(device_props), want);
    assert_eq!(world.managed().await[&path(NEW)][DEVICE_IFACE], want);

    // bind AUDIO to vfio-pci: AUDIO's own change first, then each other
    // group member (address order) with exactly what changed for it.
    fs.rebind(AUDIO, "vfio-pci");
    world.svc.send(ev(DeviceAction::Bind, AUDIO)).await;
    let got = changes(&signals.until_uevent(&path(AUDIO), "bind").await);
    assert_eq!(got, audio_on_vfio_pci());

    // The same event again: only its Uevent, no change.
    world.svc.send(ev(DeviceAction::Bind, AUDIO)).await;
    let got = signals.until_uevent(&path(AUDIO), "bind").await;
    assert!(got.is_empty(), "a repeated event changed things: {got:#?}");

    // bind GPU: the whole group (bridge excepted) is on vfio-pci now.
    fs.rebind(GPU, "vfio-pci");
    world.svc.send(ev(DeviceAction::Bind, GPU)).await;
    let got = changes(&signals.until_uevent(&path(GPU), "bind").await);
    assert_eq!(
        got,
        vec![
            (
                path(GPU),
                props(&[
                    ("Driver", s("vfio-pci")),
                    ("PassthroughBlockers", strs(&[])),
                    ("PassthroughReady", Val::B(true)),
                ])
            ),
            (
                path(BRIDGE),
                props(&[("PassthroughBlockers", strs(&[BRIDGE_BLOCKER]))])
            ),
            (
                path(AUDIO),
                props(&[
                    ("PassthroughBlockers", strs(&[])),
                    ("PassthroughReady", Val::B(true)),
                ])
            ),
        ]
    );
    assert!(world.device(AUDIO).await.passthrough_ready().await.unwrap());

    // unbind GPU: a member without a driver blocks nobody else, so only
    // the GPU itself changes.
    fs.unbind(GPU);
    world.svc.send(ev(DeviceAction::Unbind, GPU)).await;
    let got = changes(&signals.until_uevent(&path(GPU), "unbind").await);
    assert_eq!(
        got,
        vec![(
            path(GPU),
            props(&[
                ("Driver", s("")),
                ("PassthroughBlockers", strs(&[NO_DRIVER_BLOCKER])),
                ("PassthroughReady", Val::B(false)),
            ])
        )]
    );

    // remove → InterfacesRemoved and no Uevent (a later event is the
    // barrier: everything before it has been published).
    fs.remove(NEW);
    world.svc.send(ev(DeviceAction::Remove, NEW)).await;
    world.svc.send(ev(DeviceAction::Change, USB)).await;
    let got = signals.until_uevent(&path(USB), "change").await;
    let [
        Sig::Removed {
            path: p,
            interfaces,
        },
    ] = got.as_slice()
    else {
        panic!("expected one InterfacesRemoved: {got:#?}")
    };
    assert_eq!(p, &path(NEW));
    assert!(
        interfaces.iter().any(|i| i == DEVICE_IFACE),
        "{interfaces:?}"
    );
    assert!(!world.managed().await.contains_key(&path(NEW)));

    // Unannounced changes, then Resync: exactly the differences, in
    // address order.
    const NEW2: &str = "0000:06:00.0";
    fs.rebind(VF1, "vfio-pci");
    fs.at(USB).numa(0);
    fs.remove(VF0);
    fs.at(PF).sriov(64, 1);
    fs.add(NEW2, 0x1af4, 0x1041, 0x020000);
    world.svc.send(MonitorMessage::Resync).await;
    world.svc.send(ev(DeviceAction::Change, USB)).await;
    let got = signals.until_uevent(&path(USB), "change").await;
    assert_eq!(got.len(), 5, "{got:#?}");
    assert_eq!(
        changed(&got[0]),
        (path(USB), props(&[("NumaNode", Val::I(0))]))
    );
    assert_eq!(
        changed(&got[1]),
        (path(PF), props(&[("SriovNumVfs", Val::U(1))]))
    );
    assert!(
        matches!(&got[2], Sig::Removed { path: p, .. } if *p == path(VF0)),
        "{:?}",
        got[2]
    );
    assert_eq!(
        changed(&got[3]),
        (
            path(VF1),
            props(&[
                ("Driver", s("vfio-pci")),
                ("PassthroughBlockers", strs(&[])),
                ("PassthroughReady", Val::B(true)),
            ])
        )
    );
    match &got[4] {
        Sig::Added {
            path: p,
            interfaces,
        } => {
            assert_eq!(p, &path(NEW2));
            let added = vals(&interfaces[DEVICE_IFACE]);
            assert_eq!(added["Address"], s(NEW2));
            assert_eq!(added["IommuGroup"], Val::I(-1));
            assert_eq!(
                added["PassthroughBlockers"],
                strs(&[NO_GROUP_BLOCKER, NO_DRIVER_BLOCKER])
            );
        }
        other => panic!("expected InterfacesAdded of {NEW2}: {other:?}"),
    }

    // A second Resync finds nothing; the Uevent also reaches a typed
    // proxy's signal stream.
    let usb = world.device(USB).await;
    let mut uevents = usb.receive_uevent().await.unwrap();
    world.svc.send(MonitorMessage::Resync).await;
    world.svc.send(ev(DeviceAction::Change, USB)).await;
    let got = signals.until_uevent(&path(USB), "change").await;
    assert!(got.is_empty(), "{got:#?}");
    let uevent = tokio::time::timeout(Duration::from_secs(10), uevents.next())
        .await
        .expect("Uevent on the proxy")
        .unwrap();
    assert_eq!(uevent.args().unwrap().action, "change");

    // Other actions arrive under their own name; nothing else is pending.
    world
        .svc
        .send(ev(DeviceAction::Other("move".into()), PF))
        .await;
    let got = signals.until_uevent(&path(PF), "move").await;
    assert!(got.is_empty(), "{got:#?}");
    let rest = signals.quiet(Duration::from_millis(300)).await;
    assert!(rest.is_empty(), "{rest:#?}");
}

/// A burst of events sent back to back reaches the service faster than it
/// publishes, so it handles them in batches: every event still yields its
/// own Uevent, in the order sent; the tree changed before the burst, so
/// each affected device gets exactly one PropertiesChanged with its final
/// values, before the first Uevent; a device removed and added back within
/// the burst shows InterfacesRemoved, then InterfacesAdded; and a resync
/// afterwards finds nothing left to publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_yields_every_uevent_in_order_and_one_final_state() {
    const BURST: usize = 300;
    let world = DeviceWorld::start(host(), None, None).await;
    let mut signals = world.signals().await;
    world.fs.rebind(AUDIO, "vfio-pci");
    let mut burst = Vec::new();
    for i in 0..BURST {
        let action = match i % 3 {
            0 => DeviceAction::Bind,
            1 => DeviceAction::Change,
            _ => DeviceAction::Other(format!("burst-{i}")),
        };
        burst.push((action, AUDIO));
        if i == BURST / 2 {
            burst.push((DeviceAction::Remove, USB));
            burst.push((DeviceAction::Add, USB));
        }
    }
    burst.push((DeviceAction::Other("burst-end".into()), AUDIO));
    for (action, address) in &burst {
        world.svc.send(ev(action.clone(), address)).await;
    }
    let (mut got, last) = signals
        .until(|s| matches!(s, Sig::Uevent { action, .. } if action == "burst-end"))
        .await;
    got.push(last);

    // Every event's Uevent, in order; a removal has none (its object is
    // gone: InterfacesRemoved says it).
    let uevents: Vec<(String, String)> = got
        .iter()
        .filter_map(|s| match s {
            Sig::Uevent { path, action } => Some((path.clone(), action.clone())),
            _ => None,
        })
        .collect();
    let sent: Vec<(String, String)> = burst
        .iter()
        .filter(|(action, _)| *action != DeviceAction::Remove)
        .map(|(action, address)| (path(address), action.as_str().to_owned()))
        .collect();
    assert_eq!(uevents, sent);

    // The properties: once, with their final values, before any Uevent
    // (a batch publishes its changes first).
    let position = |wanted: &dyn Fn(&Sig) -> bool| got.iter().position(wanted).unwrap();
    let first_uevent = position(&|s| matches!(s, Sig::Uevent { .. }));
    let (properties, rest): (Vec<&Sig>, Vec<&Sig>) = got
        .iter()
        .filter(|s| !matches!(s, Sig::Uevent { .. }))
        .partition(|s| matches!(s, Sig::Changed { .. }));
    let properties: Vec<_> = properties.into_iter().map(changed).collect();
    assert_eq!(properties, audio_on_vfio_pci());
    let last_changed = got
        .iter()
        .rposition(|s| matches!(s, Sig::Changed { .. }))
        .unwrap();
    assert!(last_changed < first_uevent, "{got:#?}");
    let [
        Sig::Removed { path: removed, .. },
        Sig::Added {
            path: added,
            interfaces,
        },
    ] = rest.as_slice()
    else {
        panic!("expected InterfacesRemoved and InterfacesAdded of {USB}: {rest:#?}")
    };
    assert_eq!((removed, added), (&path(USB), &path(USB)));
    assert_eq!(vals(&interfaces[DEVICE_IFACE]), expected(USB));
    assert!(
        position(&|s| matches!(s, Sig::Added { .. }))
            < position(&|s| matches!(s, Sig::Uevent { path: p, .. } if *p == path(USB))),
        "{got:#?}"
    );

    // What the objects show is the tree: a resync has nothing to add.
    world.svc.send(MonitorMessage::Resync).await;
    world.svc.send(ev(DeviceAction::Change, GPU)).await;
    let got = signals.until_uevent(&path(GPU), "change").await;
    assert!(got.is_empty(), "{got:#?}");
    assert_eq!(world.driver(AUDIO).await, "vfio-pci");
}

/// `echo 0 > sriov_numvfs`: the kernel announces only the VFs' removals,
/// yet the PF's SriovNumVfs follows with them, in one PropertiesChanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabling_vfs_updates_their_pf() {
    let world = DeviceWorld::start(host(), None, None).await;
    let fs = &world.fs;
    let mut signals = world.signals().await;
    fs.at(PF).sriov(64, 0);
    fs.remove(VF0);
    fs.remove(VF1);
    world.svc.send(ev(DeviceAction::Remove, VF0)).await;
    world.svc.send(ev(DeviceAction::Remove, VF1)).await;
    world.svc.send(ev(DeviceAction::Change, USB)).await;
    let got = signals.until_uevent(&path(USB), "change").await;
    let removed: Vec<&String> = got
        .iter()
        .filter_map(|s| match s {
            Sig::Removed { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    assert_eq!(removed, [&path(VF0), &path(VF1)], "{got:#?}");
    let pf_changes: Vec<_> = got
        .iter()
        .filter(|s| matches!(s, Sig::Changed { .. }))
        .map(changed)
        .collect();
    assert_eq!(
        pf_changes,
        [(path(PF), props(&[("SriovNumVfs", Val::U(0))]))],
        "{got:#?}"
    );
    assert_eq!(world.device(PF).await.sriov_num_vfs().await.unwrap(), 0);
}

/// The saved original drivers (`/run/vmmanager/vfio-drivers`) outlive
/// daemon restarts, so they must not keep what has no use: at start the
/// entry of a device given back meanwhile goes, and a detached VF's goes
/// with the VF.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saved_drivers_forget_devices_given_back_or_gone() {
    let fs = host();
    let bus = tokio::task::spawn_blocking(TestBus::start).await.unwrap();
    let dev = tempfile::tempdir().unwrap();
    let state = dev.path().join("vfio-drivers");
    fs::write(&state, format!("{VF0} iavf\n{USB} xhci_hcd\n")).unwrap();
    let mut config = inproc::config(&fs, dev.path(), PERMITTED);
    config.devices.vfio_state_file = state.clone();
    let kernel = FakeKernel::new(&fs.root());
    let svc = InProcService::start_with(&bus, &config, kernel, dev).await;
    let saved = || fs::read_to_string(&state).unwrap();
    assert!(saved().contains(&format!("{VF0} iavf")), "{}", saved());
    assert!(!saved().contains(USB), "{}", saved());

    let client = bus.connect().await;
    let world = DeviceWorld {
        svc,
        client,
        _polkit: None,
        bus,
        fs,
    };
    let mut signals = world.signals().await;
    world.fs.at(PF).sriov(64, 0);
    world.fs.remove(VF0);
    world.fs.remove(VF1);
    world.svc.send(ev(DeviceAction::Remove, VF0)).await;
    world.svc.send(ev(DeviceAction::Remove, VF1)).await;
    // The file is rewritten before the next batch is taken up.
    world.svc.send(ev(DeviceAction::Change, USB)).await;
    signals.until_uevent(&path(USB), "change").await;
    assert!(!saved().contains(VF0), "{}", saved());
}

// ---------------------------------------------------------------------------
// 3. Detach / Reattach
// ---------------------------------------------------------------------------

/// GPU (nvidia) and its audio function (snd_hda_intel) in group 1;
/// vfio-pci loaded unless `vfio` is false.
fn gpu_tree(vfio: bool) -> FakeSysfs {
    let fs = FakeSysfs::new();
    fs.device(GPU, 0x10de, 0x1eb8, 0x030000)
        .driver("nvidia")
        .iommu_group(1);
    fs.device(AUDIO, 0x10de, 0x10f8, 0x040300)
        .driver("snd_hda_intel")
        .iommu_group(1);
    if vfio {
        fs.driver_dir("vfio-pci");
    }
    fs
}

/// The third function of the GPU in [`gpu_group_tree`].
const SERIAL: &str = "0000:01:00.2";

/// The GPU's group with a bridge and a third function: group 1.
fn gpu_group_tree() -> FakeSysfs {
    let fs = gpu_tree(true);
    fs.device(BRIDGE, 0x8086, 0xa110, 0x060400)
        .driver("pcieport")
        .iommu_group(1);
    fs.device(SERIAL, 0x10de, 0x1ad8, 0x0c8000)
        .driver("nvidia-serial")
        .iommu_group(1);
    fs
}

async fn gpu_world(vfio: bool, polkit: PolkitBuilder) -> (DeviceWorld, FakeKernel) {
    let fs = gpu_tree(vfio);
    let kernel = FakeKernel::new(&fs.root());
    let world = DeviceWorld::start(fs, Some(polkit), Some(kernel.clone())).await;
    (world, kernel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn root_detaches_and_reattaches_and_clients_see_it() {
    let (world, kernel) = gpu_world(true, Polkit::builder()).await;
    let mut signals = world.signals().await;

    let out = world.call(None, AUDIO, "Detach", &["0"]).await;
    out.expect_success("Detach as root");
    assert_eq!(out.stdout.trim(), "");
    // The objects show the result as soon as the call returns.
    assert_eq!(world.driver(AUDIO).await, "vfio-pci");
    assert_eq!(
        world
            .device(GPU)
            .await
            .passthrough_blockers()
            .await
            .unwrap(),
        vec!["bound to nvidia, not vfio-pci".to_owned()]
    );
    assert_eq!(kernel.take_log(), detach_writes(AUDIO));
    assert_eq!(world.fs.read_attr(AUDIO, "driver_override"), "vfio-pci\n");
    // Published as property changes; a re-read of our own is no uevent.
    let got = signals.quiet(Duration::from_millis(300)).await;
    assert_eq!(
        changes(&got),
        vec![
            (
                path(AUDIO),
                props(&[
                    ("Driver", s("vfio-pci")),
                    (
                        "PassthroughBlockers",
                        strs(&["0000:01:00.0 in the same IOMMU group is bound to nvidia"])
                    ),
                ])
            ),
            (
                path(GPU),
                props(&[(
                    "PassthroughBlockers",
                    strs(&["bound to nvidia, not vfio-pci"])
                )])
            ),
        ]
    );

    // Already detached: a no-op without writes.
    world
        .call(
            None,
            AUDIO,
            "Detach",
            &["1", "auth.no-user-interaction", "b", "true"],
        )
        .await
        .expect_success("second Detach");
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(world.driver(AUDIO).await, "vfio-pci");

    // Reattach restores the original driver.
    world
        .call(None, AUDIO, "Reattach", &["0"])
        .await
        .expect_success("Reattach");
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    assert_eq!(kernel.take_log(), reattach_writes(AUDIO, "snd_hda_intel"));
    assert_eq!(world.fs.read_attr(AUDIO, "driver_override"), "(null)\n");
    let audio = &world.managed().await[&path(AUDIO)][DEVICE_IFACE];
    assert_eq!(audio["Driver"], s("snd_hda_intel"));
    assert_eq!(
        audio["PassthroughBlockers"],
        strs(&[
            "bound to snd_hda_intel, not vfio-pci",
            "0000:01:00.0 in the same IOMMU group is bound to nvidia"
        ])
    );

    // Nothing to give back: a no-op without writes.
    world
        .call(None, AUDIO, "Reattach", &["0"])
        .await
        .expect_success("second Reattach");
    assert_eq!(kernel.take_log(), vec![]);

    // The same through the typed client.
    let gpu = world.device(GPU).await;
    gpu.detach(opts(&[("auth.no-user-interaction", Variant::from(true))]))
        .await
        .unwrap();
    assert_eq!(gpu.driver().await.unwrap(), "vfio-pci");
    assert_eq!(kernel.take_log(), detach_writes(GPU));
    gpu.reattach(HashMap::new()).await.unwrap();
    assert_eq!(gpu.driver().await.unwrap(), "nvidia");
    assert_eq!(kernel.take_log(), reattach_writes(GPU, "nvidia"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_options_are_invalid_arguments_without_writes() {
    let (world, kernel) = gpu_world(true, Polkit::builder()).await;
    let audio = world.device(AUDIO).await;
    for (options, needle) in [
        (opts(&[("bogus", Variant::from(true))]), "bogus"),
        (
            opts(&[("auth.no-user-interaction", Variant::from("yes"))]),
            "type 'b'",
        ),
        (
            opts(&[("auth.no-user-interaction", Variant::from(1u32))]),
            "type 'b'",
        ),
    ] {
        for detach in [true, false] {
            let result = if detach {
                audio.detach(options.clone()).await
            } else {
                audio.reattach(options.clone()).await
            };
            let (name, message) = method_error(result.unwrap_err());
            assert_eq!(name, format!("{ERROR_PREFIX}InvalidArgument"), "{message}");
            assert!(message.contains(needle), "{message}");
        }
    }
    // The same from busctl, as root and as nobody (options are checked
    // before polkit is asked); Reattach has nothing to force.
    for user in [None, Some((NOBODY, NOBODY))] {
        let out = world
            .call(user, AUDIO, "Reattach", &["1", "force", "b", "true"])
            .await;
        assert!(!out.success(), "{out:#?}");
        assert!(out.stderr.contains("unknown option"), "{out:#?}");
    }
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn detach_without_vfio_pci_is_not_supported() {
    let (world, kernel) = gpu_world(false, Polkit::builder()).await;
    let err = world
        .device(AUDIO)
        .await
        .detach(HashMap::new())
        .await
        .unwrap_err();
    let (name, message) = method_error(err);
    assert_eq!(name, format!("{ERROR_PREFIX}NotSupported"), "{message}");
    assert!(message.contains("modprobe vfio-pci"), "{message}");
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    let out = world.call(None, AUDIO, "Detach", &["0"]).await;
    assert!(
        !out.success() && out.stderr.contains("modprobe"),
        "{out:#?}"
    );
    assert_eq!(kernel.take_log(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn detach_of_a_group_in_use_names_the_process() {
    let fs = gpu_tree(true);
    let kernel = FakeKernel::new(&fs.root());
    let (bus, polkit) = Polkit::builder().start_with_bus().await;
    let (dev, node) = dev_with_group_node();
    let world = world_with_dev(bus, polkit, fs, &kernel, dev).await;

    // Nobody holds it yet.
    assert_eq!(
        world.get(&path(AUDIO), "InUseBy").await.unwrap(),
        Val::Dicts(vec![])
    );

    let mut holder = hold_open(&node, false);
    let pid = holder.pid();
    let sleep = fs::canonicalize(
        std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|d| d.join("sleep"))
            .find(|p| p.exists())
            .unwrap(),
    )
    .unwrap();
    let want = Val::Dicts(vec![BTreeMap::from([
        ("pid".to_owned(), pid.to_string()),
        ("exe".to_owned(), sleep.display().to_string()),
        ("vm-name".to_owned(), String::new()),
    ])]);
    // The shell opens the file and execs sleep asynchronously.
    let mut users = Val::Dicts(vec![]);
    for _ in 0..500 {
        users = world.get(&path(AUDIO), "InUseBy").await.unwrap();
        if users == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(users, want);
    // Every member of the group shows it.
    assert_eq!(world.get(&path(GPU), "InUseBy").await.unwrap(), want);

    for method in ["Detach", "Reattach"] {
        let err = world
            .client
            .call_method(
                Some(BUS_NAME),
                path(AUDIO).as_str(),
                Some(DEVICE_IFACE),
                method,
                &(HashMap::<&str, Variant<'_>>::new(),),
            )
            .await
            .unwrap_err();
        let (name, message) = method_error(err);
        assert_eq!(name, format!("{ERROR_PREFIX}InUse"), "{message}");
        assert!(message.contains(&format!("PID {pid}")), "{message}");
        assert!(message.contains("/dev/vfio/1"), "{message}");
    }
    let out = world.call(None, GPU, "Detach", &["0"]).await;
    assert!(!out.success(), "{out:#?}");
    assert!(out.stderr.contains(&format!("PID {pid}")), "{out:#?}");
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");

    // Once the holder is gone, the same call goes through.
    holder.kill_and_wait();
    assert_eq!(
        world.get(&path(AUDIO), "InUseBy").await.unwrap(),
        Val::Dicts(vec![])
    );
    world
        .call(None, AUDIO, "Detach", &["0"])
        .await
        .expect_success("Detach after the holder exited");
    assert_eq!(kernel.take_log(), detach_writes(AUDIO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nobody_needs_the_manage_devices_action() {
    let (world, kernel) = gpu_world(true, Polkit::builder()).await;
    let nobody = Some((NOBODY, NOBODY));
    for (method, options) in [
        (
            "Detach",
            &["1", "auth.no-user-interaction", "b", "true"][..],
        ),
        ("Detach", &["0"][..]),
        (
            "Reattach",
            &["1", "auth.no-user-interaction", "b", "true"][..],
        ),
    ] {
        let out = world.call(nobody, AUDIO, method, options).await;
        assert!(!out.success(), "{out:#?}");
        assert!(out.stderr.contains("not authorized"), "{method}: {out:#?}");
        assert!(
            out.stderr.contains("org.example.vmmanager.manage-devices"),
            "{out:#?}"
        );
    }
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    // Reading is still fine.
    let out = world
        .busctl(
            nobody,
            &[
                "get-property",
                BUS_NAME,
                &path(AUDIO),
                DEVICE_IFACE,
                "Driver",
            ],
        )
        .await;
    assert_eq!(
        out.expect_success("read as nobody").trim(),
        "s \"snd_hda_intel\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nobody_with_a_polkit_rule_may_detach() {
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.manage-devices", "nobody");
    let (world, kernel) = gpu_world(true, polkit).await;
    let nobody = Some((NOBODY, NOBODY));
    world
        .call(
            nobody,
            AUDIO,
            "Detach",
            &["1", "auth.no-user-interaction", "b", "true"],
        )
        .await
        .expect_success("Detach as nobody with the rule");
    assert_eq!(world.driver(AUDIO).await, "vfio-pci");
    assert_eq!(kernel.take_log(), detach_writes(AUDIO));
    world
        .call(nobody, AUDIO, "Reattach", &["0"])
        .await
        .expect_success("Reattach as nobody with the rule");
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    assert_eq!(kernel.take_log(), reattach_writes(AUDIO, "snd_hda_intel"));
}

// ---------------------------------------------------------------------------
// 4. Bad input
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_and_malformed_device_paths() {
    let world = DeviceWorld::start(gpu_tree(true), None, None).await;
    for object in [
        "/org/example/VmManager/devices/pci_zz",
        "/org/example/VmManager/devices/pci_0000_09_00_0",
        "/org/example/VmManager/devices/pci_0000_01_00_0/x",
        "/org/example/VmManager/devices/pci_0000_01_00_0_",
    ] {
        let (name, _) = method_error(world.get(object, "Driver").await.unwrap_err());
        assert_eq!(name, "org.freedesktop.DBus.Error.UnknownObject", "{object}");
        let err = world
            .client
            .call_method(
                Some(BUS_NAME),
                object,
                Some(DEVICE_IFACE),
                "Detach",
                &(HashMap::<&str, Variant<'_>>::new(),),
            )
            .await
            .unwrap_err();
        let (name, _) = method_error(err);
        assert_eq!(name, "org.freedesktop.DBus.Error.UnknownObject", "{object}");
    }
    // The intermediate node exists, without the device interface.
    let (name, _) = method_error(
        world
            .get("/org/example/VmManager/devices", "Driver")
            .await
            .unwrap_err(),
    );
    assert_eq!(name, "org.freedesktop.DBus.Error.UnknownInterface");
    let out = world
        .busctl(
            Some((NOBODY, NOBODY)),
            &[
                "get-property",
                BUS_NAME,
                "/org/example/VmManager/devices/pci_zz",
                DEVICE_IFACE,
                "Driver",
            ],
        )
        .await;
    assert!(!out.success(), "{out:#?}");
    // The service is unharmed.
    assert_eq!(world.driver(GPU).await, "nvidia");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_sysfs_contents_do_not_break_the_service() {
    const HUGE_VENDOR: &str = "0000:03:00.0";
    const BINARY_CLASS: &str = "0000:03:00.1";
    const PARTIAL: &str = "0000:03:00.2";
    const DANGLING: &str = "0000:03:00.3";
    let fs = gpu_tree(true);
    let huge = vec![b'1'; 1 << 20];
    fs.device(HUGE_VENDOR, 0x1234, 0x0001, 0x020000);
    fs.write_attr(HUGE_VENDOR, "vendor", &huge);
    fs.device(BINARY_CLASS, 0x1234, 0x0002, 0x020000);
    fs.write_attr(BINARY_CLASS, "class", b"0x\xff\xfe\x00\n");
    // Readable ids, everything optional hostile.
    fs.device(PARTIAL, 0x1234, 0x0003, 0x020000).iommu_group(9);
    fs.write_attr(PARTIAL, "numa_node", &huge);
    fs.write_attr(PARTIAL, "subsystem_vendor", b"\xff\xff\n");
    fs.write_attr(PARTIAL, "sriov_totalvfs", b"-7\n");
    symlink("../not-an-address", fs.device_dir(PARTIAL).join("physfn")).unwrap();
    // The group directory goes away: a dangling iommu_group link.
    fs::remove_dir_all(fs.group_dir(9)).unwrap();
    // hwdb names amid garbage; a huge database file for the GPU.
    let mut db = b"I:1\nE:\xff\xfe=\x00\nE:ID_VENDOR_FROM_DATABASE=Hostile Inc.\n".to_vec();
    db.extend_from_slice(b"E:ID_MODEL_FROM_DATABASE=Partial \xff Device\n");
    fs::write(fs.udev_data_dir().join(format!("+pci:{PARTIAL}")), db).unwrap();
    let mut big_db = b"E:ID_VENDOR_FROM_DATABASE=Big\n".to_vec();
    big_db.extend(std::iter::repeat_n(b'x', 1 << 20));
    fs::write(fs.udev_data_dir().join(format!("+pci:{GPU}")), big_db).unwrap();
    // A bus link to nothing, and entries that are not addresses.
    symlink(
        format!("../../../devices/pci0000:00/{DANGLING}"),
        fs.bus_link(DANGLING),
    )
    .unwrap();
    symlink("/nonexistent", fs.root().join("bus/pci/devices/garbage")).unwrap();
    fs::write(fs.root().join("bus/pci/devices/0000:zz:00.0"), "x").unwrap();

    let world = DeviceWorld::start(fs, None, None).await;
    let managed = world.managed().await;
    let want: BTreeSet<String> = [GPU, AUDIO, PARTIAL].iter().map(|a| path(a)).collect();
    assert_eq!(device_objects(&managed), want);
    let partial = &managed[&path(PARTIAL)][DEVICE_IFACE];
    assert_eq!(partial["DeviceId"], Val::Q(3));
    assert_eq!(partial["NumaNode"], Val::I(-1));
    assert_eq!(partial["SubsystemVendorId"], Val::Q(0));
    assert_eq!(partial["SriovTotalVfs"], Val::U(0));
    assert_eq!(partial["PhysicalFunction"], s(""));
    assert_eq!(partial["IommuGroup"], Val::I(9));
    assert_eq!(partial["IommuGroupDevices"], strs(&[PARTIAL]));
    assert_eq!(partial["VendorName"], s("Hostile Inc."));
    assert_eq!(partial["DeviceName"], s("Partial \u{fffd} Device"));
    let gpu = &managed[&path(GPU)][DEVICE_IFACE];
    assert_eq!(gpu["VendorName"], s(""));
    assert_eq!(gpu["Driver"], s("nvidia"));

    // Events about the unreadable devices publish nothing and break
    // nothing; the service keeps handling events.
    let mut signals = world.signals().await;
    for (action, address) in [
        (DeviceAction::Add, HUGE_VENDOR),
        (DeviceAction::Change, BINARY_CLASS),
        (DeviceAction::Bind, DANGLING),
        (DeviceAction::Remove, "0000:0f:1f.7"),
        (DeviceAction::Change, PARTIAL),
    ] {
        world.svc.send(ev(action, address)).await;
    }
    world.svc.send(MonitorMessage::Resync).await;
    world.svc.send(ev(DeviceAction::Change, GPU)).await;
    let got = signals.until_uevent(&path(GPU), "change").await;
    assert!(
        got.iter()
            .all(|s| matches!(s, Sig::Uevent { path: p, .. } if *p == path(PARTIAL))),
        "{got:#?}"
    );
    // Repaired, the device appears.
    world.fs.write_attr(HUGE_VENDOR, "vendor", "0x1234\n");
    world.svc.send(ev(DeviceAction::Change, HUGE_VENDOR)).await;
    let got = signals.until_uevent(&path(HUGE_VENDOR), "change").await;
    assert!(
        matches!(got.as_slice(), [Sig::Added { path: p, .. }] if *p == path(HUGE_VENDOR)),
        "{got:#?}"
    );
    assert_eq!(world.driver(HUGE_VENDOR).await, "");
}

// ---------------------------------------------------------------------------
// 5. Stop
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_stop_the_objects_are_gone_and_nothing_is_emitted() {
    let mut world = DeviceWorld::start(host(), None, None).await;
    let mut signals = world.signals().await;
    let events = world.svc.sender();

    // Some work in flight when stop is called.
    world.fs.rebind(AUDIO, "vfio-pci");
    world.svc.send(ev(DeviceAction::Bind, AUDIO)).await;
    world.svc.send(ev(DeviceAction::Change, USB)).await;
    world.svc.stop().await;
    let dbus = zbus::fdo::DBusProxy::new(&world.client).await.unwrap();
    let owned = dbus.name_has_owner(BUS_NAME.try_into().unwrap()).await;
    assert!(!owned.unwrap(), "{BUS_NAME} is still owned after stop");

    // A marker sent on the service's connection after stop returned: every
    // signal of the component must come before it (one sender's messages
    // arrive in order).
    world
        .svc
        .connection
        .emit_signal(
            None::<&str>,
            "/org/example/Test",
            "org.example.Test",
            "Marker",
            &(),
        )
        .await
        .unwrap();
    let (before, _) = signals
        .until(|s| matches!(s, Sig::Other { member, .. } if member == "Marker"))
        .await;
    let first_removed = before
        .iter()
        .position(|s| matches!(s, Sig::Removed { .. }))
        .unwrap_or_else(|| panic!("no InterfacesRemoved before stop returned: {before:#?}"));
    let removed: BTreeSet<String> = before[first_removed..]
        .iter()
        .map(|s| match s {
            Sig::Removed { path, interfaces } => {
                assert_eq!(interfaces, &vec![DEVICE_IFACE.to_owned()]);
                path.clone()
            }
            other => panic!("{other:?} after the objects were being removed"),
        })
        .collect();
    let all: BTreeSet<String> = ALL.iter().map(|a| path(a)).collect();
    assert_eq!(removed, all);
    assert_eq!(before[first_removed..].len(), ALL.len());
    // The service released its name; the connection is still open. Take
    // the name back on it (only the name can be called, by the bus policy)
    // to see what is left there: no device objects.
    world.svc.connection.request_name(BUS_NAME).await.unwrap();
    assert_eq!(device_objects(&world.managed().await), BTreeSet::new());
    let (name, _) = method_error(world.get(&path(GPU), "Driver").await.unwrap_err());
    assert_eq!(name, "org.freedesktop.DBus.Error.UnknownObject");

    // Nothing listens any more; tree changes and events go nowhere.
    world.fs.rebind(GPU, "vfio-pci");
    world.fs.remove(VF1);
    let sent = events.send(ev(DeviceAction::Bind, GPU)).await;
    assert!(sent.is_err(), "the event channel is still open after stop");
    let late = signals.quiet(Duration::from_millis(300)).await;
    assert!(late.is_empty(), "signals after stop: {late:#?}");
    assert!(
        world.managed().await.is_empty(),
        "{:?}",
        world.managed().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_right_after_start_and_guard_on_panic() {
    let fs = Arc::new(host());
    let bus = Arc::new(tokio::task::spawn_blocking(TestBus::start).await.unwrap());
    let client = bus.connect().await;

    // Start and stop with nothing in flight, repeatedly, on one bus.
    for _ in 0..5 {
        let kernel = FakeKernel::new(&fs.root());
        let mut svc = InProcService::start(&bus, &fs, PERMITTED, kernel).await;
        let mut signals = Signals::subscribe(&client, &svc.unique_name()).await;
        svc.stop().await;
        svc.connection
            .emit_signal(
                None::<&str>,
                "/org/example/Test",
                "org.example.Test",
                "Marker",
                &(),
            )
            .await
            .unwrap();
        let (got, _) = signals
            .until(|s| matches!(s, Sig::Other { member, .. } if member == "Marker"))
            .await;
        assert!(
            got.iter().all(|s| matches!(s, Sig::Removed { .. })),
            "{got:#?}"
        );
        assert_eq!(got.len(), ALL.len(), "{got:#?}");
        drop(svc);
        let bus = bus.clone();
        tokio::task::spawn_blocking(move || bus.wait_for_name_gone(BUS_NAME))
            .await
            .unwrap();
    }

    // A test that panics while its service runs: the guard stops the
    // service (objects removed, connection closed, name released). Without
    // it the service task would keep the connection and the name.
    let (unique_tx, unique_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let bus = bus.clone();
        let fs = fs.clone();
        async move {
            let kernel = FakeKernel::new(&fs.root());
            let svc = InProcService::start(&bus, &fs, PERMITTED, kernel).await;
            unique_tx.send(svc.unique_name()).unwrap();
            let _ = go_rx.await;
            panic!("deliberate panic with a running service");
        }
    });
    let unique = unique_rx.await.unwrap();
    let mut signals = Signals::subscribe(&client, &unique).await;
    go_tx.send(()).unwrap();
    let err = task.await.unwrap_err();
    assert!(err.is_panic());
    let got = signals.quiet(Duration::from_millis(500)).await;
    let removed = got
        .iter()
        .filter(|s| matches!(s, Sig::Removed { .. }))
        .count();
    assert_eq!(removed, ALL.len(), "{got:#?}");
    let bus2 = bus.clone();
    tokio::task::spawn_blocking(move || bus2.wait_for_name_gone(BUS_NAME))
        .await
        .unwrap();
    let dbus = zbus::fdo::DBusProxy::new(&client).await.unwrap();
    let owner = dbus
        .name_has_owner(unique.as_str().try_into().unwrap())
        .await
        .unwrap();
    assert!(!owner, "the panicked service's connection is still open");
}

/// `vmctl detach --group` / `reattach --group` against the service: the
/// root port stays on pcieport, the three endpoints move and come back,
/// each to its own driver; a failure midway is rolled back and vmctl says
/// so (exit 1, the service's message).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vmctl_moves_a_whole_group_and_reports_a_rollback() {
    let fs = gpu_group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let world = DeviceWorld::start(fs, Some(Polkit::builder()), Some(kernel.clone())).await;
    let bus = world.bus.address().to_owned();
    let vmctl = move |args: &[&str]| {
        let mut cmd = std::process::Command::new(common::world::VMCTL);
        cmd.arg("--bus-address").arg(&bus).args(args);
        common::util::run(&mut cmd)
    };
    let vmctl = Arc::new(vmctl);
    let call = |args: &'static [&'static str]| {
        let vmctl = vmctl.clone();
        async move {
            tokio::task::spawn_blocking(move || vmctl(args))
                .await
                .unwrap()
        }
    };

    let out = call(&["detach", "--group", AUDIO]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        out.stdout,
        format!("{BRIDGE}: pcieport\n{GPU}: vfio-pci\n{AUDIO}: vfio-pci\n{SERIAL}: vfio-pci\n")
    );
    assert!(
        kernel
            .take_log()
            .iter()
            .all(|(p, v)| !p.contains(BRIDGE) && v != BRIDGE)
    );
    // Every member's object shows it, not only the one called.
    assert_eq!(world.driver(GPU).await, "vfio-pci");
    assert_eq!(world.driver(SERIAL).await, "vfio-pci");

    let out = call(&["reattach", "--group", "--json", GPU]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["driver"], "nvidia", "{doc}");
    let members: Vec<(String, String)> = doc["group"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["address"].as_str().unwrap().to_owned(),
                m["driver"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let pair = |a: &str, d: &str| (a.to_owned(), d.to_owned());
    assert_eq!(
        members,
        vec![
            pair(BRIDGE, "pcieport"),
            pair(GPU, "nvidia"),
            pair(AUDIO, "snd_hda_intel"),
            pair(SERIAL, "nvidia-serial"),
        ]
    );
    kernel.take_log();

    kernel.set(|k| k.fail = Some(format!("bus/pci/devices/{AUDIO}/driver/unbind")));
    let out = call(&["detach", "--group", GPU]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "the group detach of {GPU} failed at {AUDIO}: writing \"{AUDIO}\" to "
        )),
        "{out:?}"
    );
    assert!(
        out.stderr
            .trim_end()
            .ends_with(&format!("; rolled back: {AUDIO}, {GPU}")),
        "{out:?}"
    );
    assert_eq!(world.driver(GPU).await, "nvidia");
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    assert_eq!(world.driver(SERIAL).await, "nvidia-serial");

    // The rollback fails too: the message names the device left behind,
    // and its object shows where it was left (re-read, no uevent needed).
    kernel.set(|k| k.fail_also = vec!["bus/pci/drivers/nvidia/bind".into()]);
    let out = call(&["detach", "--group", GPU]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "; rolled back: {AUDIO}; rolling back {GPU} failed (writing \"{GPU}\" to "
        )),
        "{out:?}"
    );
    assert!(
        out.stderr.trim_end().ends_with(", left on no driver"),
        "{out:?}"
    );
    assert_eq!(world.driver(GPU).await, "");
}

/// polkit sees a group move's addresses as `group-devices`, so a rule can
/// tell it from a single device's: this one allows `nobody` group moves of
/// exactly group 1 and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polkit_rules_see_the_group_devices() {
    let rule = format!(
        "polkit.addRule(function(action, subject) {{ \
         if (action.id == 'org.example.vmmanager.manage-devices' && subject.user == 'nobody') \
         return action.lookup('group-devices') == '{GPU},{AUDIO}' \
         ? polkit.Result.YES : polkit.Result.NO; }});"
    );
    let (world, kernel) = gpu_world(true, Polkit::builder().rule(rule)).await;
    let nobody = Some((NOBODY, NOBODY));
    let out = world.call(nobody, AUDIO, "Detach", &["0"]).await;
    assert!(
        out.stderr.contains("NotAuthorized") || out.stderr.contains("not authorized"),
        "{out:?}"
    );
    assert_eq!(kernel.take_log(), vec![]);
    world
        .call(nobody, AUDIO, "Detach", &["1", "group", "b", "true"])
        .await
        .expect_success("group Detach as nobody");
    assert_eq!(world.driver(GPU).await, "vfio-pci");
    assert_eq!(world.driver(AUDIO).await, "vfio-pci");
}

// ---------------------------------------------------------------------------
// 7. Safety gates: Detach refuses while the host uses the device
// ---------------------------------------------------------------------------

/// A pseudo-terminal pair: its `/dev/pts/N` is a char device no other test
/// or process holds, for a prepared device node to stand for (holders are
/// matched by device number).
struct Pts {
    _master: std::os::fd::OwnedFd,
    path: std::path::PathBuf,
    major: u32,
    minor: u32,
}

impl Pts {
    fn open() -> Pts {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::MetadataExt;
        // SAFETY: plain libc calls on a descriptor this function owns.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        let master = unsafe { std::os::fd::OwnedFd::from_raw_fd(master) };
        use std::os::fd::AsRawFd;
        let mut name = [0u8; 64];
        unsafe {
            assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
            assert_eq!(
                libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr().cast(), name.len()),
                0
            );
        }
        let end = name.iter().position(|b| *b == 0).unwrap();
        let path = std::path::PathBuf::from(String::from_utf8_lossy(&name[..end]).into_owned());
        let rdev = fs::metadata(&path).unwrap().rdev();
        Pts {
            _master: master,
            path,
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        }
    }
}

/// Gives the GPU of `fs` what a desktop's graphics card has: it is the boot
/// display, its DRM node `card1` (standing for `pts`) and a connected
/// output `card1-HDMI-A-1`.
fn make_it_the_desktops_gpu(fs: &FakeSysfs, pts: &Pts) {
    fs.write_attr(GPU, "boot_vga", "1\n");
    let drm_class = fs.root().join("class/drm");
    fs::create_dir_all(&drm_class).unwrap();
    let card = fs.device_dir(GPU).join("drm/card1");
    let connector = card.join("card1-HDMI-A-1");
    fs::create_dir_all(&connector).unwrap();
    for dir in [&card, &connector] {
        symlink(&drm_class, dir.join("subsystem")).unwrap();
    }
    fs::write(
        card.join("uevent"),
        format!(
            "MAJOR={}\nMINOR={}\nDEVNAME=dri/card1\n",
            pts.major, pts.minor
        ),
    )
    .unwrap();
    fs::write(card.join("dev"), format!("{}:{}\n", pts.major, pts.minor)).unwrap();
    fs::write(connector.join("uevent"), "").unwrap();
    fs::write(connector.join("status"), "connected\n").unwrap();
}

/// `text` without what this machine adds to every look at processes: its
/// PID 1 (the sandbox's agent) refuses even root a look at its open files,
/// so the service says that whether processes hold a node is unknown (it
/// fails closed). Checked to be so wherever it is removed; on a machine
/// whose PID 1 can be looked at, nothing is removed.
fn seen(text: &str) -> String {
    const CLAUSE: &str = "whether processes hold its device nodes is unknown: the service \
                          was refused a look at the open files of process 1 (";
    let Some(start) = text.find(CLAUSE) else {
        return text.to_owned();
    };
    assert!(
        fs::read_link("/proc/1/fd/0")
            .is_err_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied),
        "PID 1's open files can be read here, yet: {text}"
    );
    let end = start + text[start..].find(')').unwrap() + 1;
    let before = text[..start].strip_suffix("; ").unwrap_or(&text[..start]);
    let after = &text[end..];
    let after = match before.is_empty() {
        true => after.strip_prefix("; ").unwrap_or(after),
        false => after,
    };
    format!("{before}{after}")
}

fn host_users(dicts: &[vmmanager_client::dict::Dict]) -> Vec<(String, String)> {
    dicts
        .iter()
        .map(vmmanager_client::HostUser::from_dict)
        .map(|u| (u.kind, u.text))
        .collect()
}

/// The desktop's GPU: Detach is refused, naming every use, before anything
/// is written — for root too; `HostUsers` shows the same to anyone, with
/// processes counted, not named. `force` needs force-detach on top of
/// manage-devices (its details carry the uses), then detaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn detach_refuses_while_the_host_uses_the_device_unless_forced() {
    // nobody may manage devices, and force a detach only when no process
    // holds the device (the details are what rules see).
    let polkit = Polkit::builder()
        .allow_user("org.example.vmmanager.manage-devices", "nobody")
        .rule(
            "polkit.addRule(function(action, subject) { \
             if (action.id == 'org.example.vmmanager.force-detach' && subject.user == 'nobody' \
                 && action.lookup('device') == '0000:01:00.0' \
                 && action.lookup('host-uses').indexOf('display output card1-HDMI-A-1 is connected') >= 0 \
                 && action.lookup('host-uses').indexOf('holds') < 0) \
             return polkit.Result.YES; });",
        );
    let fs = gpu_tree(true);
    let pts = Pts::open();
    make_it_the_desktops_gpu(&fs, &pts);
    let kernel = FakeKernel::new(&fs.root());
    let world = DeviceWorld::start(fs, Some(polkit), Some(kernel.clone())).await;
    let mut compositor = hold_open(&pts.path, true);
    let pid = compositor.pid();
    let nobody = Some((NOBODY, NOBODY));
    let no_prompt = ["1", "auth.no-user-interaction", "b", "true"];

    let uses = [
        "it is the boot display (the firmware's console)".to_owned(),
        "display output card1-HDMI-A-1 is connected".to_owned(),
        format!("process {pid} (/usr/bin/sleep) holds /dev/dri/card1 open"),
    ];
    let refusal = format!(
        "{GPU} is in use by the host: {}; nothing was changed (the force option detaches anyway)",
        uses.join("; ")
    );
    let gpu = world.device(GPU).await;
    for user in [None, nobody] {
        let out = world.call(user, GPU, "Detach", &no_prompt).await;
        assert!(!out.success(), "{out:#?}");
        assert!(
            seen(&out.stderr).contains(&refusal),
            "{user:?}: {}\nwanted: {refusal}",
            out.stderr
        );
    }
    let (name, message) = method_error(gpu.detach(HashMap::new()).await.unwrap_err());
    assert_eq!(
        (name.as_str(), seen(&message).as_str()),
        ("org.example.VmManager1.Error.HostInUse", refusal.as_str())
    );
    // The audio function has nothing of the host's: it moves alone.
    assert_eq!(kernel.take_log(), vec![]);

    // Any reader sees the uses before clicking, except the processes:
    // which files another user's processes hold is not theirs to see (and
    // looking costs a pass over every process).
    let public = vec![
        ("boot-display".to_owned(), uses[0].clone()),
        ("connector".to_owned(), uses[1].clone()),
    ];
    let out = world
        .busctl(
            nobody,
            &[
                "get-property",
                BUS_NAME,
                &path(GPU),
                DEVICE_IFACE,
                "HostUsers",
                "--json=short",
            ],
        )
        .await;
    let json: serde_json::Value =
        serde_json::from_str(out.expect_success("HostUsers as nobody")).unwrap();
    let from_busctl: Vec<(String, String)> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"]["data"].as_str().unwrap().to_owned(),
                seen(d["text"]["data"].as_str().unwrap()),
            )
        })
        .filter(|(_, text)| !text.is_empty())
        .collect();
    assert_eq!(from_busctl, public);
    assert!(!out.stdout.contains(&pid.to_string()), "{}", out.stdout);
    let mut read = host_users(&gpu.host_users().await.unwrap());
    read.retain(|(_, text)| !seen(text).is_empty());
    assert_eq!(read, public);
    assert_eq!(
        world.device(AUDIO).await.host_users().await.unwrap(),
        vec![]
    );

    // vmctl: the refusal (exit 6, not a VM's 4) and the uses beforehand.
    let bus = world.bus.address().to_owned();
    let vmctl = |args: &[&str]| {
        let mut cmd = std::process::Command::new(common::world::VMCTL);
        cmd.arg("--bus-address").arg(&bus).args(args);
        common::util::run(&mut cmd)
    };
    let out = tokio::task::block_in_place(|| vmctl(&["detach", GPU]));
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(seen(&out.stderr).contains(&refusal), "{out:?}");
    let out = tokio::task::block_in_place(|| vmctl(&["device", GPU]));
    assert!(
        seen(&out.stdout).contains(&format!("HostUsers: {}; {}\n", uses[0], uses[1])),
        "{out:?}"
    );

    // Forcing needs force-detach: nobody's rule does not cover a held node.
    let force = [
        "2",
        "auth.no-user-interaction",
        "b",
        "true",
        "force",
        "b",
        "true",
    ];
    let out = world.call(nobody, GPU, "Detach", &force).await;
    assert!(
        out.stderr
            .contains("not authorized for org.example.vmmanager.force-detach"),
        "{out:#?}"
    );
    assert_eq!(kernel.take_log(), vec![]);
    // The compositor is gone; the display is still the host's, and the
    // rule now allows forcing it.
    compositor.kill_and_wait();
    let out = world.call(nobody, GPU, "Detach", &no_prompt).await;
    assert!(
        seen(&out.stderr).contains(&format!(
            "{GPU} is in use by the host: {}; {}; nothing was changed",
            uses[0], uses[1]
        )),
        "{out:#?}"
    );
    world
        .call(nobody, GPU, "Detach", &force)
        .await
        .expect_success("forced Detach as nobody with the rule");
    assert_eq!(world.driver(GPU).await, "vfio-pci");
    assert_eq!(kernel.take_log(), detach_writes(GPU));
    // Already on vfio-pci: nothing of the host's left to lose.
    world
        .call(nobody, GPU, "Detach", &no_prompt)
        .await
        .expect_success("Detach again");
}

// ---------------------------------------------------------------------------
// 8. auto-return: given back after the last VM user exits
// ---------------------------------------------------------------------------

/// Detach with `auto-return`: nothing happens while no VM has used the
/// device; a VM opens its group (the node is watched with inotify, not
/// polled) and exits; then the device is reset, reattached, verified, and
/// `ReturnFinished` says so. A second time the host driver is gone:
/// `driver-did-not-bind`, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_return_gives_the_device_back_after_its_last_vm_user_exits() {
    let fs = gpu_tree(true);
    fs.write_attr(AUDIO, "reset", "");
    let kernel = FakeKernel::new(&fs.root());
    let (bus, polkit) = Polkit::builder().start_with_bus().await;
    let (dev, node) = dev_with_group_node();
    let world = world_with_dev(bus, polkit, fs, &kernel, dev).await;
    let audio = world.device(AUDIO).await;
    let mut finished = return_finished(&world, AUDIO).await;

    audio.detach(auto_return()).await.unwrap();
    assert_eq!(kernel.take_log(), detach_writes(AUDIO));
    assert!(audio.auto_return().await.unwrap());
    assert!(!world.device(GPU).await.auto_return().await.unwrap());
    // No VM has used it: it stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kernel.take_log(), vec![]);

    let mut vm = hold_open(&node, true);
    wait_for(|| async { !audio.in_use_by().await.unwrap().is_empty() }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(kernel.take_log(), vec![], "given back under a running VM");
    vm.kill_and_wait();
    let (outcome, message) = next_return(&mut finished).await;
    assert_eq!(
        (outcome.as_str(), message.as_str()),
        ("returned", "0000:01:00.1: back on snd_hda_intel")
    );
    let mut writes = vec![w(&format!("bus/pci/devices/{AUDIO}/reset"), "1")];
    writes.extend(reattach_writes(AUDIO, "snd_hda_intel"));
    assert_eq!(kernel.take_log(), writes);
    // The objects showed it before the signal.
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    assert!(!audio.auto_return().await.unwrap());

    // Again, and the host driver is unloaded while the VM runs.
    audio.detach(auto_return()).await.unwrap();
    kernel.take_log();
    let mut vm = hold_open(&node, false);
    wait_for(|| async { !audio.in_use_by().await.unwrap().is_empty() }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    fs::remove_dir_all(world.fs.root().join("bus/pci/drivers/snd_hda_intel")).unwrap();
    vm.kill_and_wait();
    let (outcome, message) = next_return(&mut finished).await;
    assert_eq!(
        (outcome.as_str(), message.as_str()),
        (
            "driver-did-not-bind",
            "0000:01:00.1: snd_hda_intel did not take it back (the snd_hda_intel driver is \
             not loaded); it is on no driver"
        )
    );
    assert_eq!(world.driver(AUDIO).await, "");

    // Reattach by hand takes the mark away with it.
    let gpu = world.device(GPU).await;
    gpu.detach(auto_return()).await.unwrap();
    assert!(gpu.auto_return().await.unwrap());
    gpu.reattach(HashMap::new()).await.unwrap();
    assert!(!gpu.auto_return().await.unwrap());
}

/// The use of a marked device is saved: a service that was not running
/// when the VM exited gives the device back when it starts, while a
/// device no VM has used yet stays detached across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_return_gives_back_what_a_vm_used_while_the_service_was_down() {
    let fs = gpu_tree(true);
    let kernel = FakeKernel::new(&fs.root());
    let (bus, polkit) = Polkit::builder().start_with_bus().await;
    let (dev, node) = dev_with_group_node();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("vfio-drivers");
    let mut config = inproc::config(&fs, dev.path(), PERMITTED);
    config.devices.vfio_state_file = state_file.clone();
    // The service as systemd would start it again: a new process, the
    // same configuration and state file.
    async fn start(
        bus: &TestBus,
        config: &vmmanager::config::Config,
        kernel: &FakeKernel,
    ) -> InProcService {
        InProcService::start_with(bus, config, kernel.clone(), tempfile::tempdir().unwrap()).await
    }
    let svc = start(&bus, &config, &kernel).await;
    let client = bus.connect().await;
    let mut world = DeviceWorld {
        svc,
        client,
        _polkit: Some(polkit),
        bus,
        fs,
    };
    let mut finished = return_finished(&world, AUDIO).await;
    world
        .device(AUDIO)
        .await
        .detach(auto_return())
        .await
        .unwrap();
    kernel.take_log();

    // Restarted before any VM used it: it waits for one.
    world.svc.stop().await;
    world.svc = start(&world.bus, &config, &kernel).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        kernel.take_log(),
        vec![],
        "given back before any VM used it"
    );
    assert!(world.device(AUDIO).await.auto_return().await.unwrap());

    // A VM takes it; the service stops; the VM exits; the service starts.
    let mut vm = hold_open(&node, true);
    let audio = world.device(AUDIO).await;
    wait_for(|| async { !audio.in_use_by().await.unwrap().is_empty() }).await;
    let saved = || fs::read_to_string(&state_file).unwrap_or_default();
    wait_for(|| async { saved().contains(&format!("{AUDIO} snd_hda_intel auto-return=in-use\n")) })
        .await;
    world.svc.stop().await;
    vm.kill_and_wait();
    assert_eq!(kernel.take_log(), vec![]);
    world.svc = start(&world.bus, &config, &kernel).await;
    let (outcome, message) = next_return(&mut finished).await;
    assert_eq!(
        (outcome.as_str(), message.as_str()),
        ("returned", "0000:01:00.1: back on snd_hda_intel")
    );
    assert_eq!(kernel.take_log(), reattach_writes(AUDIO, "snd_hda_intel"));
    assert!(!saved().contains(AUDIO), "{}", saved());
}

/// Detach's options with `auto-return`.
fn auto_return() -> vmmanager_client::options::Options {
    vmmanager_client::options::BindingOptions::new()
        .auto_return(true)
        .build()
}

/// A /dev for the service with group 1's node, as the kernel makes it once
/// the group is on vfio-pci (a plain file: opening it is what counts).
fn dev_with_group_node() -> (tempfile::TempDir, std::path::PathBuf) {
    let dev = tempfile::tempdir().unwrap();
    fs::create_dir(dev.path().join("vfio")).unwrap();
    let node = dev.path().join("vfio/1");
    fs::write(&node, "").unwrap();
    (dev, node)
}

/// The service on `fs` with `dev` as its /dev (VFIO group nodes the test
/// made), on a bus with polkitd.
async fn world_with_dev(
    bus: TestBus,
    polkit: Polkit,
    fs: FakeSysfs,
    kernel: &FakeKernel,
    dev: tempfile::TempDir,
) -> DeviceWorld {
    let config = inproc::config(&fs, dev.path(), PERMITTED);
    let svc = InProcService::start_with(&bus, &config, kernel.clone(), dev).await;
    let client = bus.connect().await;
    DeviceWorld {
        svc,
        client,
        _polkit: Some(polkit),
        bus,
        fs,
    }
}

/// `ReturnFinished` signals of the device at `address`.
async fn return_finished(world: &DeviceWorld, address: &str) -> zbus::MessageStream {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(DEVICE_IFACE)
        .member("ReturnFinished")
        .path(path(address))
        .build()
        .unwrap();
    zbus::MessageStream::for_match_rule(rule, &world.client, None)
        .await
        .unwrap()
}

/// The next `ReturnFinished` (outcome, message), within 10 s.
async fn next_return(finished: &mut zbus::MessageStream) -> (String, String) {
    let next = tokio::time::timeout(Duration::from_secs(10), finished.next());
    let signal = next
        .await
        .expect("ReturnFinished within 10 s")
        .unwrap()
        .unwrap();
    signal.body().deserialize().unwrap()
}

/// Polls `check` for up to 10 s.
async fn wait_for<F: std::future::Future<Output = bool>>(check: impl Fn() -> F) {
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not within 10 s");
}

// ---------------------------------------------------------------------------
// 9. Boot-time claims: Detach/Reattach with `persistent`
// ---------------------------------------------------------------------------

/// driverctl's override file of `address` in the world's claims directory.
fn claim_file(fs: &FakeSysfs, address: &str) -> std::path::PathBuf {
    fs.driverctl_dir().join(format!("pci-{address}"))
}

/// The files in the claims directory, sorted (none when it is missing).
fn claim_files(fs: &FakeSysfs) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(fs.driverctl_dir())
        .map(|dir| {
            dir.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl DeviceWorld {
    /// `(PersistentDriver, PersistentOrigin)` of `address`.
    async fn boot_claim(&self, address: &str) -> (String, String) {
        let get = |name| async move {
            match self.get(&path(address), name).await.unwrap() {
                Val::S(text) => text,
                other => panic!("{name} is not a string: {other:?}"),
            }
        };
        (get("PersistentDriver").await, get("PersistentOrigin").await)
    }

    /// `vmctl --bus-address … ARGS` as root, off the async workers.
    async fn vmctl(&self, args: &[&str]) -> CmdOutput {
        let bus = self.bus.address().to_owned();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(common::world::VMCTL);
            cmd.arg("--bus-address").arg(&bus).args(&args);
            common::util::run(&mut cmd)
        })
        .await
        .unwrap()
    }
}

fn claim(driver: &str, origin: &str) -> (String, String) {
    (driver.to_owned(), origin.to_owned())
}

const PERSISTENT: [&str; 4] = ["1", "persistent", "b", "true"];
const GROUP_PERSISTENT: [&str; 7] = ["2", "group", "b", "true", "persistent", "b", "true"];

/// Detach with `persistent` leaves exactly what `driverctl set-override
/// ADDR vfio-pci` saves (`vfio-pci` and a newline, 0644), after the move;
/// Reattach with `persistent` removes it; without it, Reattach leaves the
/// claim. vmctl says the same through --persistent and `device`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn persistent_detach_writes_driverctls_file_and_reattach_removes_it() {
    use std::os::unix::fs::PermissionsExt;
    let (world, kernel) = gpu_world(true, Polkit::builder()).await;
    let file = claim_file(&world.fs, AUDIO);
    assert_eq!(world.boot_claim(AUDIO).await, claim("", ""));

    world
        .call(None, AUDIO, "Detach", &PERSISTENT)
        .await
        .expect_success("Detach persistent");
    assert_eq!(kernel.take_log(), detach_writes(AUDIO));
    assert_eq!(world.driver(AUDIO).await, "vfio-pci");
    assert_eq!(fs::read(&file).unwrap(), b"vfio-pci\n");
    let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o644);
    assert_eq!(claim_files(&world.fs), [format!("pci-{AUDIO}")]);
    assert_eq!(
        world.boot_claim(AUDIO).await,
        claim("vfio-pci", "vmmanager")
    );
    assert_eq!(world.boot_claim(GPU).await, claim("", ""));

    // Already detached and claimed: nothing written anywhere.
    let before = fs::metadata(&file).unwrap().modified().unwrap();
    world
        .call(None, AUDIO, "Detach", &PERSISTENT)
        .await
        .expect_success("second Detach persistent");
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(fs::metadata(&file).unwrap().modified().unwrap(), before);

    // A plain Reattach gives the device back for now; the claim stays.
    world
        .call(None, AUDIO, "Reattach", &["0"])
        .await
        .expect_success("Reattach");
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    assert_eq!(fs::read(&file).unwrap(), b"vfio-pci\n");

    // Reattach persistent of a device already given back: the claim goes.
    world
        .call(None, AUDIO, "Reattach", &PERSISTENT)
        .await
        .expect_success("Reattach persistent");
    assert_eq!(kernel.take_log(), reattach_writes(AUDIO, "snd_hda_intel"));
    assert!(!file.exists());
    assert_eq!(world.boot_claim(AUDIO).await, claim("", ""));

    // vmctl: --persistent both ways, and `device` shows the claim.
    let out = world.vmctl(&["detach", "--persistent", GPU]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{GPU}: vfio-pci\n"));
    assert_eq!(fs::read(claim_file(&world.fs, GPU)).unwrap(), b"vfio-pci\n");
    let out = world.vmctl(&["device", GPU]).await;
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert!(lines.contains(&"PersistentDriver: vfio-pci"), "{out:?}");
    assert!(lines.contains(&"PersistentOrigin: vmmanager"), "{out:?}");
    let out = world.vmctl(&["reattach", "--persistent", GPU]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(out.stdout, format!("{GPU}: nvidia\n"));
    assert_eq!(claim_files(&world.fs), Vec::<String>::new());
    let out = world.vmctl(&["device", GPU]).await;
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    assert!(lines.contains(&"PersistentDriver: -"), "{out:?}");
}

/// A file driverctl wrote for another driver is never replaced nor
/// removed: `persistent` is refused before anything moves and says which
/// file; the properties show it as someone else's. driverctl's own
/// vfio-pci claim is kept by Detach and shown as theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_drivers_override_is_not_touched_and_is_reported() {
    let (world, kernel) = gpu_world(true, Polkit::builder()).await;
    fs::create_dir_all(world.fs.driverctl_dir()).unwrap();
    let file = claim_file(&world.fs, AUDIO);
    // `driverctl set-override 0000:01:00.1 snd_hda_intel`.
    fs::write(&file, "snd_hda_intel\n").unwrap();
    assert_eq!(
        world.boot_claim(AUDIO).await,
        claim("snd_hda_intel", "other")
    );

    for method in ["Detach", "Reattach"] {
        let out = world.call(None, AUDIO, method, &PERSISTENT).await;
        assert!(!out.success(), "{method}: {out:?}");
        assert!(out.stderr.contains(&file.display().to_string()), "{out:?}");
        assert!(
            out.stderr
                .contains("has a boot-time override for \"snd_hda_intel\""),
            "{out:?}"
        );
        assert!(out.stderr.contains("nothing was changed"), "{out:?}");
        let audio = world.device(AUDIO).await;
        let result = if method == "Detach" {
            audio
                .detach(opts(&[("persistent", Variant::from(true))]))
                .await
        } else {
            audio
                .reattach(opts(&[("persistent", Variant::from(true))]))
                .await
        };
        let (name, _) = method_error(result.unwrap_err());
        assert_eq!(name, format!("{ERROR_PREFIX}Failed"));
    }
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    assert_eq!(fs::read_to_string(&file).unwrap(), "snd_hda_intel\n");

    // Without `persistent` the file is none of Detach's business.
    world
        .call(None, AUDIO, "Detach", &["0"])
        .await
        .expect_success("plain Detach");
    assert_eq!(fs::read_to_string(&file).unwrap(), "snd_hda_intel\n");

    // driverctl's vfio-pci claim: kept, and still theirs.
    let gpu_file = claim_file(&world.fs, GPU);
    fs::write(&gpu_file, "vfio-pci\n").unwrap();
    assert_eq!(world.boot_claim(GPU).await, claim("vfio-pci", "other"));
    world
        .call(None, GPU, "Detach", &PERSISTENT)
        .await
        .expect_success("Detach persistent over driverctl's vfio-pci claim");
    assert_eq!(world.boot_claim(GPU).await, claim("vfio-pci", "other"));
    assert_eq!(
        claim_files(&world.fs),
        [format!("pci-{GPU}"), format!("pci-{AUDIO}")]
    );

    // A symlink where a claim would go is refused, never followed.
    fs::remove_file(&gpu_file).unwrap();
    let elsewhere = world.fs.driverctl_dir().with_file_name("elsewhere");
    symlink(&elsewhere, &gpu_file).unwrap();
    assert_eq!(world.boot_claim(GPU).await, claim("", "unknown"));
    let out = world.call(None, GPU, "Detach", &PERSISTENT).await;
    assert!(out.stderr.contains("is not a regular file"), "{out:?}");
    assert!(!elsewhere.exists());
}

/// A tmpfs with room for `files` files, mounted on `dir` until dropped:
/// the claim after the last one fails with ENOSPC.
struct SmallTmpfs(std::path::PathBuf);

impl SmallTmpfs {
    fn mount(dir: &std::path::Path, files: u32) -> SmallTmpfs {
        fs::create_dir_all(dir).unwrap();
        // The root directory takes one inode too.
        let options = format!("nr_inodes={},mode=0755", files + 1);
        let out = common::util::run(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &options, "vmm-claims"])
                .arg(dir),
        );
        out.expect_success("mount a small tmpfs");
        SmallTmpfs(dir.to_owned())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// With `group`, every endpoint gets a claim (not the bridge), and Reattach
/// `group` `persistent` removes them all. A failed move writes no claim; a
/// claim that cannot be written after the move takes back the ones this
/// call wrote and says so, the devices staying on vfio-pci for now.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_persistent_claims_every_endpoint_and_takes_them_back_on_failure() {
    let fs = gpu_group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let world = DeviceWorld::start(fs, Some(Polkit::builder()), Some(kernel.clone())).await;
    let endpoints = [GPU, AUDIO, SERIAL];
    let files = |list: &[&str]| -> Vec<String> {
        let mut names: Vec<String> = list.iter().map(|a| format!("pci-{a}")).collect();
        names.sort();
        names
    };

    let out = world
        .vmctl(&["detach", "--group", "--persistent", AUDIO])
        .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(claim_files(&world.fs), files(&endpoints));
    for a in endpoints {
        assert_eq!(fs::read(claim_file(&world.fs, a)).unwrap(), b"vfio-pci\n");
        assert_eq!(world.boot_claim(a).await, claim("vfio-pci", "vmmanager"));
    }
    assert_eq!(world.boot_claim(BRIDGE).await, claim("", ""));
    let out = world
        .vmctl(&["reattach", "--group", "--persistent", GPU])
        .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(claim_files(&world.fs), Vec::<String>::new());
    assert_eq!(world.driver(SERIAL).await, "nvidia-serial");
    kernel.take_log();

    // The move fails and is rolled back: no claim was written.
    kernel.set(|k| k.fail = Some(format!("bus/pci/devices/{AUDIO}/driver/unbind")));
    let out = world.call(None, GPU, "Detach", &GROUP_PERSISTENT).await;
    assert!(
        out.stderr.contains(&format!("rolled back: {AUDIO}, {GPU}")),
        "{out:?}"
    );
    assert_eq!(claim_files(&world.fs), Vec::<String>::new());
    assert_eq!(world.driver(GPU).await, "nvidia");
    kernel.set(|k| k.fail = None);

    // Room for two claims: the third fails after the move.
    let _small = SmallTmpfs::mount(&world.fs.driverctl_dir(), 2);
    let out = world.call(None, GPU, "Detach", &GROUP_PERSISTENT).await;
    assert!(!out.success(), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "{GPU} was detached to vfio-pci, but the boot-time claim of {SERIAL} could not be written: "
        )),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(&format!(
            "the claims this call wrote were removed again ({AUDIO}, {GPU}); nothing is claimed \
             at boot, the devices stay on vfio-pci until the next boot"
        )),
        "{out:?}"
    );
    assert_eq!(claim_files(&world.fs), Vec::<String>::new());
    for a in endpoints {
        assert_eq!(world.driver(a).await, "vfio-pci");
    }
}

/// After a reboot the original drivers are forgotten, yet a group our
/// claims bound at boot goes back whole on Reattach `group` (each member
/// to what the kernel picks); a member driverctl claimed stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reattach_group_gives_back_members_our_claims_bound_at_boot() {
    let fs = gpu_group_tree();
    let kernel = FakeKernel::new(&fs.root());
    let mut world = DeviceWorld::start(fs, Some(Polkit::builder()), Some(kernel.clone())).await;
    world
        .call(None, GPU, "Detach", &GROUP_PERSISTENT)
        .await
        .expect_success("group Detach persistent");
    // SERIAL's claim is driverctl's (made again by `driverctl set-override`,
    // a clock tick later: see `devices::persistent`).
    let serial = claim_file(&world.fs, SERIAL);
    fs::remove_file(&serial).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    fs::write(&serial, "vfio-pci\n").unwrap();
    // "Reboot": a new service that remembers no original driver.
    world.svc.stop().await;
    world.svc = InProcService::start(&world.bus, &world.fs, PERMITTED, kernel.clone()).await;
    kernel.set(|k| {
        for (a, d) in [
            (GPU, "nvidia"),
            (AUDIO, "snd_hda_intel"),
            (SERIAL, "nvidia-serial"),
        ] {
            k.natural.insert(a.to_owned(), d.to_owned());
        }
    });
    world
        .call(None, AUDIO, "Reattach", &["1", "group", "b", "true"])
        .await
        .expect_success("group Reattach");
    assert_eq!(world.driver(GPU).await, "nvidia");
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
    assert_eq!(world.driver(SERIAL).await, "vfio-pci");
    // Without `persistent` the claims stay for the next boot.
    assert_eq!(world.boot_claim(GPU).await, claim("vfio-pci", "vmmanager"));
    assert_eq!(world.boot_claim(SERIAL).await, claim("vfio-pci", "other"));
}

/// polkit sees `persistent` = "true" (only when asked for), so a rule can
/// allow detaching and refuse boot-time claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polkit_rules_see_persistent() {
    let rule = "polkit.addRule(function(action, subject) { \
         if (action.id == 'org.example.vmmanager.manage-devices' && subject.user == 'nobody') \
         return action.lookup('persistent') == 'true' ? polkit.Result.NO : polkit.Result.YES; });";
    let (world, kernel) = gpu_world(true, Polkit::builder().rule(rule)).await;
    let nobody = Some((NOBODY, NOBODY));
    let out = world.call(nobody, AUDIO, "Detach", &PERSISTENT).await;
    assert!(
        out.stderr.contains("NotAuthorized") || out.stderr.contains("not authorized"),
        "{out:?}"
    );
    assert_eq!(kernel.take_log(), vec![]);
    assert_eq!(claim_files(&world.fs), Vec::<String>::new());
    world
        .call(nobody, AUDIO, "Detach", &["0"])
        .await
        .expect_success("Detach as nobody");
    assert_eq!(world.driver(AUDIO).await, "vfio-pci");
}

/// driverctl itself (0.111) reads a claim the service wrote: its
/// `load-override`, what its udev rule starts at boot, writes vfio-pci to
/// the device's driver_override, unbinds and reprobes it, and
/// `list-overrides` then lists the device. driverctl's paths are fixed
/// (/etc/driverctl.d, /sys), so it runs in a private mount namespace with
/// the claims directory and the prepared tree bound over them (and
/// /sys/module/vfio-pci made there, so it never modprobes on this host).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn driverctl_loads_a_claim_the_service_wrote() {
    assert!(
        std::path::Path::new("/usr/sbin/driverctl").exists(),
        "driverctl is missing: apt-get install driverctl (scripts/install-deps)"
    );
    let (world, kernel) = gpu_world(true, Polkit::builder()).await;
    world
        .call(None, AUDIO, "Detach", &PERSISTENT)
        .await
        .expect_success("Detach persistent");
    // Given back for now: the override is cleared, the claim stays.
    world
        .call(None, AUDIO, "Reattach", &["0"])
        .await
        .expect_success("Reattach");
    assert_eq!(world.fs.read_attr(AUDIO, "driver_override"), "(null)\n");
    kernel.take_log();
    fs::create_dir_all(world.fs.root().join("module/vfio-pci")).unwrap();
    let driverctl = |command: &'static [&'static str]| {
        let sys = world.fs.root();
        let claims = world.fs.driverctl_dir();
        async move {
            tokio::task::spawn_blocking(move || {
                let script = r#"set -e
                    mount --bind "$1" /sys
                    mount --bind "$2" /etc/driverctl.d
                    shift 2
                    exec driverctl "$@""#;
                common::util::run(
                    common::util::in_private_mounts(script)
                        .arg(sys)
                        .arg(claims)
                        .args(command),
                )
            })
            .await
            .unwrap()
        }
    };
    let out = driverctl(&["load-override", AUDIO]).await;
    out.expect_success("driverctl load-override");
    assert_eq!(world.fs.read_attr(AUDIO, "driver_override"), "vfio-pci\n");
    let unbind = world.fs.driver_dir("snd_hda_intel").join("unbind");
    assert_eq!(fs::read_to_string(unbind).unwrap(), format!("{AUDIO}\n"));
    let probe = fs::read_to_string(world.fs.root().join("bus/pci/drivers_probe")).unwrap();
    assert_eq!(probe, format!("{AUDIO}\n"));
    let out = driverctl(&["--nosave", "list-overrides"]).await;
    // The prepared tree moves no driver link by itself: still the old one.
    assert_eq!(
        out.expect_success("driverctl list-overrides"),
        format!("{AUDIO} snd_hda_intel\n")
    );
    // And `unset-override` removes our file as its own (--noprobe: the
    // prepared tree has no kernel to probe with).
    driverctl(&["--noprobe", "unset-override", AUDIO])
        .await
        .expect_success("driverctl unset-override");
    assert_eq!(claim_files(&world.fs), Vec::<String>::new());
    assert_eq!(world.boot_claim(AUDIO).await, claim("", ""));
}

/// A VM whose /dev is its own (libvirt makes its own node for the group,
/// another inode with the same number) is not seen by the inotify watch:
/// the slow re-check finds it, its exit is followed by pidfd, and the
/// device is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_return_follows_a_vm_whose_dev_is_its_own() {
    use vmmanager::devices::auto_return::RECHECK_INTERVAL;
    let fs = gpu_tree(true);
    let kernel = FakeKernel::new(&fs.root());
    let (bus, polkit) = Polkit::builder().start_with_bus().await;
    let dev = tempfile::tempdir().unwrap();
    fs::create_dir(dev.path().join("vfio")).unwrap();
    // The group's node: a char device of a number only this test holds.
    let pts = Pts::open();
    let node = std::ffi::CString::new(dev.path().join("vfio/1").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    let made = unsafe {
        libc::mknod(
            node.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(pts.major, pts.minor),
        )
    };
    assert_eq!(made, 0, "mknod: {}", std::io::Error::last_os_error());
    let world = world_with_dev(bus, polkit, fs, &kernel, dev).await;
    let audio = world.device(AUDIO).await;
    let mut finished = return_finished(&world, AUDIO).await;
    audio.detach(auto_return()).await.unwrap();
    kernel.take_log();
    // The VM opens its own node (/dev/pts/N stands for it): no event.
    let mut vm = hold_open(&pts.path, true);
    wait_for(|| async { !audio.in_use_by().await.unwrap().is_empty() }).await;
    tokio::time::sleep(RECHECK_INTERVAL + Duration::from_secs(1)).await;
    assert_eq!(kernel.take_log(), vec![], "given back under a running VM");
    vm.kill_and_wait();
    let (outcome, message) = next_return(&mut finished).await;
    assert_eq!(
        (outcome.as_str(), message.as_str()),
        ("returned", "0000:01:00.1: back on snd_hda_intel")
    );
    assert_eq!(world.driver(AUDIO).await, "snd_hda_intel");
}
