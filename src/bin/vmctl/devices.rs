//! `devices`, `device`, `detach`, `reattach`.

use std::collections::BTreeMap;

use vmmanager_client::dict::Dict;
use vmmanager_client::json::variant_to_json;
use vmmanager_client::names::{DEVICE_INTERFACE, property};
use vmmanager_client::options::BindingOptions;
use vmmanager_client::{DeviceProperties, Error, PciAddress, PciDeviceProxy, object_manager};
use zbus::Connection;

use crate::{Failure, exit, style};

/// One device's properties as JSON values by D-Bus property name (what
/// `--json` prints), and decoded.
struct Device {
    json: BTreeMap<String, serde_json::Value>,
    properties: DeviceProperties,
}

impl Device {
    fn new(properties: &Dict) -> Device {
        Device {
            json: properties
                .iter()
                .map(|(k, v)| (k.clone(), variant_to_json(v)))
                .collect(),
            properties: DeviceProperties::from_properties(properties),
        }
    }
}

/// Every device object and its properties, sorted by address.
async fn all_devices(connection: &Connection) -> Result<Vec<Device>, Failure> {
    let objects = object_manager(connection)
        .await?
        .get_managed_objects()
        .await
        .map_err(zbus::Error::from)?;
    let mut devices: Vec<Device> = objects
        .values()
        .filter_map(|interfaces| {
            interfaces
                .iter()
                .find(|(name, _)| name.as_str() == DEVICE_INTERFACE)
        })
        .map(|(_, properties)| Device::new(properties))
        .collect();
    devices.sort_by(|a, b| a.properties.address.cmp(&b.properties.address));
    Ok(devices)
}

/// `VM "win11" (PID 4242)` for each process holding the VFIO group.
fn users(device: &DeviceProperties) -> String {
    if device.in_use_by.is_empty() {
        return "-".into();
    }
    device
        .in_use_by
        .iter()
        .map(|u| match u.vm_name.as_str() {
            "" => format!("PID {}", u.pid),
            name => format!("VM \"{name}\" (PID {})", u.pid),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `HostUsers` as one line: each use's sentence, `-` for none.
fn host_uses(device: &DeviceProperties) -> String {
    if device.host_users.is_empty() {
        return "-".into();
    }
    let texts: Vec<&str> = device.host_users.iter().map(|u| u.text.as_str()).collect();
    texts.join("; ")
}

fn readiness(device: &DeviceProperties) -> String {
    if device.passthrough_ready {
        return "ready".into();
    }
    let blockers = &device.passthrough_blockers;
    match blockers.first() {
        Some(first) if blockers.len() > 1 => format!("no: {first} (+{} more)", blockers.len() - 1),
        Some(first) => format!("no: {first}"),
        None => "no".into(),
    }
}

fn name(device: &DeviceProperties) -> String {
    [device.vendor_name.as_str(), device.device_name.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn devices(connection: &Connection, json: bool) -> Result<u8, Failure> {
    let devices = all_devices(connection).await?;
    if json {
        let json: Vec<_> = devices.iter().map(|d| &d.json).collect();
        outln!("{:#}", serde_json::json!(json));
        return Ok(exit::CLEAN);
    }
    let rows: Vec<[String; 7]> = devices
        .iter()
        .map(|Device { properties: d, .. }| {
            let group = match d.iommu_group {
                g if g >= 0 => g.to_string(),
                _ => "-".into(),
            };
            [
                d.address.clone(),
                format!("{:04x}:{:04x}", d.vendor_id, d.device_id),
                if d.driver.is_empty() {
                    "-".into()
                } else {
                    d.driver.clone()
                },
                group,
                readiness(d),
                users(d),
                name(d),
            ]
        })
        .collect();
    const PASSTHROUGH_COLUMN: usize = 4;
    const IN_USE_COLUMN: usize = 5;
    let header = [
        "ADDRESS",
        "ID",
        "DRIVER",
        "GROUP",
        "PASSTHROUGH",
        "IN USE BY",
        "NAME",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for (r, row) in std::iter::once(&header).chain(&rows).enumerate() {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            // Colour the text only, then pad: escape codes have no width.
            let colour = match (r, i, cell.as_str()) {
                (0, _, _) => Some(style::BOLD),
                (_, PASSTHROUGH_COLUMN, "ready") => Some(style::GREEN),
                (_, IN_USE_COLUMN, used) if used != "-" => Some(style::YELLOW),
                _ => None,
            };
            line += &colour.map_or(cell.into(), |c| style::out(c, cell));
            if i + 1 < row.len() {
                let padding = widths[i] - cell.chars().count() + 2;
                line += &" ".repeat(padding);
            }
        }
        outln!("{}", line.trim_end());
    }
    Ok(exit::CLEAN)
}

fn parse_address(address: &str) -> Result<zbus::OwnedObjectPath, Failure> {
    address
        .parse::<PciAddress>()
        .map(|a| a.object_path())
        .map_err(|_| {
            Failure::usage(format!(
                "{address:?} is not a PCI address (expected DDDD:BB:SS.F, e.g. 0000:03:00.0)"
            ))
        })
}

/// Turns the bus's "no such object" into the service's NotFound, about the
/// device.
fn no_such_device(address: &str, e: zbus::Error) -> Failure {
    use zbus::fdo::Error as Fdo;
    match Fdo::from(e.clone()) {
        Fdo::UnknownObject(_) | Fdo::UnknownInterface(_) | Fdo::UnknownMethod(_) => Failure::local(
            exit::ERROR,
            Error::NotFound(format!("no PCI device {address} on this host")),
        ),
        _ => Failure::from(e),
    }
}

pub async fn device(connection: &Connection, address: &str, json: bool) -> Result<u8, Failure> {
    let path = parse_address(address)?;
    let properties = zbus::fdo::PropertiesProxy::builder(connection)
        .destination(vmmanager_client::names::BUS_NAME)
        .path(path)
        .build()
        .await?
        .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
            DEVICE_INTERFACE,
        ))
        .await
        .map_err(|e| no_such_device(address, e.into()))?;
    let properties: Dict = properties
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let Device {
        json: properties,
        properties: device,
    } = Device::new(&properties);
    if json {
        outln!("{:#}", serde_json::json!(properties));
        return Ok(exit::CLEAN);
    }
    let width = properties.keys().map(String::len).max().unwrap_or(0);
    for (key, value) in &properties {
        let shown = match (key.as_str(), value) {
            // Ids and classes read as lspci shows them.
            (
                property::VENDOR_ID
                | property::DEVICE_ID
                | property::SUBSYSTEM_VENDOR_ID
                | property::SUBSYSTEM_DEVICE_ID,
                v,
            ) => v
                .as_u64()
                .map_or_else(|| v.to_string(), |n| format!("0x{n:04x}")),
            (property::CLASS, v) => v
                .as_u64()
                .map_or_else(|| v.to_string(), |n| format!("0x{n:06x}")),
            (property::IN_USE_BY, _) => users(&device),
            (property::HOST_USERS, _) => host_uses(&device),
            (_, serde_json::Value::String(s)) if s.is_empty() => "-".into(),
            (_, value) => match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(items) if items.is_empty() => "-".into(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            },
        };
        let colour = match (key.as_str(), value) {
            (property::PASSTHROUGH_READY, serde_json::Value::Bool(true)) => Some(style::GREEN),
            (
                property::PASSTHROUGH_BLOCKERS | property::IN_USE_BY | property::HOST_USERS,
                serde_json::Value::Array(items),
            ) if !items.is_empty() => Some(style::YELLOW),
            _ => None,
        };
        let shown = colour.map_or(shown.as_str().into(), |c| style::out(c, &shown));
        outln!("{key:>width$}: {shown}");
    }
    Ok(exit::CLEAN)
}

/// Which way a device moves, and how.
#[derive(Debug, Clone, Copy)]
pub struct Rebind {
    /// Detach (else Reattach).
    pub to_vfio: bool,
    /// The whole IOMMU group.
    pub group: bool,
    /// Detach although the host uses it.
    pub force: bool,
    /// Give it back after its last VM user exits.
    pub auto_return: bool,
    /// The boot-time claim follows (option `persistent`).
    pub persistent: bool,
}

/// Detach or Reattach, of the device or its whole group, then say where
/// the device (each member) is now.
pub async fn rebind(
    connection: &Connection,
    ask: bool,
    address: &str,
    how: Rebind,
    json: bool,
) -> Result<u8, Failure> {
    let Rebind {
        to_vfio,
        group,
        force,
        auto_return,
        persistent,
    } = how;
    let device = device_proxy(connection, address).await?;
    let options = BindingOptions::new()
        .group(group)
        .force(force)
        .auto_return(auto_return)
        .persistent(persistent)
        .no_user_interaction(!ask)
        .build();
    let result = if to_vfio {
        device.detach(options).await
    } else {
        device.reattach(options).await
    };
    result.map_err(|e| no_such_device(address, e))?;
    let driver = device.driver().await.unwrap_or_default();
    let mut members = Vec::new();
    if group {
        for member in device.iommu_group_devices().await.unwrap_or_default() {
            let driver = match device_proxy(connection, &member).await {
                Ok(proxy) => proxy.driver().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            members.push((member, driver));
        }
    }
    if json {
        // "" for no driver, as in the Driver property.
        let mut out = serde_json::json!({ "address": address, "driver": driver });
        if group {
            out["group"] = members
                .iter()
                .map(|(a, d)| serde_json::json!({ "address": a, "driver": d }))
                .collect();
        }
        outln!("{out:#}");
        return Ok(exit::CLEAN);
    }
    let shown = |driver: &str| {
        if driver.is_empty() {
            "no driver".to_owned()
        } else {
            driver.to_owned()
        }
    };
    if group {
        for (member, driver) in &members {
            outln!("{member}: {}", shown(driver));
        }
    } else {
        outln!("{address}: {}", shown(&driver));
    }
    Ok(exit::CLEAN)
}

async fn device_proxy(
    connection: &Connection,
    address: &str,
) -> Result<PciDeviceProxy<'static>, Failure> {
    let path = parse_address(address)?;
    Ok(PciDeviceProxy::builder(connection)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?)
}
