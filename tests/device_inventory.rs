//! The device inventory against prepared sysfs trees (and, read-only, this
//! machine's real /sys): events, resyncs, readiness of IOMMU groups, SR-IOV,
//! hostile contents, and a property test that any event sequence ends where
//! a fresh enumeration of the final tree starts.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use common::sysfs::FakeSysfs;
use proptest::prelude::*;
use vmmanager::devices::inventory::{
    AllowEntry, BRIDGE_BLOCKER, DeviceState, Inventory, InventoryChange, NO_DRIVER_BLOCKER,
    NO_IOMMU_GROUP_BLOCKER,
};
use vmmanager::devices::sysfs::{self, SysfsError};
use vmmanager::devices::{DeviceAction, DeviceEvent};
use vmmanager::service::device_properties;
use vmmanager_client::DeviceProperties;
use vmmanager_client::PciAddress;
use zbus::OwnedVariant;

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn event(action: DeviceAction, a: &str) -> DeviceEvent {
    DeviceEvent {
        action,
        address: addr(a),
        vendor_name: None,
        device_name: None,
    }
}

fn inventory(fs: &FakeSysfs) -> Inventory {
    Inventory::new(fs.root(), fs.udev_data_dir(), Vec::new())
}

fn fresh(fs: &FakeSysfs, allow: Vec<AllowEntry>) -> Vec<DeviceState> {
    let mut inv = Inventory::new(fs.root(), fs.udev_data_dir(), allow);
    inv.resync();
    inv.devices().cloned().collect()
}

/// `(address, names of the D-Bus properties that change)` of each
/// `Changed` that changes any, for compact asserts.
fn changed(changes: &[InventoryChange]) -> Vec<(String, Vec<&'static str>)> {
    changes
        .iter()
        .map(|c| match c {
            InventoryChange::Changed { old, new } => (
                new.info.address.to_string(),
                device_properties::changed(old, new)
                    .into_iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            ),
            other => panic!("expected only Changed, got {other:?}"),
        })
        .filter(|(_, names)| !names.is_empty())
        .collect()
}

/// A device's D-Bus properties as the service spells them.
fn api(state: &DeviceState) -> DeviceProperties {
    device_properties::of(state)
}

fn blockers(inv: &Inventory, a: &str) -> Vec<String> {
    inv.get(&addr(a)).unwrap().passthrough_blockers.clone()
}

fn ready(inv: &Inventory, a: &str) -> bool {
    inv.get(&addr(a)).unwrap().passthrough_ready
}

const GPU: &str = "0000:01:00.0";
const AUDIO: &str = "0000:01:00.1";
const BRIDGE: &str = "0000:00:01.0";

/// A root port and a GPU with its HDMI audio function, all in group 1.
fn gpu_group() -> FakeSysfs {
    let fs = FakeSysfs::new();
    fs.device(BRIDGE, 0x8086, 0x1901, 0x060400)
        .driver("pcieport")
        .iommu_group(1);
    fs.device(GPU, 0x10de, 0x1eb8, 0x030000)
        .driver("nvidia")
        .iommu_group(1)
        .numa(0)
        .subsystem(0x10de, 0x12a2)
        .names("NVIDIA Corporation", "TU104GL [Tesla T4]");
    fs.device(AUDIO, 0x10de, 0x10f8, 0x040300)
        .driver("snd_hda_intel")
        .iommu_group(1);
    fs
}

#[test]
fn reads_a_device_in_the_kernel_formats() {
    let fs = gpu_group();
    let info = sysfs::read_device(&fs.root(), &addr(GPU)).unwrap();
    assert_eq!(info.vendor_id, 0x10de);
    assert_eq!(info.device_id, 0x1eb8);
    assert_eq!(info.subsystem_vendor_id, 0x10de);
    assert_eq!(info.subsystem_device_id, 0x12a2);
    assert_eq!(info.class, 0x030000);
    assert_eq!(info.driver.as_deref(), Some("nvidia"));
    assert_eq!(info.driver_override, None);
    assert_eq!(info.iommu_group, Some(1));
    assert_eq!(info.numa_node, Some(0));
    assert_eq!(info.sriov_total_vfs, 0);
    assert_eq!(info.physical_function, None);
    assert_eq!(
        info.modalias,
        "pci:v000010DEd00001EB8sv000010DEsd000012A2bc03sc00i00"
    );
    assert!(!info.is_bridge());
    assert!(
        sysfs::read_device(&fs.root(), &addr(BRIDGE))
            .unwrap()
            .is_bridge()
    );
    assert_eq!(
        sysfs::iommu_group_members(&fs.root(), 1),
        vec![addr(BRIDGE), addr(GPU), addr(AUDIO)]
    );
    assert!(sysfs::iommu_group_members(&fs.root(), 99).is_empty());
    assert_eq!(
        sysfs::udev_names(&fs.udev_data_dir(), &addr(GPU)),
        (
            Some("NVIDIA Corporation".into()),
            Some("TU104GL [Tesla T4]".into())
        )
    );
    assert_eq!(
        sysfs::udev_names(&fs.udev_data_dir(), &addr(AUDIO)),
        (None, None)
    );
    let all: Vec<PciAddress> = sysfs::enumerate(&fs.root())
        .unwrap()
        .iter()
        .map(|d| d.address)
        .collect();
    assert_eq!(all, vec![addr(BRIDGE), addr(GPU), addr(AUDIO)]);

    fs.at(GPU).driver_override("vfio-pci");
    let info = sysfs::read_device(&fs.root(), &addr(GPU)).unwrap();
    assert_eq!(info.driver_override.as_deref(), Some("vfio-pci"));
}

#[test]
fn binding_one_device_updates_the_whole_group() {
    let fs = gpu_group();
    let mut inv = inventory(&fs);
    let added = inv.resync();
    assert_eq!(added.len(), 3);
    assert!(added.iter().all(|c| matches!(c, InventoryChange::Added(_))));

    let gpu = inv.get(&addr(GPU)).unwrap();
    assert_eq!(gpu.vendor_name.as_deref(), Some("NVIDIA Corporation"));
    assert_eq!(gpu.device_name.as_deref(), Some("TU104GL [Tesla T4]"));
    assert_eq!(gpu.iommu_group_devices, [BRIDGE, GPU, AUDIO]);
    assert!(!ready(&inv, GPU));
    assert_eq!(
        blockers(&inv, GPU),
        [
            "bound to nvidia, not vfio-pci",
            "0000:01:00.1 in the same IOMMU group is bound to snd_hda_intel"
        ]
    );
    assert_eq!(
        blockers(&inv, AUDIO),
        [
            "bound to snd_hda_intel, not vfio-pci",
            "0000:01:00.0 in the same IOMMU group is bound to nvidia"
        ]
    );
    // The root port's own pcieport binding blocks nobody.
    assert_eq!(
        blockers(&inv, BRIDGE),
        [
            BRIDGE_BLOCKER,
            "0000:01:00.0 in the same IOMMU group is bound to nvidia",
            "0000:01:00.1 in the same IOMMU group is bound to snd_hda_intel"
        ]
    );

    // Bind the GPU to vfio-pci: its Driver changes, and the blockers of all
    // three, because each of them named the GPU's driver.
    fs.rebind(GPU, "vfio-pci");
    let changes = inv.apply_batch(&[event(DeviceAction::Bind, GPU)]);
    assert_eq!(
        changed(&changes),
        [
            (GPU.to_owned(), vec!["Driver", "PassthroughBlockers"]),
            (BRIDGE.to_owned(), vec!["PassthroughBlockers"]),
            (AUDIO.to_owned(), vec!["PassthroughBlockers"]),
        ]
    );
    assert_eq!(
        blockers(&inv, GPU),
        ["0000:01:00.1 in the same IOMMU group is bound to snd_hda_intel"]
    );
    assert_eq!(
        blockers(&inv, AUDIO),
        ["bound to snd_hda_intel, not vfio-pci"]
    );
    // The same event again changes nothing.
    assert!(
        inv.apply_batch(&[event(DeviceAction::Bind, GPU)])
            .is_empty()
    );

    // The audio function too: the GPU and audio become ready.
    fs.rebind(AUDIO, "vfio-pci");
    let changes = inv.apply_batch(&[event(DeviceAction::Bind, AUDIO)]);
    assert_eq!(
        changed(&changes),
        [
            (
                AUDIO.to_owned(),
                vec!["Driver", "PassthroughReady", "PassthroughBlockers"]
            ),
            (BRIDGE.to_owned(), vec!["PassthroughBlockers"]),
            (
                GPU.to_owned(),
                vec!["PassthroughReady", "PassthroughBlockers"]
            ),
        ]
    );
    assert!(ready(&inv, GPU) && ready(&inv, AUDIO) && !ready(&inv, BRIDGE));
    assert_eq!(blockers(&inv, BRIDGE), [BRIDGE_BLOCKER]);

    // Unbound audio: the kernel still considers the group viable, so the
    // GPU stays ready; the audio function itself is not.
    fs.unbind(AUDIO);
    let changes = inv.apply_batch(&[event(DeviceAction::Unbind, AUDIO)]);
    assert_eq!(
        changed(&changes),
        [(
            AUDIO.to_owned(),
            vec!["Driver", "PassthroughReady", "PassthroughBlockers"]
        )]
    );
    assert!(ready(&inv, GPU));
    assert_eq!(blockers(&inv, AUDIO), [NO_DRIVER_BLOCKER]);

    // pci-stub on a group mate does not block either.
    fs.rebind(AUDIO, "pci-stub");
    inv.apply_batch(&[event(DeviceAction::Bind, AUDIO)]);
    assert!(ready(&inv, GPU));
    assert_eq!(blockers(&inv, AUDIO), ["bound to pci-stub, not vfio-pci"]);

    assert_eq!(
        inv.devices().cloned().collect::<Vec<_>>(),
        fresh(&fs, Vec::new())
    );
}

#[test]
fn adding_and_removing_a_device_updates_its_group_siblings() {
    let fs = gpu_group();
    let mut inv = inventory(&fs);
    inv.resync();

    // Hot-unplug the audio function: Removed, and the others' group lists
    // and blockers follow.
    fs.remove(AUDIO);
    let changes = inv.apply_batch(&[event(DeviceAction::Remove, AUDIO)]);
    assert_eq!(changes[0], InventoryChange::Removed(addr(AUDIO)));
    assert_eq!(
        changed(&changes[1..]),
        [
            (
                BRIDGE.to_owned(),
                vec!["IommuGroupDevices", "PassthroughBlockers"]
            ),
            (
                GPU.to_owned(),
                vec!["IommuGroupDevices", "PassthroughBlockers"]
            ),
        ]
    );
    assert_eq!(
        inv.get(&addr(GPU)).unwrap().iommu_group_devices,
        [BRIDGE, GPU]
    );
    assert!(
        inv.apply_batch(&[event(DeviceAction::Remove, AUDIO)])
            .is_empty()
    );
    // Events for devices that are not there change nothing.
    assert!(
        inv.apply_batch(&[event(DeviceAction::Change, AUDIO)])
            .is_empty()
    );
    assert!(
        inv.apply_batch(&[event(DeviceAction::Add, AUDIO)])
            .is_empty()
    );

    // Plug it back in.
    fs.add(AUDIO, 0x10de, 0x10f8, 0x040300)
        .driver("snd_hda_intel")
        .iommu_group(1);
    let changes = inv.apply_batch(&[event(DeviceAction::Add, AUDIO)]);
    let InventoryChange::Added(state) = &changes[0] else {
        panic!("{changes:?}")
    };
    assert_eq!(state.iommu_group_devices, [BRIDGE, GPU, AUDIO]);
    assert_eq!(changes.len(), 3);
    // An add for a known device is a re-read: nothing new.
    assert!(
        inv.apply_batch(&[event(DeviceAction::Add, AUDIO)])
            .is_empty()
    );

    // Move the GPU to its own group: both groups are recomputed.
    fs.set_iommu_group(GPU, Some(7));
    let changes = inv.apply_batch(&[event(DeviceAction::Change, GPU)]);
    assert_eq!(
        changed(&changes),
        [
            (
                GPU.to_owned(),
                vec!["IommuGroup", "IommuGroupDevices", "PassthroughBlockers"]
            ),
            (
                BRIDGE.to_owned(),
                vec!["IommuGroupDevices", "PassthroughBlockers"]
            ),
            (
                AUDIO.to_owned(),
                vec!["IommuGroupDevices", "PassthroughBlockers"]
            ),
        ]
    );
    assert_eq!(inv.get(&addr(GPU)).unwrap().iommu_group_devices, [GPU]);

    // No group at all.
    fs.set_iommu_group(GPU, None);
    inv.apply_batch(&[event(DeviceAction::Change, GPU)]);
    let gpu = inv.get(&addr(GPU)).unwrap();
    assert_eq!(api(gpu).iommu_group, -1);
    assert!(gpu.iommu_group_devices.is_empty());
    assert_eq!(
        gpu.passthrough_blockers,
        [NO_IOMMU_GROUP_BLOCKER, "bound to nvidia, not vfio-pci"]
    );
    assert_eq!(
        inv.devices().cloned().collect::<Vec<_>>(),
        fresh(&fs, Vec::new())
    );
}

#[test]
fn sriov_physical_and_virtual_functions() {
    let fs = FakeSysfs::new();
    let pf = "0000:03:00.0";
    let vf0 = "0000:03:10.0";
    let vf1 = "0000:03:10.2";
    fs.device(pf, 0x8086, 0x10fb, 0x020000)
        .driver("ixgbe")
        .iommu_group(10)
        .numa(1)
        .sriov(63, 2);
    fs.device(vf0, 0x8086, 0x10ed, 0x020000)
        .driver("vfio-pci")
        .iommu_group(11)
        .physfn(pf);
    fs.device(vf1, 0x8086, 0x10ed, 0x020000)
        .driver("ixgbevf")
        .iommu_group(12)
        .physfn(pf);
    let mut inv = Inventory::new(
        fs.root(),
        fs.udev_data_dir(),
        vec![AllowEntry::new("8086:10ed", "intel.com/82599_VF").unwrap()],
    );
    inv.resync();

    let p = inv.get(&addr(pf)).unwrap();
    assert_eq!(p.info.sriov_total_vfs, 63);
    assert_eq!(p.info.sriov_num_vfs, 2);
    assert_eq!(p.info.numa_node, Some(1));
    assert_eq!(api(p).physical_function, "");
    assert!(!p.permitted());
    assert_eq!(p.resource_name, None);
    assert!(!api(p).permitted);
    assert_eq!(api(p).resource_name, "");

    let v = inv.get(&addr(vf0)).unwrap();
    assert_eq!(v.info.physical_function, Some(addr(pf)));
    assert_eq!(api(v).physical_function, pf);
    assert_eq!(v.info.sriov_total_vfs, 0);
    assert!(v.permitted());
    assert_eq!(v.resource_name.as_deref(), Some("intel.com/82599_VF"));
    assert!(api(v).permitted);
    assert_eq!(api(v).resource_name, "intel.com/82599_VF");
    // Each VF in its own group: vf0 is ready, vf1 is not.
    assert!(v.passthrough_ready);
    assert!(v.passthrough_blockers.is_empty());
    assert_eq!(blockers(&inv, vf1), ["bound to ixgbevf, not vfio-pci"]);

    // Enabling more VFs changes exactly SriovNumVfs.
    fs.at(pf).sriov(63, 4);
    let changes = inv.apply_batch(&[event(DeviceAction::Change, pf)]);
    assert_eq!(changed(&changes), [(pf.to_owned(), vec!["SriovNumVfs"])]);

    // Allow-list reload.
    let changes = inv.set_allow_list(vec![AllowEntry::new("8086:*", "intel.com/any").unwrap()]);
    assert_eq!(
        changed(&changes),
        [
            (pf.to_owned(), vec!["Permitted", "ResourceName"]),
            (vf0.to_owned(), vec!["ResourceName"]),
            (vf1.to_owned(), vec!["ResourceName"]),
        ]
    );
}

/// Disabling VFs removes them, and the kernel sends no event for their PF:
/// the PF is re-read with the removals, so its SriovNumVfs follows in the
/// same batch (and again when VFs come back).
#[test]
fn removing_and_adding_vfs_rereads_their_pf() {
    let fs = FakeSysfs::new();
    let pf = "0000:03:00.0";
    let vfs = ["0000:03:10.0", "0000:03:10.2"];
    fs.device(pf, 0x8086, 0x10fb, 0x020000)
        .driver("ixgbe")
        .iommu_group(10)
        .sriov(63, 2);
    let add_vfs = || {
        for (i, vf) in vfs.iter().enumerate() {
            fs.add(vf, 0x8086, 0x10ed, 0x020000)
                .iommu_group(11 + i as u32)
                .physfn(pf);
        }
    };
    add_vfs();
    let mut inv = inventory(&fs);
    inv.resync();

    // echo 0 > sriov_numvfs: the VFs go, the PF's count drops, and only
    // the VFs' removals are announced.
    fs.at(pf).sriov(63, 0);
    for vf in vfs {
        fs.remove(vf);
    }
    let removals: Vec<DeviceEvent> = vfs
        .iter()
        .map(|vf| event(DeviceAction::Remove, vf))
        .collect();
    let changes = inv.apply_batch(&removals);
    let [
        InventoryChange::Removed(first),
        InventoryChange::Removed(second),
        pf_change,
    ] = changes.as_slice()
    else {
        panic!("expected two removals and the PF's change: {changes:#?}")
    };
    assert_eq!([*first, *second], [addr(vfs[0]), addr(vfs[1])]);
    assert_eq!(
        changed(std::slice::from_ref(pf_change)),
        [(pf.to_owned(), vec!["SriovNumVfs"])]
    );
    assert_eq!(inv.get(&addr(pf)).unwrap().info.sriov_num_vfs, 0);
    assert!(inv.apply_batch(&removals).is_empty());

    // echo 2 > sriov_numvfs, the PF's change event lost: the adds re-read it.
    fs.at(pf).sriov(63, 2);
    add_vfs();
    let adds: Vec<DeviceEvent> = vfs.iter().map(|vf| event(DeviceAction::Add, vf)).collect();
    let changes = inv.apply_batch(&adds);
    assert_eq!(changes.len(), 3, "{changes:#?}");
    assert!(matches!(
        &changes[..2],
        [InventoryChange::Added(_), InventoryChange::Added(_)]
    ));
    assert_eq!(
        changed(&changes[2..]),
        [(pf.to_owned(), vec!["SriovNumVfs"])]
    );
    assert_eq!(
        inv.devices().cloned().collect::<Vec<_>>(),
        fresh(&fs, Vec::new())
    );
}

#[test]
fn names_from_events_and_the_udev_database() {
    let fs = gpu_group();
    let mut inv = inventory(&fs);
    inv.resync();
    assert_eq!(inv.get(&addr(AUDIO)).unwrap().vendor_name, None);
    assert_eq!(api(inv.get(&addr(AUDIO)).unwrap()).vendor_name, "");

    let mut e = event(DeviceAction::Change, AUDIO);
    e.vendor_name = Some("NVIDIA Corporation".into());
    e.device_name = Some("TU104 HD Audio Controller".into());
    let changes = inv.apply_batch(&[e]);
    assert_eq!(
        changed(&changes),
        [(AUDIO.to_owned(), vec!["VendorName", "DeviceName"])]
    );
    // A kernel event (no names) and a resync without a udev database keep
    // the names the device already had.
    assert!(
        inv.apply_batch(&[event(DeviceAction::Change, AUDIO)])
            .is_empty()
    );
    assert!(inv.resync().is_empty());
    assert_eq!(
        inv.get(&addr(AUDIO)).unwrap().device_name.as_deref(),
        Some("TU104 HD Audio Controller")
    );
    // The database wins over what we had; an event wins over the database.
    fs.udev_names(AUDIO, "NVIDIA Corp.", "Audio");
    assert_eq!(
        changed(&inv.resync()),
        [(AUDIO.to_owned(), vec!["VendorName", "DeviceName"])]
    );
    let mut e = event(DeviceAction::Change, AUDIO);
    e.device_name = Some("Other".into());
    assert_eq!(
        changed(&inv.apply_batch(&[e])),
        [(AUDIO.to_owned(), vec!["DeviceName"])]
    );
}

#[test]
fn group_member_that_cannot_be_read_blocks() {
    let fs = gpu_group();
    // The kernel lists the audio function in group 1, but its class is junk.
    fs.write_attr(AUDIO, "class", b"\xff\xfe\n");
    let mut inv = inventory(&fs);
    inv.resync();
    assert!(inv.get(&addr(AUDIO)).is_none());
    fs.rebind(GPU, "vfio-pci");
    inv.apply_batch(&[event(DeviceAction::Bind, GPU)]);
    assert_eq!(
        inv.get(&addr(GPU)).unwrap().iommu_group_devices,
        [BRIDGE, GPU, AUDIO]
    );
    assert_eq!(
        blockers(&inv, GPU),
        ["0000:01:00.1 in the same IOMMU group could not be read"]
    );
    // Repaired, and a change event brings it in.
    fs.write_attr(AUDIO, "class", "0x040300\n");
    let changes = inv.apply_batch(&[event(DeviceAction::Change, AUDIO)]);
    assert!(matches!(changes[0], InventoryChange::Added(_)));
    assert_eq!(
        blockers(&inv, GPU),
        ["0000:01:00.1 in the same IOMMU group is bound to snd_hda_intel"]
    );
}

#[test]
fn hostile_sysfs_contents_never_panic() {
    let fs = FakeSysfs::new();
    let big = vec![b'1'; 10 * 1024 * 1024];
    let ok = |a: &str| fs.device(a, 0x1af4, 0x1000, 0x020000).iommu_group(3);

    // Required attributes broken: the device is skipped.
    ok("0000:00:01.0");
    fs.write_attr("0000:00:01.0", "vendor", &big);
    ok("0000:00:02.0");
    fs.write_attr("0000:00:02.0", "class", b"0x03\xc3\x28000\n");
    ok("0000:00:03.0");
    fs.remove_attr("0000:00:03.0", "device");
    ok("0000:00:04.0");
    fs.write_attr("0000:00:04.0", "vendor", "0x1af4 extra\n");
    ok("0000:00:05.0");
    let vendor = fs.device_dir("0000:00:05.0").join("vendor");
    fs::remove_file(&vendor).unwrap();
    // An endless file behind a symlink: not followed.
    symlink("/dev/zero", &vendor).unwrap();
    ok("0000:00:06.0");
    let vendor = fs.device_dir("0000:00:06.0").join("vendor");
    fs::remove_file(&vendor).unwrap();
    let c = std::ffi::CString::new(vendor.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path. A FIFO would block a naive open.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    ok("0000:00:07.0");
    fs.remove_attr("0000:00:07.0", "class");
    fs::create_dir(fs.device_dir("0000:00:07.0").join("class")).unwrap();

    // Optional attributes broken: the device is there with defaults.
    ok("0000:00:08.0");
    fs.write_attr("0000:00:08.0", "numa_node", &big);
    fs.write_attr("0000:00:08.0", "sriov_totalvfs", "lots\n");
    fs.write_attr("0000:00:08.0", "modalias", b"pci:\xff\xff\n");
    fs.write_attr("0000:00:08.0", "subsystem_vendor", "");
    fs.remove_attr("0000:00:08.0", "driver_override");
    fs::create_dir(fs.device_dir("0000:00:08.0").join("driver_override")).unwrap();
    // A driver link whose target does not exist still names the driver.
    ok("0000:00:09.0");
    symlink(
        "../../../bus/pci/drivers/ghost",
        fs.device_dir("0000:00:09.0").join("driver"),
    )
    .unwrap();
    // Dangling iommu_group link: the group number is still known.
    fs.device("0000:00:0a.0", 0x1af4, 0x1000, 0x020000);
    symlink(
        "../../../kernel/iommu_groups/42",
        fs.device_dir("0000:00:0a.0").join("iommu_group"),
    )
    .unwrap();
    // Junk link names.
    fs.device("0000:00:0b.0", 0x1af4, 0x1000, 0x020000);
    symlink(
        "../../../kernel/iommu_groups/abc",
        fs.device_dir("0000:00:0b.0").join("iommu_group"),
    )
    .unwrap();
    symlink("../zzzz", fs.device_dir("0000:00:0b.0").join("physfn")).unwrap();
    symlink("/", fs.device_dir("0000:00:0b.0").join("driver")).unwrap();
    // A device whose directory vanished: only its bus link is left.
    ok("0000:00:0c.0");
    fs::remove_dir_all(fs.device_dir("0000:00:0c.0")).unwrap();
    // Entries that are not addresses.
    fs::create_dir(fs.root().join("bus/pci/devices/garbage")).unwrap();
    fs::create_dir(fs.root().join("bus/pci/devices/0000:00:0d.0x")).unwrap();
    fs::create_dir(fs.root().join("bus/pci/devices/0000:00:20.0")).unwrap();
    // A hostile udev database entry.
    fs::write(fs.udev_data_dir().join("+pci:0000:00:08.0"), &big).unwrap();
    fs::write(
        fs.udev_data_dir().join("+pci:0000:00:09.0"),
        b"E:ID_VENDOR_FROM_DATABASE=Red \xffHat\nE:ID_MODEL_FROM_DATABASE=\n",
    )
    .unwrap();

    let found: Vec<String> = sysfs::enumerate(&fs.root())
        .unwrap()
        .iter()
        .map(|d| d.address.to_string())
        .collect();
    assert_eq!(
        found,
        [
            "0000:00:08.0",
            "0000:00:09.0",
            "0000:00:0a.0",
            "0000:00:0b.0"
        ]
    );
    assert!(matches!(
        sysfs::read_device(&fs.root(), &addr("0000:00:0c.0")),
        Err(SysfsError::Gone(_))
    ));
    assert!(matches!(
        sysfs::read_device(&fs.root(), &addr("0000:00:1e.0")),
        Err(SysfsError::Gone(_))
    ));
    assert!(matches!(
        sysfs::read_device(&fs.root(), &addr("0000:00:01.0")),
        Err(SysfsError::Attribute {
            attribute: "vendor",
            ..
        })
    ));

    let mut inv = inventory(&fs);
    inv.resync();
    let d8 = inv.get(&addr("0000:00:08.0")).unwrap();
    assert_eq!(d8.info.numa_node, None);
    assert_eq!(api(d8).numa_node, -1);
    assert_eq!(d8.info.sriov_total_vfs, 0);
    assert_eq!(d8.info.modalias, "");
    assert_eq!(d8.info.subsystem_vendor_id, 0);
    assert_eq!(d8.info.driver_override, None);
    assert_eq!(d8.vendor_name, None);
    let d9 = inv.get(&addr("0000:00:09.0")).unwrap();
    assert_eq!(d9.info.driver.as_deref(), Some("ghost"));
    assert_eq!(d9.vendor_name.as_deref(), Some("Red \u{fffd}Hat"));
    assert_eq!(d9.device_name, None);
    assert_eq!(api(d9).device_name, "");
    let da = inv.get(&addr("0000:00:0a.0")).unwrap();
    assert_eq!(da.info.iommu_group, Some(42));
    assert_eq!(da.iommu_group_devices, ["0000:00:0a.0"]);
    let db = inv.get(&addr("0000:00:0b.0")).unwrap();
    assert_eq!(db.info.iommu_group, None);
    assert_eq!(db.info.physical_function, None);
    assert_eq!(db.info.driver, None);

    // Events for the broken ones are harmless too.
    for a in [
        "0000:00:01.0",
        "0000:00:06.0",
        "0000:00:0c.0",
        "0000:00:1e.0",
    ] {
        for action in [DeviceAction::Add, DeviceAction::Change, DeviceAction::Bind] {
            assert!(inv.apply_batch(&[event(action, a)]).is_empty());
        }
    }
    // A device disappearing under a change event is removed; its group
    // mate now counts it as unreadable (the group still lists it).
    fs::remove_dir_all(fs.device_dir("0000:00:08.0")).unwrap();
    let changes = inv.apply_batch(&[event(DeviceAction::Change, "0000:00:08.0")]);
    assert_eq!(changes[0], InventoryChange::Removed(addr("0000:00:08.0")));
    assert_eq!(
        changed(&changes[1..]),
        [("0000:00:09.0".to_owned(), vec!["PassthroughBlockers"])]
    );
    assert!(
        blockers(&inv, "0000:00:09.0")
            .contains(&"0000:00:08.0 in the same IOMMU group could not be read".to_owned())
    );
}

#[test]
fn a_tree_without_a_pci_bus_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    assert!(sysfs::enumerate(dir.path()).unwrap().is_empty());
    let mut inv = Inventory::new(dir.path(), dir.path(), Vec::new());
    assert!(inv.resync().is_empty());
    assert!(inv.resync().is_empty());
}

/// This machine's real /sys, read-only.
#[test]
fn the_real_sys_lists_every_pci_device() {
    let root = Path::new("/sys");
    let mut listed: Vec<PciAddress> = match fs::read_dir(root.join("bus/pci/devices")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    assert!(
        !listed.is_empty(),
        "this test needs a host with PCI devices: /sys/bus/pci/devices is empty"
    );
    listed.sort();
    let found: Vec<PciAddress> = sysfs::enumerate(root)
        .unwrap()
        .iter()
        .map(|d| d.address)
        .collect();
    assert_eq!(found, listed);

    let mut inv = Inventory::new(root, "/run/udev/data", Vec::new());
    let changes = inv.resync();
    assert_eq!(changes.len(), listed.len());
    for state in inv.devices() {
        let dir = root
            .join("bus/pci/devices")
            .join(state.info.address.to_string());
        let vendor = fs::read_to_string(dir.join("vendor")).unwrap();
        assert_eq!(vendor.trim(), format!("0x{:04x}", state.info.vendor_id));
        let driver = fs::read_link(dir.join("driver"))
            .ok()
            .map(|t| t.file_name().unwrap().to_str().unwrap().to_owned());
        assert_eq!(state.info.driver, driver);
        assert_eq!(
            state.passthrough_ready,
            state.passthrough_blockers.is_empty()
        );
    }
    // Nothing changed in between: a second resync reports nothing.
    assert!(inv.resync().is_empty());
}

// ---------------------------------------------------------------------------
// Property test

/// The slots of the small tree: (address, vendor, device, class).
const SLOTS: [(&str, u16, u16, u32); 8] = [
    ("0000:00:01.0", 0x8086, 0x1901, 0x060400), // root port (bridge)
    ("0000:00:1c.0", 0x8086, 0xa110, 0x060400), // root port (bridge)
    ("0000:00:1f.3", 0x8086, 0xa170, 0x040300),
    ("0000:01:00.0", 0x10de, 0x1eb8, 0x030000),
    ("0000:01:00.1", 0x10de, 0x10f8, 0x040300),
    ("0000:02:00.0", 0x8086, 0x10fb, 0x020000),
    ("0000:02:10.0", 0x8086, 0x10ed, 0x020000),
    ("0000:03:00.0", 0x144d, 0xa808, 0x010802),
];
const DRIVERS: [&str; 5] = ["vfio-pci", "snd_hda_intel", "pcieport", "pci-stub", "nvme"];

#[derive(Debug, Clone)]
enum Op {
    Add {
        slot: usize,
        group: Option<u32>,
        driver: Option<usize>,
    },
    Remove {
        slot: usize,
    },
    Change {
        slot: usize,
        numa: i32,
        num_vfs: u32,
        group: Option<Option<u32>>,
        rename: Option<u8>,
    },
    Bind {
        slot: usize,
        driver: usize,
    },
    Unbind {
        slot: usize,
    },
}

#[derive(Debug, Clone, Copy)]
enum Delivery {
    Once,
    Twice,
    Lost,
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS.len();
    let group = proptest::option::weighted(0.85, 0..3u32);
    prop_oneof![
        (
            slot.clone(),
            group.clone(),
            proptest::option::of(0..DRIVERS.len())
        )
            .prop_map(|(slot, group, driver)| Op::Add {
                slot,
                group,
                driver
            }),
        slot.clone().prop_map(|slot| Op::Remove { slot }),
        (
            slot.clone(),
            -1..2i32,
            0..3u32,
            proptest::option::weighted(0.2, group),
            proptest::option::weighted(0.3, 0..3u8)
        )
            .prop_map(|(slot, numa, num_vfs, group, rename)| Op::Change {
                slot,
                numa,
                num_vfs,
                group,
                rename
            }),
        (slot.clone(), 0..DRIVERS.len()).prop_map(|(slot, driver)| Op::Bind { slot, driver }),
        slot.prop_map(|slot| Op::Unbind { slot }),
    ]
}

fn delivery() -> impl Strategy<Value = Delivery> {
    prop_oneof![
        7 => Just(Delivery::Once),
        2 => Just(Delivery::Twice),
        1 => Just(Delivery::Lost),
    ]
}

/// Changes the tree; returns the event the kernel would send.
fn mutate(fs: &FakeSysfs, op: &Op) -> DeviceEvent {
    let present = |slot: usize| fs.device_dir(SLOTS[slot].0).is_dir();
    let (action, slot) = match *op {
        Op::Add {
            slot,
            group,
            driver,
        } => {
            if !present(slot) {
                let (a, v, d, c) = SLOTS[slot];
                let dev = fs.add(a, v, d, c);
                let dev = match group {
                    Some(g) => dev.iommu_group(g),
                    None => dev,
                };
                if let Some(driver) = driver {
                    dev.driver(DRIVERS[driver]);
                }
            }
            (DeviceAction::Add, slot)
        }
        Op::Remove { slot } => {
            fs.remove(SLOTS[slot].0);
            (DeviceAction::Remove, slot)
        }
        Op::Change {
            slot,
            numa,
            num_vfs,
            group,
            rename,
        } => {
            if present(slot) {
                let dev = fs.at(SLOTS[slot].0).numa(numa).sriov(4, num_vfs);
                if let Some(group) = group {
                    fs.set_iommu_group(SLOTS[slot].0, group);
                }
                // Names are only ever replaced: once known they are kept
                // when the database has none (see the inventory docs).
                if let Some(n) = rename {
                    dev.names(&format!("Vendor {n}"), &format!("Model {n}"));
                }
            }
            (DeviceAction::Change, slot)
        }
        Op::Bind { slot, driver } => {
            if present(slot) {
                fs.rebind(SLOTS[slot].0, DRIVERS[driver]);
            }
            (DeviceAction::Bind, slot)
        }
        Op::Unbind { slot } => {
            if present(slot) {
                fs.unbind(SLOTS[slot].0);
            }
            (DeviceAction::Unbind, slot)
        }
    };
    let address = addr(SLOTS[slot].0);
    // Events through udevd carry the database's names, kernel ones none.
    let (vendor_name, device_name) = if slot % 2 == 0 {
        sysfs::udev_names(&fs.udev_data_dir(), &address)
    } else {
        (None, None)
    };
    DeviceEvent {
        action,
        address,
        vendor_name,
        device_name,
    }
}

type Mirror = BTreeMap<PciAddress, BTreeMap<&'static str, OwnedVariant>>;

/// The tree with the `initial` (slot, IOMMU group) devices, its allow-list,
/// an inventory enumerated from it and what that published.
fn start_tree(
    initial: &[(usize, Option<u32>)],
) -> Result<(FakeSysfs, Vec<AllowEntry>, Inventory, Mirror), TestCaseError> {
    let fs = FakeSysfs::new();
    for &(slot, group) in initial {
        let (a, v, d, c) = SLOTS[slot];
        let dev = fs.device(a, v, d, c);
        if let Some(g) = group {
            dev.iommu_group(g);
        }
    }
    let allow = vec![AllowEntry::new("10de:*", "nvidia.com/gpu").unwrap()];
    let mut inv = Inventory::new(fs.root(), fs.udev_data_dir(), allow.clone());
    let mut mirror = Mirror::new();
    publish(&mut mirror, inv.resync())?;
    Ok((fs, allow, inv, mirror))
}

fn values(state: &DeviceState) -> BTreeMap<&'static str, OwnedVariant> {
    api(state).to_entries().into_iter().collect()
}

/// What a D-Bus client would see: applies changes, checking that each
/// `Changed` lists exactly properties whose values differ.
fn publish(mirror: &mut Mirror, changes: Vec<InventoryChange>) -> Result<(), TestCaseError> {
    for change in changes {
        match change {
            InventoryChange::Added(state) => {
                let old = mirror.insert(state.info.address, values(&state));
                prop_assert!(old.is_none(), "added twice: {}", state.info.address);
            }
            InventoryChange::Removed(a) => {
                prop_assert!(mirror.remove(&a).is_some(), "removed unknown {a}");
            }
            InventoryChange::Changed { old, new } => {
                prop_assert_ne!(&*old, &new);
                let seen = mirror.get_mut(&new.info.address);
                prop_assert!(seen.is_some(), "changed unknown {}", new.info.address);
                let seen = seen.unwrap();
                prop_assert_eq!(&*seen, &values(&old), "old is not what was published");
                for (p, value) in device_properties::changed(&old, &new) {
                    prop_assert_ne!(&seen[p], &value, "{:?} did not change", p);
                    seen.insert(p, value);
                }
            }
        }
    }
    Ok(())
}

fn check_mirror(mirror: &Mirror, inv: &Inventory) -> Result<(), TestCaseError> {
    let expected: Mirror = inv.devices().map(|s| (s.info.address, values(s))).collect();
    prop_assert_eq!(mirror, &expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn events_end_where_a_fresh_enumeration_starts(
        initial in proptest::collection::vec((0..SLOTS.len(), proptest::option::of(0..3u32)), 0..6),
        steps in proptest::collection::vec((op(), delivery()), 1..40),
    ) {
        let (fs, allow, mut inv, mut mirror) = start_tree(&initial)?;
        check_mirror(&mirror, &inv)?;

        let mut lost = false;
        for (op, delivery) in &steps {
            let event = mutate(&fs, op);
            match delivery {
                Delivery::Lost => {
                    lost = true;
                    continue;
                }
                Delivery::Once => publish(&mut mirror, inv.apply_batch(std::slice::from_ref(&event)))?,
                Delivery::Twice => {
                    publish(&mut mirror, inv.apply_batch(std::slice::from_ref(&event)))?;
                    // Only a lost event can leave something to repair.
                    let again = inv.apply_batch(std::slice::from_ref(&event));
                    prop_assert!(lost || again.is_empty(), "{:?}", again);
                    publish(&mut mirror, again)?;
                }
            }
            check_mirror(&mirror, &inv)?;
            if lost {
                publish(&mut mirror, inv.resync())?;
                check_mirror(&mirror, &inv)?;
                lost = false;
            }
        }
        if lost {
            publish(&mut mirror, inv.resync())?;
        }
        let got: Vec<DeviceState> = inv.devices().cloned().collect();
        prop_assert_eq!(&got, &fresh(&fs, allow));
        check_mirror(&mirror, &inv)?;
        prop_assert!(inv.resync().is_empty());
    }

    /// The same with the events that arrive together applied as one batch
    /// (`apply_batch`, as the service does): at most one change per device
    /// per batch, each against what was published, and the same end. A
    /// batch without lost events leaves nothing for a resync to repair.
    #[test]
    fn batches_end_where_a_fresh_enumeration_starts(
        initial in proptest::collection::vec((0..SLOTS.len(), proptest::option::of(0..3u32)), 0..6),
        batches in proptest::collection::vec(
            proptest::collection::vec((op(), delivery()), 1..10),
            1..12,
        ),
    ) {
        let (fs, allow, mut inv, mut mirror) = start_tree(&initial)?;

        for batch in &batches {
            let mut events = Vec::new();
            let mut lost = false;
            for (op, delivery) in batch {
                let event = mutate(&fs, op);
                match delivery {
                    Delivery::Lost => lost = true,
                    Delivery::Once => events.push(event),
                    Delivery::Twice => events.extend([event.clone(), event]),
                }
            }
            let changes = inv.apply_batch(&events);
            let mut changed = BTreeSet::new();
            for change in &changes {
                let address = match change {
                    InventoryChange::Added(state) => state.info.address,
                    InventoryChange::Removed(address) => *address,
                    InventoryChange::Changed { new, .. } => new.info.address,
                };
                prop_assert!(changed.insert(address), "{} changed twice: {:?}", address, changes);
            }
            publish(&mut mirror, changes)?;
            check_mirror(&mirror, &inv)?;
            let repaired = inv.resync();
            prop_assert!(lost || repaired.is_empty(), "{:?}", repaired);
            publish(&mut mirror, repaired)?;
            check_mirror(&mirror, &inv)?;
        }
        let got: Vec<DeviceState> = inv.devices().cloned().collect();
        prop_assert_eq!(&got, &fresh(&fs, allow));
    }
}

/// A device on a vfio-pci variant driver (`mlx5_vfio_pci`) is ready for
/// passthrough, and a group member on one does not block its siblings —
/// the same rule Detach and Reattach use (`vfio::is_vfio_driver`).
#[test]
fn a_device_on_a_vfio_variant_driver_is_ready_and_blocks_no_sibling() {
    let fs = FakeSysfs::new();
    let (nic, sibling) = ("0000:05:00.0", "0000:05:00.1");
    fs.device(nic, 0x15b3, 0x101d, 0x020000)
        .driver("mlx5_vfio_pci")
        .iommu_group(21);
    fs.device(sibling, 0x15b3, 0x101d, 0x020000)
        .driver("vfio-pci")
        .iommu_group(21);
    let mut inv = inventory(&fs);
    inv.resync();
    for a in [nic, sibling] {
        assert!(ready(&inv, a), "{a}: {:?}", blockers(&inv, a));
        assert!(blockers(&inv, a).is_empty(), "{a}");
    }
}
