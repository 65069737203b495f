#![warn(missing_docs)]
#![doc = include_str!("../README.md")]
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
//!   objects. Their signals arrive as [`DiskChecked`], [`Completed`] and
//!   [`Uevent`].
//! - [`options`]: typed builders of the `a{sv} options` argument.
//! - [`CheckReport`], [`DiskUser`]: the CheckDisk report / DiskChecked
//!   dictionary and the GetDiskUsers entries, decoded and encoded, with
//!   their values [`CheckResult`] and [`FoundBy`] (unknown ones kept).
//! - [`DeviceProperties`], [`VfioUser`], [`HostUser`]: a device object's properties.
//! - [`PciAddress`]: PCI address ↔ device object path.
//! - [`dict`]: the `a{sv}` type and helpers; [`json`]: D-Bus values as JSON.
//!
//! # Examples
//!
//! One per interface:
//!
//! - [`ManagerProxy`]: check a disk and match on the error; follow every
//!   check through DiskChecked.
//! - [`JobProxy`]: cancel the running check of one image.
//! - [`PciDeviceProxy`]: readiness for passthrough, then Detach.
//! - `org.freedesktop.DBus.ObjectManager` ([`object_manager`]): every device,
//!   and devices as they come and go.
//!
//! # Errors
//!
//! The proxies' methods return [`zbus::Result`]; a failed call converts into
//! [`Error`] with `Error::from` (or `?` in a function returning `Error`).
//! Decide on the variant, show its message: the service writes messages to
//! be shown to a user as they are. Errors of the bus rather than of the
//! service stay [`Error::ZBus`], e.g.
//! `org.freedesktop.DBus.Error.ServiceUnknown` when the service is not
//! installed, or `org.freedesktop.DBus.Error.UnknownObject` for a job that
//! has ended or a device that is gone.
//!
//! # Authorization and long calls
//!
//! Every method asks polkit (the actions are in [`names::action`]), and the
//! proxies let polkit's agent ask the user for a password. A client that
//! cannot show one (a background task) passes `no_user_interaction(true)`
//! to the [`options`] builder and gets [`Error::NotAuthorized`] instead of a
//! dialog. CheckDisk returns when qemu-img is done, which can take minutes:
//! zbus sets no method timeout unless the connection was built with
//! [`method_timeout`](zbus::connection::Builder::method_timeout), so do not
//! set a short one for it.

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
pub use device::{DeviceProperties, HostUser, VfioUser};
pub use error::Error;
pub use proxies::{
    Completed, CompletedArgs, CompletedStream, DiskChecked, DiskCheckedArgs, DiskCheckedStream,
    JobProxy, ManagerProxy, PciDeviceProxy, Uevent, UeventArgs, UeventStream,
};
pub use report::{CheckReport, CheckResult, DiskUser, FoundBy, ReportError};

/// A proxy of the service's `org.freedesktop.DBus.ObjectManager`, on
/// [`MANAGER_PATH`](names::MANAGER_PATH).
///
/// `GetManagedObjects` lists every device object (at
/// [`PciAddress::object_path`], with [`DEVICE_INTERFACE`](names::DEVICE_INTERFACE))
/// and every running check (with [`JOB_INTERFACE`](names::JOB_INTERFACE)),
/// each with all its properties; decode a device's with
/// [`DeviceProperties::from_properties`]. Devices come and go through
/// `InterfacesAdded` and `InterfacesRemoved`. The list also holds the empty
/// intermediate nodes (`…/devices`, `…/jobs`), so pick objects by interface,
/// never by "every object". When the service restarts, every object goes
/// and comes back: watch the bus name and list again.
///
/// # Errors
///
/// Building the proxy fails only when the bus refuses the match rules zbus
/// installs ([`zbus::Error`]; convert with [`Error::from`]). Calls on it
/// fail with [`Error::ZBus`] as well, e.g.
/// `org.freedesktop.DBus.Error.ServiceUnknown` when the service is not
/// installed.
///
/// # Examples
///
/// Every device, then the devices that come and go:
///
/// ```no_run
/// use std::collections::HashMap;
///
/// use futures_util::StreamExt;
/// use vmmanager_client::dict::Dict;
/// use vmmanager_client::{DeviceProperties, PciAddress, names::DEVICE_INTERFACE, object_manager};
///
/// # async fn example() -> zbus::Result<()> {
/// let connection = zbus::Connection::system().await?;
/// let objects = object_manager(&connection).await?;
/// let mut added = objects.receive_interfaces_added().await?;
/// let mut removed = objects.receive_interfaces_removed().await?;
///
/// for interfaces in objects.get_managed_objects().await?.values() {
///     // A job or an intermediate node has no device interface.
///     if let Some((_, properties)) =
///         interfaces.iter().find(|(name, _)| name.as_str() == DEVICE_INTERFACE)
///     {
///         let device = DeviceProperties::from_properties(properties);
///         println!("{} {} ready: {}", device.address, device.driver, device.passthrough_ready);
///     }
/// }
///
/// loop {
///     tokio::select! {
///         Some(signal) = added.next() => {
///             // Read the body as owned dictionaries, which the decoders take.
///             let (_, interfaces): (zbus::OwnedObjectPath, HashMap<String, Dict>) =
///                 signal.message().body().deserialize()?;
///             if let Some(properties) = interfaces.get(DEVICE_INTERFACE) {
///                 println!("added {}", DeviceProperties::from_properties(properties).address);
///             }
///         }
///         Some(signal) = removed.next() => {
///             let args = signal.args()?;
///             if let Ok(address) = PciAddress::from_object_path(args.object_path.as_str()) {
///                 println!("removed {address}");
///             }
///         }
///         else => break,
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub async fn object_manager(
    connection: &zbus::Connection,
) -> zbus::Result<zbus::fdo::ObjectManagerProxy<'static>> {
    zbus::fdo::ObjectManagerProxy::builder(connection)
        .destination(names::BUS_NAME)
        .path(names::MANAGER_PATH)
        .build()
        .await
}
