//! The device table: every PCI device with its passthrough readiness, kept
//! current from events and resyncs, reporting exactly which devices changed
//! (the D-Bus layer, `service::device_properties`, turns that into
//! properties).
//!
//! # Passthrough readiness
//! Follows the kernel's VFIO "viable group" rule, so `PassthroughReady`
//! means "QEMU could open this group now":
//! - the device needs an IOMMU group;
//! - the device itself must be bound to vfio-pci (or a vfio-pci variant
//!   driver such as `mlx5_vfio_pci`: [`is_vfio_driver`], the rule Detach
//!   and Reattach follow too); a bridge is never ready, because
//!   vfio-pci refuses bridges;
//! - every *other* device in the group must be bound to a vfio driver, be
//!   bound to `pci-stub`, have no driver at all, or be a PCI-to-PCI/CardBus
//!   bridge (any driver, e.g. pcieport). Host bridges are not excepted —
//!   the kernel does not except them either.
//!
//! A group member the kernel lists but that could not be read blocks too:
//! we cannot tell it is harmless.
//!
//! With `pcie_acs_override=` on the kernel command line (read once, from
//! `<proc root>/cmdline`, see [`Inventory::with_proc_root`]) the kernel
//! builds IOMMU groups as if devices were isolated that may not be: every
//! device with a group gets [`acs_override_blocker`]. It blocks readiness
//! rather than being a note beside it: `PassthroughReady` is this service
//! vouching that the group is what isolates the device, which it then
//! cannot, and `PassthroughBlockers` is documented as the reasons a device
//! is not ready (a note that does not block would need a property of its
//! own). QEMU can still open the group; the user sees why it is not
//! vouched for.
//!
//! Blockers are in a fixed order: the device's own (group, bridge, driver),
//! the ACS override, then one per blocking group member in address order.
//!
//! # Names
//! Vendor/device names come from the udev event when it carries them, else
//! from udevd's database, else the previous names are kept (a kernel-only
//! event carries none, but the device did not change its name), else — with
//! [`Inventory::with_hwdb`] — from the udev hwdb, as udevd would have found
//! them (no udevd, no coldplug, a container): looked up once per modalias.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::hwdb::Hwdb;
use super::sysfs::{self, PciDeviceInfo, SysfsError};
use super::vfio::{VFIO_DRIVER, is_vfio_driver};
use super::{DeviceAction, DeviceEvent};
use crate::kernel_files::{self, AtLimit};
use vmmanager_client::PciAddress;

/// The stub driver the kernel accepts in a viable group.
pub const PCI_STUB_DRIVER: &str = "pci-stub";
pub const NO_IOMMU_GROUP_BLOCKER: &str =
    "no IOMMU group (is the IOMMU enabled? intel_iommu=on / amd_iommu=on)";
pub const BRIDGE_BLOCKER: &str = "is a PCI bridge; bridges cannot be passed through";
pub const NO_DRIVER_BLOCKER: &str = "not bound to any driver, not vfio-pci";
/// The kernel's own bound is 2048 bytes on x86 (4096 on some arches).
const MAX_CMDLINE_BYTES: u64 = 16 * 1024;

/// The blocker of every device with an IOMMU group when the kernel command
/// line has `pcie_acs_override=VALUE` (see the module docs).
pub fn acs_override_blocker(value: &str) -> String {
    format!(
        "isolation weakened: the kernel command line has pcie_acs_override={value}, \
         so IOMMU groups may not reflect real isolation"
    )
}

/// The value of the last `pcie_acs_override=` on a kernel command line
/// (`-` and `_` alike in the name, as the kernel reads it); words after
/// `--` are init's, not the kernel's.
fn acs_override(cmdline: &str) -> Option<&str> {
    cmdline
        .split_ascii_whitespace()
        .take_while(|word| *word != "--")
        .filter_map(|word| {
            let (name, value) = word.split_once('=')?;
            (name.replace('-', "_") == "pcie_acs_override").then_some(value)
        })
        .last()
}

/// [`acs_override_blocker`] for the command line in `<proc_root>/cmdline`;
/// `None` when it has no `pcie_acs_override=` or cannot be read (logged:
/// under the unit's ProcSubset=pid it is not visible).
fn read_acs_override_blocker(proc_root: &Path) -> Option<String> {
    let path = proc_root.join("cmdline");
    match kernel_files::read_bounded(&path, MAX_CMDLINE_BYTES, AtLimit::Refuse) {
        Ok(bytes) => acs_override(&String::from_utf8_lossy(&bytes)).map(acs_override_blocker),
        Err(e) => {
            tracing::warn!(
                "cannot tell whether the kernel command line has pcie_acs_override= \
                 (readiness does not say it): {}: {e}",
                path.display()
            );
            None
        }
    }
}

/// One allow-list entry: devices that may be passed through, with the
/// resource name reported for them (KubeVirt's `permittedHostDevices`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    pub vendor_id: u16,
    /// `None`: any device of that vendor.
    pub device_id: Option<u16>,
    pub resource_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a device selector (expected vendor:device in hex, e.g. 10de:1eb8, or 10de:*): {0:?}")]
pub struct SelectorError(pub String);

fn hex4(s: &str) -> Option<u16> {
    if s.len() != 4 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(s, 16).ok()
}

impl AllowEntry {
    /// `selector` is `vvvv:dddd` or `vvvv:*` (4 hex digits each, any case).
    pub fn new(selector: &str, resource_name: impl Into<String>) -> Result<Self, SelectorError> {
        let err = || SelectorError(selector.to_owned());
        let (vendor, device) = selector.split_once(':').ok_or_else(err)?;
        let vendor_id = hex4(vendor).ok_or_else(err)?;
        let device_id = match device {
            "*" => None,
            d => Some(hex4(d).ok_or_else(err)?),
        };
        Ok(AllowEntry {
            vendor_id,
            device_id,
            resource_name: resource_name.into(),
        })
    }

    pub fn matches(&self, vendor_id: u16, device_id: u16) -> bool {
        self.vendor_id == vendor_id && self.device_id.is_none_or(|d| d == device_id)
    }
}

/// The entry for a device: an exact `vendor:device` entry wins over a
/// `vendor:*` one; among equals, the first in the list.
fn allow_entry(list: &[AllowEntry], vendor_id: u16, device_id: u16) -> Option<&AllowEntry> {
    list.iter()
        .find(|e| e.device_id.is_some() && e.matches(vendor_id, device_id))
        .or_else(|| list.iter().find(|e| e.matches(vendor_id, device_id)))
}

/// One device as the inventory knows it: what sysfs says plus names,
/// allow-list and group-derived readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub info: PciDeviceInfo,
    /// From the udev hwdb; `None` when unknown.
    pub vendor_name: Option<String>,
    /// From the udev hwdb; `None` when unknown.
    pub device_name: Option<String>,
    /// Addresses of every device in the IOMMU group (this one included),
    /// sorted; empty without a group.
    pub iommu_group_devices: Vec<String>,
    /// The matching allow-list entry's resource name; `None` when no entry
    /// matches, i.e. the device is not [`permitted`](Self::permitted).
    pub resource_name: Option<String>,
    pub passthrough_ready: bool,
    pub passthrough_blockers: Vec<String>,
}

impl DeviceState {
    /// Matches the allow-list.
    pub fn permitted(&self) -> bool {
        self.resource_name.is_some()
    }
}

/// One difference for the D-Bus layer to publish; it decides which of its
/// properties that changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InventoryChange {
    Added(DeviceState),
    Removed(PciAddress),
    /// `old != new`: something about the device changed (`old` boxed to
    /// keep the variants of similar size).
    Changed {
        old: Box<DeviceState>,
        new: DeviceState,
    },
}

/// The device table. Single owner; not shared, so no locking here.
#[derive(Debug)]
pub struct Inventory {
    sysfs_root: PathBuf,
    udev_data_dir: PathBuf,
    allow_list: Vec<AllowEntry>,
    devices: BTreeMap<PciAddress, DeviceState>,
    /// Names for devices that have none otherwise; `None`: not looked up.
    hwdb: Option<Hwdb>,
    /// Blocks every device with a group (see the module docs); read once.
    acs_override_blocker: Option<String>,
}

impl Inventory {
    /// An empty table; call [`resync`](Self::resync) to fill it (after
    /// subscribing to events, so nothing is missed).
    pub fn new(
        sysfs_root: impl Into<PathBuf>,
        udev_data_dir: impl Into<PathBuf>,
        allow_list: Vec<AllowEntry>,
    ) -> Self {
        Inventory {
            sysfs_root: sysfs_root.into(),
            udev_data_dir: udev_data_dir.into(),
            allow_list,
            devices: BTreeMap::new(),
            hwdb: None,
            acs_override_blocker: None,
        }
    }

    /// Reads the kernel command line from `<proc_root>/cmdline`, once, for
    /// `pcie_acs_override=` (see the module docs). Without this call the
    /// inventory assumes the groups are real (a prepared tree's tests).
    pub fn with_proc_root(mut self, proc_root: &Path) -> Self {
        self.acs_override_blocker = read_acs_override_blocker(proc_root);
        self
    }

    /// Also looks names up in this machine's udev hwdb when the event,
    /// udevd's database and the device's previous state have none (not for
    /// a prepared tree, whose ids are not this machine's devices).
    pub fn with_hwdb(mut self) -> Self {
        self.hwdb = Some(Hwdb::default());
        self
    }

    pub fn sysfs_root(&self) -> &Path {
        &self.sysfs_root
    }

    pub fn get(&self, address: &PciAddress) -> Option<&DeviceState> {
        self.devices.get(address)
    }

    /// All devices, in address order.
    pub fn devices(&self) -> impl ExactSizeIterator<Item = &DeviceState> + '_ {
        self.devices.values()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Re-reads every device and reports the differences (in address
    /// order). When the PCI device directory cannot be listed at all, the
    /// table is kept as it is.
    pub fn resync(&mut self) -> Vec<InventoryChange> {
        let infos = match sysfs::enumerate(&self.sysfs_root) {
            Ok(infos) => infos,
            Err(e) => {
                tracing::warn!("cannot enumerate PCI devices, keeping the current table: {e}");
                return Vec::new();
            }
        };
        let old = std::mem::take(&mut self.devices);
        for info in infos {
            let previous = old.get(&info.address);
            let state = self.base_state(info, None, None, previous);
            self.devices.insert(state.info.address, state);
        }
        let groups: BTreeSet<u32> = self
            .devices
            .values()
            .filter_map(|s| s.info.iommu_group)
            .collect();
        for group in groups {
            self.recompute_group(group);
        }
        let ungrouped: Vec<PciAddress> = self
            .devices
            .values()
            .filter(|s| s.info.iommu_group.is_none())
            .map(|s| s.info.address)
            .collect();
        for address in ungrouped {
            self.recompute_alone(&address);
        }

        self.release_hwdb();
        let addresses: BTreeSet<PciAddress> =
            old.keys().chain(self.devices.keys()).copied().collect();
        addresses
            .into_iter()
            .filter_map(|a| diff(a, old.get(&a), self.devices.get(&a)))
            .collect()
    }

    /// Applies events that arrived together as one step: each device they
    /// name is re-read once (the tree is the truth, so reading it again per
    /// event would find the same; a `remove` drops it), and the
    /// group-derived properties of every device in each affected old and
    /// new IOMMU group are recomputed once. Per device, its last event
    /// decides whether it is dropped or re-read, and the latest names an
    /// event carried win. Reports one net change per device: the named
    /// devices first, in the order of their first event, then their group
    /// mates in address order. Idempotent: the outcome depends only on the
    /// tree, so a repeated step reports nothing. The physical function of
    /// a VF that was added or removed is re-read too, as if named after the
    /// others (the kernel sends no event for it when VFs are disabled). A
    /// removal followed by a re-addition nets out to at most a change:
    /// callers that must show both pass them in separate steps.
    pub fn apply_batch(&mut self, events: &[DeviceEvent]) -> Vec<InventoryChange> {
        let mut named: Vec<NamedDevice<'_>> = Vec::new();
        let mut index: HashMap<PciAddress, usize> = HashMap::new();
        for event in events {
            match index.get(&event.address) {
                Some(&i) => named[i].merge(event),
                None => {
                    index.insert(event.address, named.len());
                    named.push(NamedDevice::new(event));
                }
            }
        }
        let mut infos: Vec<Option<PciDeviceInfo>> = named
            .iter()
            .map(|device| self.read(device.address, device.action))
            .collect();
        // A PF's SriovNumVfs follows its VFs, but the kernel sends nothing
        // for the PF when VFs are disabled: re-read the PF of every VF that
        // came or went. A removed VF's directory is gone, so its PF is the
        // one remembered from its last read.
        let parents: BTreeSet<PciAddress> = named
            .iter()
            .zip(&infos)
            .filter_map(|(device, info)| {
                let old = self.devices.get(&device.address).map(|s| &s.info);
                match (old, info) {
                    (Some(old), None) => old.physical_function,
                    (None, Some(new)) => new.physical_function,
                    _ => None,
                }
            })
            .filter(|pf| !index.contains_key(pf))
            .collect();
        for pf in parents {
            index.insert(pf, named.len());
            let parent = NamedDevice::parent(pf);
            infos.push(self.read(pf, parent.action));
            named.push(parent);
        }

        let old_groups = named
            .iter()
            .filter_map(|d| self.devices.get(&d.address)?.info.iommu_group);
        let new_groups = infos.iter().flatten().filter_map(|info| info.iommu_group);
        let groups: BTreeSet<u32> = old_groups.chain(new_groups).collect();
        let is_named = |a: &PciAddress| index.contains_key(a);
        // Everything that may change, as it was.
        let before: BTreeMap<PciAddress, DeviceState> = self
            .devices
            .iter()
            .filter(|(a, s)| is_named(a) || s.info.iommu_group.is_some_and(|g| groups.contains(&g)))
            .map(|(a, s)| (*a, s.clone()))
            .collect();

        for (device, info) in named.iter().zip(infos) {
            match info {
                None => {
                    self.devices.remove(&device.address);
                }
                Some(info) => {
                    let state = self.base_state(
                        info,
                        device.vendor_name,
                        device.device_name,
                        before.get(&device.address),
                    );
                    self.devices.insert(device.address, state);
                }
            }
        }
        for &group in &groups {
            self.recompute_group(group);
        }
        for device in &named {
            if self
                .devices
                .get(&device.address)
                .is_some_and(|s| s.info.iommu_group.is_none())
            {
                self.recompute_alone(&device.address);
            }
        }

        self.release_hwdb();
        let own = named.iter().filter_map(|d| {
            diff(
                d.address,
                before.get(&d.address),
                self.devices.get(&d.address),
            )
        });
        let mates = before
            .iter()
            .filter(|(a, _)| !is_named(a))
            .filter_map(|(a, old)| diff(*a, Some(old), self.devices.get(a)));
        own.chain(mates).collect()
    }

    /// Done with names for this pass: see [`Hwdb::release`].
    fn release_hwdb(&mut self) {
        if let Some(hwdb) = &mut self.hwdb {
            hwdb.release();
        }
    }

    /// What sysfs says about the device now; `None` after a `remove` or
    /// when it is gone or unreadable.
    fn read(&self, address: PciAddress, action: &DeviceAction) -> Option<PciDeviceInfo> {
        match action {
            DeviceAction::Remove => None,
            // add (also for a known device), change, bind, unbind, others:
            // the tree is the truth.
            _ => match sysfs::read_device(&self.sysfs_root, &address) {
                Ok(info) => Some(info),
                Err(SysfsError::Gone(_)) => None,
                Err(e) => {
                    // Enumeration skips such a device too; stay consistent.
                    tracing::warn!("dropping PCI device after {action:?}: {e}");
                    None
                }
            },
        }
    }

    /// Replaces the allow-list (configuration reload) and reports the
    /// devices whose `Permitted`/`ResourceName` changed.
    pub fn set_allow_list(&mut self, allow_list: Vec<AllowEntry>) -> Vec<InventoryChange> {
        self.allow_list = allow_list;
        let mut changes = Vec::new();
        for state in self.devices.values_mut() {
            let old = state.clone();
            state.resource_name = resource_name(&self.allow_list, &state.info);
            changes.extend(diff(state.info.address, Some(&old), Some(state)));
        }
        changes
    }

    /// A state with everything but the group-derived fields, which
    /// `recompute_*` fill in.
    fn base_state(
        &mut self,
        info: PciDeviceInfo,
        event_vendor: Option<&str>,
        event_device: Option<&str>,
        previous: Option<&DeviceState>,
    ) -> DeviceState {
        let (db_vendor, db_device) = sysfs::udev_names(&self.udev_data_dir, &info.address);
        let pick = |event: Option<&str>, db: Option<String>, previous: Option<&String>| {
            event
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .or(db)
                .or_else(|| previous.cloned())
        };
        let mut vendor_name = pick(
            event_vendor,
            db_vendor,
            previous.and_then(|p| p.vendor_name.as_ref()),
        );
        let mut device_name = pick(
            event_device,
            db_device,
            previous.and_then(|p| p.device_name.as_ref()),
        );
        let unnamed = vendor_name.is_none() || device_name.is_none();
        if let Some(hwdb) = self.hwdb.as_mut().filter(|_| unnamed) {
            let names = hwdb.names(&info);
            vendor_name = vendor_name.or(names.vendor);
            device_name = device_name.or(names.model);
        }
        let resource_name = resource_name(&self.allow_list, &info);
        DeviceState {
            info,
            vendor_name,
            device_name,
            iommu_group_devices: Vec::new(),
            resource_name,
            passthrough_ready: false,
            passthrough_blockers: Vec::new(),
        }
    }

    /// Members and readiness of every device in `group`. Members are what
    /// the kernel lists plus what we know to be in the group (so a damaged
    /// group directory still shows the device itself).
    fn recompute_group(&mut self, group: u32) {
        let mut members: BTreeSet<PciAddress> = sysfs::iommu_group_members(&self.sysfs_root, group)
            .into_iter()
            .collect();
        let known: Vec<PciAddress> = self
            .devices
            .values()
            .filter(|s| s.info.iommu_group == Some(group))
            .map(|s| s.info.address)
            .collect();
        members.extend(known.iter().copied());
        let members: Vec<PciAddress> = members.into_iter().collect();
        let names: Vec<String> = members.iter().map(ToString::to_string).collect();
        let updates: Vec<(PciAddress, bool, Vec<String>)> = known
            .iter()
            .map(|a| {
                let (ready, blockers) = readiness(
                    &self.devices[a].info,
                    &members,
                    &self.devices,
                    self.acs_override_blocker.as_deref(),
                );
                (*a, ready, blockers)
            })
            .collect();
        for (address, ready, blockers) in updates {
            if let Some(state) = self.devices.get_mut(&address) {
                state.iommu_group_devices = names.clone();
                state.passthrough_ready = ready;
                state.passthrough_blockers = blockers;
            }
        }
    }

    /// The group-derived fields of a device without a group.
    fn recompute_alone(&mut self, address: &PciAddress) {
        let Some(state) = self.devices.get(address) else {
            return;
        };
        let (ready, blockers) = readiness(
            &state.info,
            &[],
            &self.devices,
            self.acs_override_blocker.as_deref(),
        );
        if let Some(state) = self.devices.get_mut(address) {
            state.iommu_group_devices = Vec::new();
            state.passthrough_ready = ready;
            state.passthrough_blockers = blockers;
        }
    }
}

/// The resource name of the device's allow-list entry, `None` when it has
/// none.
fn resource_name(list: &[AllowEntry], info: &PciDeviceInfo) -> Option<String> {
    allow_entry(list, info.vendor_id, info.device_id).map(|entry| entry.resource_name.clone())
}

/// `PassthroughReady` and `PassthroughBlockers` (see the module docs).
fn readiness(
    info: &PciDeviceInfo,
    members: &[PciAddress],
    devices: &BTreeMap<PciAddress, DeviceState>,
    acs_override_blocker: Option<&str>,
) -> (bool, Vec<String>) {
    let mut blockers = Vec::new();
    if info.iommu_group.is_none() {
        blockers.push(NO_IOMMU_GROUP_BLOCKER.to_owned());
    }
    if info.is_bridge() {
        blockers.push(BRIDGE_BLOCKER.to_owned());
    } else {
        match info.driver.as_deref() {
            Some(d) if is_vfio_driver(d) => {}
            Some(d) => blockers.push(format!("bound to {d}, not {VFIO_DRIVER}")),
            None => blockers.push(NO_DRIVER_BLOCKER.to_owned()),
        }
    }
    if let Some(blocker) = acs_override_blocker.filter(|_| info.iommu_group.is_some()) {
        blockers.push(blocker.to_owned());
    }
    for member in members.iter().filter(|m| **m != info.address) {
        match devices.get(member).map(|s| &s.info) {
            None => blockers.push(format!(
                "{member} in the same IOMMU group could not be read"
            )),
            Some(m) if m.is_bridge() => {}
            Some(m) => match m.driver.as_deref() {
                None => {}
                Some(d) if is_vfio_driver(d) || d == PCI_STUB_DRIVER => {}
                Some(d) => {
                    blockers.push(format!("{member} in the same IOMMU group is bound to {d}"))
                }
            },
        }
    }
    (blockers.is_empty(), blockers)
}

/// One device named by a batch of events: its last action and the latest
/// names any of its events carried.
struct NamedDevice<'a> {
    address: PciAddress,
    action: &'a DeviceAction,
    vendor_name: Option<&'a str>,
    device_name: Option<&'a str>,
}

impl<'a> NamedDevice<'a> {
    fn new(event: &'a DeviceEvent) -> Self {
        NamedDevice {
            address: event.address,
            action: &event.action,
            vendor_name: event.vendor_name.as_deref(),
            device_name: event.device_name.as_deref(),
        }
    }

    /// The PF of a VF that came or went, re-read without an event of its
    /// own.
    fn parent(address: PciAddress) -> Self {
        static REREAD: DeviceAction = DeviceAction::Change;
        NamedDevice {
            address,
            action: &REREAD,
            vendor_name: None,
            device_name: None,
        }
    }

    /// A later event about the same device.
    fn merge(&mut self, event: &'a DeviceEvent) {
        self.action = &event.action;
        self.vendor_name = event.vendor_name.as_deref().or(self.vendor_name);
        self.device_name = event.device_name.as_deref().or(self.device_name);
    }
}

fn diff(
    address: PciAddress,
    old: Option<&DeviceState>,
    new: Option<&DeviceState>,
) -> Option<InventoryChange> {
    match (old, new) {
        (None, None) => None,
        (None, Some(new)) => Some(InventoryChange::Added(new.clone())),
        (Some(_), None) => Some(InventoryChange::Removed(address)),
        (Some(old), Some(new)) => (old != new).then(|| InventoryChange::Changed {
            old: Box::new(old.clone()),
            new: new.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::FakeSysfs;

    const ON_VFIO: &str = "0000:01:00.0";
    const NO_GROUP: &str = "0000:02:00.0";

    /// A device on vfio-pci alone in group 1 (ready but for the override)
    /// and one without a group.
    fn acs_tree() -> FakeSysfs {
        let tree = FakeSysfs::new();
        tree.add(ON_VFIO, 0x10de, 0x1eb8, 0x030000)
            .driver("vfio-pci")
            .iommu_group(1);
        tree.add(NO_GROUP, 0x8086, 0x10ca, 0x020000).driver("igb");
        tree
    }

    /// The blockers of each device after a resync, read with `proc_root`.
    fn blockers_with(tree: &FakeSysfs, proc_root: &Path) -> Vec<(bool, Vec<String>)> {
        let mut inventory =
            Inventory::new(tree.root(), tree.udev_data_dir(), Vec::new()).with_proc_root(proc_root);
        inventory.resync();
        inventory
            .devices()
            .map(|d| (d.passthrough_ready, d.passthrough_blockers.clone()))
            .collect()
    }

    #[test]
    fn an_acs_override_blocks_every_device_with_a_group() {
        let tree = acs_tree();
        let proc_root = tempfile::tempdir().unwrap();
        let cmdline = proc_root.path().join("cmdline");
        let no_group = vec![
            NO_IOMMU_GROUP_BLOCKER.to_owned(),
            format!("bound to igb, not {VFIO_DRIVER}"),
        ];
        std::fs::write(
            &cmdline,
            "BOOT_IMAGE=/vmlinuz root=UUID=1 ro intel_iommu=on \
             pcie_acs_override=downstream,multifunction quiet\n",
        )
        .unwrap();
        let blocker = acs_override_blocker("downstream,multifunction");
        assert_eq!(
            blocker,
            "isolation weakened: the kernel command line has \
             pcie_acs_override=downstream,multifunction, so IOMMU groups may not reflect real \
             isolation"
        );
        assert_eq!(
            blockers_with(&tree, proc_root.path()),
            [(false, vec![blocker]), (false, no_group.clone())]
        );

        // Without it, or with no cmdline to read: ready.
        std::fs::write(&cmdline, "BOOT_IMAGE=/vmlinuz intel_iommu=on\n").unwrap();
        let ready = [(true, vec![]), (false, no_group.clone())];
        assert_eq!(blockers_with(&tree, proc_root.path()), ready);
        std::fs::remove_file(&cmdline).unwrap();
        assert_eq!(blockers_with(&tree, proc_root.path()), ready);
    }

    /// This machine boots without pcie_acs_override: its own command line
    /// (read, not missing) blocks nothing.
    #[test]
    fn this_machines_command_line_blocks_nothing() {
        let real = std::fs::read_to_string("/proc/cmdline").unwrap();
        assert!(!real.trim().is_empty());
        let tree = acs_tree();
        let [on_vfio, _] = &blockers_with(&tree, Path::new("/proc"))[..] else {
            panic!("two devices")
        };
        assert_eq!(*on_vfio, (true, vec![]), "{real}");
    }

    #[test]
    fn acs_override_on_a_command_line() {
        for (cmdline, value) in [
            ("ro pcie_acs_override=downstream quiet", Some("downstream")),
            ("pcie-acs-override=id:10de:1eb8", Some("id:10de:1eb8")),
            ("pcie_acs_override=a pcie_acs_override=b\n", Some("b")),
            ("pcie_acs_override=", Some("")),
            ("ro quiet", None),
            ("pcie_acs_override", None),
            ("xpcie_acs_override=a pcie_acs_override_x=b", None),
            ("ro -- pcie_acs_override=downstream", None),
            ("", None),
        ] {
            assert_eq!(acs_override(cmdline), value, "{cmdline:?}");
        }
    }

    #[test]
    fn selectors() {
        let e = AllowEntry::new("10de:1EB8", "nvidia.com/T4").unwrap();
        assert_eq!(
            e,
            AllowEntry {
                vendor_id: 0x10de,
                device_id: Some(0x1eb8),
                resource_name: "nvidia.com/T4".into()
            }
        );
        assert!(e.matches(0x10de, 0x1eb8));
        assert!(!e.matches(0x10de, 0x1eb9));
        let any = AllowEntry::new("10de:*", "nvidia.com/any").unwrap();
        assert_eq!(any.device_id, None);
        assert!(any.matches(0x10de, 0x1234));
        assert!(!any.matches(0x8086, 0x1234));
        for bad in [
            "",
            "10de",
            "10de:",
            ":1eb8",
            "10de:1eb",
            "10de:1eb88",
            "*:*",
            "10de:**",
            "10de:1eb8:0",
            " 10de:1eb8",
            "+0de:1eb8",
            "10de-1eb8",
            "0x10:1eb8",
        ] {
            assert!(AllowEntry::new(bad, "r").is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn exact_entry_wins_over_wildcard() {
        let list = vec![
            AllowEntry::new("10de:*", "any").unwrap(),
            AllowEntry::new("10de:1eb8", "t4").unwrap(),
            AllowEntry::new("10de:1eb8", "second").unwrap(),
        ];
        assert_eq!(
            allow_entry(&list, 0x10de, 0x1eb8).unwrap().resource_name,
            "t4"
        );
        assert_eq!(
            allow_entry(&list, 0x10de, 0x0001).unwrap().resource_name,
            "any"
        );
        assert!(allow_entry(&list, 0x8086, 0x1eb8).is_none());
    }
}
