"""`tokend simulate --piv …` as another project's CI uses it: the fixture below is the worked
example of docs/testing.md, copied verbatim (a mail client's pytest suite)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from tests.helpers import ID_9D, private_key
from tokend.client import Client
from tokend.errors import DeviceRemovedError


# --- the worked example (docs/testing.md) ----------------------------------------------------
@pytest.fixture
def tokend_stack() -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """Virtual tokens + a private tokend; yields the process (commands on its stdin) and the
    environment it printed (TOKEND_SOCKET, TOKEND_DEMO_DIR, demo PINs)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "--piv"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    env: dict[str, str] = {}
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("export "):
            name, _, value = line[len("export ") :].strip().partition("=")
            env[name] = value
        if line.strip() == "READY":
            break
    else:
        raise RuntimeError("tokend simulate stopped before READY")
    yield proc, env
    proc.stdin.close()  # type: ignore[union-attr]  # EOF = stop everything it started
    proc.wait(30)


def control(proc: subprocess.Popen[str], command: str) -> str:
    proc.stdin.write(command + "\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    return proc.stdout.readline().strip()  # type: ignore[union-attr]


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.pcsc
def test_mail_client_suite_against_the_stack(vpcd, tokend_stack) -> None:
    proc, env = tokend_stack
    cert_pem = Path(env["TOKEND_DEMO_DIR"], "piv", "encryption.pem").read_bytes()
    public_key = x509.load_pem_x509_certificate(cert_pem).public_key()
    blob = public_key.encrypt(b"content key", padding.PKCS1v15())  # type: ignore[union-attr]
    with Client(env["TOKEND_SOCKET"]) as client:
        (slot,) = client.slot_list(token_present=True)
        session = client.open_session(slot)
        client.login(session, env["TOKEND_DEMO_PIV_PIN"])
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == b"content key"
        client.subscribe()
        assert control(proc, "unplug piv0") == "ok unplug piv0"
        assert client.next_event(timeout=5)["event"] == "left"
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert control(proc, "plug piv0") == "ok plug piv0"
        assert client.next_event(timeout=5)["event"] == "arrived"
        session = client.open_session(slot)
        # A new token instance: no login came back (private keys hidden until C_Login).
        assert client.find_objects(session, {"CKA_CLASS": "CKO_PRIVATE_KEY"}) == []
        client.login(session, env["TOKEND_DEMO_PIV_PIN"])
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == b"content key"
    assert control(proc, "list").startswith("piv0 piv plugged")
    assert control(proc, "fly away").startswith("error: unknown command")


@pytest.mark.pcsc
def test_eof_stops_everything_it_started(vpcd) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "--piv"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.strip() == "READY":
            break
    sock = next(ln.split("=", 1)[1].strip() for ln in lines if "TOKEND_SOCKET=" in ln)
    assert os.path.exists(sock)
    proc.stdin.close()  # type: ignore[union-attr]
    assert proc.wait(30) == 0
    assert not os.path.exists(sock)  # the daemon it started is gone, its directory too


@pytest.mark.usefixtures("bluetoothctl_shim")
def test_usb_and_ble_tokens_side_by_side_and_pulled_one_at_a_time() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "--usb", "--ble"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        env: dict[str, str] = {}
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("export "):
                name, _, value = line[len("export ") :].strip().partition("=")
                env[name] = value
            if line.strip() == "READY":
                break
        assert "DBUS_SYSTEM_BUS_ADDRESS" in env
        with Client(env["TOKEND_SOCKET"]) as client:
            assert len(client.slot_list(token_present=True)) == 2
            client.subscribe()
            assert control(proc, "unplug ble0") == "ok unplug ble0"
            assert client.next_event(timeout=5)["event"] == "left"
            assert len(client.slot_list(token_present=True)) == 1  # the USB token stays
            assert control(proc, "plug ble0") == "ok plug ble0"
            assert client.next_event(timeout=10)["event"] == "arrived"
            assert control(proc, "unplug usb0") == "ok unplug usb0"
            assert client.next_event(timeout=5)["event"] == "left"
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(30) == 0


def test_control_socket_answers_the_moment_ready_is_printed(tmp_path: Path) -> None:
    """`--control PATH`: another program connects as soon as it reads READY (no retry
    loop); a 0600 socket taking the same commands as stdin, `quit` stopping everything."""
    import socket
    import stat

    path = tmp_path / "control.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "--usb",
         "--control", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.strip() == "READY":
                break
        else:
            raise AssertionError("tokend simulate stopped before READY")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(path))
            answers = conn.makefile("r")
            conn.sendall(b"list\n")
            assert answers.readline().startswith("usb0 usb plugged")
            conn.sendall(b"unplug usb0\n")
            assert answers.readline().strip() == "ok unplug usb0"
            conn.sendall(b"quit\n")
            assert answers.readline().strip().startswith("ok")
        assert proc.wait(30) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(30)
