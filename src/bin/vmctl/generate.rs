//! The hidden `vmctl generate`: shell completions and man pages from the same
//! clap definitions as the parser, so they cannot go stale. `make` runs it.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use vmmanager::manpage::{self, Body, Section};

use crate::Cli;

/// Shell completions and man pages for vmctl, for packaging.
#[derive(Debug, Parser)]
#[command(name = "vmctl-generate", bin_name = "vmctl generate")]
pub struct Generate {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// Print the completion script for SHELL on stdout.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write vmctl.1 and one page per subcommand (vmctl-check-disk.1, …)
    /// into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

pub fn run(what: &What) -> std::io::Result<()> {
    match what {
        What::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "vmctl", &mut std::io::stdout());
            Ok(())
        }
        What::Man { dir } => man(dir),
    }
}

fn environment() -> Section {
    let items = [
        (
            "DBUS_SYSTEM_BUS_ADDRESS",
            "The system bus to use when --bus-address is not given (default: \
             unix:path=/run/dbus/system_bus_socket).",
        ),
        (
            "RUST_LOG",
            "If set, vmctl prints debug messages on stderr at that level (e.g. debug), such as \
             why polkit's text agent could not be started.",
        ),
        (
            "NO_COLOR",
            "If set and not empty, output has no colour. Without it, colour is used only when \
             the output is a terminal; --json output never has colour.",
        ),
    ];
    Section::new(
        "ENVIRONMENT",
        Body::Items(items.map(|(k, v)| (k.into(), v.into())).into()),
    )
}

fn see_also(with_vmctl: bool) -> Section {
    let mut refs = vec![
        ("vmmanagerd", "8"),
        ("busctl", "1"),
        ("polkit", "8"),
        ("pkttyagent", "1"),
        ("qemu-img", "1"),
    ];
    if with_vmctl {
        refs.insert(0, ("vmctl", "1"));
    }
    let refs = refs.into_iter().map(|(n, s)| (n.into(), s.into()));
    Section::new("SEE ALSO", Body::SeeAlso(refs.collect()))
}

const JSON_OUTPUT: &str = "\
Every subcommand with --json prints exactly one JSON document on stdout \
(monitor: one document per line, JSON Lines), and nothing else. When the \
command fails, that document describes the error: {\"error\": D-Bus error \
name, \"error-message\": text}, plus \"image\" or \"address\" when the \
command has one. The exit status is the same as without --json, and the \
message is also printed on stderr.";

fn man(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Built once, so each subcommand carries its page name (vmctl-check-disk)
    // and usage (vmctl check-disk …) and the propagated global options.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let top = [
        Section::new("JSON OUTPUT", Body::Text(JSON_OUTPUT.into())),
        environment(),
        see_also(false),
    ];
    manpage::write(dir, cmd.clone(), "1", &top)?;
    let sub = [environment(), see_also(true)];
    for subcommand in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        manpage::write(dir, subcommand.clone(), "1", &sub)?;
    }
    Ok(())
}
