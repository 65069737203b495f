//! The systemd units agree where they must: `vmmanager-opener@.service`
//! opens images for `vmmanagerd.service`'s repairs (see `src/opener.rs`),
//! so both must see the same files in the same places, writable in the
//! same directories. A directory allowed only in the daemon's unit is
//! repairable there only until it is recreated; one allowed only in the
//! opener's would give the daemon handles its own unit never granted.

use std::collections::BTreeMap;

const DAEMON_UNIT: &str = include_str!("../systemd/vmmanagerd.service");
const OPENER_UNIT: &str = include_str!("../systemd/vmmanager-opener@.service");

/// The settings that decide which files a service sees where, and which
/// it may write.
/// Where only the daemon writes, for devices: sysfs (binding) and
/// driverctl's override files (boot-time claims).
const DEVICE_PATHS: &[&str] = &["/sys/", "/etc/driverctl.d"];

const FILE_SYSTEM_VIEW: &[&str] = &[
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "BindPaths",
    "BindReadOnlyPaths",
    "TemporaryFileSystem",
    "RootDirectory",
    "RootImage",
    "MountImages",
];

/// Each of [`FILE_SYSTEM_VIEW`]'s settings in `unit`'s `[Service]`
/// section, its assignments' words in order (an empty assignment resets
/// the list, as systemd reads it). The daemon's device paths are left out
/// ([`DEVICE_PATHS`]): binding has nothing to do with images.
fn view(unit: &str) -> BTreeMap<&'static str, Vec<String>> {
    let mut settings: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let Some(key) = FILE_SYSTEM_VIEW.iter().find(|k| **k == key.trim()) else {
            continue;
        };
        assert!(in_service, "{key}= outside [Service]");
        let words = settings.entry(key).or_default();
        if value.trim().is_empty() {
            words.clear();
        }
        words.extend(
            value
                .split_whitespace()
                .filter(|w| {
                    let path = w.trim_start_matches(['-', '+']);
                    !DEVICE_PATHS.iter().any(|p| path.starts_with(p))
                })
                .map(str::to_owned),
        );
    }
    settings
}

#[test]
fn the_opener_sees_the_files_as_the_daemon_does() {
    let daemon = view(DAEMON_UNIT);
    let opener = view(OPENER_UNIT);
    assert!(
        daemon["ReadWritePaths"].contains(&"-/home".to_owned()),
        "{daemon:?}"
    );
    assert_eq!(
        daemon, opener,
        "systemd/vmmanagerd.service and systemd/vmmanager-opener@.service must have the \
         same file-system settings (ReadWritePaths= apart from /sys and /etc/driverctl.d)"
    );
}

#[test]
fn a_difference_in_the_lists_is_seen() {
    let extra = DAEMON_UNIT.replace("ReadWritePaths=-/home", "ReadWritePaths=-/home -/data/vms");
    assert_ne!(view(&extra), view(OPENER_UNIT));
    let reset = format!("{OPENER_UNIT}\n[Service]\nReadWritePaths=\nReadWritePaths=-/home\n");
    assert_ne!(view(DAEMON_UNIT), view(&reset));
    let private_tmp = OPENER_UNIT.replace("PrivateTmp=no", "PrivateTmp=yes");
    assert_ne!(view(DAEMON_UNIT), view(&private_tmp));
}
