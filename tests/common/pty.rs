//! A program on a pseudo-terminal of its own, as at a text console: it is a
//! session leader with the terminal as its controlling terminal, so
//! `/dev/tty` (where polkit's text agent asks) is that terminal. The test
//! reads the screen, types, and sends Ctrl-C like a person would.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::util::{ChildGuard, wait_until};

/// How often the reader looks at its stop flag.
const READ_POLL_MS: libc::c_int = 50;

/// A child on a terminal; killed and reaped on drop, and the thread reading
/// its screen stopped and joined.
pub struct Terminal {
    child: ChildGuard,
    master: Arc<File>,
    screen: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl Terminal {
    /// Starts `cmd` with stdin, stdout and stderr on a new terminal.
    pub fn spawn(mut cmd: Command) -> Terminal {
        let (master, slave) = open_pty();
        let io = |f: &File| Stdio::from(f.try_clone().expect("dup the terminal"));
        cmd.stdin(io(&slave)).stdout(io(&slave)).stderr(io(&slave));
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        drop(slave);
        let child = ChildGuard::new(child, format!("{cmd:?} on a terminal"));
        let master = Arc::new(master);
        let screen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = std::thread::spawn({
            let (master, screen, stop) = (master.clone(), screen.clone(), stop.clone());
            move || read_screen(&master, &screen, &stop)
        });
        Terminal {
            child,
            master,
            screen,
            stop,
            reader: Some(reader),
        }
    }

    /// The process started (a session leader: also its process group).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Everything written to the terminal so far, with `\r\n` as `\n`.
    pub fn screen(&self) -> String {
        let bytes = self.screen.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes).replace("\r\n", "\n")
    }

    /// Waits until `text` is on the screen; panics with the screen if the
    /// program exits or `timeout` passes first.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.screen().contains(text) {
            if let Some(status) = self.child.try_wait() {
                // What it wrote last may not have been read yet.
                self.finish_reading();
                assert!(
                    self.screen().contains(text),
                    "exited ({status}) without showing {text:?}; screen:\n{}",
                    self.screen()
                );
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{text:?} not shown within {timeout:?}; screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the terminal echoes what is typed (a password prompt turns
    /// echo off once it reads).
    pub fn echo(&self) -> bool {
        // SAFETY: termios is plain data; tcgetattr on the master reads the
        // terminal's settings.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::tcgetattr(self.master.as_raw_fd(), &mut termios) };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        termios.c_lflag & libc::ECHO != 0
    }

    /// Waits until echo is off: the prompt reads the keyboard from then on
    /// (typed earlier, the input would be flushed).
    pub fn wait_for_echo_off(&mut self, timeout: Duration) {
        wait_until(
            timeout,
            "the terminal's echo to go off",
            || !self.echo(),
            || self.screen(),
        );
    }

    /// Types `text` on the keyboard (include `\n` for Enter, `\x03` for
    /// Ctrl-C).
    pub fn type_keys(&self, text: &str) {
        (&*self.master)
            .write_all(text.as_bytes())
            .expect("type on the terminal");
    }

    /// Waits up to `timeout` for the program to exit, then for everything
    /// it wrote to be read. `None` if it is still running.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = self.wait_exit(timeout)?;
        self.finish_reading();
        Some(status)
    }

    /// Waits up to `timeout` for the program to exit, and no longer: what
    /// it left running may still write (see [`Terminal::wait`]).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.child.wait_timeout(timeout)
    }

    /// Reads until the terminal has no writer left (bounded: something the
    /// program left behind may still hold it).
    pub fn finish_reading(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.reader.as_ref().is_some_and(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.child.kill_and_wait();
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// A new pseudo-terminal (master, slave), both close-on-exec from the start
/// so no other test's child inherits them.
fn open_pty() -> (File, File) {
    let error = |what: &str| panic!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain libc calls; every descriptor is owned right away.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if master < 0 {
            error("posix_openpt");
        }
        let master = OwnedFd::from_raw_fd(master);
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            error("grantpt/unlockpt");
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0 {
            error("ptsname_r");
        }
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if slave < 0 {
            error("open the pty's slave");
        }
        (File::from(master), File::from_raw_fd(slave))
    }
}

/// Appends what the terminal shows to `screen` until no process has it
/// open any more (EIO) or `stop` is set.
fn read_screen(master: &File, screen: &Mutex<Vec<u8>>, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let mut poll = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, READ_POLL_MS) } <= 0 {
            continue;
        }
        match (&*master).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => screen.lock().unwrap().extend_from_slice(&buf[..n]),
        }
    }
}
