//! `devices`, `device`, `detach`, `reattach`.

use std::collections::{BTreeMap, HashMap};

use vmmanager::client::{PciDeviceProxy, device_path, variant_to_json};
use zbus::fdo::ObjectManagerProxy;
use zbus::{Connection, Variant};

use crate::{Failure, exit, style};

const DEVICE_INTERFACE: &str = "org.example.VmManager1.PciDevice";

/// One device's properties, as JSON values by D-Bus property name.
type Properties = BTreeMap<String, serde_json::Value>;

/// Every device object and its properties, sorted by address.
async fn all_devices(connection: &Connection) -> Result<Vec<Properties>, Failure> {
    let manager = ObjectManagerProxy::builder(connection)
        .destination("org.example.VmManager")
        .path("/org/example/VmManager")
        .build()
        .await?;
    let objects = manager
        .get_managed_objects()
        .await
        .map_err(zbus::Error::from)?;
    let mut devices: Vec<Properties> = objects
        .values()
        .filter_map(|interfaces| {
            interfaces
                .iter()
                .find(|(name, _)| name.as_str() == DEVICE_INTERFACE)
        })
        .map(|(_, properties)| {
            properties
                .iter()
                .map(|(k, v)| (k.clone(), variant_to_json(v)))
                .collect()
        })
        .collect();
    devices.sort_by_key(|d| text(d, "Address"));
    Ok(devices)
}

fn text(properties: &Properties, key: &str) -> String {
    match properties.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn list(properties: &Properties, key: &str) -> Vec<String> {
    properties
        .get(key)
        .and_then(|v| v.as_array())
        .map(|items| {
            items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn hex4(properties: &Properties, key: &str) -> String {
    properties
        .get(key)
        .and_then(|v| v.as_u64())
        .map_or_else(|| "????".into(), |n| format!("{n:04x}"))
}

/// `VM "win11" (PID 4242)` for each process holding the VFIO group.
fn users(properties: &Properties) -> String {
    let Some(users) = properties.get("InUseBy").and_then(|v| v.as_array()) else {
        return "-".into();
    };
    if users.is_empty() {
        return "-".into();
    }
    users
        .iter()
        .map(|u| {
            let pid = u["pid"].as_u64().unwrap_or(0);
            match u["vm-name"].as_str() {
                Some(name) if !name.is_empty() => format!("VM \"{name}\" (PID {pid})"),
                _ => format!("PID {pid}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn readiness(properties: &Properties) -> String {
    if properties.get("PassthroughReady") == Some(&serde_json::Value::Bool(true)) {
        return "ready".into();
    }
    let blockers = list(properties, "PassthroughBlockers");
    match blockers.first() {
        Some(first) if blockers.len() > 1 => format!("no: {first} (+{} more)", blockers.len() - 1),
        Some(first) => format!("no: {first}"),
        None => "no".into(),
    }
}

fn name(properties: &Properties) -> String {
    let vendor = text(properties, "VendorName");
    let device = text(properties, "DeviceName");
    match (vendor.is_empty(), device.is_empty()) {
        (true, true) => String::new(),
        (false, true) => vendor,
        (true, false) => device,
        (false, false) => format!("{vendor} {device}"),
    }
}

pub async fn devices(connection: &Connection, json: bool) -> Result<u8, Failure> {
    let devices = all_devices(connection).await?;
    if json {
        outln!("{:#}", serde_json::json!(devices));
        return Ok(exit::CLEAN);
    }
    let rows: Vec<[String; 7]> = devices
        .iter()
        .map(|d| {
            let group = match d.get("IommuGroup").and_then(|v| v.as_i64()) {
                Some(g) if g >= 0 => g.to_string(),
                _ => "-".into(),
            };
            let driver = text(d, "Driver");
            [
                text(d, "Address"),
                format!("{}:{}", hex4(d, "VendorId"), hex4(d, "DeviceId")),
                if driver.is_empty() {
                    "-".into()
                } else {
                    driver
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
    device_path(address).ok_or_else(|| {
        Failure::usage(format!(
            "{address:?} is not a PCI address (expected DDDD:BB:SS.F, e.g. 0000:03:00.0)"
        ))
    })
}

/// Turns "no such object" into a message about the device.
fn no_such_device(address: &str, e: zbus::Error) -> Failure {
    use zbus::DBusError;
    let name = match &e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(fdo) => fdo.name().to_string(),
        _ => String::new(),
    };
    let unknown = [
        "org.freedesktop.DBus.Error.UnknownObject",
        "org.freedesktop.DBus.Error.UnknownInterface",
        "org.freedesktop.DBus.Error.UnknownMethod",
    ];
    if unknown.contains(&name.as_str()) {
        return Failure {
            code: exit::ERROR,
            error_name: Some("org.example.VmManager1.Error.NotFound".into()),
            message: format!("no PCI device {address} on this host"),
        };
    }
    Failure::from(e)
}

pub async fn device(connection: &Connection, address: &str, json: bool) -> Result<u8, Failure> {
    let path = parse_address(address)?;
    let properties = zbus::fdo::PropertiesProxy::builder(connection)
        .destination("org.example.VmManager")
        .path(path)
        .build()
        .await?
        .get_all(zbus::names::InterfaceName::from_static_str_unchecked(
            DEVICE_INTERFACE,
        ))
        .await
        .map_err(|e| no_such_device(address, e.into()))?;
    let properties: Properties = properties
        .iter()
        .map(|(k, v)| (k.to_string(), variant_to_json(v)))
        .collect();
    if json {
        outln!("{:#}", serde_json::json!(properties));
        return Ok(exit::CLEAN);
    }
    let width = properties.keys().map(String::len).max().unwrap_or(0);
    for (key, value) in &properties {
        let shown = match (key.as_str(), value) {
            // Ids and classes read as lspci shows them.
            ("VendorId" | "DeviceId" | "SubsystemVendorId" | "SubsystemDeviceId", v) => v
                .as_u64()
                .map_or_else(|| v.to_string(), |n| format!("0x{n:04x}")),
            ("Class", v) => v
                .as_u64()
                .map_or_else(|| v.to_string(), |n| format!("0x{n:06x}")),
            ("InUseBy", _) => users(&properties),
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
            ("PassthroughReady", serde_json::Value::Bool(true)) => Some(style::GREEN),
            ("PassthroughBlockers" | "InUseBy", serde_json::Value::Array(items))
                if !items.is_empty() =>
            {
                Some(style::YELLOW)
            }
            _ => None,
        };
        let shown = colour.map_or(shown.as_str().into(), |c| style::out(c, &shown));
        outln!("{key:>width$}: {shown}");
    }
    Ok(exit::CLEAN)
}

/// Detach (`to_vfio`) or Reattach, then say where the device is now.
pub async fn rebind(
    connection: &Connection,
    options: HashMap<&str, Variant<'_>>,
    address: &str,
    to_vfio: bool,
    json: bool,
) -> Result<u8, Failure> {
    let path = parse_address(address)?;
    let device = PciDeviceProxy::builder(connection)
        .path(path)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let result = if to_vfio {
        device.detach(options).await
    } else {
        device.reattach(options).await
    };
    result.map_err(|e| no_such_device(address, e))?;
    let driver = device.driver().await.unwrap_or_default();
    if json {
        // "" for no driver, as in the Driver property.
        outln!(
            "{:#}",
            serde_json::json!({ "address": address, "driver": driver })
        );
        return Ok(exit::CLEAN);
    }
    let driver = if driver.is_empty() {
        "no driver".to_owned()
    } else {
        driver
    };
    outln!("{address}: {driver}");
    Ok(exit::CLEAN)
}
