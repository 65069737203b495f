//! Bounded inputs end to end: absurd option dictionaries, directories full of
//! PID files and over-long path components get short, exact answers and
//! leave the daemon healthy. Real dbus-daemon, polkitd, vmmanagerd and QEMU.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::images::make_clean_qcow2;
use common::util::{rss_kib, write_file};
use common::world::World;
use common::{NOBODY, Vm};
use vmmanager::disk::usage::MAX_STALE_PIDFILES;
use vmmanager_client::ManagerProxy;
use vmmanager_client::json::dict_to_json;
use zbus::{Connection, Variant};

const INVALID_ARGUMENT: &str = "org.example.VmManager1.Error.InvalidArgument";
const NOT_AUTHORIZED: &str = "org.example.VmManager1.Error.NotAuthorized";
/// Longer than this is no longer a short message.
const SHORT_MESSAGE: usize = 200;
/// No call here may take longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

type Options<'a> = HashMap<&'a str, Variant<'a>>;
type Report = HashMap<String, zbus::OwnedVariant>;

async fn check_disk(c: &Connection, image: &str, options: Options<'_>) -> zbus::Result<Report> {
    let manager = ManagerProxy::new(c).await.unwrap();
    tokio::time::timeout(CALL_TIMEOUT, manager.check_disk(image, options))
        .await
        .unwrap_or_else(|_| panic!("CheckDisk({image:.60}) hung"))
}

async fn get_disk_users(
    c: &Connection,
    image: &str,
    options: Options<'_>,
) -> zbus::Result<Vec<Report>> {
    let manager = ManagerProxy::new(c).await.unwrap();
    tokio::time::timeout(CALL_TIMEOUT, manager.get_disk_users(image, options))
        .await
        .unwrap_or_else(|_| panic!("GetDiskUsers({image:.60}) hung"))
}

/// The full D-Bus error name and the message of a failed call.
fn error_of<T: std::fmt::Debug>(result: zbus::Result<T>) -> (String, String) {
    match result {
        Err(zbus::Error::MethodError(name, message, _)) => {
            (name.to_string(), message.unwrap_or_default())
        }
        other => panic!("expected a D-Bus error reply, got {other:.300?}"),
    }
}

/// Asserts a short InvalidArgument; returns its message.
#[track_caller]
fn assert_short_invalid_argument<T: std::fmt::Debug>(
    what: &str,
    result: zbus::Result<T>,
) -> String {
    let (name, message) = error_of(result);
    assert_eq!(name, INVALID_ARGUMENT, "{what}: {message:.300}");
    assert!(
        message.len() < SHORT_MESSAGE,
        "{what}: a {} byte message: {message:.300}…",
        message.len()
    );
    message
}

/// 20,000 unknown keys, the shape of the reported attack.
fn flood_options() -> HashMap<String, Variant<'static>> {
    (0..20_000)
        .map(|i| (format!("no-such-option-{i:05}"), Variant::from(true)))
        .collect()
}

fn borrowed<'a>(options: &'a HashMap<String, Variant<'static>>) -> Options<'a> {
    options
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_floods_get_a_short_invalid_argument_and_the_daemon_survives() {
    let mut w = World::start().await;
    let image = w.dir.path().join("disk.qcow2");
    make_clean_qcow2(&image);
    let image = image.to_str().unwrap();
    let nobody = w.stack.bus.connect_as(NOBODY, NOBODY).await;

    // The connection really is nobody's, and polkit refuses it a real call.
    let dbus = zbus::fdo::DBusProxy::new(&w.connection).await.unwrap();
    let uid = dbus
        .get_connection_unix_user(nobody.unique_name().unwrap().clone().into())
        .await
        .unwrap();
    assert_eq!(uid, NOBODY);
    let (name, _) = error_of(get_disk_users(&nobody, image, Options::new()).await);
    assert_eq!(name, NOT_AUTHORIZED);

    // Refused whole: not even a part of a key comes back.
    let flood = flood_options();
    let message = assert_short_invalid_argument(
        "CheckDisk flood",
        check_disk(&nobody, image, borrowed(&flood)).await,
    );
    assert!(!message.contains("no-such"), "{message}");
    assert_short_invalid_argument(
        "GetDiskUsers flood",
        get_disk_users(&nobody, image, borrowed(&flood)).await,
    );
    let huge_key = "k".repeat(100_000);
    let message = assert_short_invalid_argument(
        "one huge key",
        check_disk(
            &nobody,
            image,
            Options::from([(huge_key.as_str(), Variant::from(true))]),
        )
        .await,
    );
    assert!(!message.contains("kkkk"), "{message}");
    // Values are quoted only in part.
    let huge_value = "x".repeat(100_000);
    for key in ["repair", "pidfile"] {
        assert_short_invalid_argument(
            key,
            check_disk(
                &nobody,
                image,
                Options::from([(key, Variant::from(huge_value.as_str()))]),
            )
            .await,
        );
    }

    // Twelve floods at once, each on its own connection.
    let rss_before = rss_kib(w.stack.daemon.pid());
    let mut floods = Vec::new();
    for _ in 0..12 {
        let connection = w.stack.bus.connect_as(NOBODY, NOBODY).await;
        let flood = flood_options();
        let image = image.to_owned();
        floods.push(tokio::spawn(async move {
            check_disk(&connection, &image, borrowed(&flood)).await
        }));
    }
    for flood in floods {
        assert_short_invalid_argument("parallel flood", flood.await.unwrap());
    }
    let rss_after = rss_kib(w.stack.daemon.pid());
    eprintln!("daemon RSS: {rss_before} KiB before 12 parallel floods, {rss_after} KiB after");

    assert!(
        w.stack.daemon.is_running(),
        "the daemon died: {}",
        w.stack.daemon.output()
    );
    let report = check_disk(&w.connection, image, Options::new())
        .await
        .unwrap();
    assert_eq!(dict_to_json(&report)["result"], "clean");
}

/// Median wall time of `runs` GetDiskUsers calls as root.
async fn median_users_time(w: &World, image: &Path, runs: usize) -> Duration {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        get_disk_users(&w.connection, image.to_str().unwrap(), Options::new())
            .await
            .unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    times[runs / 2]
}

/// `count` stale PID files in `dir`: half garbage, half a reaped child's PID.
fn stale_pidfiles(dir: &Path, count: usize) {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    for i in 0..count {
        let content = if i % 2 == 0 {
            "garbage\n".to_owned()
        } else {
            format!("{dead}\n")
        };
        write_file(&dir.join(format!("stale-{i:04}.pid")), content, 0o644);
    }
}

fn stale_list(report: &Report) -> Vec<PathBuf> {
    serde_json::from_value(dict_to_json(report)["stale-pidfiles"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_stale_pidfiles_are_capped_and_a_valid_one_still_counts() {
    let w = World::start().await;
    let crowded = w.dir.path().join("crowded");
    let empty = w.dir.path().join("empty");
    std::fs::create_dir(&crowded).unwrap();
    std::fs::create_dir(&empty).unwrap();
    let image = crowded.join("disk.qcow2");
    let lonely = empty.join("disk.qcow2");
    make_clean_qcow2(&image);
    make_clean_qcow2(&lonely);
    stale_pidfiles(&crowded, 4096);

    // For information only: timing depends on the machine and its load.
    median_users_time(&w, &image, 3).await;
    let with_files = median_users_time(&w, &image, 21).await;
    let without = median_users_time(&w, &lonely, 21).await;
    eprintln!(
        "GetDiskUsers median: {with_files:?} with 4,096 stale PID files beside the image, \
         {without:?} in an empty directory"
    );

    let report = check_disk(&w.connection, image.to_str().unwrap(), Options::new())
        .await
        .unwrap();
    let stale = stale_list(&report);
    assert_eq!(stale.len(), MAX_STALE_PIDFILES, "{:?}…", &stale[..3]);
    assert!(stale.iter().all(|p| p.starts_with(&crowded)), "{stale:?}");

    // A valid PID file among them still names the VM.
    let vm = Vm::start("crowded", &image);
    let users = get_disk_users(&w.connection, image.to_str().unwrap(), Options::new())
        .await
        .unwrap();
    let user = dict_to_json(&users[0]);
    assert_eq!(user["pid"], vm.pid(), "{user}");
    assert_eq!(
        user["found-by"],
        serde_json::json!(["pidfile", "proc", "lock"]),
        "{user}"
    );
    assert_eq!(user["pidfile"], vm.pidfile().to_str().unwrap());
    let report = check_disk(
        &w.connection,
        image.to_str().unwrap(),
        Options::from([("force-share", Variant::from(true))]),
    )
    .await
    .unwrap();
    let stale = stale_list(&report);
    assert_eq!(stale.len(), MAX_STALE_PIDFILES, "{:?}…", &stale[..3]);
    assert!(!stale.iter().any(|p| p == vm.pidfile()), "{stale:?}");
    assert_eq!(dict_to_json(&report)["users"][0]["pid"], vm.pid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_longer_than_255_bytes_is_an_invalid_argument() {
    let w = World::start().await;
    let nobody = w.stack.bus.connect_as(NOBODY, NOBODY).await;
    let long_name = "n".repeat(256);
    let in_long_dir = w.dir.path().join(&long_name).join("disk.qcow2");
    let in_long_dir = in_long_dir.to_str().unwrap();
    for (who, c) in [("root", &w.connection), ("nobody", &nobody)] {
        assert_short_invalid_argument(
            &format!("CheckDisk as {who}"),
            check_disk(c, in_long_dir, Options::new()).await,
        );
        assert_short_invalid_argument(
            &format!("GetDiskUsers as {who}"),
            get_disk_users(c, in_long_dir, Options::new()).await,
        );
    }

    // The kernel's ENAMETOOLONG, met while resolving a symlink, says the same.
    let link = w.dir.path().join("link.qcow2");
    std::os::unix::fs::symlink(in_long_dir, &link).unwrap();
    let (name, message) =
        error_of(check_disk(&w.connection, link.to_str().unwrap(), Options::new()).await);
    assert_eq!(name, INVALID_ARGUMENT, "{message}");

    // So does a pidfile option with such a name.
    let image = w.dir.path().join("disk.qcow2");
    make_clean_qcow2(&image);
    let pidfile = w.dir.path().join(format!("{long_name}.pid"));
    assert_short_invalid_argument(
        "pidfile",
        check_disk(
            &w.connection,
            image.to_str().unwrap(),
            Options::from([("pidfile", Variant::from(pidfile.to_str().unwrap()))]),
        )
        .await,
    );

    // 255 bytes is still a name.
    let dir = w.dir.path().join("m".repeat(255));
    std::fs::create_dir(&dir).unwrap();
    let image = dir.join("disk.qcow2");
    make_clean_qcow2(&image);
    let report = check_disk(&w.connection, image.to_str().unwrap(), Options::new())
        .await
        .unwrap();
    assert_eq!(dict_to_json(&report)["result"], "clean");
}
