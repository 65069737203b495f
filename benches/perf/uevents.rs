//! From `echo change > /sys/bus/pci/devices/X/uevent` to the service's
//! `Uevent` signal, against `udevadm monitor --kernel` seeing the same
//! event: single events one at a time, then a burst.
//!
//! The only thing done to the device is writing `change` to its uevent
//! file, as the integration tests do (`tests/device_monitor.rs`): the
//! kernel announces the device again and nothing else happens. Never
//! unbind, remove or rescan. The device is the one the tests use
//! ([`udevd::device`]), and [`UDEVD_LOCK`] is held throughout, so no test's
//! udevd runs (and gets flooded) meanwhile.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::runtime::Runtime;
use vmmanager_client::{PciAddress, PciDeviceProxy};
use zbus::message::Type;
use zbus::{MatchRule, MessageStream};

use crate::Mode;
use crate::common::udevd::{self, FileLock, UDEVD_LOCK, write_change};
use crate::common::util::ChildGuard;
use crate::common::{Daemon, DaemonConfig, TestBus};
use crate::report::{Condition, Figure, Group, Unit, millis};

/// How long one event may take before it counts as lost.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A burst is over when nothing arrived for this long.
const QUIET: Duration = Duration::from_secs(3);
/// What the daemon logs when the socket overflowed and it resyncs.
const RESYNC_LOG: &str = "asking for a resync";

/// Who saw an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Signal,
    Udevadm,
}

pub fn group(mode: Mode, rt: &Runtime) -> Group {
    eprintln!("uevents: taking {UDEVD_LOCK} (waits while a test runs udevd)");
    let _lock = FileLock::exclusive(UDEVD_LOCK);
    let address = udevd::device();
    let bus = TestBus::start();
    let daemon = Daemon::start(&bus, &DaemonConfig::default());
    let (seen_tx, seen) = mpsc::channel();
    let _udevadm = watch_udevadm(&address, seen_tx.clone());
    watch_signals(rt, &bus, &address, seen_tx);
    wait_until_both_listen(&address, &seen);

    let singles = mode.pick(1_000, 100);
    let (signal, udevadm) = single_events(&address, &seen, singles);
    let trips = signal_trips(rt, &bus, singles);

    let burst = mode.pick(10_000, 1_000);
    let log_before = daemon.output().matches(RESYNC_LOG).count();
    let outcome = burst_of(&address, &seen, burst);
    let resyncs = daemon.output().matches(RESYNC_LOG).count() - log_before;
    let accounted = outcome.signals >= burst || resyncs > 0;
    assert!(
        accounted,
        "a burst of {burst} change events on {address}: only {} Uevent signals and no resync \
         (daemon output:\n{})",
        outcome.signals,
        daemon.output()
    );

    Group {
        name: "uevents",
        title: "Uevent → D-Bus `Uevent` signal against `udevadm monitor --kernel`",
        figures: vec![
            Figure::new(
                format!("`Uevent` signal after `change` on {address}, single events"),
                Unit::Millis,
                signal,
            )
            .against("`udevadm monitor --kernel` sees the same event", udevadm)
            .target(Condition::P99AtMost(5.0))
            .target(Condition::RatioAtMost(2.0)),
            Figure::new(
                "floor to add to udevadm's: a signal from one client to another through the bus",
                Unit::Millis,
                trips,
            )
            .note(
                "emit to receipt, one at a time, on the same dbus-daemon as the `Uevent` signals",
            ),
            Figure::new(
                format!("burst of {burst}: last `Uevent` signal after the first write"),
                Unit::Millis,
                vec![outcome.last_signal],
            )
            .against(
                "udevadm's last event after the first write",
                vec![outcome.last_udevadm],
            )
            .target(Condition::RatioAtMost(1.3))
            .target(Condition::Holds {
                what: "fully accounted for",
                holds: accounted,
            })
            .note(format!(
                "{burst} writes took {:.0} ms; {} `Uevent` signals, udevadm saw {}, \
                 the daemon resynced {resyncs} times",
                outcome.writing, outcome.signals, outcome.udevadm
            )),
        ],
    }
}

/// How long each of `n` empty signals takes from one connection's emit to
/// another's receipt: what any D-Bus signal costs on top of the event.
fn signal_trips(rt: &Runtime, bus: &TestBus, n: usize) -> Vec<f64> {
    const INTERFACE: &str = "org.example.VmManagerBench";
    rt.block_on(async {
        let (sender, receiver) = (bus.connect().await, bus.connect().await);
        let rule = MatchRule::builder()
            .msg_type(Type::Signal)
            .interface(INTERFACE)
            .build()
            .expect("a match rule for the bench's signal");
        let mut received = MessageStream::for_match_rule(rule, &receiver, None)
            .await
            .expect("subscribe to the bench's signal");
        let mut trips = Vec::with_capacity(n);
        for _ in 0..n {
            let sent = Instant::now();
            sender
                .emit_signal(None::<()>, "/", INTERFACE, "Tick", &())
                .await
                .expect("emit a signal");
            tokio::time::timeout(EVENT_TIMEOUT, received.next())
                .await
                .expect("the signal within the event timeout")
                .expect("the stream open")
                .expect("a valid message");
            trips.push(millis(sent.elapsed()));
        }
        trips
    })
}

/// `udevadm monitor --kernel` for PCI, reporting each `change` of
/// `address` as it reads the line (udevadm flushes every event).
fn watch_udevadm(address: &PciAddress, seen: Sender<(Seen, Instant)>) -> ChildGuard {
    let mut child = Command::new("udevadm")
        .args(["monitor", "--kernel", "--subsystem-match=pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn udevadm monitor");
    let stdout = child.stdout.take().expect("piped stdout");
    // `KERNEL[21194.712175] change   /devices/pci0000:00/0000:00:05.0 (pci)`
    let suffix = format!("/{address} (pci)");
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(" change ") && line.ends_with(&suffix) {
                let _ = seen.send((Seen::Udevadm, Instant::now()));
            }
        }
    });
    ChildGuard::new(child, "udevadm monitor")
}

/// Reports each `Uevent("change")` of the device's object as it arrives;
/// subscribed before this returns. The task ends with the runtime.
fn watch_signals(rt: &Runtime, bus: &TestBus, address: &PciAddress, seen: Sender<(Seen, Instant)>) {
    let mut uevents = rt.block_on(async {
        let connection = bus.connect().await;
        let device = PciDeviceProxy::builder(&connection)
            .path(address.object_path())
            .build()
            .await
            .expect("device proxy");
        device.receive_uevent().await.expect("subscribe to Uevent")
    });
    rt.spawn(async move {
        while let Some(signal) = uevents.next().await {
            let at = Instant::now();
            let action = signal.args().map(|a| a.action.clone()).unwrap_or_default();
            if action == "change" && seen.send((Seen::Signal, at)).is_err() {
                break;
            }
        }
    });
}

/// Writes changes until both watchers have seen one, then lets stragglers
/// arrive and drops them.
fn wait_until_both_listen(address: &PciAddress, seen: &Receiver<(Seen, Instant)>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut signal, mut udevadm) = (false, false);
    while !(signal && udevadm) {
        assert!(
            Instant::now() < deadline,
            "no Uevent signal or udevadm event within 30 s"
        );
        write_change(address);
        while let Ok((who, _)) = seen.recv_timeout(Duration::from_millis(100)) {
            signal |= who == Seen::Signal;
            udevadm |= who == Seen::Udevadm;
        }
    }
    drain(seen, Duration::from_millis(300));
}

fn drain(seen: &Receiver<(Seen, Instant)>, quiet: Duration) {
    while seen.recv_timeout(quiet).is_ok() {}
}

/// `n` events one at a time: each write waits for both watchers.
fn single_events(
    address: &PciAddress,
    seen: &Receiver<(Seen, Instant)>,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut signal, mut udevadm) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        // Leftovers (another process's change of the same device) would
        // otherwise count for this write.
        while seen.try_recv().is_ok() {}
        let start = Instant::now();
        write_change(address);
        let (mut s, mut u) = (None, None);
        while s.is_none() || u.is_none() {
            match seen.recv_timeout(EVENT_TIMEOUT) {
                Ok((Seen::Signal, at)) => s = s.or(Some(at)),
                Ok((Seen::Udevadm, at)) => u = u.or(Some(at)),
                Err(_) => panic!(
                    "event {i}: no {} within {EVENT_TIMEOUT:?} of writing change",
                    if s.is_none() {
                        "Uevent signal"
                    } else {
                        "udevadm line"
                    }
                ),
            }
        }
        signal.push(millis(s.unwrap() - start));
        udevadm.push(millis(u.unwrap() - start));
    }
    (signal, udevadm)
}

struct Burst {
    /// ms from the first write to the last write's return.
    writing: f64,
    /// ms from the first write to the last signal and udevadm line.
    last_signal: f64,
    last_udevadm: f64,
    signals: usize,
    udevadm: usize,
}

/// `n` writes as fast as they go, then everything that arrives until both
/// watchers have seen `n` events or all is quiet for [`QUIET`].
fn burst_of(address: &PciAddress, seen: &Receiver<(Seen, Instant)>, n: usize) -> Burst {
    while seen.try_recv().is_ok() {}
    let start = Instant::now();
    for _ in 0..n {
        write_change(address);
    }
    let writing = millis(start.elapsed());
    let (mut signals, mut udevadm) = (0, 0);
    let (mut last_signal, mut last_udevadm) = (start, start);
    while signals < n || udevadm < n {
        match seen.recv_timeout(QUIET) {
            Ok((Seen::Signal, at)) => (signals, last_signal) = (signals + 1, at),
            Ok((Seen::Udevadm, at)) => (udevadm, last_udevadm) = (udevadm + 1, at),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => panic!("both watchers ended"),
        }
    }
    Burst {
        writing,
        last_signal: millis(last_signal - start),
        last_udevadm: millis(last_udevadm - start),
        signals,
        udevadm,
    }
}
