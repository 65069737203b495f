//! What the long-running binaries (`vmmanagerd`, `vmmanager-notify`) share:
//! logging to the journal or stderr, and running until SIGTERM/SIGINT, with
//! SIGHUP logged and ignored rather than a silent death.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How [`init_logging`] set logging up, for [`run_until_signal`].
#[derive(Debug, Clone, Copy)]
pub struct Logging {
    /// Whether stderr is the journal (see [`stderr_is_journal`]): then a
    /// line printed there is a second journal entry beside the logged one.
    stderr_is_journal: bool,
}

/// Structured logs to the journal when systemd connected stderr to it
/// ([`stderr_is_journal`]), plain text on stderr otherwise (also when the
/// journal's socket cannot be reached: stderr still leads there). Only one
/// of the two ever writes, so each event reaches the journal once.
/// `RUST_LOG` sets the level (default `info`).
pub fn init_logging() -> Logging {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stderr_is_journal = stderr_is_journal(
        std::env::var_os("JOURNAL_STREAM").as_deref(),
        stderr_identity(),
    );
    let journald = stderr_is_journal
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
    Logging { stderr_is_journal }
}

/// Whether stderr is the stream systemd connected to the journal.
/// `journal_stream` is `JOURNAL_STREAM` (`DEVICE:INODE` of that stream,
/// decimal), `stderr` the device and inode of fd 2 now: a process whose
/// stderr was redirected (`2>file` in a unit's script, a test run from a
/// CI unit) inherits the variable but not the stream, and its logs belong
/// where its stderr goes.
pub fn stderr_is_journal(
    journal_stream: Option<&std::ffi::OsStr>,
    stderr: Option<(u64, u64)>,
) -> bool {
    let named = journal_stream
        .and_then(|value| value.to_str())
        .and_then(|value| value.split_once(':'))
        .and_then(|(dev, ino)| Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?)));
    named.is_some() && named == stderr
}

/// The device and inode of fd 2, `None` when it is closed.
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let stderr = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let metadata = std::fs::File::from(stderr).metadata().ok()?;
    Some((metadata.dev(), metadata.ino()))
}

/// Ignores SIGHUP until [`run_until_signal`] installs its handler. Call it
/// first thing in `main`: SIGHUP's default action is a silent exit, and a
/// hangup during start-up must not be one.
pub fn ignore_hangup() {
    // SAFETY: SIG_IGN runs no code in signal context. Nothing is spawned
    // while it is in place (an exec would keep it); the runtime's handler
    // replaces it before any child exists.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// How long the runtime waits, once `body` has returned, for blocking
/// threads still running. A thread stuck in the kernel (a lookup on a FUSE
/// mount whose server never answers) never ends by itself, and no stop
/// reaches it; the process's exit ends it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs `body` on a multi-threaded runtime. SIGTERM or SIGINT cancel the
/// token it gets, so it can stop cleanly; SIGHUP is logged as
/// "SIGHUP received: {on_hangup}" and otherwise ignored. `body`'s error is
/// logged and, unless stderr is the journal (where the logged entry is
/// already), printed as `name: error`; it becomes exit status 1. Once
/// `body` has returned, threads still running get [`SHUTDOWN_GRACE`], then
/// are left to the exit (and logged).
pub fn run_until_signal<F, Fut, E>(
    name: &str,
    logging: Logging,
    on_hangup: &'static str,
    body: F,
) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    ignore_hangup();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        // Installed here, before `body` runs, not inside the spawned task:
        // a task may start late, and until then SIGTERM would kill outright.
        let signals = match Signals::install() {
            Ok(signals) => Some(tokio::spawn(signals.run(on_hangup, shutdown.clone()))),
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                None
            }
        };
        let result = body(shutdown).await;
        if let Some(signals) = signals {
            signals.abort();
        }
        result
    });
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    let left = threads_left_after_exit_settles();
    if !left.is_empty() {
        tracing::warn!(
            "{} threads still running {} s after stopping (stuck in a file system that does not \
             answer?): {}; exiting without them",
            left.len(),
            SHUTDOWN_GRACE.as_secs(),
            left.join(", ")
        );
    }
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            if !logging.stderr_is_journal {
                eprintln!("{name}: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// How long threads that are done get to finish exiting: the runtime's
/// threads are detached, and `shutdown_timeout` returns once each has said
/// it is done, before the kernel has removed it (a window seen under TCG in
/// the booted guest as "tokio-rt-worker (in 0)", i.e. running).
const EXIT_SETTLE: Duration = Duration::from_millis(500);

/// [`other_threads`] once no thread is left, or after [`EXIT_SETTLE`].
fn threads_left_after_exit_settles() -> Vec<String> {
    let deadline = std::time::Instant::now() + EXIT_SETTLE;
    loop {
        let left = other_threads();
        if left.is_empty() || std::time::Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The names of this process's threads but the calling one, with what
/// each waits in (none if /proc cannot say).
fn other_threads() -> Vec<String> {
    // SAFETY: gettid cannot fail and touches no memory.
    let me = unsafe { libc::gettid() }.to_string();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(path).map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned())
    };
    tasks
        .flatten()
        .filter(|task| task.file_name().to_str() != Some(me.as_str()))
        .map(|task| {
            let (comm, wchan) = (
                read(task.path().join("comm")),
                read(task.path().join("wchan")),
            );
            format!("{comm} (in {wchan})")
        })
        .collect()
}

/// The signals a long-running binary listens to.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Cancels `shutdown` on SIGTERM or SIGINT; logs every SIGHUP.
    async fn run(mut self, on_hangup: &'static str, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                Some(()) = self.term.recv() => {
                    tracing::info!("SIGTERM received");
                    break;
                }
                Some(()) = self.int.recv() => {
                    tracing::info!("SIGINT received");
                    break;
                }
                Some(()) = self.hup.recv() => tracing::warn!("SIGHUP received: {on_hangup}"),
                // The runtime is going away: nothing left to listen to.
                else => return,
            }
        }
        shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn stderr_is_the_journal_only_when_journal_stream_names_it() {
        let fd2 = Some((8, 123_456));
        fn env(value: &str) -> Option<&OsStr> {
            Some(OsStr::new(value))
        }
        assert!(stderr_is_journal(env("8:123456"), fd2));
        // Inherited from systemd, but stderr was redirected since.
        assert!(!stderr_is_journal(env("8:654321"), fd2));
        assert!(!stderr_is_journal(env("9:123456"), fd2));
        assert!(!stderr_is_journal(None, fd2));
        assert!(!stderr_is_journal(env("8:123456"), None));
        for garbage in [
            "",
            "8",
            "8:",
            ":123456",
            "8:123456:1",
            "x:1",
            "8:-1",
            " 8:123456",
        ] {
            assert!(!stderr_is_journal(env(garbage), fd2), "{garbage:?}");
        }
    }

    /// systemd writes `JOURNAL_STREAM` from the stream's `st_dev` and
    /// `st_ino`, in decimal: the same numbers `metadata()` gives.
    #[test]
    fn a_streams_own_numbers_name_it() {
        let file = tempfile::tempfile().unwrap();
        let meta = file.metadata().unwrap();
        let value = format!("{}:{}", meta.dev(), meta.ino());
        let fd2 = Some((meta.dev(), meta.ino()));
        assert!(stderr_is_journal(Some(OsStr::new(&value)), fd2));
        assert!(stderr_identity().is_some());
    }
}
