//! The properties of a PCI device object as one typed value: clients read
//! it from a GetManagedObjects / InterfacesAdded / GetAll dictionary and
//! keep it current with PropertiesChanged; the service encodes it with
//! [`DeviceProperties::to_entries`]. The keys of [`names::property`] and
//! (for `InUseBy`) [`names::user`] are read and written only here.
//!
//! [`names::property`]: crate::names::property
//! [`names::user`]: crate::names::user

use zbus::OwnedVariant;

use crate::dict::{self, Dict, variant};
use crate::names::{host_use, property, user};

/// A process holding a device's VFIO group open (one entry of `InUseBy`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VfioUser {
    /// Its process id.
    pub pid: u32,
    /// Resolved executable, "" when unknown.
    pub exe: String,
    /// QEMU's `-name`, "" when none.
    pub vm_name: String,
}

impl VfioUser {
    /// Reads one entry of `InUseBy`.
    pub fn from_dict(d: &Dict) -> VfioUser {
        VfioUser {
            pid: dict::u32(d, user::PID).unwrap_or_default(),
            exe: dict::string(d, user::EXE).unwrap_or_default(),
            vm_name: dict::string(d, user::VM_NAME).unwrap_or_default(),
        }
    }

    /// The entry as the service sends it.
    pub fn to_dict(&self) -> Dict {
        Dict::from([
            (user::PID.to_owned(), variant(self.pid)),
            (user::EXE.to_owned(), variant(self.exe.as_str())),
            (user::VM_NAME.to_owned(), variant(self.vm_name.as_str())),
        ])
    }
}

/// One way the host uses a device (one entry of `HostUsers`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostUser {
    /// `mount`, `swap`, `block-device`, `interface`, `boot-display`,
    /// `connector`, `framebuffer` or `unknown` (see
    /// [`names::host_use::KIND`](crate::names::host_use::KIND)).
    pub kind: String,
    /// The sentence shown to a user.
    pub text: String,
}

impl HostUser {
    /// Reads one entry of `HostUsers`.
    pub fn from_dict(d: &Dict) -> HostUser {
        HostUser {
            kind: dict::string(d, host_use::KIND).unwrap_or_default(),
            text: dict::string(d, host_use::TEXT).unwrap_or_default(),
        }
    }

    /// The entry as the service sends it.
    pub fn to_dict(&self) -> Dict {
        Dict::from([
            (host_use::KIND.to_owned(), variant(self.kind.as_str())),
            (host_use::TEXT.to_owned(), variant(self.text.as_str())),
        ])
    }
}

/// Every property of `org.example.VmManager1.PciDevice`. Missing or
/// mistyped properties read as the interface's "none": "", 0, -1 for
/// `IommuGroup` and `NumaNode`, false, empty lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProperties {
    /// `0000:03:00.0`.
    pub address: String,
    /// PCI vendor id.
    pub vendor_id: u16,
    /// PCI device id.
    pub device_id: u16,
    /// PCI subsystem vendor id, 0 when unknown.
    pub subsystem_vendor_id: u16,
    /// PCI subsystem device id, 0 when unknown.
    pub subsystem_device_id: u16,
    /// e.g. `0x030000` for a VGA controller.
    pub class: u32,
    /// From the udev hwdb, "" when unknown.
    pub vendor_name: String,
    /// From the udev hwdb, "" when unknown.
    pub device_name: String,
    /// "" when none is bound.
    pub driver: String,
    /// -1 when the device has none.
    pub iommu_group: i32,
    /// Addresses of every device in the same IOMMU group, this one
    /// included; empty without a group.
    pub iommu_group_devices: Vec<String>,
    /// -1 when unknown.
    pub numa_node: i32,
    /// SR-IOV: how many virtual functions the device supports, 0 when it
    /// is not capable.
    pub sriov_total_vfs: u32,
    /// SR-IOV: how many virtual functions are enabled.
    pub sriov_num_vfs: u32,
    /// For an SR-IOV virtual function, its physical function; else "".
    pub physical_function: String,
    /// Matches the configured allow-list.
    pub permitted: bool,
    /// The allow-list entry's resource name, else "".
    pub resource_name: String,
    /// The IOMMU group exists and every device in it is bound to vfio-pci
    /// or a variant of it (bridges excepted): QEMU could open it now.
    pub passthrough_ready: bool,
    /// Why it is not ready, in words fit to show a user.
    pub passthrough_blockers: Vec<String>,
    /// Who holds the device's VFIO group open. Computed when read, never
    /// in PropertiesChanged: empty unless the dictionary came from GetAll,
    /// GetManagedObjects or InterfacesAdded.
    pub in_use_by: Vec<VfioUser>,
    /// How the host uses the device (what Detach refuses for unless
    /// forced). Computed when read, like `in_use_by`.
    pub host_users: Vec<HostUser>,
    /// Given back to its host driver after its last VM user exits.
    /// Computed when read, like `in_use_by`.
    pub auto_return: bool,
    /// The driver the device is claimed for at boot (driverctl's override
    /// file), "" when none. Computed when read, like `in_use_by`.
    pub persistent_driver: String,
    /// Who made that claim: `vmmanager`, `other`, `unknown`, or "" (see
    /// [`names::property::PERSISTENT_ORIGIN`](crate::names::property::PERSISTENT_ORIGIN)).
    /// Computed when read.
    pub persistent_origin: String,
}

impl Default for DeviceProperties {
    fn default() -> Self {
        DeviceProperties {
            address: String::new(),
            vendor_id: 0,
            device_id: 0,
            subsystem_vendor_id: 0,
            subsystem_device_id: 0,
            class: 0,
            vendor_name: String::new(),
            device_name: String::new(),
            driver: String::new(),
            iommu_group: -1,
            iommu_group_devices: Vec::new(),
            numa_node: -1,
            sriov_total_vfs: 0,
            sriov_num_vfs: 0,
            physical_function: String::new(),
            permitted: false,
            resource_name: String::new(),
            passthrough_ready: false,
            passthrough_blockers: Vec::new(),
            in_use_by: Vec::new(),
            host_users: Vec::new(),
            auto_return: false,
            persistent_driver: String::new(),
            persistent_origin: String::new(),
        }
    }
}

impl DeviceProperties {
    /// Reads a whole property dictionary.
    pub fn from_properties(properties: &Dict) -> DeviceProperties {
        let mut device = DeviceProperties::default();
        device.update(properties);
        device
    }

    /// Applies the changed properties of a PropertiesChanged signal (or
    /// any subset); properties not in `changed` keep their value.
    pub fn update(&mut self, changed: &Dict) {
        fn set<T>(field: &mut T, value: Option<T>) {
            if let Some(value) = value {
                *field = value;
            }
        }
        let d = changed;
        set(&mut self.address, dict::string(d, property::ADDRESS));
        set(&mut self.vendor_id, dict::u16(d, property::VENDOR_ID));
        set(&mut self.device_id, dict::u16(d, property::DEVICE_ID));
        set(
            &mut self.subsystem_vendor_id,
            dict::u16(d, property::SUBSYSTEM_VENDOR_ID),
        );
        set(
            &mut self.subsystem_device_id,
            dict::u16(d, property::SUBSYSTEM_DEVICE_ID),
        );
        set(&mut self.class, dict::u32(d, property::CLASS));
        set(
            &mut self.vendor_name,
            dict::string(d, property::VENDOR_NAME),
        );
        set(
            &mut self.device_name,
            dict::string(d, property::DEVICE_NAME),
        );
        set(&mut self.driver, dict::string(d, property::DRIVER));
        set(&mut self.iommu_group, dict::i32(d, property::IOMMU_GROUP));
        set(
            &mut self.iommu_group_devices,
            dict::strings(d, property::IOMMU_GROUP_DEVICES),
        );
        set(&mut self.numa_node, dict::i32(d, property::NUMA_NODE));
        set(
            &mut self.sriov_total_vfs,
            dict::u32(d, property::SRIOV_TOTAL_VFS),
        );
        set(
            &mut self.sriov_num_vfs,
            dict::u32(d, property::SRIOV_NUM_VFS),
        );
        set(
            &mut self.physical_function,
            dict::string(d, property::PHYSICAL_FUNCTION),
        );
        set(&mut self.permitted, dict::boolean(d, property::PERMITTED));
        set(
            &mut self.resource_name,
            dict::string(d, property::RESOURCE_NAME),
        );
        set(
            &mut self.passthrough_ready,
            dict::boolean(d, property::PASSTHROUGH_READY),
        );
        set(
            &mut self.passthrough_blockers,
            dict::strings(d, property::PASSTHROUGH_BLOCKERS),
        );
        if let Some(users) = dict::dicts(d, property::IN_USE_BY) {
            self.in_use_by = users.iter().map(VfioUser::from_dict).collect();
        }
        set(
            &mut self.auto_return,
            dict::boolean(d, property::AUTO_RETURN),
        );
        if let Some(uses) = dict::dicts(d, property::HOST_USERS) {
            self.host_users = uses.iter().map(HostUser::from_dict).collect();
        }
        set(
            &mut self.persistent_driver,
            dict::string(d, property::PERSISTENT_DRIVER),
        );
        set(
            &mut self.persistent_origin,
            dict::string(d, property::PERSISTENT_ORIGIN),
        );
    }

    /// `(name, value)` of every property, in the order of this type's
    /// fields (the order the service declares them), those computed when
    /// read (`InUseBy`, `HostUsers`, `AutoReturn`,
    /// `PersistentDriver`, `PersistentOrigin`) last: what
    /// [`from_properties`](Self::from_properties) reads back. The service
    /// sends its changed ones in PropertiesChanged, never those
    /// ([`COMPUTED_WHEN_READ`](Self::COMPUTED_WHEN_READ)).
    pub fn to_entries(&self) -> Vec<(&'static str, OwnedVariant)> {
        vec![
            (property::ADDRESS, variant(self.address.as_str())),
            (property::VENDOR_ID, variant(self.vendor_id)),
            (property::DEVICE_ID, variant(self.device_id)),
            (
                property::SUBSYSTEM_VENDOR_ID,
                variant(self.subsystem_vendor_id),
            ),
            (
                property::SUBSYSTEM_DEVICE_ID,
                variant(self.subsystem_device_id),
            ),
            (property::CLASS, variant(self.class)),
            (property::VENDOR_NAME, variant(self.vendor_name.as_str())),
            (property::DEVICE_NAME, variant(self.device_name.as_str())),
            (property::DRIVER, variant(self.driver.as_str())),
            (property::IOMMU_GROUP, variant(self.iommu_group)),
            (
                property::IOMMU_GROUP_DEVICES,
                variant(&self.iommu_group_devices),
            ),
            (property::NUMA_NODE, variant(self.numa_node)),
            (property::SRIOV_TOTAL_VFS, variant(self.sriov_total_vfs)),
            (property::SRIOV_NUM_VFS, variant(self.sriov_num_vfs)),
            (
                property::PHYSICAL_FUNCTION,
                variant(self.physical_function.as_str()),
            ),
            (property::PERMITTED, variant(self.permitted)),
            (
                property::RESOURCE_NAME,
                variant(self.resource_name.as_str()),
            ),
            (property::PASSTHROUGH_READY, variant(self.passthrough_ready)),
            (
                property::PASSTHROUGH_BLOCKERS,
                variant(&self.passthrough_blockers),
            ),
            (
                property::IN_USE_BY,
                variant(
                    self.in_use_by
                        .iter()
                        .map(VfioUser::to_dict)
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                property::HOST_USERS,
                variant(
                    self.host_users
                        .iter()
                        .map(HostUser::to_dict)
                        .collect::<Vec<_>>(),
                ),
            ),
            (property::AUTO_RETURN, variant(self.auto_return)),
            (
                property::PERSISTENT_DRIVER,
                variant(self.persistent_driver.as_str()),
            ),
            (
                property::PERSISTENT_ORIGIN,
                variant(self.persistent_origin.as_str()),
            ),
        ]
    }

    /// The properties computed when read: never in PropertiesChanged.
    pub const COMPUTED_WHEN_READ: [&'static str; 5] = [
        property::IN_USE_BY,
        property::HOST_USERS,
        property::AUTO_RETURN,
        property::PERSISTENT_DRIVER,
        property::PERSISTENT_ORIGIN,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dict::variant;

    #[test]
    fn reads_properties_and_applies_changes() {
        let mut device = DeviceProperties::from_properties(&Dict::from([
            (property::ADDRESS.into(), variant("0000:03:00.0")),
            (property::VENDOR_ID.into(), variant(0x10deu16)),
            (property::IOMMU_GROUP.into(), variant(14i32)),
            (property::DRIVER.into(), variant("nouveau")),
            (
                property::IN_USE_BY.into(),
                variant(vec![Dict::from([
                    (user::PID.into(), variant(42u32)),
                    (user::VM_NAME.into(), variant("w")),
                ])]),
            ),
        ]));
        assert_eq!(device.vendor_id, 0x10de);
        assert_eq!(device.iommu_group, 14);
        assert_eq!(device.numa_node, -1);
        assert_eq!(device.in_use_by[0].vm_name, "w");
        device.update(&Dict::from([
            (property::DRIVER.into(), variant("vfio-pci")),
            (property::PASSTHROUGH_READY.into(), variant(true)),
        ]));
        assert_eq!(device.driver, "vfio-pci");
        assert!(device.passthrough_ready);
        assert_eq!(device.address, "0000:03:00.0");
    }

    /// Every field differs from its default and from the fields of the
    /// same type, so a missing, misspelled or swapped key shows.
    fn every_field_set() -> DeviceProperties {
        DeviceProperties {
            address: "0000:03:00.0".into(),
            vendor_id: 0x10de,
            device_id: 0x1eb8,
            subsystem_vendor_id: 0x10df,
            subsystem_device_id: 0x12a2,
            class: 0x030000,
            vendor_name: "NVIDIA Corporation".into(),
            device_name: "TU104GL [Tesla T4]".into(),
            driver: "vfio-pci".into(),
            iommu_group: 14,
            iommu_group_devices: vec!["0000:03:00.0".into(), "0000:03:00.1".into()],
            numa_node: 1,
            sriov_total_vfs: 8,
            sriov_num_vfs: 2,
            physical_function: "0000:02:00.0".into(),
            permitted: true,
            resource_name: "nvidia.com/T4".into(),
            passthrough_ready: true,
            passthrough_blockers: vec!["a blocker".into()],
            in_use_by: vec![VfioUser {
                pid: 42,
                exe: "/usr/bin/qemu-system-x86_64".into(),
                vm_name: "win11".into(),
            }],
            host_users: vec![HostUser {
                kind: "mount".into(),
                text: "block device nvme0n1p2 backs /".into(),
            }],
            auto_return: true,
            persistent_driver: "vfio-pci".into(),
            persistent_origin: "vmmanager".into(),
        }
    }

    #[test]
    fn entries_read_back_as_the_same_properties() {
        let device = every_field_set();
        let entries = device.to_entries();
        let properties: Dict = entries
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.try_clone().unwrap()))
            .collect();
        assert_eq!(properties.len(), entries.len(), "a name is encoded twice");
        assert_eq!(DeviceProperties::from_properties(&properties), device);
    }

    #[test]
    fn vfio_user_reads_back_as_the_same_user() {
        let user = every_field_set().in_use_by.remove(0);
        assert_eq!(VfioUser::from_dict(&user.to_dict()), user);
    }
}
