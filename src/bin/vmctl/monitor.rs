//! `monitor`: the service's signals, live, until interrupted.

use futures_util::StreamExt;
use vmmanager::client::dict_to_json;
use vmmanager::devices::address::PciAddress;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream, OwnedVariant};

use crate::{Failure, exit, style};

const MANAGER_PATH: &str = "/org/example/VmManager";

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
    let name = path.strip_prefix("/org/example/VmManager/devices/")?;
    PciAddress::from_object_name(name)
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
        "DiskChecked" => {
            let (image, report): (String, std::collections::HashMap<String, OwnedVariant>) =
                body.deserialize().ok()?;
            let report = dict_to_json(&report);
            let outcome = match report.get("error-message").and_then(|m| m.as_str()) {
                Some(message) => format!("{} {message}", style::out(style::RED, "failed:")),
                None => {
                    let result = report["result"].as_str().unwrap_or("");
                    let colour = match result {
                        "clean" => style::GREEN,
                        "leaks" => style::YELLOW,
                        "corrupt" => style::RED,
                        _ => "",
                    };
                    if colour.is_empty() {
                        result.to_owned()
                    } else {
                        style::out(colour, result).into_owned()
                    }
                }
            };
            json["image"] = image.clone().into();
            json["report"] = report;
            format!("disk {image}: {outcome}")
        }
        "InterfacesAdded" => {
            type Added =
                std::collections::HashMap<String, std::collections::HashMap<String, OwnedVariant>>;
            let (object, interfaces): (zbus::OwnedObjectPath, Added) = body.deserialize().ok()?;
            let properties = interfaces.get("org.example.VmManager1.PciDevice")?;
            let properties = dict_to_json(properties);
            let address = device_address(object.as_str())?;
            let ready = properties["PassthroughReady"].as_bool() == Some(true);
            let driver = properties["Driver"].as_str().unwrap_or("").to_owned();
            json["object"] = object.as_str().into();
            json["properties"] = properties;
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
            let (iface, changed, _): (
                String,
                std::collections::HashMap<String, OwnedVariant>,
                Vec<String>,
            ) = body.deserialize().ok()?;
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
        "Uevent" => {
            let action: String = body.deserialize().ok()?;
            json["action"] = action.clone().into();
            format!("device {}: {action} event", device_address(&path)?)
        }
        "Completed" => return None,
        other => format!("{path}: {interface}.{other}"),
    };
    Some((format!("{} {line}", now()), json))
}

pub async fn monitor(connection: &Connection, json: bool) -> Result<u8, Failure> {
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender("org.example.VmManager")
        .path_namespace(MANAGER_PATH)
        .build()?;
    let mut stream =
        MessageStream::for_match_rule(rule, connection, std::num::NonZeroUsize::new(256)).await?;
    if !json {
        eprintln!("Watching org.example.VmManager; Ctrl-C to stop.");
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
