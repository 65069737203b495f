//! `vmmanager-opener`: serves one connection on its stdin, as
//! `vmmanager-opener@.service` (`StandardInput=socket`) starts it for
//! `vmmanager-opener.socket` (`Accept=yes`). See [`vmmanager::opener`].

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args_os().len() > 1 {
        eprintln!(
            "usage: vmmanager-opener  (started by vmmanager-opener.socket with the \
             connection on stdin; it takes no arguments)"
        );
        return ExitCode::from(2);
    }
    // SAFETY: stdin is this process's to take; nothing else uses fd 0. Not
    // a socket (run by hand), the first socket call fails with ENOTSOCK.
    let connection = UnixStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    match vmmanager::opener::serve(&connection) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // stderr is the journal (StandardError=journal).
            eprintln!("vmmanager-opener: {e}");
            ExitCode::FAILURE
        }
    }
}
