//! A real libvirt per test: `libvirtd` (and, in system mode, `virtlogd`)
//! started by hand, without systemd, so that VM Manager meets the VMs
//! libvirt 11 really starts: QEMU as `libvirt-qemu` with `-name
//! guest=NAME,…`, PID files written by libvirtd and locked by QEMU, images
//! chowned while a domain runs (dynamic ownership).
//!
//! # A private mount namespace
//! libvirtd keeps sockets, PID files and state in /run, /var/lib/libvirt,
//! /var/cache/libvirt and /var/log/libvirt, and reads /etc/libvirt. A
//! namespace holder (`unshare --mount --propagation private`) mounts a fresh
//! tmpfs over each, so a test's libvirtd never sees the host's files or
//! another test's, and all of it vanishes with the namespace. The host's
//! /run/libvirt, /etc/libvirt, cgroups, polkit and D-Bus are never touched
//! (with /run private, the host's bus socket is not even reachable). /tmp
//! is not remounted: images live in host temp dirs both sides see.
//! `vmmanagerd` runs in the same namespace ([`Libvirt::daemon_config`]), so
//! it sees libvirt's /run as it would on a real host.
//!
//! # qemu.conf
//! `cgroup_controllers = [ ]` keeps libvirt out of the host's cgroups (none
//! are needed here); `namespaces = [ ]` keeps each QEMU in our namespace
//! rather than a private one of its own, so the cleanup below finds it and
//! its /run is the one the daemon reads. Everything else is libvirt's
//! default. Session mode reads no qemu.conf at all: its defaults work
//! (libvirtd spawns its own virtlogd).
//!
//! # Cleanup by mount namespace
//! libvirt daemonizes QEMU, so QEMU is nobody's child here and cannot be
//! found by parentage. On drop the guard destroys every domain (libvirt
//! restores image owners), then SIGKILLs, through pidfds, every process
//! whose `/proc/PID/ns/mnt` is the holder's until none is left. An open fd
//! on the namespace keeps its inode number from going to another test's
//! namespace meanwhile. Should the test process die without unwinding
//! (SIGKILL, Ctrl-C), the holder sees its stdin pipe close and sweeps the
//! namespace itself.
//!
//! # Capability cache
//! A new libvirtd first probes what QEMU can do (~8.5 s here). The result is
//! kept per mode in `CARGO_TARGET_TMPDIR` and copied into each libvirtd's
//! private cache before it starts; libvirt validates it (QEMU's and its own
//! version and ctime, kernel, microcode, /dev/kvm access) and probes again
//! if it no longer fits, like after a restart on a real host. Each libvirtd
//! reads only its own copy, so none sees a file another is writing; a new
//! result goes back by rename. While a mode's cache is empty, one libvirtd
//! probes and the others of this test process wait for it.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::bus::xml_escape;
use super::daemon::DaemonConfig;
use super::util::{
    ChildGuard, CmdOutput, alive, give, make_dir, public_tempdir, read_lossy, run, setpriv_args,
    wait_until, write_file,
};

/// The user system-mode QEMU runs as (Debian's `libvirt-qemu`).
pub const LIBVIRT_QEMU: u32 = 64055;

const LIBVIRTD: &str = "/usr/sbin/libvirtd";
const VIRTLOGD: &str = "/usr/sbin/virtlogd";

/// A cold start probes QEMU (~8.5 s idle); a loaded CI machine is slower.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one virsh call (`timeout`'s argument).
const VIRSH_TIMEOUT: &str = "60";

/// See the module docs, "qemu.conf".
const QEMU_CONF: &str = "cgroup_controllers = [ ]\nnamespaces = [ ]\n";

/// Run by the holder: `$1` ready file, `$2` qemu.conf, `$3` session uid or "".
const HOLDER_SCRIPT: &str = r#"set -eu
for d in /run /etc/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
    mount -t tmpfs -o mode=755 tmpfs "$d"
done
printf '%s' "$2" >/etc/libvirt/qemu.conf
mkdir -p /var/lib/libvirt/qemu /var/lib/libvirt/images
chown libvirt-qemu:libvirt-qemu /var/lib/libvirt/qemu
if [ -n "$3" ]; then
    mkdir -p "/run/user/$3"
    chown "$3:$3" "/run/user/$3"
    chmod 700 "/run/user/$3"
fi
touch "$1"
# stdin is a pipe from the test process: EOF means it died without cleaning up.
read -r _ || true
set +e
me=$(readlink /proc/$$/ns/mnt)
for round in 1 2 3; do
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" != "$$" ] && [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$me" ] &&
            kill -9 "${p#/proc/}" 2>/dev/null
    done
    sleep 0.2
done
"#;

/// Held while a mode's capability cache is being filled (see module docs).
static PROBING: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `qemu:///system`: root's libvirtd, QEMU as libvirt-qemu.
    System,
    /// `qemu:///session` of this uid (gid = uid): libvirtd and QEMU as them.
    Session(u32),
}

/// One disk of a domain.
#[derive(Debug, Clone)]
pub struct Disk {
    path: PathBuf,
    format: &'static str,
    readonly: bool,
    shareable: bool,
}

impl Disk {
    pub fn qcow2(path: impl Into<PathBuf>) -> Disk {
        Disk {
            path: path.into(),
            format: "qcow2",
            readonly: false,
            shareable: false,
        }
    }

    pub fn raw(path: impl Into<PathBuf>) -> Disk {
        Disk {
            format: "raw",
            ..Disk::qcow2(path)
        }
    }

    /// `<readonly/>`.
    pub fn readonly(mut self) -> Disk {
        self.readonly = true;
        self
    }

    /// `<shareable/>` (libvirt allows it for raw images only).
    pub fn shareable(mut self) -> Disk {
        self.shareable = true;
        self
    }
}

/// A transient TCG domain `name` with `disks` as vda, vdb, …: 64 MiB, no
/// network, nothing to boot (SeaBIOS idles).
pub fn domain_xml(name: &str, disks: &[Disk]) -> String {
    let mut xml = format!(
        "<domain type=\"qemu\">\n  <name>{}</name>\n  <memory unit=\"MiB\">64</memory>\n  \
         <os><type arch=\"x86_64\" machine=\"pc\">hvm</type></os>\n  <devices>\n",
        xml_escape(name)
    );
    for (i, disk) in disks.iter().enumerate() {
        let path = disk.path.to_str().expect("UTF-8 image path");
        assert!(disk.path.is_absolute(), "libvirt needs absolute paths");
        xml += &format!(
            "    <disk type=\"file\" device=\"disk\">\n      \
             <driver name=\"qemu\" type=\"{}\"/>\n      <source file=\"{}\"/>\n      \
             <target dev=\"vd{}\" bus=\"virtio\"/>\n{}{}    </disk>\n",
            disk.format,
            xml_escape(path),
            char::from(b'a' + u8::try_from(i).expect("few disks")),
            if disk.readonly {
                "      <readonly/>\n"
            } else {
                ""
            },
            if disk.shareable {
                "      <shareable/>\n"
            } else {
                ""
            },
        );
    }
    xml + "  </devices>\n</domain>\n"
}

/// A libvirtd (plus virtlogd) in its own mount namespace; everything in that
/// namespace is killed on drop, panics included.
pub struct Libvirt {
    mode: Mode,
    /// Holds the namespace; its stdin pipe is the fallback's trigger.
    holder: ChildGuard,
    /// Keeps the namespace, and so its inode number, alive until the sweep.
    _ns: File,
    ns_id: (u64, u64),
    virtlogd: Option<ChildGuard>,
    libvirtd: Option<ChildGuard>,
    /// Logs, domain XML, the session user's home.
    dir: TempDir,
}

impl Libvirt {
    /// Root's libvirt, `qemu:///system`.
    pub fn system() -> Libvirt {
        Libvirt::start(Mode::System)
    }

    /// `uid`'s libvirt, `qemu:///session` (gid = uid), as GNOME Boxes runs it.
    pub fn session(uid: u32) -> Libvirt {
        Libvirt::start(Mode::Session(uid))
    }

    fn start(mode: Mode) -> Libvirt {
        preflight();
        let dir = public_tempdir("vmm-libvirt-");
        if let Mode::Session(uid) = mode {
            make_dir(&dir.path().join("home"), 0o700, Some(uid));
        }
        let ready = dir.path().join("ready");
        let log = File::create(dir.path().join("holder.log")).expect("create holder.log");
        let session_uid = match mode {
            Mode::System => String::new(),
            Mode::Session(uid) => uid.to_string(),
        };
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .args([HOLDER_SCRIPT, "sh"])
            .arg(&ready)
            .args([QEMU_CONF, &session_uid])
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn unshare");
        let mut holder = ChildGuard::new(child, "libvirt namespace holder");
        wait_until(
            Duration::from_secs(10),
            "the libvirt namespace to be set up",
            || ready.exists() || !holder.is_running(),
            || read_lossy(&dir.path().join("holder.log")),
        );
        assert!(
            holder.is_running(),
            "setting up the libvirt namespace failed:\n{}",
            read_lossy(&dir.path().join("holder.log"))
        );
        let ns_path = format!("/proc/{}/ns/mnt", holder.pid());
        let ns = File::open(&ns_path).unwrap_or_else(|e| panic!("{ns_path}: {e}"));
        let meta = ns.metadata().unwrap();
        let mut libvirt = Libvirt {
            mode,
            ns_id: (meta.dev(), meta.ino()),
            _ns: ns,
            holder,
            virtlogd: None,
            libvirtd: None,
            dir,
        };
        libvirt.start_daemons();
        libvirt
    }

    /// virtlogd (system mode), then libvirtd; returns once virsh answers.
    fn start_daemons(&mut self) {
        let shared = Path::new(env!("CARGO_TARGET_TMPDIR")).join(match self.mode {
            Mode::System => "libvirt-capabilities-system".to_owned(),
            Mode::Session(uid) => format!("libvirt-capabilities-session-{uid}"),
        });
        let probing = PROBING.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the libvirtd that fills an empty cache keeps the others waiting.
        let probing = xml_files(&shared).is_empty().then_some(probing);
        let private = self.capabilities_dir();
        let home = self.dir.path().join("home");
        copy_capabilities(&shared, &private, self.user().map(|(uid, _)| (uid, &*home)));

        if self.mode == Mode::System {
            let log = self.log_file("virtlogd.log");
            let child = self
                .command(VIRTLOGD)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn virtlogd");
            let mut virtlogd = ChildGuard::new(child, "virtlogd");
            // libvirtd asks it for a log pipe when it starts a QEMU.
            let socket = self.in_namespace("/run/libvirt/virtlogd-sock");
            wait_until(
                Duration::from_secs(20),
                "virtlogd's socket",
                || socket.exists() || !virtlogd.is_running(),
                || read_lossy(&self.dir.path().join("virtlogd.log")),
            );
            assert!(
                virtlogd.is_running(),
                "virtlogd exited:\n{}",
                read_lossy(&self.dir.path().join("virtlogd.log"))
            );
            self.virtlogd = Some(virtlogd);
        }
        let log = self.log_file("libvirtd.log");
        let child = self
            .command(LIBVIRTD)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn libvirtd");
        self.libvirtd = Some(ChildGuard::new(child, "libvirtd"));

        let started = Instant::now();
        loop {
            assert!(
                self.libvirtd_running(),
                "libvirtd exited during startup:\n{}",
                self.logs()
            );
            let out = self.virsh(&["version"]);
            if out.success() {
                break;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "libvirtd did not answer `virsh -c {} version` within {START_TIMEOUT:?}: \
                 {out:#?}\n{}",
                self.uri(),
                self.logs()
            );
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "libvirt {:?} answered in {:.1?}{}",
            self.mode,
            started.elapsed(),
            if probing.is_some() {
                " (probing QEMU)"
            } else {
                ""
            }
        );
        save_capabilities(&private, &shared);
        drop(probing);
    }

    pub fn uri(&self) -> &'static str {
        match self.mode {
            Mode::System => "qemu:///system",
            Mode::Session(_) => "qemu:///session",
        }
    }

    /// `/proc/HOLDER/ns/mnt`, for `nsenter --mount=`.
    pub fn mount_namespace(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.holder.pid()))
    }

    /// Where the test finds `path` as the namespace sees it.
    pub fn in_namespace(&self, path: impl AsRef<Path>) -> PathBuf {
        let path = path.as_ref();
        assert!(path.is_absolute(), "{}", path.display());
        PathBuf::from(format!("/proc/{}/root", self.holder.pid()))
            .join(path.strip_prefix("/").unwrap())
    }

    /// The daemon's real default PID-file patterns (libvirt's system and
    /// session directories among them), run in this namespace so that its
    /// /run is libvirt's.
    pub fn daemon_config(&self) -> DaemonConfig {
        DaemonConfig::default()
            .pidfile_patterns(vmmanager::config::DiskConfig::default().pidfile_patterns)
            .in_mount_namespace(self.mount_namespace())
    }

    /// `virsh -c URI ARGS` in the namespace, as the libvirt's user; bounded.
    pub fn virsh(&self, args: &[&str]) -> CmdOutput {
        let mut cmd = self.command("timeout");
        cmd.args(["--kill-after=5", VIRSH_TIMEOUT, "virsh", "-c", self.uri()])
            .args(args);
        run(&mut cmd)
    }

    /// Starts a transient domain; returns its QEMU's PID (from the PID file
    /// libvirt wrote). `virsh create` returns once QEMU runs with its disks
    /// open and locked.
    pub fn create(&self, name: &str, disks: &[Disk]) -> u32 {
        let xml = self.dir.path().join(format!("{name}.xml"));
        write_file(&xml, domain_xml(name, disks), 0o644);
        let out = self.virsh(&["create", xml.to_str().unwrap()]);
        assert!(
            out.success(),
            "virsh create {name} failed: {out:#?}\n{}",
            self.logs()
        );
        self.qemu_pid(name)
    }

    /// `virsh destroy NAME`: libvirt kills QEMU and restores image owners.
    pub fn destroy(&self, name: &str) {
        let out = self.virsh(&["destroy", name]);
        assert!(
            out.success(),
            "virsh destroy {name} failed: {out:#?}\n{}",
            self.logs()
        );
    }

    /// Where libvirt keeps `name`'s PID file, as the daemon sees it.
    pub fn pidfile(&self, name: &str) -> PathBuf {
        match self.mode {
            Mode::System => PathBuf::from(format!("/run/libvirt/qemu/{name}.pid")),
            Mode::Session(uid) => {
                PathBuf::from(format!("/run/user/{uid}/libvirt/qemu/run/{name}.pid"))
            }
        }
    }

    /// The PID in `name`'s PID file.
    pub fn qemu_pid(&self, name: &str) -> u32 {
        let path = self.in_namespace(self.pidfile(name));
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), self.logs()));
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
    }

    /// SIGTERM to libvirtd and a bounded wait for it to exit; its domains
    /// keep running.
    pub fn stop_libvirtd(&mut self) {
        let libvirtd = self.libvirtd.as_mut().expect("libvirtd was started");
        libvirtd.signal(libc::SIGTERM);
        if libvirtd.wait_timeout(Duration::from_secs(30)).is_none() {
            panic!("libvirtd ignored SIGTERM for 30 s:\n{}", self.logs());
        }
    }

    fn libvirtd_running(&mut self) -> bool {
        self.libvirtd.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// libvirtd's output and every QEMU log, for failure messages.
    pub fn logs(&self) -> String {
        let mut text = format!(
            "libvirtd output:\n{}",
            read_lossy(&self.dir.path().join("libvirtd.log"))
        );
        let qemu_logs = match self.mode {
            Mode::System => self.in_namespace("/var/log/libvirt/qemu"),
            Mode::Session(_) => self.dir.path().join("home/.cache/libvirt/qemu/log"),
        };
        for log in fs::read_dir(&qemu_logs).into_iter().flatten().flatten() {
            text += &format!("\n{}:\n{}", log.path().display(), read_lossy(&log.path()));
        }
        text
    }

    /// The session user as (uid, gid); None for the system libvirt (root).
    fn user(&self) -> Option<(u32, u32)> {
        match self.mode {
            Mode::System => None,
            Mode::Session(uid) => Some((uid, uid)),
        }
    }

    /// `program` in the namespace, as the libvirt's user with its
    /// environment. nsenter and setpriv exec, so the PID is `program`'s.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.mount_namespace().display()))
            .arg("--");
        if let Some((uid, gid)) = self.user() {
            let home = self.dir.path().join("home");
            cmd.arg("setpriv")
                .args(setpriv_args(uid, gid))
                .env("HOME", &home)
                .env("XDG_RUNTIME_DIR", format!("/run/user/{uid}"))
                .env("XDG_CONFIG_HOME", home.join(".config"))
                .env("XDG_CACHE_HOME", home.join(".cache"));
        }
        // A session virsh that finds no libvirtd must not start its own.
        cmd.arg(program)
            .env("LIBVIRT_AUTOSTART", "0")
            .env_remove("LIBVIRT_DEFAULT_URI");
        cmd
    }

    fn capabilities_dir(&self) -> PathBuf {
        match self.mode {
            Mode::System => self.in_namespace("/var/cache/libvirt/qemu/capabilities"),
            Mode::Session(_) => self
                .dir
                .path()
                .join("home/.cache/libvirt/qemu/cache/capabilities"),
        }
    }

    fn log_file(&self, name: &str) -> File {
        let path = self.dir.path().join(name);
        File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
    }

    /// Live processes in the namespace.
    fn processes(&self) -> Vec<u32> {
        fs::read_dir("/proc")
            .expect("read /proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| self.in_ns(pid) && alive(pid))
            .collect()
    }

    fn in_ns(&self, pid: u32) -> bool {
        fs::metadata(format!("/proc/{pid}/ns/mnt")).is_ok_and(|m| (m.dev(), m.ino()) == self.ns_id)
    }

    /// SIGKILLs `pid` if it is (still) in the namespace: the pidfd pins the
    /// process, so a PID reused meanwhile is looked at, not killed.
    fn kill_in_ns(&self, pid: u32) {
        // SAFETY: plain syscalls on a pidfd this function owns and closes.
        unsafe {
            let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
            if fd < 0 {
                return;
            }
            if self.in_ns(pid) {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd,
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
            libc::close(fd as libc::c_int);
        }
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        if self.libvirtd_running() {
            let out = self.virsh(&["list", "--name"]);
            let destroys: Vec<ChildGuard> = out
                .stdout
                .lines()
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .filter_map(|name| {
                    let mut cmd = self.command("timeout");
                    cmd.args(["--kill-after=5", "20", "virsh", "-c", self.uri()])
                        .args(["destroy", name])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null());
                    Some(ChildGuard::new(cmd.spawn().ok()?, "virsh destroy"))
                })
                .collect();
            for mut destroy in destroys {
                let _ = destroy.wait_timeout(Duration::from_secs(30));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut left = self.processes();
        while !left.is_empty() && Instant::now() < deadline {
            for &pid in &left {
                self.kill_in_ns(pid);
            }
            thread::sleep(Duration::from_millis(20));
            left = self.processes();
        }
        if !left.is_empty() {
            let message = format!("processes left in the libvirt namespace: {left:?}");
            if thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

fn preflight() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the libvirt tests need root (mount namespaces, libvirtd)"
    );
    for bin in [LIBVIRTD, VIRTLOGD, "/usr/bin/virsh"] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: run scripts/install-deps (libvirt from bookworm-backports)"
        );
    }
    let out = run(Command::new("id").args(["-u", "libvirt-qemu"]));
    assert_eq!(
        out.stdout.trim(),
        LIBVIRT_QEMU.to_string(),
        "user libvirt-qemu: {out:?}"
    );
}

fn xml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    files
}

/// Copies the shared cache into a libvirtd's private one, creating it; for a
/// session `(uid, home)`, owned by the user from their home down.
fn copy_capabilities(shared: &Path, private: &Path, owner: Option<(u32, &Path)>) {
    let files = xml_files(shared);
    if files.is_empty() {
        return;
    }
    fs::create_dir_all(private).unwrap_or_else(|e| panic!("mkdir {}: {e}", private.display()));
    if let Some((uid, home)) = owner {
        for dir in private.ancestors().take_while(|d| *d != home) {
            give(dir, uid, 0o700);
        }
    }
    for file in files {
        let to = private.join(file.file_name().unwrap());
        fs::copy(&file, &to).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
        match owner {
            Some((uid, _)) => give(&to, uid, 0o600),
            None => super::util::set_mode(&to, 0o600),
        }
    }
}

/// Puts what a libvirtd probed into the shared cache, each file by rename.
fn save_capabilities(private: &Path, shared: &Path) {
    for file in xml_files(private) {
        let to = shared.join(file.file_name().unwrap());
        let data = fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if fs::read(&to).is_ok_and(|old| old == data) {
            continue;
        }
        fs::create_dir_all(shared).unwrap_or_else(|e| panic!("mkdir {}: {e}", shared.display()));
        let mut tmp = tempfile::NamedTempFile::new_in(shared).expect("temp file");
        std::io::Write::write_all(&mut tmp, &data).expect("write capabilities");
        tmp.persist(&to)
            .unwrap_or_else(|e| panic!("rename to {}: {e}", to.display()));
    }
}
