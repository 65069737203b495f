//! Scans against prepared /proc trees: every rule, deterministically, without
//! real VMs (tests/disk_usage.rs covers real QEMU processes).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::lock::tests::ofd_lock;
use super::*;
use crate::disk::image::ImageFile;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const RO: &str = "0100000";
const RW: &str = "0100002";

/// A temp dir holding an image directory and a fake proc root.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(env.proc_root()).unwrap();
        std::fs::create_dir(env.vm_dir()).unwrap();
        std::fs::create_dir(env.global_dir()).unwrap();
        std::fs::write(env.image_path(), vec![0u8; 4096]).unwrap();
        env
    }
    fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }
    fn vm_dir(&self) -> PathBuf {
        self.dir.path().join("vm")
    }
    fn global_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    fn image_path(&self) -> PathBuf {
        self.vm_dir().join("disk.qcow2")
    }
    fn image(&self) -> ImageFile {
        ImageFile::open(self.image_path().to_str().unwrap()).unwrap()
    }
    /// A scan nobody cancels, of an image /proc can be read for.
    fn scan(&self, explicit: Option<&Path>) -> DiskUsage {
        let never = CancellationToken::new();
        let usage = self
            .scanner()
            .scan(&self.image(), explicit, &View::Service, &never);
        usage.unwrap()
    }
    fn scanner(&self) -> UsageScanner {
        UsageScanner::new(
            self.proc_root(),
            vec![
                "{image_dir}/*.pid".into(),
                format!("{}/*.pid", self.global_dir().display()),
            ],
        )
    }
    fn pidfile(&self, dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
    /// Adds `<proc>/PID` with exe link, stat, cmdline and fds (`(fd, target,
    /// octal flags)`).
    fn process(&self, pid: u32, exe: &str, state: char, args: &[&str], fds: &[(u32, &Path, &str)]) {
        let d = self.proc_root().join(pid.to_string());
        std::fs::create_dir_all(d.join("fd")).unwrap();
        std::fs::create_dir_all(d.join("fdinfo")).unwrap();
        symlink(exe, d.join("exe")).unwrap();
        std::fs::write(d.join("stat"), format!("{pid} (x) y) {state} 1 1 1\n")).unwrap();
        let mut cmdline = Vec::new();
        for a in std::iter::once(&exe).chain(args) {
            cmdline.extend_from_slice(a.as_bytes());
            cmdline.push(0);
        }
        std::fs::write(d.join("cmdline"), cmdline).unwrap();
        symlink("/", d.join("root")).unwrap();
        for (fd, target, flags) in fds {
            symlink(target, d.join("fd").join(fd.to_string())).unwrap();
            std::fs::write(
                d.join("fdinfo").join(fd.to_string()),
                format!("pos:\t0\nflags:\t{flags}\nmnt_id:\t1\n"),
            )
            .unwrap();
        }
    }
    /// Holds QEMU's lock bytes through a second open file description.
    fn lock_like_qemu(&self, writable: bool) -> File {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.image_path())
            .unwrap();
        let bytes: &[i64] = if writable {
            &[100, 101, 103, 201, 203]
        } else {
            &[100, 201, 203]
        };
        for &b in bytes {
            ofd_lock(&f, b, false);
        }
        f
    }
}

/// PIDs far above any real one here, but within the kernel's PID range.
const VM: u32 = 4_000_001;
const OTHER: u32 = 4_000_002;

#[test]
fn nothing_uses_the_image() {
    let env = Env::new();
    assert_eq!(env.scan(None), DiskUsage::default());
}

#[test]
fn vm_found_by_pidfile_proc_and_lock() {
    let env = Env::new();
    let img = env.image_path();
    let pf = env.pidfile(&env.vm_dir(), "win11.pid", format!("{VM}\n").as_bytes());
    let pf_arg = pf.to_str().unwrap();
    env.process(
        VM,
        QEMU,
        'S',
        &["-name", "guest=win11,debug-threads=on", "-pidfile", pf_arg],
        &[(3, Path::new("/dev/null"), RW), (17, &img, RW)],
    );
    let _lock = env.lock_like_qemu(true);
    let usage = env.scan(None);
    assert_eq!(
        usage,
        DiskUsage {
            users: vec![DiskUser {
                pid: VM,
                exe: QEMU.into(),
                vm_name: "win11".into(),
                writable: true,
                found_by: vec![FoundBy::Pidfile, FoundBy::Proc, FoundBy::Lock],
                pidfile: Some(pf.clone()),
                is_qemu: true,
            }],
            stale_pidfiles: vec![],
        }
    );
    assert_eq!(usage.blocking_users().first().map(|u| u.pid), Some(VM));

    // The explicit pidfile gives the same answer.
    let explicit = env.scan(Some(&pf));
    assert_eq!(explicit, usage);
}

#[test]
fn matched_by_inode_not_by_path_text() {
    let env = Env::new();
    // A hard link and a symlink reach the same inode under other names.
    let hard = env.dir.path().join("hard");
    std::fs::hard_link(env.image_path(), &hard).unwrap();
    let soft = env.dir.path().join("soft");
    symlink(env.image_path(), &soft).unwrap();
    // A different file whose path text starts like the image's.
    let lookalike = env.vm_dir().join("disk.qcow2.bak");
    std::fs::write(&lookalike, b"x").unwrap();
    env.process(VM, QEMU, 'S', &[], &[(3, &hard, RO)]);
    env.process(OTHER, "/usr/bin/cat", 'R', &[], &[(4, &soft, RO)]);
    env.process(OTHER + 1, "/usr/bin/cp", 'R', &[], &[(5, &lookalike, RW)]);
    let usage = env.scan(None);
    let pids: Vec<u32> = usage.users.iter().map(|u| u.pid).collect();
    assert_eq!(pids, vec![VM, OTHER]);
}

#[test]
fn dead_zombie_and_recycled_pidfiles_are_stale() {
    let env = Env::new();
    let img = env.image_path();
    let dead = env.pidfile(&env.vm_dir(), "dead.pid", b"4000099\n");
    let zombie = env.pidfile(&env.vm_dir(), "zombie.pid", format!("{VM}").as_bytes());
    env.process(VM, QEMU, 'Z', &[], &[]);
    // A recycled PID: a shell that even has the image open.
    let recycled = env.pidfile(&env.vm_dir(), "recycled.pid", format!("{OTHER}").as_bytes());
    env.process(OTHER, "/usr/bin/bash", 'S', &[], &[(3, &img, RO)]);
    let usage = env.scan(None);
    assert_eq!(usage.stale_pidfiles, vec![dead, recycled, zombie]);
    assert_eq!(usage.users.len(), 1);
    let u = &usage.users[0];
    assert_eq!((u.pid, u.is_qemu, u.writable), (OTHER, false, false));
    assert_eq!(u.found_by, vec![FoundBy::Proc]);
    assert_eq!(u.pidfile, None);
    assert!(usage.blocking_users().is_empty(), "a reader does not block");
}

#[test]
fn stale_pidfiles_are_capped_and_valid_ones_after_them_still_count() {
    let env = Env::new();
    let img = env.image_path();
    // Named to sort before the VMs' own files, so the cap is reached first.
    let stale: Vec<PathBuf> = (0..MAX_STALE_PIDFILES + 100)
        .map(|i| {
            let content: &[u8] = if i % 2 == 0 { b"garbage" } else { b"4000099\n" };
            env.pidfile(&env.vm_dir(), &format!("a{i:04}.pid"), content)
        })
        .collect();
    for i in 0..100 {
        env.pidfile(&env.global_dir(), &format!("a{i:04}.pid"), b"4000099\n");
    }
    let own = env.pidfile(&env.vm_dir(), "zz.pid", format!("{VM}\n").as_bytes());
    let global = env.pidfile(&env.global_dir(), "zz.pid", format!("{OTHER}\n").as_bytes());
    for (pid, pf) in [(VM, &own), (OTHER, &global)] {
        let args = ["-pidfile", pf.to_str().unwrap()];
        env.process(pid, QEMU, 'S', &args, &[(17, &img, RO)]);
    }
    let usage = env.scan(None);
    assert_eq!(usage.stale_pidfiles, stale[..MAX_STALE_PIDFILES]);
    let found: Vec<(u32, &[FoundBy], Option<&Path>)> = usage
        .users
        .iter()
        .map(|u| (u.pid, u.found_by.as_slice(), u.pidfile.as_deref()))
        .collect();
    let by = &[FoundBy::Pidfile, FoundBy::Proc][..];
    assert_eq!(
        found,
        vec![
            (VM, by, Some(own.as_path())),
            (OTHER, by, Some(global.as_path()))
        ]
    );
}

#[test]
fn pidfile_rule_of_proxmox() {
    let env = Env::new();
    let img = env.image_path();
    let pf = env.pidfile(&env.vm_dir(), "vm.pid", format!("{VM}").as_bytes());
    let elsewhere = env.pidfile(&env.global_dir(), "elsewhere", b"");
    // QEMU was started with a different -pidfile: this file is not its own.
    env.process(
        VM,
        QEMU,
        'S',
        &["-pidfile", elsewhere.to_str().unwrap()],
        &[(9, &img, RW)],
    );
    let usage = env.scan(None);
    assert_eq!(usage.stale_pidfiles, vec![pf.clone()]);
    assert_eq!(usage.users[0].found_by, vec![FoundBy::Proc]);
    assert!(!usage.blocking_users().is_empty(), "still a running QEMU");

    // The same file reached through a symlinked directory still matches.
    let env = Env::new();
    let img = env.image_path();
    let pf = env.pidfile(&env.vm_dir(), "vm.pid", format!("{VM}").as_bytes());
    let via = env.dir.path().join("via");
    symlink(env.vm_dir(), &via).unwrap();
    env.process(
        VM,
        QEMU,
        'S',
        &["--pidfile", via.join("vm.pid").to_str().unwrap()],
        &[(9, &img, RW)],
    );
    let usage = env.scan(None);
    assert!(usage.stale_pidfiles.is_empty());
    assert_eq!(usage.users[0].pidfile, Some(pf));
}

#[test]
fn global_pidfiles_of_other_vms_are_ignored() {
    let env = Env::new();
    let img = env.image_path();
    let other_img = env.dir.path().join("other.qcow2");
    std::fs::write(&other_img, b"x").unwrap();
    let global = env.global_dir();
    env.pidfile(&global, "dead.pid", b"4000099");
    env.pidfile(&global, "garbage.pid", b"not a pid");
    env.pidfile(&global, "other.pid", format!("{OTHER}").as_bytes());
    env.process(
        OTHER,
        QEMU,
        'S',
        &["-name", "other"],
        &[(3, &other_img, RW)],
    );
    let ours = env.pidfile(&global, "ours.pid", format!("{VM}").as_bytes());
    env.process(VM, QEMU, 'S', &["-name", "ours"], &[(3, &img, RO)]);
    let usage = env.scan(None);
    assert!(
        usage.stale_pidfiles.is_empty(),
        "{:?}",
        usage.stale_pidfiles
    );
    assert_eq!(usage.users.len(), 1);
    let u = &usage.users[0];
    assert_eq!(u.vm_name, "ours");
    assert_eq!(u.pidfile, Some(ours));
    assert_eq!(u.found_by, vec![FoundBy::Pidfile, FoundBy::Proc]);
    assert!(!u.writable);
    assert!(u.blocks_check(), "a read-only QEMU still blocks");
}

/// Nobody holds a lock on it (a live QEMU would hold its own PID file's),
/// and its number now belongs to another VM: stale, however it is found.
/// (tests/disk_usage.rs has a real other VM, whose locked file is not.)
#[test]
fn unlocked_file_whose_number_is_another_vm_is_stale() {
    let env = Env::new();
    let other_img = env.vm_dir().join("other.qcow2");
    std::fs::write(&other_img, b"x").unwrap();
    let pf = env.pidfile(&env.vm_dir(), "other.pid", format!("{OTHER}").as_bytes());
    env.process(OTHER, QEMU, 'S', &[], &[(3, &other_img, RW)]);
    let usage = env.scan(None);
    assert_eq!(usage.stale_pidfiles, vec![pf.clone()]);
    assert!(usage.users.is_empty());
    let usage = env.scan(Some(&pf));
    assert_eq!(usage.stale_pidfiles, vec![pf]);
    assert!(usage.users.is_empty());
}

#[test]
fn garbage_pidfiles_are_stale() {
    let env = Env::new();
    let d = env.vm_dir();
    let mut want = vec![
        env.pidfile(&d, "a-huge.pid", &vec![b'1'; 1 << 20]),
        env.pidfile(&d, "b-text.pid", b"hello\n"),
        env.pidfile(&d, "c-negative.pid", b"-5\n"),
        env.pidfile(&d, "d-bytes.pid", b"\xff\xfe\x00\x01"),
        env.pidfile(&d, "e-empty.pid", b""),
        env.pidfile(&d, "f-two.pid", b"1 2\n"),
        env.pidfile(&d, "g-zero.pid", b"0\n"),
    ];
    let fifo = d.join("h-fifo.pid");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    want.push(fifo.clone());
    let link = d.join("i-link.pid");
    let target = env.pidfile(&env.global_dir(), "target", b"1\n");
    symlink(&target, &link).unwrap();
    want.push(link.clone());
    std::fs::create_dir(d.join("j-dir.pid")).unwrap();
    want.push(d.join("j-dir.pid"));
    let usage = env.scan(None);
    assert_eq!(usage.stale_pidfiles, want);
    assert!(usage.users.is_empty());
    // Explicit ones too; a missing explicit file is simply absent.
    for p in [&fifo, &link] {
        let usage = env.scan(Some(p));
        assert_eq!(usage.stale_pidfiles, vec![p.clone()]);
    }
    let usage = env.scan(Some(&d.join("missing.pid")));
    assert_eq!(usage, DiskUsage::default());
}

#[test]
fn writers_and_readers() {
    let env = Env::new();
    let img = env.image_path();
    env.process(VM, "/usr/bin/dd", 'D', &[], &[(1, &img, "01")]);
    env.process(
        OTHER,
        "/usr/bin/restic",
        'S',
        &[],
        &[(5, &img, RO), (6, &img, RO)],
    );
    let usage = env.scan(None);
    assert_eq!(usage.users.len(), 2);
    let writer = usage.blocking_user().unwrap();
    assert_eq!(
        (writer.pid, writer.writable, writer.is_qemu),
        (VM, true, false)
    );
    assert_eq!(writer.exe, "/usr/bin/dd");
    let reader = &usage.users[1];
    assert_eq!((reader.pid, reader.writable), (OTHER, false));
    assert!(!reader.blocks_check());
}

#[test]
fn qemu_is_reported_before_other_blockers() {
    let env = Env::new();
    let img = env.image_path();
    env.process(VM + 10, QEMU, 'S', &["-name", "vm"], &[(3, &img, RO)]);
    env.process(VM, "/usr/bin/dd", 'S', &[], &[(3, &img, RW)]);
    env.process(VM - 1, "/usr/bin/cat", 'S', &[], &[(3, &img, RO)]);
    let usage = env.scan(None);
    let pids: Vec<u32> = usage.users.iter().map(|u| u.pid).collect();
    assert_eq!(pids, vec![VM + 10, VM, VM - 1]);
    assert_eq!(usage.blocking_user().unwrap().vm_name, "vm");
}

#[test]
fn own_process_is_never_reported() {
    let env = Env::new();
    let img = env.image_path();
    env.process(std::process::id(), QEMU, 'S', &[], &[(3, &img, RW)]);
    assert_eq!(env.scan(None), DiskUsage::default());
}

#[test]
fn lock_without_visible_qemu() {
    let env = Env::new();
    let _lock = env.lock_like_qemu(true);
    let usage = env.scan(None);
    let invisible = DiskUser {
        pid: 0,
        exe: String::new(),
        vm_name: String::new(),
        writable: true,
        found_by: vec![FoundBy::Lock],
        pidfile: None,
        is_qemu: true,
    };
    assert_eq!(usage.users, vec![invisible.clone()]);

    // A non-QEMU reader does not explain the lock.
    let img = env.image_path();
    env.process(OTHER, "/usr/bin/cat", 'S', &[], &[(3, &img, RO)]);
    let usage = env.scan(None);
    assert_eq!(usage.users.len(), 2);
    assert_eq!(usage.users[0], invisible);
    assert_eq!(usage.users[1].found_by, vec![FoundBy::Proc]);

    // A read-only qemu-img does not explain a WRITE lock: the invisible
    // writer is still reported (and blocks).
    env.process(VM, "/usr/bin/qemu-img", 'S', &["check"], &[(3, &img, RO)]);
    let usage = env.scan(None);
    assert!(usage.users.contains(&invisible), "{usage:?}");
    let qi = usage.users.iter().find(|u| u.pid == VM).unwrap();
    assert_eq!(qi.found_by, vec![FoundBy::Proc, FoundBy::Lock]);
    assert!(!qi.blocks_check());

    // qemu-img holding it for writing (a repair) does explain it.
    env.process(
        VM + 10,
        "/usr/bin/qemu-img",
        'S',
        &["check", "-r"],
        &[(3, &img, RW)],
    );
    let usage = env.scan(None);
    assert!(usage.users.iter().all(|u| u.pid != 0), "{usage:?}");
}

#[test]
fn read_only_lock_without_visible_qemu() {
    let env = Env::new();
    let _lock = env.lock_like_qemu(false);
    let usage = env.scan(None);
    assert_eq!(usage.users.len(), 1);
    assert_eq!((usage.users[0].pid, usage.users[0].writable), (0, false));
    assert!(usage.users[0].blocks_check());
}

#[test]
fn garbage_proc_entries_are_skipped() {
    let env = Env::new();
    let img = env.image_path();
    let root = env.proc_root();
    // Non-PID names, a PID without fd/, files where directories belong.
    std::fs::create_dir_all(root.join("self/fd")).unwrap();
    symlink(&img, root.join("self/fd/3")).unwrap();
    std::fs::create_dir_all(root.join("4000010")).unwrap();
    std::fs::write(root.join("4000011"), b"not a dir").unwrap();
    std::fs::create_dir_all(root.join("4000012")).unwrap();
    std::fs::write(root.join("4000012/fd"), b"not a dir").unwrap();
    // Dangling fd links, non-numeric fd names, missing and garbage fdinfo.
    env.process(
        4_000_013,
        QEMU,
        'S',
        &[],
        &[(3, Path::new("/nonexistent/x"), RW)],
    );
    let d13 = root.join("4000013");
    symlink(&img, d13.join("fd/notanfd")).unwrap();
    symlink(&img, d13.join("fd/4")).unwrap(); // no fdinfo: closed meanwhile
    env.process(4_000_014, "/usr/bin/x", 'S', &[], &[(3, &img, "zz")]);
    // Unreadable exe, garbage stat and cmdline.
    let d15 = root.join("4000015");
    std::fs::create_dir_all(d15.join("fd")).unwrap();
    symlink(&img, d15.join("fd/0")).unwrap();
    std::fs::create_dir_all(d15.join("fdinfo")).unwrap();
    std::fs::write(d15.join("fdinfo/0"), b"flags:\t00\n").unwrap();
    std::fs::write(d15.join("stat"), b"\xff\xff").unwrap();
    std::fs::write(d15.join("cmdline"), b"\xff-name\0\xfe\xfd").unwrap();
    let pf = env.pidfile(&env.vm_dir(), "g.pid", b"4000015");

    let usage = env.scan(None);
    let summary: Vec<(u32, &str, bool)> = usage
        .users
        .iter()
        .map(|u| (u.pid, u.exe.as_str(), u.writable))
        .collect();
    // Garbage fdinfo fails closed (writable); the exe-less one is a reader.
    assert_eq!(
        summary,
        vec![(4_000_014, "/usr/bin/x", true), (4_000_015, "", false)]
    );
    assert_eq!(usage.stale_pidfiles, vec![pf]);
}

/// Not being able to look is never "nobody uses it".
#[test]
fn an_unreadable_proc_root_fails_the_scan() {
    let env = Env::new();
    let scanner = UsageScanner::new(
        env.dir.path().join("nope"),
        vec!["{image_dir}/*.pid".into()],
    );
    env.pidfile(&env.vm_dir(), "vm.pid", b"1\n");
    let never = CancellationToken::new();
    let result = scanner.scan(&env.image(), None, &View::Service, &never);
    assert!(
        matches!(result, Err(HoldersError::Unreadable { .. })),
        "{result:?}"
    );
}

#[test]
fn a_cancelled_scan_stops() {
    let env = Env::new();
    env.process(4_000_001, QEMU, 'S', &[], &[(3, &env.image_path(), RW)]);
    let cancel = CancellationToken::new();
    cancel.cancel();
    let result = env
        .scanner()
        .scan(&env.image(), None, &View::Service, &cancel);
    assert!(matches!(result, Err(HoldersError::Cancelled)), "{result:?}");
}

#[test]
fn blocks_check_rules() {
    let user = |is_qemu, writable| DiskUser {
        pid: 1,
        exe: String::new(),
        vm_name: String::new(),
        writable,
        found_by: vec![FoundBy::Proc],
        pidfile: None,
        is_qemu,
    };
    assert!(user(true, false).blocks_check());
    assert!(user(true, true).blocks_check());
    assert!(user(false, true).blocks_check());
    assert!(!user(false, false).blocks_check());
    let spelled = [FoundBy::Pidfile, FoundBy::Proc, FoundBy::Lock]
        .map(|found_by| vmmanager_client::FoundBy::from(found_by).to_string());
    assert_eq!(spelled, ["pidfile", "proc", "lock"]);
    assert!(FoundBy::Pidfile < FoundBy::Proc && FoundBy::Proc < FoundBy::Lock);
}
