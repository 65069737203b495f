//! Prepared trees for each kind of use, then this machine's real devices
//! (read only: nothing is unbound or written).

use super::*;
use crate::test_support::{FakeSysfs, Sleeper};
use std::ffi::CString;
use std::os::unix::fs::symlink;

const DISK: &str = "0000:00:02.0";

/// A prepared /sys, /proc and /dev.
struct Host {
    sys: FakeSysfs,
    proc: tempfile::TempDir,
    dev: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let host = Host {
            sys: FakeSysfs::new(),
            proc: tempfile::tempdir().unwrap(),
            dev: tempfile::tempdir().unwrap(),
        };
        fs::create_dir_all(host.proc.path().join("self")).unwrap();
        host.mountinfo("");
        host
    }

    fn roots(&self) -> HostRoots {
        HostRoots {
            sysfs: self.sys.root(),
            proc: self.proc.path().to_owned(),
            dev: self.dev.path().to_owned(),
        }
    }

    fn uses(&self, address: &str, network: NetworkSnapshot) -> HostUses {
        host_uses(
            &self.roots(),
            &address.parse().unwrap(),
            &Network::Given(network),
            &CancellationToken::new(),
        )
        .unwrap()
    }

    fn mountinfo(&self, text: &str) {
        fs::write(self.proc.path().join("self/mountinfo"), text).unwrap();
    }

    /// A device directory `relative` below PCI device `address`, in
    /// `subsystem`, with `dev` when given and `uevent` (with DEVNAME).
    fn device(
        &self,
        address: &str,
        relative: &str,
        subsystem: &str,
        dev: Option<(u32, u32)>,
    ) -> PathBuf {
        let dir = self.sys.device_dir(address).join(relative);
        fs::create_dir_all(&dir).unwrap();
        symlink(
            format!("../../../../../../class/{subsystem}"),
            dir.join("subsystem"),
        )
        .unwrap();
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        let mut uevent = String::new();
        if let Some((major, minor)) = dev {
            fs::write(dir.join("dev"), format!("{major}:{minor}\n")).unwrap();
            let devname = match subsystem {
                "drm" => format!("dri/{name}"),
                _ => name.clone(),
            };
            uevent = format!("MAJOR={major}\nMINOR={minor}\nDEVNAME={devname}\n");
        }
        fs::write(dir.join("uevent"), uevent).unwrap();
        dir
    }

    /// A block node in the prepared /dev.
    fn block_node(&self, name: &str, major: u32, minor: u32) -> PathBuf {
        let path = self.dev.path().join(name);
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFBLK | 0o600,
                libc::makedev(major, minor),
            )
        };
        assert_eq!(
            rc,
            0,
            "mknod {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        path
    }

    /// Process `pid` (running `exe`) with fd 3 on `file`.
    fn process_holding(&self, pid: u32, exe: &str, file: &Path) {
        let dir = self.proc.path().join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::create_dir_all(dir.join("fdinfo")).unwrap();
        fs::write(dir.join("stat"), format!("{pid} (x) S 1 {pid} {pid}")).unwrap();
        symlink(exe, dir.join("exe")).unwrap();
        symlink(file, dir.join("fd/3")).unwrap();
        fs::write(dir.join("fdinfo/3"), "pos:\t0\nflags:\t0100000\n").unwrap();
    }
}

/// A virtio disk: `virtio1/block/vda` with partition `vda1`; `vda2` held
/// by `dm-0`.
fn disk(host: &Host) {
    host.sys.device(DISK, 0x1af4, 0x1001, 0x010000);
    host.device(DISK, "virtio1/block/vda", "block", Some((254, 0)));
    host.device(DISK, "virtio1/block/vda/vda1", "block", Some((254, 1)));
    let vda2 = host.device(DISK, "virtio1/block/vda/vda2", "block", Some((254, 2)));
    let dm = host.sys.root().join("devices/virtual/block/dm-0");
    fs::create_dir_all(dm.join("holders")).unwrap();
    fs::write(dm.join("dev"), "253:0\n").unwrap();
    fs::create_dir_all(vda2.join("holders")).unwrap();
    symlink(&dm, vda2.join("holders/dm-0")).unwrap();
}

fn mounts_of(uses: &HostUses) -> Vec<String> {
    uses.uses
        .iter()
        .filter(|u| matches!(u, HostUse::Mount { .. } | HostUse::Swap { .. }))
        .map(ToString::to_string)
        .collect()
}

#[test]
fn mounted_partitions_and_what_stacks_on_them_are_named() {
    let host = Host::new();
    disk(&host);
    host.mountinfo(
        "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
         23 22 253:0 / /srv/my\\040data rw - xfs /dev/mapper/vg-data rw\n\
         24 22 0:5 / /dev rw - devtmpfs udev rw\n\
         25 22 8:1 / /other rw - ext4 /dev/sda1 rw\n",
    );
    let uses = host.uses(DISK, NetworkSnapshot::default());
    assert_eq!(
        mounts_of(&uses),
        [
            "block device vda1 backs / (ext4 on /dev/vda1)",
            "block device vda2 → dm-0 backs /srv/my data (xfs on /dev/mapper/vg-data)",
        ]
    );
    assert!(uses.uses.iter().all(HostUse::blocks_by_default));
    // No /proc/swaps here, as under ProcSubset=pid: said, not taken for "none".
    assert!(
        matches!(&uses.unknown[..], [Unknown::Swap { reason }] if reason.contains("ProcSubset=pid")),
        "{:?}",
        uses.unknown
    );
}

/// Under ReadWritePaths=/mnt, the service's mount table has a host mount
/// on /mnt/x twice (propagated below the original /mnt and below the bind
/// mount of it): one use, one sentence.
#[test]
fn a_mount_listed_twice_in_the_namespace_is_named_once() {
    let host = Host::new();
    disk(&host);
    host.mountinfo(
        "22 1 254:0 / /mnt/gated rw - ext4 /dev/vda rw\n\
         23 30 254:0 / /mnt/gated rw - ext4 /dev/vda rw\n",
    );
    let uses = host.uses(DISK, NetworkSnapshot::default());
    assert_eq!(
        mounts_of(&uses),
        ["block device vda backs /mnt/gated (ext4 on /dev/vda)"]
    );
}

#[test]
fn a_btrfs_mount_is_found_by_its_source_node() {
    let host = Host::new();
    disk(&host);
    host.block_node("vda1", 254, 1);
    // btrfs reports an anonymous device number.
    host.mountinfo("22 1 0:33 / /home rw - btrfs /dev/vda1 rw\n");
    let uses = host.uses(DISK, NetworkSnapshot::default());
    assert_eq!(
        mounts_of(&uses),
        ["block device vda1 backs /home (btrfs on /dev/vda1)"]
    );
}

#[test]
fn swap_partitions_and_swap_files_are_named() {
    let host = Host::new();
    disk(&host);
    host.block_node("vda2", 254, 2);
    fs::write(
        host.proc.path().join("swaps"),
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
         /dev/vda2                               partition\t1048572\t\t0\t\t-2\n\
         /nonexistent/swapfile                   file\t\t1048572\t\t0\t\t-3\n",
    )
    .unwrap();
    let uses = host.uses(DISK, NetworkSnapshot::default());
    assert_eq!(
        mounts_of(&uses),
        ["block device vda2 is used for swap (/dev/vda2)"]
    );
    assert_eq!(uses.unknown, []);
}

#[test]
fn interfaces_up_with_addresses_or_the_default_route() {
    let host = Host::new();
    let nic = "0000:00:03.0";
    host.sys.device(nic, 0x1af4, 0x1000, 0x020000);
    for (name, index) in [("eth0", 2), ("eth1", 3), ("eth2", 4), ("eth3", 5)] {
        let dir = host.device(nic, &format!("virtio2/net/{name}"), "net", None);
        fs::write(dir.join("ifindex"), format!("{index}\n")).unwrap();
    }
    let link = |index, name: &str, up| netlink::Link {
        index,
        name: name.into(),
        up,
    };
    let address = |index, address: &str, prefix| netlink::Address {
        index,
        address: address.parse().unwrap(),
        prefix,
    };
    let network = NetworkSnapshot {
        links: vec![
            link(1, "lo", true),
            link(2, "eth0", true),
            link(3, "eth1", true),
            link(4, "eth2", true),
            link(5, "eth3", false),
        ],
        addresses: vec![
            address(2, "192.0.2.2", 24),
            address(3, "2001:db8::1", 64),
            // Down: an address alone is no use.
            address(5, "198.51.100.1", 24),
        ],
        default_route_interfaces: vec![2],
    };
    let uses = host.uses(nic, network);
    let sentences: Vec<String> = uses.uses.iter().map(ToString::to_string).collect();
    // eth2 is up without an address, eth3 down: unused.
    assert_eq!(
        sentences,
        [
            "network interface eth0 is up with 192.0.2.2/24 and carries the host's default route",
            "network interface eth1 is up with 2001:db8::1/64",
        ]
    );
}

#[test]
fn the_boot_display_connected_outputs_and_framebuffers() {
    let host = Host::new();
    let gpu = "0000:01:00.0";
    host.sys.device(gpu, 0x10de, 0x2484, 0x030000);
    host.sys.write_attr(gpu, "boot_vga", "1\n");
    host.device(gpu, "drm/card1", "drm", Some((226, 1)));
    for (connector, status) in [
        ("card1-HDMI-A-1", "connected"),
        ("card1-DP-1", "disconnected"),
    ] {
        let dir = host.device(gpu, &format!("drm/card1/{connector}"), "drm", None);
        fs::write(dir.join("status"), format!("{status}\n")).unwrap();
    }
    let fb = host.device(gpu, "graphics/fb1", "graphics", Some((29, 1)));
    fs::write(fb.join("name"), "nouveaudrmfb\n").unwrap();
    let efifb = host.sys.root().join("class/graphics/fb0");
    fs::create_dir_all(&efifb).unwrap();
    symlink(
        "../../../devices/platform/efi-framebuffer.0",
        efifb.join("device"),
    )
    .unwrap();
    fs::write(efifb.join("name"), "EFI VGA\n").unwrap();
    let sentences = |host: &Host| -> Vec<String> {
        host.uses(gpu, NetworkSnapshot::default())
            .uses
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        sentences(&host),
        [
            "it is the boot display (the firmware's console)",
            "display output card1-HDMI-A-1 is connected",
            "framebuffer fb1 (nouveaudrmfb) is on it",
            "firmware framebuffer fb0 (EFI VGA) is on the boot display, which this is",
        ]
    );
    // Not the boot display: the firmware's framebuffer is another's.
    host.sys.write_attr(gpu, "boot_vga", "0\n");
    assert_eq!(
        sentences(&host),
        [
            "display output card1-HDMI-A-1 is connected",
            "framebuffer fb1 (nouveaudrmfb) is on it",
        ]
    );
}

#[test]
fn processes_holding_the_nodes_are_named_in_one_pass() {
    let host = Host::new();
    disk(&host);
    let vda = host.block_node("vda", 254, 0);
    // Another node of the same disk (a container's /dev): the same device.
    let copy = host.block_node("copy-of-dm", 253, 0);
    let other = host.block_node("sda", 8, 0);
    host.process_holding(100, "/usr/bin/sleep", &vda);
    host.process_holding(101, "/usr/bin/cryptsetup", &copy);
    host.process_holding(102, "/usr/bin/cat", &other);
    let uses = host.uses(DISK, NetworkSnapshot::default());
    // A GPU's card node, a character device.
    let gpu = "0000:01:00.0";
    host.sys.device(gpu, 0x10de, 0x2484, 0x030000);
    host.device(gpu, "drm/card1", "drm", Some((226, 1)));
    let card = host.dev.path().join("card1");
    let c = CString::new(card.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(226, 1)) };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    host.process_holding(103, "/usr/bin/gnome-shell", &card);
    let gpu_uses = host.uses(gpu, NetworkSnapshot::default());
    assert_eq!(
        gpu_uses.uses,
        [HostUse::Process {
            pid: 103,
            program: "/usr/bin/gnome-shell".into(),
            node: "/dev/dri/card1".into()
        }]
    );
    let processes: Vec<String> = uses
        .uses
        .iter()
        .filter(|u| matches!(u, HostUse::Process { .. }))
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        processes,
        [
            "process 100 (/usr/bin/sleep) holds /dev/vda open",
            "process 101 (/usr/bin/cryptsetup) holds /dev/dm-0 open",
        ]
    );
}

#[test]
fn an_unreadable_proc_is_an_error_never_nobody() {
    let host = Host::new();
    disk(&host);
    let mut roots = host.roots();
    roots.proc = host.proc.path().join("none");
    let result = host_uses(
        &roots,
        &DISK.parse().unwrap(),
        &Network::Given(NetworkSnapshot::default()),
        &CancellationToken::new(),
    );
    assert!(
        matches!(result, Err(HostUseError::MountTable { .. })),
        "{result:?}"
    );
    assert!(matches!(
        host_uses(
            &host.roots(),
            &"0000:09:00.0".parse().unwrap(),
            &Network::Kernel,
            &CancellationToken::new()
        ),
        Err(HostUseError::Gone(_))
    ));
}

// --- This machine's real devices, read only ---------------------------------

/// The PCI device a sysfs device path is below (the last PCI address
/// among its components).
fn pci_ancestor(path: &Path) -> PciAddress {
    let real = fs::canonicalize(path).unwrap();
    real.components()
        .rev()
        .find_map(|c| c.as_os_str().to_str()?.parse::<PciAddress>().ok())
        .unwrap_or_else(|| panic!("{} is below no PCI device", real.display()))
}

fn real_uses(address: &PciAddress) -> HostUses {
    let started = std::time::Instant::now();
    let uses = host_uses(
        &HostRoots::host(),
        address,
        &Network::Kernel,
        &CancellationToken::new(),
    )
    .unwrap();
    eprintln!("{address}: {:?} in {:?}", uses, started.elapsed());
    uses
}

/// The block device `/` is mounted from, and the PCI device it is on.
fn root_disk() -> (String, PciAddress) {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata("/").unwrap().dev();
    let sys = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    let name = fs::canonicalize(&sys)
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    (name, pci_ancestor(Path::new(&sys)))
}

#[test]
fn real_root_disk_backs_the_root_file_system() {
    let (name, address) = root_disk();
    let uses = real_uses(&address);
    assert!(
        uses.uses
            .iter()
            .any(|u| matches!(u, HostUse::Mount { mount_point, chain, .. }
            if mount_point == "/" && chain.last() == Some(&name))),
        "{address} ({name}) backs /, but: {uses:?}"
    );
}

#[test]
fn real_default_route_interface_is_named() {
    let output = std::process::Command::new("ip")
        .args(["-o", "route", "show", "default"])
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let interface = text
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .expect("this test needs a default route over a PCI network device (`ip route`)")
        .to_owned();
    let address = pci_ancestor(&Path::new("/sys/class/net").join(&interface));
    let uses = real_uses(&address);
    assert!(
        uses.uses.iter().any(
            |u| matches!(u, HostUse::Interface { name, default_route: true, .. }
            if *name == interface)
        ),
        "{interface} on {address} carries the default route, but: {uses:?}"
    );
}

#[test]
fn real_process_holding_the_root_disk_is_named() {
    let (name, address) = root_disk();
    let node = Path::new("/dev").join(&name);
    // This machine refuses to open its disk (EPERM, even for root), so the
    // sleep holds it by an O_PATH fd: the same node, the same number.
    let held = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&node)
            .unwrap()
    };
    let sleeper = Sleeper::holding(held, None);
    let uses = real_uses(&address);
    let want = format!("/dev/{name}");
    assert!(
        uses.uses
            .iter()
            .any(|u| matches!(u, HostUse::Process { pid, program, node }
            if *pid == sleeper.pid() && program.ends_with("/sleep") && *node == want)),
        "sleep {} holds {want}, but: {uses:?}",
        sleeper.pid()
    );
}
