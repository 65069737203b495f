//! `check-disk` and `disk-users`.

use std::collections::HashMap;
use std::path::Path;

use vmmanager::client::{JobProxy, ManagerProxy, dict_to_json, variant_to_json};
use zbus::{Connection, OwnedVariant, Variant};

use crate::{Failure, Repair, absolute, exit, style};

pub struct CheckArgs<'a> {
    pub path: &'a Path,
    pub pidfile: Option<&'a Path>,
    pub force_share: bool,
    pub repair: Option<Repair>,
    pub timeout: Option<u32>,
    pub json: bool,
}

pub async fn check_disk(
    connection: &Connection,
    mut options: HashMap<&str, Variant<'_>>,
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
    if let Some(pidfile) = pidfile {
        options.insert("pidfile", Variant::from(absolute(pidfile)?));
    }
    if force_share {
        options.insert("force-share", Variant::from(true));
    }
    if let Some(repair) = repair {
        let what = match repair {
            Repair::Leaks => "leaks",
            Repair::All => "all",
        };
        options.insert("repair", Variant::from(what));
    }
    if let Some(timeout) = timeout {
        options.insert("timeout-sec", Variant::from(timeout));
    }
    let result = tokio::select! {
        result = manager.check_disk(&image, options) => result,
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
        Ok(report) => {
            if json {
                outln!("{:#}", dict_to_json(&report));
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
    mut options: HashMap<&str, Variant<'_>>,
    path: &Path,
    pidfile: Option<&Path>,
    json: bool,
) -> Result<u8, Failure> {
    let manager = ManagerProxy::new(connection).await?;
    let image = absolute(path)?;
    if let Some(pidfile) = pidfile {
        options.insert("pidfile", Variant::from(absolute(pidfile)?));
    }
    let users = manager.get_disk_users(&image, options).await?;
    if json {
        let list: Vec<_> = users.iter().map(dict_to_json).collect();
        outln!("{:#}", serde_json::Value::Array(list));
    } else if users.is_empty() {
        outln!("{image}: {}", style::out(style::GREEN, "not in use"));
    } else {
        outln!("{image}: {}", style::out(style::YELLOW, "used by"));
        for user in &users {
            outln!("  {}", describe_user(user));
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
            let _ = job.cancel(HashMap::new()).await;
        }
    }
}

fn get_str<'a>(dict: &'a HashMap<String, OwnedVariant>, key: &str) -> &'a str {
    match dict.get(key).map(|v| &**v) {
        Some(Variant::Str(s)) => s.as_str(),
        _ => "",
    }
}

fn get_u64(dict: &HashMap<String, OwnedVariant>, key: &str) -> u64 {
    match dict.get(key).map(|v| &**v) {
        Some(Variant::U64(n)) => *n,
        Some(Variant::U32(n)) => (*n).into(),
        _ => 0,
    }
}

fn get_bool(dict: &HashMap<String, OwnedVariant>, key: &str) -> bool {
    matches!(dict.get(key).map(|v| &**v), Some(Variant::Bool(true)))
}

/// `PID 4242 qemu-system-x86_64, VM "win11", writing (found by pidfile, proc, lock)`
fn describe_user(user: &HashMap<String, OwnedVariant>) -> String {
    let pid = get_u64(user, "pid");
    let exe = get_str(user, "exe");
    let exe = Path::new(exe)
        .file_name()
        .map_or(exe.into(), |n| n.to_string_lossy());
    let mut text = if pid == 0 {
        "a process in another PID namespace".to_owned()
    } else {
        format!("PID {pid} {exe}")
    };
    let vm = get_str(user, "vm-name");
    if !vm.is_empty() {
        text += &format!(", VM \"{vm}\"");
    }
    text += if get_bool(user, "writable") {
        ", writing"
    } else {
        ", read-only"
    };
    let found_by = user
        .get("found-by")
        .map(|v| variant_to_json(v))
        .and_then(|j| serde_json::from_value::<Vec<String>>(j).ok())
        .unwrap_or_default();
    let pidfile = get_str(user, "pidfile");
    text += &format!(" (found by {}", found_by.join(", "));
    if !pidfile.is_empty() {
        text += &format!("; PID file {pidfile}");
    }
    text + ")"
}

fn print_report(report: &HashMap<String, OwnedVariant>) {
    let image = get_str(report, "image");
    let format = get_str(report, "format");
    let result = get_str(report, "result");
    let summary = match result {
        "clean" => style::out(style::GREEN, "no errors found").into_owned(),
        "leaks" => format!(
            "{}: wasted space, no data at risk; free it with --repair leaks",
            style::out(
                style::YELLOW,
                &format!("{} leaked cluster(s)", get_u64(report, "leaks"))
            )
        ),
        "corrupt" => format!(
            "{} {} corruption(s), {} leaked cluster(s); back up the image before \
             --repair all",
            style::out(style::RED, "CORRUPT:"),
            get_u64(report, "corruptions"),
            get_u64(report, "leaks")
        ),
        "not-supported" => format!("the {format} format has nothing to check"),
        other => other.to_owned(),
    };
    outln!("{image} ({format}): {summary}");
    let (leaks_fixed, corruptions_fixed) = (
        get_u64(report, "leaks-fixed"),
        get_u64(report, "corruptions-fixed"),
    );
    if leaks_fixed + corruptions_fixed > 0 {
        outln!("  repaired: {leaks_fixed} leak(s), {corruptions_fixed} corruption(s)");
    }
    let total = get_u64(report, "total-clusters");
    if total > 0 {
        outln!(
            "  clusters: {} of {total} allocated, {} fragmented, {} compressed",
            get_u64(report, "allocated-clusters"),
            get_u64(report, "fragmented-clusters"),
            get_u64(report, "compressed-clusters")
        );
    }
    if !get_bool(report, "consistent") {
        outln!(
            "  {}: checked while in use (--force-share); results may not be consistent",
            style::out(style::YELLOW, "note")
        );
    }
    if let Some(Variant::Array(users)) = report.get("users").map(|v| &**v) {
        for user in users.iter() {
            if let Ok(user) = HashMap::<String, OwnedVariant>::try_from(user.clone()) {
                let used_by = style::out(style::YELLOW, "used by");
                outln!("  {used_by} {}", describe_user(&user));
            }
        }
    }
    if let Some(stale) = report.get("stale-pidfiles").map(|v| variant_to_json(v))
        && let Some(list) = stale.as_array()
    {
        for pidfile in list.iter().filter_map(|p| p.as_str()) {
            outln!("  stale PID file (no such VM running): {pidfile}");
        }
    }
}

fn exit_code_for(report: &HashMap<String, OwnedVariant>) -> u8 {
    match get_str(report, "result") {
        "clean" => exit::CLEAN,
        "leaks" => exit::LEAKS,
        "corrupt" => exit::CORRUPT,
        "not-supported" => exit::NOT_SUPPORTED,
        _ => exit::ERROR,
    }
}
