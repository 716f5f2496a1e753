"""Test harness for the PC/SC path: a pcscd with vpcd's virtual readers, and helpers that
wait for a reader's card state with ``SCardGetStatusChange`` (no sleeping in loops).

`PcscdService` reuses a pcscd that already answers and lists the virtual readers; otherwise
it starts ``pcscd --foreground -c <temp reader.conf.d>`` as a child and, at exit, stops only
that child, by its PID. The same functions back the test fixtures and ``tokend simulate``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from smartcard import scard

from tokend.simulators.vpcd import (
    VPCD_BASE_PORT,
    VPCD_FRIENDLY_NAME,
    VPCD_SLOTS,
    vpcd_reader_name,
)

log = logging.getLogger(__name__)

PCSCD_BINARY = Path("/usr/sbin/pcscd")
#: Fixed at pcsc-lite build time (ipcdir); the client library finds pcscd here.
PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
PCSCD_PID_FILE = Path("/run/pcscd/pcscd.pid")
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
SYSTEM_VPCD_CONF = Path("/etc/reader.conf.d/vpcd")

#: pcscd ignores SIGTERM for at most this long before we SIGKILL it.
STOP_TIMEOUT = 5.0


def pcscd_unavailable_reason() -> str | None:
    """Why the PC/SC test tier cannot run here (None when it can): for ``pytest.skip``."""
    if not PCSCD_BINARY.exists():
        return f"{PCSCD_BINARY} missing (Debian package pcscd)"
    if not VPCD_DRIVER.exists():
        return f"{VPCD_DRIVER} missing (Debian package vsmartcard-vpcd)"
    if not _service_answers() and os.geteuid() != 0 and not _can_write_run_dir():
        return "no running pcscd and not allowed to start one (needs write access to /run/pcscd)"
    return None


def private_pcscd_unavailable_reason() -> str | None:
    """Why `PrivatePcscdService` cannot run here (None when it can)."""
    if not PCSCD_BINARY.exists():
        return f"{PCSCD_BINARY} missing (Debian package pcscd)"
    if not VPCD_DRIVER.exists():
        return f"{VPCD_DRIVER} missing (Debian package vsmartcard-vpcd)"
    if os.geteuid() != 0:
        return "a private pcscd needs root (a mount namespace over /run/pcscd)"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount missing (Debian package util-linux / mount)"
    # Root in a container may still lack CAP_SYS_ADMIN: try it.
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        return f"no mount namespace here: {probe.stderr.strip() or probe.returncode}"
    return None


def _free_port_pair() -> int:
    """A base port p with p and p + 1 free now (vpcd listens on both, on every interface)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            base = probe.getsockname()[1]
        if base >= 65535:
            continue
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a,
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b,
            ):
                a.bind(("", base))
                b.bind(("", base + 1))
        except OSError:
            continue
        return base
    raise RuntimeError("no two consecutive free TCP ports for vpcd")


def _can_write_run_dir() -> bool:
    run_dir = PCSCD_SOCKET.parent
    return os.access(run_dir if run_dir.exists() else run_dir.parent, os.W_OK)


def list_readers() -> list[str] | None:
    """Reader names, [] when pcscd has none, None when no pcscd answers."""
    rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if rv != scard.SCARD_S_SUCCESS:
        return None
    try:
        rv, readers = scard.SCardListReaders(ctx, [])
        if rv == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if rv != scard.SCARD_S_SUCCESS:
            return None
        return list(readers)
    finally:
        scard.SCardReleaseContext(ctx)


def client_socket_path() -> Path:
    """The pcscd socket this process's PC/SC client uses: ``$PCSCLITE_CSOCK_NAME`` (which
    libpcsclite honours, read once at its first call), else the compiled-in path."""
    return Path(os.environ.get("PCSCLITE_CSOCK_NAME") or PCSCD_SOCKET)


def _service_answers() -> bool:
    return client_socket_path().exists() and list_readers() is not None


def _card_present(event_state: int) -> bool:
    # A mute card (no ATR) is as good as no card for us.
    return bool(event_state & scard.SCARD_STATE_PRESENT) and not (
        event_state & scard.SCARD_STATE_MUTE
    )


def _wait_reader(reader: str, want_present: bool, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if rv != scard.SCARD_S_SUCCESS:
        raise RuntimeError(f"pcscd not reachable: {scard.SCardGetErrorMessage(rv)}")
    try:
        current = scard.SCARD_STATE_UNAWARE
        while True:
            remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            rv, states = scard.SCardGetStatusChange(ctx, remaining_ms, [(reader, current)])
            if rv == scard.SCARD_E_TIMEOUT:
                break
            if rv != scard.SCARD_S_SUCCESS:
                raise RuntimeError(
                    f"SCardGetStatusChange({reader!r}): {scard.SCardGetErrorMessage(rv)}"
                )
            _name, event_state, atr = states[0]
            if _card_present(event_state) == want_present:
                return bytes(atr)
            current = event_state & ~scard.SCARD_STATE_CHANGED
            if time.monotonic() >= deadline:
                break
    finally:
        scard.SCardReleaseContext(ctx)
    state = "present" if want_present else "absent"
    raise TimeoutError(f"card in {reader!r} not {state} after {timeout:.1f} s")


def wait_present(reader: str, timeout: float = 5.0) -> bytes:
    """Block until pcscd reports a card in ``reader``; return its ATR."""
    return _wait_reader(reader, True, timeout)


def wait_absent(reader: str, timeout: float = 5.0) -> None:
    """Block until pcscd reports ``reader`` empty."""
    _wait_reader(reader, False, timeout)


def vpcd_conf_text(friendly_name: str = VPCD_FRIENDLY_NAME, base_port: int = VPCD_BASE_PORT) -> str:
    """A reader.conf.d entry for vpcd slots on ``base_port`` and ``base_port + 1``."""
    return (
        f'FRIENDLYNAME "{friendly_name}"\n'
        f"DEVICENAME   /dev/null:0x{base_port:04X}\n"
        f"LIBPATH      {VPCD_DRIVER}\n"
        f"CHANNELID    0x{base_port:04X}\n"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _process_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 3, after the parenthesised command name (which may contain spaces).
    return stat.rsplit(")", 1)[-1].split()[0]


@dataclass(frozen=True, slots=True)
class VpcdEntry:
    """One vpcd entry of reader.conf.d: two reader slots on ``base_port`` and the next."""

    friendly_name: str
    base_port: int

    @property
    def reader_names(self) -> tuple[str, ...]:
        return tuple(vpcd_reader_name(i, self.friendly_name) for i in range(VPCD_SLOTS))

    def port(self, reader: int) -> int:
        return self.base_port + reader

    def conf_text(self) -> str:
        return vpcd_conf_text(self.friendly_name, self.base_port)


class PcscdService:
    """A pcscd with vpcd's virtual readers, reused or started. Context manager.

    ``reader_names`` / ``port(n)`` are the readers of the one vpcd ``entry`` (slot 0, 1).
    One entry only: vpcd keeps its sockets in per-slot globals, so a second entry in the
    same pcscd shares (and breaks) the first one's slots *(obs.)*. Processes sharing the
    machine's pcscd take turns with `lease`. ``started`` tells whether this object owns the
    daemon; only then can ``stop()`` / ``start()`` cycle it. The child's log: ``log_path``.
    """

    def __init__(
        self,
        *,
        friendly_name: str = VPCD_FRIENDLY_NAME,
        base_port: int = VPCD_BASE_PORT,
        debug: bool = False,
        startup_timeout: float = 5.0,
    ) -> None:
        self.entry = VpcdEntry(friendly_name, base_port)
        self.debug = debug
        self.startup_timeout = startup_timeout
        self.started = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self.log_path: Path | None = None

    @property
    def reader_names(self) -> list[str]:
        return list(self.entry.reader_names)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def port(self, reader: int) -> int:
        return self.entry.port(reader)

    def _readers_listed(self) -> bool:
        readers = list_readers()
        return readers is not None and all(name in readers for name in self.reader_names)

    def __enter__(self) -> PcscdService:
        self.ensure_running()
        return self

    def ensure_running(self) -> None:
        """Reuse a pcscd listing our default entry, else start our own. Called again by
        fixtures: a reused pcscd may belong to another test process that has since ended."""
        if self._proc is not None and self._proc.poll() is None:
            return
        for attempt in range(2):
            if client_socket_path().exists() and self._readers_listed():
                log.info("using the running pcscd")
                self.started = False  # not ours: never stopped by us
                return
            if _service_answers():
                raise RuntimeError(
                    f"a pcscd is running without the readers {self.reader_names}; stop it "
                    "or add the vpcd entry to its reader.conf.d"
                )
            try:
                self.start()
                return
            except RuntimeError:
                # Another process may have started one at the same moment: reuse it.
                if attempt == 1:
                    raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextlib.contextmanager
    def lease(self, timeout: float = 300.0) -> Iterator[VpcdEntry]:
        """Exclusive use of the vpcd readers among the processes on this machine (an flock
        per port pair), so parallel test runs do not plug cards into each other's slots."""
        lock_dir = Path(tempfile.gettempdir()) / "tokend-vpcd-locks"
        lock_dir.mkdir(mode=0o1777, exist_ok=True)
        fd = os.open(lock_dir / f"{self.entry.base_port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"vpcd readers stayed leased for {timeout} s") from None
                    # flock has no timeout of its own; the period is not critical here.
                    time.sleep(0.05)
            try:
                yield self.entry
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._proc is not None:
            self.stop()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def _conf_dir(self) -> Path:
        if self._tmpdir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="tokend-pcscd-")
            base = Path(self._tmpdir.name)
            conf = base / "reader.conf.d"
            conf.mkdir()
            if self.entry == VpcdEntry(VPCD_FRIENDLY_NAME, VPCD_BASE_PORT) and (
                SYSTEM_VPCD_CONF.exists()
            ):
                shutil.copy(SYSTEM_VPCD_CONF, conf / "vpcd")
            else:
                (conf / "vpcd").write_text(self.entry.conf_text())
            self.log_path = base / "pcscd.log"
        return Path(self._tmpdir.name) / "reader.conf.d"

    def _clear_stale_pid_file(self) -> None:
        """pcscd refuses to start while its PID file names a live process."""
        try:
            pid = int(PCSCD_PID_FILE.read_text().strip())
        except (OSError, ValueError):
            return
        if _pid_alive(pid) and _process_name(pid) == "pcscd":
            if _process_state(pid) == "Z":
                raise RuntimeError(
                    f"pcscd {pid} is an unreaped zombie; its parent must reap it first"
                )
            raise RuntimeError(f"pcscd {pid} is running but does not answer on {PCSCD_SOCKET}")
        log.info("removing stale %s (pid %d is gone)", PCSCD_PID_FILE, pid)
        with contextlib.suppress(OSError):
            PCSCD_PID_FILE.unlink()
        # A socket left behind by a killed pcscd makes clients fail until the new one binds.
        with contextlib.suppress(OSError):
            PCSCD_SOCKET.unlink()

    def start(self) -> None:
        """Start our own pcscd child and wait until it lists the virtual readers."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._clear_stale_pid_file()
        conf = self._conf_dir()
        args = [str(PCSCD_BINARY), "--foreground", "-c", str(conf)]
        if self.debug:
            args.append("--debug")  # never --apdu by default: it logs PINs
        args = self._command(args)
        assert self.log_path is not None
        with open(self.log_path, "ab") as logfile:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT
            )
        self.started = True
        deadline = time.monotonic() + self.startup_timeout
        # Polling is the only option here: there is no service yet to wait on (≈10 ms).
        while not self._readers_listed():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"pcscd exited with {code} at startup; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"pcscd did not list {self.reader_names} within {self.startup_timeout} s"
                )
            time.sleep(0.01)
        log.info("started pcscd pid %d", self._proc.pid)

    def _command(self, pcscd_args: list[str]) -> list[str]:
        """The command line that runs pcscd (a subclass may wrap it)."""
        return pcscd_args

    def stop(self) -> None:
        """Stop the pcscd this object started (SIGTERM, then SIGKILL after 5 s)."""
        proc = self._proc
        if proc is None:
            if not self.started:
                raise RuntimeError("this pcscd was not started by us; refusing to stop it")
            return
        self._proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("stopped pcscd pid %d (exit %s)", proc.pid, proc.returncode)

    def kill(self) -> None:
        """SIGKILL the pcscd this object started (a crash: no clean-up of its own), by PID."""
        proc = self._proc
        if proc is None:
            raise RuntimeError("this object runs no pcscd; refusing to kill one")
        self._proc = None
        proc.kill()
        proc.wait()
        log.info("killed pcscd pid %d", proc.pid)


class PrivatePcscdService(PcscdService):
    """A pcscd of this process's own, beside the machine's (which it never touches).

    pcsc-lite fixes pcscd's socket (``/run/pcscd/pcscd.comm``) and PID file at build time;
    the client library honours ``$PCSCLITE_CSOCK_NAME``, pcscd itself does not. So the child
    runs in a mount namespace of its own (``unshare --mount``, root only) with a private
    directory bind-mounted over ``/run/pcscd``: its socket and PID file land in that
    directory, and `activate` points this process's PC/SC client there. The library reads
    the variable once, at its first call, so `activate` must run before any PC/SC use in
    the process (the test suite does it when pytest starts). Its vpcd entry takes two free
    ports, so the machine's pcscd keeps vpcd's default ports. The process started is
    pcscd itself (``unshare`` and ``sh`` exec it), so ``stop()`` signals pcscd by its PID.
    """

    def __init__(self, run_dir: Path | None = None, **kwargs: object) -> None:
        base_port = kwargs.pop("base_port", None) or _free_port_pair()
        kwargs.setdefault("startup_timeout", 30.0)  # a loaded CI machine: pcscd starts slowly
        super().__init__(base_port=base_port, **kwargs)  # type: ignore[arg-type]
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="tokend-pcscd-run-"))
        self.started = True  # always ours: tests may stop and start it

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "pcscd.comm"

    def activate(self) -> None:
        """Point this process's PC/SC client (and its children's) at this pcscd."""
        os.environ["PCSCLITE_CSOCK_NAME"] = str(self.socket_path)

    def ensure_running(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if client_socket_path() != self.socket_path:
            raise RuntimeError(
                f"PCSCLITE_CSOCK_NAME is not {self.socket_path}; call activate() before any "
                "PC/SC use in this process"
            )
        self.start()

    @contextlib.contextmanager
    def lease(self, timeout: float = 300.0) -> Iterator[VpcdEntry]:
        """No lease: nobody else uses this pcscd's readers."""
        yield self.entry

    def _clear_stale_pid_file(self) -> None:
        # Only our own directory: a pcscd of ours that was killed leaves its files behind.
        for leftover in (self.run_dir / "pcscd.pid", self.socket_path):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def _command(self, pcscd_args: list[str]) -> list[str]:
        script = 'mkdir -p /run/pcscd && mount --bind "$0" /run/pcscd && exec "$@"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            str(self.run_dir),
            *pcscd_args,
        ]

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
