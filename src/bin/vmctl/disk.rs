//! `check-disk` and `disk-users`.

use std::path::Path;

use vmmanager_client::json::dict_to_json;
use vmmanager_client::options::{AuthOptions, CheckDiskOptions, GetDiskUsersOptions, Repair};
use vmmanager_client::{CheckReport, CheckResult, DiskUser, FoundBy, JobProxy, ManagerProxy};
use zbus::Connection;

use crate::{Failure, absolute, exit, style};

pub struct CheckArgs<'a> {
    pub path: &'a Path,
    pub pidfile: Option<&'a Path>,
    pub force_share: bool,
    pub repair: Option<Repair>,
    pub timeout: Option<u32>,
    pub json: bool,
}

/// `ask`: polkit may prompt for a password.
pub async fn check_disk(
    connection: &Connection,
    ask: bool,
    args: CheckArgs<'_>,
) -> Result<u8, Failure> {
    let manager = ManagerProxy::new(connection).await?;
    let CheckArgs {
        path,
        pidfile,
        force_share,
        repair,
        timeout,
        json,
    } = args;
    let image = absolute(path)?;
    let mut options = CheckDiskOptions::new()
        .force_share(force_share)
        .no_user_interaction(!ask);
    if let Some(pidfile) = pidfile {
        options = options.pidfile(absolute(pidfile)?);
    }
    if let Some(repair) = repair {
        options = options.repair(repair);
    }
    if let Some(timeout) = timeout {
        options = options.timeout_sec(timeout);
    }
    let result = tokio::select! {
        result = manager.check_disk(&image, options.build()) => result,
        _ = tokio::signal::ctrl_c() => {
            cancel_own_job(connection, &manager, &image).await;
            return Err(Failure {
                code: exit::INTERRUPTED,
                error_name: None,
                message: "interrupted; the check was cancelled".into(),
            });
        }
    };
    match result {
        Ok(dict) => {
            let report = CheckReport::from_dict(&dict);
            if json {
                outln!("{:#}", dict_to_json(&dict));
            } else {
                print_report(&report);
            }
            Ok(exit_code_for(&report))
        }
        // main prints the JSON error document.
        Err(e) => Err(Failure::from(e)),
    }
}

pub async fn disk_users(
    connection: &Connection,
    ask: bool,
    path: &Path,
    pidfile: Option<&Path>,
    json: bool,
) -> Result<u8, Failure> {
    let manager = ManagerProxy::new(connection).await?;
    let image = absolute(path)?;
    let mut options = GetDiskUsersOptions::new().no_user_interaction(!ask);
    if let Some(pidfile) = pidfile {
        options = options.pidfile(absolute(pidfile)?);
    }
    let users = manager.get_disk_users(&image, options.build()).await?;
    if json {
        let list: Vec<_> = users.iter().map(dict_to_json).collect();
        outln!("{:#}", serde_json::Value::Array(list));
    } else if users.is_empty() {
        outln!("{image}: {}", style::out(style::GREEN, "not in use"));
    } else {
        outln!("{image}: {}", style::out(style::YELLOW, "used by"));
        for user in &users {
            outln!("  {}", describe_user(&DiskUser::from_dict(user)));
        }
    }
    Ok(exit::CLEAN)
}

/// Ctrl-C while a check runs: cancel our own job on that image, so qemu-img
/// stops too, rather than leaving the check running without anyone waiting.
async fn cancel_own_job(connection: &Connection, manager: &ManagerProxy<'_>, image: &str) {
    use std::os::unix::fs::MetadataExt;
    let my_uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let canonical = std::fs::canonicalize(image)
        .ok()
        .and_then(|p| p.into_os_string().into_string().ok());
    let Ok(jobs) = manager.jobs().await else {
        return;
    };
    for path in jobs {
        let Ok(job) = JobProxy::builder(connection).path(path).build().await else {
            continue;
        };
        let target = job.target().await.unwrap_or_default();
        let ours = Some(job.started_by_uid().await.unwrap_or(u32::MAX)) == my_uid;
        if ours && (target == image || Some(&target) == canonical.as_ref()) {
            let _ = job.cancel(AuthOptions::new().build()).await;
        }
    }
}

/// `PID 4242 qemu-system-x86_64, VM "win11", writing (found by pidfile, proc, lock)`
fn describe_user(user: &DiskUser) -> String {
    let exe = Path::new(&user.exe)
        .file_name()
        .map_or(user.exe.as_str().into(), |n| n.to_string_lossy());
    let mut text = if user.pid == 0 {
        "a process in another PID namespace".to_owned()
    } else {
        format!("PID {} {exe}", user.pid)
    };
    if !user.vm_name.is_empty() {
        text += &format!(", VM \"{}\"", user.vm_name);
    }
    text += if user.writable {
        ", writing"
    } else {
        ", read-only"
    };
    let found_by: Vec<&str> = user.found_by.iter().map(FoundBy::as_str).collect();
    text += &format!(" (found by {}", found_by.join(", "));
    if !user.pidfile.is_empty() {
        text += &format!("; PID file {}", user.pidfile);
    }
    text + ")"
}

fn print_report(report: &CheckReport) {
    let CheckReport { image, format, .. } = report;
    let summary = match &report.result {
        Some(CheckResult::Clean) => style::out(style::GREEN, "no errors found").into_owned(),
        Some(CheckResult::Leaks) => format!(
            "{}: wasted space, no data at risk; free it with --repair leaks",
            style::out(
                style::YELLOW,
                &format!("{} leaked cluster(s)", report.leaks)
            )
        ),
        Some(CheckResult::Corrupt) => format!(
            "{} {} corruption(s), {} leaked cluster(s); back up the image before \
             --repair all",
            style::out(style::RED, "CORRUPT:"),
            report.corruptions,
            report.leaks
        ),
        Some(CheckResult::NotSupported) => format!("the {format} format has nothing to check"),
        Some(CheckResult::Unknown(other)) => other.clone(),
        None => String::new(),
    };
    outln!("{image} ({format}): {summary}");
    let (leaks_fixed, corruptions_fixed) = (report.leaks_fixed, report.corruptions_fixed);
    if leaks_fixed + corruptions_fixed > 0 {
        outln!("  repaired: {leaks_fixed} leak(s), {corruptions_fixed} corruption(s)");
    }
    let total = report.total_clusters;
    if total > 0 {
        outln!(
            "  clusters: {} of {total} allocated, {} fragmented, {} compressed",
            report.allocated_clusters,
            report.fragmented_clusters,
            report.compressed_clusters
        );
    }
    if !report.consistent {
        outln!(
            "  {}: checked while in use (--force-share); results may not be consistent",
            style::out(style::YELLOW, "note")
        );
    }
    for user in &report.users {
        let used_by = style::out(style::YELLOW, "used by");
        outln!("  {used_by} {}", describe_user(user));
    }
    for pidfile in &report.stale_pidfiles {
        outln!("  stale PID file (no such VM running): {pidfile}");
    }
}

fn exit_code_for(report: &CheckReport) -> u8 {
    match &report.result {
        Some(CheckResult::Clean) => exit::CLEAN,
        Some(CheckResult::Leaks) => exit::LEAKS,
        Some(CheckResult::Corrupt) => exit::CORRUPT,
        Some(CheckResult::NotSupported) => exit::NOT_SUPPORTED,
        Some(CheckResult::Unknown(_)) | None => exit::ERROR,
    }
}
