//! The `PciDevice` properties of a device, computed from the domain's
//! [`DeviceState`] in one place ([`of`]): the object's getters read it, and
//! PropertiesChanged compares two of them ([`changed`]), so the two can
//! never disagree. The model and its D-Bus names are the client crate's
//! [`DeviceProperties`], which clients decode with.
//!
//! The domain says "none" with `Option`; the API says it with `""` (names,
//! driver, physical function, resource name) and `-1` (IOMMU group, NUMA
//! node). `InUseBy`, `HostUsers` and `Persistent*` are computed when read
//! ([`vfio_user`], [`host_user`]) and never signalled.

use vmmanager_client::{DeviceProperties, HostUser, VfioUser};
use zbus::OwnedVariant;

use crate::devices::gate::PublicUse;
use crate::devices::inventory::DeviceState;
use crate::devices::vfio;

/// The one conversion from the domain state; what is computed when read
/// (`in_use_by`, `host_users`, `persistent_*`) is left empty.
pub fn of(state: &DeviceState) -> DeviceProperties {
    let info = &state.info;
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    DeviceProperties {
        address: info.address.to_string(),
        vendor_id: info.vendor_id,
        device_id: info.device_id,
        subsystem_vendor_id: info.subsystem_vendor_id,
        subsystem_device_id: info.subsystem_device_id,
        class: info.class,
        vendor_name: text(&state.vendor_name),
        device_name: text(&state.device_name),
        driver: text(&info.driver),
        iommu_group: signed_or_minus_one(info.iommu_group),
        iommu_group_devices: state.iommu_group_devices.clone(),
        numa_node: signed_or_minus_one(info.numa_node),
        sriov_total_vfs: info.sriov_total_vfs,
        sriov_num_vfs: info.sriov_num_vfs,
        physical_function: info
            .physical_function
            .map(|a| a.to_string())
            .unwrap_or_default(),
        permitted: state.permitted(),
        resource_name: text(&state.resource_name),
        passthrough_ready: state.passthrough_ready,
        passthrough_blockers: state.passthrough_blockers.clone(),
        in_use_by: Vec::new(),
        host_users: Vec::new(),
        auto_return: false,
        persistent_driver: String::new(),
        persistent_origin: String::new(),
    }
}

/// `-1` for none, and for a number the API's `i` cannot hold.
fn signed_or_minus_one(value: Option<u32>) -> i32 {
    value.and_then(|n| i32::try_from(n).ok()).unwrap_or(-1)
}

/// One holder of a VFIO group as an `InUseBy` entry.
pub fn vfio_user(user: &vfio::VfioUser) -> VfioUser {
    VfioUser {
        pid: user.pid,
        exe: user.exe.clone(),
        vm_name: user.vm_name.clone(),
    }
}

/// One public host use as a `HostUsers` entry.
pub fn host_user((kind, text): PublicUse) -> HostUser {
    HostUser {
        kind: kind.to_owned(),
        text,
    }
}

/// The properties whose values differ between `old` and `new`, with their
/// new values, in [`DeviceProperties::to_entries`]'s order: what one
/// PropertiesChanged carries. Properties computed when read
/// ([`DeviceProperties::COMPUTED_WHEN_READ`]) never count, nor do domain
/// fields the API does not show (`driver_override`, `modalias`).
pub fn changed(old: &DeviceState, new: &DeviceState) -> Vec<(&'static str, OwnedVariant)> {
    let old = of(old).to_entries();
    of(new)
        .to_entries()
        .into_iter()
        .zip(old)
        .filter(|(new, old)| {
            !DeviceProperties::COMPUTED_WHEN_READ.contains(&new.0) && new.1 != old.1
        })
        .map(|(new, _)| new)
        .collect()
}
