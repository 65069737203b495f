//! Detach's safety gates (issue 13, item 2): before anything is unbound,
//! what the host would lose if the device — or, for a group detach, any
//! member that moves — left its driver. Free of D-Bus; nothing is written.
//!
//! Each [`Blocker`] is a sentence naming what and who: a mount, swap, an
//! interface, the display, a process holding a node ([`host_use`]); for a
//! group, also a sibling bound to a host driver that is not a display,
//! audio or USB controller (a chipset's LPC bridge, SMBus, a disk
//! controller: nothing may show it in use, yet the host runs on it), and a
//! member with SR-IOV VFs (unbinding its driver destroys them). What could
//! not be looked at is a blocker too: **fail closed**. Detach refuses on
//! any blocker unless the caller forces it (its own polkit action).

use std::fmt;
use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::host_use::{self, HostRoots, HostUse, HostUses, Look, Network};
use super::sysfs;
use super::vfio::is_vfio_driver;
use vmmanager_client::PciAddress;

/// One reason not to detach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    /// The device it is about (the one asked for, or a group member).
    pub member: PciAddress,
    /// The sentence shown to a user, without the member's address.
    pub text: String,
}

/// Blockers of one detach, as `HostInUse` says them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blockers(pub Vec<Blocker>);

impl Blockers {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One sentence per blocker; another member's carry its address
    /// (`0000:00:1f.2: block device sda backs /`).
    pub fn sentences(&self, asked: PciAddress) -> Vec<String> {
        self.0
            .iter()
            .map(|b| {
                if b.member == asked {
                    b.text.clone()
                } else {
                    format!("{}: {}", b.member, b.text)
                }
            })
            .collect()
    }
}

/// `asked` and what it blocks, for messages.
pub struct Described<'a> {
    pub asked: PciAddress,
    pub blockers: &'a Blockers,
}

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.blockers.sentences(self.asked).join("; "))
    }
}

/// The blockers of detaching `members` (the device `asked` alone, or the
/// endpoints of its group), each member looked at as it is now. Members
/// already on a VFIO driver lose nothing and are skipped. Blocking: one
/// /proc pass per member with device nodes; `cancel` stops it (then the
/// unfinished members are blockers, never "nothing").
pub fn blockers(
    roots: &HostRoots,
    network: &Network,
    asked: PciAddress,
    members: &[PciAddress],
    cancel: &CancellationToken,
) -> Blockers {
    let mut found = Vec::new();
    let on_a_graphics_card = members.iter().any(|m| {
        same_slot(*m, asked)
            && sysfs::read_device(&roots.sysfs, m).is_ok_and(|info| info.class >> 16 == 0x03)
    });
    for &member in members {
        let mut add = |text: String| found.push(Blocker { member, text });
        let info = match sysfs::read_device(&roots.sysfs, &member) {
            Ok(info) => info,
            Err(e) => {
                add(format!("cannot be looked at: {e}"));
                continue;
            }
        };
        if info.driver.as_deref().is_some_and(is_vfio_driver) {
            continue;
        }
        if info.sriov_num_vfs > 0 {
            add(format!(
                "has {} SR-IOV virtual functions enabled (unbinding its driver destroys them)",
                info.sriov_num_vfs
            ));
        }
        let sibling = member != asked && !(on_a_graphics_card && same_slot(member, asked));
        if sibling
            && let Some(driver) = &info.driver
            && !moves_with_its_group(info.class)
        {
            add(format!(
                "(class {:06x}) is bound to {driver} and may be what the host runs on",
                info.class
            ));
        }
        match host_use::host_uses(roots, &member, network, Look::Full, cancel) {
            Ok(HostUses { uses, unknown }) => {
                uses.iter().for_each(|u| add(u.to_string()));
                unknown.iter().for_each(|u| add(u.to_string()));
            }
            Err(e) => add(format!("how the host uses it could not be found out: {e}")),
        }
    }
    Blockers(found)
}

fn same_slot(a: PciAddress, b: PciAddress) -> bool {
    (a.domain, a.bus, a.slot) == (b.domain, b.bus, b.slot)
}

/// Classes a group detach may move along with the device asked for while
/// bound to a host driver: display (03), multimedia/audio (04) and USB
/// controllers (0c 03) — what shares a GPU's or a USB card's group. The
/// other functions of the graphics card asked for (its USB-C/UCSI
/// controllers) go with it whatever their class.
fn moves_with_its_group(class: u32) -> bool {
    let base = class >> 16;
    base == 0x03 || base == 0x04 || class >> 8 == 0x0c03
}

/// The roots [`host_use`] looks at for a binder writing `sysfs_root`.
pub fn roots(sysfs_root: &Path, proc_root: &Path, dev_root: &Path) -> HostRoots {
    HostRoots {
        sysfs: sysfs_root.to_owned(),
        proc: proc_root.to_owned(),
        dev: dev_root.to_owned(),
    }
}

/// One entry of the public `HostUsers` view: (kind, sentence).
pub type PublicUse = (&'static str, String);

/// `found` (a [`Look::Public`] look) as the `HostUsers` entries any local
/// user may read: each use's kind and sentence, then what is unknown.
pub fn public_view(found: &HostUses) -> Vec<PublicUse> {
    let kind = |found_use: &HostUse| match found_use {
        HostUse::Mount { .. } => "mount",
        HostUse::Swap { .. } => "swap",
        HostUse::Claimed { .. } | HostUse::Loop { .. } => "block-device",
        HostUse::Interface { .. } | HostUse::StackedInterface { .. } => "interface",
        HostUse::BootDisplay => "boot-display",
        HostUse::Connector { .. } => "connector",
        HostUse::Framebuffer { .. } => "framebuffer",
        // Not in a public look (see `Look::Public`).
        HostUse::Process { .. } => "processes",
    };
    found
        .uses
        .iter()
        .map(|u| (kind(u), u.to_string()))
        .chain(found.unknown.iter().map(|u| ("unknown", u.to_string())))
        .collect()
}
