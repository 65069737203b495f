//! Devices given back after use (issue 13, item 3): a device detached with
//! `auto-return` goes back to its host driver once the last VM holding its
//! VFIO group has exited — reset first when it has a reset method, then
//! reattached, then verified — and every attempt ends in one
//! [`ReturnReport`] (returned, reset failed, driver did not bind).
//!
//! The directory `/dev/vfio` is watched with inotify, which reports opens
//! and closes of the group nodes in it (a VM's exit closes them too). An
//! open makes the service look for holders (a brief opener that is gone by
//! then does not count); each holder's exit is followed with a pidfd; a
//! close or an exit makes it look again, and when nobody holds the group
//! any more, its marked devices are given back. A VM that opens a node of
//! its own (libvirt makes one in the VM's private /dev; iommufd's cdev is
//! another node) is not seen by inotify: for those, groups nobody holds
//! are looked at again every [`RECHECK_INTERVAL`] while marked. That a VM
//! was seen holding a group is saved with its marks
//! ([`ReturnMark::InUse`]): a group found idle when the watch starts (the
//! service was not running when the VM exited) is given back then, while
//! one never used yet is waited on.
//! [`AutoReturn`] owns the watch and its task; `stop().await` returns when
//! the task has ended.

use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::passthrough::Passthrough;
use super::vfio::ReturnMark;
use super::vfio::iommu_group_of;
use vmmanager_client::PciAddress;

/// How often groups nobody was seen holding are looked at again, for the
/// opens inotify cannot see (see `Watch::recheck`).
pub const RECHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How one give-back ended. [`fmt::Display`] is the sentence for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnOutcome {
    /// Back on its driver (`None`: it had none, and is off VFIO).
    Returned { driver: Option<String> },
    /// The reset failed: it stays on vfio-pci, its driver remembered.
    ResetFailed { reason: String },
    /// Reattached, but its driver is not bound to it within the bound.
    DidNotBind {
        expected: String,
        actual: Option<String>,
        reason: String,
    },
    /// Anything else (it is no longer ours to give back, the reattach
    /// failed).
    Failed { reason: String },
}

impl ReturnOutcome {
    /// The outcome's name in the `ReturnFinished` signal.
    pub fn kind(&self) -> &'static str {
        match self {
            ReturnOutcome::Returned { .. } => "returned",
            ReturnOutcome::ResetFailed { .. } => "reset-failed",
            ReturnOutcome::DidNotBind { .. } => "driver-did-not-bind",
            ReturnOutcome::Failed { .. } => "failed",
        }
    }
}

impl fmt::Display for ReturnOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReturnOutcome::Returned { driver: Some(d) } => write!(f, "back on {d}"),
            ReturnOutcome::Returned { driver: None } => {
                f.write_str("off vfio-pci (it had no driver before)")
            }
            ReturnOutcome::ResetFailed { reason } => write!(
                f,
                "the reset failed, so it stays on vfio-pci: {reason}; `vmctl reattach` gives it back without one"
            ),
            ReturnOutcome::DidNotBind {
                expected,
                actual,
                reason,
            } => write!(
                f,
                "{expected} did not take it back ({reason}); it is on {}",
                actual.as_deref().unwrap_or("no driver")
            ),
            ReturnOutcome::Failed { reason } => write!(f, "it could not be given back: {reason}"),
        }
    }
}

/// One give-back: which device, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnReport {
    pub address: PciAddress,
    pub outcome: ReturnOutcome,
}

/// The watch over the groups of marked devices; owns its task.
pub struct AutoReturn {
    commands: mpsc::UnboundedSender<u32>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Asks an [`AutoReturn`] to watch a group; cheap to clone.
#[derive(Debug, Clone)]
pub struct Watcher(mpsc::UnboundedSender<u32>);

impl Watcher {
    /// Watches VFIO group `group` (again: harmless) for its last user.
    pub fn watch(&self, group: u32) {
        let _ = self.0.send(group);
    }
}

impl AutoReturn {
    /// Watches the groups of every device marked now, and those
    /// [`Watcher::watch`] adds; reports each give-back to `reports`.
    pub fn start(
        passthrough: Passthrough,
        dev_root: PathBuf,
        reports: mpsc::Sender<ReturnReport>,
    ) -> io::Result<AutoReturn> {
        let inotify = Inotify::new()?;
        let (commands, receiver) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let sysfs_root = passthrough.sysfs_root().to_owned();
        for address in passthrough.auto_return_marks() {
            if let Some(group) = iommu_group_of(&sysfs_root, address) {
                let _ = commands.send(group);
            }
        }
        let task = tokio::spawn(
            Watch {
                passthrough,
                dev_root,
                inotify,
                dir: None,
                groups: HashMap::new(),
                ended_unseen: Vec::new(),
                unsaved_uses: BTreeSet::new(),
                reports,
            }
            .run(receiver, cancel.clone()),
        );
        Ok(AutoReturn {
            commands,
            cancel,
            task,
        })
    }

    pub fn watcher(&self) -> Watcher {
        Watcher(self.commands.clone())
    }

    /// Ends the watch; returns once its task has (a give-back under way
    /// finishes first: it is sysfs writes that must not be cut short).
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::error!("the auto-return task failed: {e}");
        }
    }
}

/// One watched group.
struct Group {
    /// A holder was seen since the watch began: its last close counts.
    held: bool,
}

struct Watch {
    passthrough: Passthrough,
    dev_root: PathBuf,
    inotify: Inotify,
    /// The watch on `<dev>/vfio` (the directory: its children's opens and
    /// closes are reported with their names; a watch on a device node
    /// itself needs read access to the device, which the unit's device
    /// policy does not give).
    dir: Option<i32>,
    groups: HashMap<u32, Group>,
    /// Groups to look at at once, as if their last holder had just closed
    /// them (a use whose end the service did not see).
    ended_unseen: Vec<u32>,
    /// Groups a VM was seen holding whose use is not saved yet (a move
    /// held the binder): saved at the next event or re-check.
    unsaved_uses: BTreeSet<u32>,
    reports: mpsc::Sender<ReturnReport>,
}

impl Watch {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<u32>, cancel: CancellationToken) {
        let mut exits: FuturesUnordered<BoxFuture<'static, u32>> = FuturesUnordered::new();
        let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut found = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(group) = commands.recv() => self.watch(group).await,
                events = self.inotify.read() => match events {
                    Ok(events) => {
                        let mut found = Vec::new();
                        for (wd, mask, name) in events {
                            if mask & libc::IN_Q_OVERFLOW != 0 {
                                found.extend(self.overflowed().await);
                            } else {
                                found.extend(self.event(wd, mask, &name).await);
                            }
                        }
                        found
                    }
                    Err(e) => {
                        tracing::error!("auto-return: reading inotify events failed: {e}; stopped watching");
                        cancel.cancelled().await;
                        break;
                    }
                },
                Some(group) = exits.next() => self.closed(group).await,
                _ = recheck.tick() => self.recheck().await,
            };
            for group in std::mem::take(&mut self.unsaved_uses) {
                self.save_use(group);
            }
            // Taken once: a group queued again waits for the next event.
            for group in std::mem::take(&mut self.ended_unseen) {
                found.extend(self.ended_while_away(group).await);
            }
            for (group, pid) in found {
                exits.push(Box::pin(exited(pid, group)));
            }
        }
    }

    /// Starts watching `group`; the holders found, to follow their exits.
    async fn watch(&mut self, group: u32) -> Vec<(u32, u32)> {
        if self.groups.contains_key(&group) {
            return Vec::new();
        }
        let dir = self.dev_root.join("vfio");
        if self.dir.is_none() {
            let mask = libc::IN_OPEN
                | libc::IN_CLOSE_WRITE
                | libc::IN_CLOSE_NOWRITE
                | libc::IN_DELETE
                | libc::IN_ONLYDIR;
            match self.inotify.add_watch(&dir, mask) {
                Ok(wd) => self.dir = Some(wd),
                Err(e) => {
                    tracing::warn!(
                        group,
                        "cannot watch {}: {e}; its devices will not be given back after use",
                        dir.display()
                    );
                    return Vec::new();
                }
            }
        }
        let holders = self.holders(group).await;
        let used_before = self.use_saved(group);
        let held = holders.is_some();
        tracing::info!(
            group,
            held,
            used_before,
            "watching for the last user of {}/{group}",
            dir.display()
        );
        if seen(&holders) {
            self.save_use(group);
        } else if !held && used_before {
            // Its VM exited while nobody watched: given back now.
            self.ended_unseen.push(group);
        }
        self.groups.insert(
            group,
            Group {
                held: held || used_before,
            },
        );
        with_group(group, holders)
    }

    /// Saves that a VM holds `group` ([`ReturnMark::InUse`] for its marked
    /// devices) without waiting for a move under way: then later.
    fn save_use(&mut self, group: u32) {
        if !self.passthrough.try_set_in_use(&self.marked_in(group)) {
            self.unsaved_uses.insert(group);
        }
    }

    /// Whether a VM's use of `group` is saved with its marks
    /// ([`ReturnMark::InUse`]).
    fn use_saved(&self, group: u32) -> bool {
        self.marked_in(group)
            .iter()
            .any(|a| self.passthrough.return_mark(*a) == ReturnMark::InUse)
    }

    /// The devices of `group` marked to be given back after use.
    fn marked_in(&self, group: u32) -> Vec<PciAddress> {
        let sysfs_root = self.passthrough.sysfs_root();
        self.passthrough
            .auto_return_marks()
            .into_iter()
            .filter(|a| iommu_group_of(sysfs_root, *a) == Some(group))
            .collect()
    }

    async fn event(&mut self, wd: i32, mask: u32, name: &str) -> Vec<(u32, u32)> {
        if Some(wd) != self.dir {
            return Vec::new();
        }
        if mask & libc::IN_IGNORED != 0 {
            // The directory is gone (vfio unloaded): so are the groups.
            self.dir = None;
            self.groups.clear();
            return Vec::new();
        }
        let Some(group) = name
            .parse::<u32>()
            .ok()
            .filter(|g| self.groups.contains_key(g))
        else {
            return Vec::new();
        };
        if mask & libc::IN_DELETE != 0 {
            // The node is gone (the group left vfio-pci): nothing to wait for.
            self.groups.remove(&group);
            return Vec::new();
        }
        if mask & libc::IN_OPEN != 0 {
            return self.opened(group).await;
        }
        if mask & (libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE) != 0 {
            return self.closed(group).await;
        }
        Vec::new()
    }

    /// Someone opened the group (or may have): held once a holder shows.
    async fn opened(&mut self, group: u32) -> Vec<(u32, u32)> {
        if self.groups.get(&group).is_none_or(|g| g.held) {
            return Vec::new();
        }
        let holders = self.holders(group).await;
        if let Some(g) = self.groups.get_mut(&group) {
            g.held = holders.is_some();
        }
        if seen(&holders) {
            self.save_use(group);
        }
        with_group(group, holders)
    }

    /// A group whose use ended while the service was not running: given
    /// back as if its last holder had just closed it — unless a Detach
    /// since marked it afresh (its mark is no longer [`ReturnMark::InUse`]:
    /// the device was just asked for again, by a VM about to start).
    async fn ended_while_away(&mut self, group: u32) -> Vec<(u32, u32)> {
        if !self.use_saved(group) {
            if let Some(g) = self.groups.get_mut(&group) {
                g.held = false;
            }
            return Vec::new();
        }
        self.closed(group).await
    }

    /// A holder closed the group or exited: given back when nobody is left.
    async fn closed(&mut self, group: u32) -> Vec<(u32, u32)> {
        if !self.groups.get(&group).is_some_and(|g| g.held) {
            return Vec::new();
        }
        if let Some(holders) = self.holders(group).await {
            return with_group(group, Some(holders));
        }
        self.groups.remove(&group);
        self.give_back(group).await
    }

    /// The fallback for opens inotify does not see — a VM whose /dev is
    /// its own (libvirt's namespace makes its own node, another inode), or
    /// one using iommufd's cdev: every [`RECHECK_INTERVAL`], each watched
    /// group nobody was seen holding is looked at. (Exits are followed by
    /// pidfd, so only the start of such a use waits for this.)
    async fn recheck(&mut self) -> Vec<(u32, u32)> {
        let idle: Vec<u32> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.held)
            .map(|(group, _)| *group)
            .collect();
        let mut found = Vec::new();
        for group in idle {
            found.extend(self.opened(group).await);
        }
        found
    }

    /// Events were lost (the kernel's queue overflowed: someone opened and
    /// closed group nodes very often): look at every watched group again,
    /// as if each had been opened and closed.
    async fn overflowed(&mut self) -> Vec<(u32, u32)> {
        tracing::warn!("auto-return: inotify events were lost; looking at every watched group");
        let groups: Vec<u32> = self.groups.keys().copied().collect();
        let mut found = Vec::new();
        for group in groups {
            found.extend(self.opened(group).await);
            found.extend(self.closed(group).await);
        }
        found
    }

    /// The PIDs holding the group, `None` when nobody does; unknown counts
    /// as held, with no PID to follow (never give a device back from under
    /// a VM).
    async fn holders(&self, group: u32) -> Option<Vec<u32>> {
        let sysfs_root = self.passthrough.sysfs_root();
        let member = super::sysfs::iommu_group_members(sysfs_root, group)
            .into_iter()
            .next()?;
        match self.passthrough.group_users(member, group).await {
            Ok(users) if users.is_empty() => None,
            Ok(users) => Some(users.iter().map(|u| u.pid).collect()),
            Err(e) => {
                tracing::warn!(group, "auto-return: {e}; taken as still in use");
                Some(Vec::new())
            }
        }
    }

    async fn give_back(&mut self, group: u32) -> Vec<(u32, u32)> {
        for address in self.marked_in(group) {
            let Some(outcome) = self
                .passthrough
                .give_back_after_use(address, Some(group))
                .await
            else {
                continue;
            };
            match &outcome {
                ReturnOutcome::Returned { .. } => {
                    tracing::info!(device = %address, "given back after use: {outcome}")
                }
                _ => tracing::warn!(device = %address, "giving back after use failed: {outcome}"),
            }
            let _ = self.reports.send(ReturnReport { address, outcome }).await;
        }
        // Not given back (a VM holds the group again): keep watching.
        if !self.marked_in(group).is_empty() {
            return self.watch(group).await;
        }
        Vec::new()
    }
}

/// Whether `holders` (from `Watch::holders`) names a process: only a
/// holder seen counts as a VM's use; unknown (a failed look, `Some` and
/// empty) keeps the device but is not saved as a use.
fn seen(holders: &Option<Vec<u32>>) -> bool {
    holders.as_ref().is_some_and(|pids| !pids.is_empty())
}

/// (group, pid) for each of `holders`.
fn with_group(group: u32, holders: Option<Vec<u32>>) -> Vec<(u32, u32)> {
    holders
        .unwrap_or_default()
        .into_iter()
        .map(|pid| (group, pid))
        .collect()
}

/// Resolves to `group` when process `pid` has exited (its pidfd becomes
/// readable), or at once when it cannot be followed (gone already, or no
/// pidfd: the close path looks again and finds out).
async fn exited(pid: u32, group: u32) -> u32 {
    // SAFETY: a plain system call; the descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return group;
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd stays open, the same descriptor, while registered.
    let Ok(registered) = (unsafe { AsyncFd::register(fd) }) else {
        return group;
    };
    let _ = registered.readable().await;
    group
}

/// A non-blocking inotify descriptor on the runtime.
struct Inotify(AsyncFd<OwnedFd>);

impl Inotify {
    fn new() -> io::Result<Inotify> {
        // SAFETY: no pointers; the descriptor is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd stays open, and the same descriptor, for as
        // long as the AsyncFd owns it.
        let registered = unsafe { AsyncFd::register(fd) };
        Ok(Inotify(registered.map_err(io::Error::from)?))
    }

    fn add_watch(&self, path: &std::path::Path, mask: u32) -> io::Result<i32> {
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.0.get_ref().as_raw_fd(),
                path.as_ptr(),
                mask | libc::IN_DONT_FOLLOW,
            )
        };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// The next batch of events: (watch descriptor, mask, name) each.
    async fn read(&self) -> io::Result<Vec<(i32, u32, String)>> {
        let mut buffer = [0u8; 4096];
        loop {
            let mut guard = self.0.readable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: reads into a buffer of the given length.
                let n = unsafe {
                    libc::read(
                        fd.get_ref().as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                    )
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            let n = match result {
                Ok(n) => n?,
                Err(_would_block) => continue,
            };
            return Ok(parse_events(&buffer[..n]));
        }
    }
}

/// `struct inotify_event`s: wd (i32), mask (u32), cookie (u32), len (u32),
/// then `len` bytes of name, NUL-padded; (wd, mask, name) each.
fn parse_events(mut bytes: &[u8]) -> Vec<(i32, u32, String)> {
    const HEADER: usize = 16;
    let mut events = Vec::new();
    while bytes.len() >= HEADER {
        let word = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
        let name = bytes.get(HEADER..HEADER + len).unwrap_or_default();
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        events.push((wd, mask, String::from_utf8_lossy(name).into_owned()));
        bytes = bytes.get(HEADER + len..).unwrap_or_default();
    }
    events
}
