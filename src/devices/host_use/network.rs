//! Which of the device's network interfaces the host uses: up with
//! addresses, or carrying a default route (of any routing table), the
//! interface itself or anything stacked on it (a bridge, bond, team or VRF
//! it is a port of; a VLAN or macvlan on it; and so on up).
//!
//! What cannot be told is [`Unknown::Network`]: an interface of the device
//! outside the service's network namespace (moved into a container's), a
//! default route whose interface the dump does not name.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;

use super::netlink::{Link, NetworkSnapshot, RT_TABLE_MAIN};
use super::{HostUse, Stacking, Unknown};

/// Interfaces stacked on one another at most, above the device's own;
/// deeper is unknown, never cut.
pub const MAX_STACKED_INTERFACES: usize = 8;

/// The uses of `interfaces` ((name, ifindex) from sysfs) and of what
/// stacks on them, and what cannot be told. `empty_net_dirs`: the
/// device's `net/` directories (relative to its own) that list no
/// interface here.
pub(super) fn interface_uses(
    interfaces: &[(String, u32)],
    empty_net_dirs: &[PathBuf],
    snapshot: &NetworkSnapshot,
) -> (Vec<HostUse>, Vec<Unknown>) {
    let mut uses = Vec::new();
    let mut unknown: Vec<Unknown> = empty_net_dirs
        .iter()
        .map(|dir| Unknown::Network {
            reason: format!(
                "sysfs lists no interface in its {}: they are in another network namespace",
                dir.display()
            ),
        })
        .collect();
    if !snapshot.unresolved_default_routes.is_empty() {
        unknown.push(Unknown::Network {
            reason: snapshot.unresolved_default_routes.join("; "),
        });
    }
    for (name, index) in interfaces {
        let Some(link) = snapshot
            .links
            .iter()
            .find(|l| l.index == *index && l.name == *name)
        else {
            unknown.push(Unknown::Network {
                reason: format!(
                    "interface {name} (index {index}) is not in the service's network namespace (moved into a container's?)"
                ),
            });
            continue;
        };
        let (up, addresses, tables) = state(link, snapshot);
        let main_only = tables.iter().all(|&t| t == RT_TABLE_MAIN);
        if main_only && ((up && !addresses.is_empty()) || !tables.is_empty()) {
            uses.push(HostUse::Interface {
                name: name.clone(),
                up,
                addresses,
                default_route: !tables.is_empty(),
            });
        } else if !main_only {
            uses.push(HostUse::StackedInterface {
                name: name.clone(),
                via: Vec::new(),
                up,
                addresses,
                default_route_tables: tables,
            });
        }
        // What stacks on it, breadth first.
        let mut seen = HashSet::from([link.index]);
        let mut below = vec![(link, Vec::new())];
        while let Some((lower, via)) = below.pop() {
            for (upper, step) in uppers(lower, snapshot) {
                if !seen.insert(upper.index) {
                    continue;
                }
                let mut via = via.clone();
                via.push(step);
                if via.len() > MAX_STACKED_INTERFACES {
                    unknown.push(Unknown::Network {
                        reason: format!(
                            "interfaces are stacked more than {MAX_STACKED_INTERFACES} deep on {name}"
                        ),
                    });
                    continue;
                }
                let (up, addresses, tables) = state(upper, snapshot);
                if (up && !addresses.is_empty()) || !tables.is_empty() {
                    uses.push(HostUse::StackedInterface {
                        name: name.clone(),
                        via: via.clone(),
                        up,
                        addresses,
                        default_route_tables: tables,
                    });
                }
                below.push((upper, via));
            }
        }
    }
    (uses, unknown)
}

/// Whether `link` is up, its addresses, and the tables of the default
/// routes through it (sorted).
fn state(link: &Link, snapshot: &NetworkSnapshot) -> (bool, Vec<(IpAddr, u8)>, Vec<u32>) {
    let addresses = snapshot
        .addresses
        .iter()
        .filter(|a| a.index == link.index)
        .map(|a| (a.address, a.prefix))
        .collect();
    let mut tables: Vec<u32> = snapshot
        .default_routes
        .iter()
        .filter(|r| r.index == link.index)
        .map(|r| r.table)
        .collect();
    tables.sort_unstable();
    tables.dedup();
    (link.up, addresses, tables)
}

/// The interfaces directly on `lower`: its master, and those whose
/// `IFLA_LINK` it is (unless its own is theirs: a veth pair); by name.
fn uppers<'s>(lower: &Link, snapshot: &'s NetworkSnapshot) -> Vec<(&'s Link, Stacking)> {
    let mut uppers: Vec<(&Link, Stacking)> = snapshot
        .links
        .iter()
        .filter_map(|l| {
            if Some(l.index) == lower.master {
                Some((l, Stacking::PortOf(l.name.clone())))
            // Each naming the other: veth peers, side by side.
            } else if l.lower == Some(lower.index) && lower.lower != Some(l.index) {
                Some((l, Stacking::Carries(l.name.clone())))
            } else {
                None
            }
        })
        .collect();
    uppers.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    uppers
}
