//! Typed proxies of the three interfaces, with every method, signal and
//! property of `dbus/org.example.VmManager1.xml`.
//!
//! zbus's `#[proxy]` attribute takes only string literals, so the bus name,
//! paths and interface names are restated here; a unit test holds them
//! equal to [`names`](crate::names).
//!
//! Methods take their options as [`Options`](crate::options::Options)
//! (build them with [`options`](crate::options)); dictionaries come back as
//! [`Dict`]: decode them with [`CheckReport`](crate::CheckReport),
//! [`DiskUser`](crate::DiskUser) and
//! [`DeviceProperties`](crate::DeviceProperties). A failed call's
//! `zbus::Error` converts into [`Error`](crate::Error).

use std::collections::HashMap;

use zbus::proxy;
use zbus::{OwnedObjectPath, Variant};

use crate::dict::Dict;

/// `org.example.VmManager1` on `/org/example/VmManager`: disk checks.
///
/// ```no_run
/// use vmmanager_client::{CheckReport, CheckResult, Error, ManagerProxy};
/// use vmmanager_client::options::CheckDiskOptions;
///
/// # async fn example() -> Result<(), Error> {
/// let connection = zbus::Connection::system().await?;
/// let manager = ManagerProxy::new(&connection).await?;
/// let options = CheckDiskOptions::new().no_user_interaction(true).build();
/// match manager.check_disk("/vms/win11.qcow2", options).await.map_err(Error::from) {
///     Ok(report) => match CheckReport::from_dict(&report).result {
///         Some(CheckResult::Clean) => println!("no errors"),
///         Some(other) => println!("{other}"),
///         None => println!("no result"),
///     },
///     Err(Error::InUse(who)) => println!("not checked: {who}"),
///     Err(other) => return Err(other),
/// }
/// # Ok(())
/// # }
/// ```
#[proxy(
    interface = "org.example.VmManager1",
    default_service = "org.example.VmManager",
    default_path = "/org/example/VmManager"
)]
pub trait Manager {
    /// Checks an image with qemu-img unless something uses it; returns the
    /// report.
    #[zbus(allow_interactive_auth)]
    fn check_disk(&self, image: &str, options: HashMap<&str, Variant<'_>>) -> zbus::Result<Dict>;

    /// Who uses the image now, without running qemu-img.
    #[zbus(allow_interactive_auth)]
    fn get_disk_users(
        &self,
        image: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<Vec<Dict>>;

    /// After every check that got past authorization.
    #[zbus(signal)]
    fn disk_checked(&self, image: String, report: Dict) -> zbus::Result<()>;

    /// The job objects of the checks running now.
    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    /// The version of the service.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> zbus::Result<String>;
}

/// `org.example.VmManager1.Job` on `/org/example/VmManager/jobs/N`: a
/// running check.
///
/// ```no_run
/// use vmmanager_client::{JobProxy, ManagerProxy, options::AuthOptions};
///
/// # async fn example() -> zbus::Result<()> {
/// let connection = zbus::Connection::system().await?;
/// let manager = ManagerProxy::new(&connection).await?;
/// for path in manager.jobs().await? {
///     let job = JobProxy::builder(&connection).path(path).build().await?;
///     println!("{} on {} by uid {}", job.operation().await?, job.target().await?,
///         job.started_by_uid().await?);
///     job.cancel(AuthOptions::new().build()).await?;
/// }
/// # Ok(())
/// # }
/// ```
#[proxy(
    interface = "org.example.VmManager1.Job",
    default_service = "org.example.VmManager"
)]
pub trait Job {
    /// Stops the job; the CheckDisk call that started it returns Cancelled.
    #[zbus(allow_interactive_auth)]
    fn cancel(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    /// Once, when the job ends; `message` is "" on success.
    #[zbus(signal)]
    fn completed(&self, success: bool, message: String) -> zbus::Result<()>;

    /// Whether Cancel can stop the job.
    #[zbus(property(emits_changed_signal = "const"))]
    fn cancelable(&self) -> zbus::Result<bool>;

    /// What the job does: `"check-disk"`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn operation(&self) -> zbus::Result<String>;

    /// When the job started, in microseconds since the epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn start_time(&self) -> zbus::Result<u64>;

    /// The uid of the caller that started the job.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_by_uid(&self) -> zbus::Result<u32>;

    /// The canonical path of the image.
    #[zbus(property(emits_changed_signal = "const"))]
    fn target(&self) -> zbus::Result<String>;
}

/// `org.example.VmManager1.PciDevice` on
/// `/org/example/VmManager/devices/pci_…`: one host PCI device. Find the
/// path with [`PciAddress::object_path`](crate::PciAddress::object_path),
/// or list every device with
/// [`object_manager`](crate::object_manager).
///
/// ```no_run
/// use vmmanager_client::{PciAddress, PciDeviceProxy, options::AuthOptions};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let connection = zbus::Connection::system().await?;
/// let address: PciAddress = "0000:03:00.0".parse()?;
/// let device = PciDeviceProxy::builder(&connection)
///     .path(address.object_path())
///     .build()
///     .await?;
/// if !device.passthrough_ready().await? {
///     println!("blocked: {:?}", device.passthrough_blockers().await?);
/// }
/// device.detach(AuthOptions::new().build()).await?;
/// println!("now bound to {}", device.driver().await?);
/// # Ok(())
/// # }
/// ```
#[proxy(
    interface = "org.example.VmManager1.PciDevice",
    default_service = "org.example.VmManager"
)]
pub trait PciDevice {
    /// Binds the device to vfio-pci (a no-op when it already is).
    #[zbus(allow_interactive_auth)]
    fn detach(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    /// Gives the device back to the driver it had before Detach.
    #[zbus(allow_interactive_auth)]
    fn reattach(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    /// Every kernel or udev event about the device ("add", "change",
    /// "bind", …), once the properties reflect it.
    #[zbus(signal)]
    fn uevent(&self, action: String) -> zbus::Result<()>;

    /// The PCI address, e.g. `0000:03:00.0`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn address(&self) -> zbus::Result<String>;

    /// The PCI class, e.g. `0x030000` for a VGA controller.
    #[zbus(property)]
    fn class(&self) -> zbus::Result<u32>;

    #[zbus(property)]
    fn device_id(&self) -> zbus::Result<u16>;

    /// From the udev hwdb (when udevd runs), else "".
    #[zbus(property)]
    fn device_name(&self) -> zbus::Result<String>;

    /// The bound driver, "" when none.
    #[zbus(property)]
    fn driver(&self) -> zbus::Result<String>;

    /// Processes holding `/dev/vfio/<group>` open: pid, exe, vm-name
    /// (decode with [`VfioUser`](crate::VfioUser)). Computed when read;
    /// never cached.
    #[zbus(property(emits_changed_signal = "false"))]
    fn in_use_by(&self) -> zbus::Result<Vec<Dict>>;

    /// The IOMMU group, -1 when none.
    #[zbus(property)]
    fn iommu_group(&self) -> zbus::Result<i32>;

    /// Addresses of every device in the same IOMMU group.
    #[zbus(property)]
    fn iommu_group_devices(&self) -> zbus::Result<Vec<String>>;

    /// NUMA node, -1 when unknown.
    #[zbus(property)]
    fn numa_node(&self) -> zbus::Result<i32>;

    /// Why the device is not ready, in words fit to show a user.
    #[zbus(property)]
    fn passthrough_blockers(&self) -> zbus::Result<Vec<String>>;

    /// A VM can be given this device.
    #[zbus(property)]
    fn passthrough_ready(&self) -> zbus::Result<bool>;

    /// Matches the configured allow-list.
    #[zbus(property)]
    fn permitted(&self) -> zbus::Result<bool>;

    /// For an SR-IOV virtual function, its physical function; else "".
    #[zbus(property)]
    fn physical_function(&self) -> zbus::Result<String>;

    /// The allow-list entry's resource name, else "".
    #[zbus(property)]
    fn resource_name(&self) -> zbus::Result<String>;

    /// SR-IOV: how many virtual functions are enabled.
    #[zbus(property)]
    fn sriov_num_vfs(&self) -> zbus::Result<u32>;

    /// SR-IOV: how many virtual functions the device supports.
    #[zbus(property)]
    fn sriov_total_vfs(&self) -> zbus::Result<u32>;

    #[zbus(property)]
    fn subsystem_device_id(&self) -> zbus::Result<u16>;

    #[zbus(property)]
    fn subsystem_vendor_id(&self) -> zbus::Result<u16>;

    #[zbus(property)]
    fn vendor_id(&self) -> zbus::Result<u16>;

    /// From the udev hwdb (when udevd runs), else "".
    #[zbus(property)]
    fn vendor_name(&self) -> zbus::Result<String>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::*;
    use zbus::proxy::Defaults;

    fn name<T: std::fmt::Display>(value: &Option<T>) -> String {
        value.as_ref().map(ToString::to_string).unwrap_or_default()
    }

    #[test]
    fn the_proxies_use_the_contracts_names() {
        assert_eq!(name(ManagerProxy::DESTINATION), BUS_NAME);
        assert_eq!(name(JobProxy::DESTINATION), BUS_NAME);
        assert_eq!(name(PciDeviceProxy::DESTINATION), BUS_NAME);
        assert_eq!(name(ManagerProxy::PATH), MANAGER_PATH);
        assert_eq!(name(ManagerProxy::INTERFACE), MANAGER_INTERFACE);
        assert_eq!(name(JobProxy::INTERFACE), JOB_INTERFACE);
        assert_eq!(name(PciDeviceProxy::INTERFACE), DEVICE_INTERFACE);
    }

    #[test]
    fn the_proxies_signals_are_the_named_members() {
        let job = format!("{JOBS_PATH}/1");
        let device = format!("{DEVICES_PATH}/pci_0000_03_00_0");
        let signal = |path: &str, interface: &str, member: &str| {
            zbus::Message::signal(path.to_owned(), interface.to_owned(), member.to_owned())
        };
        let report = (String::from("/vms/a.qcow2"), Dict::new());
        let checked = signal(MANAGER_PATH, MANAGER_INTERFACE, signal::DISK_CHECKED).build(&report);
        let completed = signal(&job, JOB_INTERFACE, signal::COMPLETED).build(&(true, ""));
        let uevent = signal(&device, DEVICE_INTERFACE, signal::UEVENT).build(&("change",));
        let other = signal(MANAGER_PATH, MANAGER_INTERFACE, "Checked").build(&report);
        // from_message accepts only the member name its proxy declares.
        assert!(DiskChecked::from_message(checked.unwrap()).is_some());
        assert!(Completed::from_message(completed.unwrap()).is_some());
        assert!(Uevent::from_message(uevent.unwrap()).is_some());
        assert!(DiskChecked::from_message(other.unwrap()).is_none());
    }
}
