"""The p11-kit front end with the other tokens and with the daemon's own PIN prompt, end to
end through Debian's unmodified p11-kit-client.so (issue 14: "also with the SIM and BLE
tokens"; issue 20: C_Login without a PIN through the p11-kit front end).

- The virtual SIM (IsoApplet PKI, T=0) on vpcd reader 1 behind the real pcscd: python-pkcs11
  decrypts (RSA-2048 PKCS#1 v1.5) and signs, pkcs11-tool's self-test passes, NSS cmsutil
  decrypts what `openssl cms -encrypt` made for the SIM's encryption certificate, and a SIM
  pulled mid-session is seen by the p11-kit client (no stale session), which logs in again
  after re-insertion.
- The BLE key (real bleak on a private dbus-daemon, fake BlueZ): python-pkcs11 decrypts
  (PKCS#1 v1.5, OAEP) and signs (RSA, ECDSA), pkcs11-tool's self-test passes, and the key
  going out of range mid-session is seen the same way.
- `tokend serve` configured with the protected authentication path and a real pinentry-tty
  on a pseudo-terminal: a p11-kit client logs in with no PIN, the PIN is typed into the
  daemon's prompt; cancel reaches the client as CKR_FUNCTION_CANCELED.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sim_fixtures import SIM_PIN, SIM_READER, SimVpcdPlug
from tests.test_p11kit import (
    CLIENT,
    PIN,
    _nss_db,
    _rsa_signer_card,
    client_env,
    run,
    wait_until,
)
from tokend.testing import ThreadDaemon, start_thread_daemon

pytestmark = pytest.mark.skipif(
    not CLIENT.exists(), reason="p11-kit-client.so missing (Debian package p11-kit-modules)"
)
CONSUMER = [sys.executable, "-m", "tests.p11kit_token_consumer"]


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tk-p11t-"))  # short: Unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --- the daemons ----------------------------------------------------------------------------


@pytest.fixture
def sim_p11(vpcd, sockdir: Path) -> Iterator[ThreadDaemon]:  # type: ignore[no-untyped-def]
    """tokend with the p11-kit front end, serving the demo virtual SIM on vpcd reader 1
    behind the machine's pcscd. ``extras``: card, demo, plug, slot, export (the PEM files)."""
    from tokend.drivers.pcsc import PcscWatcher
    from tokend.simulators.pcscd import wait_present
    from tokend.simulators.sim import VirtualSim
    from tokend.simulators.sim_demo import provision_sim_demo

    export = sockdir / "export"
    card = VirtualSim()
    demo = provision_sim_demo(card, export)
    plug = SimVpcdPlug(vpcd)
    plug.insert(card)
    wait_present(vpcd.reader(SIM_READER))
    running = start_thread_daemon(
        sockdir / "tokend.sock", [PcscWatcher(allow_virtual_readers=True)], p11kit=True
    )
    try:
        slot = _wait_for_token(running)
        running.extras.update(card=card, demo=demo, plug=plug, slot=slot, export=export)
        yield running
    finally:
        running.stop()
        plug.remove()


@pytest.fixture
def ble_p11(fake_bluez, sockdir: Path) -> Iterator[ThreadDaemon]:  # type: ignore[no-untyped-def]
    """tokend with the p11-kit front end and the real BLE driver (bleak), serving a bonded,
    trusted virtual BLE key that carries the demo PIV card plus an RSA signer in 9E.
    ``extras``: card, plug, slot, export, rsa_cert."""
    from tests.ble_fixtures import BlePlug
    from tokend.drivers.ble import BleWatcher, TrustStore
    from tokend.simulators.ble import VirtualBleKey

    export = sockdir / "export"
    card, rsa_cert = _rsa_signer_card(export)
    key = VirtualBleKey(card)
    fake_bluez.add_key(key, paired=True)
    TrustStore().add(key.address, key.name)  # what `tokenctl ble pair` records
    running = start_thread_daemon(sockdir / "tokend.sock", [BleWatcher()], p11kit=True)
    try:
        slot = _wait_for_token(running)
        running.extras.update(
            card=card, plug=BlePlug(fake_bluez, key), slot=slot, export=export, rsa_cert=rsa_cert
        )
        yield running
    finally:
        running.stop()


def _wait_for_token(running: ThreadDaemon) -> int:
    from tests.conftest import wait_for_token

    return wait_for_token(running, timeout=20.0)


# --- shared checks --------------------------------------------------------------------------


def _consumer_basic(running: ThreadDaemon, *args: str) -> dict[str, object]:
    res = run([*CONSUMER, "basic", *args], client_env(running))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["manufacturer"] == "tokend"
    assert out["slots"] == 1
    return out


def _pull_mid_session_then_relogin(running: ThreadDaemon, pin: str, decrypt_label: str) -> None:
    """A python-pkcs11 process holds a logged-in session through p11-kit-client.so while
    the token is pulled: its next calls fail with PKCS#11 errors (removed, then an invalid
    handle: no stale session), the process lives on, nothing comes back by itself after
    re-insertion, and a new login works."""
    proc = subprocess.Popen(
        [*CONSUMER, "hold", "--pin", pin, "--decrypt", decrypt_label],
        env=client_env(running),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(cmd: str) -> str:
        try:
            proc.stdin.write(cmd + "\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            answer = proc.stdout.readline()  # type: ignore[union-attr]
        except BrokenPipeError:
            answer = ""
        if not answer:  # the consumer died: that is a failure of the front end
            proc.wait(10)
            raise AssertionError(
                f"consumer died ({proc.returncode}) on {cmd!r}: {proc.stderr.read()}"  # type: ignore[union-attr]
            )
        return answer.strip()

    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()  # type: ignore[union-attr]
        assert ask("decrypt") == "ok still here"
        plug = running.extras["plug"]
        plug.remove()
        wait_until(lambda: ask("slots") == "slots 0")
        assert ask("decrypt") == "error DeviceRemoved"
        assert ask("decrypt") == "error SessionHandleInvalid"
        plug.insert(running.extras["card"])
        wait_until(lambda: ask("slots") == "slots 1", timeout=20.0)
        assert ask("decrypt") == "error SessionHandleInvalid"  # the old session stays dead
        assert ask("relogin") == "ok relogin"
        assert ask("decrypt") == "ok still here"
        _out, err = proc.communicate("quit\n", timeout=30)
        assert proc.returncode == 0, err  # (python-pkcs11 warns of dead searches: fine)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the SIM --------------------------------------------------------------------------------

SIM_ENC, SIM_SIGN = "Encryption key", "Signing key"


@pytest.mark.pcsc
def test_sim_python_pkcs11_decrypts_and_signs(sim_p11: ThreadDaemon) -> None:
    out = _consumer_basic(sim_p11, "--pin", SIM_PIN, "--decrypt", SIM_ENC, "--sign", SIM_SIGN)
    iccid = sim_p11.extras["demo"].iccid
    # The SIM, named by its ICCID (serialNumber holds 16 characters: the ICCID's tail).
    assert iccid in out["label"]  # type: ignore[operator]
    assert len(out["serial"]) == 16 and iccid.endswith(out["serial"])  # type: ignore[arg-type]
    assert out["decrypt_v15"] == "key transport v1.5"
    assert out["signatures"] == {SIM_SIGN: 256}  # RSA-2048, verified by the consumer


@pytest.mark.pcsc
def test_sim_pkcs11_tool_test_and_cms_decrypt_with_nss(
    sim_p11: ThreadDaemon, sockdir: Path
) -> None:
    env = client_env(sim_p11)
    base = ["pkcs11-tool", "--module", str(CLIENT)]
    res = run([*base, "--login", "--pin", SIM_PIN, "--test"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors" in res.stdout
    res = run([*base, "--login", "--pin", SIM_PIN, "--list-objects"], env)
    assert res.returncode == 0, res.stderr
    for label in (SIM_ENC, SIM_SIGN, "Retired encryption key 1"):
        assert f"label:      {label}" in res.stdout

    # Mail encrypted with `openssl cms -encrypt` (PKCS#1 v1.5 key transport, the OpenSSL
    # default) to the SIM's encryption certificate; NSS finds the key on the SIM and decrypts.
    work = sockdir / "nss"
    work.mkdir()
    db, env = _nss_db(sim_p11, work)
    msg, enc = work / "msg.txt", work / "msg.p7m"
    msg.write_text("Subject: test\n\na secret mail for the SIM\n")
    res = run(
        [
            *("openssl", "cms", "-encrypt", "-aes256", "-binary", "-outform", "DER"),
            *("-recip", str(sim_p11.extras["export"] / "encryption.pem")),
            *("-in", str(msg), "-out", str(enc)),
        ],
        env,
    )
    assert res.returncode == 0, res.stderr
    res = run(["cmsutil", "-D", "-d", f"sql:{db}", "-i", str(enc), "-p", SIM_PIN], env)
    assert res.returncode == 0, res.stderr
    assert "a secret mail for the SIM" in res.stdout


@pytest.mark.pcsc
def test_sim_pulled_mid_session_then_relogin(sim_p11: ThreadDaemon) -> None:
    _pull_mid_session_then_relogin(sim_p11, SIM_PIN, SIM_ENC)


# --- the BLE key ----------------------------------------------------------------------------


def test_ble_python_pkcs11_and_pkcs11_tool(ble_p11: ThreadDaemon) -> None:
    out = _consumer_basic(
        ble_p11,
        *("--pin", PIN, "--decrypt", "(9D)", "--oaep"),
        *("--sign", "(9E)", "--sign", "(9A)"),
    )
    assert out["label"].startswith("PIV #")  # type: ignore[union-attr]
    assert out["decrypt_v15"] == "key transport v1.5"
    assert out["decrypt_oaep_sha256"] == "oaep sha256"
    assert out["signatures"] == {"(9E)": 256, "(9A)": 64}  # RSA-2048 and P-256, verified
    base = ["pkcs11-tool", "--module", str(CLIENT)]
    res = run([*base, "--login", "--pin", PIN, "--test"], client_env(ble_p11))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors" in res.stdout


def test_ble_out_of_range_mid_session_then_relogin(ble_p11: ThreadDaemon) -> None:
    _pull_mid_session_then_relogin(ble_p11, PIN, "(9D)")


# --- the daemon's own PIN prompt (protected authentication path) -----------------------------


def _pinentry_daemon(
    tmp: Path, tty: str
) -> tuple[subprocess.Popen[str], Path, list[str], threading.Thread]:
    """`tokend serve --simulate piv` configured as a user would for the protected path, with
    Debian's pinentry-tty drawing on ``tty``; its log lines are collected."""
    from tests.test_pinentry import PINENTRY, _serve

    config = tmp / "config.toml"
    config.write_text(
        "protected_authentication_path = true\n"
        f'pinentry_program = "{PINENTRY}"\n'
        f'pinentry_tty = "{tty}"\n'
        "pinentry_timeout = 20\n"
    )
    sock = tmp / "run" / "tokend.sock"
    proc = _serve(sock, config, tmp)
    logs: list[str] = []
    reader = threading.Thread(target=lambda: logs.extend(proc.stdout or []), daemon=True)
    reader.start()
    return proc, sock, logs, reader


@pytest.fixture
def prompting(sockdir: Path) -> Iterator[tuple[Path, Path, object]]:  # type: ignore[no-untyped-def]
    from tests.test_pinentry import PINENTRY, Terminal

    if PINENTRY is None:
        pytest.skip("pinentry-tty not installed (Debian: pinentry-tty)")
    terminal = Terminal()
    proc, sock, logs, reader = _pinentry_daemon(sockdir, terminal.name)
    try:
        yield sock, sockdir, terminal
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        reader.join(5)
        terminal.close()
    assert PIN not in "".join(logs)  # the typed PIN never reaches a log line


def _protected_login(sock: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, P11_KIT_SERVER_ADDRESS=f"unix:path={sock.parent / 'pkcs11.sock'}")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen(
        [*CONSUMER, "protected", "--decrypt", "(9D)"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "flags protected=True"  # advertised via p11-kit
    assert proc.stdout.readline().strip() == "logging in"
    return proc


def _retries(sock: Path) -> int:
    from tokend.client import Client

    with Client(sock) as client:
        slot = client.slot_list(token_present=True)[0]
        status = client.call("tokend_GetTokenStatus", {"slot_id": slot})
        return int(status["status"]["pin_retries"])


def test_p11kit_login_without_a_pin_through_the_daemons_pinentry(prompting) -> None:  # type: ignore[no-untyped-def]
    from tokend.client import Client

    sock, _tmp, terminal = prompting
    with Client(sock) as native:
        info = native.token_info(native.slot_list(token_present=True)[0])
    proc = _protected_login(sock)
    try:
        screen = terminal.wait_for(b"PIN:")
        # The prompt names the program asking (the p11-kit client process, from its peer
        # credentials: pid and command line) and the token (label and serial).
        assert f"(pid {proc.pid})" in screen, screen
        assert "tests.p11kit_token_consumer protected" in screen, screen
        assert info["label"] in screen and info["token_serial"] in screen, screen
        terminal.type(PIN + "\n")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == "ok behind the prompt"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_p11kit_cancel_at_the_daemons_pinentry_is_function_canceled(prompting) -> None:  # type: ignore[no-untyped-def]
    sock, _tmp, terminal = prompting
    before = _retries(sock)
    proc = _protected_login(sock)
    try:
        terminal.wait_for(b"PIN:")
        terminal.type("\x04")  # Ctrl-D at the prompt: cancel
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        # CKR_FUNCTION_CANCELED reached the client (python-pkcs11's FunctionCancelled), the
        # client was not logged in, and no PIN try was used.
        assert out.splitlines() == ["error FunctionCancelled", "private keys visible 0"]
        assert _retries(sock) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
