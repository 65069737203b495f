//! `vmctl`: command-line client of the VM Manager service.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use vmmanager_client::Error;
use vmmanager_client::names::report;
use vmmanager_client::options::Repair;
use zbus::{Connection, DBusError};

/// `println!` for stdout that a closed pipe (`vmctl … | head`) ends quietly,
/// as it ends coreutils: by SIGPIPE, exit status 141, no message.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

/// Writes one line to stdout; see [`outln!`].
fn write_stdout(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            // Rust ignores SIGPIPE; die of it now, as `cat` would have.
            // SAFETY: restoring a default disposition and raising a signal.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            std::process::exit(141);
        }
        Err(e) => {
            eprintln!("vmctl: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

mod agent;
mod devices;
mod disk;
mod generate;
mod monitor;
mod style;

/// Exit codes a script can rely on (they follow qemu-img check's where they
/// overlap).
mod exit {
    pub const CLEAN: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const CORRUPT: u8 = 2;
    pub const LEAKS: u8 = 3;
    pub const IN_USE: u8 = 4;
    pub const NOT_AUTHORIZED: u8 = 5;
    /// Detach: the host uses the device (`--force` would go ahead).
    pub const HOST_IN_USE: u8 = 6;
    pub const NOT_SUPPORTED: u8 = 63;
    pub const USAGE: u8 = 64;
    /// 128 + SIGINT, as shells report it.
    pub const INTERRUPTED: u8 = 130;
}

const EXIT_CODES_HELP: &str = "\
Exit status:
  0   the image is clean (or the command succeeded)
  1   error: the check could not be done (message on stderr)
  2   the image is corrupt
  3   the image has leaked clusters (harmless wasted space; --repair leaks)
  4   the image is in use by a running VM or another process
  5   not authorized (polkit said no)
  63  the format cannot be checked (e.g. raw)
  64  wrong command-line usage
  130 interrupted (Ctrl-C cancels the running check)";

// The other subcommands' exit statuses; `vmctl generate man` turns each of
// these into the EXIT STATUS section of the subcommand's page.
const DISK_USERS_EXIT_HELP: &str = "\
Exit status:
  0   the users were listed (no users is not an error)
  1   error: the image could not be examined (message on stderr)
  5   not authorized (polkit said no)
  64  wrong command-line usage";

const DEVICES_EXIT_HELP: &str = "\
Exit status:
  0   success
  1   error: no such device, or the service cannot be reached
  64  wrong command-line usage (e.g. not a PCI address)";

const REBIND_EXIT_HELP: &str = "\
Exit status:
  0   done; the device's driver now is printed (with --group, each
      member's)
  1   error (message on stderr)
  4   a running VM holds the device's IOMMU group
  5   not authorized (polkit said no)
  6   (detach) the host uses the device or a member of its group: the
      message names each use; --force detaches anyway
  64  wrong command-line usage (e.g. not a PCI address)";

const MONITOR_EXIT_HELP: &str = "\
Exit status:
  0   stopped with Ctrl-C
  1   error: the service cannot be reached, or the bus connection closed
  64  wrong command-line usage";

/// Control the VM Manager service (org.example.VmManager).
///
/// vmctl checks VM disk images safely -- never while a running VM uses
/// them -- and shows who uses an image; it lists the host's PCI devices with
/// their passthrough readiness, binds them to vfio-pci and back, and follows
/// the service's events live. Authorization is decided by polkit, which may
/// ask for a password: on the terminal vmctl runs on, or else in the
/// desktop's dialog.
#[derive(Debug, Parser)]
#[command(name = "vmctl", version, about, long_about, after_long_help = EXIT_CODES_HELP)]
struct Cli {
    /// Talk to the service on this D-Bus address instead of the system bus
    /// (e.g. unix:path=/run/vmmanager-test/bus). polkit's text agent
    /// registers there too.
    #[arg(long, global = true, value_name = "ADDRESS")]
    bus_address: Option<String>,

    /// Never let polkit ask for a password; fail with "not authorized"
    /// (exit status 5) instead, for scripts and cron jobs. Without it, when
    /// stdin is a terminal and vmctl is not root, vmctl runs polkit's text
    /// agent (pkttyagent) for the call, and polkit asks for the password on
    /// that terminal; without a terminal, a desktop's agent may ask.
    #[arg(long, global = true)]
    no_ask_password: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a disk image with qemu-img, unless a VM uses it.
    ///
    /// The service first makes sure no running VM or other process uses the
    /// image (PID files, /proc, QEMU's image locks). If one does, nothing is
    /// checked and vmctl names the VM and its PID (exit status 4). Otherwise
    /// qemu-img check runs with your credentials and the result is printed.
    #[command(after_long_help = EXIT_CODES_HELP)]
    CheckDisk {
        /// The image file (qcow2, qed, vdi, vhdx, vmdk, parallels; raw
        /// images have nothing to check).
        path: PathBuf,
        /// The VM's PID file (e.g. Quickemu's `<vm>/<vm>.pid`); by default the
        /// service looks next to the image and in libvirt's and Proxmox's
        /// run directories.
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
        /// If the image is in use, check it anyway, read-only (qemu-img -U).
        /// The result may show inconsistencies that are only the running
        /// VM's writes in flight.
        #[arg(long)]
        force_share: bool,
        /// Repair the image (qemu-img check -r); refused while it is in use.
        /// "leaks" only frees leaked clusters and is safe; "all" also fixes
        /// corruptions and may lose data: make a copy first.
        #[arg(long, value_name = "WHAT", value_parser = repair_parser())]
        repair: Option<Repair>,
        /// Give up after this many seconds (default: the service's setting).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u32>,
        /// Print the full report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show which VMs and processes use a disk image, without checking it.
    #[command(after_long_help = DISK_USERS_EXIT_HELP)]
    DiskUsers {
        /// The image file.
        path: PathBuf,
        /// The VM's PID file, as for check-disk.
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
        /// Print the users as one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// List the host's PCI devices and whether each can be passed through.
    ///
    /// One line per device: address, vendor:device ids, bound driver, IOMMU
    /// group, passthrough readiness (or the first reason it is not ready),
    /// which VM holds its VFIO group, and the names from the udev hwdb.
    #[command(after_long_help = DEVICES_EXIT_HELP)]
    Devices {
        /// Print all properties of every device as one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show every property of one PCI device.
    #[command(after_long_help = DEVICES_EXIT_HELP)]
    Device {
        /// The PCI address, e.g. 0000:03:00.0.
        address: String,
        /// Print the properties as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Bind a PCI device to vfio-pci so a VM can use it.
    ///
    /// Writes vfio-pci to its driver_override, unbinds it from its driver and
    /// lets the kernel probe it again; the original driver is remembered for
    /// reattach. Refused while a VM holds the device's IOMMU group, and
    /// while the host uses the device (or, with --group, a member): a
    /// mounted file system or swap on its disks, an interface that is up
    /// with addresses or carries the default route, the boot display or a
    /// connected monitor, a framebuffer, processes holding its device
    /// nodes -- each use is named (`vmctl device ADDRESS` shows them
    /// beforehand, as HostUsers). Every device in the group must be on
    /// vfio-pci before QEMU can use any of them (see PassthroughBlockers);
    /// --group binds them all at once.
    #[command(after_long_help = REBIND_EXIT_HELP)]
    Detach {
        /// The PCI address, e.g. 0000:03:00.0.
        address: String,
        /// Detach even though the host uses the device: the host loses
        /// what the refusal named (a file system mounted from it, a
        /// network, the display). polkit asks for an administrator's
        /// password every time (org.example.vmmanager.force-detach).
        #[arg(long)]
        force: bool,
        /// Give the device back to its driver by itself once the last VM
        /// using it exits: reset (when it can be), reattached, and checked
        /// to be bound again; `vmctl monitor` and the desktop notifications
        /// say how it went. With --group, every member detached here. On a
        /// device already detached by vmctl, only marks it.
        #[arg(long)]
        auto_return: bool,
        /// Bind every device of its IOMMU group (bridges excepted) to
        /// vfio-pci, each one's driver remembered; members already on
        /// vfio-pci are left alone. If one fails, those bound by this call
        /// are given back and the error says what failed and what was
        /// rolled back.
        #[arg(long)]
        group: bool,
        /// Also bind it to vfio-pci at every boot and hotplug (with
        /// --group, every device of the group): writes vfio-pci to
        /// /etc/driverctl.d/pci-ADDRESS, driverctl's format, once the
        /// detach succeeded. Refused, with nothing changed, when that file
        /// names another driver. `reattach --persistent` removes it.
        #[arg(long)]
        persistent: bool,
        /// Print {"address", "driver"} (or the error) as one JSON object;
        /// with --group, "group" lists each member's address and driver.
        #[arg(long)]
        json: bool,
    },
    /// Give a detached PCI device back to its original driver.
    #[command(after_long_help = REBIND_EXIT_HELP)]
    Reattach {
        /// The PCI address, e.g. 0000:03:00.0.
        address: String,
        /// Give back the device and every member of its IOMMU group that
        /// `detach` bound to vfio-pci, each to its own original driver.
        /// Members put on vfio-pci otherwise (at boot, by driverctl or by
        /// hand) stay there. Rolled back like `detach --group`.
        #[arg(long)]
        group: bool,
        /// Also remove its claim for vfio-pci at boot (`detach
        /// --persistent`, or driverctl's for vfio-pci); with --group, also
        /// the claims vmmanager wrote for the members it gives back.
        #[arg(long)]
        persistent: bool,
        /// Print {"address", "driver"} (or the error) as one JSON object;
        /// with --group, "group" lists each member's address and driver.
        #[arg(long)]
        json: bool,
    },
    /// Print device and disk-check events as they happen, until Ctrl-C.
    #[command(after_long_help = MONITOR_EXIT_HELP)]
    Monitor {
        /// One JSON document per line (JSON Lines).
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// Whether the call may need polkit to ask for a password.
    fn may_ask(&self) -> bool {
        match self {
            Command::CheckDisk { .. }
            | Command::DiskUsers { .. }
            | Command::Detach { .. }
            | Command::Reattach { .. } => true,
            Command::Devices { .. } | Command::Device { .. } | Command::Monitor { .. } => false,
        }
    }
}

/// `--repair leaks|all`, spelled as the service's option values.
fn repair_parser() -> impl clap::builder::TypedValueParser<Value = Repair> {
    clap::builder::PossibleValuesParser::new(Repair::ALL.map(Repair::as_str))
        .map(|value| value.parse().expect("one of the possible values"))
}

/// A failure, with the exit status it maps to.
struct Failure {
    code: u8,
    /// The D-Bus error name: the one of the error reply, or for a failure
    /// of vmctl's own, the service's name for that kind of failure.
    error_name: Option<String>,
    message: String,
}

impl Failure {
    /// Wrong usage: the service's InvalidArgument, without asking it.
    fn usage(message: String) -> Self {
        Failure::local(exit::USAGE, Error::InvalidArgument(message))
    }

    /// A failure vmctl found itself, named as the service would name it.
    fn local(code: u8, error: Error) -> Self {
        Failure {
            code,
            error_name: error.reply_name(),
            message: error.description().unwrap_or_default().to_owned(),
        }
    }

    /// `subject` plus `"error": "org.example.VmManager1.Error.InUse",
    /// "error-message": …`, the keys of the DiskChecked signal.
    fn to_json(&self, subject: Option<(&str, String)>) -> serde_json::Value {
        let mut doc = serde_json::Map::new();
        if let Some((key, value)) = subject {
            doc.insert(key.into(), value.into());
        }
        // No reply at all (e.g. no bus): an unexpected failure.
        let name = self
            .error_name
            .clone()
            .or_else(|| Error::Failed(String::new()).reply_name());
        doc.insert(report::ERROR.into(), name.into());
        doc.insert(report::ERROR_MESSAGE.into(), self.message.clone().into());
        serde_json::Value::Object(doc)
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::InUse(_) => exit::IN_USE,
            Error::HostInUse(_) => exit::HOST_IN_USE,
            Error::NotAuthorized(_) => exit::NOT_AUTHORIZED,
            _ => exit::ERROR,
        };
        let message = match &error {
            Error::ZBus(zbus::Error::MethodError(name, message, _)) => {
                message.clone().unwrap_or_else(|| name.to_string())
            }
            Error::ZBus(e @ (zbus::Error::InputOutput(_) | zbus::Error::Address(_))) => format!(
                "cannot reach the VM Manager service: {e} (is the system bus running, or \
                 --bus-address right?)"
            ),
            Error::ZBus(e) => e.to_string(),
            service => service.description().unwrap_or_default().to_owned(),
        };
        Failure {
            code,
            error_name: error.reply_name(),
            message,
        }
    }
}

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Self {
        Failure::from(Error::from(e))
    }
}

fn main() -> ExitCode {
    // `vmctl generate …` is parsed apart from `Cli`, so that it appears in
    // neither the completions nor the man pages generated from `Cli`.
    if std::env::args_os().nth(1).is_some_and(|a| a == "generate") {
        let parsed = generate::Generate::try_parse_from(std::env::args_os().skip(1));
        return match parsed.map(|g| generate::run(&g.what)) {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("{} {e}", style::error_prefix());
                ExitCode::from(exit::ERROR)
            }
            Err(e) => {
                let _ = e.print();
                ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 })
            }
        };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    // Before the runtime exists, while vmctl has one thread to fork from.
    let agent = if agent::wanted(cli.command.may_ask() && !cli.no_ask_password) {
        agent::TtyAgent::start(cli.bus_address.as_deref())
            .inspect_err(|e| tracing::debug!("going on without a password prompt: {e}"))
            .ok()
    } else {
        None
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{} {e}", style::error_prefix());
            return ExitCode::from(exit::ERROR);
        }
    };
    let json = json_subject(&cli.command);
    let result = runtime.block_on(run(&cli));
    // The call is over (or failed, or was interrupted): nothing more to ask.
    drop(agent);
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            // With --json, a failure is a JSON document too (one line in
            // monitor's JSON Lines), so a script parsing stdout always has
            // something to parse; the message still goes to stderr.
            match json {
                Some(subject) if matches!(cli.command, Command::Monitor { .. }) => {
                    outln!("{}", failure.to_json(subject));
                }
                Some(subject) => outln!("{:#}", failure.to_json(subject)),
                None => {}
            }
            eprintln!("{} {}", style::error_prefix(), failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// `None` without --json; else what a JSON error document names, e.g.
/// `("image", "/abs/path")` (no key for devices and monitor).
fn json_subject(command: &Command) -> Option<Option<(&'static str, String)>> {
    let image =
        |path: &Path| absolute(path).unwrap_or_else(|_| path.to_string_lossy().into_owned());
    match command {
        Command::CheckDisk {
            path, json: true, ..
        }
        | Command::DiskUsers {
            path, json: true, ..
        } => Some(Some((report::IMAGE, image(path)))),
        Command::Device {
            address,
            json: true,
        }
        | Command::Detach {
            address,
            json: true,
            ..
        }
        | Command::Reattach {
            address,
            json: true,
            ..
        } => Some(Some(("address", address.clone()))),
        Command::Devices { json: true } | Command::Monitor { json: true } => Some(None),
        _ => None,
    }
}

async fn connect(cli: &Cli) -> Result<Connection, Failure> {
    let (builder, bus) = match &cli.bus_address {
        Some(address) => (
            zbus::connection::Builder::address(address.as_str()),
            address.clone(),
        ),
        None => (zbus::connection::Builder::system(), "the system bus".into()),
    };
    builder.build().await.map_err(|e| Failure {
        code: exit::ERROR,
        error_name: None,
        message: format!("cannot connect to {bus}: {e}"),
    })
}

/// The service wants absolute paths; a relative one is relative to where
/// vmctl runs, not where the service runs.
fn absolute(path: &Path) -> Result<String, Failure> {
    let absolute = std::path::absolute(path)
        .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|_| Failure::usage(format!("{}: the path is not valid UTF-8", path.display())))
}

async fn run(cli: &Cli) -> Result<u8, Failure> {
    let connection = connect(cli).await?;
    let ask = !cli.no_ask_password;
    match &cli.command {
        Command::CheckDisk {
            path,
            pidfile,
            force_share,
            repair,
            timeout,
            json,
        } => {
            let args = disk::CheckArgs {
                path,
                pidfile: pidfile.as_deref(),
                force_share: *force_share,
                repair: *repair,
                timeout: *timeout,
                json: *json,
            };
            disk::check_disk(&connection, ask, args).await
        }
        Command::DiskUsers {
            path,
            pidfile,
            json,
        } => disk::disk_users(&connection, ask, path, pidfile.as_deref(), *json).await,
        Command::Devices { json } => devices::devices(&connection, *json).await,
        Command::Device { address, json } => devices::device(&connection, address, *json).await,
        Command::Detach {
            address,
            force,
            auto_return,
            group,
            persistent,
            json,
        } => {
            let how = devices::Rebind {
                to_vfio: true,
                group: *group,
                force: *force,
                auto_return: *auto_return,
                persistent: *persistent,
            };
            devices::rebind(&connection, ask, address, how, *json).await
        }
        Command::Reattach {
            address,
            group,
            persistent,
            json,
        } => {
            let how = devices::Rebind {
                to_vfio: false,
                group: *group,
                force: false,
                auto_return: false,
                persistent: *persistent,
            };
            devices::rebind(&connection, ask, address, how, *json).await
        }
        Command::Monitor { json } => monitor::monitor(&connection, *json).await,
    }
}
