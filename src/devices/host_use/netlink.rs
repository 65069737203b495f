//! The host's interfaces, their addresses and default routes, from one
//! rtnetlink dump each (AF_NETLINK is what the unit allows; /proc/net is
//! hidden by ProcSubset=pid). Raw libc sockets: three dumps and a few
//! fixed-layout headers do not need a netlink crate.
//!
//! Bounded: the three dumps together take at most [`DEADLINE`], a dump
//! larger than [`MAX_DUMP_BYTES`] is an error, and so is one the kernel
//! ends with an error or marks interrupted (its tables changed meanwhile:
//! an interface could be missing) [`DUMP_ATTEMPTS`] times in a row; never a
//! cut answer, never a hang.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// The longest the three dumps of [`NetworkSnapshot::from_kernel`] take
/// together.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// The most bytes one dump may return (a host with thousands of routes
/// stays far below).
pub const MAX_DUMP_BYTES: usize = 16 * 1024 * 1024;
/// How often a dump the kernel marks interrupted is asked for.
pub const DUMP_ATTEMPTS: u32 = 3;
/// Set on a dump's messages when the table changed while it was dumped
/// (`NLM_F_DUMP_INTR`).
const NLM_F_DUMP_INTR: u16 = 0x10;
/// Kernel dump datagrams are at most 32 KiB.
const RECEIVE_BUFFER: usize = 64 * 1024;

const NLMSG_HEADER: usize = 16;
const IFF_UP: u32 = 1;
const IFLA_LINK: u16 = 5;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINK_NETNSID: u16 = 37;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTA_NH_ID: u16 = 30;
/// The table of `ip route`'s default route.
pub const RT_TABLE_MAIN: u32 = 254;
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
    /// The bridge, bond, team or VRF it is a port of (`IFLA_MASTER`).
    pub master: Option<u32>,
    /// The interface it is stacked on (`IFLA_LINK`: a VLAN's, macvlan's
    /// or tunnel's), when that is in this namespace.
    pub lower: Option<u32>,
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
    /// Default routes (IPv4 or IPv6) by interface and table: any table,
    /// as policy routing and VRFs use others; each of a multipath route's
    /// next hops.
    pub default_routes: Vec<DefaultRoute>,
    /// Default routes whose interfaces the dump does not say (through a
    /// nexthop object, `RTA_NH_ID`, with the kernel's compatibility
    /// attributes off), described.
    pub unresolved_default_routes: Vec<String>,
}

/// A default route through interface `index`, in routing table `table`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DefaultRoute {
    pub index: u32,
    pub table: u32,
}

/// What one route message says, if it is a default route.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RouteMessage {
    Default(Vec<DefaultRoute>),
    Unresolved(String),
}

impl NetworkSnapshot {
    /// Three dumps over one NETLINK_ROUTE socket, within [`DEADLINE`].
    pub fn from_kernel() -> io::Result<NetworkSnapshot> {
        let mut socket = Socket::open()?;
        let deadline = Instant::now() + DEADLINE;
        let mut snapshot = NetworkSnapshot::default();
        let request = |request, header| Request {
            request,
            header,
            deadline,
        };
        snapshot.links = dump(
            &mut socket,
            request(libc::RTM_GETLINK, &[0u8; 16]),
            each_parsed(libc::RTM_NEWLINK, parse_link),
        )?;
        snapshot.addresses = dump(
            &mut socket,
            request(libc::RTM_GETADDR, &[0u8; 8]),
            each_parsed(libc::RTM_NEWADDR, parse_address),
        )?;
        let routes = dump(
            &mut socket,
            request(libc::RTM_GETROUTE, &[0u8; 12]),
            each_parsed(libc::RTM_NEWROUTE, default_route),
        )?;
        for route in routes {
            match route {
                RouteMessage::Default(routes) => snapshot.default_routes.extend(routes),
                RouteMessage::Unresolved(what) => snapshot.unresolved_default_routes.push(what),
            }
        }
        snapshot.default_routes.sort_unstable();
        snapshot.default_routes.dedup();
        Ok(snapshot)
    }
}

/// A dump's `each` that keeps what `parse` makes of the messages of type
/// `kind`.
fn each_parsed<T>(kind: u16, parse: fn(&[u8]) -> Option<T>) -> impl FnMut(&mut Vec<T>, u16, &[u8]) {
    move |found, reply, body| {
        if reply == kind
            && let Some(parsed) = parse(body)
        {
            found.push(parsed);
        }
    }
}

/// Where dump requests go and replies come from: the kernel, or a script
/// (tests).
trait Datagrams {
    /// Sends one request to the kernel.
    fn send(&mut self, message: &[u8]) -> io::Result<()>;
    /// The kernel's next datagram, into `buffer`; its length (more than
    /// the buffer's when cut). `TimedOut` at `deadline`.
    fn receive(&mut self, buffer: &mut [u8], deadline: Instant) -> io::Result<usize>;
}

/// A NETLINK_ROUTE socket of the service's network namespace.
struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Socket> {
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
        Ok(Socket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl Socket {
    /// Sends `message` to netlink port `port`.
    fn send_to(&self, port: u32, message: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl is valid.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        to.nl_pid = port;
        // SAFETY: valid fd, buffer and address of the sizes passed.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Datagrams for Socket {
    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        // Port 0 is the kernel.
        self.send_to(0, message)
    }

    fn receive(&mut self, buffer: &mut [u8], deadline: Instant) -> io::Result<usize> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the kernel did not answer the netlink dumps within {DEADLINE:?}"),
                ));
            }
            let mut poll = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up: a wait of 0 ms would spin until the deadline.
            let wait = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&raw mut poll, 1, wait) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                continue;
            }
            // Any local process may send to our port: only the kernel's
            // datagrams count (a forged early NLMSG_DONE would hide a
            // route). MSG_TRUNC: the real length, to tell a cut datagram.
            // SAFETY: zeroed sockaddr_nl is valid.
            let mut sender: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut sender_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: valid fd, buffer and address of the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                    (&raw mut sender).cast(),
                    &raw mut sender_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(e);
            }
            if sender.nl_pid == 0 {
                return Ok(n as usize);
            }
        }
    }
}

/// One dump request: its type, the zeroed family header of the request
/// type (family 0 = all), and when everything must be done.
struct Request<'h> {
    request: u16,
    header: &'h [u8],
    deadline: Instant,
}

/// What a dump's datagrams said so far.
enum Progress {
    More,
    /// NLMSG_DONE; `interrupted` when any message of the dump was marked
    /// NLM_F_DUMP_INTR.
    Done {
        interrupted: bool,
    },
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Sends `request` and hands each reply's type and body to `each`, which
/// fills a fresh `T` per attempt; a dump marked interrupted is asked for
/// again, [`DUMP_ATTEMPTS`] times at most, then it is an error.
fn dump<T: Default>(
    socket: &mut impl Datagrams,
    request: Request,
    mut each: impl FnMut(&mut T, u16, &[u8]),
) -> io::Result<T> {
    let mut buffer = vec![0u8; RECEIVE_BUFFER];
    for seq in 1..=DUMP_ATTEMPTS {
        let mut message = Vec::with_capacity(NLMSG_HEADER + request.header.len());
        message.extend_from_slice(&((NLMSG_HEADER + request.header.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&request.request.to_ne_bytes());
        message.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        // A new number per attempt: the rest of an abandoned one is ignored.
        message.extend_from_slice(&seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(request.header);
        socket.send(&message)?;
        let mut found = T::default();
        let mut received = 0usize;
        let mut interrupted = false;
        loop {
            let n = socket.receive(&mut buffer, request.deadline)?;
            if n > buffer.len() {
                return Err(invalid("a netlink datagram was larger than the buffer"));
            }
            received += n;
            if received > MAX_DUMP_BYTES {
                return Err(io::Error::other(format!(
                    "a netlink dump is larger than {MAX_DUMP_BYTES} bytes"
                )));
            }
            let datagram = &buffer[..n];
            match messages(datagram, seq, &mut interrupted, |kind, body| {
                each(&mut found, kind, body);
            })? {
                Progress::More => {}
                Progress::Done { interrupted: false } => return Ok(found),
                Progress::Done { interrupted: true } => break,
            }
        }
    }
    Err(io::Error::other(format!(
        "the kernel's tables changed during each of {DUMP_ATTEMPTS} netlink dumps"
    )))
}

/// The messages of one datagram of dump `seq` (others' are skipped):
/// bodies to `each`, NLM_F_DUMP_INTR into `interrupted`, an error or a
/// NLMSG_DONE with a negative errno as an error.
fn messages(
    mut rest: &[u8],
    seq: u32,
    interrupted: &mut bool,
    mut each: impl FnMut(u16, &[u8]),
) -> io::Result<Progress> {
    while rest.len() >= NLMSG_HEADER {
        let len = u32_at(rest, 0)? as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let flags = u16::from_ne_bytes([rest[6], rest[7]]);
        let reply_seq = u32_at(rest, 8)?;
        if len < NLMSG_HEADER || len > rest.len() {
            return Err(invalid("malformed netlink message"));
        }
        let body = &rest[NLMSG_HEADER..len];
        if reply_seq == seq {
            *interrupted |= flags & NLM_F_DUMP_INTR != 0;
            match i32::from(kind) {
                libc::NLMSG_DONE => {
                    // The dump's own result (0, or a negative errno when
                    // the kernel could not finish it).
                    let status = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("four bytes")));
                    if status < 0 {
                        return Err(io::Error::from_raw_os_error(-status));
                    }
                    return Ok(Progress::Done {
                        interrupted: *interrupted,
                    });
                }
                libc::NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(
                        body.get(..4)
                            .ok_or_else(|| invalid("short netlink error"))?
                            .try_into()
                            .expect("four bytes"),
                    );
                    if errno == 0 {
                        return Err(invalid("the kernel acknowledged a dump request"));
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => each(kind, body),
            }
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    Ok(Progress::More)
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
    let u32_of = |payload: &[u8]| payload.try_into().ok().map(u32::from_ne_bytes);
    let (mut name, mut master, mut lower, mut other_namespace) = (None, None, None, false);
    for (kind, payload) in attributes(&body[16..]) {
        match kind {
            IFLA_IFNAME => name = payload.split(|&b| b == 0).next(),
            IFLA_MASTER => master = u32_of(payload).filter(|&m| m != 0),
            IFLA_LINK => lower = u32_of(payload).filter(|&l| l != 0 && l != index),
            // IFLA_LINK is then an index of another namespace (a veth's peer).
            IFLA_LINK_NETNSID => other_namespace = true,
            _ => {}
        }
    }
    Some(Link {
        index,
        name: String::from_utf8_lossy(name?).into_owned(),
        up: flags & IFF_UP != 0,
        master,
        lower: lower.filter(|_| !other_namespace),
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

/// What a route message says if it is a unicast default route: its
/// output interfaces and table.
fn default_route(body: &[u8]) -> Option<RouteMessage> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    let header = body.get(..12)?;
    let (dst_len, table, kind) = (header[1], header[4], header[7]);
    if dst_len != 0 || kind != RTN_UNICAST {
        return None;
    }
    let u32_of = |payload: &[u8]| payload.try_into().ok().map(u32::from_ne_bytes);
    let mut table = u32::from(table);
    let mut interfaces = Vec::new();
    let mut nexthop_object = None;
    for (attribute, payload) in attributes(&body[12..]) {
        match attribute {
            RTA_TABLE => table = u32_of(payload).unwrap_or(table),
            RTA_OIF => interfaces.extend(u32_of(payload)),
            RTA_NH_ID => nexthop_object = u32_of(payload),
            RTA_MULTIPATH => {
                // struct rtnexthop: len (u16), flags, hops, ifindex (i32), then attributes.
                let mut hops = payload;
                while hops.len() >= 8 {
                    let len = u16::from_ne_bytes([hops[0], hops[1]]) as usize;
                    if len < 8 || len > hops.len() {
                        break;
                    }
                    interfaces.extend(u32_of(&hops[4..8]));
                    hops = &hops[align(len).min(hops.len())..];
                }
            }
            _ => {}
        }
    }
    if interfaces.is_empty() {
        let through = match nexthop_object {
            Some(id) => format!("through nexthop object {id}"),
            None => "with no output interface".to_owned(),
        };
        return Some(RouteMessage::Unresolved(format!(
            "a default route of routing table {} {through} goes through no interface the dump names",
            table_name(table)
        )));
    }
    Some(RouteMessage::Default(
        interfaces
            .into_iter()
            .map(|index| DefaultRoute { index, table })
            .collect(),
    ))
}

/// `main` for the main table, else its number.
pub fn table_name(table: u32) -> String {
    if table == RT_TABLE_MAIN {
        "main".to_owned()
    } else {
        table.to_string()
    }
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

    fn route(table: u32, attributes: &[Vec<u8>]) -> Vec<u8> {
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
        route.extend(attribute(RTA_TABLE, &table.to_ne_bytes()));
        route.extend(attributes.concat());
        route
    }

    fn through(routes: &[(u32, u32)]) -> Option<RouteMessage> {
        Some(RouteMessage::Default(
            routes
                .iter()
                .map(|&(index, table)| DefaultRoute { index, table })
                .collect(),
        ))
    }

    #[test]
    fn default_routes_of_every_table() {
        let oif = |index: u32| attribute(RTA_OIF, &index.to_ne_bytes());
        let main = route(RT_TABLE_MAIN, &[oif(7)]);
        assert_eq!(default_route(&main), through(&[(7, 254)]));
        // A /24 route is no default route.
        let mut subnet = main.clone();
        subnet[1] = 24;
        assert_eq!(default_route(&subnet), None);
        // Another table (a VRF, policy routing): said with its table.
        assert_eq!(default_route(&route(100, &[oif(7)])), through(&[(7, 100)]));
        // Multipath: every next hop.
        let mut hops = Vec::new();
        for index in [3u32, 5] {
            hops.extend_from_slice(&8u16.to_ne_bytes());
            hops.extend_from_slice(&[0, 0]);
            hops.extend_from_slice(&index.to_ne_bytes());
        }
        let multipath = route(RT_TABLE_MAIN, &[attribute(RTA_MULTIPATH, &hops)]);
        assert_eq!(default_route(&multipath), through(&[(3, 254), (5, 254)]));
        // Through a nexthop object, without the compatibility attributes:
        // which interface is not said.
        let nexthop = route(100, &[attribute(RTA_NH_ID, &12u32.to_ne_bytes())]);
        assert_eq!(
            default_route(&nexthop),
            Some(RouteMessage::Unresolved(
                "a default route of routing table 100 through nexthop object 12 goes through no interface the dump names".into()
            ))
        );
        // With them, it is.
        let compatible = route(
            RT_TABLE_MAIN,
            &[attribute(RTA_NH_ID, &12u32.to_ne_bytes()), oif(4)],
        );
        assert_eq!(default_route(&compatible), through(&[(4, 254)]));
        assert_eq!(default_route(&[1, 2]), None);
    }

    /// IFLA_MASTER and IFLA_LINK; a veth's IFLA_LINK (with
    /// IFLA_LINK_NETNSID) is an index of another namespace.
    #[test]
    fn links_say_what_they_are_stacked_on() {
        let link = |index: u32, attributes: &[Vec<u8>]| {
            let mut body = vec![0u8; 16];
            body[4..8].copy_from_slice(&index.to_ne_bytes());
            body[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
            body.extend(attribute(IFLA_IFNAME, b"x\0"));
            body.extend(attributes.concat());
            parse_link(&body).map(|l| (l.master, l.lower))
        };
        let u32_attribute = |kind, value: u32| attribute(kind, &value.to_ne_bytes());
        assert_eq!(link(3, &[]), Some((None, None)));
        assert_eq!(
            link(3, &[u32_attribute(IFLA_MASTER, 9)]),
            Some((Some(9), None))
        );
        assert_eq!(
            link(4, &[u32_attribute(IFLA_LINK, 2)]),
            Some((None, Some(2)))
        );
        assert_eq!(link(4, &[u32_attribute(IFLA_LINK, 4)]), Some((None, None)));
        assert_eq!(
            link(
                5,
                &[
                    u32_attribute(IFLA_LINK, 2),
                    u32_attribute(IFLA_LINK_NETNSID, 0)
                ]
            ),
            Some((None, None))
        );
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
mod dumps {
    use std::collections::VecDeque;

    use super::*;

    /// One netlink message.
    fn message(kind: i32, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HEADER + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&(kind as u16).to_ne_bytes());
        m.extend_from_slice(&(flags | libc::NLM_F_MULTI as u16).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align(m.len()), 0);
        m
    }

    fn done(seq: u32, flags: u16, status: i32) -> Vec<u8> {
        message(libc::NLMSG_DONE, flags, seq, &status.to_ne_bytes())
    }

    /// A link message whose body is just `index`.
    fn link(seq: u32, flags: u16, index: u32) -> Vec<u8> {
        message(
            i32::from(libc::RTM_NEWLINK),
            flags,
            seq,
            &index.to_ne_bytes(),
        )
    }

    /// The datagrams answering a request, given its sequence number.
    type Answer = Box<dyn Fn(u32) -> Vec<Vec<u8>>>;

    /// Answers the n-th request with `answers[n]` (datagrams, given the
    /// request's sequence number).
    struct Script {
        answers: VecDeque<Answer>,
        pending: VecDeque<Vec<u8>>,
        requests: usize,
    }

    impl Script {
        fn new(answers: Vec<Answer>) -> Script {
            Script {
                answers: answers.into(),
                pending: VecDeque::new(),
                requests: 0,
            }
        }

        fn indexes(&mut self) -> io::Result<Vec<u32>> {
            let request = Request {
                request: libc::RTM_GETLINK,
                header: &[0; 16],
                deadline: Instant::now() + Duration::from_secs(1),
            };
            dump(self, request, |found: &mut Vec<u32>, _, body| {
                found.push(u32::from_ne_bytes(body.try_into().unwrap()));
            })
        }
    }

    impl Datagrams for Script {
        fn send(&mut self, message: &[u8]) -> io::Result<()> {
            let seq = u32_at(message, 8).unwrap();
            self.requests += 1;
            let answer = self.answers.pop_front().expect("no more requests expected");
            self.pending.extend(answer(seq));
            Ok(())
        }

        fn receive(&mut self, buffer: &mut [u8], _: Instant) -> io::Result<usize> {
            let datagram = self.pending.pop_front().expect("no datagram waiting");
            buffer[..datagram.len()].copy_from_slice(&datagram);
            Ok(datagram.len())
        }
    }

    #[test]
    fn a_dump_the_kernel_ends_with_an_error_is_an_error() {
        let mut script = Script::new(vec![Box::new(|seq| {
            vec![[link(seq, 0, 1), done(seq, 0, -libc::ENOBUFS)].concat()]
        })]);
        let error = script.indexes().unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOBUFS), "{error}");
        let mut fine = Script::new(vec![Box::new(|seq| {
            vec![link(seq, 0, 1), [link(seq, 0, 2), done(seq, 0, 0)].concat()]
        })]);
        assert_eq!(fine.indexes().unwrap(), [1, 2]);
    }

    /// The kernel marks a dump interrupted (even only on its NLMSG_DONE)
    /// when its table changed meanwhile: asked for again, and only the
    /// last, whole dump counts; interrupted every time, an error.
    #[test]
    fn an_interrupted_dump_is_asked_for_again_then_an_error() {
        let intr = NLM_F_DUMP_INTR;
        let mut script = Script::new(vec![
            Box::new(move |seq| vec![link(seq, intr, 1), done(seq, 0, 0)]),
            Box::new(move |seq| vec![[link(seq, 0, 2), done(seq, intr, 0)].concat()]),
            Box::new(|seq| vec![[link(seq, 0, 3), done(seq, 0, 0)].concat()]),
        ]);
        assert_eq!(script.indexes().unwrap(), [3]);
        assert_eq!(script.requests, 3);
        let always: Vec<Answer> = (0..DUMP_ATTEMPTS)
            .map(|_| {
                Box::new(move |seq| vec![[link(seq, intr, 1), done(seq, intr, 0)].concat()])
                    as Answer
            })
            .collect();
        let mut script = Script::new(always);
        let error = script.indexes().unwrap_err();
        assert!(error.to_string().contains("changed"), "{error}");
        assert_eq!(script.requests, DUMP_ATTEMPTS as usize);
    }

    /// The rest of an abandoned attempt (its number) is not taken for the
    /// next one's.
    #[test]
    fn replies_to_an_earlier_attempt_are_ignored() {
        let mut script = Script::new(vec![
            Box::new(move |seq| vec![done(seq, NLM_F_DUMP_INTR, 0)]),
            Box::new(|seq| {
                vec![
                    [link(seq - 1, 0, 9), done(seq - 1, 0, 0)].concat(),
                    [link(seq, 0, 4), done(seq, 0, 0)].concat(),
                ]
            }),
        ]);
        assert_eq!(script.indexes().unwrap(), [4]);
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

    /// Sends `datagram` from `forger` to port `victim`.
    fn forge(forger: &Socket, victim: u32, datagram: &[u8]) {
        forger.send_to(victim, datagram).unwrap();
    }

    fn forged_done(seq: u32) -> Vec<u8> {
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        done.extend_from_slice(&(libc::NLM_F_MULTI as u16).to_ne_bytes());
        done.extend_from_slice(&seq.to_ne_bytes());
        done.extend_from_slice(&0u32.to_ne_bytes());
        done.extend_from_slice(&0i32.to_ne_bytes());
        done
    }

    /// Another local process sends an NLMSG_DONE with the dump's sequence
    /// number to our port before the kernel answers: the dump must not
    /// end there (it would hide every interface, address and route).
    #[test]
    fn a_forged_done_from_another_socket_does_not_end_the_dump() {
        let mut socket = Socket::open().unwrap();
        let forger = Socket::open().unwrap();
        forge(&forger, port_of(&socket.0), &forged_done(1));
        let request = Request {
            request: libc::RTM_GETLINK,
            header: &[0u8; 16],
            deadline: Instant::now() + DEADLINE,
        };
        let links = dump(&mut socket, request, |links: &mut usize, kind, _| {
            if kind == libc::RTM_NEWLINK {
                *links += 1;
            }
        })
        .unwrap();
        assert!(
            links >= 1,
            "the forged NLMSG_DONE ended the dump (lo is always there)"
        );
    }

    /// No answer, or only others' datagrams arriving all the time: a
    /// timeout at the deadline, never a hang.
    #[test]
    fn waiting_ends_at_the_deadline() {
        let mut socket = Socket::open().unwrap();
        let forger = Socket::open().unwrap();
        let port = port_of(&socket.0);
        let mut buffer = vec![0u8; RECEIVE_BUFFER];
        let wait = Duration::from_millis(300);
        let started = Instant::now();
        let silent = socket.receive(&mut buffer, started + wait).unwrap_err();
        assert_eq!(silent.kind(), io::ErrorKind::TimedOut, "{silent}");
        let waited = started.elapsed();
        assert!(wait <= waited && waited < 2 * wait, "{waited:?}");

        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let flood = scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    forge(&forger, port, &forged_done(1));
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            let started = Instant::now();
            let flooded = socket.receive(&mut buffer, started + wait);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            flood.join().unwrap();
            let waited = started.elapsed();
            assert!(
                matches!(&flooded, Err(e) if e.kind() == io::ErrorKind::TimedOut),
                "{flooded:?}"
            );
            assert!(waited < 2 * wait, "{waited:?}");
        });
    }
}
