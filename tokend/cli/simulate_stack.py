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

    def serve_args(self) -> list[str]: ...

    def env(self) -> dict[str, str]: ...

    def plug(self, name: str) -> None: ...

    def unplug(self, name: str) -> None: ...

    def state(self, name: str) -> str: ...


@dataclass
class StackContext:
    workdir: Path
    export_dir: Path
    pcscd: object | None = None
    control_socket: Path | None = None  # the daemon's --simulate-control, when a kind needs it
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

    uses_pcsc = True

    def serve_args(self) -> list[str]:
        return ["--allow-virtual-readers"]

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

    uses_pcsc = False

    def __init__(self) -> None:
        self.names = ["usb0"]
        self._control: Path | None = None
        self._export: Path | None = None

    def start(self, stack: contextlib.ExitStack, ctx: StackContext) -> None:
        if ctx.control_socket is None:
            ctx.control_socket = ctx.workdir / "simulate-control.sock"
        self._control = ctx.control_socket
        self._export = ctx.export_dir / "usb"

    def serve_args(self) -> list[str]:
        return [
            "--simulate", "usb", "--simulate-control", str(self._control),
            "--export-dir", str(self._export),
        ]  # fmt: skip

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


#: Every kind `tokend simulate` knows, by flag. Kinds from other branches register here.
KINDS: dict[str, Callable[[], Kind]] = {"piv": PivKind, "usb": UsbKind}


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
    for name in kinds:
        cert = demo / name / "encryption.pem"
        pin = env.get(f"TOKEND_DEMO_{name.upper()}_PIN", "")
        if cert.exists():
            # smime decrypt finds the token holding the recipient key by itself.
            lines.append(
                f"  echo 'Subject: hi' | openssl cms -encrypt -aes-256-gcm -recip {cert} | "
                f"{bin_dir}/tokenctl smime decrypt --pin-fd 3 - 3<<<{pin}"
            )
    names = ", ".join(n for k in kinds.values() for n in k.names)
    lines += [
        "",
        f"Pull a token: type `unplug NAME` here (NAME: {names}); `plug NAME` puts it back,",
        "`list` shows them. Ctrl-C (or Ctrl-D) stops everything this started.",
        "",
    ]
    return lines


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
    ctx = StackContext(workdir, export_dir)
    daemon: subprocess.Popen[bytes] | None = None
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        kinds = {name: KINDS[name]() for name in wanted}
        for kind in kinds.values():
            kind.start(stack, ctx)
        serve = [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--socket"]
        serve += [str(socket_path)]
        for kind in kinds.values():
            serve += [arg for arg in kind.serve_args() if arg not in serve]
        if not any(getattr(kind, "uses_pcsc", False) for kind in kinds.values()):
            serve.append("--no-pcsc")
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
        _wait_for_tokens(daemon, socket_path, sum(len(k.names) for k in kinds.values()), 30)
        env = {"TOKEND_SOCKET": str(socket_path), "TOKEND_DEMO_DIR": str(export_dir)}
        for kind in kinds.values():
            env.update(kind.env())
        for key, value in env.items():
            print(f"export {key}={value}", flush=True)
        names = " ".join(n for k in kinds.values() for n in k.names)
        print(f"# tokens: {names}; commands: list, unplug NAME, plug NAME, status, quit")
        print(f"# daemon log: {workdir / 'tokend.log'}")
        if banner:
            print("\n".join(_banner(kinds, socket_path, env)))
        print("READY", flush=True)
        machine = Stack(kinds, ctx)
        if args.control:
            server = _serve_control(args.control, machine, stop)
            stack.callback(server.close)
            stack.callback(lambda: args.control.unlink(missing_ok=True))
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
