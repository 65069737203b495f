//! Figures and their report: each figure is a set of samples beside the
//! samples of its baseline, summarised as n, median, p90 and p99, compared
//! by difference and ratio of the medians, and judged against issue 10's
//! target (informational only: a missed target never fails the run).
//! Printed as a Markdown table and written as JSON, one file per group.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

/// What a figure's samples count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Micros,
    MiB,
    Count,
}

impl Unit {
    fn symbol(self) -> &'static str {
        match self {
            Unit::Millis => "ms",
            Unit::Micros => "µs",
            Unit::MiB => "MiB",
            Unit::Count => "",
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            Unit::Millis if value.abs() < 1.0 => format!("{value:.3} ms"),
            Unit::Millis => format!("{value:.2} ms"),
            Unit::Micros => format!("{value:.1} µs"),
            Unit::MiB => format!("{value:.1} MiB"),
            Unit::Count => format!("{value:.0}"),
        }
    }
}

/// A duration in the unit time figures use.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// n, median, p90 and p99 (nearest rank) of some samples.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        assert!(!samples.is_empty(), "a figure without samples");
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let r = (p / 100.0 * sorted.len() as f64).ceil() as usize;
            sorted[r.clamp(1, sorted.len()) - 1]
        };
        Summary {
            n: sorted.len(),
            median: rank(50.0),
            p90: rank(90.0),
            p99: rank(99.0),
        }
    }

    fn to_json(self) -> Value {
        json!({ "n": self.n, "median": self.median, "p90": self.p90, "p99": self.p99 })
    }
}

/// One part of a target; all parts of a figure's target must hold.
#[derive(Debug, Clone, Copy)]
pub enum Condition {
    /// Median minus the baseline's median at most this (figure's unit).
    DiffAtMost(f64),
    /// Median over the baseline's median at most this.
    RatioAtMost(f64),
    MedianAtMost(f64),
    P99AtMost(f64),
    /// A fact the measuring code decided, e.g. "every event accounted for".
    Holds {
        what: &'static str,
        holds: bool,
    },
}

impl Condition {
    fn describe(&self, unit: Unit) -> String {
        match *self {
            Condition::DiffAtMost(d) => format!("≤ +{}", unit.format(d)),
            Condition::RatioAtMost(r) => format!("≤ {r}×"),
            Condition::MedianAtMost(v) => format!("≤ {}", unit.format(v)),
            Condition::P99AtMost(v) => format!("p99 ≤ {}", unit.format(v)),
            Condition::Holds { what, .. } => what.to_owned(),
        }
    }

    fn holds(&self, value: Summary, baseline: Option<Summary>) -> bool {
        let base = || baseline.expect("a relative target needs a baseline").median;
        match *self {
            Condition::DiffAtMost(d) => value.median - base() <= d,
            Condition::RatioAtMost(r) => value.median <= r * base(),
            Condition::MedianAtMost(v) => value.median <= v,
            Condition::P99AtMost(v) => value.p99 <= v,
            Condition::Holds { holds, .. } => holds,
        }
    }
}

/// Samples of what is measured, the baseline measured beside them, and
/// the target.
pub struct Figure {
    name: String,
    unit: Unit,
    samples: Vec<f64>,
    baseline: Option<(String, Vec<f64>)>,
    target: Vec<Condition>,
    note: String,
}

impl Figure {
    pub fn new(name: impl Into<String>, unit: Unit, samples: Vec<f64>) -> Figure {
        Figure {
            name: name.into(),
            unit,
            samples,
            baseline: None,
            target: Vec::new(),
            note: String::new(),
        }
    }

    pub fn against(mut self, name: impl Into<String>, samples: Vec<f64>) -> Figure {
        self.baseline = Some((name.into(), samples));
        self
    }

    pub fn target(mut self, condition: Condition) -> Figure {
        self.target.push(condition);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    fn summary(&self) -> Summary {
        Summary::of(&self.samples)
    }

    fn baseline_summary(&self) -> Option<Summary> {
        self.baseline.as_ref().map(|(_, s)| Summary::of(s))
    }

    fn target_text(&self) -> String {
        let parts: Vec<String> = self.target.iter().map(|c| c.describe(self.unit)).collect();
        parts.join(", ")
    }

    /// Whether the target is met; `None` without a target.
    fn met(&self) -> Option<bool> {
        let (value, base) = (self.summary(), self.baseline_summary());
        (!self.target.is_empty()).then(|| self.target.iter().all(|c| c.holds(value, base)))
    }

    fn to_json(&self) -> Value {
        let (value, base) = (self.summary(), self.baseline_summary());
        json!({
            "name": self.name,
            "unit": self.unit.symbol(),
            "measured": value.to_json(),
            "baseline": self.baseline.as_ref().map(|(name, _)| name),
            "baseline_measured": base.map(Summary::to_json),
            "difference": base.map(|b| value.median - b.median),
            "ratio": base.map(|b| value.median / b.median),
            "target": self.target_text(),
            "met": self.met(),
            "note": self.note,
        })
    }
}

/// Figures measured together, reported in one table and one JSON file.
pub struct Group {
    /// File name (`target/bench/<name>.json`) and the name to select it by.
    pub name: &'static str,
    pub title: &'static str,
    pub figures: Vec<Figure>,
}

/// The machine and build a run measured, so runs can be compared.
pub struct Machine(Value);

impl Machine {
    pub fn describe(quick: bool) -> Machine {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_default();
        let dirty =
            !first_line(&["git", "status", "--porcelain", "--untracked-files=no"]).is_empty();
        let rev = first_line(&["git", "rev-parse", "--short=12", "HEAD"]);
        Machine(json!({
            "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "kernel": first_line(&["uname", "-sr"]),
            "cpu": cpu,
            "date": first_line(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            "git_rev": if dirty { format!("{rev}-dirty") } else { rev },
            "qemu_img": first_line(&["qemu-img", "--version"]),
            "load_average": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
            "mode": if quick { "quick" } else { "full" },
        }))
    }

    pub fn print(&self) {
        let m = &self.0;
        println!(
            "Machine: {} CPUs ({}), {}, {}; rev {}, {} build, {} mode; load average at start {}.",
            m["nproc"],
            str_of(&m["cpu"]),
            str_of(&m["kernel"]),
            str_of(&m["qemu_img"]),
            str_of(&m["git_rev"]),
            str_of(&m["profile"]),
            str_of(&m["mode"]),
            str_of(&m["load_average"]),
        );
    }
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// First line of a command's stdout ("" when it cannot run).
fn first_line(argv: &[&str]) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

impl Group {
    /// The group as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = format!("\n### {}\n\n", self.title);
        out.push_str(
            "| figure | n | median | p90 | p99 | baseline | n | median | p90 | p99 \
             | Δ median | ratio | target | met |\n",
        );
        out.push_str("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|\n");
        let mut notes = String::new();
        for f in &self.figures {
            let (v, u) = (f.summary(), f.unit);
            let _ = write!(
                out,
                "| {} | {} | {} | {} | {} ",
                f.name,
                v.n,
                u.format(v.median),
                u.format(v.p90),
                u.format(v.p99)
            );
            match (&f.baseline, f.baseline_summary()) {
                (Some((name, _)), Some(b)) => {
                    let diff = v.median - b.median;
                    let sign = if diff < 0.0 { "−" } else { "+" };
                    let _ = write!(
                        out,
                        "| {name} | {} | {} | {} | {} | {sign}{} | {:.2}× ",
                        b.n,
                        u.format(b.median),
                        u.format(b.p90),
                        u.format(b.p99),
                        u.format(diff.abs()),
                        v.median / b.median
                    );
                }
                _ => out.push_str("| — | | | | | | "),
            }
            let met = match f.met() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(out, "| {} | {met} |", f.target_text());
            if !f.note.is_empty() {
                let _ = writeln!(notes, "- {}: {}", f.name, f.note);
            }
        }
        if !notes.is_empty() {
            out.push('\n');
            out.push_str(&notes);
        }
        out
    }

    /// `(targets met, targets)` of this group.
    pub fn score(&self) -> (usize, usize) {
        let judged: Vec<bool> = self.figures.iter().filter_map(Figure::met).collect();
        (judged.iter().filter(|m| **m).count(), judged.len())
    }

    /// Writes `<dir>/<name>.json`; returns its path.
    pub fn write_json(&self, dir: &Path, machine: &Machine) -> PathBuf {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let path = dir.join(format!("{}.json", self.name));
        let value = json!({
            "group": self.name,
            "title": self.title,
            "machine": machine.0,
            "figures": self.figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&value).expect("JSON of a report");
        fs::write(&path, text + "\n").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

/// `target/bench` of the target directory this binary was built in
/// (`<target>/release/deps/perf-…`), so a custom `CARGO_TARGET_DIR` is
/// honoured.
pub fn output_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the benchmark's own path");
    exe.ancestors()
        .nth(3)
        .expect("the benchmark runs from <target>/<profile>/deps")
        .join("bench")
}
