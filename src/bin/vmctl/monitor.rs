//! `monitor`: the service's signals, live, until interrupted.

use futures_util::StreamExt;
use vmmanager_client::dict::Dict;
use vmmanager_client::json::dict_to_json;
use vmmanager_client::names::{BUS_NAME, DEVICE_INTERFACE, MANAGER_PATH, signal};
use vmmanager_client::{CheckReport, CheckResult, DeviceProperties, PciAddress};
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream};

use crate::{Failure, exit, style};

fn now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}

/// `/org/example/VmManager/devices/pci_0000_03_00_0` → `0000:03:00.0`.
fn device_address(path: &str) -> Option<String> {
    PciAddress::from_object_path(path)
        .ok()
        .map(|a| a.to_string())
}

/// One signal as (human line, JSON document); `None` for signals that are
/// not worth a line.
fn describe(message: &zbus::Message) -> Option<(String, serde_json::Value)> {
    let header = message.header();
    let member = header.member()?.to_string();
    let path = header.path()?.to_string();
    let interface = header.interface()?.to_string();
    let body = message.body();
    let mut json = serde_json::json!({
        "time": now(),
        "signal": format!("{interface}.{member}"),
        "path": path,
    });
    let line = match member.as_str() {
        signal::DISK_CHECKED => {
            let (image, dict): (String, Dict) = body.deserialize().ok()?;
            let report = CheckReport::from_signal(&image, &dict);
            let outcome = match &report.error {
                Some(error) => format!("{} {}", style::out(style::RED, "failed:"), error.message),
                None => {
                    let colour = match &report.result {
                        Some(CheckResult::Clean) => style::GREEN,
                        Some(CheckResult::Leaks) => style::YELLOW,
                        Some(CheckResult::Corrupt) => style::RED,
                        Some(CheckResult::NotSupported | CheckResult::Unknown(_)) | None => "",
                    };
                    let result = report.result.as_ref().map_or("", CheckResult::as_str);
                    if colour.is_empty() {
                        result.to_owned()
                    } else {
                        style::out(colour, result).into_owned()
                    }
                }
            };
            json["image"] = image.clone().into();
            json["report"] = dict_to_json(&dict);
            format!("disk {image}: {outcome}")
        }
        "InterfacesAdded" => {
            type Added = std::collections::HashMap<String, Dict>;
            let (object, interfaces): (zbus::OwnedObjectPath, Added) = body.deserialize().ok()?;
            let properties = interfaces.get(DEVICE_INTERFACE)?;
            let address = device_address(object.as_str())?;
            let DeviceProperties {
                passthrough_ready: ready,
                driver,
                ..
            } = DeviceProperties::from_properties(properties);
            json["object"] = object.as_str().into();
            json["properties"] = dict_to_json(properties);
            format!(
                "device {address} added (driver {}, {})",
                if driver.is_empty() { "none" } else { &driver },
                if ready {
                    style::out(style::GREEN, "ready for passthrough")
                } else {
                    "not ready for passthrough".into()
                }
            )
        }
        "InterfacesRemoved" => {
            let (object, _): (zbus::OwnedObjectPath, Vec<String>) = body.deserialize().ok()?;
            let address = device_address(object.as_str())?;
            json["object"] = object.as_str().into();
            format!("device {address} removed")
        }
        "PropertiesChanged" => {
            let (iface, changed, _): (String, Dict, Vec<String>) = body.deserialize().ok()?;
            let changed = dict_to_json(&changed);
            let what = changed
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            json["interface"] = iface.into();
            json["changed"] = changed;
            match device_address(&path) {
                Some(address) => format!("device {address}: {what}"),
                None => format!("{path}: {what}"),
            }
        }
        signal::UEVENT => {
            let action: String = body.deserialize().ok()?;
            json["action"] = action.clone().into();
            format!("device {}: {action} event", device_address(&path)?)
        }
        signal::RETURN_FINISHED => {
            let (outcome, message): (String, String) = body.deserialize().ok()?;
            json["outcome"] = outcome.clone().into();
            json["message"] = message.clone().into();
            format!(
                "device {}: given back after use: {outcome}: {message}",
                device_address(&path)?
            )
        }
        signal::COMPLETED => return None,
        other => format!("{path}: {interface}.{other}"),
    };
    Some((format!("{} {line}", now()), json))
}

pub async fn monitor(connection: &Connection, json: bool) -> Result<u8, Failure> {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(BUS_NAME)
        .path_namespace(MANAGER_PATH)
        .build()?;
    let mut stream =
        MessageStream::for_match_rule(rule, connection, std::num::NonZeroUsize::new(256)).await?;
    if !json {
        eprintln!("Watching {BUS_NAME}; Ctrl-C to stop.");
    }
    loop {
        tokio::select! {
            message = stream.next() => {
                let Some(Ok(message)) = message else {
                    return Err(Failure::from(zbus::Error::Failure("the bus connection closed".into())));
                };
                if let Some((line, doc)) = describe(&message) {
                    if json {
                        outln!("{doc}");
                    } else {
                        outln!("{line}");
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(exit::CLEAN),
        }
    }
}
