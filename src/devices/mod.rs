//! PCI devices: a live inventory from sysfs and udev events, passthrough
//! readiness, and detach/reattach to vfio-pci.
//!
//! - [`sysfs`]: reading one device or all of them from a (configurable)
//!   sysfs root; names from the udev database.
//! - [`hwdb`]: names from the udev hwdb when udevd's database has none.
//! - [`inventory`]: the device table, readiness and allow-list, applying
//!   events and resyncs and reporting exactly what changed.
//! - [`monitor`]: the udev netlink monitor on its own thread, with a clean
//!   stop.
//! - [`vfio`]: detach to / reattach from vfio-pci (the sysfs writes), which
//!   drivers count as VFIO, and who holds a VFIO group.
//! - [`passthrough`]: the decisions around those writes: refuse while a
//!   process holds the device's VFIO group, and when that is unknown.
//! - [`host_use`]: who on the host uses a device (mounts, swap, network,
//!   display, processes holding its nodes), for the safety gates.
//! - [`auto_return`]: devices given back after their last VM user exits
//!   (inotify on the group node, reset, reattach, verify, a report).
//! - [`persistent`]: boot-time claims, driverctl's override files
//!   (`/etc/driverctl.d/pci-<address>`), and which of them this service wrote.
//! - [`gate`]: Detach's safety gates: the blockers of detaching a device
//!   or its group (host uses, siblings the host runs on, SR-IOV VFs), and
//!   the public view of the `HostUsers` property.

pub mod auto_return;
pub mod gate;
pub mod host_use;
pub mod hwdb;
pub mod inventory;
pub mod monitor;
pub mod passthrough;
pub mod persistent;
pub mod sysfs;
pub mod vfio;

/// What happened to a device, as udev or the kernel says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAction {
    Add,
    Remove,
    Change,
    Bind,
    Unbind,
    /// Anything else (`move`, `online`, …): re-read the device.
    Other(String),
}

impl DeviceAction {
    /// The action as udev spells it (`add`, `change`, …).
    pub fn as_str(&self) -> &str {
        match self {
            DeviceAction::Add => "add",
            DeviceAction::Remove => "remove",
            DeviceAction::Change => "change",
            DeviceAction::Bind => "bind",
            DeviceAction::Unbind => "unbind",
            DeviceAction::Other(other) => other,
        }
    }
}

/// One uevent about one PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    pub action: DeviceAction,
    pub address: vmmanager_client::PciAddress,
    /// `ID_VENDOR_FROM_DATABASE` / `ID_MODEL_FROM_DATABASE` when the event
    /// came through udevd (the kernel's own events carry no names).
    pub vendor_name: Option<String>,
    pub device_name: Option<String>,
}

/// What the monitor hands to the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorMessage {
    Event(DeviceEvent),
    /// Events were lost (ENOBUFS or another receive error): re-enumerate.
    Resync,
}
