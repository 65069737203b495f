//! The session side: shows [`Message`]s through notify-rust (zbus backend,
//! `show_async`: the blocking `show` would panic inside tokio), keeps one
//! notification id per topic so later messages replace earlier ones,
//! retries with backoff while no notification server answers, and runs the
//! "Repair leaks" action.
//!
//! One owned task ([`Notifier`]); `stop` returns after it, its action
//! waiters and running repairs are gone.

use std::collections::HashMap;
use std::time::Duration;

use notify_rust::{Hint, Notification, NotificationHandle, NotificationResponse};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zbus::Connection;

use super::policy::{
    self, APP_NAME, Action, CheckReport, DESKTOP_ENTRY, Message, REPAIR_LEAKS_ACTION, Topic,
    Urgency,
};
use vmmanager_client::options::{CheckDiskOptions, Repair};
use vmmanager_client::{Error, ManagerProxy};

/// How long one Notify call may take before it counts as failed (a wedged
/// session bus must not stall the queue forever).
const SHOW_TIMEOUT: Duration = Duration::from_secs(10);

/// Doubling delays between retries while no notification server answers.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt; each call doubles the following.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Whether the last attempt was the first failure since a success.
    pub fn is_fresh(&self) -> bool {
        self.next == self.min
    }
}

/// Handle of the running notifier task.
pub struct Notifier {
    messages: mpsc::Sender<Message>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Notifier {
    /// Starts the task; `system` is the system-bus connection the repair
    /// action calls the service on.
    pub fn start(system: Connection, backoff: Backoff) -> Notifier {
        let (messages, receiver) = mpsc::channel(256);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(receiver, system, backoff, cancel.clone()));
        Notifier {
            messages,
            cancel,
            task,
        }
    }

    /// Queues a message; a later one on the same topic supersedes it.
    pub async fn show(&self, message: Message) {
        let _ = self.messages.send(message).await;
    }

    /// A handle that queues messages too, for other tasks (the tray).
    pub fn messages(&self) -> Messages {
        Messages(self.messages.clone())
    }

    /// Stops the task, its action waiters and repairs, and waits for them.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::error!("notifier task failed: {e}");
        }
    }
}

/// Queues messages on a running [`Notifier`]; cheap to clone. Messages
/// sent after the notifier stopped are dropped.
#[derive(Debug, Clone)]
pub struct Messages(mpsc::Sender<Message>);

impl Messages {
    pub async fn show(&self, message: Message) {
        let _ = self.0.send(message).await;
    }
}

/// Messages not shown yet, oldest first, at most one per topic.
#[derive(Debug, Default)]
struct Queue(Vec<Message>);

impl Queue {
    fn push(&mut self, message: Message) {
        self.0.retain(|m| m.topic != message.topic);
        self.0.push(message);
    }
}

async fn run(
    mut messages: mpsc::Receiver<Message>,
    system: Connection,
    mut backoff: Backoff,
    cancel: CancellationToken,
) {
    let mut ids: HashMap<Topic, u32> = HashMap::new();
    let mut waiters: HashMap<Topic, JoinHandle<()>> = HashMap::new();
    let mut repairs: JoinSet<Option<Message>> = JoinSet::new();
    let (actions_tx, mut actions) = mpsc::channel::<Action>(16);
    let mut queue = Queue::default();
    let mut retry_at: Option<Instant> = None;

    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            message = messages.recv() => match message {
                Some(m) => queue.push(m),
                None => break,
            },
            Some(action) = actions.recv() => {
                let Action::RepairLeaks { image } = action;
                tracing::info!(image, "repairing leaks on the user's request");
                repairs.spawn(repair_leaks(system.clone(), image));
            }
            Some(done) = repairs.join_next(), if !repairs.is_empty() => {
                if let Ok(Some(m)) = done {
                    queue.push(m);
                }
            }
            () = sleep_until(retry_at), if retry_at.is_some() => retry_at = None,
        }
        if retry_at.is_some() {
            continue;
        }
        while let Some(message) = queue.0.first().cloned() {
            match show(&message, ids.get(&message.topic).copied()).await {
                Ok(handle) => {
                    queue.0.remove(0);
                    backoff.reset();
                    ids.insert(message.topic.clone(), handle.id());
                    // The old notification's button is gone with it.
                    if let Some(old) = waiters.remove(&message.topic) {
                        old.abort();
                    }
                    if let Some(action) = message.action.clone() {
                        let waiter =
                            tokio::spawn(wait_for_action(handle, action, actions_tx.clone()));
                        waiters.insert(message.topic.clone(), waiter);
                    }
                }
                Err(e) => {
                    let fresh = backoff.is_fresh();
                    let delay = backoff.next_delay();
                    if fresh {
                        tracing::warn!(
                            "cannot show a notification ({e}); retrying in {delay:?} and \
                             backing off while no notification server answers"
                        );
                    } else {
                        tracing::debug!(
                            "still no notification server ({e}); next try in {delay:?}"
                        );
                    }
                    retry_at = Some(Instant::now() + delay);
                    break;
                }
            }
        }
    }

    for (_, waiter) in waiters.drain() {
        waiter.abort();
        let _ = waiter.await;
    }
    repairs.shutdown().await;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, thiserror::Error)]
enum ShowError {
    #[error("{0}")]
    Notify(#[from] notify_rust::error::Error),
    #[error("the notification server did not answer within {SHOW_TIMEOUT:?}")]
    Timeout,
}

/// The notify-rust notification for `message`, replacing `replaces`.
pub fn notification(message: &Message, replaces: Option<u32>) -> Notification {
    let mut n = Notification::new();
    n.appname(APP_NAME)
        .summary(&message.summary)
        .body(&message.body)
        .icon(message.icon)
        .hint(Hint::Category(message.category.to_owned()))
        .hint(Hint::DesktopEntry(DESKTOP_ENTRY.to_owned()))
        .urgency(match message.urgency {
            Urgency::Low => notify_rust::Urgency::Low,
            Urgency::Normal => notify_rust::Urgency::Normal,
            Urgency::Critical => notify_rust::Urgency::Critical,
        });
    if let Some(id) = replaces {
        n.id(id);
    }
    match &message.action {
        Some(Action::RepairLeaks { .. }) => {
            n.action(REPAIR_LEAKS_ACTION, "Repair leaks");
        }
        None => {}
    }
    n
}

async fn show(message: &Message, replaces: Option<u32>) -> Result<NotificationHandle, ShowError> {
    let n = notification(message, replaces);
    let handle = tokio::time::timeout(SHOW_TIMEOUT, n.show_async())
        .await
        .map_err(|_| ShowError::Timeout)??;
    tracing::debug!(
        id = handle.id(),
        summary = message.summary,
        "notification shown"
    );
    Ok(handle)
}

/// Waits until the user picks the action (or the notification closes).
async fn wait_for_action(handle: NotificationHandle, action: Action, to: mpsc::Sender<Action>) {
    let mut invoked = false;
    handle
        .wait_for_action_async(|response| {
            invoked =
                matches!(response, NotificationResponse::Action(a) if a == REPAIR_LEAKS_ACTION);
        })
        .await;
    if invoked {
        let _ = to.send(action).await;
    }
}

/// CheckDisk with `repair=leaks`, interactive so polkit's agent may ask;
/// the outcome as a message (the service's DiskChecked says the same, on
/// the same topic, so the two replace rather than stack).
async fn repair_leaks(system: Connection, image: String) -> Option<Message> {
    let manager = match ManagerProxy::new(&system).await {
        Ok(m) => m,
        Err(e) => return Some(policy::repair_failed(&image, &Error::from(e))),
    };
    let options = CheckDiskOptions::new().repair(Repair::Leaks).build();
    match manager.check_disk(&image, options).await {
        Ok(report) => Some(policy::disk_checked(&CheckReport::from_signal(
            &image, &report,
        ))),
        Err(e) => {
            let error = Error::from(e);
            tracing::warn!(image, "repair failed: {error}");
            Some(policy::repair_failed(&image, &error))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        assert!(b.is_fresh());
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        assert!(!b.is_fresh());
        b.reset();
        assert_eq!(b.next_delay().as_secs(), 1);
    }

    fn message(topic: Topic, summary: &str) -> Message {
        Message {
            topic,
            summary: summary.into(),
            body: String::new(),
            urgency: Urgency::Low,
            icon: "computer",
            category: "device",
            action: None,
        }
    }

    #[test]
    fn the_queue_keeps_the_latest_per_topic() {
        let mut q = Queue::default();
        q.push(message(Topic::DevicesAdded, "1"));
        q.push(message(Topic::Disk("/a".into()), "2"));
        q.push(message(Topic::DevicesAdded, "3"));
        let summaries: Vec<&str> = q.0.iter().map(|m| m.summary.as_str()).collect();
        assert_eq!(summaries, ["2", "3"]);
    }
}
