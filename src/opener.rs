//! `vmmanager-opener` (both sides of it): a handle on a disk image, opened
//! in a mount namespace that systemd builds when the service asks.
//!
//! # Why
//! The service runs with `ProtectSystem=strict` and a list of
//! `ReadWritePaths=`. systemd builds its mount namespace once, at start: a
//! listed directory that did not exist then (`/var/lib/vms`, made a week
//! later) stays on the read-only root mount for as long as the service
//! runs, and a repair's qemu-img, reopening the service's descriptor,
//! fails with "Read-only file system". The opener is started per
//! connection (`vmmanager-opener.socket`, `Accept=yes`) under the same
//! list, so its namespace is built at that moment and the file it opens
//! lies on the writable mount. It opens with `O_PATH`, which opens nothing:
//! qemu-img still reopens the inode with its own (the caller's)
//! permissions; the handle only brings the writable mount along.
//!
//! # The exchange
//! One stream connection per request. The service writes an absolute path
//! (at most [`MAX_PATH_LEN`] bytes, no NUL) and shuts down its sending
//! side. The opener answers with one line, `ok` with the handle attached
//! (`SCM_RIGHTS`) or `error: <why>` without one, and exits. It serves only
//! uid 0 and never reads or writes a file's contents. The service trusts
//! nothing in the answer: it uses the handle only if it is its own image's
//! inode on a writable mount ([`crate::disk::writable`]).

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::mem::{size_of, zeroed};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where `vmmanager-opener.socket` listens (config `disk.opener-socket`).
pub const DEFAULT_SOCKET: &str = "/run/vmmanager-opener.socket";

/// Longest path asked for: PATH_MAX less the NUL, as for a caller's image.
pub const MAX_PATH_LEN: usize = crate::disk::image::MAX_PATH_LEN;

/// How long the opener waits for a request, and for its answer to go out.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest answer line the service reads.
const MAX_ANSWER: usize = 1024;
const OK: &str = "ok";
const ERROR_PREFIX: &str = "error: ";

/// Why the opener sent no handle; its `error:` line says this.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("cannot tell who is asking: {0}")]
    PeerUnknown(io::Error),
    #[error("uid {0} may not ask: only root (the service) may")]
    NotRoot(u32),
    #[error("cannot read the request: {0}")]
    Read(io::Error),
    #[error("the request is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("the request contains a NUL byte")]
    ContainsNul,
    #[error("the request is not an absolute path")]
    NotAbsolute,
    #[error("cannot open the path: {0}")]
    Open(io::Error),
}

/// How serving one connection went wrong (for the opener's log).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refused: {0}")]
    Refused(Refusal),
    #[error("cannot send the answer: {0}")]
    Answer(io::Error),
}

/// Serves one connection, as `vmmanager-opener` does with its stdin: the
/// handle, or an `error:` line, for the one path asked for.
pub fn serve(connection: &UnixStream) -> Result<(), ServeError> {
    let answered = connection
        .set_read_timeout(Some(SERVE_TIMEOUT))
        .and_then(|()| connection.set_write_timeout(Some(SERVE_TIMEOUT)));
    answered.map_err(ServeError::Answer)?;
    match open_requested(connection) {
        Ok(handle) => {
            send(connection, &format!("{OK}\n"), Some(handle.as_fd())).map_err(ServeError::Answer)
        }
        Err(refusal) => {
            // One line, whatever an error's text holds.
            let why = refusal.to_string().replace('\n', " ");
            send(connection, &format!("{ERROR_PREFIX}{why}\n"), None)
                .map_err(ServeError::Answer)?;
            Err(ServeError::Refused(refusal))
        }
    }
}

fn open_requested(connection: &UnixStream) -> Result<OwnedFd, Refusal> {
    let uid = peer_uid(connection).map_err(Refusal::PeerUnknown)?;
    if uid != 0 {
        return Err(Refusal::NotRoot(uid));
    }
    let mut request = Vec::new();
    let limit = u64::try_from(MAX_PATH_LEN + 1).unwrap_or(u64::MAX);
    connection
        .take(limit)
        .read_to_end(&mut request)
        .map_err(Refusal::Read)?;
    if request.len() > MAX_PATH_LEN {
        return Err(Refusal::TooLong);
    }
    if request.contains(&0) {
        return Err(Refusal::ContainsNul);
    }
    if request.first() != Some(&b'/') {
        return Err(Refusal::NotAbsolute);
    }
    open_without_symlinks(Path::new(OsStr::from_bytes(&request))).map_err(Refusal::Open)
}

/// Opens `path` (absolute) with O_PATH one component at a time, refusing any
/// symlink, `.` or `..` on the way (ELOOP, as openat2(RESOLVE_NO_SYMLINKS)
/// would; openat2 itself fails with ENOSYS under the unit's
/// RestrictSUIDSGID=yes). The service sends the kernel's name of its
/// descriptor, which has none of them: one means the name was changed
/// since, by someone who wants root to look somewhere for them.
fn open_without_symlinks(path: &Path) -> io::Result<OwnedFd> {
    let refused = || io::Error::from_raw_os_error(libc::ELOOP);
    let mut components = path.as_os_str().as_bytes().split(|&b| b == b'/').peekable();
    if components.next() != Some(b"".as_slice()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut dir = OwnedFd::from(std::fs::File::open("/")?);
    while let Some(name) = components.next() {
        if name.is_empty() || name == b"." || name == b".." {
            return Err(refused());
        }
        let last = components.peek().is_none();
        let mut flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        if !last {
            // A symlink opened with O_NOFOLLOW is no directory: ENOTDIR.
            flags |= libc::O_DIRECTORY;
        }
        let name = std::ffi::CString::new(name).map_err(|_| refused())?;
        // SAFETY: a valid directory fd and a NUL-terminated name.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ENOTDIR) {
                refused()
            } else {
                e
            });
        }
        // SAFETY: openat returned a new descriptor that nothing else owns.
        dir = unsafe { OwnedFd::from_raw_fd(fd) };
    }
    // With O_PATH, O_NOFOLLOW opens a symlink itself rather than failing.
    let handle = std::fs::File::from(dir);
    if handle.metadata()?.file_type().is_symlink() {
        return Err(refused());
    }
    Ok(OwnedFd::from(handle))
}

/// The uid of the process at the other end (as it was at connect time).
fn peer_uid(socket: &UnixStream) -> io::Result<u32> {
    // SAFETY: ucred is plain integers.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = socklen::<libc::ucred>();
    // SAFETY: `cred` is writable for `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// Room for the control messages of one `sendmsg`/`recvmsg`, aligned as
/// `cmsghdr` must be: enough for a dozen descriptors.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

/// Sends `line` in one message, with `handle` attached if given.
fn send(socket: &UnixStream, line: &str, handle: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut control = ControlBuffer([0; 64]);
    let mut iov = libc::iovec {
        iov_base: line.as_ptr().cast_mut().cast(),
        iov_len: line.len(),
    };
    // SAFETY: msghdr is plain integers and pointers; zero is "none".
    let mut message: libc::msghdr = unsafe { zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    if let Some(handle) = handle {
        let fd_len = u32::try_from(size_of::<RawFd>()).unwrap_or(u32::MAX);
        message.msg_control = control.0.as_mut_ptr().cast();
        // SAFETY: CMSG_* are pure arithmetic.
        message.msg_controllen = unsafe { libc::CMSG_SPACE(fd_len) } as _;
        // SAFETY: the buffer is aligned and large enough for one header
        // with one descriptor (CMSG_SPACE(4) = 24 bytes of 64).
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(fd_len) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast(), handle.as_raw_fd());
        }
    }
    // SAFETY: `message` points at live buffers of the lengths given.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
    match usize::try_from(sent) {
        Ok(n) if n == line.len() => Ok(()),
        Ok(_) => Err(io::Error::new(io::ErrorKind::WriteZero, "short send")),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

/// Why the service got no handle from the opener.
#[derive(Debug, thiserror::Error)]
pub enum OpenerError {
    #[error("nothing answers at {}: {source}", socket.display())]
    Unavailable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the opener did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("the opener refused: {0}")]
    Refused(String),
    #[error("talking to the opener failed: {0}")]
    Io(io::Error),
    #[error("the opener's answer makes no sense: {0}")]
    Garbled(&'static str),
}

/// Asks the opener at `socket` for a handle on `path`; the whole exchange
/// ends within `timeout`. Blocking. The handle is whatever the opener
/// found under that name: the caller must check what it is.
pub fn request(socket: &Path, path: &Path, timeout: Duration) -> Result<OwnedFd, OpenerError> {
    let deadline = Instant::now() + timeout;
    let failed = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => OpenerError::TimedOut(timeout),
        _ => OpenerError::Io(e),
    };
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(OpenerError::TimedOut(timeout))
    };
    let stream = connect(socket, left()?).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => OpenerError::TimedOut(timeout),
        _ => OpenerError::Unavailable {
            socket: socket.to_owned(),
            source: e,
        },
    })?;
    stream.set_write_timeout(Some(left()?)).map_err(failed)?;
    (&stream)
        .write_all(path.as_os_str().as_bytes())
        .map_err(failed)?;
    stream.shutdown(Shutdown::Write).map_err(failed)?;

    let mut answer = Vec::new();
    let mut handles = Vec::new();
    while !answer.contains(&b'\n') && answer.len() <= MAX_ANSWER {
        stream.set_read_timeout(Some(left()?)).map_err(failed)?;
        let mut buffer = [0u8; 256];
        let n = receive(&stream, &mut buffer, &mut handles).map_err(failed)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    parse_answer(&answer, handles)
}

/// A stream connection to `socket`, made within `timeout` (a connect
/// waits for room in the listener's backlog up to SO_SNDTIMEO, which
/// std's `connect` gives no chance to set first).
fn connect(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    // SAFETY: plain syscall; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and nothing else owns it.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    stream.set_write_timeout(Some(timeout))?;
    // SAFETY: sockaddr_un is plain integers; zero is an empty address.
    let mut address: libc::sockaddr_un = unsafe { zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = socket.as_os_str().as_bytes();
    if name.len() >= address.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (to, from) in address.sun_path.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    // SAFETY: `address` is a valid sockaddr_un of the length passed.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&address as *const libc::sockaddr_un).cast(),
            socklen::<libc::sockaddr_un>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// One `recvmsg` into `buffer`; descriptors that come along are added to
/// `handles` (close-on-exec, owned: closed unless used).
fn receive(
    stream: &UnixStream,
    buffer: &mut [u8],
    handles: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut control = ControlBuffer([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: msghdr is plain integers and pointers; zero is "none".
    let mut message: libc::msghdr = unsafe { zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.0.as_mut_ptr().cast();
    message.msg_controllen = control.0.len() as _;
    let received = loop {
        // SAFETY: `message` points at live buffers of the lengths given.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
        match usize::try_from(n) {
            Ok(n) => break n,
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(io::Error::last_os_error()),
        }
    };
    // SAFETY: the kernel filled `control` with well-formed headers up to
    // msg_controllen; CMSG_NXTHDR stays within it.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..bytes / size_of::<RawFd>() {
                    let fd: RawFd =
                        std::ptr::read_unaligned(data.add(i * size_of::<RawFd>()).cast());
                    handles.push(OwnedFd::from_raw_fd(fd));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if message.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more descriptors than asked for"));
    }
    Ok(received)
}

/// The handle, if the answer is `ok` with exactly one attached.
fn parse_answer(answer: &[u8], mut handles: Vec<OwnedFd>) -> Result<OwnedFd, OpenerError> {
    let Some(end) = answer.iter().position(|&b| b == b'\n') else {
        return Err(OpenerError::Garbled("no complete answer line"));
    };
    let line = String::from_utf8_lossy(&answer[..end]);
    if let Some(why) = line.strip_prefix(ERROR_PREFIX) {
        return Err(OpenerError::Refused(why.to_owned()));
    }
    if line != OK {
        return Err(OpenerError::Garbled("neither ok nor error"));
    }
    match (handles.pop(), handles.is_empty()) {
        (Some(handle), true) => Ok(handle),
        _ => Err(OpenerError::Garbled("not exactly one descriptor with ok")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/").unwrap())
    }

    #[test]
    fn only_ok_with_exactly_one_descriptor_is_a_handle() {
        assert!(parse_answer(b"ok\n", vec![handle()]).is_ok());
        for handles in [vec![], vec![handle(), handle()]] {
            assert!(matches!(
                parse_answer(b"ok\n", handles),
                Err(OpenerError::Garbled(_))
            ));
        }
        assert!(matches!(
            parse_answer(b"ok", vec![handle()]),
            Err(OpenerError::Garbled(_))
        ));
        assert!(matches!(
            parse_answer(b"okay\n", vec![handle()]),
            Err(OpenerError::Garbled(_))
        ));
        assert!(matches!(
            parse_answer(b"error: uid 5 may not ask\n", vec![handle()]),
            Err(OpenerError::Refused(why)) if why == "uid 5 may not ask"
        ));
    }
}
