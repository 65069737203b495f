//! Bounded capture of qemu-img's output, and what its exit status and JSON mean.

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{CheckCounts, CheckOutcome, CheckResult, QemuImgError};

/// qemu-img's JSON is a few hundred bytes; more is not a check report.
pub(super) const STDOUT_LIMIT: usize = 1 << 20;
/// Bytes of stderr kept: the first half and the last half. A check of a badly
/// damaged image prints one line per bad cluster before the final error.
pub(super) const STDERR_KEEP: usize = 4096;

const EXIT_CLEAN: i32 = 0;
const EXIT_FAILED: i32 = 1;
const EXIT_CORRUPT: i32 = 2;
const EXIT_LEAKS: i32 = 3;
const EXIT_NOT_SUPPORTED: i32 = 63;

/// stdout as read: at most `limit` bytes, the rest drained.
#[derive(Debug, Default)]
pub(super) struct Stdout {
    pub(super) bytes: Vec<u8>,
    pub(super) overflowed: bool,
    pub(super) error: Option<io::Error>,
}

/// Reads `reader` to EOF, keeping at most `limit` bytes. Draining the rest
/// keeps qemu-img from blocking on a full pipe.
pub(super) async fn read_capped<R: AsyncRead + Unpin>(mut reader: R, limit: usize) -> Stdout {
    let mut out = Stdout::default();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) => return out,
            Ok(n) => {
                let room = limit.saturating_sub(out.bytes.len());
                if n > room {
                    out.overflowed = true;
                }
                out.bytes.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        }
    }
}

/// The first and last `keep / 2` bytes of a stream, and how much was skipped.
#[derive(Debug)]
pub(super) struct HeadTail {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    half: usize,
    total: usize,
}

impl HeadTail {
    pub(super) fn new(keep: usize) -> HeadTail {
        HeadTail {
            head: Vec::new(),
            tail: VecDeque::new(),
            half: keep / 2,
            total: 0,
        }
    }

    pub(super) fn push(&mut self, mut data: &[u8]) {
        self.total += data.len();
        let to_head = self.half.saturating_sub(self.head.len()).min(data.len());
        self.head.extend_from_slice(&data[..to_head]);
        data = &data[to_head..];
        if data.len() >= self.half {
            self.tail.clear();
            self.tail.extend(&data[data.len() - self.half..]);
        } else {
            let excess = (self.tail.len() + data.len()).saturating_sub(self.half);
            self.tail.drain(..excess);
            self.tail.extend(data);
        }
    }

    /// Lossy UTF-8, trimmed, with a marker where bytes were skipped.
    pub(super) fn render(&self) -> String {
        let skipped = self.total - self.head.len() - self.tail.len();
        let head = String::from_utf8_lossy(&self.head);
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        let tail = String::from_utf8_lossy(&tail);
        if skipped == 0 {
            format!("{head}{tail}").trim().to_owned()
        } else {
            format!(
                "{}\n[… {skipped} bytes of qemu-img output omitted …]\n{}",
                head.trim_start(),
                tail.trim_end()
            )
        }
    }
}

/// Reads `reader` to EOF, keeping its head and tail (see [`HeadTail`]).
/// A read error ends the capture: what was read is still worth reporting.
pub(super) async fn read_head_tail<R: AsyncRead + Unpin>(mut reader: R, keep: usize) -> String {
    let mut kept = HeadTail::new(keep);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => kept.push(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, "reading qemu-img's stderr");
                break;
            }
        }
    }
    kept.render()
}

/// qemu-img's `--output=json` check report. Unknown keys (`filename`,
/// `format`, …) are ignored; missing counts are 0.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct JsonReport {
    check_errors: u64,
    corruptions: u64,
    leaks: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
}

impl From<JsonReport> for CheckCounts {
    fn from(j: JsonReport) -> CheckCounts {
        CheckCounts {
            check_errors: j.check_errors,
            corruptions: j.corruptions,
            leaks: j.leaks,
            corruptions_fixed: j.corruptions_fixed,
            leaks_fixed: j.leaks_fixed,
            image_end_offset: j.image_end_offset,
            total_clusters: j.total_clusters,
            allocated_clusters: j.allocated_clusters,
            fragmented_clusters: j.fragmented_clusters,
            compressed_clusters: j.compressed_clusters,
        }
    }
}

/// Parses stdout; `Err` is the reason it is not a report.
fn parse_counts(stdout: &Stdout) -> Result<CheckCounts, String> {
    if let Some(e) = &stdout.error {
        return Err(format!("reading its output failed: {e}"));
    }
    if stdout.overflowed {
        return Err(format!("more than {} bytes of output", STDOUT_LIMIT));
    }
    if stdout.bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("no JSON output".to_owned());
    }
    // Via a Map: serde would also accept a JSON array for the struct.
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&stdout.bytes)
        .and_then(|map| JsonReport::deserialize(serde_json::Value::Object(map)))
        .map(CheckCounts::from)
        .map_err(|e| format!("invalid JSON: {e}"))
}

/// qemu-img's message when another process holds the image, e.g.
/// `Failed to get shared "write" lock`.
fn is_lock_conflict(stderr: &str) -> bool {
    stderr
        .find("Failed to get")
        .is_some_and(|at| stderr[at..].contains("lock"))
}

fn or_placeholder(stderr: &str) -> String {
    if stderr.is_empty() {
        "(no error message)".to_owned()
    } else {
        stderr.to_owned()
    }
}

/// Maps a finished run to its outcome. The exit code decides the result (after
/// a repair it describes the repaired image); the JSON supplies the counts.
pub(super) fn interpret(
    status: ExitStatus,
    stdout: &Stdout,
    stderr: &str,
    repair: bool,
) -> Result<CheckOutcome, QemuImgError> {
    let Some(code) = status.code() else {
        return Err(QemuImgError::Killed {
            signal: status.signal().unwrap_or(0),
        });
    };
    let result = match code {
        EXIT_CLEAN => CheckResult::Clean,
        EXIT_CORRUPT => CheckResult::Corrupt,
        EXIT_LEAKS => CheckResult::Leaks,
        EXIT_NOT_SUPPORTED => {
            // Usually no JSON at all; counts are 0 then.
            return Ok(CheckOutcome {
                result: CheckResult::NotSupported,
                counts: parse_counts(stdout).unwrap_or_default(),
            });
        }
        EXIT_FAILED if is_lock_conflict(stderr) => {
            return Err(QemuImgError::LockConflict {
                stderr: stderr.to_owned(),
            });
        }
        _ => {
            return Err(QemuImgError::Failed {
                code,
                stderr: or_placeholder(stderr),
            });
        }
    };
    let counts = parse_counts(stdout).map_err(|detail| QemuImgError::Garbage {
        detail: format!("exit code {code}, {detail}"),
        stderr: or_placeholder(stderr),
    })?;
    if !agrees(result, &counts) {
        tracing::warn!(
            code,
            repair,
            ?counts,
            "qemu-img's exit code and JSON disagree; going by the exit code"
        );
    }
    Ok(CheckOutcome { result, counts })
}

/// Whether the JSON's remaining problems match the exit code.
fn agrees(result: CheckResult, counts: &CheckCounts) -> bool {
    match result {
        CheckResult::Clean => counts.corruptions == 0 && counts.leaks == 0,
        CheckResult::Corrupt => counts.corruptions > 0,
        CheckResult::Leaks => counts.corruptions == 0 && counts.leaks > 0,
        CheckResult::NotSupported => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn json(s: &str) -> Stdout {
        Stdout {
            bytes: s.as_bytes().to_vec(),
            ..Stdout::default()
        }
    }

    const REAL_LEAKS: &str = r#"{
    "image-end-offset": 655360,
    "total-clusters": 1024,
    "check-errors": 0,
    "leaks": 3,
    "allocated-clusters": 2,
    "filename": "/tmp/qb/l.qcow2",
    "format": "qcow2"
}
"#;

    #[test]
    fn parses_real_leak_report() {
        let outcome = interpret(exited(3), &json(REAL_LEAKS), "Leaked cluster 7", false).unwrap();
        assert_eq!(outcome.result, CheckResult::Leaks);
        assert_eq!(
            outcome.counts,
            CheckCounts {
                leaks: 3,
                image_end_offset: 655360,
                total_clusters: 1024,
                allocated_clusters: 2,
                ..CheckCounts::default()
            }
        );
    }

    #[test]
    fn every_key_is_read() {
        let all = r#"{"check-errors":1,"corruptions":2,"leaks":3,"corruptions-fixed":4,
            "leaks-fixed":5,"image-end-offset":6,"total-clusters":7,"allocated-clusters":8,
            "fragmented-clusters":9,"compressed-clusters":10,"extra":{"nested":[1]}}"#;
        let outcome = interpret(exited(2), &json(all), "", false).unwrap();
        assert_eq!(
            outcome.counts,
            CheckCounts {
                check_errors: 1,
                corruptions: 2,
                leaks: 3,
                corruptions_fixed: 4,
                leaks_fixed: 5,
                image_end_offset: 6,
                total_clusters: 7,
                allocated_clusters: 8,
                fragmented_clusters: 9,
                compressed_clusters: 10,
            }
        );
        assert_eq!(outcome.result, CheckResult::Corrupt);
    }

    #[test]
    fn exit_code_decides_result() {
        // After `-r leaks` qemu-img exits 0 and reports what it fixed.
        let repaired = r#"{"leaks-fixed": 3, "total-clusters": 1024}"#;
        let outcome = interpret(exited(0), &json(repaired), "", true).unwrap();
        assert_eq!(outcome.result, CheckResult::Clean);
        assert_eq!(outcome.counts.leaks_fixed, 3);
        // Disagreeing JSON is still reported, result by exit code.
        let outcome = interpret(exited(0), &json(r#"{"leaks": 1}"#), "", false).unwrap();
        assert_eq!(outcome.result, CheckResult::Clean);
        assert_eq!(outcome.counts.leaks, 1);
    }

    #[test]
    fn not_supported_without_json() {
        let outcome = interpret(
            exited(63),
            &json(""),
            "qemu-img: This image format does not support checks",
            false,
        )
        .unwrap();
        assert_eq!(outcome.result, CheckResult::NotSupported);
        assert_eq!(outcome.counts, CheckCounts::default());
    }

    #[test]
    fn failures() {
        let e = interpret(
            exited(1),
            &json(""),
            "qemu-img: Could not open 'x': Permission denied",
            false,
        )
        .unwrap_err();
        assert!(
            matches!(&e, QemuImgError::Failed { code: 1, stderr } if stderr.contains("Permission denied")),
            "{e:?}"
        );
        let e = interpret(exited(7), &json(REAL_LEAKS), "", false).unwrap_err();
        assert!(
            matches!(&e, QemuImgError::Failed { code: 7, stderr } if stderr == "(no error message)"),
            "{e:?}"
        );
        let e = interpret(ExitStatus::from_raw(9), &json(""), "", false).unwrap_err();
        assert!(matches!(e, QemuImgError::Killed { signal: 9 }), "{e:?}");
    }

    #[test]
    fn lock_conflict_only_on_exit_1() {
        let msg = "qemu-img: Could not open '/a.qcow2': Failed to get shared \"write\" lock\nIs another process using the image [/a.qcow2]?";
        let e = interpret(exited(1), &json(""), msg, false).unwrap_err();
        assert!(matches!(e, QemuImgError::LockConflict { .. }), "{e:?}");
        let e = interpret(exited(4), &json(""), msg, false).unwrap_err();
        assert!(matches!(e, QemuImgError::Failed { code: 4, .. }), "{e:?}");
        assert!(!is_lock_conflict("lock: Failed to get it"));
        assert!(is_lock_conflict("Failed to get \"consistent read\" lock"));
    }

    #[test]
    fn garbage() {
        for (out, want) in [
            (json(""), "no JSON output"),
            (json("  \n"), "no JSON output"),
            (json("hello"), "invalid JSON"),
            (json("[1, 2]"), "invalid JSON"),
            (json(r#"{"leaks": -1}"#), "invalid JSON"),
            (json(r#"{"leaks": 1} trailing"#), "invalid JSON"),
            (
                Stdout {
                    bytes: b"{}".to_vec(),
                    overflowed: true,
                    error: None,
                },
                "more than",
            ),
            (
                Stdout {
                    bytes: b"{}".to_vec(),
                    overflowed: false,
                    error: Some(io::Error::other("boom")),
                },
                "boom",
            ),
        ] {
            for code in [0, 2, 3] {
                match interpret(exited(code), &out, "err", false) {
                    Err(QemuImgError::Garbage { detail, stderr }) => {
                        assert!(detail.contains(want), "{detail}");
                        assert!(detail.contains(&format!("exit code {code}")), "{detail}");
                        assert_eq!(stderr, "err");
                    }
                    other => panic!("{out:?}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn head_tail_keeps_both_ends() {
        let mut h = HeadTail::new(8);
        h.push(b"ab");
        assert_eq!(h.render(), "ab");
        h.push(b"cdef");
        assert_eq!(h.render(), "abcdef");
        h.push(b"ghijkl");
        // head "abcd", tail "ijkl", 4 skipped
        let r = h.render();
        assert!(r.starts_with("abcd\n"), "{r}");
        assert!(r.ends_with("\nijkl"), "{r}");
        assert!(r.contains("4 bytes"), "{r}");
        h.push(b"0123456789");
        let r = h.render();
        assert!(r.starts_with("abcd\n") && r.ends_with("\n6789"), "{r}");
        assert!(r.contains("14 bytes"), "{r}");
    }

    #[test]
    fn head_tail_byte_by_byte_matches_bulk() {
        let data: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut bulk = HeadTail::new(100);
        bulk.push(&data);
        let mut single = HeadTail::new(100);
        for b in &data {
            single.push(std::slice::from_ref(b));
        }
        assert_eq!(bulk.render(), single.render());
        assert!(bulk.render().len() < 200);
    }

    #[test]
    fn head_tail_trims_and_survives_bad_utf8() {
        let mut h = HeadTail::new(4096);
        h.push(b"\n  qemu-img: \xff bad\n\n");
        assert_eq!(h.render(), "qemu-img: \u{fffd} bad");
    }

    #[tokio::test]
    async fn read_capped_drains_past_limit() {
        let data = vec![b'x'; 100_000];
        let out = read_capped(&data[..], 1000).await;
        assert_eq!(out.bytes.len(), 1000);
        assert!(out.overflowed);
        let out = read_capped(&data[..], 100_000).await;
        assert_eq!(out.bytes.len(), 100_000);
        assert!(!out.overflowed);
    }

    #[tokio::test]
    async fn read_head_tail_bounds_output() {
        let data = vec![b'e'; 1_000_000];
        let s = read_head_tail(&data[..], STDERR_KEEP).await;
        assert!(s.len() <= STDERR_KEEP + 100, "{}", s.len());
        assert!(s.contains("omitted"));
    }
}
