"""`tokend serve --simulate usb --simulate-control PATH` as a process — the issue's
acceptance through the daemon socket with the real tokenctl and openssl: list, decrypt an
`openssl cms -encrypt` mail, sign; `unplug usb0` → the next decrypt fails and `left` reaches
a subscriber within 50 ms; `plug usb0` → a new instance, login required. Plus the control
socket's own rules (0600, same uid, one answer line per command, only when asked for)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.helpers import PIN
from tokend.client import Client
from tokend.errors import DeviceRemovedError


class Serve:
    def __init__(self, proc: subprocess.Popen, sock: Path, control: Path | None) -> None:
        self.proc, self.sock, self.control = proc, sock, control
        self.lines: list[str] = []


def start_serve(tmp: Path, *args: str) -> Serve:
    sock = tmp / "run" / "tokend.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc",
         "--socket", str(sock), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    serve = Serve(proc, sock, None)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # the daemon prints its banner once tokens are probed
        if not line:
            raise AssertionError("tokend exited:\n" + "".join(serve.lines))
        serve.lines.append(line)
        if line.startswith("TOKEND_SIMULATE_CONTROL="):
            serve.control = Path(line.strip().split("=", 1)[1])
        if line.startswith("tokend: simulated tokens:") or (
            line.startswith("tokend: listening") and "--simulate-control" not in args
        ):
            return serve
    raise AssertionError("tokend did not start:\n" + "".join(serve.lines))


def stop_serve(serve: Serve) -> str:
    serve.proc.terminate()
    try:
        out, _ = serve.proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        serve.proc.kill()
        out, _ = serve.proc.communicate()
    return "".join(serve.lines) + (out or "")


def control(path: Path, *commands: str) -> list[str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rw", encoding="utf-8", newline="\n")
        answers = []
        for command in commands:
            f.write(command + "\n")
            f.flush()
            answers.append(f.readline().rstrip("\n"))
        return answers


def tokenctl(
    serve: Serve, *args: str, secrets: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    os.write(w, "".join(f"{s}\n" for s in secrets).encode())
    os.close(w)
    try:
        argv = [a.replace("{fd}", str(r)) for a in args]
        return subprocess.run(
            [sys.executable, "-m", "tokend.cli.tokenctl", "--socket", str(serve.sock), *argv],
            capture_output=True, pass_fds=(r,), timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(r)


@pytest.fixture
def usb_serve(tmp_path: Path) -> Iterator[Serve]:
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="tokend-usb-"))  # Unix socket paths ≤ 108 bytes
    serve = start_serve(
        short, "--simulate", "usb", "--simulate-control", str(short / "ctl" / "sim.sock"),
        "--export-dir", str(tmp_path / "demo"),
    )  # fmt: skip
    try:
        yield serve
    finally:
        out = stop_serve(serve)
        assert PIN not in out  # the demo PIN is never logged
    assert serve.proc.returncode == 0, out


def test_usb_token_through_the_daemon_with_tokenctl_openssl_and_the_control_socket(
    usb_serve: Serve, tmp_path: Path
) -> None:
    demo = tmp_path / "demo"
    assert usb_serve.control is not None
    assert stat.S_IMODE(usb_serve.control.stat().st_mode) == 0o600
    assert control(usb_serve.control, "list") == ["ok usb0=plugged"]

    listed = tokenctl(usb_serve, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    tokens = json.loads(listed.stdout)
    assert "Virtual CCID token" in json.dumps(tokens)

    # A mail encrypted by someone else's openssl to the token's certificate.
    (tmp_path / "mail.txt").write_bytes(b"secret mail over USB\r\n")
    subprocess.run(
        ["openssl", "cms", "-encrypt", "-binary", "-aes256", "-in", "mail.txt",
         "-out", "mail.p7m", str(demo / "encryption.pem")],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    decrypted = tokenctl(
        usb_serve,
        "smime",
        "decrypt",
        str(tmp_path / "mail.p7m"),
        "--pin-fd",
        "{fd}",
        secrets=(PIN,),
    )
    assert decrypted.returncode == 0, decrypted.stderr
    assert decrypted.stdout == b"secret mail over USB\r\n"

    # Sign with 9C (PIN-always: the PIN again for the signature) and check with its cert.
    (tmp_path / "data").write_bytes(b"to be signed")
    signed = tokenctl(
        usb_serve, "sign", "--key", "9c", "--mechanism", "ecdsa-sha256", "--der",
        "--in", str(tmp_path / "data"), "--pin-fd", "{fd}", secrets=(PIN, PIN),
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    cert = x509.load_pem_x509_certificate((demo / "signing.pem").read_bytes())
    cert.public_key().verify(signed.stdout, b"to be signed", ec.ECDSA(hashes.SHA256()))

    # Unplug through the control socket: left within 50 ms, nothing decrypts after.
    with Client(usb_serve.sock) as client, Client(usb_serve.sock) as watcher:
        watcher.subscribe()
        slot = client.slot_list(token_present=True)[0]
        generation = client.token_info(slot)["generation"]
        session = client.open_session(slot)
        client.login(session, PIN)
        sent = time.monotonic()  # before the transport's error, so this bounds it from above
        assert control(usb_serve.control, "unplug usb0") == ["ok usb0 unplugged"]
        event = watcher.next_event(timeout=2)
        latency = time.monotonic() - sent
        assert event["event"] == "left" and event["slot_id"] == slot
        assert latency < 0.050, f"left after {latency * 1000:.1f} ms"
        with pytest.raises(DeviceRemovedError):  # first use after the pull: disconnect.md
            client.find_objects(session, {})
        failed = tokenctl(
            usb_serve,
            "smime",
            "decrypt",
            str(tmp_path / "mail.p7m"),
            "--pin-fd",
            "{fd}",
            secrets=(PIN,),
        )
        assert failed.returncode != 0 and failed.stdout == b""
        assert control(usb_serve.control, "list") == ["ok usb0=unplugged"]

        assert control(usb_serve.control, "plug usb0") == ["ok usb0 plugged"]
        arrived = watcher.next_event(timeout=5)
        assert arrived["event"] == "arrived" and arrived["generation"] > generation
        fresh = client.open_session(slot)
        info = client.call("C_GetSessionInfo", {"h_session": fresh})["info"]
        assert info["state"] == "CKS_RO_PUBLIC_SESSION"  # login required again
    decrypted = tokenctl(
        usb_serve,
        "smime",
        "decrypt",
        str(tmp_path / "mail.p7m"),
        "--pin-fd",
        "{fd}",
        secrets=(PIN,),
    )
    assert decrypted.stdout == b"secret mail over USB\r\n"


def test_control_answers_one_line_per_command_and_names_every_simulator(tmp_path: Path) -> None:
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="tokend-ctl-"))
    serve = start_serve(
        short, "--simulate", "piv", "--simulate", "usb",
        "--simulate-control", str(short / "c.sock"), "--export-dir", str(tmp_path),
    )  # fmt: skip
    try:
        assert serve.control is not None
        answers = control(
            serve.control,
            "list", "unplug piv0", "unplug piv0", "list", "plug piv0", "frobnicate",
            "unplug usb7", "", "plug", "list",
        )  # fmt: skip
        assert answers[0] == "ok piv0=plugged usb0=plugged"
        assert answers[1:3] == ["ok piv0 unplugged", "ok piv0 unplugged"]  # idempotent
        assert answers[3] == "ok piv0=unplugged usb0=plugged"
        assert answers[4] == "ok piv0 plugged"
        assert answers[5].startswith("error: unknown command 'frobnicate'")
        assert answers[6] == "error: no simulated token 'usb7' (known: piv0, usb0)"
        assert answers[7].startswith("error: empty command") and answers[8].startswith("error:")
        assert answers[9] == "ok piv0=plugged usb0=plugged"
        # several simulated tokens: demo material per token
        assert (tmp_path / "piv0" / "encryption.pem").exists()
        assert (tmp_path / "usb0" / "encryption.pem").exists()
    finally:
        stop_serve(serve)
    assert not serve.control.exists()  # removed on the way out


def test_no_control_socket_unless_asked(tmp_path: Path) -> None:
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="tokend-noctl-"))
    serve = start_serve(short, "--simulate", "usb")
    try:
        assert serve.control is None
        # only the daemon's own sockets: native and p11-kit, no control socket
        assert sorted(p.name for p in serve.sock.parent.iterdir()) == ["pkcs11.sock", "tokend.sock"]
        assert not any("control" in line for line in serve.lines)
    finally:
        stop_serve(serve)


def test_simulate_control_needs_a_simulator(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc",
         "--socket", str(tmp_path / "s"), "--simulate-control", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == "tokend: --simulate-control needs --simulate KIND"


async def test_control_refuses_other_uids(tmp_path: Path) -> None:
    import asyncio

    from tokend.sim_control import SimControl
    from tokend.simulators.memory import MemoryReader, MemoryToken
    from tokend.simulators.piv import VirtualPivCard

    reader = MemoryReader()
    token = MemoryToken("piv0", reader, VirtualPivCard())
    token.plug()
    ctl = SimControl(tmp_path / "c.sock", [token])
    ctl.allowed_uids = {os.getuid() + 4242}  # as if we were another user
    await ctl.start()
    try:

        def try_unplug() -> list[str]:
            try:
                return control(ctl.path, "unplug piv0")
            except (ConnectionResetError, BrokenPipeError):
                return ["<closed>"]

        answers = await asyncio.to_thread(try_unplug)
        assert answers in ([""], ["<closed>"])  # closed without an answer
        assert token.plugged
    finally:
        await ctl.stop()


def test_transports_from_the_configuration_and_the_command_line(tmp_path: Path) -> None:
    from tokend.cli.tokend_main import build_parser, build_registry
    from tokend.config import ServeConfig

    conf = tmp_path / "tokend.toml"
    conf.write_text('transports = ["pcsc", "usb", "usb"]\n')
    cfg = ServeConfig.load(conf)
    registry, tokens = build_registry(cfg)
    assert [w.name for w in registry._watchers] == ["pcsc", "usb"]  # each transport once
    assert tokens == []

    args = build_parser().parse_args(["serve", "--transport", "usb", "--simulate", "usb"])
    assert args.transport == ["usb"] and args.simulate == ["usb"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--transport", "carrier-pigeon"])
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'"):
        build_registry(ServeConfig(transports=["carrier-pigeon"]))


def test_tokend_simulate_usb_stack(tmp_path: Path) -> None:
    """`tokend simulate --usb`: the virtual USB token inside a private daemon, plugged and
    unplugged from stdin (the stack forwards to the daemon's --simulate-control socket)."""
    from cryptography.hazmat.primitives.asymmetric import padding

    from tests.helpers import ID_9D, private_key

    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "--usb"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        env: dict[str, str] = {}
        for line in proc.stdout:
            if line.startswith("export "):
                name, _, value = line[len("export ") :].strip().partition("=")
                env[name] = value
            if line.strip() == "READY":
                break
        assert env["TOKEND_DEMO_USB_PIN"] == PIN

        def say(command: str) -> str:
            proc.stdin.write(command + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            return proc.stdout.readline().strip()  # type: ignore[union-attr]

        cert = x509.load_pem_x509_certificate(
            Path(env["TOKEND_DEMO_DIR"], "usb", "encryption.pem").read_bytes()
        )
        blob = cert.public_key().encrypt(b"k" * 32, padding.PKCS1v15())  # type: ignore[union-attr]
        with Client(Path(env["TOKEND_SOCKET"])) as client:
            client.subscribe()
            slot = client.slot_list(token_present=True)[0]
            session = client.open_session(slot)
            client.login(session, env["TOKEND_DEMO_USB_PIN"])
            key = private_key(client, session, ID_9D)
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == b"k" * 32
            assert say("list") == "usb0 usb plugged"
            assert say("unplug usb0") == "ok unplug usb0"
            assert client.next_event(timeout=2)["event"] == "left"
            with pytest.raises(
                DeviceRemovedError
            ):  # the first use after the pull (disconnect.md §2)
                client.decrypt(session, key, "CKM_RSA_PKCS", blob)
            assert say("list") == "usb0 usb unplugged"
            assert say("plug usb0") == "ok plug usb0"
            assert client.next_event(timeout=5)["event"] == "arrived"
    finally:
        proc.stdin.close()  # EOF = stop everything it started
        assert proc.wait(30) == 0
