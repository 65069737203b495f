//! `vmmanagerd` under test, on a [`TestBus`].

use std::fs::File;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use vmmanager::config::{Config, EventsSetting, PermittedDevice};

use super::bus::TestBus;
use super::util::{ChildGuard, command_in_namespace, public_tempdir, read_lossy, write_file};

pub use vmmanager_client::names::{
    BUS_NAME as SERVICE_NAME, MANAGER_INTERFACE as MANAGER_IFACE, MANAGER_PATH,
};

/// The daemon binary Cargo built for this test run.
pub const DAEMON_BIN: &str = env!("CARGO_BIN_EXE_vmmanagerd");

/// The daemon's configuration (the real [`Config`], written as its TOML
/// file) and how it is started. Defaults are the daemon's, except that
/// nothing points at the host: no PID-file patterns in the host's /run, no
/// vfio state file, no boot-time claims in /etc, and kernel events (so whether another test runs udevd
/// at the moment does not change what this daemon does).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub config: Config,
    /// Not part of the file: a mount namespace (`/proc/PID/ns/mnt`) to start
    /// the daemon in, e.g. a test libvirt's, so that it sees that /run.
    pub mount_namespace: Option<PathBuf>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        let mut config = Config::default();
        config.disk.pidfile_patterns = vec!["{image_dir}/*.pid".into()];
        config.devices.events = EventsSetting::Kernel;
        config.devices.vfio_state_file = PathBuf::new();
        // Never the host's /etc/driverctl.d (nothing here asks for
        // `persistent`; a test that does gives its own directory).
        config.devices.driver_overrides_dir = PathBuf::from("/nonexistent/driverctl.d");
        config.devices.boot_claims_record = PathBuf::new();
        DaemonConfig {
            config,
            mount_namespace: None,
        }
    }
}

impl DaemonConfig {
    pub fn qemu_img(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.disk.qemu_img = path.into();
        self
    }

    pub fn timeout_sec(mut self, secs: u32) -> Self {
        self.config.disk.timeout_sec = secs;
        self
    }

    pub fn max_concurrent_checks(mut self, n: u32) -> Self {
        self.config.disk.max_concurrent_checks = n;
        self
    }

    pub fn max_checks_per_user(mut self, n: u32) -> Self {
        self.config.disk.max_checks_per_user = n;
        self
    }

    pub fn pidfile_patterns<S: Into<String>>(
        mut self,
        patterns: impl IntoIterator<Item = S>,
    ) -> Self {
        self.config.disk.pidfile_patterns = patterns.into_iter().map(Into::into).collect();
        self
    }

    pub fn proc_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.system.proc_root = path.into();
        self
    }

    /// A prepared tree: its devices' names come from its own udev database
    /// only, not from this machine's hwdb (its ids are made up).
    pub fn sysfs_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.system.sysfs_root = path.into();
        self.config.devices.hwdb = false;
        self
    }

    /// udevd's database (an empty directory: as if udevd never ran).
    pub fn udev_data_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.devices.udev_data_dir = path.into();
        self
    }

    /// Whether names missing from udevd's database come from the hwdb.
    pub fn hwdb(mut self, hwdb: bool) -> Self {
        self.config.devices.hwdb = hwdb;
        self
    }

    pub fn events(mut self, events: EventsSetting) -> Self {
        self.config.devices.events = events;
        self
    }

    pub fn receive_buffer_bytes(mut self, bytes: u32) -> Self {
        self.config.devices.receive_buffer_bytes = bytes;
        self
    }

    pub fn in_mount_namespace(mut self, ns: impl Into<PathBuf>) -> Self {
        self.mount_namespace = Some(ns.into());
        self
    }

    pub fn permit(mut self, selector: &str, resource_name: &str) -> Self {
        self.config.devices.permitted.push(PermittedDevice {
            selector: selector.into(),
            resource_name: resource_name.into(),
        });
        self
    }
}

/// A running `vmmanagerd --bus-address ADDR --config PATH`; killed on drop.
pub struct Daemon {
    child: ChildGuard,
    dir: TempDir,
}

impl Daemon {
    /// Starts the daemon and returns once it owns `org.example.VmManager`.
    pub fn start(bus: &TestBus, config: &DaemonConfig) -> Daemon {
        let bin = DAEMON_BIN;
        let dir = public_tempdir("vmm-daemon-");
        let config_path = dir.path().join("vmmanager.toml");
        write_file(&config_path, config.config.to_toml(), 0o644);
        let stderr_path = dir.path().join("vmmanagerd.stderr");
        let log = File::create(&stderr_path).expect("create vmmanagerd.stderr");
        let child = command_in_namespace(config.mount_namespace.as_deref(), bin)
            .arg("--bus-address")
            .arg(bus.address())
            .arg("--config")
            .arg(&config_path)
            // Belt and braces: nothing in the daemon may reach the host bus.
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
            .env("RUST_BACKTRACE", "1")
            // Plain text in the captured log that panic messages quote.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        let mut child = ChildGuard::new(child, "vmmanagerd");
        bus.wait_for_name(
            SERVICE_NAME,
            || child.is_running(),
            || {
                format!(
                    "vmmanagerd config:\n{}\nvmmanagerd output:\n{}\ndbus-daemon stderr:\n{}",
                    config.config.to_toml(),
                    read_lossy(&stderr_path),
                    bus.stderr()
                )
            },
        );
        Daemon { child, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The daemon's stdout and stderr so far.
    pub fn output(&self) -> String {
        read_lossy(&self.dir.path().join("vmmanagerd.stderr"))
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn sigterm_and_wait(&mut self) -> ExitStatus {
        self.child.signal(libc::SIGTERM);
        self.child
            .wait_timeout(Duration::from_secs(15))
            .unwrap_or_else(|| {
                panic!(
                    "vmmanagerd did not exit within 15 s of SIGTERM; output:\n{}",
                    self.output()
                )
            })
    }

    /// Waits up to `timeout` for the daemon to exit on its own; its status,
    /// or `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(timeout)
    }

    /// Sends `sig` to the daemon without waiting.
    pub fn signal(&self, sig: libc::c_int) {
        self.child.signal(sig);
    }

    /// Whether the process is still alive (reaps it if not).
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }
}

impl Drop for Daemon {
    /// SIGTERM first, so the daemon kills qemu-img's process group itself
    /// (a test that fails mid-check must not leave a stand-in qemu-img
    /// behind); the guard's SIGKILL only follows if it does not exit.
    fn drop(&mut self) {
        if self.child.is_running() {
            self.child.signal(libc::SIGTERM);
            let _ = self.child.wait_timeout(Duration::from_secs(10));
        }
    }
}
