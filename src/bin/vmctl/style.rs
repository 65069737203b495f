//! Colour for human output: plain ANSI SGR codes, only when the stream is a
//! terminal and `NO_COLOR` is unset or empty (<https://no-color.org>). JSON
//! output never goes through here.

use std::borrow::Cow;
use std::io::IsTerminal;

pub const GREEN: &str = "32";
pub const YELLOW: &str = "33";
pub const RED: &str = "1;31";
pub const BOLD: &str = "1";

fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

// Asked on every use rather than cached in a static: an env lookup and an
// isatty(3) cost nothing next to a D-Bus round trip, and no global state.
fn stdout_enabled() -> bool {
    !no_color() && std::io::stdout().is_terminal()
}

fn stderr_enabled() -> bool {
    !no_color() && std::io::stderr().is_terminal()
}

fn paint<'a>(enabled: bool, code: &str, text: &'a str) -> Cow<'a, str> {
    if enabled && !text.is_empty() {
        Cow::Owned(format!("\x1b[{code}m{text}\x1b[0m"))
    } else {
        Cow::Borrowed(text)
    }
}

/// `text` in `code` if stdout gets colour.
pub fn out<'a>(code: &str, text: &'a str) -> Cow<'a, str> {
    paint(stdout_enabled(), code, text)
}

/// `text` in `code` if stderr gets colour.
pub fn err<'a>(code: &str, text: &'a str) -> Cow<'a, str> {
    paint(stderr_enabled(), code, text)
}

/// The `vmctl:` prefix of error messages on stderr.
pub fn error_prefix() -> Cow<'static, str> {
    err(RED, "vmctl:")
}
