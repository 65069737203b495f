//! Every name of the contract, spelled once: bus name, object paths,
//! interfaces, polkit actions and detail keys, option keys, dictionary keys
//! and signal names.
//!
//! The reference for what each means is `dbus/org.example.VmManager1.xml`
//! (its `<doc>` elements). Error names are not here: they are the variants
//! of [`Error`](crate::Error).

/// The service's well-known name on the system bus.
pub const BUS_NAME: &str = "org.example.VmManager";
/// The manager object, which is also the ObjectManager root.
pub const MANAGER_PATH: &str = "/org/example/VmManager";
/// Prefix of job objects: `/org/example/VmManager/jobs/N`.
pub const JOBS_PATH: &str = "/org/example/VmManager/jobs";
/// Prefix of device objects: `/org/example/VmManager/devices/pci_…` (see
/// [`PciAddress::object_path`](crate::PciAddress::object_path)).
pub const DEVICES_PATH: &str = "/org/example/VmManager/devices";

/// The manager interface (CheckDisk, GetDiskUsers, DiskChecked, Jobs).
pub const MANAGER_INTERFACE: &str = "org.example.VmManager1";
/// The interface of job objects.
pub const JOB_INTERFACE: &str = "org.example.VmManager1.Job";
/// The interface of PCI device objects.
pub const DEVICE_INTERFACE: &str = "org.example.VmManager1.PciDevice";

/// polkit action ids (`polkit/org.example.vmmanager.policy`).
pub mod action {
    /// CheckDisk and GetDiskUsers on an image the caller owns.
    pub const CHECK_DISK: &str = "org.example.vmmanager.check-disk";
    /// CheckDisk and GetDiskUsers on any other path; cancelling another
    /// user's job.
    pub const CHECK_DISK_OTHER_USER: &str = "org.example.vmmanager.check-disk-other-user";
    /// CheckDisk with the `repair` option.
    pub const REPAIR_DISK: &str = "org.example.vmmanager.repair-disk";
    /// PciDevice.Detach and Reattach.
    pub const MANAGE_DEVICES: &str = "org.example.vmmanager.manage-devices";
    /// PciDevice.Detach with the `force` option while the host uses the
    /// device (or a member of its group): asked in addition to
    /// [`MANAGE_DEVICES`], `auth_admin` every time.
    pub const FORCE_DETACH: &str = "org.example.vmmanager.force-detach";
}

/// Keys of the `a{sv} options` argument every method takes. Build them with
/// [`options`](crate::options) rather than by hand.
pub mod option {
    /// `b`, every method: do not let polkit prompt for a password.
    pub const NO_USER_INTERACTION: &str = "auth.no-user-interaction";
    /// `s`, CheckDisk and GetDiskUsers: the VM's PID file (absolute).
    pub const PIDFILE: &str = "pidfile";
    /// `b`, CheckDisk: check even while in use (`qemu-img check -U`).
    pub const FORCE_SHARE: &str = "force-share";
    /// `s`, CheckDisk: `"leaks"` or `"all"`.
    pub const REPAIR: &str = "repair";
    /// `u`, CheckDisk: upper bound in seconds for the whole check.
    pub const TIMEOUT_SEC: &str = "timeout-sec";
    /// `b`, PciDevice.Detach and Reattach: move every non-bridge endpoint
    /// of the device's IOMMU group, rolled back on a failure.
    pub const GROUP: &str = "group";
    /// `b`, PciDevice.Detach: detach even though the host uses the device
    /// (a mount, swap, an interface, the display, processes holding its
    /// nodes); needs [`FORCE_DETACH`](super::action::FORCE_DETACH).
    pub const FORCE: &str = "force";
    /// `b`, PciDevice.Detach: give the device (with `group`: every member
    /// this service detached) back to its host driver once the last VM
    /// holding its VFIO group exits; `ReturnFinished` says how it went.
    pub const AUTO_RETURN: &str = "auto-return";
    /// `b`, PciDevice.Detach: also claim the device (with `group`, every
    /// endpoint) for vfio-pci at boot and hotplug, in driverctl's format
    /// (`/etc/driverctl.d/pci-<address>`); Reattach: remove that claim
    /// (with `group`, also the members' that the service wrote).
    pub const PERSISTENT: &str = "persistent";
}

/// Keys of the CheckDisk report and the DiskChecked signal's dictionary.
/// Decode it with [`CheckReport`](crate::CheckReport).
pub mod report {
    /// `s`: the canonical path of the image.
    pub const IMAGE: &str = "image";
    /// `s`: the format from the header (`qcow2`, …, `raw`).
    pub const FORMAT: &str = "format";
    /// `s`: [`CheckResult`](crate::CheckResult)'s spelling, "" after an
    /// error.
    pub const RESULT: &str = "result";
    /// `b`: false when checked with `force-share` while in use.
    pub const CONSISTENT: &str = "consistent";
    /// `t`: errors qemu-img met while checking.
    pub const CHECK_ERRORS: &str = "check-errors";
    /// `t`: corruptions found (after a repair: left).
    pub const CORRUPTIONS: &str = "corruptions";
    /// `t`: leaked clusters found (after a repair: left).
    pub const LEAKS: &str = "leaks";
    /// `t`: corruptions the repair fixed.
    pub const CORRUPTIONS_FIXED: &str = "corruptions-fixed";
    /// `t`: leaked clusters the repair freed.
    pub const LEAKS_FIXED: &str = "leaks-fixed";
    /// `t`: where the image's data ends, in bytes.
    pub const IMAGE_END_OFFSET: &str = "image-end-offset";
    /// `t`: clusters of the virtual disk.
    pub const TOTAL_CLUSTERS: &str = "total-clusters";
    /// `t`: clusters holding data.
    pub const ALLOCATED_CLUSTERS: &str = "allocated-clusters";
    /// `t`: allocated clusters not stored in guest order.
    pub const FRAGMENTED_CLUSTERS: &str = "fragmented-clusters";
    /// `t`: compressed clusters.
    pub const COMPRESSED_CLUSTERS: &str = "compressed-clusters";
    /// `aa{sv}`: who uses the image, each with the keys of [`user`](super::user).
    pub const USERS: &str = "users";
    /// `as`: PID files that should name this image's VM but do not.
    pub const STALE_PIDFILES: &str = "stale-pidfiles";
    /// `u`: the uid qemu-img ran as.
    pub const RUN_AS_UID: &str = "run-as-uid";
    /// `u`: the uid of the caller that asked for the check (the job's
    /// `StartedByUid`): DiskChecked is public, applets show their user's own.
    pub const STARTED_BY_UID: &str = "started-by-uid";
    /// `t`: how long the check took, in milliseconds.
    pub const DURATION_MS: &str = "duration-ms";
    /// DiskChecked only, after an error: the D-Bus error name.
    pub const ERROR: &str = "error";
    /// DiskChecked only, after an error: its message.
    pub const ERROR_MESSAGE: &str = "error-message";
}

/// Keys of one disk user (GetDiskUsers, the report's `users`) and of one
/// entry of the `InUseBy` device property (which has the first three).
/// Decode them with [`DiskUser`](crate::DiskUser) and
/// [`VfioUser`](crate::VfioUser).
pub mod user {
    /// `u`: the process; 0 for a QEMU lock holder /proc does not show.
    pub const PID: &str = "pid";
    /// `s`: its executable, "" when unknown.
    pub const EXE: &str = "exe";
    /// `s`: QEMU's `-name`, "" when none.
    pub const VM_NAME: &str = "vm-name";
    /// `b`: holds the image open for writing.
    pub const WRITABLE: &str = "writable";
    /// `as`: how it was found, each [`FoundBy`](crate::FoundBy)'s spelling.
    pub const FOUND_BY: &str = "found-by";
    /// `s`: the PID file that named it, "" when none.
    pub const PIDFILE: &str = "pidfile";
}

/// Keys of one entry of the `HostUsers` property.
pub mod host_use {
    /// `s`: what kind of use: `mount`, `swap`, `block-device`, `interface`,
    /// `boot-display`, `connector`, `framebuffer`, `unknown`.
    pub const KIND: &str = "kind";
    /// `s`: the sentence shown to a user.
    pub const TEXT: &str = "text";
}

/// Property names of the PciDevice interface, as in PropertiesChanged and
/// GetManagedObjects. Decode them with
/// [`DeviceProperties`](crate::DeviceProperties).
pub mod property {
    /// `s`: the PCI address, e.g. `0000:03:00.0`.
    pub const ADDRESS: &str = "Address";
    /// `u`: the PCI class, e.g. `0x030000`.
    pub const CLASS: &str = "Class";
    /// `q`: the PCI device id.
    pub const DEVICE_ID: &str = "DeviceId";
    /// `s`: the device's name from the udev hwdb, else "".
    pub const DEVICE_NAME: &str = "DeviceName";
    /// `s`: the bound driver, "" when none.
    pub const DRIVER: &str = "Driver";
    /// `aa{sv}`: processes holding the VFIO group open (the first three
    /// keys of [`user`](super::user)); computed when read, no change signal.
    pub const IN_USE_BY: &str = "InUseBy";
    /// `aa{sv}`: how the host uses the device (computed when read; keys in
    /// [`host_use`](super::host_use)).
    pub const HOST_USERS: &str = "HostUsers";
    /// `b`: the device goes back to its host driver after its last VM
    /// user exits (Detach's `auto-return`). Computed when read.
    pub const AUTO_RETURN: &str = "AutoReturn";
    /// `i`: the IOMMU group, -1 when none.
    pub const IOMMU_GROUP: &str = "IommuGroup";
    /// `as`: addresses of every device in the same IOMMU group.
    pub const IOMMU_GROUP_DEVICES: &str = "IommuGroupDevices";
    /// `i`: NUMA node, -1 when unknown.
    pub const NUMA_NODE: &str = "NumaNode";
    /// `as`: why the device is not ready, in words fit to show a user.
    pub const PASSTHROUGH_BLOCKERS: &str = "PassthroughBlockers";
    /// `b`: a VM can be given this device.
    pub const PASSTHROUGH_READY: &str = "PassthroughReady";
    /// `s`: the driver the device is claimed for at boot (driverctl's
    /// override file), "" when none; computed when read, no change signal.
    pub const PERSISTENT_DRIVER: &str = "PersistentDriver";
    /// `s`: who made that claim: `vmmanager` (this service's Detach with
    /// `persistent`), `other` (driverctl or an admin), `unknown` (the file
    /// could not be read), "" when there is none; computed when read.
    pub const PERSISTENT_ORIGIN: &str = "PersistentOrigin";
    /// `b`: matches the configured allow-list.
    pub const PERMITTED: &str = "Permitted";
    /// `s`: an SR-IOV virtual function's physical function, else "".
    pub const PHYSICAL_FUNCTION: &str = "PhysicalFunction";
    /// `s`: the allow-list entry's resource name, else "".
    pub const RESOURCE_NAME: &str = "ResourceName";
    /// `u`: SR-IOV virtual functions enabled.
    pub const SRIOV_NUM_VFS: &str = "SriovNumVfs";
    /// `u`: SR-IOV virtual functions the device supports.
    pub const SRIOV_TOTAL_VFS: &str = "SriovTotalVfs";
    /// `q`: the PCI subsystem device id.
    pub const SUBSYSTEM_DEVICE_ID: &str = "SubsystemDeviceId";
    /// `q`: the PCI subsystem vendor id.
    pub const SUBSYSTEM_VENDOR_ID: &str = "SubsystemVendorId";
    /// `q`: the PCI vendor id.
    pub const VENDOR_ID: &str = "VendorId";
    /// `s`: the vendor's name from the udev hwdb, else "".
    pub const VENDOR_NAME: &str = "VendorName";
}

/// Member names of the service's own signals, for match rules and for
/// dispatching a [`zbus::Message`] by its member. The proxies'
/// `receive_…` streams need none of them. (The standard interfaces'
/// signals, such as `PropertiesChanged`, are the D-Bus specification's.)
pub mod signal {
    /// On the manager ([`MANAGER_INTERFACE`](super::MANAGER_INTERFACE)):
    /// after every check that got past authorization, with the image and
    /// the report (keys of [`report`](super::report)).
    pub const DISK_CHECKED: &str = "DiskChecked";
    /// On a job ([`JOB_INTERFACE`](super::JOB_INTERFACE)): once, when the
    /// job ends.
    pub const COMPLETED: &str = "Completed";
    /// On a device ([`DEVICE_INTERFACE`](super::DEVICE_INTERFACE)): a kernel
    /// or udev event, once the properties reflect it.
    pub const UEVENT: &str = "Uevent";
    /// On a device: once per give-back after use (`auto-return`), with the
    /// outcome (`returned`, `reset-failed`, `driver-did-not-bind`,
    /// `failed`) and a message.
    pub const RETURN_FINISHED: &str = "ReturnFinished";
}

/// Keys of the details the service passes with each polkit request: polkit
/// rules read them as `action.lookup(KEY)` (README, section "polkit").
pub mod polkit_detail {
    /// The canonical path of the image ([`CHECK_DISK`](super::action::CHECK_DISK),
    /// [`CHECK_DISK_OTHER_USER`](super::action::CHECK_DISK_OTHER_USER),
    /// [`REPAIR_DISK`](super::action::REPAIR_DISK); for a job's Cancel, its
    /// target), e.g. `action.lookup("image").indexOf("/srv/vms/") == 0`.
    pub const IMAGE: &str = "image";
    /// The PCI address of the device
    /// ([`MANAGE_DEVICES`](super::action::MANAGE_DEVICES)), e.g.
    /// `action.lookup("device") == "0000:03:00.0"`.
    pub const DEVICE: &str = "device";
    /// With Detach's or Reattach's `group` option only: the addresses of
    /// the device's IOMMU group as the service last read them, joined by
    /// `,` (bridges included; they are not moved), e.g.
    /// `action.lookup("group-devices") == undefined` to allow single
    /// devices only.
    pub const GROUP_DEVICES: &str = "group-devices";
    /// With [`FORCE_DETACH`](super::action::FORCE_DETACH) only: every way
    /// the host uses the device(s), the sentences of the `HostInUse`
    /// error joined by `; ` (also shown in polkit's message).
    pub const HOST_USES: &str = "host-uses";
    /// With Detach's or Reattach's `persistent` option only: `"true"`, e.g.
    /// `action.lookup("persistent") == "true"` to refuse boot-time claims.
    pub const PERSISTENT: &str = "persistent";
}
