//! `vmmanager-opener` and the service's side of it (`disk::writable`), with
//! the real opener binary behind a real listening socket. [`SocketUnit`]
//! plays systemd's part for `vmmanager-opener.socket` (`Accept=yes`,
//! `StandardInput=socket`): it accepts each connection and starts the
//! opener with that connection as its stdin. A directory read-only for
//! one side is a read-only bind mount in a private mount namespace
//! ([`ReadOnlyNamespace`]), as `ProtectSystem=strict` makes it; the
//! systemd units themselves are checked in the booted guest
//! (tests/system).

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vmmanager::disk::checker::CheckErrorKind;
use vmmanager::disk::image::ImageFile;
use vmmanager::disk::qemu_img::RunAs;
use vmmanager::disk::view::View;
use vmmanager::disk::writable::{self, NotWritable};
use vmmanager::opener::{self, OpenerError};
use vmmanager::service::error::VmError;
use zbus::Variant;

use crate::common::images::{LEAKED_CLUSTERS, make_leaky_qcow2};
use crate::common::util::{ChildGuard, command_in_namespace, public_tempdir, wait_until};
use crate::common::world::{World, str_of, u64_of};
use crate::common::{DaemonConfig, NOBODY, Polkit};

const OPENER: &str = env!("CARGO_BIN_EXE_vmmanager-opener");
const TIMEOUT: Duration = Duration::from_secs(10);

/// What [`SocketUnit`] does with each connection.
#[derive(Default)]
struct Instances {
    /// Start the opener in this mount namespace (`/proc/PID/ns/mnt`)
    /// rather than in a new one of its own.
    namespace: Option<PathBuf>,
    /// Runs after the connection is accepted, before the opener starts:
    /// the moment between the service's look at its descriptor and the
    /// opener's lookup.
    on_connect: Option<Box<dyn Fn() + Send>>,
    /// Accept, but never start an opener (a hung one).
    hang: bool,
}

/// How one opener instance ended.
#[derive(Debug, Clone)]
struct Served {
    success: bool,
    stderr: String,
}

/// A listening socket and systemd's `Accept=yes` loop around it; stopped
/// and its socket removed on drop.
struct SocketUnit {
    /// Holds the socket; removed on drop.
    _dir: TempDir,
    socket: PathBuf,
    served: Arc<Mutex<Vec<Served>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SocketUnit {
    fn start(instances: Instances) -> SocketUnit {
        let dir = public_tempdir("vmm-opener-");
        let socket = dir.path().join("opener.socket");
        let listener = UnixListener::bind(&socket).unwrap();
        // Anyone may connect here: the opener itself must refuse non-root
        // peers (the real socket is 0600 as well).
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
        let served = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let (served, stop) = (served.clone(), stop.clone());
            move || accept_loop(&listener, &instances, &served, &stop)
        });
        SocketUnit {
            _dir: dir,
            socket,
            served,
            stop,
            thread: Some(thread),
        }
    }

    fn served(&self) -> Vec<Served> {
        self.served.lock().unwrap().clone()
    }

    /// The first `n` instances, once they have ended (the answer reaches
    /// the service before its opener has exited).
    fn wait_served(&self, n: usize) -> Vec<Served> {
        wait_until(
            TIMEOUT,
            &format!("{n} opener instance(s) to end"),
            || self.served().len() >= n,
            || format!("{:?}", self.served()),
        );
        self.served()
    }
}

impl Drop for SocketUnit {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

fn accept_loop(
    listener: &UnixListener,
    instances: &Instances,
    served: &Mutex<Vec<Served>>,
    stop: &AtomicBool,
) {
    let mut hung = Vec::new();
    for connection in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(connection) = connection else { continue };
        if let Some(on_connect) = &instances.on_connect {
            on_connect();
        }
        if instances.hang {
            hung.push(connection);
            continue;
        }
        // As systemd does, each instance gets a mount namespace of its own,
        // gone when it exits: the handle must outlive it.
        let mut command = match &instances.namespace {
            Some(ns) => command_in_namespace(Some(ns), OPENER),
            None => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "slave", "--", OPENER]);
                c
            }
        };
        let output = command
            .stdin(Stdio::from(OwnedFd::from(connection)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run vmmanager-opener");
        served.lock().unwrap().push(Served {
            success: output.status.success(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
}

/// A private mount namespace in which `dir` is a read-only bind mount, as
/// a `ProtectSystem=strict` namespace has it for a directory made after
/// it was built. Gone (mounts and all) on drop.
struct ReadOnlyNamespace {
    holder: ChildGuard,
}

const HOLDER_SCRIPT: &str = r#"
set -e
mount --bind "$1" "$1"
mount -o remount,bind,ro "$1"
touch "$2"
exec cat >/dev/null
"#;

impl ReadOnlyNamespace {
    fn new(dir: &Path) -> ReadOnlyNamespace {
        let ready = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        fs::remove_file(&ready).unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .args([HOLDER_SCRIPT, "sh"])
            .arg(dir)
            .arg(&ready)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn unshare");
        let mut holder = ChildGuard::new(child, "read-only namespace holder");
        wait_until(
            Duration::from_secs(10),
            "the read-only mount namespace",
            || ready.exists() || !holder.is_running(),
            String::new,
        );
        assert!(holder.is_running(), "setting up the namespace failed");
        ReadOnlyNamespace { holder }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.holder.pid()))
    }
}

fn image_in(dir: &Path, name: &str) -> (PathBuf, ImageFile) {
    let path = dir.join(name);
    let mut header = b"QFI\xfb\0\0\0\x03".to_vec();
    header.resize(4096, 0);
    fs::write(&path, header).unwrap();
    let image = ImageFile::open(path.to_str().unwrap()).unwrap();
    (path, image)
}

fn identity(fd: &OwnedFd) -> (u64, u64) {
    let meta = fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    (meta.dev(), meta.ino())
}

#[test]
fn the_opener_hands_back_the_same_file_on_a_writable_mount() {
    let unit = SocketUnit::start(Instances::default());
    let dir = public_tempdir("vmm-opener-images-");
    let (path, image) = image_in(dir.path(), "a.qcow2");

    let handle = writable::reopen_writable(&image, &unit.socket, TIMEOUT).unwrap();
    assert_eq!(identity(&handle), (image.dev, image.ino));
    // What qemu-img does with it: reopen it for writing.
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .unwrap();
    file.write_all(b"QFI").unwrap();
    let served = unit.wait_served(1);
    assert!(served[0].success, "{served:?}");
    assert!(path.exists());
}

#[test]
fn a_peer_that_is_not_root_is_refused() {
    let unit = SocketUnit::start(Instances::default());
    let dir = public_tempdir("vmm-opener-images-");
    let (path, _image) = image_in(dir.path(), "a.qcow2");
    let nobody = View::User(RunAs {
        uid: NOBODY,
        gid: NOBODY,
        groups: vec![],
    });
    let answer = nobody
        .run(|| opener::request(&unit.socket, &path, TIMEOUT))
        .unwrap();
    match answer {
        Err(OpenerError::Refused(why)) => assert!(why.contains("uid 65534"), "{why}"),
        other => panic!("nobody got {other:?}"),
    }
    let served = unit.wait_served(1);
    assert!(!served[0].success, "{served:?}");
    assert!(served[0].stderr.contains("refused"), "{served:?}");
}

#[test]
fn a_name_swapped_for_another_file_meanwhile_is_not_used() {
    let dir = public_tempdir("vmm-opener-images-");
    let (path, image) = image_in(dir.path(), "a.qcow2");
    let (other, _) = image_in(dir.path(), "other.qcow2");
    let unit = SocketUnit::start(Instances {
        on_connect: Some(Box::new({
            let (other, path) = (other.clone(), path.clone());
            move || {
                let _ = fs::rename(&other, &path);
            }
        })),
        ..Instances::default()
    });
    match writable::reopen_writable(&image, &unit.socket, TIMEOUT) {
        Err(NotWritable::OtherFile) => {}
        other => panic!("a swapped name gave {other:?}"),
    }
}

#[test]
fn a_symlink_on_the_way_is_refused_even_to_the_same_file() {
    let dir = public_tempdir("vmm-opener-images-");
    let (path, image) = image_in(dir.path(), "a.qcow2");
    let moved = dir.path().join("moved.qcow2");
    let unit = SocketUnit::start(Instances {
        // The image moves away and a symlink to it takes its name.
        on_connect: Some(Box::new({
            let (moved, path) = (moved.clone(), path.clone());
            move || {
                fs::rename(&path, &moved).unwrap();
                std::os::unix::fs::symlink(&moved, &path).unwrap();
            }
        })),
        ..Instances::default()
    });
    // The service asks for the name from before the move: readlink is done
    // before the connection is accepted.
    match writable::reopen_writable(&image, &unit.socket, TIMEOUT) {
        Err(NotWritable::Opener(OpenerError::Refused(why))) => {
            assert!(why.contains("Too many levels of symbolic links"), "{why}")
        }
        other => panic!("a symlink on the way gave {other:?}"),
    }
}

/// A directory on the way swapped for a symlink (to a place the caller
/// cannot enter, say): the opener never follows it, so root looks nowhere
/// else for the caller and tells nothing of what is there.
#[test]
fn a_symlinked_directory_on_the_way_is_never_followed() {
    let dir = public_tempdir("vmm-opener-images-");
    let sub = dir.path().join("d");
    fs::create_dir(&sub).unwrap();
    let (_path, image) = image_in(&sub, "a.qcow2");
    let unit = SocketUnit::start(Instances {
        on_connect: Some(Box::new({
            let (dir, sub) = (dir.path().to_owned(), sub.clone());
            move || {
                fs::rename(&sub, dir.join("d2")).unwrap();
                std::os::unix::fs::symlink(dir.join("d2"), &sub).unwrap();
            }
        })),
        ..Instances::default()
    });
    match writable::reopen_writable(&image, &unit.socket, TIMEOUT) {
        Err(NotWritable::Opener(OpenerError::Refused(why))) => {
            assert!(why.contains("Too many levels of symbolic links"), "{why}")
        }
        other => panic!("a symlinked directory on the way gave {other:?}"),
    }
}

/// An image unlinked since the service opened it has a name ending in
/// " (deleted)", which may lead anywhere now: the opener is not asked.
#[test]
fn an_unlinked_image_is_not_looked_up_again() {
    let dir = public_tempdir("vmm-opener-images-");
    let (path, image) = image_in(dir.path(), "a.qcow2");
    fs::remove_file(&path).unwrap();
    let unit = SocketUnit::start(Instances::default());
    match writable::reopen_writable(&image, &unit.socket, TIMEOUT) {
        Err(NotWritable::OtherFile) => {}
        other => panic!("an unlinked image gave {other:?}"),
    }
    assert!(unit.served().is_empty(), "the opener was asked");
}

#[test]
fn a_directory_read_only_for_the_opener_too_is_refused() {
    let dir = public_tempdir("vmm-opener-images-");
    let (_, image) = image_in(dir.path(), "a.qcow2");
    let read_only = ReadOnlyNamespace::new(dir.path());
    let unit = SocketUnit::start(Instances {
        namespace: Some(read_only.path()),
        ..Instances::default()
    });
    match writable::reopen_writable(&image, &unit.socket, TIMEOUT) {
        Err(NotWritable::StillReadOnly) => {}
        other => panic!("a read-only opener gave {other:?}"),
    }
    assert!(unit.wait_served(1)[0].success);
}

#[test]
fn without_the_opener_the_error_says_what_to_enable_and_how_to_allow_the_directory() {
    let dir = public_tempdir("vmm-opener-images-");
    let (path, image) = image_in(dir.path(), "a.qcow2");
    let socket = dir.path().join("nothing-listens.socket");
    let reason = writable::reopen_writable(&image, &socket, TIMEOUT).unwrap_err();
    assert!(
        matches!(reason, NotWritable::Opener(OpenerError::Unavailable { .. })),
        "{reason:?}"
    );
    let kind = CheckErrorKind::NotWritable {
        image: path.clone(),
        socket,
        reason,
    };
    let message = kind.to_string();
    for part in [
        "systemctl enable --now vmmanager-opener.socket",
        &format!("ReadWritePaths=-{}", dir.path().display()),
        "vmmanager-opener@.service",
        "vmmanagerd.service",
    ] {
        assert!(message.contains(part), "{part:?} is not in: {message}");
    }
    match VmError::from(kind) {
        VmError::NotSupported(m) => assert_eq!(m, message),
        other => panic!("mapped to {other:?}"),
    }
}

#[test]
fn an_opener_that_never_answers_is_given_up_on_in_time() {
    let unit = SocketUnit::start(Instances {
        hang: true,
        ..Instances::default()
    });
    let dir = public_tempdir("vmm-opener-images-");
    let (path, _) = image_in(dir.path(), "a.qcow2");
    let limit = Duration::from_millis(300);
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = unit.socket.clone();
    thread::spawn(move || tx.send(opener::request(&socket, &path, limit)));
    let answer = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the request did not return within 10 s");
    assert!(
        matches!(answer, Err(OpenerError::TimedOut(_))),
        "{answer:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // A timeout is a failure of the moment, not the host's configuration.
    let kind = CheckErrorKind::NotWritable {
        image: dir.path().join("a.qcow2"),
        socket: unit.socket.clone(),
        reason: NotWritable::Opener(answer.unwrap_err()),
    };
    match VmError::from(kind) {
        VmError::CheckFailed(m) => assert!(m.contains("try again"), "{m}"),
        other => panic!("mapped to {other:?}"),
    }
}

/// The whole service: its image directory read-only in its own mount
/// namespace (a `ReadWritePaths=` directory made after it started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_where_the_service_sees_a_read_only_mount_goes_through_the_opener() {
    let images = public_tempdir("vmm-opener-images-");
    let namespace = ReadOnlyNamespace::new(images.path());
    let unit = SocketUnit::start(Instances::default());
    let mut config = DaemonConfig::default().in_mount_namespace(namespace.path());
    config.config.disk.opener_socket = unit.socket.clone();
    let w = World::with(Polkit::builder(), config).await;
    let repair = [("repair", Variant::from("leaks"))];

    let leaky = images.path().join("leaky.qcow2");
    make_leaky_qcow2(&leaky);
    // A check only reads: the opener is not asked.
    assert_eq!(
        str_of(&w.check(&leaky, &[]).await.unwrap(), "result"),
        "leaks"
    );
    assert_eq!(unit.served().len(), 0);

    let r = w.check(&leaky, &repair).await.unwrap_or_else(|e| {
        panic!(
            "{e:?}\nopener: {:?}\ndaemon:\n{}",
            unit.served(),
            w.stack.daemon.output()
        )
    });
    assert_eq!(u64_of(&r, "leaks-fixed"), LEAKED_CLUSTERS);
    assert_eq!(str_of(&r, "result"), "clean");
    assert!(unit.wait_served(1)[0].success);

    // Where the service's own mount is writable, nothing changes.
    let elsewhere = w.path("leaky.qcow2");
    make_leaky_qcow2(&elsewhere);
    let r = w.check(&elsewhere, &repair).await.unwrap();
    assert_eq!(u64_of(&r, "leaks-fixed"), LEAKED_CLUSTERS);
    assert_eq!(unit.served().len(), 1, "the opener was asked needlessly");

    // No opener: refused with what to do, and the image is untouched.
    let socket = unit.socket.clone();
    drop(unit);
    assert!(!socket.exists());
    make_leaky_qcow2(&leaky);
    let (name, message) = w.check(&leaky, &repair).await.unwrap_err();
    assert_eq!(name, "NotSupported", "{message}");
    assert!(
        message.contains("systemctl enable --now vmmanager-opener.socket"),
        "{message}"
    );
    assert_eq!(
        str_of(&w.check(&leaky, &[]).await.unwrap(), "result"),
        "leaks"
    );
}
