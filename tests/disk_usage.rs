//! In-use detection against real processes: QEMU VMs, writers and readers.
//!
//! Every test has its own temp directory and image, and every child is killed
//! and reaped by a guard, so tests run in parallel and clean up on failure.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::util::ChildGuard;
use tokio_util::sync::CancellationToken;
use vmmanager::disk::image::ImageFile;
use vmmanager::disk::usage::{DiskUsage, DiskUser, FoundBy, UsageScanner};
use vmmanager::disk::view::View;
use vmmanager::procfs::{self, Target};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(env.vm_dir()).unwrap();
        std::fs::create_dir(env.run_dir()).unwrap();
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(env.image_path())
            .arg("16M")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        env
    }
    fn vm_dir(&self) -> PathBuf {
        self.dir.path().join("vm")
    }
    /// Stands in for a global PID file directory such as /run/libvirt/qemu.
    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    fn image_path(&self) -> PathBuf {
        self.vm_dir().join("disk.qcow2")
    }
    fn image(&self) -> ImageFile {
        ImageFile::open(self.image_path().to_str().unwrap()).unwrap()
    }
    fn scanner(&self) -> UsageScanner {
        UsageScanner::new(
            PathBuf::from("/proc"),
            vec![
                "{image_dir}/*.pid".into(),
                format!("{}/*.pid", self.run_dir().display()),
            ],
        )
    }
    fn scan(&self, explicit: Option<&Path>) -> DiskUsage {
        scan(&self.scanner(), &self.image(), explicit)
    }

    /// Starts a QEMU on the image and waits until it holds the image and
    /// its lock.
    fn qemu(&self, name: &str, pidfile: Option<&Path>, readonly: bool) -> ChildGuard {
        let log = self.dir.path().join(format!("qemu-{name}.log"));
        let mut drive = format!(
            "file={},if=virtio,format=qcow2",
            self.image_path().display()
        );
        if readonly {
            drive.push_str(",readonly=on");
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "kvm", "-accel", "tcg", "-m", "64", "-nodefaults"])
            .args(["-display", "none", "-S", "-name", name, "-drive", &drive]);
        if let Some(p) = pidfile {
            cmd.arg("-pidfile").arg(p);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let child = cmd.spawn().expect("qemu-system-x86_64 is installed");
        let mut guard = ChildGuard::new(child, format!("QEMU {name}"));
        let pid = guard.pid();
        self.wait_for(&mut guard, Some(&log), |usage| {
            usage.users.iter().any(|u| {
                u.pid == pid
                    && u.found_by.contains(&FoundBy::Proc)
                    && u.found_by.contains(&FoundBy::Lock)
            })
        });
        if let Some(p) = pidfile {
            wait(|| std::fs::read_to_string(p).is_ok_and(|s| s.trim() == pid.to_string()));
        }
        guard
    }

    /// Runs `sleep` holding the image on fd 3 via the shell redirect `redir`
    /// (`<>` writer, `<` reader).
    fn holder(&self, redir: &str) -> ChildGuard {
        let script = format!("exec 3{redir}\"$1\"; exec sleep 600");
        let child = Command::new("sh")
            .args(["-c", &script, "sh"])
            .arg(self.image_path())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut guard = ChildGuard::new(child, "image holder");
        let pid = guard.pid();
        self.wait_for(&mut guard, None, |usage| {
            usage
                .users
                .iter()
                .any(|u| u.pid == pid && u.exe.ends_with("/sleep"))
        });
        guard
    }

    /// Waits until `ready` says the scan sees `child`; panics (with `log`)
    /// if it exits first.
    fn wait_for(
        &self,
        child: &mut ChildGuard,
        log: Option<&Path>,
        ready: impl Fn(&DiskUsage) -> bool,
    ) {
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait() {
                let log = log.map(crate::common::util::read_lossy).unwrap_or_default();
                panic!("child exited early ({status}): {log}");
            }
            if ready(&self.scan(None)) {
                return;
            }
            assert!(start.elapsed() < READY_TIMEOUT, "child never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A scan nobody cancels, of an image /proc can be read for.
fn scan(scanner: &UsageScanner, image: &ImageFile, explicit: Option<&Path>) -> DiskUsage {
    let never = CancellationToken::new();
    let usage = scanner.scan(image, explicit, &View::Service, &never);
    usage.unwrap()
}

fn wait(cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < READY_TIMEOUT, "condition never held");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on another thread and fails if it takes too long (a hang).
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("scan hung or panicked")
}

fn is_qemu_exe(exe: &str) -> bool {
    exe.ends_with("/qemu-system-x86_64")
}

#[test]
fn vm_found_by_pidfile_proc_and_lock() {
    let env = Env::new();
    let pidfile = env.vm_dir().join("vm.pid");
    let vm = env.qemu("guest=win11,debug-threads=on", Some(&pidfile), false);

    for explicit in [None, Some(pidfile.as_path())] {
        let usage = env.scan(explicit);
        let found = &usage.users;
        assert_eq!(found.len(), 1, "{found:?}");
        let u = &found[0];
        assert_eq!(u.pid, vm.pid());
        assert!(is_qemu_exe(&u.exe), "{}", u.exe);
        assert_eq!(u.vm_name, "win11");
        assert!(u.writable);
        assert!(u.is_qemu);
        assert_eq!(
            u.found_by,
            vec![FoundBy::Pidfile, FoundBy::Proc, FoundBy::Lock]
        );
        assert_eq!(u.pidfile.as_deref(), Some(pidfile.as_path()));
        assert!(usage.stale_pidfiles.is_empty());
        assert_eq!(usage.blocking_user().unwrap().pid, vm.pid());
    }
}

#[test]
fn vm_with_pidfile_in_a_global_directory() {
    let env = Env::new();
    let pidfile = env.run_dir().join("win.pid");
    let vm = env.qemu("win", Some(&pidfile), false);
    let usage = env.scan(None);
    let found = &usage.users;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].pid, vm.pid());
    assert_eq!(found[0].pidfile.as_deref(), Some(pidfile.as_path()));
    assert_eq!(
        found[0].found_by,
        vec![FoundBy::Pidfile, FoundBy::Proc, FoundBy::Lock]
    );
}

#[test]
fn a_vm_without_a_pidfile_is_found_through_proc() {
    let env = Env::new();
    let vm = env.qemu("nopid", None, false);
    let usage = env.scan(None);
    let found = &usage.users;
    assert_eq!(found.len(), 1, "{found:?}");
    let u = &found[0];
    assert_eq!((u.pid, u.vm_name.as_str()), (vm.pid(), "nopid"));
    assert_eq!(u.found_by, vec![FoundBy::Proc, FoundBy::Lock]);
    assert_eq!(u.pidfile, None);
    assert!(u.blocks_check());
}

#[test]
fn killed_vm_leaves_a_stale_pidfile() {
    let env = Env::new();
    let pidfile = env.vm_dir().join("vm.pid");
    let mut vm = env.qemu("doomed", Some(&pidfile), false);
    vm.kill_and_wait();
    assert!(pidfile.exists(), "SIGKILL leaves QEMU's PID file behind");
    for explicit in [None, Some(pidfile.as_path())] {
        let usage = env.scan(explicit);
        assert!(usage.users.is_empty(), "{usage:?}");
        assert!(usage.blocking_users().is_empty());
        assert_eq!(usage.stale_pidfiles, vec![pidfile.clone()]);
    }
    // A dead VM's file in a global directory is someone else's business.
    std::fs::rename(&pidfile, env.run_dir().join("vm.pid")).unwrap();
    let usage = env.scan(None);
    assert!(usage.stale_pidfiles.is_empty());
}

#[test]
fn pidfile_naming_a_live_non_qemu_process_is_stale() {
    let env = Env::new();
    let writer = env.holder("<>");
    let pidfile = env.vm_dir().join("vm.pid");
    std::fs::write(&pidfile, format!("{}\n", writer.pid())).unwrap();
    let usage = env.scan(None);
    assert_eq!(usage.stale_pidfiles, vec![pidfile]);
    let found = &usage.users;
    assert_eq!(found.len(), 1);
    let u = &found[0];
    assert_eq!(u.pid, writer.pid());
    assert_eq!(u.found_by, vec![FoundBy::Proc]);
    assert_eq!(u.pidfile, None);
    assert!(!u.is_qemu && u.writable && u.blocks_check());
}

#[test]
fn fifo_and_symlink_pidfiles_are_stale_without_hanging() {
    let env = Env::new();
    let real = env.dir.path().join("real.pid");
    let vm = env.qemu("linked", Some(&real), false);
    let fifo = env.vm_dir().join("a-fifo.pid");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let link = env.vm_dir().join("b-link.pid");
    std::os::unix::fs::symlink(&real, &link).unwrap();

    let image = env.image();
    let scanner = env.scanner();
    let (usage, explicit_fifo, explicit_link) = within({
        let (fifo, link) = (fifo.clone(), link.clone());
        move || {
            (
                scan(&scanner, &image, None),
                scan(&scanner, &image, Some(&fifo)),
                scan(&scanner, &image, Some(&link)),
            )
        }
    });
    assert_eq!(usage.stale_pidfiles, vec![fifo.clone(), link.clone()]);
    assert_eq!(explicit_fifo.stale_pidfiles, vec![fifo]);
    assert_eq!(explicit_link.stale_pidfiles, vec![link]);
    for usage in [usage, explicit_fifo, explicit_link] {
        let found = &usage.users;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, vm.pid());
        assert_eq!(found[0].found_by, vec![FoundBy::Proc, FoundBy::Lock]);
    }
}

#[test]
fn garbage_pidfiles_are_stale() {
    let env = Env::new();
    let d = env.vm_dir();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("a-huge.pid", vec![b'7'; 10 << 20]),
        ("b-text.pid", b"qemu\n".to_vec()),
        ("c-negative.pid", b"-1\n".to_vec()),
        ("d-bytes.pid", b"\xc3\x28\xff\n".to_vec()),
        ("e-overflow.pid", b"18446744073709551617\n".to_vec()),
        (
            "f-self.pid",
            format!("{}\n", std::process::id()).into_bytes(),
        ),
    ];
    let mut want = Vec::new();
    for (name, content) in files {
        std::fs::write(d.join(name), content).unwrap();
        want.push(d.join(name));
    }
    let start = Instant::now();
    let usage = env.scan(None);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "reads are bounded"
    );
    assert_eq!(usage.stale_pidfiles, want);
    assert!(usage.users.is_empty());
}

#[test]
fn image_reached_through_a_symlink() {
    let env = Env::new();
    let vm = env.qemu("sym", None, false);
    let link_dir = env.dir.path().join("link-to-vm");
    std::os::unix::fs::symlink(env.vm_dir(), &link_dir).unwrap();
    let via = ImageFile::open(link_dir.join("disk.qcow2").to_str().unwrap()).unwrap();
    assert_eq!(via.path, std::fs::canonicalize(env.image_path()).unwrap());
    let through_link = scan(&env.scanner(), &via, None);
    let direct = env.scan(None);
    assert_eq!(through_link.users, direct.users);
    assert_eq!(direct.users[0].pid, vm.pid());
}

#[test]
fn read_only_vm_is_reported_and_blocks() {
    let env = Env::new();
    let pidfile = env.vm_dir().join("ro.pid");
    let vm = env.qemu("ro", Some(&pidfile), true);
    let usage = env.scan(None);
    let found = &usage.users;
    assert_eq!(found.len(), 1, "{found:?}");
    let u = &found[0];
    assert_eq!(u.pid, vm.pid());
    assert!(!u.writable);
    assert!(u.is_qemu && u.blocks_check());
    assert_eq!(
        u.found_by,
        vec![FoundBy::Pidfile, FoundBy::Proc, FoundBy::Lock]
    );
}

#[test]
fn non_qemu_writer_blocks_and_reader_does_not() {
    let env = Env::new();
    let reader = env.holder("<");
    let usage = env.scan(None);
    let found = &usage.users;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].pid, reader.pid());
    assert!(found[0].exe.ends_with("/sleep"));
    assert!(!found[0].writable && !found[0].is_qemu);
    assert_eq!(found[0].found_by, vec![FoundBy::Proc]);
    assert!(usage.blocking_users().is_empty());

    let writer = env.holder("<>");
    let usage = env.scan(None);
    let found = &usage.users;
    assert_eq!(found.len(), 2);
    let blocker = usage.blocking_user().unwrap();
    assert_eq!(blocker.pid, writer.pid());
    assert!(blocker.writable && !blocker.is_qemu);
}

#[test]
fn lock_only_when_qemu_is_not_in_proc() {
    for readonly in [false, true] {
        let env = Env::new();
        let _vm = env.qemu("hidden", None, readonly);
        let empty_proc = tempfile::tempdir().unwrap();
        let scanner = UsageScanner::new(empty_proc.path().to_owned(), vec![]);
        let usage = scan(&scanner, &env.image(), None);
        assert_eq!(
            usage.users,
            vec![DiskUser {
                pid: 0,
                exe: String::new(),
                vm_name: String::new(),
                writable: !readonly,
                found_by: vec![FoundBy::Lock],
                pidfile: None,
                is_qemu: true,
            }]
        );
        assert!(!usage.blocking_users().is_empty());
    }
}

#[test]
fn unused_image_has_no_users() {
    let env = Env::new();
    let usage = env.scan(None);
    assert!(usage.users.is_empty());
    assert!(usage.stale_pidfiles.is_empty());
    assert!(usage.blocking_users().is_empty());
}

/// A child between fork and exec shares every fd of ours, even after we
/// close ours: it runs the scanner's own executable and is not a user.
#[test]
fn a_fork_of_the_scanner_is_not_a_user() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    let meta = std::fs::metadata(env.image_path()).unwrap();
    let me = std::process::id();

    // Open at the fork, closed before the scan: the child's copy outlives it.
    let image_at_fork = env.image();
    let (tx, rx) = mpsc::channel();
    let spawner = std::thread::spawn(move || {
        let mut cmd = Command::new("true");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::sleep(3);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let _ = tx.send(());
        child.wait().unwrap()
    });
    // Every holder, our own children included (skipping only PID 0).
    let never = CancellationToken::new();
    let holders = || procfs::holders(Path::new("/proc"), Target::of(&meta), 0, &never).unwrap();
    let fork = {
        let start = Instant::now();
        loop {
            let fork = holders()
                .into_iter()
                .find(|h| procfs::parent_pid(Path::new("/proc"), h.pid) == Some(me));
            if let Some(fork) = fork {
                break fork.pid;
            }
            assert!(start.elapsed() < READY_TIMEOUT, "the fork never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    drop(image_at_fork);

    let usage = env.scan(None);
    let still_forked = holders().iter().any(|h| h.pid == fork);
    assert!(
        usage.users.iter().all(|u| u.pid != fork),
        "fork {fork} reported: {usage:?}"
    );
    // The assertion above means something only if the fork was still
    // sharing the image during the scan (it sleeps for 3 s).
    assert!(still_forked, "the fork exec'd before the scan ended");
    rx.recv().unwrap();
    assert!(spawner.join().unwrap().success());
}
