//! The `PciDevice` properties as the D-Bus API spells them, computed from
//! the domain's [`DeviceState`] in one place ([`DeviceProperties::of`]):
//! the object's getters read it, and PropertiesChanged compares two of them
//! ([`changed`]), so the two can never disagree.
//!
//! The domain says "none" with `Option`; the API says it with `""` (driver,
//! physical function) and `-1` (IOMMU group). `InUseBy` is not here: it is
//! computed when read and never signalled.

use zbus::OwnedVariant;

use super::values::variant;
use crate::devices::inventory::DeviceState;

/// Every signalled property of one device, in the API's types and
/// spellings. Field names are the D-Bus names in snake case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProperties {
    pub address: String,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_device_id: u16,
    pub class: u32,
    pub vendor_name: String,
    pub device_name: String,
    pub driver: String,
    pub iommu_group: i32,
    pub iommu_group_devices: Vec<String>,
    pub numa_node: i32,
    pub sriov_total_vfs: u32,
    pub sriov_num_vfs: u32,
    pub physical_function: String,
    pub permitted: bool,
    pub resource_name: String,
    pub passthrough_ready: bool,
    pub passthrough_blockers: Vec<String>,
}

impl DeviceProperties {
    /// The one conversion from the domain state.
    pub fn of(state: &DeviceState) -> Self {
        let info = &state.info;
        DeviceProperties {
            address: info.address.to_string(),
            vendor_id: info.vendor_id,
            device_id: info.device_id,
            subsystem_vendor_id: info.subsystem_vendor_id,
            subsystem_device_id: info.subsystem_device_id,
            class: info.class,
            vendor_name: state.vendor_name.clone(),
            device_name: state.device_name.clone(),
            driver: info.driver.clone().unwrap_or_default(),
            iommu_group: info
                .iommu_group
                .and_then(|g| i32::try_from(g).ok())
                .unwrap_or(-1),
            iommu_group_devices: state.iommu_group_devices.clone(),
            numa_node: info.numa_node,
            sriov_total_vfs: info.sriov_total_vfs,
            sriov_num_vfs: info.sriov_num_vfs,
            physical_function: info
                .physical_function
                .map(|a| a.to_string())
                .unwrap_or_default(),
            permitted: state.permitted,
            resource_name: state.resource_name.clone(),
            passthrough_ready: state.passthrough_ready,
            passthrough_blockers: state.passthrough_blockers.clone(),
        }
    }

    /// `(D-Bus name, value)` of every property, in the XML's order.
    pub fn entries(&self) -> Vec<(&'static str, OwnedVariant)> {
        vec![
            ("Address", variant(self.address.as_str())),
            ("VendorId", variant(self.vendor_id)),
            ("DeviceId", variant(self.device_id)),
            ("SubsystemVendorId", variant(self.subsystem_vendor_id)),
            ("SubsystemDeviceId", variant(self.subsystem_device_id)),
            ("Class", variant(self.class)),
            ("VendorName", variant(self.vendor_name.as_str())),
            ("DeviceName", variant(self.device_name.as_str())),
            ("Driver", variant(self.driver.as_str())),
            ("IommuGroup", variant(self.iommu_group)),
            ("IommuGroupDevices", variant(&self.iommu_group_devices)),
            ("NumaNode", variant(self.numa_node)),
            ("SriovTotalVfs", variant(self.sriov_total_vfs)),
            ("SriovNumVfs", variant(self.sriov_num_vfs)),
            ("PhysicalFunction", variant(self.physical_function.as_str())),
            ("Permitted", variant(self.permitted)),
            ("ResourceName", variant(self.resource_name.as_str())),
            ("PassthroughReady", variant(self.passthrough_ready)),
            ("PassthroughBlockers", variant(&self.passthrough_blockers)),
        ]
    }
}

/// The properties whose values differ between `old` and `new`, with their
/// new values, in the XML's order: what one PropertiesChanged carries.
/// Domain fields the API does not show (`driver_override`, `modalias`)
/// never count.
pub fn changed(old: &DeviceState, new: &DeviceState) -> Vec<(&'static str, OwnedVariant)> {
    let old = DeviceProperties::of(old).entries();
    DeviceProperties::of(new)
        .entries()
        .into_iter()
        .zip(old)
        .filter(|(new, old)| new.1 != old.1)
        .map(|(new, _)| new)
        .collect()
}
