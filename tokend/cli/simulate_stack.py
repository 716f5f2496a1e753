"""`tokend simulate --piv [--sim] [--ble] [--usb] [--softhsm]`: every virtual token asked
for, the services they need, and a daemon on a private socket — one command for a mail
client's CI (docs/testing.md has a worked pytest example) and for `make run`.

It prints the environment a test needs as shell `export` lines (`TOKEND_SOCKET`, the p11-kit
module and server address, demo PINs), then a line `READY`, then reads one command per line
on stdin (and on `--control PATH`, a 0600 Unix socket): `list`, `unplug NAME`, `plug NAME`,
`status`, `quit`, answering each with one line. EOF on stdin, Ctrl-C or SIGTERM stops
everything it started, by process id.

Each kind of token is a `Kind` that starts its parts inside an ExitStack, names its tokens
(`piv0`, `sim0`, `ble0`, `usb0`, …), can plug and unplug them, and adds arguments to the
daemon's command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tokend.paths import default_socket_path
from tokend.socket_security import bind_private_socket, is_trusted_uid, peer_credentials


class Kind(Protocol):
    """One kind of virtual token in the stack."""

    names: list[str]

    def start(self, stack: contextlib.ExitStack, ctx: StackContext) -> None: ...

    #: what the daemon must run for this kind: transports to watch, in-process simulated
    #: tokens, configuration lines (TOML)
    transports: tuple[str, ...]
    simulated: tuple[str, ...]
    config: str

    def env(self) -> dict[str, str]: ...

    def plug(self, name: str) -> None: ...

    def unplug(self, name: str) -> None: ...

    def state(self, name: str) -> str: ...


@dataclass
class StackContext:
    workdir: Path
    export_dir: Path
    pcscd: object | None = None
    #: the daemon's --simulate-control socket (in-process simulated tokens are driven there)
    daemon_control_socket: Path = Path()
    daemon_control: Callable[[str], str] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def ensure_pcscd(self, stack: contextlib.ExitStack) -> object:
        if self.pcscd is None:
            from tokend.simulators.pcscd import PcscdService

            self.pcscd = stack.enter_context(PcscdService())
        return self.pcscd


class PivKind:
    """A demo-provisioned virtual PIV card on vpcd reader 0 behind real pcscd."""

    def __init__(self) -> None:
        self.names = ["piv0"]
        self._connection: object | None = None
        self._reader = ""

    def start(self, stack: contextlib.ExitStack, ctx: StackContext) -> None:
        from tokend.simulators.demo import provision_demo
        from tokend.simulators.pcscd import wait_present
        from tokend.simulators.piv import VirtualPivCard
        from tokend.simulators.vpcd import VpcdCardConnection

        pcscd = ctx.ensure_pcscd(stack)
        card = VirtualPivCard()
        provision_demo(card, ctx.export_dir / "piv", key_agreement=True)
        connection = VpcdCardConnection(card, reader=0)
        stack.enter_context(connection)
        self._connection = connection
        self._reader = pcscd.reader_names[0]  # type: ignore[attr-defined]
        wait_present(self._reader, timeout=10)

    transports = ("pcsc",)
    simulated = ()
    config = "allow_virtual_readers = true\n"  # vpcd's readers (tests and demos only)

    def env(self) -> dict[str, str]:
        return {"TOKEND_DEMO_PIV_PIN": "123456", "TOKEND_DEMO_PIV_PUK": "12345678"}

    def plug(self, name: str) -> None:
        self._connection.plug()  # type: ignore[union-attr]

    def unplug(self, name: str) -> None:
        self._connection.unplug()  # type: ignore[union-attr]

    def state(self, name: str) -> str:
        plugged = self._connection.is_plugged  # type: ignore[union-attr]
        return f"{name} piv {'plugged' if plugged else 'unplugged'} reader={self._reader!r}"


class UsbKind:
    """A demo-provisioned virtual CCID token inside the daemon (`tokend serve --simulate
    usb`: pyusb and the real CCID driver over a simulated bus), plugged and unplugged
    through the daemon's ``--simulate-control`` socket."""

    transports = ()
    simulated = ("usb",)
    config = ""

    def __init__(self) -> None:
        self.names = ["usb0"]
        self._control: Path | None = None

    def start(self, stack: contextlib.ExitStack, ctx: StackContext) -> None:
        self._control = ctx.daemon_control_socket

    def env(self) -> dict[str, str]:
        return {"TOKEND_DEMO_USB_PIN": "123456", "TOKEND_DEMO_USB_PUK": "12345678"}

    def _send(self, line: str) -> str:
        assert self._control is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(str(self._control))
            conn.sendall(line.encode() + b"\n")
            return conn.makefile("r").readline().strip()

    def _command(self, verb: str, name: str) -> None:
        answer = self._send(f"{verb} {name}")
        if not answer.startswith("ok"):
            raise RuntimeError(answer)

    def plug(self, name: str) -> None:
        self._command("plug", name)

    def unplug(self, name: str) -> None:
        self._command("unplug", name)

    def state(self, name: str) -> str:
        states = dict(w.split("=", 1) for w in self._send("list").split()[1:] if "=" in w)
        return f"{name} usb {states.get(name, 'unknown')}"


class BleKind:
    """A demo-provisioned virtual BLE key (the PIV applet behind GATT) on a fake BlueZ on a
    private dbus-daemon; bonded in the fake and trusted by the daemon's configuration
    (`[[ble_trusted]]`), reached through real bleak (`--transport ble`). Unplug = out of
    range (BlueZ drops the link)."""

    transports = ("ble",)
    simulated = ()

    def __init__(self) -> None:
        self.names = ["ble0"]
        self._fake: object | None = None
        self._address = ""
        self._bus = ""
        self.config = ""

    def start(self, stack: contextlib.ExitStack, ctx: StackContext) -> None:
        from tokend.simulators.ble import DEMO_ADDRESS, FakeBlueZThread, PrivateBus, VirtualBleKey
        from tokend.simulators.demo import provision_demo
        from tokend.simulators.piv import VirtualPivCard

        card = VirtualPivCard()
        provision_demo(card, ctx.export_dir / "ble", key_agreement=True)
        bus = PrivateBus()
        self._bus = bus.start()
        stack.callback(bus.stop)
        fake = FakeBlueZThread(self._bus).start()
        stack.callback(fake.stop)
        self._address = DEMO_ADDRESS
        fake.add_key(VirtualBleKey(card, self._address), paired=True)
        self._fake = fake
        self.config = f'[[ble_trusted]]\naddress = "{self._address}"\n'
        # bleak (in the daemon this starts) finds the fake BlueZ on this bus; the daemon keeps
        # what it learns about BLE keys in the stack's own state directory, never the
        # user's (the demo key is new every run).
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self._bus
        os.environ["TOKEND_STATE_DIR"] = str(ctx.workdir / "state")

    def env(self) -> dict[str, str]:
        return {
            "TOKEND_DEMO_BLE_PIN": "123456",
            "TOKEND_DEMO_BLE_PUK": "12345678",
            "DBUS_SYSTEM_BUS_ADDRESS": self._bus,
            "TOKEND_STATE_DIR": os.environ["TOKEND_STATE_DIR"],
        }

    def plug(self, name: str) -> None:
        self._fake.in_range(self._address)  # type: ignore[union-attr]

    def unplug(self, name: str) -> None:
        self._fake.out_of_range(self._address)  # type: ignore[union-attr]

    def state(self, name: str) -> str:
        device = self._fake.device(self._address)  # type: ignore[union-attr]
        where = "in-range" if device.in_range else "out-of-range"
        return f"{name} ble {where} address={self._address}"


class SofthsmKind:
    """A SoftHSM2 token (the vendor-module path: python-pkcs11 in the daemon) with the mail
    keys put on it through the module; its own token directory. Unplug = the token deleted
    by the module's own tool; plug = a new token (new keys, a new token instance)."""

    transports = ()
    simulated = ()
    LABEL = "tokend-demo"

    def __init__(self) -> None:
        self.names = ["softhsm0"]
        self._hsm: object | None = None
        self._export = Path()
        self.config = ""
        self._present = False

    def start(self, stack: contextlib.ExitStack, ctx: StackContext) -> None:
        from tokend.simulators.softhsm import SOFTHSM_MODULE, SoftHsm

        hsm = SoftHsm.create(ctx.workdir / "softhsm")
        hsm.use()  # the daemon this process starts inherits SOFTHSM2_CONF
        self._hsm = hsm
        self._export = ctx.export_dir / "softhsm"
        self._export.mkdir(parents=True, exist_ok=True)
        self.config = f'[[modules]]\npath = "{SOFTHSM_MODULE}"\nlabel = "softhsm"\n'
        self.plug(self.names[0])

    def env(self) -> dict[str, str]:
        from tokend.simulators.softhsm import TEST_PIN

        return {"TOKEND_DEMO_SOFTHSM_PIN": TEST_PIN, "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]}

    def plug(self, name: str) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding

        from tokend.simulators.softhsm import provision_mail

        if self._present:
            raise RuntimeError(f"{name} is plugged in already")
        self._hsm.init_token(self.LABEL)  # type: ignore[union-attr]
        material = provision_mail(self.LABEL)
        pem = material.encryption_cert.public_bytes(Encoding.PEM)
        (self._export / "encryption.pem").write_bytes(pem)
        self._present = True

    def unplug(self, name: str) -> None:
        if not self._present:
            raise RuntimeError(f"{name} is not plugged in")
        self._hsm.delete_token(self.LABEL)  # type: ignore[union-attr]
        self._present = False

    def state(self, name: str) -> str:
        return f"{name} softhsm {'present' if self._present else 'deleted'} label={self.LABEL}"


#: Every kind `tokend simulate` knows, by flag.
class SimKind:
    """A demo-provisioned virtual SIM (the IsoApplet on a T=0 UICC) on vpcd reader 1 behind
    real pcscd, beside the PIV card on reader 0."""

    reader_index = 1
    transports = ("pcsc",)
    simulated = ()
    config = "allow_virtual_readers = true\n"  # vpcd's readers (tests and demos only)

    def __init__(self) -> None:
        self.names = ["sim0"]
        self._connection: object | None = None
        self._reader = ""

    def start(self, stack: contextlib.ExitStack, ctx: StackContext) -> None:
        from tokend.simulators.pcscd import wait_present
        from tokend.simulators.sim import VirtualSim
        from tokend.simulators.sim_demo import provision_sim_demo
        from tokend.simulators.vpcd import VpcdCardConnection

        pcscd = ctx.ensure_pcscd(stack)
        card = VirtualSim()
        provision_sim_demo(card, ctx.export_dir / "sim")
        connection = VpcdCardConnection(card, reader=self.reader_index)
        stack.enter_context(connection)
        self._connection = connection
        self._reader = pcscd.reader_names[self.reader_index]  # type: ignore[attr-defined]
        wait_present(self._reader, timeout=10)

    def env(self) -> dict[str, str]:
        return {"TOKEND_DEMO_SIM_PIN": "1234", "TOKEND_DEMO_SIM_PUK": "1234567812345678"}

    def plug(self, name: str) -> None:
        self._connection.plug()  # type: ignore[union-attr]

    def unplug(self, name: str) -> None:
        self._connection.unplug()  # type: ignore[union-attr]

    def state(self, name: str) -> str:
        plugged = self._connection.is_plugged  # type: ignore[union-attr]
        return f"{name} sim {'plugged' if plugged else 'unplugged'} reader={self._reader!r}"


KINDS: dict[str, Callable[[], Kind]] = {
    "piv": PivKind,
    "usb": UsbKind,
    "ble": BleKind,
    "softhsm": SofthsmKind,
    "sim": SimKind,
}


class Stack:
    def __init__(self, kinds: dict[str, Kind], ctx: StackContext) -> None:
        self.kinds = kinds
        self.ctx = ctx
        self.by_name: dict[str, Kind] = {n: k for k in kinds.values() for n in k.names}

    def command(self, line: str) -> str:
        words = line.split()
        if not words:
            return "error: empty command (list, plug NAME, unplug NAME, status, quit)"
        verb, args = words[0], words[1:]
        if verb in ("list", "status"):
            return "; ".join(k.state(n) for n, k in self.by_name.items()) or "no tokens"
        if verb in ("plug", "unplug"):
            if len(args) != 1 or args[0] not in self.by_name:
                known = ", ".join(self.by_name)
                return f"error: {verb} NAME, with NAME one of {known}"
            kind = self.by_name[args[0]]
            try:
                getattr(kind, verb)(args[0])
            except Exception as exc:
                return f"error: {verb} {args[0]}: {exc}"
            return f"ok {verb} {args[0]}"
        if verb == "quit":
            return "ok quit"
        return f"error: unknown command {verb!r} (list, plug NAME, unplug NAME, status, quit)"


def _serve_control(path: Path, stack: Stack, stop: threading.Event) -> socket.socket:
    """`--control PATH`: the same commands over a 0600 Unix socket, same-uid peers only
    (the path and peer checks every tokend listener shares: tokend.socket_security)."""
    server = bind_private_socket(path, backlog=4)
    server.setblocking(True)  # served by its own thread

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                if not is_trusted_uid(peer_credentials(conn).uid):
                    continue
                for raw in conn.makefile("r"):
                    answer = stack.command(raw.strip())
                    conn.sendall(answer.encode() + b"\n")
                    if raw.strip() == "quit":
                        stop.set()
                        return

    threading.Thread(target=serve, name="simulate-control", daemon=True).start()
    return server


def _wait_for_tokens(proc: subprocess.Popen[bytes], path: Path, count: int, timeout: float) -> None:
    """Until the daemon answers and lists ``count`` present tokens (READY means usable)."""
    from tokend.client import Client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tokend serve exited with {proc.returncode}")
        with contextlib.suppress(OSError), Client(path, timeout=2) as client:
            if len(client.slot_list(token_present=True)) >= count:
                return
        time.sleep(0.05)  # a new process: polling its socket is all there is
    raise TimeoutError(f"tokend serve did not list {count} tokens within {timeout:g} s")


def _banner(kinds: dict[str, Kind], socket_path: Path, env: dict[str, str]) -> list[str]:
    """What `make run` shows a newcomer: where, what to try, how to pull each token."""
    bin_dir = Path(sys.executable).parent
    demo = Path(env["TOKEND_DEMO_DIR"])
    lines = ["", f"tokend is serving {len(kinds)} kinds of virtual token on {socket_path}", ""]
    for name, kind in kinds.items():
        for token in kind.names:
            pin = env.get(f"TOKEND_DEMO_{name.upper()}_PIN", "?")
            lines.append(f"  {kind.state(token)}  (PIN {pin})")
    lines += ["", "Try, in another shell:", f"  export TOKEND_SOCKET={socket_path}"]
    lines.append(f"  {bin_dir}/tokenctl list")
    for cert in sorted(demo.rglob("encryption.pem")):
        kind = cert.parent.name.rstrip("0123456789").upper()  # demo/<kind>/ or …/<kind>0/
        pin = env.get(f"TOKEND_DEMO_{kind}_PIN", "123456")
        # smime decrypt finds the token holding the recipient key by itself.
        lines.append(
            f"  echo 'Subject: hi' | openssl cms -encrypt -aes-256-gcm -recip {cert} | "
            f"{bin_dir}/tokenctl smime decrypt --pin-fd 3 - 3<<<{pin}"
        )
    if "P11_KIT_SERVER_ADDRESS" in env:
        # Unmodified PKCS#11 programs (docs/mail-clients.md) through Debian's client module.
        lines.append(
            f"  P11_KIT_SERVER_ADDRESS={env['P11_KIT_SERVER_ADDRESS']} pkcs11-tool "
            f"--module {env['TOKEND_PKCS11_MODULE']} --list-objects"
        )
    names = ", ".join(n for k in kinds.values() for n in k.names)
    lines += [
        "",
        f"Pull a token: type `unplug NAME` here (NAME: {names}); `plug NAME` puts it back,",
        "`list` shows them. Ctrl-C (or Ctrl-D) stops everything this started.",
        "",
    ]
    return lines


def _daemon_config(kinds: dict[str, Kind], workdir: Path) -> Path:
    """The daemon's configuration: what each kind needs (virtual readers, trusted keys)."""
    path = workdir / "tokend.toml"
    # Top-level keys once each (PIV and SIM both want vpcd's readers allowed).
    top = list(
        dict.fromkeys(k.config for k in kinds.values() if k.config and not k.config.startswith("["))
    )
    tables = [k.config for k in kinds.values() if k.config.startswith("[")]
    path.write_text("".join(top + tables))
    return path


def run_stack(args: argparse.Namespace) -> int:
    if getattr(args, "all", False):
        for name in KINDS:
            setattr(args, name, True)
    wanted = [k for k in KINDS if getattr(args, k, False)]
    if not wanted:
        print("tokend simulate: name a KIND, or one or more of --piv …", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    workdir = Path(tempfile.mkdtemp(prefix="tokend-sim-"))
    os.chmod(workdir, 0o700)
    export_dir = args.export_dir or workdir / "demo"
    export_dir.mkdir(parents=True, exist_ok=True)
    banner = getattr(args, "banner", False)
    # With --banner (make run) the daemon takes the user's default socket, so `tokenctl`
    # in another shell finds it without any environment.
    default = default_socket_path() if banner else workdir / "tokend" / "tokend.sock"
    socket_path = args.socket or default
    ctx = StackContext(workdir, export_dir, daemon_control_socket=workdir / "control.sock")
    daemon: subprocess.Popen[bytes] | None = None
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        kinds = {name: KINDS[name]() for name in wanted}
        for kind in kinds.values():
            kind.start(stack, ctx)
        serve = [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--socket"]
        serve += [str(socket_path), "--config", str(_daemon_config(kinds, workdir))]
        transports = [t for kind in kinds.values() for t in kind.transports]
        serve += [arg for t in transports for arg in ("--transport", t)] or ["--no-pcsc"]
        simulated = [k for kind in kinds.values() for k in kind.simulated]
        if simulated:
            serve += [arg for k in simulated for arg in ("--simulate", k)]
            serve += ["--simulate-control", str(ctx.daemon_control_socket)]
            # one in-process token writes its certificates into the directory itself
            inprocess = export_dir / (simulated[0] if len(simulated) == 1 else "inprocess")
            serve += ["--export-dir", str(inprocess)]
        log = (workdir / "tokend.log").open("wb")
        daemon = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)

        def stop_daemon() -> None:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(10)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
            log.close()

        stack.callback(stop_daemon)
        try:
            _wait_for_tokens(daemon, socket_path, sum(len(k.names) for k in kinds.values()), 30)
        except (RuntimeError, TimeoutError):
            log.flush()
            tail = (workdir / "tokend.log").read_text(errors="replace").splitlines()[-15:]
            print(
                "\n".join(["tokend simulate: the daemon's last log lines:", *tail]), file=sys.stderr
            )
            raise
        env = {"TOKEND_SOCKET": str(socket_path), "TOKEND_DEMO_DIR": str(export_dir)}
        # Unmodified PKCS#11 programs: Debian's p11-kit-client.so and tokend's p11-kit socket.
        from tokend import p11kit

        env["TOKEND_PKCS11_MODULE"] = p11kit.CLIENT_MODULE
        env["P11_KIT_SERVER_ADDRESS"] = f"unix:path={p11kit.socket_path(socket_path)}"
        for kind in kinds.values():
            env.update(kind.env())
        for key, value in env.items():
            print(f"export {key}={value}", flush=True)
        names = " ".join(n for k in kinds.values() for n in k.names)
        print(f"# tokens: {names}; commands: list, unplug NAME, plug NAME, status, quit")
        print(f"# daemon log: {workdir / 'tokend.log'}")
        if banner:
            print("\n".join(_banner(kinds, socket_path, env)))
        machine = Stack(kinds, ctx)
        if args.control:
            # Listening before READY: a CI script may connect the moment it reads it.
            server = _serve_control(args.control, machine, stop)
            stack.callback(server.close)
            stack.callback(lambda: args.control.unlink(missing_ok=True))
        print("READY", flush=True)
        _read_commands(machine, stop)
    return 0


def _read_commands(stack: Stack, stop: threading.Event) -> None:
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    while not stop.is_set():
        if not selector.select(timeout=0.2):
            continue
        line = sys.stdin.readline()
        if not line:  # EOF = quit
            return
        answer = stack.command(line.strip())
        print(answer, flush=True)
        if line.strip() == "quit":
            return
