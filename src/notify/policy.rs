//! Which signal becomes which notification: summary, body, urgency, icon
//! and category. Plain functions on plain values, so every wording and
//! every urgency is unit-tested without a bus or a notification server.
//!
//! Icons are names from the freedesktop icon naming specification, so every
//! icon theme has them; categories are the notification spec's `device.*`
//! ones, and `x-vmmanager.*` (the spec's form for vendor categories) for
//! disk checks.

use std::path::Path;

pub use vmmanager_client::{CheckReport, DeviceProperties};
use vmmanager_client::{CheckResult, Error};

/// The application name every notification carries.
pub const APP_NAME: &str = "VM Manager";
/// The `desktop-entry` hint: `vmmanager-notify.desktop`.
pub const DESKTOP_ENTRY: &str = "vmmanager-notify";
/// The identifier of the "Repair leaks" action.
pub const REPAIR_LEAKS_ACTION: &str = "repair-leaks";

/// Urgency levels of the notification spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Low,
    Normal,
    Critical,
}

/// What a notification is about. A later message on the same topic replaces
/// the earlier notification instead of stacking beside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// Checks of one image (by the path the service reported).
    Disk(String),
    DevicesAdded,
    DevicesRemoved,
    Passthrough,
    /// A Detach or Reattach of one device (by address) from the tray.
    Device(String),
}

/// A button on the notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// CheckDisk with `repair=leaks` on this image.
    RepairLeaks { image: String },
}

/// One notification to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Topic,
    pub summary: String,
    /// Body text; may contain the spec's markup, so it is escaped.
    pub body: String,
    pub urgency: Urgency,
    pub icon: &'static str,
    pub category: &'static str,
    pub action: Option<Action>,
}

/// Escapes the three characters the notification spec's body markup gives
/// meaning to, so a path like `a<b>&c.qcow2` shows as written.
pub fn escape_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// The image's file name, for short summaries and labels.
pub fn file_name(image: &str) -> &str {
    Path::new(image)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(image)
}

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// "/vms/disk.qcow2 (qcow2)" or just the path when the format is unknown.
fn path_and_format(report: &CheckReport) -> String {
    if report.format.is_empty() {
        report.image.clone()
    } else {
        format!("{} ({})", report.image, report.format)
    }
}

/// The notification for one `DiskChecked` signal.
pub fn disk_checked(report: &CheckReport) -> Message {
    let name = file_name(&report.image);
    let topic = Topic::Disk(report.image.clone());
    let message = |summary: String, body: String, urgency, icon, category| Message {
        topic: topic.clone(),
        summary,
        body: escape_markup(&body),
        urgency,
        icon,
        category,
        action: None,
    };
    let shared_note = if report.consistent {
        ""
    } else {
        " It was checked while in use, so the result may not be exact."
    };

    if let Some(error) = &report.error {
        let detail = if error.message.is_empty() {
            error.name.clone()
        } else {
            error.message.clone()
        };
        return match error.to_error() {
            // The service's message names the VM and its PID.
            Error::InUse(_) => message(
                format!("Disk in use: {name}"),
                format!("Not checked: {detail}"),
                Urgency::Normal,
                "dialog-information",
                "x-vmmanager.disk.in-use",
            ),
            Error::Cancelled(_) => message(
                format!("Disk check cancelled: {name}"),
                detail,
                Urgency::Low,
                "drive-harddisk",
                "x-vmmanager.disk.failed",
            ),
            _ => message(
                format!("Disk check failed: {name}"),
                detail,
                Urgency::Normal,
                "dialog-warning",
                "x-vmmanager.disk.failed",
            ),
        };
    }

    let where_ = path_and_format(report);
    match &report.result {
        Some(CheckResult::Clean) if report.leaks_fixed > 0 || report.corruptions_fixed > 0 => {
            let mut fixed = Vec::new();
            if report.leaks_fixed > 0 {
                fixed.push(plural(
                    report.leaks_fixed,
                    "leaked cluster freed",
                    "leaked clusters freed",
                ));
            }
            if report.corruptions_fixed > 0 {
                fixed.push(plural(
                    report.corruptions_fixed,
                    "corruption repaired",
                    "corruptions repaired",
                ));
            }
            message(
                format!("Disk repaired: {name}"),
                format!("{}; {where_} has no errors now.", fixed.join(", ")),
                Urgency::Normal,
                "drive-harddisk",
                "x-vmmanager.disk.repaired",
            )
        }
        Some(CheckResult::Clean) => message(
            format!("Disk check passed: {name}"),
            format!("{where_} has no errors.{shared_note}"),
            Urgency::Low,
            "drive-harddisk",
            "x-vmmanager.disk.clean",
        ),
        Some(CheckResult::Leaks) => {
            let mut m = message(
                format!("Disk has leaked clusters: {name}"),
                format!(
                    "{} in {where_}. They waste space but do not harm data; \
                     \"Repair leaks\" frees them.{shared_note}",
                    plural(report.leaks, "leaked cluster", "leaked clusters")
                ),
                Urgency::Normal,
                "dialog-warning",
                "x-vmmanager.disk.leaks",
            );
            // A repair needs the image to itself: not offered for a check
            // that ran beside a user (force-share).
            if report.consistent {
                m.action = Some(Action::RepairLeaks {
                    image: report.image.clone(),
                });
            }
            m
        }
        Some(CheckResult::Corrupt) => message(
            format!("Disk is corrupt: {name}"),
            format!(
                "{} in {where_}. Do not start the VM; back up the image, then repair \
                 it with \"vmctl check-disk --repair all\".{shared_note}",
                plural(report.corruptions, "corruption", "corruptions")
            ),
            Urgency::Critical,
            "dialog-error",
            "x-vmmanager.disk.corrupt",
        ),
        Some(CheckResult::NotSupported) => message(
            format!("Nothing to check: {name}"),
            format!("{where_}: this format has no metadata that qemu-img can check."),
            Urgency::Low,
            "drive-harddisk",
            "x-vmmanager.disk.clean",
        ),
        unknown @ (Some(CheckResult::Unknown(_)) | None) => message(
            format!("Disk checked: {name}"),
            format!(
                "{where_}: result \"{}\".",
                unknown.as_ref().map_or("", CheckResult::as_str)
            ),
            Urgency::Normal,
            "drive-harddisk",
            "x-vmmanager.disk.failed",
        ),
    }
}

/// What went wrong in a call, in the service's (or the bus's) words.
fn error_detail(error: &Error) -> String {
    match error {
        Error::ZBus(zbus::Error::MethodError(name, text, _)) => {
            text.clone().unwrap_or_else(|| name.to_string())
        }
        Error::ZBus(e) => e.to_string(),
        service => zbus::DBusError::description(service)
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The notification for a "Repair leaks" call that failed before or
/// without a `DiskChecked` (e.g. not authorized, or busy).
pub fn repair_failed(image: &str, error: &Error) -> Message {
    Message {
        topic: Topic::Disk(image.to_owned()),
        summary: format!("Repair failed: {}", file_name(image)),
        body: escape_markup(&error_detail(error)),
        urgency: Urgency::Normal,
        icon: "dialog-warning",
        category: "x-vmmanager.disk.failed",
        action: None,
    }
}

/// A device call from the tray menu.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCall {
    Detach,
    Reattach,
}

/// The notification for a Detach or Reattach from the tray menu that
/// failed (not authorized, in use, …); a success shows in the menu and as
/// a readiness notification.
pub fn device_call_failed(call: DeviceCall, address: &str, error: &Error) -> Message {
    let verb = match call {
        DeviceCall::Detach => "Detach",
        DeviceCall::Reattach => "Reattach",
    };
    Message {
        topic: Topic::Device(address.to_owned()),
        summary: format!("{verb} failed: {address}"),
        body: escape_markup(&error_detail(error)),
        urgency: Urgency::Normal,
        icon: "dialog-warning",
        category: "device.error",
        action: None,
    }
}

/// The notification for a device detached with `auto-return` that was not
/// given back after its VM exited (`ReturnFinished` with any outcome but
/// `returned`); `None` for a device given back (the menus show it, and
/// every user's companion hears the signal).
pub fn return_finished(label: &str, outcome: &str, message: &str) -> Option<Message> {
    let summary = match outcome {
        "returned" => return None,
        "reset-failed" => format!("Not given back (reset failed): {label}"),
        "driver-did-not-bind" => format!("Not given back (driver did not bind): {label}"),
        _ => format!("Not given back after its VM: {label}"),
    };
    let address = label.split(' ').next().unwrap_or(label);
    Some(Message {
        topic: Topic::Device(address.to_owned()),
        summary,
        body: escape_markup(message),
        urgency: Urgency::Critical,
        icon: "dialog-error",
        category: "device.error",
        action: None,
    })
}

/// "0000:03:00.0 NVIDIA Corporation GA102" (names when udev knew them),
/// "(VF of …)" for a virtual function.
pub fn device_label(device: &DeviceProperties) -> String {
    let name = [device.vendor_name.as_str(), device.device_name.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let vf = if device.physical_function.is_empty() {
        String::new()
    } else {
        format!(" (VF of {})", device.physical_function)
    };
    match name.is_empty() {
        true => format!("{}{vf}", device.address),
        false => format!("{} {name}{vf}", device.address),
    }
}

/// How many devices a body lists by name before "and N more".
const LISTED: usize = 4;

fn device_list(devices: &[DeviceProperties]) -> String {
    let mut lines: Vec<String> = devices.iter().take(LISTED).map(device_label).collect();
    if devices.len() > LISTED {
        lines.push(format!("and {} more", devices.len() - LISTED));
    }
    lines.join("\n")
}

/// A coalesced batch of device changes, each list sorted by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceBatch {
    pub added: Vec<DeviceProperties>,
    pub removed: Vec<DeviceProperties>,
    pub became_ready: Vec<DeviceProperties>,
    pub became_unready: Vec<DeviceProperties>,
}

fn count_summary(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        one.to_owned()
    } else {
        format!("{n} {many}")
    }
}

/// The notifications for one batch: at most one per topic.
pub fn device_batch(batch: &DeviceBatch) -> Vec<Message> {
    let mut out = Vec::new();
    let device_message = |topic, summary, body: String, urgency, category| Message {
        topic,
        summary,
        body: escape_markup(&body),
        urgency,
        icon: "computer",
        category,
        action: None,
    };
    if !batch.added.is_empty() {
        out.push(device_message(
            Topic::DevicesAdded,
            count_summary(batch.added.len(), "PCI device added", "PCI devices added"),
            device_list(&batch.added),
            Urgency::Low,
            "device.added",
        ));
    }
    if !batch.removed.is_empty() {
        out.push(device_message(
            Topic::DevicesRemoved,
            count_summary(
                batch.removed.len(),
                "PCI device removed",
                "PCI devices removed",
            ),
            device_list(&batch.removed),
            Urgency::Low,
            "device.removed",
        ));
    }
    let ready = &batch.became_ready;
    let unready = &batch.became_unready;
    if !ready.is_empty() || !unready.is_empty() {
        let mut parts = Vec::new();
        if !ready.is_empty() {
            parts.push(format!("Ready for passthrough:\n{}", device_list(ready)));
        }
        if !unready.is_empty() {
            let mut text = format!("No longer ready for passthrough:\n{}", device_list(unready));
            // One device: say why, from the service's blockers.
            if let [only] = unready.as_slice()
                && !only.passthrough_blockers.is_empty()
            {
                text.push_str(&format!("\n{}", only.passthrough_blockers.join("; ")));
            }
            parts.push(text);
        }
        let summary = match (ready.len(), unready.len()) {
            (1, 0) => format!("{} is ready for passthrough", ready[0].address),
            (n, 0) => format!("{n} PCI devices ready for passthrough"),
            (0, 1) => format!("{} is no longer ready for passthrough", unready[0].address),
            (0, n) => format!("{n} PCI devices no longer ready for passthrough"),
            (r, u) => format!("Passthrough readiness changed for {} PCI devices", r + u),
        };
        out.push(device_message(
            Topic::Passthrough,
            summary,
            parts.join("\n"),
            Urgency::Normal,
            "device",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmmanager_client::ReportError;

    fn report(result: Option<CheckResult>) -> CheckReport {
        CheckReport {
            image: "/vms/win11/disk.qcow2".into(),
            format: "qcow2".into(),
            result,
            consistent: true,
            ..CheckReport::default()
        }
    }

    #[test]
    fn clean_is_low_urgency() {
        let m = disk_checked(&report(Some(CheckResult::Clean)));
        assert_eq!(m.summary, "Disk check passed: disk.qcow2");
        assert_eq!(m.body, "/vms/win11/disk.qcow2 (qcow2) has no errors.");
        assert_eq!(m.urgency, Urgency::Low);
        assert_eq!(m.icon, "drive-harddisk");
        assert_eq!(m.topic, Topic::Disk("/vms/win11/disk.qcow2".into()));
        assert!(m.action.is_none());
    }

    #[test]
    fn leaks_offer_a_repair() {
        let mut r = report(Some(CheckResult::Leaks));
        r.leaks = 3;
        let m = disk_checked(&r);
        assert_eq!(m.summary, "Disk has leaked clusters: disk.qcow2");
        assert!(
            m.body
                .starts_with("3 leaked clusters in /vms/win11/disk.qcow2 (qcow2).")
        );
        assert_eq!(m.urgency, Urgency::Normal);
        assert_eq!(m.icon, "dialog-warning");
        assert_eq!(
            m.action,
            Some(Action::RepairLeaks {
                image: "/vms/win11/disk.qcow2".into()
            })
        );
        // Checked beside a running VM: no repair button, and a note.
        r.consistent = false;
        let m = disk_checked(&r);
        assert!(m.action.is_none());
        assert!(m.body.contains("checked while in use"), "{}", m.body);
    }

    #[test]
    fn corrupt_is_critical() {
        let mut r = report(Some(CheckResult::Corrupt));
        r.corruptions = 1;
        let m = disk_checked(&r);
        assert_eq!(m.summary, "Disk is corrupt: disk.qcow2");
        assert!(m.body.starts_with("1 corruption in "), "{}", m.body);
        assert_eq!(m.urgency, Urgency::Critical);
        assert_eq!(m.icon, "dialog-error");
        assert_eq!(m.category, "x-vmmanager.disk.corrupt");
    }

    #[test]
    fn a_repair_says_what_it_fixed() {
        let mut r = report(Some(CheckResult::Clean));
        r.leaks_fixed = 3;
        let m = disk_checked(&r);
        assert_eq!(m.summary, "Disk repaired: disk.qcow2");
        assert_eq!(
            m.body,
            "3 leaked clusters freed; /vms/win11/disk.qcow2 (qcow2) has no errors now."
        );
    }

    #[test]
    fn in_use_quotes_the_service_message() {
        let mut r = report(None);
        r.error = Some(ReportError::from(&Error::InUse(
            "disk.qcow2 is in use by VM \"win11\" (PID 42)".into(),
        )));
        let m = disk_checked(&r);
        assert_eq!(m.summary, "Disk in use: disk.qcow2");
        assert_eq!(
            m.body,
            "Not checked: disk.qcow2 is in use by VM \"win11\" (PID 42)"
        );
        assert_eq!(m.urgency, Urgency::Normal);
        r.error = Some(ReportError::from(&Error::CheckFailed(
            "qemu-img: <boom> & more".into(),
        )));
        let m = disk_checked(&r);
        assert_eq!(m.summary, "Disk check failed: disk.qcow2");
        assert_eq!(m.body, "qemu-img: &lt;boom&gt; &amp; more");
        assert_eq!(m.urgency, Urgency::Normal);
    }

    #[test]
    fn a_failed_device_call_names_the_device_and_the_reason() {
        let m = device_call_failed(
            DeviceCall::Detach,
            "0000:01:00.0",
            &Error::NotAuthorized("<not> authorized".into()),
        );
        assert_eq!(m.summary, "Detach failed: 0000:01:00.0");
        assert_eq!(m.body, "&lt;not&gt; authorized");
        assert_eq!(m.topic, Topic::Device("0000:01:00.0".into()));
        assert_eq!(m.urgency, Urgency::Normal);
    }

    #[test]
    fn raw_has_nothing_to_check() {
        let mut r = report(Some(CheckResult::NotSupported));
        r.format = "raw".into();
        let m = disk_checked(&r);
        assert_eq!(m.summary, "Nothing to check: disk.qcow2");
        assert_eq!(m.urgency, Urgency::Low);
    }

    #[test]
    fn a_result_from_a_newer_service_is_shown_as_sent() {
        let m = disk_checked(&report(Some(CheckResult::Unknown("bit-rot".into()))));
        assert_eq!(m.summary, "Disk checked: disk.qcow2");
        assert_eq!(m.body, "/vms/win11/disk.qcow2 (qcow2): result \"bit-rot\".");
        assert_eq!(m.category, "x-vmmanager.disk.failed");
    }

    fn dev(addr: &str) -> DeviceProperties {
        DeviceProperties {
            address: addr.into(),
            ..DeviceProperties::default()
        }
    }

    #[test]
    fn device_labels() {
        let mut d = dev("0000:03:00.0");
        assert_eq!(device_label(&d), "0000:03:00.0");
        d.vendor_name = "Intel Corporation".into();
        d.device_name = "Ethernet VF".into();
        d.physical_function = "0000:03:00.0".into();
        assert_eq!(
            device_label(&d),
            "0000:03:00.0 Intel Corporation Ethernet VF (VF of 0000:03:00.0)"
        );
    }

    #[test]
    fn a_burst_is_one_notification_per_topic() {
        let added: Vec<DeviceProperties> = (0..40)
            .map(|i| dev(&format!("0000:03:{:02x}.{}", i / 8, i % 8)))
            .collect();
        let batch = DeviceBatch {
            added,
            removed: vec![dev("0000:04:00.0")],
            ..DeviceBatch::default()
        };
        let messages = device_batch(&batch);
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].summary, "40 PCI devices added");
        assert_eq!(
            messages[0].body,
            "0000:03:00.0\n0000:03:00.1\n0000:03:00.2\n0000:03:00.3\nand 36 more"
        );
        assert_eq!(messages[0].category, "device.added");
        assert_eq!(messages[0].urgency, Urgency::Low);
        assert_eq!(messages[1].summary, "PCI device removed");
        assert_eq!(messages[1].body, "0000:04:00.0");
        assert_eq!(messages[1].category, "device.removed");
    }

    #[test]
    fn readiness_changes() {
        let mut gone = dev("0000:05:00.0");
        gone.passthrough_blockers =
            vec!["0000:05:00.1 in the same IOMMU group is bound to snd_hda_intel".into()];
        let batch = DeviceBatch {
            became_unready: vec![gone],
            ..DeviceBatch::default()
        };
        let m = &device_batch(&batch)[0];
        assert_eq!(m.summary, "0000:05:00.0 is no longer ready for passthrough");
        assert!(m.body.ends_with("bound to snd_hda_intel"), "{}", m.body);
        assert_eq!(m.topic, Topic::Passthrough);
        let batch = DeviceBatch {
            became_ready: vec![dev("0000:05:00.0"), dev("0000:05:00.1")],
            ..DeviceBatch::default()
        };
        assert_eq!(
            device_batch(&batch)[0].summary,
            "2 PCI devices ready for passthrough"
        );
        assert!(device_batch(&DeviceBatch::default()).is_empty());
    }
}
