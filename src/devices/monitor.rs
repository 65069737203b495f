//! The udev netlink monitor on its own thread, with a clean stop.
//!
//! [`DeviceMonitor::start`] subscribes to PCI uevents (kernel or udev
//! netlink group) *before* it returns, so the caller can enumerate sysfs
//! afterwards without missing anything (monitor before enumerate). The
//! thread turns every uevent into a [`MonitorMessage::Event`] and every
//! receive error (above all `ENOBUFS`: the kernel dropped events because the
//! socket buffer was full) into a [`MonitorMessage::Resync`], and keeps
//! listening until it is stopped — unlike libvirt's event thread, which
//! returns on any error but `EAGAIN`, or USBGuard, which stops after
//! `ENOBUFS`.
//!
//! The udev types are `!Send`, so they are created, used and dropped on the
//! monitor's own thread. The thread waits in `poll()` on the netlink socket
//! and an eventfd; [`DeviceMonitor::stop`] writes the eventfd and joins the
//! thread, so when it returns the thread is gone, its socket is closed and
//! nothing more is sent.
//!
//! # How `ENOBUFS` surfaces
//! libudev's `udev_monitor_receive_device` returns NULL and sets `errno`
//! both when the socket is simply drained (`EAGAIN`) and when `recvmsg`
//! failed (`ENOBUFS` after an overflow, reported once by the kernel and then
//! cleared). The udev crate's iterator maps NULL to `None` and drops errno,
//! so errno is cleared right before the call and read right after `None`:
//! `EAGAIN` means drained, anything else (including a NULL without errno)
//! means events may be lost.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::{self, error::TrySendError};

use super::{DeviceAction, DeviceEvent, MonitorMessage};
use vmmanager_client::PciAddress;

/// Receive buffer requested by default: 128 MiB, what systemd-udevd uses, so
/// a burst of uevents (e.g. creating many SR-IOV VFs) does not overflow.
pub const DEFAULT_RECEIVE_BUFFER: usize = 128 * 1024 * 1024;

/// udevd's control socket. libudev itself refuses to subscribe to the udev
/// group when this path does not exist ("The udev service seems not to be
/// active, disabling the monitor"): the socket would silently receive
/// nothing, even after udevd starts later.
pub const UDEVD_CONTROL_SOCKET: &str = "/run/udev/control";

/// Name of the monitor thread (visible in `/proc/self/task/*/comm`).
pub const THREAD_NAME: &str = "device-monitor";

/// Events handled per wake-up before the stop signal is looked at again.
const MAX_BATCH: usize = 256;
/// How often a full channel is retried while waiting for the stop signal.
const BACKPRESSURE_RETRY: Duration = Duration::from_millis(5);
/// Upper bound of the pause after repeated receive errors in a row.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Which netlink multicast group the monitor listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventGroup {
    /// The kernel's own uevents: always there, but without hwdb names.
    Kernel,
    /// udevd's rebroadcast after its rules ran: with hwdb names
    /// (`ID_VENDOR_FROM_DATABASE`, …). Needs a running udevd.
    Udev,
}

impl EventGroup {
    /// The group name libudev expects.
    fn netlink_name(self) -> &'static str {
        match self {
            EventGroup::Kernel => "kernel",
            EventGroup::Udev => "udev",
        }
    }
}

impl fmt::Display for EventGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.netlink_name())
    }
}

/// [`EventGroup::Udev`] when udevd runs, else [`EventGroup::Kernel`].
///
/// "udevd runs" means its control socket [`UDEVD_CONTROL_SOCKET`] exists —
/// the very check libudev makes before it agrees to join the udev group.
pub fn detect_group() -> EventGroup {
    detect_group_at(Path::new(UDEVD_CONTROL_SOCKET))
}

/// [`detect_group`] with the control socket's path as a parameter.
pub fn detect_group_at(control_socket: &Path) -> EventGroup {
    if control_socket.exists() {
        EventGroup::Udev
    } else {
        EventGroup::Kernel
    }
}

/// How to start a [`DeviceMonitor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorOptions {
    pub group: EventGroup,
    /// udevd's control socket ([`UDEVD_CONTROL_SOCKET`] on a real host):
    /// [`EventGroup::Udev`] is refused when it does not exist. A parameter
    /// so tests can ask about a udevd that surely is not there, whether or
    /// not the host runs one.
    pub control_socket: PathBuf,
    /// Requested socket receive buffer in bytes. Set with `SO_RCVBUFFORCE`
    /// (ignores `net.core.rmem_max`, needs `CAP_NET_ADMIN`), else
    /// `SO_RCVBUF` (capped at `rmem_max`). The kernel doubles the value and
    /// enforces a minimum of a few KiB.
    pub receive_buffer: usize,
}

impl MonitorOptions {
    /// `group` with the default receive buffer.
    pub fn new(group: EventGroup) -> Self {
        MonitorOptions {
            group,
            control_socket: PathBuf::from(UDEVD_CONTROL_SOCKET),
            receive_buffer: DEFAULT_RECEIVE_BUFFER,
        }
    }

    /// The detected group ([`detect_group`]) with the default receive buffer.
    pub fn detected() -> Self {
        Self::new(detect_group())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot create the monitor's wake-up eventfd: {0}")]
    WakeFd(#[source] io::Error),
    #[error("cannot start the device monitor thread: {0}")]
    Spawn(#[source] io::Error),
    #[error(
        "udevd does not seem to run ({} is missing), so the udev event group would stay silent; \
         start udevd or use the kernel group",
        control.display()
    )]
    UdevdNotRunning { control: PathBuf },
    #[error("cannot subscribe to {group} uevents: {source}")]
    Subscribe {
        group: EventGroup,
        #[source]
        source: io::Error,
    },
    #[error("the device monitor thread ended before it subscribed")]
    ThreadDied,
}

/// A running monitor thread. Owns the thread and every fd it uses.
///
/// Stop it with [`stop`](Self::stop) (async) or
/// [`stop_blocking`](Self::stop_blocking). Dropping it without either also
/// stops and joins the thread, blocking the dropping thread for that long
/// (normally well under a millisecond: the thread never blocks on anything
/// but its `poll()`, which the stop signal interrupts).
pub struct DeviceMonitor {
    /// eventfd the thread polls; written once to stop it. Shared so the fd
    /// outlives the thread; the last reference closes it.
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    group: EventGroup,
    receive_buffer: usize,
}

impl fmt::Debug for DeviceMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceMonitor")
            .field("group", &self.group)
            .field("receive_buffer", &self.receive_buffer)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl DeviceMonitor {
    /// Starts the monitor thread and returns once it has subscribed (the
    /// netlink socket is bound and filtered to the `pci` subsystem), or with
    /// the reason it could not. Blocks the caller for that short while.
    ///
    /// Messages go to `sender`; when the channel is full the thread waits
    /// (and the kernel buffers, then drops and reports `ENOBUFS`, which
    /// becomes a `Resync`). When the receiver is dropped, the thread idles
    /// until stopped.
    pub fn start(
        options: MonitorOptions,
        sender: mpsc::Sender<MonitorMessage>,
    ) -> Result<DeviceMonitor, MonitorError> {
        if options.group == EventGroup::Udev
            && detect_group_at(&options.control_socket) != EventGroup::Udev
        {
            return Err(MonitorError::UdevdNotRunning {
                control: options.control_socket,
            });
        }
        let wake = Arc::new(new_eventfd().map_err(MonitorError::WakeFd)?);
        let (ready_tx, ready_rx) = std_mpsc::sync_channel(1);
        let thread_wake = wake.clone();
        let group = options.group;
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || thread_main(options, thread_wake, sender, ready_tx))
            .map_err(MonitorError::Spawn)?;
        match ready_rx.recv() {
            Ok(Ok(receive_buffer)) => Ok(DeviceMonitor {
                wake,
                thread: Some(thread),
                group,
                receive_buffer,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread panicked before it reported.
            Err(_) => {
                let _ = thread.join();
                Err(MonitorError::ThreadDied)
            }
        }
    }

    /// The group this monitor listens to.
    pub fn group(&self) -> EventGroup {
        self.group
    }

    /// The socket's receive buffer as the kernel reports it (`SO_RCVBUF`,
    /// i.e. twice the effective request), in bytes.
    pub fn receive_buffer(&self) -> usize {
        self.receive_buffer
    }

    /// Stops the thread and returns after it has exited and closed its
    /// socket; the eventfd is closed when this returns. Nothing is sent
    /// after that. The join runs on Tokio's blocking pool when called
    /// inside a runtime, else on the calling thread.
    pub async fn stop(mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.signal();
        if tokio::runtime::Handle::try_current().is_err() {
            join(thread);
            return;
        }
        if let Err(e) = tokio::task::spawn_blocking(move || join(thread)).await {
            // Only when the runtime shuts down under us; the join then
            // still finishes on the blocking pool.
            tracing::error!("joining the device monitor thread failed: {e}");
        }
    }

    /// [`stop`](Self::stop) for synchronous callers.
    pub fn stop_blocking(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.signal();
            join(thread);
        }
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd this handle
        // owns (kept open by the Arc).
        let n = unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        // Only fails (EAGAIN) if the counter would overflow, which needs
        // 2^64 stops; the thread is woken in any case.
        if n < 0 {
            tracing::warn!(
                "waking the device monitor thread: {}",
                io::Error::last_os_error()
            );
        }
    }
}

impl Drop for DeviceMonitor {
    /// Stops and joins the thread (blocking) if nobody called `stop`.
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        tracing::error!("the device monitor thread panicked");
    }
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The thread: subscribe, report, then loop until stopped.
fn thread_main(
    options: MonitorOptions,
    wake: Arc<OwnedFd>,
    sender: mpsc::Sender<MonitorMessage>,
    ready: std_mpsc::SyncSender<Result<usize, MonitorError>>,
) {
    let socket = match subscribe(&options) {
        Ok(socket) => socket,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let receive_buffer = socket_receive_buffer(socket.as_raw_fd()).unwrap_or(0);
    tracing::debug!(
        group = %options.group,
        receive_buffer,
        "device monitor subscribed"
    );
    if ready.send(Ok(receive_buffer)).is_err() {
        return;
    }
    drop(ready);
    Worker {
        socket,
        wake,
        sender,
        resync_pending: false,
        receiver_gone: false,
        errors_in_a_row: 0,
    }
    .run();
}

fn subscribe(options: &MonitorOptions) -> Result<udev::MonitorSocket, MonitorError> {
    let group = options.group;
    let fail = |source| MonitorError::Subscribe { group, source };
    let builder = match group {
        EventGroup::Kernel => udev::MonitorBuilder::new_kernel(),
        EventGroup::Udev => udev::MonitorBuilder::new(),
    }
    .map_err(fail)?
    .match_subsystem("pci")
    .map_err(fail)?;
    set_receive_buffer(builder.as_raw_fd(), options.receive_buffer);
    builder.listen().map_err(fail)
}

/// Best effort: a smaller buffer only makes `ENOBUFS` (and resyncs) likelier.
fn set_receive_buffer(fd: RawFd, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if let Err(force) = setsockopt_int(fd, libc::SO_RCVBUFFORCE, value) {
        // Not root / no CAP_NET_ADMIN: the plain option, capped at rmem_max.
        if let Err(plain) = setsockopt_int(fd, libc::SO_RCVBUF, value) {
            tracing::warn!(
                "cannot set the uevent socket's receive buffer to {bytes} bytes: \
                 SO_RCVBUFFORCE: {force}; SO_RCVBUF: {plain}"
            );
        }
    }
}

fn setsockopt_int(fd: RawFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn socket_receive_buffer(fd: RawFd) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals of the sizes the kernel expects.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(value).unwrap_or(0))
}

/// Whether the thread goes on or was told to stop.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

struct Worker {
    socket: udev::MonitorSocket,
    wake: Arc<OwnedFd>,
    sender: mpsc::Sender<MonitorMessage>,
    /// Events were lost and no Resync has been queued since: coalesces a
    /// run of errors into one Resync.
    resync_pending: bool,
    /// The receiver was dropped: nothing to deliver, wait for the stop.
    receiver_gone: bool,
    errors_in_a_row: u32,
}

impl Worker {
    fn run(mut self) {
        let socket_fd = self.socket.as_raw_fd();
        let wake_fd = self.wake.as_raw_fd();
        loop {
            if self.receiver_gone {
                // Nobody listens; do not spin on a readable socket.
                if self.wait_for_stop(None) == Flow::Stop {
                    return;
                }
                continue;
            }
            let mut fds = [pollfd(wake_fd), pollfd(socket_fd)];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Should not happen (EINVAL/ENOMEM); keep going, slowly.
                    tracing::error!("poll on the uevent socket failed: {e}");
                    if self.wait_for_stop(Some(MAX_ERROR_BACKOFF)) == Flow::Stop {
                        return;
                    }
                    continue;
                }
            }
            // The stop signal wins over pending events.
            if fds[0].revents != 0 {
                return;
            }
            // POLLERR counts too: a pending ENOBUFS is reported that way.
            if fds[1].revents != 0 && self.drain() == Flow::Stop {
                return;
            }
        }
    }

    /// Receives what is queued (up to a batch), then queues a pending Resync.
    fn drain(&mut self) -> Flow {
        for _ in 0..MAX_BATCH {
            match self.receive() {
                Received::Event(event) => {
                    self.errors_in_a_row = 0;
                    if let Some(event) = event
                        && self.deliver(MonitorMessage::Event(event)) == Flow::Stop
                    {
                        return Flow::Stop;
                    }
                }
                Received::Drained => break,
                Received::Interrupted => continue,
                Received::Error(e) => {
                    self.errors_in_a_row += 1;
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        tracing::warn!(
                            "uevents were lost: the socket's receive buffer overflowed \
                             (ENOBUFS); asking for a resync"
                        );
                    } else {
                        tracing::warn!("receiving a uevent failed: {e}; asking for a resync");
                    }
                    self.resync_pending = true;
                    // One error (ENOBUFS) is normal; a run of them means the
                    // socket keeps failing: do not spin.
                    if self.errors_in_a_row > 1 {
                        let pause = Duration::from_millis(10)
                            .saturating_mul(self.errors_in_a_row)
                            .min(MAX_ERROR_BACKOFF);
                        if self.wait_for_stop(Some(pause)) == Flow::Stop {
                            return Flow::Stop;
                        }
                    }
                }
            }
        }
        self.flush_resync()
    }

    fn receive(&mut self) -> Received {
        clear_errno();
        // Nothing between the FFI call inside `next` and `last_os_error`
        // touches errno: `next` only checks the pointer.
        let event = self.socket.iter().next();
        let Some(event) = event else {
            let error = io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EAGAIN) => Received::Drained,
                Some(libc::EINTR) => Received::Interrupted,
                Some(0) | None => Received::Error(io::Error::other(
                    "libudev returned no device and no error code",
                )),
                Some(_) => Received::Error(error),
            };
        };
        let converted = convert(
            event.action(),
            event.property_value("PCI_SLOT_NAME"),
            event.sysname(),
            event.property_value("ID_VENDOR_FROM_DATABASE"),
            event.property_value("ID_MODEL_FROM_DATABASE"),
        );
        match converted {
            Ok(event) => Received::Event(Some(event)),
            Err(e) => {
                tracing::debug!("ignoring a uevent for {}: {e}", event.syspath().display());
                Received::Event(None)
            }
        }
    }

    fn flush_resync(&mut self) -> Flow {
        if self.resync_pending {
            self.resync_pending = false;
            return self.send(MonitorMessage::Resync);
        }
        Flow::Continue
    }

    /// Sends a pending Resync first, then `message`.
    fn deliver(&mut self, message: MonitorMessage) -> Flow {
        if self.flush_resync() == Flow::Stop {
            return Flow::Stop;
        }
        self.send(message)
    }

    /// Sends without ever blocking past a stop: while the channel is full,
    /// retries in short steps and watches the stop signal in between.
    fn send(&mut self, mut message: MonitorMessage) -> Flow {
        if self.receiver_gone {
            return Flow::Continue;
        }
        loop {
            match self.sender.try_send(message) {
                Ok(()) => return Flow::Continue,
                Err(TrySendError::Closed(_)) => {
                    tracing::warn!("the device event receiver is gone; idling until stopped");
                    self.receiver_gone = true;
                    return Flow::Continue;
                }
                Err(TrySendError::Full(back)) => {
                    message = back;
                    if self.wait_for_stop(Some(BACKPRESSURE_RETRY)) == Flow::Stop {
                        return Flow::Stop;
                    }
                }
            }
        }
    }

    /// Waits up to `timeout` (forever with `None`) for the stop signal.
    fn wait_for_stop(&self, timeout: Option<Duration>) -> Flow {
        let mut fds = [pollfd(self.wake.as_raw_fd())];
        match poll(&mut fds, timeout) {
            Ok(_) if fds[0].revents != 0 => Flow::Stop,
            Ok(_) => Flow::Continue,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("poll on the monitor's eventfd failed: {e}");
                    // Avoid a hot loop if poll keeps failing.
                    std::thread::sleep(BACKPRESSURE_RETRY);
                }
                Flow::Continue
            }
        }
    }
}

enum Received {
    /// One uevent; `None` when it was not about a PCI device we understand.
    Event(Option<DeviceEvent>),
    /// Nothing more queued (EAGAIN).
    Drained,
    Interrupted,
    /// Receive failed: events may be lost.
    Error(io::Error),
}

fn clear_errno() {
    // SAFETY: __errno_location returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() = 0 };
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let timeout_ms = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
    };
    // SAFETY: fds is a live, exclusively borrowed slice of pollfd and its
    // length is passed with it.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Why a uevent did not become a [`DeviceEvent`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("the uevent has no ACTION")]
    NoAction,
    #[error("no PCI address in PCI_SLOT_NAME or the device name: {0:?}")]
    BadAddress(String),
}

/// Builds a [`DeviceEvent`] from a uevent's fields: the action, the address
/// from `PCI_SLOT_NAME` (else the sysfs name, which is the same for PCI
/// devices), and the hwdb names when udevd added them (empty names count as
/// absent).
pub fn convert(
    action: Option<&OsStr>,
    slot_name: Option<&OsStr>,
    sysname: &OsStr,
    vendor_name: Option<&OsStr>,
    device_name: Option<&OsStr>,
) -> Result<DeviceEvent, ConvertError> {
    let action = match action.map(OsStr::to_string_lossy).as_deref() {
        None | Some("") => return Err(ConvertError::NoAction),
        Some("add") => DeviceAction::Add,
        Some("remove") => DeviceAction::Remove,
        Some("change") => DeviceAction::Change,
        Some("bind") => DeviceAction::Bind,
        Some("unbind") => DeviceAction::Unbind,
        Some(other) => DeviceAction::Other(other.to_owned()),
    };
    let text = slot_name.unwrap_or(sysname).to_string_lossy();
    let address = text
        .parse::<PciAddress>()
        .map_err(|_| ConvertError::BadAddress(text.into_owned()))?;
    let name = |value: Option<&OsStr>| {
        value
            .map(|v| v.to_string_lossy().trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    Ok(DeviceEvent {
        action,
        address,
        vendor_name: name(vendor_name),
        device_name: name(device_name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn detects_group_from_control_socket() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control");
        assert_eq!(detect_group_at(&control), EventGroup::Kernel);
        std::fs::write(&control, b"").unwrap();
        assert_eq!(detect_group_at(&control), EventGroup::Udev);
    }

    #[test]
    fn converts_actions_and_names() {
        let e = convert(
            os("change"),
            os("0000:03:00.0"),
            OsStr::new("0000:03:00.0"),
            os("Intel Corporation"),
            os(" "),
        )
        .unwrap();
        assert_eq!(e.action, DeviceAction::Change);
        assert_eq!(e.address.to_string(), "0000:03:00.0");
        assert_eq!(e.vendor_name.as_deref(), Some("Intel Corporation"));
        assert_eq!(e.device_name, None);
        for (text, action) in [
            ("add", DeviceAction::Add),
            ("remove", DeviceAction::Remove),
            ("bind", DeviceAction::Bind),
            ("unbind", DeviceAction::Unbind),
            ("move", DeviceAction::Other("move".into())),
        ] {
            let e = convert(os(text), None, OsStr::new("0000:00:1f.3"), None, None).unwrap();
            assert_eq!(e.action, action);
            assert_eq!(e.address.to_string(), "0000:00:1f.3");
        }
    }

    #[test]
    fn rejects_events_without_action_or_address() {
        let sysname = OsStr::new("0000:00:01.0");
        assert_eq!(
            convert(None, None, sysname, None, None),
            Err(ConvertError::NoAction)
        );
        assert_eq!(
            convert(os("add"), None, OsStr::new("pci0000:00"), None, None),
            Err(ConvertError::BadAddress("pci0000:00".into()))
        );
    }

    #[test]
    fn group_names() {
        assert_eq!(EventGroup::Kernel.to_string(), "kernel");
        assert_eq!(EventGroup::Udev.to_string(), "udev");
    }
}
