//! `vmctl` as a command-line program: help for every subcommand, the
//! generated shell completions and man pages, usage errors, `--json` error
//! documents, and colour only on a terminal (a real pty from util-linux
//! `script`) and never with NO_COLOR, against a real daemon.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::images::make_clean_qcow2;
use common::util::{public_tempdir, run};
use common::{CmdOutput, DaemonConfig, Polkit, Stack};

const VMCTL: &str = env!("CARGO_BIN_EXE_vmctl");
const VMMANAGERD: &str = env!("CARGO_BIN_EXE_vmmanagerd");

/// The subcommands the README and the Makefile know about; the list parsed
/// from `--help` must contain them (and may grow).
const KNOWN: [&str; 7] = [
    "check-disk",
    "disk-users",
    "devices",
    "device",
    "detach",
    "reattach",
    "monitor",
];

/// A bus address nothing listens on.
const NO_BUS: &str = "unix:path=/nonexistent/vmctl-test-bus";

fn vmctl(args: &[&str]) -> CmdOutput {
    let mut cmd = Command::new(VMCTL);
    cmd.args(args).env_remove("NO_COLOR");
    run(&mut cmd)
}

/// Subcommand names from the "Commands:" list of `vmctl --help`, without
/// clap's `help`.
fn subcommands() -> Vec<String> {
    let out = vmctl(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let names: Vec<String> = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_owned)
        .collect();
    for known in KNOWN {
        assert!(names.iter().any(|n| n == known), "{known} not in {names:?}");
    }
    names
}

fn assert_no_escapes(what: &str, text: &str) {
    assert!(!text.contains("\x1b["), "{what} has colour: {text:?}");
}

#[test]
fn help_for_every_subcommand_exits_0_with_usage() {
    let out = vmctl(&["--help"]);
    assert!(out.stdout.contains("Usage: vmctl"), "{out:?}");
    assert!(out.stdout.contains("Exit status:"), "{out:?}");
    assert_no_escapes("vmctl --help", &out.stdout);
    for sub in subcommands() {
        for args in [vec![sub.as_str(), "--help"], vec!["help", sub.as_str()]] {
            let out = vmctl(&args);
            assert_eq!(out.status.code(), Some(0), "vmctl {args:?}: {out:?}");
            let usage = format!("Usage: vmctl {sub}");
            assert!(out.stdout.contains(&usage), "vmctl {args:?}: {out:?}");
            assert!(
                out.stdout.contains("Exit status:"),
                "vmctl {args:?}: {out:?}"
            );
            assert!(out.stderr.is_empty(), "vmctl {args:?}: {out:?}");
        }
    }
    let out = vmctl(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.starts_with("vmctl "), "{out:?}");
}

#[test]
fn usage_errors_exit_64() {
    let cases: [&[&str]; 7] = [
        &[],
        &["no-such-command"],
        &["check-disk"],
        &["check-disk", "--repair", "everything", "x.qcow2"],
        &["check-disk", "--timeout", "soon", "x.qcow2"],
        &["devices", "--no-such-option"],
        &["generate", "completions", "tcsh"],
    ];
    for args in cases {
        let out = vmctl(args);
        assert_eq!(out.status.code(), Some(64), "vmctl {args:?}: {out:?}");
        // An error, or the short help when nothing was given.
        let said = out.stderr.contains("error:") || out.stderr.contains("Usage:");
        assert!(said, "vmctl {args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "vmctl {args:?}: {out:?}");
        assert_no_escapes("usage error", &out.stderr);
    }
}

#[test]
fn completions_cover_every_subcommand_and_hide_generate() {
    let subs = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let out = vmctl(&["generate", "completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {out:?}");
        assert!(out.stdout.len() > 1000, "{shell}: {out:?}");
        for sub in &subs {
            assert!(out.stdout.contains(sub.as_str()), "{shell}: no {sub}");
        }
        // fish writes `-l json`, the others `--json`.
        for option in ["bus-address", "json", "repair", "force-share"] {
            assert!(out.stdout.contains(option), "{shell}: no {option}");
        }
        assert!(!out.stdout.contains("generate"), "{shell} offers generate");
    }
    // Each script is valid for its shell (scripts/install-deps installs all
    // three).
    let dir = public_tempdir("vmctl-completions-");
    for (shell, check) in [("bash", "-n"), ("zsh", "-n"), ("fish", "--no-execute")] {
        let script = dir.path().join(shell);
        std::fs::write(&script, vmctl(&["generate", "completions", shell]).stdout).unwrap();
        let out = run(Command::new(shell).arg(check).arg(&script));
        assert!(
            out.success(),
            "{shell} {check} rejects its completions: {out:?}"
        );
    }
}

/// The parts every generated page must have.
fn assert_page(path: &Path, sections: &[&str]) -> String {
    let page = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for section in [".TH ", ".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION"]
        .iter()
        .chain(sections)
    {
        assert!(page.contains(section), "{}: no {section}", path.display());
    }
    // groff (what man renders with) accepts it without warnings.
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(path)
        .output()
        .expect("groff (package groff-base, see scripts/install-deps)");
    assert!(out.status.success(), "groff failed on {}", path.display());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "groff on {}: {stderr}", path.display());
    page
}

#[test]
fn man_pages_for_vmctl_every_subcommand_the_daemon_and_the_companion() {
    let dir = public_tempdir("vmctl-man-");
    let out = vmctl(&["generate", "man", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let subs = subcommands();
    let common = [
        ".SH OPTIONS",
        ".SH EXIT STATUS",
        ".SH ENVIRONMENT",
        "NO_COLOR",
        "DBUS_SYSTEM_BUS_ADDRESS",
        ".SH SEE ALSO",
        "vmmanagerd (8)",
        "busctl (1)",
        "polkit (8)",
    ];
    let top = assert_page(&dir.path().join("vmctl.1"), &common);
    assert!(top.contains(".SH JSON OUTPUT"));
    for sub in &subs {
        // roff escapes hyphens: vmctl\-check\-disk(1).
        let reference = format!("vmctl-{sub}(1)").replace('-', "\\-");
        assert!(top.contains(&reference), "vmctl.1 lacks {reference}");
        let page = assert_page(&dir.path().join(format!("vmctl-{sub}.1")), &common);
        assert!(
            page.contains("vmctl (1)"),
            "vmctl-{sub}.1 has no SEE ALSO vmctl"
        );
    }
    // Exactly those pages: no page for the hidden generate or for help.
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let mut expected: Vec<String> = subs.iter().map(|s| format!("vmctl-{s}.1")).collect();
    expected.push("vmctl.1".into());
    expected.sort();
    assert_eq!(files, expected);
    // The check-disk page lists the exit statuses of --help, one by one.
    let check = std::fs::read_to_string(dir.path().join("vmctl-check-disk.1")).unwrap();
    for code in ["0", "1", "2", "3", "4", "5", "63", "64", "130"] {
        assert!(
            check.contains(&format!(".TP\n\\fB{code}\\fR\n")),
            "no {code}"
        );
    }

    let out = run(Command::new(VMMANAGERD)
        .arg("--generate-man")
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_page(
        &dir.path().join("vmmanagerd.8"),
        &[
            ".TH VMMANAGERD 8",
            ".SH OPTIONS",
            ".SH EXIT STATUS",
            ".SH FILES",
            "/etc/vmmanager/vmmanager.toml",
            "RUST_LOG",
            "vmctl (1)",
            "vmmanager\\-opener (8)",
        ],
    );
    assert_page(
        &dir.path().join("vmmanager-opener.8"),
        &[
            ".TH VMMANAGER-OPENER 8",
            ".SH DESCRIPTION",
            ".SH EXIT STATUS",
            "/run/vmmanager\\-opener.socket",
            "vmmanagerd (8)",
        ],
    );

    let out = run(Command::new(env!("CARGO_BIN_EXE_vmmanager-notify"))
        .arg("--generate-man")
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_page(
        &dir.path().join("vmmanager-notify.1"),
        &[
            ".TH VMMANAGER-NOTIFY 1",
            ".SH OPTIONS",
            "\\-\\-no\\-tray",
            "StatusNotifierItem",
            ".SH FILES",
            ".SH ENVIRONMENT",
            "DBUS_SESSION_BUS_ADDRESS",
            "vmmanagerd (8)",
        ],
    );
}

/// Without a service, every `--json` command still prints one JSON error
/// document on stdout, with the usual exit status.
#[test]
fn json_errors_are_json_documents() {
    // (arguments, the key and value naming the subject); exit status 1:
    // the bus cannot be reached.
    let address = Some(("address", "0000:03:00.0"));
    let image = Some(("image", "/x.qcow2"));
    let cases: [(&[&str], _); 7] = [
        (&["devices", "--json"], None),
        (&["device", "--json", "0000:03:00.0"], address),
        (&["detach", "--json", "0000:03:00.0"], address),
        (&["reattach", "--json", "0000:03:00.0"], address),
        (&["check-disk", "--json", "/x.qcow2"], image),
        (&["disk-users", "--json", "/x.qcow2"], image),
        (&["monitor", "--json"], None),
    ];
    for (args, subject) in cases {
        let mut all = vec!["--bus-address", NO_BUS];
        all.extend(args);
        let out = vmctl(&all);
        assert_eq!(out.status.code(), Some(1), "vmctl {all:?}: {out:?}");
        // One document: monitor's is a single line (JSON Lines).
        let doc: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("vmctl {all:?}: {e}: {out:?}"));
        if args[0] == "monitor" {
            assert_eq!(out.stdout.lines().count(), 1, "{out:?}");
        }
        assert!(doc["error"].as_str().unwrap().contains(".Error."), "{doc}");
        assert!(!doc["error-message"].as_str().unwrap().is_empty(), "{doc}");
        if let Some((key, value)) = subject {
            assert_eq!(doc[key], value, "{doc}");
        }
        assert!(out.stderr.starts_with("vmctl: "), "{out:?}");
        assert_no_escapes("json error", &out.stdout);
        assert_no_escapes("json error stderr", &out.stderr);
    }
}

/// `script -qec COMMAND /dev/null`: COMMAND on a pseudo-terminal, its output
/// (stdout and stderr together) on script's stdout, its exit status as
/// script's. `env` is added to the environment (NO_COLOR removed first).
fn on_tty(args: &[&str], env: &[(&str, &str)]) -> CmdOutput {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let line = std::iter::once(VMCTL)
        .chain(args.iter().copied())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .env_remove("NO_COLOR")
        .envs(env.iter().copied());
    let mut out = run(&mut cmd);
    out.stdout = out.stdout.replace("\r\n", "\n");
    out
}

#[test]
fn colour_on_a_terminal_only_and_never_with_no_color() {
    let stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let dir = public_tempdir("vmctl-colour-");
    let clean = dir.path().join("clean.qcow2");
    make_clean_qcow2(&clean);
    let bus = stack.bus.address();
    let check = ["--bus-address", bus, "check-disk", clean.to_str().unwrap()];
    let missing = ["--bus-address", bus, "check-disk", "/nonexistent.qcow2"];

    // Piped: no colour, with or without NO_COLOR.
    let out = vmctl(&check);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("no errors found"), "{out:?}");
    assert_no_escapes("piped stdout", &out.stdout);
    let out = vmctl(&missing);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.starts_with("vmctl: "), "{out:?}");
    assert_no_escapes("piped stderr", &out.stderr);

    // On a terminal: the result in green, the error prefix in bold red; an
    // empty NO_COLOR counts as unset (no-color.org).
    for env in [&[][..], &[("NO_COLOR", "")][..]] {
        let out = on_tty(&check, env);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(
            out.stdout.contains("\x1b[32mno errors found\x1b[0m"),
            "no colour on a tty with {env:?}: {out:?}"
        );
        let out = on_tty(&missing, env);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(out.stdout.contains("\x1b[1;31mvmctl:\x1b[0m "), "{out:?}");
    }

    // On a terminal with NO_COLOR: none, and the same exit statuses.
    for value in ["1", "yes"] {
        let out = on_tty(&check, &[("NO_COLOR", value)]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert!(out.stdout.contains("no errors found"), "{out:?}");
        assert_no_escapes("NO_COLOR tty", &out.stdout);
        let out = on_tty(&missing, &[("NO_COLOR", value)]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert_no_escapes("NO_COLOR tty error", &out.stdout);
    }

    // JSON never has colour, even on a terminal.
    let mut json = check.to_vec();
    json.insert(3, "--json");
    let out = on_tty(&json, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_no_escapes("JSON on a tty", &out.stdout);
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["result"], "clean");

    // `vmctl devices` on a terminal: the header in bold.
    let out = on_tty(&["--bus-address", bus, "devices"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("\x1b[1mADDRESS\x1b[0m"), "{out:?}");
    let out = vmctl(&["--bus-address", bus, "devices"]);
    assert!(out.stdout.starts_with("ADDRESS "), "{out:?}");
    assert_no_escapes("piped devices", &out.stdout);
}

/// With a service: the error documents of device commands name the device,
/// and usage errors under --json are documents too (exit 64).
#[test]
fn json_documents_from_a_running_service() {
    let stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let bus = stack.bus.address();
    // No PCI device has this address, so nothing on the host is touched.
    for sub in ["device", "detach", "reattach"] {
        let out = vmctl(&["--bus-address", bus, sub, "--json", "0000:ff:1f.7"]);
        assert_eq!(out.status.code(), Some(1), "{sub}: {out:?}");
        let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(doc["address"], "0000:ff:1f.7", "{doc}");
        assert!(
            doc["error"].as_str().unwrap().ends_with("Error.NotFound"),
            "{doc}"
        );

        let out = vmctl(&["--bus-address", bus, sub, "--json", "nonsense"]);
        assert_eq!(out.status.code(), Some(64), "{sub}: {out:?}");
        let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        // Named as the service names a malformed argument.
        assert_eq!(
            doc["error"], "org.example.VmManager1.Error.InvalidArgument",
            "{doc}"
        );
    }
    let out = vmctl(&["--bus-address", bus, "devices", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(doc.is_array(), "{doc}");
}

/// `vmctl … | head -c 10`: the closed pipe ends vmctl as it ends coreutils
/// (SIGPIPE, no message), never with a panic (exit 101).
#[test]
fn a_closed_pipe_ends_vmctl_quietly() {
    let stack = Stack::start(Polkit::builder(), &DaemonConfig::default());
    let images = public_tempdir("vmm-images-");
    let image = images.path().join("disk.qcow2");
    make_clean_qcow2(&image);
    let script = r#"set -o pipefail; "$@" | head -c 10 >/dev/null; echo "status=$?""#;
    for args in [
        vec!["devices"],
        vec!["devices", "--json"],
        vec!["check-disk", "--json", image.to_str().unwrap()],
    ] {
        for _ in 0..5 {
            let out = run(Command::new("bash")
                .arg("-c")
                .arg(script)
                .arg("bash")
                .arg(VMCTL)
                .arg("--bus-address")
                .arg(stack.bus.address())
                .args(&args));
            let status = out.stdout.trim();
            // 141: killed by SIGPIPE; 0: vmctl wrote everything before head
            // closed the pipe.
            assert!(
                status == "status=141" || status == "status=0",
                "{args:?}: {out:?}"
            );
            assert!(!out.stderr.contains("panicked"), "{args:?}: {out:?}");
            assert_eq!(out.stderr, "", "{args:?}: {out:?}");
        }
    }
}

/// The shared libraries an ELF program asks the dynamic loader for
/// (`readelf -d`'s NEEDED entries).
fn needed_libraries(program: &str) -> Vec<String> {
    run(Command::new("readelf").args(["--dynamic", "--wide", program]))
        .expect_success("readelf")
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| Some(line.split_once('[')?.1.split_once(']')?.0.to_owned()))
        .collect()
}

/// What a desktop client installs is the contract, not the udev code: vmctl
/// and the notification companion never load libudev, the service does.
#[test]
fn clients_do_not_load_libudev() {
    let is_udev = |lib: &String| lib.starts_with("libudev.");
    let daemon = needed_libraries(VMMANAGERD);
    assert!(daemon.iter().any(is_udev), "vmmanagerd needs: {daemon:?}");
    for client in [VMCTL, env!("CARGO_BIN_EXE_vmmanager-notify")] {
        let needed = needed_libraries(client);
        assert!(!needed.is_empty(), "{client}: no NEEDED entries read");
        assert!(!needed.iter().any(is_udev), "{client} needs: {needed:?}");
    }
}
