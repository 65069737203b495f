//! Prepared trees for each kind of use, then this machine's real devices
//! (read only: nothing is unbound or written).

use super::*;
use crate::test_support::{
    CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, FakeSysfs, Sleeper, without_capabilities,
};
use std::ffi::CString;
use std::os::unix::fs::symlink;
use storage::multipath_head_of;

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
        self.try_uses(address, network).unwrap()
    }

    fn try_uses(&self, address: &str, network: NetworkSnapshot) -> Result<HostUses, HostUseError> {
        host_uses(
            &self.roots(),
            &address.parse().unwrap(),
            &Network::Given(network),
            Look::Full,
            &CancellationToken::new(),
        )
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

    /// A block device outside the PCI tree (`devices/virtual/block/<name>`,
    /// or `parent/<name>`), listed in `class/block`, stacked on `lower`
    /// (their `holders/`) when given.
    fn virtual_block(
        &self,
        parent: Option<&Path>,
        name: &str,
        (major, minor): (u32, u32),
        lower: &[&Path],
    ) -> PathBuf {
        let root = self.sys.root();
        let dir = match parent {
            Some(parent) => parent.join(name),
            None => root.join("devices/virtual/block").join(name),
        };
        fs::create_dir_all(dir.join("holders")).unwrap();
        fs::write(dir.join("dev"), format!("{major}:{minor}\n")).unwrap();
        fs::create_dir_all(root.join("class/block")).unwrap();
        symlink(&dir, root.join("class/block").join(name)).unwrap();
        for lower in lower {
            fs::create_dir_all(lower.join("holders")).unwrap();
            symlink(&dir, lower.join("holders").join(name)).unwrap();
        }
        dir
    }

    /// A partition `name` of the block device at `disk`.
    fn partition(&self, disk: &Path, name: &str, dev: (u32, u32)) -> PathBuf {
        let dir = self.virtual_block(Some(disk), name, dev, &[]);
        fs::write(dir.join("partition"), "1\n").unwrap();
        dir
    }

    /// Bound loop device `name` with `backing_file`.
    fn loop_device(&self, name: &str, dev: (u32, u32), backing_file: &str) -> PathBuf {
        let dir = self.virtual_block(None, name, dev, &[]);
        fs::create_dir_all(dir.join("loop")).unwrap();
        fs::write(dir.join("loop/backing_file"), format!("{backing_file}\n")).unwrap();
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
/// by `dm-0`. Its numbers, and those of the other prepared block devices,
/// are of no real device (majors 60-63 are for local, experimental use):
/// the exclusive open of a prepared node never reaches a real disk.
fn disk(host: &Host) {
    host.sys.device(DISK, 0x1af4, 0x1001, 0x010000);
    host.device(DISK, "virtio1/block/vda", "block", Some((60, 0)));
    let vda1 = host.device(DISK, "virtio1/block/vda/vda1", "block", Some((60, 1)));
    let vda2 = host.device(DISK, "virtio1/block/vda/vda2", "block", Some((60, 2)));
    for partition in [&vda1, &vda2] {
        fs::write(partition.join("partition"), "1\n").unwrap();
    }
    let dm = host.sys.root().join("devices/virtual/block/dm-0");
    fs::create_dir_all(dm.join("holders")).unwrap();
    fs::write(dm.join("dev"), "61:0\n").unwrap();
    fs::create_dir_all(vda2.join("holders")).unwrap();
    symlink(&dm, vda2.join("holders/dm-0")).unwrap();
}

/// The sentences of the uses `keep` keeps.
fn sentences(uses: &HostUses, keep: fn(&HostUse) -> bool) -> Vec<String> {
    uses.uses
        .iter()
        .filter(|u| keep(u))
        .map(ToString::to_string)
        .collect()
}

fn mounts_of(uses: &HostUses) -> Vec<String> {
    sentences(uses, |u| {
        matches!(u, HostUse::Mount { .. } | HostUse::Swap { .. })
    })
}

fn processes_of(uses: &HostUses) -> Vec<String> {
    sentences(uses, |u| matches!(u, HostUse::Process { .. }))
}

#[test]
fn mounted_partitions_and_what_stacks_on_them_are_named() {
    let host = Host::new();
    disk(&host);
    host.mountinfo(
        "22 1 60:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
         23 22 61:0 / /srv/my\\040data rw - xfs /dev/mapper/vg-data rw\n\
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
        matches!(&swap_unknown(&uses)[..], [Unknown::Swap { reason }] if reason.contains("ProcSubset=pid")),
        "{:?}",
        uses.unknown
    );
}

fn swap_unknown(uses: &HostUses) -> Vec<&Unknown> {
    uses.unknown
        .iter()
        .filter(|u| matches!(u, Unknown::Swap { .. }))
        .collect()
}

/// Partitions of a stacked device (an md array's `md126p1`) are followed
/// like holders.
#[test]
fn partitions_of_stacked_devices_are_followed() {
    let host = Host::new();
    disk(&host);
    let vda1 = host.sys.device_dir(DISK).join("virtio1/block/vda/vda1");
    let md = host.virtual_block(None, "md126", (9, 126), &[&vda1]);
    host.partition(&md, "md126p1", (62, 7));
    host.mountinfo("22 1 62:7 / /data rw - ext4 /dev/md126p1 rw\n");
    assert_eq!(
        mounts_of(&host.uses(DISK, NetworkSnapshot::default())),
        ["block device vda1 → md126 → md126p1 backs /data (ext4 on /dev/md126p1)"]
    );
}

/// NVMe native multipath: the PCI device has only the hidden path
/// `nvme0c0n1`; the disk and its partitions live under the subsystem.
#[test]
fn nvme_multipath_heads_are_followed() {
    let host = Host::new();
    let nvme = "0000:04:00.0";
    host.sys.device(nvme, 0x144d, 0xa808, 0x010802);
    host.device(nvme, "nvme/nvme0", "nvme", Some((240, 0)));
    let path = host.device(nvme, "nvme/nvme0/nvme0c0n1", "block", Some((62, 0)));
    fs::write(path.join("hidden"), "1\n").unwrap();
    let subsystem = host
        .sys
        .root()
        .join("devices/virtual/nvme-subsystem/nvme-subsys0");
    let head = host.virtual_block(Some(&subsystem), "nvme0n1", (62, 1), &[]);
    host.partition(&head, "nvme0n1p1", (62, 2));
    host.partition(&head, "nvme0n1p2", (62, 3));
    host.mountinfo(
        "22 1 62:3 / / rw - xfs /dev/nvme0n1p2 rw\n\
         23 22 62:2 / /boot/efi rw - vfat /dev/nvme0n1p1 rw\n",
    );
    assert_eq!(
        mounts_of(&host.uses(nvme, NetworkSnapshot::default())),
        [
            "block device nvme0c0n1 → nvme0n1 → nvme0n1p2 backs / (xfs on /dev/nvme0n1p2)",
            "block device nvme0c0n1 → nvme0n1 → nvme0n1p1 backs /boot/efi (vfat on /dev/nvme0n1p1)",
        ]
    );
    assert_eq!(multipath_head_of("nvme12c3n45"), Some("nvme12n45".into()));
    for not_a_path in ["nvme0n1", "nvme0c0n", "nvmeXc0n1", "nvme0c0n1p2", "sda"] {
        assert_eq!(multipath_head_of(not_a_path), None, "{not_a_path}");
    }
}

/// A loop device whose backing file is a node of the device (or a file on
/// one of its file systems) holds it in the kernel, where no process
/// shows: said, and its mount named through it.
#[test]
fn loop_devices_on_the_device_are_followed() {
    use std::os::unix::fs::MetadataExt;
    let host = Host::new();
    host.sys.device(DISK, 0x1af4, 0x1001, 0x010000);
    // The image's file system is on vdb (the real number of its file
    // system; no node of it is made); vdc1 is a loop's backing node. The
    // other numbers are of no real device (majors 60-63 are for local,
    // experimental use): nothing real is opened.
    let image = host.dev.path().join("disk.img");
    fs::write(&image, "").unwrap();
    let on = fs::metadata(&image).unwrap().dev();
    let (major, minor) = (libc::major(on), libc::minor(on));
    host.device(DISK, "virtio1/block/vdb", "block", Some((major, minor)));
    let vdc1 = host.device(DISK, "virtio1/block/vdc1", "block", Some((62, 900)));
    fs::write(vdc1.join("partition"), "1\n").unwrap();
    host.block_node("vdc1", 62, 900);
    host.block_node("loop0", 62, 1000);
    host.loop_device("loop0", (62, 1000), "/dev/vdc1");
    host.loop_device("loop1", (62, 1001), "/dev/disk.img");
    host.loop_device("loop2", (62, 1002), "/elsewhere/other.img");
    host.loop_device("loop3", (62, 1003), "/dev/loop0");
    let uses = host.uses(DISK, NetworkSnapshot::default());
    let loops = |uses: &HostUses| sentences(uses, |u| matches!(u, HostUse::Loop { .. }));
    // loop0 is named by loop3's sentence.
    assert_eq!(
        loops(&uses),
        [
            "loop device loop1 reads from block device vdb (its backing file is /dev/disk.img)",
            "loop device loop3 reads from block device vdc1 → loop0 (its backing file is /dev/loop0)",
        ]
    );
    // Mounted: the mount names it; no second sentence.
    host.mountinfo("22 1 62:1003 / /mnt rw - ext4 /dev/loop3 rw\n");
    let uses = host.uses(DISK, NetworkSnapshot::default());
    assert_eq!(
        mounts_of(&uses),
        ["block device vdc1 → loop0 → loop3 backs /mnt (ext4 on /dev/loop3)"]
    );
    assert_eq!(
        loops(&uses),
        ["loop device loop1 reads from block device vdb (its backing file is /dev/disk.img)"]
    );
}

/// Stacking deeper than the bound is an error, never cut.
#[test]
fn stacking_deeper_than_the_bound_is_an_error() {
    let host = Host::new();
    disk(&host);
    let mut lower = host.sys.device_dir(DISK).join("virtio1/block/vda/vda1");
    for i in 0..storage::MAX_STACK_DEPTH {
        lower = host.virtual_block(
            None,
            &format!("dm-{}", i + 10),
            (61, 10 + i as u32),
            &[&lower],
        );
    }
    let result = host.try_uses(DISK, NetworkSnapshot::default());
    assert!(
        matches!(&result, Err(HostUseError::TooDeeplyStacked { chain }) if chain.len() == storage::MAX_STACK_DEPTH + 1),
        "{result:?}"
    );
}

#[test]
fn a_btrfs_mount_is_found_by_its_source_node() {
    let host = Host::new();
    disk(&host);
    host.block_node("vda1", 60, 1);
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
    host.block_node("vda2", 60, 2);
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
    assert_eq!(swap_unknown(&uses), [] as [&Unknown; 0]);
}

/// A NIC `nic` whose interfaces are `interfaces` (name, ifindex).
fn nic(host: &Host, nic: &str, interfaces: &[(&str, u32)]) {
    host.sys.device(nic, 0x1af4, 0x1000, 0x020000);
    for (name, index) in interfaces {
        let dir = host.device(nic, &format!("virtio2/net/{name}"), "net", None);
        fs::write(dir.join("ifindex"), format!("{index}\n")).unwrap();
    }
}

fn link(index: u32, name: &str, up: bool) -> netlink::Link {
    netlink::Link {
        index,
        name: name.into(),
        up,
        master: None,
        lower: None,
    }
}

fn address(index: u32, address: &str, prefix: u8) -> netlink::Address {
    netlink::Address {
        index,
        address: address.parse().unwrap(),
        prefix,
    }
}

fn default_routes(routes: &[(u32, u32)]) -> Vec<netlink::DefaultRoute> {
    routes
        .iter()
        .map(|&(index, table)| netlink::DefaultRoute { index, table })
        .collect()
}

fn network_unknown(uses: &HostUses) -> Vec<String> {
    uses.unknown
        .iter()
        .filter(|u| matches!(u, Unknown::Network { .. }))
        .map(ToString::to_string)
        .collect()
}

const NIC: &str = "0000:00:03.0";

/// The sentences of `NIC`'s uses, with nothing unknown about its network.
fn known_uses(host: &Host, network: NetworkSnapshot) -> Vec<String> {
    let uses = host.uses(NIC, network);
    assert_eq!(network_unknown(&uses), [] as [&str; 0]);
    sentences(&uses, |_| true)
}

#[test]
fn interfaces_up_with_addresses_or_the_default_route() {
    let host = Host::new();
    nic(
        &host,
        NIC,
        &[("eth0", 2), ("eth1", 3), ("eth2", 4), ("eth3", 5)],
    );
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
        default_routes: default_routes(&[(2, netlink::RT_TABLE_MAIN)]),
        ..NetworkSnapshot::default()
    };
    // eth2 is up without an address, eth3 down: unused.
    assert_eq!(
        known_uses(&host, network),
        [
            "network interface eth0 is up with 192.0.2.2/24 and carries the host's default route",
            "network interface eth1 is up with 2001:db8::1/64",
        ]
    );
}

/// A port of a bridge or bond, a VLAN's lower interface: the use is the
/// upper's, named with the way to it. A default route in another table
/// (policy routing, a VRF) counts too.
#[test]
fn interfaces_stacked_on_the_device_s_and_other_tables() {
    let host = Host::new();
    nic(
        &host,
        NIC,
        &[("eth0", 2), ("eth1", 3), ("eth2", 4), ("eth3", 5)],
    );
    let port_of = |mut l: netlink::Link, master| {
        l.master = Some(master);
        l
    };
    let on = |mut l: netlink::Link, lower| {
        l.lower = Some(lower);
        l
    };
    let network = NetworkSnapshot {
        links: vec![
            port_of(link(2, "eth0", true), 10),
            link(10, "br0", true),
            link(3, "eth1", true),
            on(link(11, "eth1.100", true), 3),
            port_of(link(4, "eth2", true), 12),
            // Up without an address: no use itself, but its VLAN is.
            link(12, "bond0", true),
            on(link(13, "bond0.5", true), 12),
            link(5, "eth3", true),
            // Not on the device's interfaces.
            on(link(14, "other.7", true), 99),
        ],
        addresses: vec![
            address(10, "10.0.0.2", 24),
            address(13, "192.0.2.5", 24),
            address(14, "192.0.2.9", 24),
        ],
        default_routes: default_routes(&[(11, netlink::RT_TABLE_MAIN), (5, 100), (13, 200)]),
        ..NetworkSnapshot::default()
    };
    assert_eq!(
        known_uses(&host, network),
        [
            "network interface eth0 is a port of br0, which is up with 10.0.0.2/24",
            "network interface eth1 carries eth1.100, which carries the host's default route",
            "network interface eth2 is a port of bond0, which carries bond0.5, which is up with 192.0.2.5/24 and carries a default route of routing table 200",
            "network interface eth3 carries a default route of routing table 100",
        ]
    );
}

/// An interface of the device outside the service's network namespace
/// (sysfs names it, the dump does not; or sysfs hides it, leaving an
/// empty `net/`), and a default route whose interface the dump does not
/// name: unknown, never "unused".
#[test]
fn what_the_network_namespace_does_not_show_is_unknown() {
    let host = Host::new();
    nic(&host, NIC, &[("eth0", 2), ("eth1", 3)]);
    let network = NetworkSnapshot {
        // eth1's index is another interface's here.
        links: vec![link(2, "eth0", true), link(3, "veth9", true)],
        unresolved_default_routes: vec!["a default route of routing table main through nexthop object 12 goes through no interface the dump names".into()],
        ..NetworkSnapshot::default()
    };
    assert_eq!(
        network_unknown(&host.uses(NIC, network.clone())),
        [
            "whether its network interfaces are in use is unknown: a default route of routing table main through nexthop object 12 goes through no interface the dump names",
            "whether its network interfaces are in use is unknown: interface eth1 (index 3) is not in the service's network namespace (moved into a container's?)",
        ]
    );
    // Hidden from sysfs, as for a device whose only interface was moved.
    let hidden = "0000:00:04.0";
    host.sys.device(hidden, 0x1af4, 0x1000, 0x020000);
    fs::create_dir_all(host.sys.device_dir(hidden).join("virtio3/net")).unwrap();
    assert_eq!(
        network_unknown(&host.uses(hidden, network)),
        [
            "whether its network interfaces are in use is unknown: sysfs lists no interface in its virtio3/net: they are in another network namespace"
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
    let vda = host.block_node("vda", 60, 0);
    // Another node of the same disk (a container's /dev): the same device.
    let copy = host.block_node("copy-of-dm", 61, 0);
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
    assert_eq!(
        processes_of(&uses),
        [
            "process 100 (/usr/bin/sleep) holds /dev/vda open",
            "process 101 (/usr/bin/cryptsetup) holds /dev/dm-0 open",
        ]
    );
}

/// A process whose open files the service may not see (here: its fd
/// directory, mode 000, and no DAC override) is unknown, never "holds
/// nothing"; the others are still named.
#[test]
fn a_process_refused_to_the_scan_is_unknown() {
    use std::os::unix::fs::PermissionsExt;
    let host = Host::new();
    disk(&host);
    let vda = host.block_node("vda", 60, 0);
    host.process_holding(100, "/usr/bin/sleep", &vda);
    host.process_holding(101, "/usr/bin/secret", &vda);
    let fd = host.proc.path().join("101/fd");
    fs::set_permissions(&fd, fs::Permissions::from_mode(0o000)).unwrap();
    let uses = without_capabilities(&[CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH], || {
        host.uses(DISK, NetworkSnapshot::default())
    });
    assert_eq!(
        processes_of(&uses),
        ["process 100 (/usr/bin/sleep) holds /dev/vda open"]
    );
    let unknown: Vec<String> = uses
        .unknown
        .iter()
        .filter(|u| matches!(u, Unknown::Processes { .. }))
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        unknown,
        [
            "whether processes hold its device nodes is unknown: the service was refused a look at the open files of process 101 (/usr/bin/secret)"
        ]
    );
    fs::set_permissions(&fd, fs::Permissions::from_mode(0o500)).unwrap();
    let uses = host.uses(DISK, NetworkSnapshot::default());
    assert!(
        !uses
            .unknown
            .iter()
            .any(|u| matches!(u, Unknown::Processes { .. })),
        "{uses:?}"
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
        Look::Full,
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
            Look::Full,
            &CancellationToken::new()
        ),
        Err(HostUseError::Gone(_))
    ));
}

/// A disk at the deepest level walked is found; one level deeper is an
/// error, never a walk cut short (which would miss its mount).
#[test]
fn a_subtree_deeper_than_the_limit_is_an_error() {
    let host = Host::new();
    host.sys.device(DISK, 0x1af4, 0x1001, 0x010000);
    let hubs = vec!["h"; MAX_SUBTREE_DEPTH - 2].join("/");
    host.device(DISK, &format!("{hubs}/block/sdz"), "block", Some((63, 0)));
    host.mountinfo("22 1 63:0 / /deep rw - ext4 /dev/sdz rw\n");
    assert_eq!(
        mounts_of(&host.uses(DISK, NetworkSnapshot::default())),
        ["block device sdz backs /deep (ext4 on /dev/sdz)"]
    );
    fs::create_dir(
        host.sys
            .device_dir(DISK)
            .join(&hubs)
            .join("block/sdz/deeper"),
    )
    .unwrap();
    let result = host.try_uses(DISK, NetworkSnapshot::default());
    assert!(
        matches!(&result, Err(HostUseError::TooDeep { path, .. }) if path.ends_with("sdz/deeper")),
        "{result:?}"
    );
}

// --- The real kernel's claims, on loop devices of the tests' own ---------

/// A loop device on an ext4 image in a temp dir; detached on drop (once
/// its last user is gone, if one is left).
struct LoopDevice {
    path: PathBuf,
    _image: tempfile::TempDir,
}

impl LoopDevice {
    fn new() -> LoopDevice {
        let image_dir = tempfile::tempdir().unwrap();
        let image = image_dir.path().join("fs.img");
        fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
        let run = |program: &str, args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{program}: {e}"));
            assert!(out.status.success(), "{program}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        run("mkfs.ext4", &["-q".as_ref(), image.as_os_str()]);
        let path = run(
            "losetup",
            &["--find".as_ref(), "--show".as_ref(), image.as_os_str()],
        );
        LoopDevice {
            path: PathBuf::from(path.trim()),
            _image: image_dir,
        }
    }

    fn number(&self) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let rdev = fs::metadata(&self.path).unwrap().rdev();
        (libc::major(rdev), libc::minor(rdev))
    }

    /// Whether an exclusive open succeeds now.
    fn free(&self) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&self.path)
            .is_ok()
    }

    /// A `sleep` in a mount namespace of its own where the device is
    /// mounted on `dir`: there only, or, `lazily`, nowhere any more
    /// (unmounted with MNT_DETACH while the sleep's cwd keeps it busy).
    fn mounted_elsewhere(&self, dir: &Path, lazily: bool) -> Sleeper {
        use std::os::unix::process::CommandExt;
        let device = CString::new(self.path.to_str().unwrap()).unwrap();
        let target = CString::new(dir.to_str().unwrap()).unwrap();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600");
        // SAFETY: only unshare, mount, chdir and umount2 between fork and
        // exec, on C strings made before: async-signal-safe, no allocation.
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| {
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    device.as_ptr(),
                    target.as_ptr(),
                    c"ext4".as_ptr(),
                    libc::MS_RDONLY,
                    std::ptr::null(),
                ))?;
                if lazily {
                    check(libc::chdir(target.as_ptr()))?;
                    check(libc::umount2(target.as_ptr(), libc::MNT_DETACH))?;
                }
                Ok(())
            });
        }
        Sleeper::spawn(&mut cmd)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Busy: the kernel detaches it at its last close.
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.path)
            .status();
    }
}

/// A mount in another mount namespace and a lazily unmounted file system
/// are in no mount table the service sees; the kernel's claim on the
/// device shows them. The prepared disk `vdz` has the number of a loop
/// device of the test's own, which the kernel claims for real.
#[test]
fn real_claims_beyond_the_mount_table_are_found() {
    let device = LoopDevice::new();
    let host = Host::new();
    host.sys.device(DISK, 0x1af4, 0x1001, 0x010000);
    let (major, minor) = device.number();
    host.device(DISK, "virtio1/block/vdz", "block", Some((major, minor)));
    host.block_node("vdz", major, minor);
    let claims = |host: &Host| {
        let uses = host.uses(DISK, NetworkSnapshot::default());
        let unknown: Vec<&Unknown> = uses
            .unknown
            .iter()
            .filter(|u| matches!(u, Unknown::BlockDevices { .. }))
            .collect();
        assert_eq!(unknown, [] as [&Unknown; 0]);
        sentences(&uses, |u| matches!(u, HostUse::Claimed { .. }))
    };
    let claimed = [
        "block device vdz is in use by the kernel: mounted, swap or opened exclusively, possibly in another mount namespace",
    ];
    assert_eq!(claims(&host), [] as [&str; 0]);
    let dir = tempfile::tempdir().unwrap();
    for lazily in [false, true] {
        let elsewhere = device.mounted_elsewhere(dir.path(), lazily);
        assert_eq!(claims(&host), claimed, "lazily: {lazily}");
        drop(elsewhere);
        // The namespace's mount goes with its last process, soon after.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !device.free() {
            assert!(std::time::Instant::now() < deadline, "never unmounted");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    assert_eq!(claims(&host), [] as [&str; 0]);
}

/// A block device that cannot be opened to look for claims (no node; a
/// node of no device; under the unit's device policy, refused) is
/// unknown, never free.
#[test]
fn a_block_device_that_cannot_be_probed_is_unknown() {
    let host = Host::new();
    disk(&host);
    let unknown = |host: &Host| -> Vec<String> {
        host.uses(DISK, NetworkSnapshot::default())
            .unknown
            .iter()
            .filter(|u| matches!(u, Unknown::BlockDevices { .. }))
            .map(ToString::to_string)
            .collect()
    };
    let dev = host.dev.path().display();
    assert_eq!(
        unknown(&host),
        [format!(
            "whether the kernel holds its block devices (a mount in another mount namespace) is unknown: no node of vda (60:0) in {dev} (vda, vda1, vda2, dm-0)"
        )]
    );
    // A node, but of no device (major 60 is for local, experimental use).
    host.block_node("vda", 60, 0);
    let said = unknown(&host);
    assert!(
        matches!(&said[..], [one] if one.contains(&format!("cannot open {dev}/vda: No such device or address"))),
        "{said:?}"
    );
}

// --- The real kernel's network, in a namespace of the test's own --------

/// Runs `work` on a new thread in a network namespace of its own (and
/// what it spawns: `ip`); the namespace goes with the thread.
fn in_private_network_namespace<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: a plain syscall; it moves only this thread.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
                work()
            })
            .join()
            .expect("the thread in its own network namespace panicked")
    })
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A `sleep` in a network namespace of its own, to move interfaces into.
fn namespace_holder() -> Sleeper {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600");
    // SAFETY: only unshare between fork and exec: async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Sleeper::spawn(&mut cmd)
}

/// What the kernel's dumps say of a veth `v0` (standing in for the
/// device's interface) that is a port of a bridge with an address and a
/// default route of table 100; of a default route through a nexthop
/// object, with the kernel's compatibility attributes and without; and of
/// an interface moved into another namespace.
#[test]
fn real_stacked_interfaces_policy_routes_and_moved_interfaces() {
    in_private_network_namespace(|| {
        ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        ip(&["link", "add", "br0", "type", "bridge"]);
        ip(&["link", "set", "v0", "master", "br0"]);
        for link in ["v0", "v1", "br0"] {
            ip(&["link", "set", link, "up"]);
        }
        ip(&["addr", "add", "10.9.0.1/24", "dev", "br0"]);
        ip(&["route", "add", "default", "dev", "br0", "table", "100"]);
        ip(&["nexthop", "add", "id", "12", "dev", "v1"]);
        ip(&["route", "add", "default", "nhid", "12", "table", "200"]);
        let compat = "/proc/sys/net/ipv4/nexthop_compat_mode";
        fs::write(compat, "1").unwrap();
        let snapshot = NetworkSnapshot::from_kernel().unwrap();
        let index = |name: &str| {
            snapshot
                .links
                .iter()
                .find(|l| l.name == name)
                .unwrap_or_else(|| panic!("{name} in {snapshot:?}"))
                .index
        };
        let (v0, v1) = (index("v0"), index("v1"));
        let said = |interfaces: &[(String, u32)], snapshot: &NetworkSnapshot| {
            let (uses, unknown) = network::interface_uses(interfaces, &[], snapshot);
            let uses: Vec<String> = uses.iter().map(ToString::to_string).collect();
            let unknown: Vec<String> = unknown.iter().map(ToString::to_string).collect();
            (uses, unknown)
        };
        assert_eq!(
            said(&[("v0".into(), v0), ("v1".into(), v1)], &snapshot),
            (
                vec![
                    "network interface v0 is a port of br0, which is up with 10.9.0.1/24 and carries a default route of routing table 100".to_owned(),
                    "network interface v1 carries a default route of routing table 200".to_owned(),
                ],
                vec![]
            ),
            "{snapshot:?}"
        );
        // Without the compatibility attributes, the nexthop object's
        // route names no interface.
        fs::write(compat, "0").unwrap();
        let snapshot = NetworkSnapshot::from_kernel().unwrap();
        let (_, unknown) = said(&[("v1".into(), v1)], &snapshot);
        assert_eq!(
            unknown,
            [
                "whether its network interfaces are in use is unknown: a default route of routing table 200 through nexthop object 12 goes through no interface the dump names"
            ]
        );
        // Moved into another namespace: not in the dump any more.
        let elsewhere = namespace_holder();
        ip(&["link", "set", "v1", "netns", &elsewhere.pid().to_string()]);
        let snapshot = NetworkSnapshot::from_kernel().unwrap();
        let (_, unknown) = said(&[("v1".into(), v1)], &snapshot);
        assert_eq!(
            unknown,
            [format!(
                "whether its network interfaces are in use is unknown: interface v1 (index {v1}) is not in the service's network namespace (moved into a container's?)"
            )]
        );
    });
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
        Look::Full,
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
    // Its claim (or, where the service may not open it, the unknown) is
    // the mount's: no claim of its own is said.
    assert!(
        !uses
            .uses
            .iter()
            .any(|u| matches!(u, HostUse::Claimed { chain, .. } if chain.last() == Some(&name))),
        "{uses:?}"
    );
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

/// Under ReadWritePaths=/mnt, the service's mount table has a host mount
/// on /mnt/x twice (propagated below the original /mnt and below the bind
/// mount of it): one use, one sentence.
#[test]
fn a_mount_listed_twice_in_the_namespace_is_named_once() {
    let host = Host::new();
    disk(&host);
    host.mountinfo(
        "22 1 60:0 / /mnt/gated rw - ext4 /dev/vda rw\n\
         23 30 60:0 / /mnt/gated rw - ext4 /dev/vda rw\n",
    );
    let uses = host.uses(DISK, NetworkSnapshot::default());
    assert_eq!(
        mounts_of(&uses),
        ["block device vda backs /mnt/gated (ext4 on /dev/vda)"]
    );
}
