//! The D-Bus contract of VM Manager (`org.example.VmManager` on the system
//! bus), for Rust clients: what `vmctl`, the `vmmanager-notify` companion
//! and the service itself share, and what an applet author uses — as
//! libudisks2 is for udisks.
//!
//! The reference for every method, property and error is the introspection
//! XML with `<doc>`, `dbus/org.example.VmManager1.xml` in the repository.
//!
//! # Layout
//!
//! - [`names`]: bus name, object paths, interface names, polkit action ids
//!   and detail keys, option keys, report, user and property keys, signal
//!   names — each spelled once.
//! - [`Error`]: the service's errors `org.example.VmManager1.Error.*`; the
//!   service replies with it and clients convert a failed call into it.
//! - [`ManagerProxy`], [`JobProxy`], [`PciDeviceProxy`]: typed proxies with
//!   every method, signal and property; [`object_manager`] lists the device
//!   objects.
//! - [`options`]: typed builders of the `a{sv} options` argument.
//! - [`CheckReport`], [`DiskUser`]: the CheckDisk report / DiskChecked
//!   dictionary and the GetDiskUsers entries, decoded and encoded, with
//!   their values [`CheckResult`] and [`FoundBy`] (unknown ones kept).
//! - [`DeviceProperties`], [`VfioUser`]: a device object's properties.
//! - [`PciAddress`]: PCI address ↔ device object path.
//! - [`dict`]: the `a{sv}` type and helpers; [`json`]: D-Bus values as JSON.
//!
//! # Examples
//!
//! One per interface: [`ManagerProxy`] (check a disk, match on the error),
//! [`JobProxy`] (list and cancel running checks), [`PciDeviceProxy`]
//! (readiness and detach), and below, every device through the
//! ObjectManager:
//!
//! ```no_run
//! use vmmanager_client::{DeviceProperties, names::DEVICE_INTERFACE, object_manager};
//!
//! # async fn example() -> zbus::Result<()> {
//! let connection = zbus::Connection::system().await?;
//! let objects = object_manager(&connection).await?.get_managed_objects().await?;
//! for interfaces in objects.values() {
//!     if let Some((_, properties)) =
//!         interfaces.iter().find(|(name, _)| name.as_str() == DEVICE_INTERFACE)
//!     {
//!         let device = DeviceProperties::from_properties(properties);
//!         println!("{} {} ready: {}", device.address, device.driver, device.passthrough_ready);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod device;
pub mod dict;
mod error;
pub mod json;
pub mod names;
pub mod options;
mod proxies;
mod report;

mod address;

pub use address::{AddressError, PciAddress};
pub use device::{DeviceProperties, VfioUser};
pub use error::Error;
pub use proxies::{
    CompletedStream, DiskCheckedStream, JobProxy, ManagerProxy, PciDeviceProxy, UeventStream,
};
pub use report::{CheckReport, CheckResult, DiskUser, FoundBy, ReportError};

/// The service's `org.freedesktop.DBus.ObjectManager` (at
/// [`MANAGER_PATH`](names::MANAGER_PATH)): device objects come and go
/// through its InterfacesAdded and InterfacesRemoved.
pub async fn object_manager(
    connection: &zbus::Connection,
) -> zbus::Result<zbus::fdo::ObjectManagerProxy<'static>> {
    zbus::fdo::ObjectManagerProxy::builder(connection)
        .destination(names::BUS_NAME)
        .path(names::MANAGER_PATH)
        .build()
        .await
}
