//! The host's interfaces, their addresses and default routes, from one
//! rtnetlink dump each (AF_NETLINK is what the unit allows; /proc/net is
//! hidden by ProcSubset=pid). Raw libc sockets: three dumps and a few
//! fixed-layout headers do not need a netlink crate.
//!
//! Bounded: every receive waits at most [`RECEIVE_TIMEOUT`], and a dump
//! larger than [`MAX_DUMP_BYTES`] is an error, never a cut answer.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The longest wait for the kernel's next reply message.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most bytes one dump may return (a host with thousands of routes
/// stays far below).
pub const MAX_DUMP_BYTES: usize = 16 * 1024 * 1024;

const NLMSG_HEADER: usize = 16;
const IFF_UP: u32 = 1;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;
/// Scopes of addresses that say nothing about use: `fe80::/10` and
/// 169.254/16 appear on every interface that is up; 127/8 on `lo`.
const RT_SCOPE_LINK: u8 = 253;
const RT_SCOPE_HOST: u8 = 254;

/// One network interface as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
}

/// One address of an interface, with its prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub address: IpAddr,
    pub prefix: u8,
}

/// What the service's network namespace (the host's) looks like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkSnapshot {
    pub links: Vec<Link>,
    /// Global and site scope only: link-local and host addresses are on every
    /// interface that is up.
    pub addresses: Vec<Address>,
    /// Interface indexes that carry a default route (IPv4 or IPv6, main
    /// table, any of a multipath route's next hops).
    pub default_route_interfaces: Vec<u32>,
}

impl NetworkSnapshot {
    /// Three dumps over one NETLINK_ROUTE socket.
    pub fn from_kernel() -> io::Result<NetworkSnapshot> {
        let socket = open()?;
        let mut snapshot = NetworkSnapshot::default();
        dump(&socket, libc::RTM_GETLINK, &[0u8; 16], 1, |kind, body| {
            if kind == libc::RTM_NEWLINK
                && let Some(link) = parse_link(body)
            {
                snapshot.links.push(link);
            }
        })?;
        dump(&socket, libc::RTM_GETADDR, &[0u8; 8], 2, |kind, body| {
            if kind == libc::RTM_NEWADDR
                && let Some(address) = parse_address(body)
            {
                snapshot.addresses.push(address);
            }
        })?;
        dump(&socket, libc::RTM_GETROUTE, &[0u8; 12], 3, |kind, body| {
            if kind == libc::RTM_NEWROUTE {
                snapshot
                    .default_route_interfaces
                    .extend(default_route_interfaces(body));
            }
        })?;
        snapshot.default_route_interfaces.sort_unstable();
        snapshot.default_route_interfaces.dedup();
        Ok(snapshot)
    }
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: RECEIVE_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: RECEIVE_TIMEOUT.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid fd and a timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Sends one dump request (`header`: the zeroed family header of the
/// request type, family 0 = all) and hands each reply's type and body to
/// `each` until NLMSG_DONE.
fn dump(
    socket: &OwnedFd,
    request: u16,
    header: &[u8],
    seq: u32,
    mut each: impl FnMut(u16, &[u8]),
) -> io::Result<()> {
    let mut message = Vec::with_capacity(NLMSG_HEADER + header.len());
    message.extend_from_slice(&((NLMSG_HEADER + header.len()) as u32).to_ne_bytes());
    message.extend_from_slice(&request.to_ne_bytes());
    message.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    message.extend_from_slice(&seq.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(header);
    // SAFETY: zeroed sockaddr_nl is valid; pid 0 is the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid fd, buffer and address of the sizes passed.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buffer = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    loop {
        // Any local process may send to our port: only the kernel's
        // datagrams count (a forged early NLMSG_DONE would hide a route).
        // SAFETY: zeroed sockaddr_nl is valid.
        let mut sender: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut sender_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and address of the sizes passed.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
                (&raw mut sender).cast(),
                &raw mut sender_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock => io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the kernel did not answer a netlink dump in time",
                ),
                _ => e,
            });
        }
        let n = n as usize;
        if sender.nl_pid != 0 {
            continue;
        }
        received += n;
        if received > MAX_DUMP_BYTES {
            return Err(io::Error::other(format!(
                "a netlink dump is larger than {MAX_DUMP_BYTES} bytes"
            )));
        }
        let mut rest = &buffer[..n];
        while rest.len() >= NLMSG_HEADER {
            let len = u32_at(rest, 0)? as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            let reply_seq = u32_at(rest, 8)?;
            if len < NLMSG_HEADER || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed netlink message",
                ));
            }
            let body = &rest[NLMSG_HEADER..len];
            if reply_seq == seq {
                match i32::from(kind) {
                    libc::NLMSG_DONE => return Ok(()),
                    libc::NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(
                            body.get(..4)
                                .ok_or_else(|| {
                                    io::Error::new(io::ErrorKind::InvalidData, "short error")
                                })?
                                .try_into()
                                .expect("four bytes"),
                        );
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    _ => each(kind, body),
                }
            }
            rest = &rest[align(len).min(rest.len())..];
        }
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn u32_at(bytes: &[u8], at: usize) -> io::Result<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_ne_bytes(b.try_into().expect("four bytes")))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short netlink message"))
}

/// The (type, payload) of each rtattr in `bytes`; stops at the first
/// malformed one.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let payload = &bytes[4..len];
        bytes = &bytes[align(len).min(bytes.len())..];
        Some((kind, payload))
    })
}

fn parse_link(body: &[u8]) -> Option<Link> {
    // struct ifinfomsg: family, pad, type (u16), index (i32), flags (u32), change.
    let header = body.get(..16)?;
    let index = u32::from_ne_bytes(header[4..8].try_into().ok()?);
    let flags = u32::from_ne_bytes(header[8..12].try_into().ok()?);
    let name = attributes(&body[16..])
        .find(|(kind, _)| *kind == IFLA_IFNAME)?
        .1;
    let name = name.split(|&b| b == 0).next()?;
    Some(Link {
        index,
        name: String::from_utf8_lossy(name).into_owned(),
        up: flags & IFF_UP != 0,
    })
}

fn parse_address(body: &[u8]) -> Option<Address> {
    // struct ifaddrmsg: family, prefixlen, flags, scope, index (u32).
    let header = body.get(..8)?;
    let (family, prefix, scope) = (header[0], header[1], header[3]);
    if scope == RT_SCOPE_LINK || scope == RT_SCOPE_HOST {
        return None;
    }
    let index = u32::from_ne_bytes(header[4..8].try_into().ok()?);
    // IPv4 point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer's.
    let mut local = None;
    let mut address = None;
    for (kind, payload) in attributes(&body[8..]) {
        match kind {
            IFA_LOCAL => local = Some(payload),
            IFA_ADDRESS => address = Some(payload),
            _ => {}
        }
    }
    let bytes = local.or(address)?;
    let address = match (i32::from(family), bytes.len()) {
        (libc::AF_INET, 4) => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        (libc::AF_INET6, 16) => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(Address {
        index,
        address,
        prefix,
    })
}

/// The output interfaces of a route message if it is a default route of
/// the main table.
fn default_route_interfaces(body: &[u8]) -> Vec<u32> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let Some(header) = body.get(..12) else {
        return Vec::new();
    };
    let (dst_len, table, kind) = (header[1], header[4], header[7]);
    if dst_len != 0 || kind != RTN_UNICAST {
        return Vec::new();
    }
    let mut table = u32::from(table);
    let mut interfaces = Vec::new();
    for (attribute, payload) in attributes(&body[12..]) {
        match attribute {
            RTA_TABLE if payload.len() == 4 => {
                table = u32::from_ne_bytes(payload.try_into().expect("four bytes"));
            }
            RTA_OIF if payload.len() == 4 => {
                interfaces.push(u32::from_ne_bytes(payload.try_into().expect("four bytes")));
            }
            RTA_MULTIPATH => {
                // struct rtnexthop: len (u16), flags, hops, ifindex (i32), then attributes.
                let mut hops = payload;
                while hops.len() >= 8 {
                    let len = u16::from_ne_bytes([hops[0], hops[1]]) as usize;
                    if len < 8 || len > hops.len() {
                        break;
                    }
                    interfaces.push(u32::from_ne_bytes(
                        hops[4..8].try_into().expect("four bytes"),
                    ));
                    hops = &hops[align(len).min(hops.len())..];
                }
            }
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN {
        return Vec::new();
    }
    interfaces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(align(a.len()), 0);
        a
    }

    #[test]
    fn default_routes_of_the_main_table_only() {
        let mut route = vec![
            libc::AF_INET as u8,
            0,
            0,
            0,
            254,
            3,
            0,
            RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        route.extend(attribute(RTA_OIF, &7u32.to_ne_bytes()));
        assert_eq!(default_route_interfaces(&route), [7]);
        // A /24 route is no default route.
        let mut subnet = route.clone();
        subnet[1] = 24;
        assert_eq!(default_route_interfaces(&subnet), [] as [u32; 0]);
        // Another table (a VRF, policy routing) is not the host's default.
        let mut other = route.clone();
        other.extend(attribute(RTA_TABLE, &100u32.to_ne_bytes()));
        assert_eq!(default_route_interfaces(&other), [] as [u32; 0]);
        // Multipath: every next hop.
        let mut multipath = route[..12].to_vec();
        let mut hops = Vec::new();
        for index in [3u32, 5] {
            hops.extend_from_slice(&8u16.to_ne_bytes());
            hops.extend_from_slice(&[0, 0]);
            hops.extend_from_slice(&index.to_ne_bytes());
        }
        multipath.extend(attribute(RTA_MULTIPATH, &hops));
        assert_eq!(default_route_interfaces(&multipath), [3, 5]);
        assert_eq!(default_route_interfaces(&[1, 2]), [] as [u32; 0]);
    }

    #[test]
    fn link_local_addresses_are_no_use() {
        let mut address = vec![libc::AF_INET6 as u8, 64, 0, RT_SCOPE_LINK];
        address.extend_from_slice(&2u32.to_ne_bytes());
        address.extend(attribute(
            IFA_ADDRESS,
            &[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ));
        assert_eq!(parse_address(&address), None);
        address[3] = 0;
        assert_eq!(
            parse_address(&address).map(|a| (a.index, a.prefix)),
            Some((2, 64))
        );
        // Garbage is skipped, never a panic.
        assert_eq!(parse_address(&address[..10]), None);
        assert_eq!(parse_link(&[0; 3]), None);
    }

    /// The real kernel answers, and `lo` is among the links.
    #[test]
    fn the_kernel_answers() {
        let snapshot = NetworkSnapshot::from_kernel().unwrap();
        assert!(snapshot.links.iter().any(|l| l.name == "lo" && l.up));
    }
}

#[cfg(test)]
mod forged_replies {
    use super::*;

    /// The port the kernel gives `socket` (bound now, as the first send
    /// would bind it).
    fn port_of(socket: &OwnedFd) -> u32 {
        // SAFETY: zeroed sockaddr_nl is valid.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid fd and address of the size passed; port 0 = any.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const address).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: valid fd and address of the size passed.
        let rc = unsafe {
            libc::getsockname(socket.as_raw_fd(), (&raw mut address).cast(), &raw mut len)
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        address.nl_pid
    }

    /// Another local process sends an NLMSG_DONE with the dump's sequence
    /// number to our port before the kernel answers: the dump must not
    /// end there (it would hide every interface, address and route).
    #[test]
    fn a_forged_done_from_another_socket_does_not_end_the_dump() {
        let socket = open().unwrap();
        let forger = open().unwrap();
        let seq = 7u32;
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        done.extend_from_slice(&(libc::NLM_F_MULTI as u16).to_ne_bytes());
        done.extend_from_slice(&seq.to_ne_bytes());
        done.extend_from_slice(&0u32.to_ne_bytes());
        done.extend_from_slice(&0i32.to_ne_bytes());
        // SAFETY: zeroed sockaddr_nl is valid.
        let mut victim: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        victim.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        victim.nl_pid = port_of(&socket);
        // SAFETY: valid fd, buffer and address of the sizes passed.
        let sent = unsafe {
            libc::sendto(
                forger.as_raw_fd(),
                done.as_ptr().cast(),
                done.len(),
                0,
                (&raw const victim).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        assert_eq!(sent, done.len() as isize, "{}", io::Error::last_os_error());

        let mut links = 0;
        dump(&socket, libc::RTM_GETLINK, &[0u8; 16], seq, |kind, _| {
            if kind == libc::RTM_NEWLINK {
                links += 1;
            }
        })
        .unwrap();
        assert!(
            links >= 1,
            "the forged NLMSG_DONE ended the dump (lo is always there)"
        );
    }
}
