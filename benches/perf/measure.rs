//! Timing contenders side by side, and reading a process's footprint.

use std::fs;
use std::time::Instant;

use crate::common::util::rss_kib;
use crate::report::millis;

/// `rounds` timed rounds after `warmup` untimed ones (page cache, polkitd's
/// JavaScript engine and lazily set up state are warm afterwards), each
/// calling every contender once. The order rotates every round, so drift
/// (other load, frequency) and whatever one contender leaves warm for the
/// next hit all alike. Returns each contender's times in ms.
pub fn interleave(warmup: usize, rounds: usize, contenders: &[&dyn Fn()]) -> Vec<Vec<f64>> {
    for _ in 0..warmup {
        contenders.iter().for_each(|f| f());
    }
    let mut times = vec![Vec::with_capacity(rounds); contenders.len()];
    for round in 0..rounds {
        for i in 0..contenders.len() {
            let k = (round + i) % contenders.len();
            let start = Instant::now();
            contenders[k]();
            times[k].push(millis(start.elapsed()));
        }
    }
    times
}

/// VmRSS of `pid` in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    rss_kib(pid) as f64 / 1024.0
}

/// Processes on the machine (numeric entries of /proc).
pub fn process_count() -> usize {
    fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .count()
}

/// CPU time `pid` has used so far, its own and (second) that of its
/// children it has reaped, in milliseconds.
pub fn cpu_millis(pid: u32) -> (f64, f64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields resume after the last ')': utime is field 14, so index 11 here.
    let fields: Vec<u64> = stat[stat.rfind(')').expect("malformed stat") + 2..]
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().expect("numeric CPU field"))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ms = |t: u64| t as f64 * 1000.0 / ticks;
    (ms(fields[0] + fields[1]), ms(fields[2] + fields[3]))
}

/// CPU time this process's reaped children have used, in milliseconds.
pub fn children_cpu_millis() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}
