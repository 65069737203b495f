//! A user with no rights cannot lock everyone out of polkit (security
//! review, HIGH): real bus, polkitd, daemon, vmctl and qemu-img.
//!
//! The service asks polkit over its one bus connection, and dbus-daemon lets
//! a connection wait for at most 128 replies (`max_replies_per_connection`).
//! An attacker whose polkit agent never answers makes polkitd hold every
//! interactive check it asks for; ~130 of them used to make every other
//! caller, root included, `NotAuthorized` (LimitsExceeded), and the
//! lock-out outlived the attacker, as polkit still held the checks.
//!
//! The stalled agent runs in this test process. polkitd accepts an agent
//! for a process only from its owner or root, and this process is root, so
//! root registers it for this process (a real attacker registers one for
//! its own process); polkitd then routes the attacker's checks to it, as
//! they come over connections the bus sees as `nobody` from this PID.
//! root's checks never need an agent, and the second user (`daemon`, uid 1)
//! calls from its own process (`vmctl`), allowed by a polkit rule.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::images::make_clean_qcow2;
use common::world::{World, split_error, str_of};
use common::{DaemonConfig, NOBODY, Polkit, TestBus};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vmmanager_client::ManagerProxy;
use zbus::OwnedVariant;
use zbus_polkit::policykit1::{AuthorityProxy, Subject};

const ATTACKER: u32 = NOBODY;
/// `daemon`, the second (innocent) non-root user.
const SECOND_USER: u32 = 1;
/// The service's limit of checks one non-root uid may have waiting for
/// polkit (`vmmanager::auth::MAX_PENDING_PER_UID`).
const PER_UID: usize = vmmanager::auth::MAX_PENDING_PER_UID;
/// More calls than dbus-daemon lets one connection wait for (128)...
const FLOOD: usize = 130;
/// ...over this many connections, as the limit holds for the attacker's
/// own connections too.
const FLOOD_CONNECTIONS: usize = 2;
/// Connect, leave `PER_UID` checks at polkit, disconnect: this many rounds
/// are more than 128 abandoned checks, had any of them stayed at the bus.
const ROUNDS: usize = 33;
/// How often the attacker comes back while polkit holds its checks. Each
/// time its calls wait for a slot (up to 2 s) before they are Busy.
const COMEBACKS: usize = 2;
/// How long anything that should happen "at once" may take. Generous: in
/// the full suite on 2 CPUs, polkitd (which runs JavaScript rules per check)
/// took over 5 s for one check once. The lock-out this guards against lasts
/// minutes.
const PROMPTLY: Duration = Duration::from_secs(20);
const AGENT_PATH: &str = "/org/example/StalledAgent";
/// Missing for the attacker, so its calls ask for `check-disk-other-user`,
/// which needs an administrator's password: polkitd asks the agent.
const NO_IMAGE: &str = "/nonexistent/disk.qcow2";

/// What polkitd asked the agent so far (cookies).
#[derive(Debug, Default, Clone)]
struct AgentLog {
    begun: Vec<String>,
    cancelled: HashSet<String>,
}

/// A polkit authentication agent that never authenticates anyone, as a
/// user who never types the password (or a hostile one) behaves.
struct StalledAgent {
    log: watch::Sender<AgentLog>,
    /// Whether BeginAuthentication returns once polkitd cancels it (as
    /// real agents do when they close the dialog), or never (hostile).
    obeys_cancel: bool,
}

#[zbus::interface(name = "org.freedesktop.PolicyKit1.AuthenticationAgent")]
impl StalledAgent {
    async fn begin_authentication(
        &self,
        _action_id: &str,
        _message: &str,
        _icon_name: &str,
        _details: HashMap<String, String>,
        cookie: &str,
        _identities: Vec<(String, HashMap<String, OwnedVariant>)>,
    ) -> zbus::fdo::Result<()> {
        self.log
            .send_modify(|log| log.begun.push(cookie.to_owned()));
        let mut log = self.log.subscribe();
        let cancelled = |log: &AgentLog| self.obeys_cancel && log.cancelled.contains(cookie);
        let _ = log.wait_for(cancelled).await;
        Err(zbus::fdo::Error::Failed("cancelled".into()))
    }

    async fn cancel_authentication(&self, cookie: &str) {
        self.log.send_modify(|log| {
            log.cancelled.insert(cookie.to_owned());
        });
    }
}

/// The agent's connection and what the agent has seen.
struct Agent {
    connection: zbus::Connection,
    log: watch::Receiver<AgentLog>,
}

impl Agent {
    /// Registers a stalled agent for this process, for callers of `uid`.
    async fn register(bus: &TestBus, uid: u32, obeys_cancel: bool) -> Agent {
        let connection = bus.connect().await;
        let (log, receiver) = watch::channel(AgentLog::default());
        let agent = StalledAgent { log, obeys_cancel };
        connection
            .object_server()
            .at(AGENT_PATH, agent)
            .await
            .unwrap();
        let subject = Subject::new_for_pid(std::process::id(), None, Some(uid)).unwrap();
        AuthorityProxy::new(&connection)
            .await
            .unwrap()
            .register_authentication_agent(&subject, "C", AGENT_PATH)
            .await
            .expect("register the stalled agent");
        Agent {
            connection,
            log: receiver,
        }
    }

    /// How many checks polkitd has asked the agent about in all.
    fn asked(&self) -> usize {
        self.log.borrow().begun.len()
    }

    #[track_caller]
    fn assert_asked(&self, n: usize) {
        assert_eq!(self.asked(), n, "checks polkitd asked the agent about");
    }

    /// Waits until the agent has been asked `n` times in all.
    async fn wait_asked(&mut self, n: usize, what: &str) {
        let waited = tokio::time::timeout(PROMPTLY, self.log.wait_for(|l| l.begun.len() >= n));
        if waited.await.is_err() {
            panic!(
                "{what}: polkitd asked the agent {} times, not {n}",
                self.asked()
            );
        }
    }
}

type Answer = Result<(), (String, String)>;

/// CheckDisk over `connection`, interactive (the default), in the background.
fn check_in_background(connection: &zbus::Connection, image: &str) -> JoinHandle<Answer> {
    let connection = connection.clone();
    let image = image.to_owned();
    tokio::spawn(async move {
        let manager = ManagerProxy::new(&connection).await.unwrap();
        manager
            .check_disk(&image, HashMap::new())
            .await
            .map(drop)
            .map_err(split_error)
    })
}

fn is_busy_for_attacker(answer: &Answer) -> bool {
    let expected =
        format!("uid {ATTACKER} has {PER_UID} authorization requests waiting for polkit");
    matches!(answer, Err((name, message)) if name == "Busy" && message.contains(&expected))
}

#[track_caller]
fn assert_busy_for_attacker(answer: &Answer, what: &str) {
    assert!(
        is_busy_for_attacker(answer),
        "{what}: the attacker got {answer:?}, not Busy for its {PER_UID} waiting checks"
    );
}

/// Waits until `answered` of `calls` have ended, then splits them into
/// their answers and those still waiting.
async fn settle(
    calls: Vec<JoinHandle<Answer>>,
    answered: usize,
    what: &str,
) -> (Vec<Answer>, Vec<JoinHandle<Answer>>) {
    let started = Instant::now();
    loop {
        let done = calls.iter().filter(|c| c.is_finished()).count();
        if done >= answered {
            break;
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "{what}: only {done} of {} calls were answered within {PROMPTLY:?}, not {answered}",
            calls.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Room for a call that should not end, to show that it does.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (done, waiting): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| c.is_finished());
    let mut answers = Vec::new();
    for call in done {
        answers.push(call.await.unwrap());
    }
    (answers, waiting)
}

/// The attacker's `PER_UID` checks over a fresh connection, each to reach
/// the agent. A call that is Busy all the same (the last connection's checks
/// are freed a moment after polkit answered them) is tried again, within
/// `PROMPTLY`. Returns the connection and the waiting calls.
async fn fill_share(
    w: &World,
    agent: &mut Agent,
    what: &str,
) -> (zbus::Connection, Vec<JoinHandle<Answer>>) {
    let connection = w.stack.bus.connect_as(ATTACKER, ATTACKER).await;
    let started = Instant::now();
    let mut held = Vec::new();
    while held.len() < PER_UID {
        let asked = agent.asked();
        let mut call = check_in_background(&connection, NO_IMAGE);
        let reached = tokio::time::timeout(PROMPTLY, async {
            tokio::select! {
                answer = &mut call => Some(answer.unwrap()),
                _ = agent.log.wait_for(|l| l.begun.len() > asked) => None,
            }
        });
        match reached.await {
            Err(_) => panic!(
                "{what}: a check neither reached polkit nor was answered\n{}",
                diagnostics(w)
            ),
            Ok(None) => held.push(call),
            Ok(Some(answer)) => {
                assert_busy_for_attacker(&answer, what);
                assert!(
                    started.elapsed() < PROMPTLY,
                    "{what}: only {} checks reached polkit within {PROMPTLY:?}\n{}",
                    held.len(),
                    diagnostics(w)
                );
            }
        }
    }
    (connection, held)
}

/// The daemon's last log lines and polkitd's output, for failures.
fn diagnostics(w: &World) -> String {
    let log = w.stack.daemon.output();
    let lines: Vec<&str> = log.lines().collect();
    format!(
        "vmmanagerd's last lines:\n{}\npolkitd:\n{}",
        lines[lines.len().saturating_sub(30)..].join("\n"),
        w.stack.polkit.stderr()
    )
}

/// Closes the attacker's connections, as a killed client's close.
async fn leave(connections: Vec<zbus::Connection>, calls: Vec<JoinHandle<Answer>>) {
    for call in &calls {
        call.abort();
    }
    for connection in connections {
        connection.close().await.unwrap();
    }
}

/// root's CheckDisk and the second user's are answered, and in time.
async fn others_are_answered(w: &World) {
    root_checks(w, &w.path("root.qcow2")).await;
    second_user_checks(w, &w.path("daemon.qcow2"));
}

/// The second user's `vmctl check-disk` of its own image, from its own
/// process: answered, clean, and in time.
fn second_user_checks(w: &World, image: &Path) {
    let started = Instant::now();
    let out = tokio::task::block_in_place(|| {
        w.vmctl(
            Some((SECOND_USER, SECOND_USER)),
            &["check-disk", "--json", image.to_str().unwrap()],
        )
    });
    let elapsed = started.elapsed();
    assert!(out.success(), "the second user's check failed: {out:#?}");
    assert!(elapsed < PROMPTLY, "the second user waited {elapsed:?}");
}

/// root's interactive CheckDisk: answered, clean, and in time.
async fn root_checks(w: &World, image: &Path) {
    let started = Instant::now();
    let report = tokio::time::timeout(PROMPTLY, w.check(image, &[]))
        .await
        .unwrap_or_else(|_| panic!("root's check got no answer within {PROMPTLY:?}"))
        .unwrap_or_else(|e| panic!("root's check failed: {e:?}"));
    assert_eq!(str_of(&report, "result"), "clean");
    assert!(started.elapsed() < PROMPTLY);
}

/// A world with root's and the second user's images, and the agent.
async fn world(obeys_cancel: bool) -> (World, Agent) {
    let polkit = Polkit::builder().allow_user("org.example.vmmanager.check-disk", "daemon");
    let w = World::with(polkit, DaemonConfig::default()).await;
    make_clean_qcow2(&w.path("root.qcow2"));
    let seconds = w.path("daemon.qcow2");
    make_clean_qcow2(&seconds);
    std::os::unix::fs::chown(&seconds, Some(SECOND_USER), Some(SECOND_USER)).unwrap();
    let agent = Agent::register(&w.stack.bus, ATTACKER, obeys_cancel).await;
    (w, agent)
}

/// The reviewer's attack, with an agent that ignores polkitd's
/// cancellations: the flood takes only the attacker's share, root and
/// another user are answered meanwhile, and the checks the attacker
/// abandons keep counting while polkit holds them, so leaving and coming
/// back never piles up more at the bus; once polkit answers them (here: the
/// agent leaves the bus), the share is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_polkit_agent_locks_nobody_out() {
    let (w, mut agent) = world(false).await;

    // The flood: PER_UID checks wait at polkit; every other call is Busy
    // (at once, or after waiting 2 s for a slot) and never reaches polkit.
    let mut flood = Vec::new();
    for _ in 0..FLOOD_CONNECTIONS {
        flood.push(w.stack.bus.connect_as(ATTACKER, ATTACKER).await);
    }
    let calls = (0..FLOOD)
        .map(|i| check_in_background(&flood[i % FLOOD_CONNECTIONS], NO_IMAGE))
        .collect();
    agent.wait_asked(PER_UID, "the flood").await;
    let (answers, waiting) = settle(calls, FLOOD - PER_UID, "the flood").await;
    for answer in &answers {
        assert_busy_for_attacker(answer, "the flood");
    }
    assert_eq!(waiting.len(), PER_UID, "calls still waiting");
    agent.assert_asked(PER_UID);

    // Meanwhile root and another user are answered, and in time.
    others_are_answered(&w).await;

    // The attacker leaves and comes back, again and again: polkit still
    // holds its checks (its agent ignores polkitd's cancellations), so they
    // still count, and nothing more reaches polkit.
    leave(flood, waiting).await;
    for round in 1..=COMEBACKS {
        let what = format!("comeback {round}");
        let connection = w.stack.bus.connect_as(ATTACKER, ATTACKER).await;
        let calls = (0..PER_UID)
            .map(|_| check_in_background(&connection, NO_IMAGE))
            .collect();
        // Given time to reach polkit, had the abandoned checks stopped
        // counting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        agent.assert_asked(PER_UID);
        let (answers, _) = settle(calls, PER_UID, &what).await;
        for answer in &answers {
            assert_busy_for_attacker(answer, &what);
        }
        leave(vec![connection], Vec::new()).await;
    }
    agent.assert_asked(PER_UID);
    others_are_answered(&w).await;

    // The agent leaves the bus: polkitd's calls to it fail, polkit answers
    // the checks, and their slots are free again. With no agent left,
    // polkit answers the attacker's next checks at once: NotAuthorized.
    agent.connection.close().await.unwrap();
    let connection = w.stack.bus.connect_as(ATTACKER, ATTACKER).await;
    let started = Instant::now();
    loop {
        let answer = tokio::time::timeout(PROMPTLY, check_in_background(&connection, NO_IMAGE))
            .await
            .expect("an answer")
            .unwrap();
        if !is_busy_for_attacker(&answer) {
            let (name, message) = answer.expect_err("the attacker authorized");
            assert_eq!(name, "NotAuthorized", "{message}");
            break;
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "the attacker's checks were still held {PROMPTLY:?} after its agent left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With an agent that closes its dialog when polkitd cancels it (as real
/// agents do), polkitd answers an abandoned check as soon as its caller
/// leaves the bus: every fresh connection gets the whole share again (and
/// no more), far more than 128 checks go through polkit in all, and root
/// is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_check_is_freed_when_polkit_drops_it() {
    let (w, mut agent) = world(true).await;
    let started = Instant::now();
    for round in 1..=ROUNDS {
        let what = format!("round {round}");
        let (connection, held) = fill_share(&w, &mut agent, &what).await;
        if round == 1 {
            // One more than the share is Busy (after its short wait).
            let more = check_in_background(&connection, NO_IMAGE);
            let (answers, _) = settle(vec![more], 1, &what).await;
            assert_busy_for_attacker(&answers[0], &what);
            agent.assert_asked(PER_UID);
        }
        leave(vec![connection], held).await;
    }
    let rounds = started.elapsed();
    agent.assert_asked(ROUNDS * PER_UID);
    others_are_answered(&w).await;
    eprintln!(
        "{} abandoned checks, all dropped by polkitd, in {ROUNDS} rounds of {rounds:?}",
        ROUNDS * PER_UID
    );
}
