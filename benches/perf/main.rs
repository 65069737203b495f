//! `make bench`: every figure of issue 10's targets beside its baseline,
//! measured in the same run on this machine, interleaved, with the code as
//! it is. Prints a Markdown table per group and writes
//! `target/bench/<group>.json` (machine, build and every figure's n,
//! median, p90, p99, its baseline's, ratio, target, met).
//!
//! Run as root: `cargo bench --bench perf -- [--quick] [GROUP…]` (groups:
//! disk, scan, uevents, service; all when none is named). `--quick` is for
//! CI: smaller samples, the whole run in under two minutes. Targets are
//! informational; the run fails only on errors — a wrong answer from any
//! contender (a fast wrong answer is no result), a lost event, a crash.
//!
//! # Layout
//! - [`report`]: figures, targets, the table and the JSON files.
//! - [`measure`]: interleaved timing, a process's RSS, process counts.
//! - [`crowd`]: extra processes (sleepers, fd holders) for the scan figures.
//! - [`disk`]: CheckDisk and `vmctl check-disk` against a direct qemu-img,
//!   alone and 16 at once.
//! - [`scan`]: GetDiskUsers and the in-process scan against fuser and lsof
//!   under extra processes and fds.
//! - [`uevents`]: kernel uevent → `Uevent` signal against `udevadm monitor
//!   --kernel`, single events and a burst.
//! - [`footprint`]: start time, memory and fds of the service.
//!
//! Everything runs on the integration tests' harness ([`common`]): a
//! private dbus-daemon, a real polkitd, the release `vmmanagerd`, real QEMU,
//! each in a guard that kills and reaps it on drop (panics included), temp
//! dirs removed with them.

// The integration tests' harness, compiled into this binary as a public
// module: its public items are then this crate's interface, so what the
// benchmark does not use is not dead code here, and no `allow` is needed.
// The tests binary, where the module is private, still reports whatever
// the harness itself leaves unused.
#[path = "../../tests/common/mod.rs"]
pub mod common;

mod crowd;
mod disk;
mod footprint;
mod measure;
mod report;
mod scan;
mod uevents;

use std::process::ExitCode;

use tokio::runtime::Runtime;

use crate::crowd::Helper;
use crate::report::{Group, Machine};

/// Full run or CI's quick one.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    quick: bool,
}

impl Mode {
    /// `full` samples in a full run, `quick` ones in a quick run.
    pub fn pick(self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    pub fn quick(self) -> bool {
        self.quick
    }
}

/// Measures one group of figures.
type Measure = fn(Mode, &Runtime) -> Group;

/// The groups, in the order they run.
const GROUPS: [(&str, Measure); 4] = [
    ("disk", disk::group),
    ("scan", scan::group),
    ("uevents", uevents::group),
    ("service", footprint::group),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(helper) = args
        .first()
        .and_then(|flag| Helper::from_args(flag, args.get(1).map(String::as_str)))
    {
        return crowd::run_helper(helper);
    }
    let mut quick = false;
    let mut selected = Vec::new();
    for arg in &args {
        match arg.as_str() {
            "--quick" => quick = true,
            // `cargo bench` passes it to every bench binary.
            "--bench" => {}
            name if GROUPS.iter().any(|(g, _)| *g == name) => selected.push(name.to_owned()),
            other => {
                let names: Vec<&str> = GROUPS.iter().map(|(g, _)| *g).collect();
                eprintln!(
                    "unknown argument {other:?}; usage: perf [--quick] [{}]…",
                    names.join("|")
                );
                return ExitCode::from(2);
            }
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "the benchmark needs root: it starts dbus-daemon, polkitd (in a mount \
             namespace), QEMU and thousands of processes; run `make bench` as root"
        );
        return ExitCode::FAILURE;
    }
    let mode = Mode { quick };
    let machine = Machine::describe(quick);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let out_dir = report::output_dir();
    println!("## VM Manager benchmark (`make bench`, issue 10's figures)\n");
    machine.print();
    let (mut met, mut judged) = (0, 0);
    for (name, run) in GROUPS {
        if !selected.is_empty() && !selected.iter().any(|s| s == name) {
            continue;
        }
        eprintln!("bench: {name}…");
        let group = run(mode, &rt);
        print!("{}", group.table());
        let path = group.write_json(&out_dir, &machine);
        let (m, j) = group.score();
        (met, judged) = (met + m, judged + j);
        println!("\n(written to {})", path.display());
    }
    println!("\nTargets met: {met} of {judged} (informational: times never fail the run).");
    ExitCode::SUCCESS
}
