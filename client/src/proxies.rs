//! Typed proxies of the three interfaces, with every method, signal and
//! property of `dbus/org.example.VmManager1.xml`; each method's and
//! property's doc starts with its D-Bus name and signature.
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

/// A proxy of `org.example.VmManager1` on `/org/example/VmManager`: disk
/// checks ([`check_disk`](Self::check_disk),
/// [`get_disk_users`](Self::get_disk_users)), their outcome as a signal
/// ([`receive_disk_checked`](Self::receive_disk_checked)) and the running
/// checks ([`jobs`](Self::jobs)).
///
/// Create it with [`ManagerProxy::new`]: the bus name and path are the
/// defaults. Properties are cached (zbus's default) and kept current by
/// PropertiesChanged. Reference: interface `org.example.VmManager1` in
/// `dbus/org.example.VmManager1.xml`.
///
/// # Examples
///
/// Check an image with the VM's PID file, without a password dialog, and
/// tell the user why it was not checked:
///
/// ```no_run
/// use vmmanager_client::{CheckReport, CheckResult, Error, ManagerProxy};
/// use vmmanager_client::options::CheckDiskOptions;
///
/// # async fn example() -> Result<(), Error> {
/// let connection = zbus::Connection::system().await?;
/// let manager = ManagerProxy::new(&connection).await?;
/// let options = CheckDiskOptions::new()
///     .pidfile("/vms/win11/win11.pid")
///     .timeout_sec(600)
///     .no_user_interaction(true)
///     .build();
/// match manager.check_disk("/vms/win11/disk.qcow2", options).await.map_err(Error::from) {
///     Ok(report) => {
///         let report = CheckReport::from_dict(&report);
///         match report.result {
///             Some(CheckResult::Clean) => println!("{}: no errors", report.image),
///             Some(result) => println!("{}: {result} ({} leaks)", report.image, report.leaks),
///             None => println!("{}: no result", report.image),
///         }
///     }
///     // The service's messages are written to be shown as they are.
///     Err(Error::InUse(message) | Error::Busy(message)) => println!("not now: {message}"),
///     Err(Error::NotAuthorized(message)) => println!("not allowed: {message}"),
///     Err(Error::CheckFailed(message)) => println!("qemu-img failed: {message}"),
///     Err(other) => return Err(other),
/// }
/// # Ok(())
/// # }
/// ```
///
/// Follow every check, as a desktop notifier does:
///
/// ```no_run
/// use futures_util::StreamExt;
/// use vmmanager_client::{CheckReport, ManagerProxy};
///
/// # async fn example() -> zbus::Result<()> {
/// let connection = zbus::Connection::system().await?;
/// let manager = ManagerProxy::new(&connection).await?;
/// let mut checks = manager.receive_disk_checked().await?;
/// while let Some(signal) = checks.next().await {
///     let args = signal.args()?;
///     let report = CheckReport::from_signal(&args.image, &args.report);
///     match &report.error {
///         Some(error) => println!("{}: failed: {}", report.image, error.message),
///         None => match &report.result {
///             Some(result) => println!("{}: {result}", report.image),
///             None => println!("{}: no result", report.image),
///         },
///     }
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
    /// `CheckDisk(s image, a{sv} options) → a{sv} report`: checks the image
    /// with `qemu-img check`, unless a running VM or another process uses
    /// it, and returns the report (decode it with
    /// [`CheckReport::from_dict`](crate::CheckReport::from_dict)).
    ///
    /// `image` is an absolute path (symlinks are resolved; at most 4095
    /// bytes, no name over 255). Build `options` with
    /// [`CheckDiskOptions`](crate::options::CheckDiskOptions). The call
    /// returns when qemu-img is done, which can take minutes; meanwhile the
    /// check is a job object in [`jobs`](Self::jobs), and afterwards a
    /// DiskChecked signal carries the same report. qemu-img runs with the
    /// caller's uid and groups, or for someone else's image with its
    /// owner's; never as root for a caller that is not root.
    ///
    /// polkit: [`CHECK_DISK`](crate::names::action::CHECK_DISK) for a
    /// regular file the caller owns,
    /// [`CHECK_DISK_OTHER_USER`](crate::names::action::CHECK_DISK_OTHER_USER)
    /// for any other path, and
    /// [`REPAIR_DISK`](crate::names::action::REPAIR_DISK) with a repair.
    ///
    /// # Errors
    ///
    /// Convert the [`zbus::Error`] with [`Error::from`](crate::Error):
    ///
    /// - [`InUse`](crate::Error::InUse): a VM or process uses the image
    ///   (the message names the VM and PID); also a repair while in use.
    /// - [`NotFound`](crate::Error::NotFound): there is no such image.
    /// - [`InvalidArgument`](crate::Error::InvalidArgument): a malformed
    ///   path or option.
    /// - [`NotAuthorized`](crate::Error::NotAuthorized): polkit said no.
    /// - [`Busy`](crate::Error::Busy): a check of the same image is
    ///   running, the caller has as many checks running and queued as the
    ///   service allows, or too many of its authorizations wait for polkit.
    /// - [`CheckFailed`](crate::Error::CheckFailed): qemu-img failed (its
    ///   stderr is in the message), or the in-use scan could not look.
    /// - [`Timeout`](crate::Error::Timeout): no check slot became free in
    ///   time, or the scan or qemu-img did not finish.
    /// - [`Cancelled`](crate::Error::Cancelled): [`JobProxy::cancel`], the
    ///   caller left the bus, or the service is stopping.
    /// - [`NotSupported`](crate::Error::NotSupported): the image keeps its
    ///   data in other files (a VMDK descriptor, qcow2 with an external
    ///   data file), or a repair in a directory the service may not write
    ///   in (the message says how to allow it).
    /// - [`ZBus`](crate::Error::ZBus): the bus, e.g. the service is not
    ///   installed.
    #[zbus(allow_interactive_auth)]
    fn check_disk(&self, image: &str, options: HashMap<&str, Variant<'_>>) -> zbus::Result<Dict>;

    /// `GetDiskUsers(s image, a{sv} options) → aa{sv} users`: who uses the
    /// image now, without running qemu-img; decode each entry with
    /// [`DiskUser::from_dict`](crate::DiskUser::from_dict).
    ///
    /// A QEMU image lock held by a process that /proc does not show
    /// (another PID namespace) is one entry with pid 0, found by `"lock"`.
    /// Build `options` with
    /// [`GetDiskUsersOptions`](crate::options::GetDiskUsersOptions).
    /// Authorized like [`check_disk`](Self::check_disk), with the same
    /// limits on the path.
    ///
    /// # Errors
    ///
    /// Convert the [`zbus::Error`] with [`Error::from`](crate::Error):
    /// [`NotFound`](crate::Error::NotFound),
    /// [`InvalidArgument`](crate::Error::InvalidArgument),
    /// [`NotAuthorized`](crate::Error::NotAuthorized),
    /// [`Busy`](crate::Error::Busy) (the caller already has 8 calls
    /// running, or too many authorizations wait for polkit),
    /// [`CheckFailed`](crate::Error::CheckFailed) (the service could not
    /// look: never an empty list instead),
    /// [`Timeout`](crate::Error::Timeout) (no answer within 30 s),
    /// [`Cancelled`](crate::Error::Cancelled) (the caller left the bus, or
    /// the service is stopping), [`ZBus`](crate::Error::ZBus).
    #[zbus(allow_interactive_auth)]
    fn get_disk_users(
        &self,
        image: &str,
        options: HashMap<&str, Variant<'_>>,
    ) -> zbus::Result<Vec<Dict>>;

    /// `DiskChecked(s image, a{sv} report)`: after every check that got
    /// past authorization, whoever asked for it. `report` is CheckDisk's,
    /// plus `error` and `error-message` when the check ended in an error;
    /// decode it with
    /// [`CheckReport::from_signal`](crate::CheckReport::from_signal), whose
    /// [`error`](crate::CheckReport::error) is then set.
    #[zbus(signal)]
    fn disk_checked(&self, image: String, report: Dict) -> zbus::Result<()>;

    /// `Jobs` (`ao`): the job objects of the checks running now; open one
    /// with [`JobProxy`]. Emits PropertiesChanged.
    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    /// `Version` (`s`): the version of the service. Constant.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> zbus::Result<String>;
}

/// A proxy of `org.example.VmManager1.Job` on
/// `/org/example/VmManager/jobs/N`: a running check.
///
/// Job objects are listed in [`ManagerProxy::jobs`] (and by the
/// [`object_manager`](crate::object_manager)); one disappears when its
/// check ends, right after [`Completed`]. Create the
/// proxy with [`JobProxy::builder`] and the job's path. Every property is
/// constant. Reference: interface `org.example.VmManager1.Job` in
/// `dbus/org.example.VmManager1.xml`.
///
/// # Examples
///
/// Cancel the running check of one image:
///
/// ```no_run
/// use vmmanager_client::{Error, JobProxy, ManagerProxy, options::AuthOptions};
///
/// const GONE: &str = "org.freedesktop.DBus.Error.UnknownObject";
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let connection = zbus::Connection::system().await?;
/// let manager = ManagerProxy::new(&connection).await?;
/// // Jobs name the image by its canonical path.
/// let image = std::fs::canonicalize("/vms/win11/disk.qcow2")?;
/// for path in manager.jobs().await? {
///     let job = JobProxy::builder(&connection).path(path).build().await?;
///     if job.target().await? != image.to_string_lossy() {
///         continue;
///     }
///     println!("{} started by uid {}", job.operation().await?, job.started_by_uid().await?);
///     match job.cancel(AuthOptions::new().build()).await.map_err(Error::from) {
///         Ok(()) => println!("cancelled"),
///         Err(Error::NotAuthorized(message)) => println!("not allowed: {message}"),
///         // The check ended meanwhile and its object is gone.
///         Err(e) if e.reply_name().as_deref() == Some(GONE) => println!("not running any more"),
///         Err(other) => return Err(other.into()),
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[proxy(
    interface = "org.example.VmManager1.Job",
    default_service = "org.example.VmManager"
)]
pub trait Job {
    /// `Cancel(a{sv} options)`: stops the job. qemu-img and its whole
    /// process group are killed, and the CheckDisk call that started the
    /// job returns [`Cancelled`](crate::Error::Cancelled).
    ///
    /// The caller must be the one who started the job, or be authorized for
    /// [`CHECK_DISK_OTHER_USER`](crate::names::action::CHECK_DISK_OTHER_USER).
    /// Build `options` with [`AuthOptions`](crate::options::AuthOptions).
    ///
    /// # Errors
    ///
    /// Convert the [`zbus::Error`] with [`Error::from`](crate::Error):
    /// [`NotAuthorized`](crate::Error::NotAuthorized),
    /// [`Busy`](crate::Error::Busy) (too many authorizations wait for
    /// polkit), [`InvalidArgument`](crate::Error::InvalidArgument) (bad
    /// options), [`ZBus`](crate::Error::ZBus) with
    /// `org.freedesktop.DBus.Error.UnknownObject` when the job has ended.
    #[zbus(allow_interactive_auth)]
    fn cancel(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    /// `Completed(b success, s message)`: once, when the job ends, just
    /// before the object goes away; `message` is the error message, or ""
    /// on success.
    #[zbus(signal)]
    fn completed(&self, success: bool, message: String) -> zbus::Result<()>;

    /// `Cancelable` (`b`): whether [`cancel`](Self::cancel) can stop the
    /// job (true for checks).
    #[zbus(property(emits_changed_signal = "const"))]
    fn cancelable(&self) -> zbus::Result<bool>;

    /// `Operation` (`s`): what the job does: `"check-disk"`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn operation(&self) -> zbus::Result<String>;

    /// `StartTime` (`t`): when the job started, in microseconds since the
    /// epoch.
    #[zbus(property(emits_changed_signal = "const"))]
    fn start_time(&self) -> zbus::Result<u64>;

    /// `StartedByUid` (`u`): the uid of the caller that started the job.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_by_uid(&self) -> zbus::Result<u32>;

    /// `Target` (`s`): what the job works on: the canonical path of the
    /// image.
    #[zbus(property(emits_changed_signal = "const"))]
    fn target(&self) -> zbus::Result<String>;
}

/// A proxy of `org.example.VmManager1.PciDevice` on
/// `/org/example/VmManager/devices/pci_DDDD_BB_SS_F`: one host PCI device
/// and whether it can be passed through to a VM.
///
/// Find the path with
/// [`PciAddress::object_path`](crate::PciAddress::object_path), or list
/// every device with [`object_manager`](crate::object_manager); create the
/// proxy with [`PciDeviceProxy::builder`]. Reading needs no authorization.
/// The service keeps the properties current from udev events and emits
/// PropertiesChanged for every one except [`in_use_by`](Self::in_use_by),
/// so the proxy's cache (zbus's default) stays current;
/// [`DeviceProperties`](crate::DeviceProperties) holds them all as one
/// value. Reference: interface `org.example.VmManager1.PciDevice` in
/// `dbus/org.example.VmManager1.xml`.
///
/// # Examples
///
/// Give a device to vfio-pci unless a VM holds it:
///
/// ```no_run
/// use vmmanager_client::{Error, PciAddress, PciDeviceProxy, VfioUser, options::AuthOptions};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let connection = zbus::Connection::system().await?;
/// let address: PciAddress = "0000:03:00.0".parse()?;
/// let device = PciDeviceProxy::builder(&connection)
///     .path(address.object_path())
///     .build()
///     .await?;
/// for user in device.in_use_by().await?.iter().map(VfioUser::from_dict) {
///     println!("held by PID {} ({})", user.pid, user.vm_name);
/// }
/// match device.detach(AuthOptions::new().build()).await.map_err(Error::from) {
///     Ok(()) => println!("now bound to {}", device.driver().await?),
///     Err(Error::InUse(message) | Error::NotSupported(message)) => println!("{message}"),
///     Err(other) => return Err(other.into()),
/// }
/// if !device.passthrough_ready().await? {
///     // E.g. another device of the IOMMU group is still on its driver.
///     for blocker in device.passthrough_blockers().await? {
///         println!("not ready: {blocker}");
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[proxy(
    interface = "org.example.VmManager1.PciDevice",
    default_service = "org.example.VmManager"
)]
pub trait PciDevice {
    /// `Detach(a{sv} options)`: binds the device to vfio-pci the way
    /// libvirt's nodedev-detach does (`driver_override`, unbind,
    /// `drivers_probe`), remembering the original driver for
    /// [`reattach`](Self::reattach).
    ///
    /// Returns once the properties show the new binding. A no-op when the
    /// device is already on vfio-pci or a vendor variant of it (e.g.
    /// `mlx5_vfio_pci`). polkit:
    /// [`MANAGE_DEVICES`](crate::names::action::MANAGE_DEVICES). Build
    /// `options` with [`AuthOptions`](crate::options::AuthOptions).
    ///
    /// # Errors
    ///
    /// Convert the [`zbus::Error`] with [`Error::from`](crate::Error):
    ///
    /// - [`InUse`](crate::Error::InUse): a VM holds the device's VFIO group
    ///   (the message names it).
    /// - [`HostInUse`](crate::Error::HostInUse): the host uses the device
    ///   or (with `group`) a member (the message names each use: mount,
    ///   swap, interface, display, processes); nothing was written. The
    ///   `force` option detaches anyway, after
    ///   [`FORCE_DETACH`](crate::names::action::FORCE_DETACH).
    /// - [`NotSupported`](crate::Error::NotSupported): vfio-pci is not
    ///   available (`modprobe vfio-pci`).
    /// - [`NotAuthorized`](crate::Error::NotAuthorized): polkit said no.
    /// - [`Failed`](crate::Error::Failed): a sysfs write failed (the
    ///   message names the file and what was already written), or the
    ///   service could not tell whether a VM holds the device.
    /// - [`Busy`](crate::Error::Busy): too many authorizations wait for
    ///   polkit.
    /// - [`NotFound`](crate::Error::NotFound): the device went away.
    /// - [`InvalidArgument`](crate::Error::InvalidArgument): bad options.
    /// - [`ZBus`](crate::Error::ZBus) with
    ///   `org.freedesktop.DBus.Error.UnknownObject`: no such device object.
    #[zbus(allow_interactive_auth)]
    fn detach(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    /// `Reattach(a{sv} options)`: gives the device back to the driver it
    /// had before [`detach`](Self::detach) (or lets the kernel choose one):
    /// `driver_override` cleared, unbound from the VFIO driver, bound to
    /// the original driver. A no-op when it is not on a VFIO driver.
    ///
    /// # Errors
    ///
    /// As for [`detach`](Self::detach).
    #[zbus(allow_interactive_auth)]
    fn reattach(&self, options: HashMap<&str, Variant<'_>>) -> zbus::Result<()>;

    /// `Uevent(s action)`: every kernel or udev event about the device
    /// ("add", "change", "bind", "unbind", …), once the properties reflect
    /// it. Removal shows as InterfacesRemoved on the
    /// [`object_manager`](crate::object_manager) instead.
    #[zbus(signal)]
    fn uevent(&self, action: String) -> zbus::Result<()>;

    /// `Address` (`s`): the PCI address, e.g. `0000:03:00.0`. Constant.
    #[zbus(property(emits_changed_signal = "const"))]
    fn address(&self) -> zbus::Result<String>;

    /// `Class` (`u`): the PCI class, e.g. `0x030000` for a VGA controller.
    #[zbus(property)]
    fn class(&self) -> zbus::Result<u32>;

    /// `DeviceId` (`q`): the PCI device id.
    #[zbus(property)]
    fn device_id(&self) -> zbus::Result<u16>;

    /// `DeviceName` (`s`): the device's name from the udev hwdb (when udevd
    /// runs), else "".
    #[zbus(property)]
    fn device_name(&self) -> zbus::Result<String>;

    /// `Driver` (`s`): the bound driver, "" when none.
    #[zbus(property)]
    fn driver(&self) -> zbus::Result<String>;

    /// `InUseBy` (`aa{sv}`): the processes holding `/dev/vfio/<group>` or
    /// the device's iommufd cdev (`/dev/vfio/devices/vfioN`) open, each with
    /// pid, exe and vm-name (decode with
    /// [`VfioUser::from_dict`](crate::VfioUser::from_dict)). Computed when
    /// read, so never cached and without a change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    fn in_use_by(&self) -> zbus::Result<Vec<Dict>>;

    /// `HostUsers` (`aa{sv}`): how the host uses the device, as any local
    /// user may see it — mounts, swap, interfaces, display: what Detach
    /// refuses for unless forced — each with kind and text (decode with
    /// [`HostUser::from_dict`](crate::HostUser::from_dict)). Processes
    /// holding its nodes and the kernel's claims on its disks are looked
    /// at by Detach only, after polkit. Computed when read, without a
    /// change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    fn host_users(&self) -> zbus::Result<Vec<Dict>>;

    /// `AutoReturn` (`b`): the device goes back to its host driver after
    /// its last VM user exits (Detach's `auto-return`). Computed when read.
    #[zbus(property(emits_changed_signal = "false"))]
    fn auto_return(&self) -> zbus::Result<bool>;

    /// `ReturnFinished(s outcome, s message)`: a give-back after use ended
    /// (`returned`, `reset-failed`, `driver-did-not-bind`, `failed`).
    #[zbus(signal)]
    fn return_finished(&self, outcome: &str, message: &str) -> zbus::Result<()>;

    /// `IommuGroup` (`i`): the IOMMU group, -1 when the device has none.
    #[zbus(property)]
    fn iommu_group(&self) -> zbus::Result<i32>;

    /// `IommuGroupDevices` (`as`): the addresses of every device in the
    /// same IOMMU group.
    #[zbus(property)]
    fn iommu_group_devices(&self) -> zbus::Result<Vec<String>>;

    /// `NumaNode` (`i`): the NUMA node, -1 when unknown.
    #[zbus(property)]
    fn numa_node(&self) -> zbus::Result<i32>;

    /// `PassthroughBlockers` (`as`): why the device is not ready, in words
    /// fit to show a user, e.g. "0000:00:1f.3 in the same IOMMU group is
    /// bound to snd_hda_intel".
    #[zbus(property)]
    fn passthrough_blockers(&self) -> zbus::Result<Vec<String>>;

    /// `PassthroughReady` (`b`): the IOMMU group exists and every device in
    /// it is bound to vfio-pci or a vendor variant of it (bridges
    /// excepted): a VM can be given this device.
    #[zbus(property)]
    fn passthrough_ready(&self) -> zbus::Result<bool>;

    /// `Permitted` (`b`): the device matches the configured allow-list
    /// (`[devices] permitted`).
    #[zbus(property)]
    fn permitted(&self) -> zbus::Result<bool>;

    /// `PersistentDriver` (`s`): the driver the device is claimed for at
    /// boot and hotplug (driverctl's override file,
    /// `/etc/driverctl.d/pci-<address>`), "" when none. Computed when read,
    /// without a change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    fn persistent_driver(&self) -> zbus::Result<String>;

    /// `PersistentOrigin` (`s`): who made that claim: `vmmanager` (Detach
    /// with `persistent`), `other` (driverctl, an admin), `unknown` (the
    /// file could not be read), "" when there is none. Computed when read,
    /// without a change signal.
    #[zbus(property(emits_changed_signal = "false"))]
    fn persistent_origin(&self) -> zbus::Result<String>;

    /// `PhysicalFunction` (`s`): for an SR-IOV virtual function, the
    /// address of its physical function; else "".
    #[zbus(property)]
    fn physical_function(&self) -> zbus::Result<String>;

    /// `ResourceName` (`s`): the resource name of the matching allow-list
    /// entry, else "".
    #[zbus(property)]
    fn resource_name(&self) -> zbus::Result<String>;

    /// `SriovNumVfs` (`u`): SR-IOV, how many virtual functions are enabled.
    #[zbus(property)]
    fn sriov_num_vfs(&self) -> zbus::Result<u32>;

    /// `SriovTotalVfs` (`u`): SR-IOV, how many virtual functions the device
    /// supports; 0 when it is not capable.
    #[zbus(property)]
    fn sriov_total_vfs(&self) -> zbus::Result<u32>;

    /// `SubsystemDeviceId` (`q`): the PCI subsystem device id.
    #[zbus(property)]
    fn subsystem_device_id(&self) -> zbus::Result<u16>;

    /// `SubsystemVendorId` (`q`): the PCI subsystem vendor id.
    #[zbus(property)]
    fn subsystem_vendor_id(&self) -> zbus::Result<u16>;

    /// `VendorId` (`q`): the PCI vendor id.
    #[zbus(property)]
    fn vendor_id(&self) -> zbus::Result<u16>;

    /// `VendorName` (`s`): the vendor's name from the udev hwdb (when udevd
    /// runs), else "".
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
