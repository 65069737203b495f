//! Every name of the contract, spelled once: bus name, object paths,
//! interfaces, polkit actions, option keys and dictionary keys.
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
}

/// Keys of the CheckDisk report and the DiskChecked signal's dictionary.
/// Decode it with [`CheckReport`](crate::CheckReport).
pub mod report {
    pub const IMAGE: &str = "image";
    pub const FORMAT: &str = "format";
    pub const RESULT: &str = "result";
    pub const CONSISTENT: &str = "consistent";
    pub const CHECK_ERRORS: &str = "check-errors";
    pub const CORRUPTIONS: &str = "corruptions";
    pub const LEAKS: &str = "leaks";
    pub const CORRUPTIONS_FIXED: &str = "corruptions-fixed";
    pub const LEAKS_FIXED: &str = "leaks-fixed";
    pub const IMAGE_END_OFFSET: &str = "image-end-offset";
    pub const TOTAL_CLUSTERS: &str = "total-clusters";
    pub const ALLOCATED_CLUSTERS: &str = "allocated-clusters";
    pub const FRAGMENTED_CLUSTERS: &str = "fragmented-clusters";
    pub const COMPRESSED_CLUSTERS: &str = "compressed-clusters";
    pub const USERS: &str = "users";
    pub const STALE_PIDFILES: &str = "stale-pidfiles";
    pub const RUN_AS_UID: &str = "run-as-uid";
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
    pub const PID: &str = "pid";
    pub const EXE: &str = "exe";
    pub const VM_NAME: &str = "vm-name";
    pub const WRITABLE: &str = "writable";
    pub const FOUND_BY: &str = "found-by";
    pub const PIDFILE: &str = "pidfile";
}

/// Property names of the PciDevice interface, as in PropertiesChanged and
/// GetManagedObjects. Decode them with
/// [`DeviceProperties`](crate::DeviceProperties).
pub mod property {
    pub const ADDRESS: &str = "Address";
    pub const CLASS: &str = "Class";
    pub const DEVICE_ID: &str = "DeviceId";
    pub const DEVICE_NAME: &str = "DeviceName";
    pub const DRIVER: &str = "Driver";
    pub const IN_USE_BY: &str = "InUseBy";
    pub const IOMMU_GROUP: &str = "IommuGroup";
    pub const IOMMU_GROUP_DEVICES: &str = "IommuGroupDevices";
    pub const NUMA_NODE: &str = "NumaNode";
    pub const PASSTHROUGH_BLOCKERS: &str = "PassthroughBlockers";
    pub const PASSTHROUGH_READY: &str = "PassthroughReady";
    pub const PERMITTED: &str = "Permitted";
    pub const PHYSICAL_FUNCTION: &str = "PhysicalFunction";
    pub const RESOURCE_NAME: &str = "ResourceName";
    pub const SRIOV_NUM_VFS: &str = "SriovNumVfs";
    pub const SRIOV_TOTAL_VFS: &str = "SriovTotalVfs";
    pub const SUBSYSTEM_DEVICE_ID: &str = "SubsystemDeviceId";
    pub const SUBSYSTEM_VENDOR_ID: &str = "SubsystemVendorId";
    pub const VENDOR_ID: &str = "VendorId";
    pub const VENDOR_NAME: &str = "VendorName";
}
