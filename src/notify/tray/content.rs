//! What the tray shows, from the [`Status`]: the menu as [`Entry`]s and
//! the item's status and tooltip. Plain functions, unit-tested; the
//! wording of disk checks is the notifications' own
//! ([`policy::disk_checked`]).
//!
//! The menu: the service's state; what needs attention; one submenu per
//! PCI device (readiness and blockers, driver, IOMMU group, host uses,
//! whether it returns after its VM, its boot-time claim, the VM holding it,
//! Detach or Reattach); the recent disk checks.

use vmmanager_client::DeviceProperties;

use super::item::{ItemState, ItemStatus};
use super::menu::{Entry, MenuAction};
use crate::devices::vfio::is_vfio_driver;
use crate::notify::policy::{self, Urgency};
use crate::notify::status::{Service, Status};

/// Longer labels are cut (with "…"): a menu as wide as its longest label
/// must still fit a small screen.
pub const MAX_LABEL: usize = 72;

/// The item's icon, and the one shown while something needs attention
/// (freedesktop icon names every theme has).
pub const ICON: &str = "computer";
pub const ATTENTION_ICON: &str = "dialog-warning";

fn cut(text: &str) -> String {
    if text.chars().count() <= MAX_LABEL {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(MAX_LABEL - 1).collect();
    out.push('…');
    out
}

fn label(key: impl Into<String>, text: &str) -> Entry {
    Entry::label(key, &cut(text))
}

/// The item's status and tooltip.
pub fn item(status: &Status) -> ItemState {
    let attention = status.attention();
    let mut lines = vec![service_line(&status.service)];
    if status.service != Service::NotRunning {
        let ready = status
            .devices
            .iter()
            .filter(|d| d.passthrough_ready)
            .count();
        lines.push(format!(
            "{} PCI device{}, {ready} ready for passthrough",
            status.devices.len(),
            if status.devices.len() == 1 { "" } else { "s" },
        ));
    }
    lines.extend(attention.iter().cloned());
    ItemState {
        status: match attention.is_empty() {
            true => ItemStatus::Active,
            false => ItemStatus::NeedsAttention,
        },
        tooltip_title: policy::APP_NAME.to_owned(),
        tooltip_body: lines.join("\n"),
    }
}

fn service_line(service: &Service) -> String {
    match service {
        Service::NotRunning => "The VM Manager service is not running".to_owned(),
        Service::Running { version } if version.is_empty() => {
            "The VM Manager service is running".to_owned()
        }
        Service::Running { version } => format!("VM Manager {version} is running"),
    }
}

/// The menu: the root's children.
pub fn menu(status: &Status) -> Vec<Entry> {
    let mut entries = vec![label("service", &service_line(&status.service)).disabled()];
    // By position: two images of the same file name give the same words.
    for (i, reason) in status.attention().iter().enumerate() {
        entries.push(label(format!("attention/{i}"), reason).icon("dialog-warning-symbolic"));
    }

    if status.service != Service::NotRunning {
        entries.push(Entry::separator("devices/separator"));
        if status.devices.is_empty() {
            entries.push(label("devices", "No PCI devices").disabled());
        } else {
            entries.push(
                label(
                    "devices",
                    &format!("PCI devices ({})", status.devices.len()),
                )
                .disabled(),
            );
            entries.extend(status.devices.iter().map(device));
        }
    }

    entries.push(Entry::separator("checks/separator"));
    if status.checks.is_empty() {
        entries.push(label("checks", "No disk checks yet").disabled());
    } else {
        entries.push(label("checks", "Recent disk checks").disabled());
        for report in &status.checks {
            let message = policy::disk_checked(report);
            let mut entry = label(format!("check/{}", report.image), &message.summary);
            if message.urgency != Urgency::Low {
                entry = entry.icon(&format!("{}-symbolic", message.icon));
            }
            entries.push(entry);
        }
    }
    entries
}

/// A device marked `AutoReturn`, in the GNOME extension's words too.
const AUTO_RETURN: &str = "Returns to its host driver when its VM stops";

/// "Claimed for vfio-pci at boot (by VM Manager)" from `PersistentDriver`
/// and `PersistentOrigin`; `None` without a claim.
fn boot_claim(device: &DeviceProperties) -> Option<String> {
    let driver = device.persistent_driver.as_str();
    if driver.is_empty() {
        return None;
    }
    let by = match device.persistent_origin.as_str() {
        "vmmanager" => " (by VM Manager)",
        "other" => " (by driverctl or an admin)",
        _ => "",
    };
    Some(format!("Claimed for {driver} at boot{by}"))
}

/// "ready", "in use by win11", "not ready".
fn state(device: &DeviceProperties) -> String {
    if let Some(user) = device.in_use_by.first() {
        return match user.vm_name.as_str() {
            "" => format!("in use by PID {}", user.pid),
            name => format!("in use by {name}"),
        };
    }
    match device.passthrough_ready {
        true => "ready".to_owned(),
        false => "not ready".to_owned(),
    }
}

fn device(device: &DeviceProperties) -> Entry {
    let address = &device.address;
    let key = |what: &str| format!("device/{address}/{what}");
    let mut children = Vec::new();

    let name = [device.vendor_name.as_str(), device.device_name.as_str()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if !name.is_empty() {
        children.push(label(key("name"), &name).disabled());
    }
    if device.passthrough_ready {
        children.push(label(key("readiness"), "Ready for passthrough"));
    } else {
        children.push(
            label(key("readiness"), "Not ready for passthrough").icon("dialog-warning-symbolic"),
        );
        for (i, blocker) in device.passthrough_blockers.iter().enumerate() {
            children.push(label(key(&format!("blocker/{i}")), &format!("• {blocker}")));
        }
    }
    children.push(label(
        key("driver"),
        &match device.driver.as_str() {
            "" => "Driver: none".to_owned(),
            driver => format!("Driver: {driver}"),
        },
    ));
    children.push(label(
        key("group"),
        &match (device.iommu_group, device.iommu_group_devices.len()) {
            (g, _) if g < 0 => "No IOMMU group".to_owned(),
            (g, n) if n > 1 => format!("IOMMU group {g} ({n} devices)"),
            (g, _) => format!("IOMMU group {g}"),
        },
    ));
    // What Detach would refuse for (moot once it is on vfio-pci).
    if !is_vfio_driver(&device.driver) && !device.host_users.is_empty() {
        children.push(
            label(key("host-uses"), "Used by the host:")
                .icon("dialog-warning-symbolic")
                .disabled(),
        );
        for (i, used) in device.host_users.iter().enumerate() {
            children.push(label(
                key(&format!("host-use/{i}")),
                &format!("• {}", used.text),
            ));
        }
    }
    // Detach's auto-return and persistent, as vmctl set them.
    if device.auto_return {
        children.push(label(key("auto-return"), AUTO_RETURN));
    }
    if let Some(claim) = boot_claim(device) {
        children.push(label(key("boot-claim"), &claim));
    }
    for (i, user) in device.in_use_by.iter().enumerate() {
        let who = match user.vm_name.as_str() {
            "" => format!("In use by PID {}", user.pid),
            vm => format!("In use by VM \"{vm}\" (PID {})", user.pid),
        };
        children.push(label(key(&format!("user/{i}")), &who));
    }
    if device.permitted {
        let text = match device.resource_name.as_str() {
            "" => "Allow-listed for passthrough".to_owned(),
            resource => format!("Allow-listed as {resource}"),
        };
        children.push(label(key("permitted"), &text));
    }
    children.push(Entry::separator(key("separator")));
    // The service refuses either while a VM holds the group; the menu
    // says so by greying the item out.
    // One key for both: after a Detach the same item turns into Reattach
    // (a property change, where a host keeps the item in its place).
    let action = if is_vfio_driver(&device.driver) {
        label(key("binding"), "Reattach to the host driver")
            .on_click(MenuAction::Reattach(address.clone()))
    } else {
        label(key("binding"), "Detach for passthrough (bind to vfio-pci)")
            .on_click(MenuAction::Detach(address.clone()))
    };
    children.push(match device.in_use_by.is_empty() {
        true => action,
        false => action.disabled(),
    });

    let short_name = match device.device_name.as_str() {
        "" => device.vendor_name.as_str(),
        name => name,
    };
    let title = match short_name {
        "" => format!("{address} — {}", state(device)),
        name => format!("{address} {name} — {}", state(device)),
    };
    label(format!("device/{address}"), &title).submenu(children)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::tray::menu::{Layout, Prop, ROOT, prop};
    use vmmanager_client::{CheckReport, CheckResult, VfioUser};

    fn text(entry: &Entry) -> &str {
        match &entry.props[prop::LABEL] {
            Prop::Str(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn labels(entries: &[Entry]) -> Vec<&str> {
        entries
            .iter()
            .filter(|e| e.props.contains_key(prop::LABEL))
            .map(text)
            .collect()
    }

    fn gpu() -> DeviceProperties {
        DeviceProperties {
            address: "0000:01:00.0".into(),
            vendor_name: "NVIDIA Corporation".into(),
            device_name: "GA102 [GeForce RTX 3080]".into(),
            driver: "nvidia".into(),
            iommu_group: 14,
            iommu_group_devices: vec!["0000:01:00.0".into(), "0000:01:00.1".into()],
            passthrough_blockers: vec![
                "bound to nvidia, not vfio-pci".into(),
                "0000:01:00.1 in the same IOMMU group is bound to snd_hda_intel".into(),
            ],
            ..DeviceProperties::default()
        }
    }

    fn running() -> Status {
        Status {
            service: Service::Running {
                version: "0.1.0".into(),
            },
            ..Status::default()
        }
    }

    #[test]
    fn not_running() {
        let status = Status::default();
        let entries = menu(&status);
        assert_eq!(
            labels(&entries),
            [
                "The VM Manager service is not running",
                "No disk checks yet"
            ]
        );
        let item = item(&status);
        assert_eq!(item.status, ItemStatus::Active);
        assert_eq!(item.tooltip_body, "The VM Manager service is not running");
    }

    #[test]
    fn a_device_submenu() {
        let mut status = running();
        status.devices = vec![gpu()];
        let entries = menu(&status);
        assert_eq!(
            labels(&entries),
            [
                "VM Manager 0.1.0 is running",
                "PCI devices (1)",
                "0000:01:00.0 GA102 [GeForce RTX 3080] — not ready",
                "No disk checks yet"
            ]
        );
        let dev = &entries[3];
        assert_eq!(
            dev.props[prop::CHILDREN_DISPLAY],
            Prop::Str("submenu".into())
        );
        assert_eq!(
            labels(&dev.children),
            [
                "NVIDIA Corporation GA102 [GeForce RTX 3080]",
                "Not ready for passthrough",
                "• bound to nvidia, not vfio-pci",
                // Underscores doubled: dbusmenu's access-key escape.
                "• 0000:01:00.1 in the same IOMMU group is bound to snd__hda__intel",
                "Driver: nvidia",
                "IOMMU group 14 (2 devices)",
                "Detach for passthrough (bind to vfio-pci)"
            ]
        );
        let detach = dev.children.last().unwrap();
        assert_eq!(
            detach.action,
            Some(MenuAction::Detach("0000:01:00.0".into()))
        );
        assert!(!detach.props.contains_key(prop::ENABLED));
    }

    /// What Detach would refuse for, while it is the host's; the mark of
    /// a device to be given back, and its boot-time claim.
    #[test]
    fn host_uses_auto_return_and_boot_claim() {
        let mut device = gpu();
        device.host_users = vec![vmmanager_client::HostUser {
            kind: "boot-display".into(),
            text: "it is the boot display (the firmware's console)".into(),
        }];
        let shown = |device: &DeviceProperties| {
            let mut status = running();
            status.devices = vec![device.clone()];
            labels(&menu(&status)[3].children)
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<String>>()
        };
        let texts = shown(&device);
        let at = texts
            .iter()
            .position(|t| *t == "Used by the host:")
            .unwrap();
        assert_eq!(
            texts[at + 1],
            "• it is the boot display (the firmware's console)"
        );
        // On vfio-pci the host has nothing of it left to lose.
        device.driver = "vfio-pci".into();
        device.auto_return = true;
        let texts = shown(&device);
        assert!(
            !texts.iter().any(|t| t.starts_with("Used by the host")),
            "{texts:?}"
        );
        assert!(
            texts
                .iter()
                .any(|t| *t == "Returns to its host driver when its VM stops"),
            "{texts:?}"
        );
        assert!(!texts.iter().any(|t| t.starts_with("Claimed")), "{texts:?}");
        device.persistent_driver = "vfio-pci".into();
        for (origin, line) in [
            ("vmmanager", "Claimed for vfio-pci at boot (by VM Manager)"),
            (
                "other",
                "Claimed for vfio-pci at boot (by driverctl or an admin)",
            ),
            ("unknown", "Claimed for vfio-pci at boot"),
        ] {
            device.persistent_origin = origin.into();
            let texts = shown(&device);
            assert!(texts.iter().any(|t| t == line), "{origin}: {texts:?}");
        }
    }

    #[test]
    fn a_device_held_by_a_vm() {
        let mut status = running();
        let mut d = gpu();
        d.driver = "vfio-pci".into();
        d.passthrough_ready = true;
        d.passthrough_blockers.clear();
        d.permitted = true;
        d.resource_name = "nvidia.com/GA102".into();
        d.in_use_by = vec![VfioUser {
            pid: 4242,
            exe: "/usr/bin/qemu-system-x86_64".into(),
            vm_name: "win11".into(),
        }];
        status.devices = vec![d];
        let entries = menu(&status);
        let dev = &entries[3];
        assert_eq!(
            text(dev),
            "0000:01:00.0 GA102 [GeForce RTX 3080] — in use by win11"
        );
        assert_eq!(
            labels(&dev.children)[1..],
            [
                "Ready for passthrough",
                "Driver: vfio-pci",
                "IOMMU group 14 (2 devices)",
                "In use by VM \"win11\" (PID 4242)",
                "Allow-listed as nvidia.com/GA102",
                "Reattach to the host driver"
            ]
        );
        let reattach = dev.children.last().unwrap();
        assert_eq!(
            reattach.action,
            Some(MenuAction::Reattach("0000:01:00.0".into()))
        );
        assert_eq!(reattach.props[prop::ENABLED], Prop::Bool(false));
        assert_eq!(item(&status).status, ItemStatus::Active);
    }

    #[test]
    fn checks_and_attention() {
        let mut status = running();
        let mut d = gpu();
        d.permitted = true;
        status.devices = vec![d];
        for (image, result) in [
            ("/vms/a.qcow2", CheckResult::Clean),
            ("/vms/b.qcow2", CheckResult::Corrupt),
        ] {
            status.push_check(CheckReport {
                image: image.into(),
                format: "qcow2".into(),
                result: Some(result),
                corruptions: 1,
                consistent: true,
                ..CheckReport::default()
            });
        }
        let entries = menu(&status);
        assert_eq!(
            labels(&entries),
            [
                "VM Manager 0.1.0 is running",
                "b.qcow2 is corrupt",
                "0000:01:00.0 is allow-listed but not ready for passthrough",
                "PCI devices (1)",
                "0000:01:00.0 GA102 [GeForce RTX 3080] — not ready",
                "Recent disk checks",
                "Disk is corrupt: b.qcow2",
                "Disk check passed: a.qcow2"
            ]
        );
        let corrupt = entries
            .iter()
            .find(|e| e.key == "check//vms/b.qcow2")
            .unwrap();
        assert_eq!(
            corrupt.props[prop::ICON_NAME],
            Prop::Str("dialog-error-symbolic".into())
        );
        let item = item(&status);
        assert_eq!(item.status, ItemStatus::NeedsAttention);
        assert_eq!(
            item.tooltip_body,
            "VM Manager 0.1.0 is running\n1 PCI device, 0 ready for passthrough\n\
             b.qcow2 is corrupt\n0000:01:00.0 is allow-listed but not ready for passthrough"
        );
    }

    #[test]
    fn two_images_of_the_same_name_are_two_items() {
        let mut status = running();
        for image in ["/a/disk.qcow2", "/b/disk.qcow2"] {
            status.push_check(CheckReport {
                image: image.into(),
                result: Some(CheckResult::Corrupt),
                ..CheckReport::default()
            });
        }
        let entries = menu(&status);
        // Keys are unique (Layout::update asserts it).
        Layout::new().update(&entries);
        let corrupt = labels(&entries)
            .iter()
            .filter(|l| **l == "disk.qcow2 is corrupt")
            .count();
        assert_eq!(corrupt, 2);
    }

    #[test]
    fn long_labels_are_cut() {
        let mut status = running();
        let mut d = gpu();
        d.passthrough_blockers = vec!["x".repeat(200)];
        status.devices = vec![d];
        let entries = menu(&status);
        let blocker = &entries[3].children[2];
        assert_eq!(text(blocker).chars().count(), MAX_LABEL);
        assert!(text(blocker).ends_with('…'));
    }

    #[test]
    fn a_device_appearing_changes_the_layout_only() {
        let mut status = running();
        status.devices = vec![gpu()];
        let mut layout = Layout::new();
        layout.update(&menu(&status));
        let mut nic = gpu();
        nic.address = "0000:02:00.0".into();
        status.devices.push(nic);
        let changes = layout.update(&menu(&status));
        assert!(changes.layout);
        // The header's count changed: a property of an item the host has.
        assert_eq!(changes.updated.len(), 1, "{changes:?}");
        // Service, separator, header, two devices, separator, checks.
        let root = layout.node(ROOT, 1, &[]).unwrap();
        assert_eq!(root.children.len(), 7);
    }
}
