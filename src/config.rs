//! Configuration: `/etc/vmmanager/vmmanager.toml`.
//!
//! Every key has a built-in default, so the service runs without any file.
//! Unknown keys are rejected: a typo in a security-relevant setting must not
//! be silently ignored.
//!
//! Every place the service reads the host's kernel or udevd is a key, so
//! tests can point the real code at prepared trees: `[system] proc-root`
//! and `sysfs-root`, `[devices] udev-data-dir`, `udev-control-socket`,
//! `dev-root` and `hwdb` (off for a prepared tree).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::disk::checker::Limits;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmmanager/vmmanager.toml";

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub disk: DiskConfig,
    pub devices: DevicesConfig,
    pub system: SystemConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskConfig {
    /// The `qemu-img` binary.
    pub qemu_img: PathBuf,
    /// `vmmanager-opener.socket`'s socket: asked, for a repair only, when
    /// the image's mount is read-only for the service (see
    /// [`crate::opener`]).
    pub opener_socket: PathBuf,
    /// Upper bound for one `qemu-img check`, unless the caller asks for less.
    pub timeout_sec: u32,
    /// How many checks may run at once; 0 means the number of CPUs.
    pub max_concurrent_checks: u32,
    /// How many checks one user (uid) may run at once; 0 means half of
    /// `max-concurrent-checks` (at least 1), so one user's hanging checks
    /// never take every slot.
    pub max_checks_per_user: u32,
    /// How many more checks one user may have waiting for a slot; further
    /// ones are refused as Busy.
    pub max_queued_checks_per_user: u32,
    /// Where PID files of running VMs are looked for when the caller names
    /// none. `{image_dir}` is the image's directory, `{owner_uid}` the
    /// image owner's uid; `*` is allowed in the last component.
    pub pidfile_patterns: Vec<String>,
}

/// Where device events come from.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EventsSetting {
    /// The udev group when udevd runs (it adds hwdb names), else the kernel's.
    #[default]
    Auto,
    Udev,
    Kernel,
    /// No events: enumerate once at start (e.g. in a container).
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PermittedDevice {
    /// `vendor:device` in hex (`10de:1eb8`), or `vendor:*`.
    pub selector: String,
    /// Reported as the device's `ResourceName` (KubeVirt's idea).
    pub resource_name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DevicesConfig {
    pub events: EventsSetting,
    /// Netlink receive buffer; a burst larger than this loses events (then
    /// the service re-reads everything).
    pub receive_buffer_bytes: u32,
    /// udevd's database, where hwdb names of devices are found.
    pub udev_data_dir: PathBuf,
    /// Look names up in the udev hwdb itself when udevd's database has
    /// none (no udevd, no coldplug); off for a prepared sysfs tree, whose
    /// ids are not this machine's devices.
    pub hwdb: bool,
    /// udevd's control socket: with `events = "auto"`, the udev group is used
    /// when it exists (libudev's own test for a running udevd).
    pub udev_control_socket: PathBuf,
    /// Where `vfio/<group>` device nodes live.
    pub dev_root: PathBuf,
    /// Devices allowed for passthrough.
    pub permitted: Vec<PermittedDevice>,
    /// Where the original drivers of detached devices are remembered across
    /// restarts; empty for memory only.
    pub vfio_state_file: PathBuf,
    /// Where Detach's `persistent` writes boot-time claims, in driverctl's
    /// format (`pci-<address>` holding `vfio-pci`), and Reattach's removes
    /// them: driverctl's directory, read by its udev rule and by ours.
    pub driver_overrides_dir: PathBuf,
    /// Which of those claims this service wrote (so driverctl's own are
    /// told apart); empty to remember none.
    pub boot_claims_record: PathBuf,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            events: EventsSetting::Auto,
            receive_buffer_bytes: 128 * 1024 * 1024,
            udev_data_dir: PathBuf::from("/run/udev/data"),
            hwdb: true,
            udev_control_socket: PathBuf::from(crate::devices::monitor::UDEVD_CONTROL_SOCKET),
            dev_root: PathBuf::from("/dev"),
            permitted: Vec::new(),
            vfio_state_file: PathBuf::from("/run/vmmanager/vfio-drivers"),
            driver_overrides_dir: PathBuf::from("/etc/driverctl.d"),
            // Outlives reboots, as the claims do (the unit's StateDirectory=).
            boot_claims_record: PathBuf::from("/var/lib/vmmanager/boot-claims"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SystemConfig {
    /// procfs mount point (a prepared tree in tests).
    pub proc_root: PathBuf,
    /// sysfs mount point (a prepared tree in tests).
    pub sysfs_root: PathBuf,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            qemu_img: PathBuf::from("/usr/bin/qemu-img"),
            opener_socket: PathBuf::from(crate::opener::DEFAULT_SOCKET),
            timeout_sec: 600,
            max_concurrent_checks: 0,
            max_checks_per_user: 0,
            max_queued_checks_per_user: 4,
            pidfile_patterns: vec![
                // Quickemu keeps `<vm>.pid` next to the disk.
                "{image_dir}/*.pid".into(),
                "/run/libvirt/qemu/*.pid".into(),
                // libvirt's session mode (GNOME Boxes, qemu:///session).
                "/run/user/{owner_uid}/libvirt/qemu/run/*.pid".into(),
                // Proxmox VE.
                "/run/qemu-server/*.pid".into(),
            ],
        }
    }
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            proc_root: PathBuf::from("/proc"),
            sysfs_root: PathBuf::from("/sys"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Loads `path`. A missing file at the default location means "all
    /// defaults"; a missing file the user named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// The configuration as TOML text that [`Config::parse`] reads back
    /// (tests write the daemon's file with it).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every config value has a TOML form")
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: PathBuf::new(),
            message,
        };
        if !self.disk.qemu_img.is_absolute() {
            return Err(invalid("disk.qemu-img must be an absolute path".into()));
        }
        // sockaddr_un's sun_path holds 108 bytes, the NUL included.
        let opener = &self.disk.opener_socket;
        if !opener.is_absolute() || opener.as_os_str().len() > 107 {
            return Err(invalid(
                "disk.opener-socket must be an absolute path of at most 107 bytes".into(),
            ));
        }
        if self.disk.timeout_sec == 0 {
            return Err(invalid("disk.timeout-sec must be at least 1".into()));
        }
        for pattern in &self.disk.pidfile_patterns {
            crate::disk::usage::validate_pattern(pattern)
                .map_err(|e| invalid(format!("disk.pidfile-patterns: {e}")))?;
        }
        for entry in &self.devices.permitted {
            crate::devices::inventory::AllowEntry::new(
                &entry.selector,
                entry.resource_name.clone(),
            )
            .map_err(|e| invalid(format!("devices.permitted: {e}")))?;
        }
        for (key, path) in [
            ("devices.vfio-state-file", &self.devices.vfio_state_file),
            (
                "devices.boot-claims-record",
                &self.devices.boot_claims_record,
            ),
        ] {
            if !path.as_os_str().is_empty() && !path.is_absolute() {
                return Err(invalid(format!("{key} must be an absolute path or \"\"")));
            }
        }
        for (key, path) in [
            ("system.proc-root", &self.system.proc_root),
            ("system.sysfs-root", &self.system.sysfs_root),
            ("devices.udev-data-dir", &self.devices.udev_data_dir),
            (
                "devices.udev-control-socket",
                &self.devices.udev_control_socket,
            ),
            ("devices.dev-root", &self.devices.dev_root),
            (
                "devices.driver-overrides-dir",
                &self.devices.driver_overrides_dir,
            ),
        ] {
            if !path.is_absolute() {
                return Err(invalid(format!("{key} must be an absolute path")));
            }
        }
        Ok(())
    }

    /// The check concurrency limit, with 0 resolved to the CPU count.
    pub fn max_concurrent_checks(&self) -> usize {
        match self.disk.max_concurrent_checks {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n as usize,
        }
    }

    pub fn default_timeout(&self) -> Duration {
        Duration::from_secs(self.disk.timeout_sec.into())
    }

    /// The check limits, with 0 ("automatic") values resolved.
    pub fn check_limits(&self) -> Limits {
        let concurrent = self.max_concurrent_checks();
        let per_user = match self.disk.max_checks_per_user {
            0 => (concurrent / 2).max(1),
            n => n as usize,
        };
        Limits {
            timeout: self.default_timeout(),
            concurrent,
            per_user,
            queued_per_user: self.disk.max_queued_checks_per_user as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn keys_are_kebab_case_and_override_defaults() {
        let config = Config::parse(
            "[disk]\nqemu-img = \"/opt/qemu-img\"\ntimeout-sec = 5\nmax-concurrent-checks = 3\n\
             [system]\nproc-root = \"/tmp/proc\"\n",
        )
        .unwrap();
        assert_eq!(config.disk.qemu_img, Path::new("/opt/qemu-img"));
        assert_eq!(config.default_timeout(), Duration::from_secs(5));
        assert_eq!(config.max_concurrent_checks(), 3);
        assert_eq!(config.check_limits().per_user, 1);
        assert_eq!(config.check_limits().queued_per_user, 4);
        let custom = Config::parse(
            "[disk]\nmax-concurrent-checks = 8\nmax-checks-per-user = 3\n\
             max-queued-checks-per-user = 0\n",
        )
        .unwrap();
        let limits = custom.check_limits();
        assert_eq!(
            (limits.concurrent, limits.per_user, limits.queued_per_user),
            (8, 3, 0)
        );
        assert_eq!(config.system.proc_root, Path::new("/tmp/proc"));
        assert_eq!(config.system.sysfs_root, Path::new("/sys"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(matches!(
            Config::parse("[disk]\ntimeout = 5\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::parse("[disk]\ntimeout-sec = \"5\"\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::parse("[disk]\ntimeout-sec = 0\n"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            Config::parse("[disk]\nqemu-img = \"qemu-img\"\n"),
            Err(ConfigError::Invalid { .. })
        ));
        let long = format!("/{}", "s".repeat(107));
        for socket in ["opener.socket", &long] {
            assert!(
                matches!(
                    Config::parse(&format!("[disk]\nopener-socket = {socket:?}\n")),
                    Err(ConfigError::Invalid { .. })
                ),
                "{socket}"
            );
        }
        let longest = &long[..107];
        let config = Config::parse(&format!("[disk]\nopener-socket = {longest:?}\n")).unwrap();
        assert_eq!(config.disk.opener_socket, Path::new(longest));
        for pattern in ["run/*.pid", "/run/*/x.pid", "{image_dir}/"] {
            assert!(
                matches!(
                    Config::parse(&format!("[disk]\npidfile-patterns = [{pattern:?}]\n")),
                    Err(ConfigError::Invalid { .. })
                ),
                "{pattern}"
            );
        }
    }

    #[test]
    fn written_toml_reads_back_the_same() {
        let mut config = Config::default();
        assert_eq!(Config::parse(&config.to_toml()).unwrap(), config);
        config.devices.permitted.push(PermittedDevice {
            selector: "10de:*".into(),
            resource_name: "nvidia.com/any \"quoted\"".into(),
        });
        config.devices.events = EventsSetting::None;
        config.devices.vfio_state_file = PathBuf::new();
        config.devices.boot_claims_record = PathBuf::new();
        config.devices.driver_overrides_dir = PathBuf::from("/tmp/driverctl.d");
        config.system.proc_root = PathBuf::from("/tmp/a b/proc");
        config.devices.udev_control_socket = PathBuf::from("/tmp/udev/control");
        assert_eq!(Config::parse(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn missing_default_file_is_fine_missing_explicit_file_is_not() {
        let missing = Path::new("/nonexistent/vmmanager.toml");
        assert_eq!(Config::load(missing, false).unwrap(), Config::default());
        assert!(matches!(
            Config::load(missing, true),
            Err(ConfigError::Read { .. })
        ));
    }
}
