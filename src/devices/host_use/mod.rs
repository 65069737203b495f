//! Who on the host uses a PCI device: the facts behind Detach's safety
//! gates and the host-users property (issue 13, item 2). Free of D-Bus;
//! nothing here is written or unbound.
//!
//! One call, [`host_uses`], walks the device's sysfs subtree once and
//! collects its block devices, network interfaces, DRM connectors,
//! framebuffers and device nodes; then:
//! - **storage** (`host_use/storage.rs`): the block devices and what stacks on them
//!   (holders: dm, md, LVM; their partitions; NVMe multipath heads; loop
//!   devices on them), matched against the service's mount table and
//!   `/proc/swaps`, and opened exclusively (`host_use/claims.rs`): EBUSY
//!   shows what no table here does (a mount in another mount namespace,
//!   a lazily unmounted file system). Needs `DeviceAllow=block-* r` in the
//!   unit; without it, [`Unknown::BlockDevices`];
//! - **network** ([`netlink`], `host_use/network.rs`): interfaces that
//!   are up with a global address, or carry a default route (any routing
//!   table), themselves or through what stacks on them (a bridge, bond,
//!   team or VRF they are ports of; a VLAN or macvlan on them), from
//!   rtnetlink dumps; an interface outside the service's network namespace
//!   is unknown;
//! - **display**: `boot_vga`/`boot_display`, connected DRM outputs, a
//!   framebuffer below the device, and a firmware framebuffer (efifb,
//!   simpledrm, vesafb) when the device is the boot display;
//! - **processes**: every process holding one of the device's nodes (from
//!   sysfs `dev` files, by number, so a container's copy of a node counts
//!   too; `/dev/nvidiaN` for the nvidia driver), in one /proc pass.
//!
//! What cannot be looked at is said ([`Unknown`]), never taken for "no
//! use": the unit's ProcSubset=pid hides `/proc/swaps`; a process whose
//! open files the service is refused (an LSM) may hold a node.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use super::sysfs;
use crate::kernel_files::{self, AtLimit};
use crate::procfs::{self, HoldersError, Target};
use vmmanager_client::PciAddress;

mod claims;
pub mod netlink;
mod network;
mod storage;

pub use netlink::NetworkSnapshot;

/// Directories of one device's sysfs subtree looked at, at most (a GPU
/// has a few hundred).
pub const MAX_SUBTREE_DIRS: usize = 20_000;
/// Deeper than any device's sysfs subtree: `virtio1/block/vda/vda1` is 4,
/// a USB disk behind five tiers of hubs below an xHCI controller about 16.
/// A deeper directory is an error ([`HostUseError::TooDeep`]): a cut walk
/// could miss a mounted partition.
pub const MAX_SUBTREE_DEPTH: usize = 32;
const NVIDIA_MAJOR: u32 = 195;
/// `/dev/nvidiactl` and `/dev/nvidia-modeset`: shared by every GPU.
const NVIDIA_FIRST_SHARED_MINOR: u32 = 254;

/// Where the host's kernel trees are (`/sys`, `/proc`, `/dev`).
#[derive(Debug, Clone)]
pub struct HostRoots {
    pub sysfs: PathBuf,
    pub proc: PathBuf,
    pub dev: PathBuf,
}

impl HostRoots {
    pub fn host() -> HostRoots {
        HostRoots {
            sysfs: "/sys".into(),
            proc: "/proc".into(),
            dev: "/dev".into(),
        }
    }
}

/// Where the network facts come from.
#[derive(Debug, Clone)]
pub enum Network {
    /// rtnetlink dumps of the service's network namespace (the host's).
    Kernel,
    /// Given (tests).
    Given(NetworkSnapshot),
}

/// One way the host uses the device. [`std::fmt::Display`] is the sentence
/// shown to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostUse {
    /// A block device of the device (or one stacked on it) is mounted.
    Mount {
        mount_point: String,
        fs_type: String,
        /// The mount table's source (`/dev/vda1`, `/dev/mapper/vg-root`).
        source: String,
        /// Kernel names from the device's own block device to the mounted
        /// one (`["vda2", "dm-0"]`).
        chain: Vec<String>,
    },
    /// Swap on a block device of the device, or a swap file on one.
    Swap { path: String, chain: Vec<String> },
    /// The kernel holds a block device of the device (or one stacked on
    /// it) that no mount or swap in the service's view explains: a mount
    /// in another mount namespace, a lazily unmounted file system, a
    /// holder (`held_by`: dm, md) or an exclusive opener.
    Claimed {
        chain: Vec<String>,
        held_by: Vec<String>,
    },
    /// A loop device (the chain's last) whose backing file is a block
    /// device of the device (or one stacked on it) or a file on one.
    Loop {
        chain: Vec<String>,
        backing_file: String,
    },
    /// An interface of the device is up with addresses, or carries a
    /// default route.
    Interface {
        name: String,
        up: bool,
        addresses: Vec<(IpAddr, u8)>,
        default_route: bool,
    },
    /// An interface of the device through the interfaces stacked on it
    /// (`via`: the last one is up with addresses or carries a default
    /// route), or, `via` empty, the interface itself carrying a default
    /// route of a table other than main (policy routing, a VRF).
    StackedInterface {
        name: String,
        via: Vec<Stacking>,
        up: bool,
        addresses: Vec<(IpAddr, u8)>,
        default_route_tables: Vec<u32>,
    },
    /// The firmware's boot display (`boot_vga` or `boot_display` is 1).
    BootDisplay,
    /// A DRM connector with status `connected` (`card1-HDMI-A-1`).
    Connector { name: String },
    /// A framebuffer device: below the device (`firmware` false) or a
    /// firmware one (efifb, simpledrm, vesafb) while the device is the
    /// boot display.
    Framebuffer {
        name: String,
        label: String,
        firmware: bool,
    },
    /// A process holds one of the device's nodes open.
    Process {
        pid: u32,
        program: String,
        node: String,
    },
}

/// How an interface is stacked on the one below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stacking {
    /// It is the master of the one below: a bridge, bond, team or VRF
    /// (`IFLA_MASTER`).
    PortOf(String),
    /// It is on the one below: a VLAN, macvlan, ipvlan or tunnel
    /// (`IFLA_LINK`).
    Carries(String),
}

impl HostUse {
    /// Whether Detach refuses because of it unless forced: every use does.
    pub fn blocks_by_default(&self) -> bool {
        true
    }

    /// The block devices a storage use goes through.
    fn chain(&self) -> Option<&[String]> {
        match self {
            HostUse::Mount { chain, .. }
            | HostUse::Swap { chain, .. }
            | HostUse::Claimed { chain, .. }
            | HostUse::Loop { chain, .. } => Some(chain),
            _ => None,
        }
    }
}

/// " is up with A, B and carries …" of an interface: its addresses when
/// up, then its default routes by table.
fn interface_state(
    f: &mut std::fmt::Formatter<'_>,
    up: bool,
    addresses: &[(IpAddr, u8)],
    tables: &[u32],
) -> std::fmt::Result {
    let mut parts = Vec::new();
    if up && !addresses.is_empty() {
        let list: Vec<String> = addresses.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        parts.push(format!("is up with {}", list.join(", ")));
    }
    if tables.contains(&netlink::RT_TABLE_MAIN) {
        parts.push("carries the host's default route".to_owned());
    }
    let others: Vec<String> = tables
        .iter()
        .filter(|&&t| t != netlink::RT_TABLE_MAIN)
        .map(ToString::to_string)
        .collect();
    match others.len() {
        0 => {}
        1 => parts.push(format!(
            "carries a default route of routing table {}",
            others[0]
        )),
        _ => parts.push(format!(
            "carries default routes of routing tables {}",
            others.join(", ")
        )),
    }
    if parts.is_empty() {
        parts.push("is stacked on it".to_owned());
    }
    write!(f, " {}", parts.join(" and "))
}

fn chain_text(chain: &[String]) -> String {
    match chain {
        [one] => one.clone(),
        _ => chain.join(" → "),
    }
}

impl std::fmt::Display for HostUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostUse::Mount {
                mount_point,
                fs_type,
                source,
                chain,
            } => write!(
                f,
                "block device {} backs {mount_point} ({fs_type} on {source})",
                chain_text(chain)
            ),
            HostUse::Swap { path, chain } => {
                write!(
                    f,
                    "block device {} is used for swap ({path})",
                    chain_text(chain)
                )
            }
            HostUse::Claimed { chain, held_by } if held_by.is_empty() => write!(
                f,
                "block device {} is in use by the kernel: mounted, swap or opened exclusively, possibly in another mount namespace",
                chain_text(chain)
            ),
            HostUse::Claimed { chain, held_by } => write!(
                f,
                "block device {} is held by {}, stacked on it",
                chain_text(chain),
                held_by.join(", ")
            ),
            HostUse::Loop {
                chain,
                backing_file,
            } => {
                let (device, under) = match chain.split_last() {
                    Some((device, under)) if !under.is_empty() => (device.as_str(), under),
                    _ => ("?", &chain[..]),
                };
                write!(
                    f,
                    "loop device {device} reads from block device {} (its backing file is {backing_file})",
                    chain_text(under)
                )
            }
            HostUse::Interface {
                name,
                up,
                addresses,
                default_route,
            } => {
                let tables: &[u32] = if *default_route {
                    &[netlink::RT_TABLE_MAIN]
                } else {
                    &[]
                };
                write!(f, "network interface {name}")?;
                interface_state(f, *up, addresses, tables)
            }
            HostUse::StackedInterface {
                name,
                via,
                up,
                addresses,
                default_route_tables,
            } => {
                write!(f, "network interface {name}")?;
                for step in via {
                    match step {
                        Stacking::PortOf(upper) => write!(f, " is a port of {upper}, which")?,
                        Stacking::Carries(upper) => write!(f, " carries {upper}, which")?,
                    }
                }
                interface_state(f, *up, addresses, default_route_tables)
            }
            HostUse::BootDisplay => {
                write!(f, "it is the boot display (the firmware's console)")
            }
            HostUse::Connector { name } => write!(f, "display output {name} is connected"),
            HostUse::Framebuffer {
                name,
                label,
                firmware: false,
            } => write!(f, "framebuffer {name} ({label}) is on it"),
            HostUse::Framebuffer {
                name,
                label,
                firmware: true,
            } => write!(
                f,
                "firmware framebuffer {name} ({label}) is on the boot display, which this is"
            ),
            HostUse::Process { pid, program, node } => {
                write!(f, "process {pid} ({program}) holds {node} open")
            }
        }
    }
}

/// What could not be looked at: not "no use" (callers fail closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unknown {
    /// Whether a block device of the device holds swap.
    Swap { reason: String },
    /// Whether an interface of the device is up or routes.
    Network { reason: String },
    /// Whether the kernel holds a block device of the device (a mount in
    /// another mount namespace, …): it could not be opened to find out.
    BlockDevices { reason: String },
    /// Whether processes hold the device's nodes: the service was refused
    /// a look at some processes' open files (an LSM, ptrace's check).
    Processes { reason: String },
}

impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unknown::Swap { reason } => write!(f, "whether it holds swap is unknown: {reason}"),
            Unknown::Network { reason } => {
                write!(
                    f,
                    "whether its network interfaces are in use is unknown: {reason}"
                )
            }
            Unknown::BlockDevices { reason } => write!(
                f,
                "whether the kernel holds its block devices (a mount in another mount namespace) is unknown: {reason}"
            ),
            Unknown::Processes { reason } => {
                write!(
                    f,
                    "whether processes hold its device nodes is unknown: {reason}"
                )
            }
        }
    }
}

/// How far [`host_uses`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Everything, for Detach's gates (after polkit): also the kernel's
    /// claims on its disks (an `O_EXCL` open, which makes a mount started
    /// at that instant fail with EBUSY) and the processes holding its
    /// nodes (a pass over every process; which files other users'
    /// processes hold open is not every reader's to see).
    Full,
    /// What any local user may make the service look at, cheaply and as
    /// often as they like: mounts, swap, interfaces, display — no claim
    /// probe, no /proc pass.
    Public,
}

/// Everything found about one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostUses {
    pub uses: Vec<HostUse>,
    pub unknown: Vec<Unknown>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostUseError {
    #[error("PCI device {0} is gone")]
    Gone(PciAddress),
    #[error("cannot read {}: {source}", path.display())]
    Sysfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the sysfs tree of {0} has more than {MAX_SUBTREE_DIRS} directories")]
    TooLarge(PciAddress),
    #[error("block devices stacked deeper than {} on it: {}", storage::MAX_STACK_DEPTH, chain.join(" → "))]
    TooDeeplyStacked { chain: Vec<String> },
    #[error("the sysfs tree of {address} is deeper than {MAX_SUBTREE_DEPTH} directories (at {})", path.display())]
    TooDeep { address: PciAddress, path: PathBuf },
    #[error("cannot read the mount table {}: {source}", path.display())]
    MountTable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find out who holds the device's nodes: {0}")]
    Holders(#[from] HoldersError),
}

/// A device node below the device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    /// `/dev/dri/card1`.
    path: String,
    target: Target,
}

/// What one walk of the device's sysfs subtree finds.
#[derive(Debug, Default)]
struct Subtree {
    block: Vec<storage::BlockDevice>,
    nodes: Vec<Node>,
    /// (name, ifindex).
    interfaces: Vec<(String, u32)>,
    /// `net/` directories listing no interface: those of another network
    /// namespace are hidden in sysfs.
    empty_net_dirs: Vec<PathBuf>,
    connectors: Vec<String>,
    /// (fbN, its `name`).
    framebuffers: Vec<(String, String)>,
    dirs: usize,
}

/// A sysfs attribute's text without the trailing newline.
fn read_attribute(path: &Path) -> io::Result<String> {
    let bytes = kernel_files::read_bounded(path, sysfs::MAX_ATTRIBUTE_BYTES, AtLimit::Refuse)
        .map_err(kernel_files::KernelFileError::into_io)?;
    Ok(String::from_utf8_lossy(&bytes).trim_end().to_owned())
}

/// `DEVNAME=` of a device's `uevent`: its node's path below /dev.
fn dev_name(dir: &Path) -> Option<String> {
    let uevent = read_attribute(&dir.join("uevent")).ok()?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(str::to_owned)
}

impl Subtree {
    fn walk(&mut self, address: &PciAddress, dir: &Path, depth: usize) -> Result<(), HostUseError> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            // Gone while walking (a hot-unplugged child): nothing below.
            Err(e) if e.kind() == io::ErrorKind::NotFound && depth > 0 => return Ok(()),
            Err(source) => {
                return Err(HostUseError::Sysfs {
                    path: dir.to_owned(),
                    source,
                });
            }
        };
        for entry in entries.flatten() {
            // Real directories only: `subsystem`, `driver`, `device`,
            // `holders/*` are links out of the subtree.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            self.dirs += 1;
            if self.dirs > MAX_SUBTREE_DIRS {
                return Err(HostUseError::TooLarge(*address));
            }
            let child = entry.path();
            if depth + 1 > MAX_SUBTREE_DEPTH {
                return Err(HostUseError::TooDeep {
                    address: *address,
                    path: child,
                });
            }
            if child.join("uevent").is_file() {
                self.device(&child);
            }
            let interfaces = self.interfaces.len();
            self.walk(address, &child, depth + 1)?;
            if entry.file_name() == "net" && self.interfaces.len() == interfaces {
                self.empty_net_dirs.push(child);
            }
        }
        Ok(())
    }

    /// One device directory below the PCI device.
    fn device(&mut self, dir: &Path) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let subsystem = kernel_files::link_name(&dir.join("subsystem")).unwrap_or_default();
        if let Some(rdev) = storage::device_number(dir) {
            let path = format!("/dev/{}", dev_name(dir).unwrap_or_else(|| name.clone()));
            let target = if subsystem == "block" {
                self.block
                    .push(storage::BlockDevice::found(dir, &name, rdev));
                Target::BlockDevice { rdev }
            } else {
                Target::CharDevice { rdev }
            };
            self.nodes.push(Node { path, target });
        }
        match subsystem.as_str() {
            "net" => {
                if let Some(index) = read_attribute(&dir.join("ifindex"))
                    .ok()
                    .and_then(|t| t.parse().ok())
                {
                    self.interfaces.push((name, index));
                }
            }
            "drm" if read_attribute(&dir.join("status")).is_ok_and(|s| s == "connected") => {
                self.connectors.push(name);
            }
            "graphics" => {
                let label = read_attribute(&dir.join("name")).unwrap_or_default();
                self.framebuffers.push((name, label));
            }
            _ => {}
        }
    }
}

/// How the host uses the PCI device at `address`. `cancel` stops the /proc
/// pass (an error then, never "nobody"). Blocking: run it off the async
/// workers, bounded in time, like the VFIO user scans.
pub fn host_uses(
    roots: &HostRoots,
    address: &PciAddress,
    network: &Network,
    look: Look,
    cancel: &CancellationToken,
) -> Result<HostUses, HostUseError> {
    let dir = sysfs::device_dir(&roots.sysfs, address);
    if !dir.is_dir() {
        return Err(HostUseError::Gone(*address));
    }
    let mut subtree = Subtree::default();
    subtree.walk(address, &dir, 0)?;
    // Directory order is no order: the same device, the same sentences.
    subtree.interfaces.sort();
    subtree.connectors.sort();
    subtree.framebuffers.sort();
    subtree.nodes.sort_by(|a, b| a.path.cmp(&b.path));
    for empty in &mut subtree.empty_net_dirs {
        if let Ok(relative) = empty.strip_prefix(&dir) {
            *empty = relative.to_owned();
        }
    }
    let mut found = HostUses::default();

    // Storage.
    if !subtree.block.is_empty() {
        let devices =
            storage::stacked(std::mem::take(&mut subtree.block), &roots.sysfs, &roots.dev)?;
        for device in &devices {
            // Holders' nodes (`/dev/dm-0`) can be held open as well.
            if device.chain.len() > 1 {
                subtree.nodes.push(Node {
                    path: format!("/dev/{}", device.name),
                    target: Target::BlockDevice { rdev: device.rdev },
                });
            }
        }
        found
            .uses
            .extend(storage::mounts(&roots.proc, &roots.dev, &devices)?);
        match storage::swaps(&roots.proc, &roots.dev, &devices) {
            Ok(swaps) => found.uses.extend(swaps),
            Err(unknown) => found.unknown.push(unknown),
        }
        // A loop device holds its backing file open in the kernel, seen by
        // no process: said unless a use of it, or a loop above it, names
        // it already.
        let loops: Vec<HostUse> = devices
            .iter()
            .filter_map(|device| {
                let backing_file = device.backing_file.clone()?;
                let used = found
                    .uses
                    .iter()
                    .any(|u| u.chain().is_some_and(|chain| chain.contains(&device.name)));
                let below_a_loop = devices.iter().any(|other| {
                    other.backing_file.is_some()
                        && other.chain[..other.chain.len() - 1].contains(&device.name)
                });
                (!used && !below_a_loop).then(|| HostUse::Loop {
                    chain: device.chain.clone(),
                    backing_file,
                })
            })
            .collect();
        found.uses.extend(loops);
        if look == Look::Full {
            let (claims, unknown) =
                claims::claim_uses(&devices, &found.uses, |d| claims::probe(&roots.dev, d));
            found.uses.extend(claims);
            found.unknown.extend(unknown);
        }
    }

    // Network.
    if !subtree.interfaces.is_empty() {
        let snapshot = match network {
            Network::Given(snapshot) => Ok(snapshot.clone()),
            Network::Kernel => NetworkSnapshot::from_kernel(),
        };
        match snapshot {
            Ok(snapshot) => {
                let (uses, unknown) = network::interface_uses(
                    &subtree.interfaces,
                    &subtree.empty_net_dirs,
                    &snapshot,
                );
                found.uses.extend(uses);
                found.unknown.extend(unknown);
            }
            Err(e) => found.unknown.push(Unknown::Network {
                reason: e.to_string(),
            }),
        }
    } else if !subtree.empty_net_dirs.is_empty() {
        let (_, unknown) =
            network::interface_uses(&[], &subtree.empty_net_dirs, &NetworkSnapshot::default());
        found.unknown.extend(unknown);
    }

    // Display.
    let boot_display = ["boot_vga", "boot_display"]
        .iter()
        .any(|attribute| read_attribute(&dir.join(attribute)).is_ok_and(|v| v == "1"));
    if boot_display {
        found.uses.push(HostUse::BootDisplay);
    }
    found.uses.extend(
        subtree
            .connectors
            .iter()
            .map(|name| HostUse::Connector { name: name.clone() }),
    );
    found.uses.extend(
        subtree
            .framebuffers
            .iter()
            .map(|(name, label)| HostUse::Framebuffer {
                name: name.clone(),
                label: label.clone(),
                firmware: false,
            }),
    );
    if boot_display {
        found.uses.extend(firmware_framebuffers(&roots.sysfs));
    }

    // Processes.
    if look == Look::Public {
        return Ok(found);
    }
    if sysfs::driver(&dir).ok().flatten().as_deref() == Some("nvidia") {
        subtree.nodes.extend(nvidia_nodes(roots, address));
    }
    if !subtree.nodes.is_empty() {
        let targets: Vec<Target> = subtree.nodes.iter().map(|n| n.target).collect();
        let scanned =
            procfs::holders_of_any_and_unseen(&roots.proc, &targets, std::process::id(), cancel)?;
        if !scanned.unseen.is_empty() {
            found.unknown.push(Unknown::Processes {
                reason: unseen_reason(&roots.proc, &scanned.unseen),
            });
        }
        for (node, holders) in subtree.nodes.iter().zip(scanned.holders) {
            for holder in holders {
                found.uses.push(HostUse::Process {
                    pid: holder.pid,
                    program: program(&roots.proc, holder.pid),
                    node: node.path.clone(),
                });
            }
        }
    }
    Ok(found)
}

/// Framebuffers of the firmware's (`<sysfs>/class/graphics/fb*` whose
/// device is an efi-, simple- or vesa-framebuffer platform device): they
/// live in the boot display's memory. (Matching their address against the
/// device's BARs would need /proc/iomem, hidden by ProcSubset=pid.)
fn firmware_framebuffers(sysfs_root: &Path) -> Vec<HostUse> {
    let class = sysfs_root.join("class/graphics");
    let mut uses = Vec::new();
    for entry in fs::read_dir(&class).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("fb") {
            continue;
        }
        let fb = entry.path();
        let parent = kernel_files::link_name(&fb.join("device")).unwrap_or_default();
        let firmware = ["efi-framebuffer", "simple-framebuffer", "vesa-framebuffer"]
            .iter()
            .any(|p| parent.starts_with(p));
        if firmware {
            uses.push(HostUse::Framebuffer {
                name,
                label: read_attribute(&fb.join("name")).unwrap_or_default(),
                firmware: true,
            });
        }
    }
    uses.sort_by_key(ToString::to_string);
    uses
}

/// `/dev/nvidiaN` of a device bound to nvidia: the driver makes no sysfs
/// node for it. The minor is in `/proc/driver/nvidia/gpus/<address>/
/// information` where visible; else every `/dev/nvidiaN` (holding any GPU
/// of the driver counts: fail closed).
fn nvidia_nodes(roots: &HostRoots, address: &PciAddress) -> Vec<Node> {
    let information = roots
        .proc
        .join("driver/nvidia/gpus")
        .join(address.to_string())
        .join("information");
    let minor: Option<u32> = read_attribute(&information).ok().and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("Device Minor:"))
            .and_then(|m| m.trim().parse().ok())
    });
    let node = |minor: u32| Node {
        path: format!("/dev/nvidia{minor}"),
        target: Target::CharDevice {
            rdev: libc::makedev(NVIDIA_MAJOR, minor),
        },
    };
    if let Some(minor) = minor {
        return vec![node(minor)];
    }
    let mut nodes: Vec<Node> = fs::read_dir(&roots.dev)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let minor: u32 = name.to_str()?.strip_prefix("nvidia")?.parse().ok()?;
            (minor < NVIDIA_FIRST_SHARED_MINOR).then(|| node(minor))
        })
        .collect();
    nodes.sort_by(|a, b| a.path.cmp(&b.path));
    nodes
}

/// Processes named in an [`Unknown::Processes`] at most.
const MAX_UNSEEN_NAMED: usize = 5;

/// Why the processes `unseen` are unknown: named, a few of them.
fn unseen_reason(proc_root: &Path, unseen: &[u32]) -> String {
    let mut named: Vec<String> = unseen
        .iter()
        .take(MAX_UNSEEN_NAMED)
        .map(|&pid| format!("{pid} ({})", program(proc_root, pid)))
        .collect();
    if unseen.len() > MAX_UNSEEN_NAMED {
        named.push(format!("{} more", unseen.len() - MAX_UNSEEN_NAMED));
    }
    let processes = if unseen.len() == 1 {
        "process"
    } else {
        "processes"
    };
    format!(
        "the service was refused a look at the open files of {processes} {}",
        named.join(", ")
    )
}

/// A holder's executable, else its `comm`, else "unknown program".
fn program(proc_root: &Path, pid: u32) -> String {
    procfs::exe(proc_root, pid)
        .or_else(|| read_attribute(&proc_root.join(pid.to_string()).join("comm")).ok())
        .unwrap_or_else(|| "unknown program".to_owned())
}

#[cfg(test)]
mod tests;
