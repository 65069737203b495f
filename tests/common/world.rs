//! One end-to-end world for disk tests: a private bus, polkitd and the
//! daemon, a temp dir for images, a root zbus connection, and helpers to call
//! CheckDisk/GetDiskUsers and read their reports.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use vmmanager_client::ManagerProxy;
use vmmanager_client::json::dict_to_json;
use zbus::{Connection, OwnedVariant, Variant};

use super::util::{command_as, public_tempdir, run};
use super::{CmdOutput, DaemonConfig, NOBODY, Polkit, PolkitBuilder, Stack};

pub const VMCTL: &str = env!("CARGO_BIN_EXE_vmctl");

pub type Report = HashMap<String, OwnedVariant>;

/// One test's world: bus + polkitd + daemon, a temp dir for images, and a
/// root zbus connection.
pub struct World {
    pub stack: Stack,
    pub dir: TempDir,
    pub connection: Connection,
}

impl World {
    pub async fn start() -> World {
        World::with(Polkit::builder(), DaemonConfig::default()).await
    }

    pub async fn with(polkit: PolkitBuilder, config: DaemonConfig) -> World {
        let stack = tokio::task::spawn_blocking({
            let config = config.clone();
            move || Stack::start(polkit, &config)
        })
        .await
        .unwrap();
        let connection = stack.bus.connect().await;
        World {
            stack,
            dir: public_tempdir("vmm-images-"),
            connection,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub async fn manager(&self) -> ManagerProxy<'static> {
        ManagerProxy::new(&self.connection).await.unwrap()
    }

    /// CheckDisk as root through zbus; errors as (short name, message).
    pub async fn check(
        &self,
        image: &Path,
        options: &[(&str, Variant<'_>)],
    ) -> Result<Report, (String, String)> {
        let options: HashMap<&str, Variant<'_>> =
            options.iter().map(|(k, v)| (*k, v.clone())).collect();
        self.manager()
            .await
            .check_disk(image.to_str().unwrap(), options)
            .await
            .map_err(split_error)
    }

    pub async fn users(
        &self,
        image: &Path,
        options: &[(&str, Variant<'_>)],
    ) -> Result<Vec<Report>, (String, String)> {
        let options: HashMap<&str, Variant<'_>> =
            options.iter().map(|(k, v)| (*k, v.clone())).collect();
        self.manager()
            .await
            .get_disk_users(image.to_str().unwrap(), options)
            .await
            .map_err(split_error)
    }

    /// `vmctl --bus-address … ARGS` as `user` (root when None).
    pub fn vmctl(&self, user: Option<(u32, u32)>, args: &[&str]) -> CmdOutput {
        let mut cmd = command_as(user, VMCTL);
        cmd.arg("--bus-address")
            .arg(self.stack.bus.address())
            .args(args);
        run(&mut cmd)
    }

    /// `vmctl --no-ask-password check-disk --json EXTRA… IMAGE` as nobody.
    pub fn check_as_nobody(&self, extra: &[&str], image: &Path) -> CmdOutput {
        let mut args = vec!["--no-ask-password", "check-disk", "--json"];
        args.extend_from_slice(extra);
        args.push(image.to_str().unwrap());
        self.vmctl(Some((NOBODY, NOBODY)), &args)
    }

    /// `vmctl --no-ask-password COMMAND --json IMAGE` as `uid` (gid = uid).
    pub fn vmctl_json_as(&self, uid: u32, command: &str, image: &Path) -> CmdOutput {
        let args = [
            "--no-ask-password",
            command,
            "--json",
            image.to_str().unwrap(),
        ];
        self.vmctl(Some((uid, uid)), &args)
    }

    /// Image paths of the daemon's current jobs.
    pub async fn wait_for_job(&self) -> zbus::OwnedObjectPath {
        let manager = self.manager().await;
        for _ in 0..500 {
            let jobs = manager.jobs().await.unwrap();
            if let Some(job) = jobs.into_iter().next() {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "no job appeared; daemon output:\n{}",
            self.stack.daemon.output()
        );
    }
}

/// A failed call as (`InUse`, message): the service's errors by the client
/// crate's decoding, the bus's (`org.freedesktop.DBus.Error.*`) as sent.
pub fn split_error(e: zbus::Error) -> (String, String) {
    use zbus::DBusError;
    let error = vmmanager_client::Error::from(e);
    let name = error
        .reply_name()
        .unwrap_or_else(|| panic!("not an error reply: {error}"));
    let message = match &error {
        vmmanager_client::Error::ZBus(zbus::Error::MethodError(_, message, _)) => {
            message.clone().unwrap_or_default()
        }
        other => other.description().unwrap_or_default().to_owned(),
    };
    let short = [
        "org.example.VmManager1.Error.",
        "org.freedesktop.DBus.Error.",
    ]
    .iter()
    .find_map(|prefix| name.strip_prefix(prefix))
    .unwrap_or_else(|| panic!("unexpected error name {name}"));
    (short.to_owned(), message)
}

/// CheckDisk of `image` as root on `bus`, its outcome ignored (an error
/// included): for tests of clients that show what DiskChecked reports.
pub async fn check_disk_as_root(bus: &super::TestBus, image: &Path) {
    let _ = check_disk_on(&bus.connect().await, image).await;
}

/// `vmctl ARGS` as root on `bus` (blocking: off the async workers); its
/// output, which must be a success.
pub fn vmctl_as_root(bus: &super::TestBus, args: &[&str]) -> String {
    let mut cmd = command_as(None, VMCTL);
    cmd.arg("--bus-address").arg(bus.address()).args(args);
    run(&mut cmd)
        .expect_success(&format!("vmctl {}", args.join(" ")))
        .to_owned()
}

/// Another local user's check of their own image: `image` is handed to
/// [`NOBODY`], who checks it (polkit must allow it:
/// `allow_user("org.example.vmmanager.check-disk", "nobody")`). Panics when
/// the check did not run, since then no DiskChecked was sent either and a
/// client that shows nothing would prove nothing.
pub async fn check_own_disk_as_nobody(bus: &super::TestBus, image: &Path) {
    super::util::give(image, NOBODY, 0o644);
    let outcome = check_disk_on(&bus.connect_as(NOBODY, NOBODY).await, image).await;
    if let Err(e) = outcome {
        panic!("nobody's CheckDisk({}): {e}", image.display());
    }
}

async fn check_disk_on(connection: &Connection, image: &Path) -> zbus::Result<()> {
    let manager = ManagerProxy::new(connection).await?;
    manager
        .check_disk(image.to_str().unwrap(), HashMap::<&str, Variant<'_>>::new())
        .await
        .map(drop)
}

pub fn str_of<'a>(report: &'a Report, key: &str) -> &'a str {
    match report.get(key).map(|v| &**v) {
        Some(Variant::Str(s)) => s.as_str(),
        other => panic!("{key} is not a string: {other:?}"),
    }
}

pub fn u64_of(report: &Report, key: &str) -> u64 {
    match report.get(key).map(|v| &**v) {
        Some(Variant::U64(n)) => *n,
        Some(Variant::U32(n)) => (*n).into(),
        other => panic!("{key} is not a number: {other:?}"),
    }
}

pub fn bool_of(report: &Report, key: &str) -> bool {
    match report.get(key).map(|v| &**v) {
        Some(Variant::Bool(b)) => *b,
        other => panic!("{key} is not a bool: {other:?}"),
    }
}

pub fn json(report: &Report) -> serde_json::Value {
    dict_to_json(report)
}
