"""A throwaway Debian guest for system tests, controlled through the QEMU guest
agent (python3 standard library only).

    with Guest(image_prefix, share_dir=...) as guest:
        result = guest.run("lspci -nn")      # ExecResult(exitcode, stdout, stderr)
        shutdown_s, boot_s = guest.reboot()  # clean power-off, boot on the same disks

The guest boots from a qcow2 overlay whose read-only backing file is the
cached image of `build-image`; the overlay, the agent socket and the serial
log live in a temp dir that is removed, and QEMU killed, when the `with`
block ends, however it ends. QEMU also dies with this process (PDEATHSIG),
so a killed test leaves no VM behind; the work dir it leaves is removed by
the next run.

TCG unless a short probe shows that KVM boots the guest kernel here
(VMM_SYSTEM_TEST_ACCEL=kvm|tcg overrides the probe).
"""

import base64
import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

CACHE_DIR = os.environ.get("VMM_SYSTEM_TEST_CACHE", "/var/cache/vmmanager-system-test")
QEMU = os.environ.get("VMM_SYSTEM_TEST_QEMU", "qemu-system-x86_64")
SHARE_TAG = "hostshare"  # the guest's fstab mounts it on /mnt/host
# The blank disk behind the PCI bridge: /dev/disk/by-id/virtio-<serial>.
GATED_DISK_SERIAL = "gated"
GATED_DISK_BYTES = 16 << 20
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 intel_iommu=on iommu=pt panic=-1"


class GuestError(Exception):
    """The guest could not be started or controlled."""


class AgentError(GuestError):
    """The guest agent did not answer, or answered with an error."""


class ExecTimeout(GuestError):
    """A command in the guest ran past its bound."""


@dataclass
class ExecResult:
    exitcode: int | None  # None when killed by a signal
    signal: int | None
    stdout: str
    stderr: str
    truncated: bool

    @property
    def ok(self) -> bool:
        return self.exitcode == 0


class Agent:
    """Client of the guest agent's JSON protocol on QEMU's unix socket."""

    def __init__(self, path: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._buffer = b""

    def close(self) -> None:
        self._sock.close()

    def _send(self, message: dict) -> None:
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def _receive(self, deadline: float) -> dict | None:
        """The next JSON message, or None at the deadline."""
        while True:
            # 0xFF only delimits guest-sync-delimited replies; it never occurs
            # inside UTF-8 JSON.
            self._buffer = self._buffer.replace(b"\xff", b"")
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = rest
                if line.strip():
                    try:
                        return json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a fragment from before a parser reset
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                return None
            if not data:
                raise AgentError("agent socket closed (QEMU exited?)")
            self._buffer += data

    def sync(self, seconds: float) -> bool:
        """Sends one guest-sync-delimited and reads until its own reply, so
        that replies to earlier, unanswered syncs (queued while the agent was
        not yet running) are consumed. False if none came within `seconds`."""
        sync_id = random.randrange(1, 2**31)
        self._sock.sendall(b"\xff")  # resets the agent's parser
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
        deadline = time.monotonic() + seconds
        while (message := self._receive(deadline)) is not None:
            if message.get("return") == sync_id:
                return True
        return False

    def notify(self, name: str, arguments: dict | None = None) -> None:
        """Sends a command that answers nothing on success (guest-shutdown)."""
        message = {"execute": name}
        if arguments is not None:
            message["arguments"] = arguments
        self._send(message)

    def command(self, name: str, arguments: dict | None = None, timeout: float = 30):
        message = {"execute": name}
        if arguments is not None:
            message["arguments"] = arguments
        self._send(message)
        reply = self._receive(time.monotonic() + timeout)
        if reply is None:
            raise AgentError(f"{name}: no reply within {timeout} s")
        if "error" in reply:
            raise AgentError(f"{name}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def exec(self, argv: list[str], timeout: float, stdin: bytes | None = None) -> ExecResult:
        """Runs argv in the guest (guest-exec), polls guest-exec-status until
        it exits or `timeout` passes."""
        arguments = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        pid = self.command("guest-exec", arguments)["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = self.command("guest-exec-status", {"pid": pid})
            if status["exited"]:
                return ExecResult(
                    exitcode=status.get("exitcode"),
                    signal=status.get("signal"),
                    stdout=_decode(status.get("out-data")),
                    stderr=_decode(status.get("err-data")),
                    truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
                )
            if time.monotonic() > deadline:
                raise ExecTimeout(f"{argv!r} still running after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _decode(data: str | None) -> str:
    return base64.b64decode(data).decode(errors="replace") if data else ""


WORK_PARENT = "/var/tmp"
WORK_PREFIX = "vmm-guest."
OWNER_FILE = "owner"  # "PID STARTTIME" of the process that made the dir


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a live owner from a reused PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def remove_abandoned_work_dirs() -> None:
    """Work dirs of runners that were SIGKILLed (their QEMU died with them,
    by PDEATHSIG, but nobody removed the overlay)."""
    for name in os.listdir(WORK_PARENT):
        if not name.startswith(WORK_PREFIX):
            continue
        path = os.path.join(WORK_PARENT, name)
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                pid, start = f.read().split()
        except (OSError, ValueError):
            continue  # being created, or not ours: leave it
        if _start_time(int(pid)) != start:
            shutil.rmtree(path, ignore_errors=True)


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it when this process dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def build_image() -> str:
    """The cached image's prefix, building it first if needed."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build-image")
    out = subprocess.run([script], stdout=subprocess.PIPE, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _qemu_version() -> str:
    return subprocess.run([QEMU, "--version"], stdout=subprocess.PIPE, text=True).stdout


def choose_accel(kernel: str) -> str:
    """'kvm' only if KVM boots this kernel here, else 'tcg'. Some hosts'
    /dev/kvm cannot run a stock kernel (it aborts or hangs in the
    decompressor), so a short probe decides: boot the kernel without a root
    file system and wait for its panic. The answer is cached per host kernel,
    QEMU and guest kernel. VMM_SYSTEM_TEST_ACCEL=kvm|tcg skips the probe."""
    forced = os.environ.get("VMM_SYSTEM_TEST_ACCEL", "auto")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    key = hashlib.sha256(
        (os.uname().release + _qemu_version() + os.path.basename(kernel)).encode()
    ).hexdigest()[:16]
    answer_file = os.path.join(CACHE_DIR, f"kvm-probe-{key}")
    try:
        with open(answer_file) as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    with tempfile.TemporaryDirectory(prefix="vmm-kvm-probe.") as work:
        serial = os.path.join(work, "serial.log")
        command = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                   "-accel", "kvm", "-cpu", "host", "-m", "256", "-serial", f"file:{serial}",
                   "-kernel", kernel, "-append", "console=ttyS0 panic=-1"]
        try:
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=20, preexec_fn=_die_with_parent)
        except subprocess.TimeoutExpired:
            pass
        with open(serial, errors="replace") as f:
            booted = "Kernel panic" in f.read()
    answer = "kvm" if booted else "tcg"
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(answer_file, "w") as f:
        f.write(answer + "\n")
    return answer


class Guest:
    """A booted guest; use as a context manager."""

    def __init__(self, image_prefix: str, share_dir: str | None = None,
                 memory_mb: int = 512, cpus: int = 2, boot_timeout: float = 180,
                 serial_log: str | None = None):
        self.image_prefix = image_prefix
        self.share_dir = share_dir
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.serial_log_copy = serial_log
        self.accel = None
        self._work = None
        self._qemu = None
        self._agent = None
        self._command: list[str] = []

    def __enter__(self) -> "Guest":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def serial_path(self) -> str:
        return os.path.join(self._work, "serial.log")

    def serial_tail(self, lines: int = 40) -> str:
        try:
            with open(self.serial_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except (OSError, TypeError):
            return ""

    def _qemu_command(self, overlay: str, socket_path: str, share: str,
                      gated_disk: str) -> list[str]:
        cpu = "host" if self.accel == "kvm" else "max"
        accel = "kvm" if self.accel == "kvm" else "tcg,thread=multi"
        command = [
            QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            # intremap needs a split irqchip under KVM; TCG ignores it.
            "-machine", "q35,kernel-irqchip=split", "-accel", accel, "-cpu", cpu,
            "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-device", "intel-iommu,intremap=on",
            "-kernel", self.image_prefix + ".vmlinuz",
            "-initrd", self.image_prefix + ".initrd",
            "-append", KERNEL_CMDLINE,
            "-drive", f"file={overlay},if=none,id=root,format=qcow2,cache=unsafe",
            "-device", "virtio-blk-pci,drive=root",
            "-device", "virtio-rng-pci",
            # Appended to: a reboot's new QEMU keeps the first boot's log.
            "-chardev", f"file,id=serial,path={self.serial_path},append=on",
            "-serial", "chardev:serial",
            # Each NIC behind its own root port: its own IOMMU group, and the
            # igb's VFs on that port's bus.
            "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1",
            "-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=2,slot=2",
            "-device", "pcie-root-port,id=rp3,bus=pcie.0,chassis=3,slot=3",
            "-netdev", "user,id=net-igb,restrict=on",
            "-device", "igb,netdev=net-igb,bus=rp1",
            "-netdev", "user,id=net-e1000e,restrict=on",
            "-device", "e1000e,netdev=net-e1000e,bus=rp2",
            "-netdev", "user,id=net-virtio,restrict=on",
            "-device", "virtio-net-pci,netdev=net-virtio,bus=rp3",
            "-fsdev", f"local,id=share,path={share},security_model=none",
            "-device", f"virtio-9p-pci,fsdev=share,mount_tag={SHARE_TAG}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga,path={socket_path},server=on,wait=off",
            "-device", "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
            # A conventional PCI bus behind a PCI bridge: the devices on it
            # share one IOMMU group with the bridge (their DMA carries the
            # bridge's requester ID), as a disk controller and a NIC behind a
            # motherboard's PCI bridge do. Not pcie-pci-bridge: its SHPC
            # cannot be turned off and shpchp logs errors at boot (ACPI
            # hotplug owns the slots). Last, so that nothing above moves.
            "-device", "pci-bridge,id=pbr,bus=pcie.0,chassis_nr=4,shpc=off",
            "-drive", f"file={gated_disk},if=none,id=gated,format=raw,cache=unsafe",
            "-device", f"virtio-blk-pci,drive=gated,serial={GATED_DISK_SERIAL},bus=pbr,addr=1",
            # No IPv6 from QEMU's user network: its router advertisement
            # would give the gated NIC an address and a default route some
            # time after the checks bring it up, changing its host uses
            # between the look a check expects and the next one.
            "-netdev", "user,id=net-gated,restrict=on,ipv6=off",
            "-device", "e1000,netdev=net-gated,bus=pbr,addr=2",
        ]
        return command

    def _start(self) -> None:
        image = self.image_prefix + ".qcow2"
        for path in (image, self.image_prefix + ".vmlinuz", self.image_prefix + ".initrd"):
            if not os.path.isfile(path):
                raise GuestError(f"{path} missing: run tests/system/build-image")
        self.accel = choose_accel(self.image_prefix + ".vmlinuz")
        remove_abandoned_work_dirs()
        self._work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=WORK_PARENT)
        with open(os.path.join(self._work, OWNER_FILE), "w") as f:
            f.write(f"{os.getpid()} {_start_time(os.getpid())}\n")
        overlay = os.path.join(self._work, "overlay.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                        "-b", image, overlay], check=True)
        gated_disk = os.path.join(self._work, "gated.raw")
        with open(gated_disk, "wb") as f:
            f.truncate(GATED_DISK_BYTES)  # sparse: costs nothing until written
        share = self.share_dir or os.path.join(self._work, "share")
        os.makedirs(share, exist_ok=True)
        self._command = self._qemu_command(overlay, self._socket_path, share, gated_disk)
        self._launch()

    @property
    def _socket_path(self) -> str:
        return os.path.join(self._work, "qga.sock")

    def _launch(self) -> None:
        """Starts QEMU on the work dir's disks and waits for the agent."""
        try:
            os.unlink(self._socket_path)  # a reboot's: never connect to the old one
        except FileNotFoundError:
            pass
        with open(os.path.join(self._work, "qemu.stderr"), "ab") as stderr:
            self._qemu = subprocess.Popen(self._command, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=stderr,
                                          preexec_fn=_die_with_parent)
        self._agent = self._wait_for_agent(self._socket_path)

    def reboot(self, shutdown_timeout: float = 120) -> tuple[float, float]:
        """Shuts the guest down cleanly (the agent's guest-shutdown: systemd
        stops everything, the file systems are synced and unmounted) and
        boots it again on the same overlay and disks, so that what it wrote
        survives, as at a power cycle. A new QEMU (this one runs with
        -no-reboot, so that a panic ends it). Returns the seconds the
        shutdown and the boot (until the agent answered) took."""
        start = time.monotonic()
        self._agent.notify("guest-shutdown", {"mode": "powerdown"})
        try:
            status = self._qemu.wait(timeout=shutdown_timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"the guest did not power off within {shutdown_timeout} s\n"
                             f"serial console:\n{self.serial_tail()}") from None
        finally:
            self._agent.close()
            self._agent = None
        if status != 0:
            self._qemu = None
            raise GuestError(f"QEMU exited with {status} at the shutdown\n"
                             f"serial console:\n{self.serial_tail()}")
        shutdown = time.monotonic() - start
        start = time.monotonic()
        self._launch()
        return shutdown, time.monotonic() - start

    def _check_qemu_alive(self) -> None:
        if self._qemu.poll() is not None:
            with open(os.path.join(self._work, "qemu.stderr"), errors="replace") as f:
                stderr = f.read().strip()
            raise GuestError(f"QEMU exited with {self._qemu.returncode}: {stderr}\n"
                             f"serial console:\n{self.serial_tail()}")

    def _wait_for_agent(self, socket_path: str) -> Agent:
        deadline = time.monotonic() + self.boot_timeout
        agent = None
        while time.monotonic() < deadline:
            self._check_qemu_alive()
            if agent is None:
                try:
                    agent = Agent(socket_path)
                except (FileNotFoundError, ConnectionRefusedError):
                    time.sleep(0.1)
                    continue
            if agent.sync(seconds=2):
                agent.command("guest-ping")
                return agent
        if agent is not None:
            agent.close()
        raise AgentError(f"no guest agent within {self.boot_timeout} s\n"
                         f"serial console:\n{self.serial_tail()}")

    def run(self, command: str, timeout: float = 60, stdin: bytes | None = None) -> ExecResult:
        """Runs a shell command in the guest as root. `timeout` bounds it
        inside the guest too (coreutils timeout), so nothing lingers there."""
        argv = ["/usr/bin/timeout", "--kill-after=5", str(timeout), "/bin/sh", "-c", command]
        return self._agent.exec(argv, timeout=timeout + 15, stdin=stdin)

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._qemu is not None:
            if self._qemu.poll() is None:
                self._qemu.kill()
            self._qemu.wait()
            self._qemu = None
        if self._work is not None:
            if self.serial_log_copy:
                try:
                    shutil.copyfile(self.serial_path, self.serial_log_copy)
                except OSError:
                    pass
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
