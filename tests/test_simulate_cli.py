"""`tokend simulate piv|sim`: a virtual card on pcscd's vpcd reader, in the foreground,
controlled on stdin (design §6.1)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from tokend.simulators.pcscd import wait_absent, wait_present

pytestmark = pytest.mark.pcsc


def _simulate(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "piv", "--reader", "0", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _ask(proc: subprocess.Popen[str], command: str) -> str:
    """One control command on stdin; the answer line (skipping the NAME=value lines and
    the notes on stderr, which share the pipe here)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith(("ok ", "error ")):
            return line.strip()
    raise AssertionError(f"no answer to {command!r}")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    return out


def test_simulate_plugs_a_card_and_keeps_its_state(vpcd, tmp_path) -> None:
    state, out_dir = tmp_path / "card.json", tmp_path / "demo"
    proc = _simulate("--state", str(state), "--export-dir", str(out_dir))
    try:
        wait_present(vpcd.reader(0), timeout=15)
    finally:
        first = _stop(proc)
    wait_absent(vpcd.reader(0), timeout=5)
    assert "demo-provisioned" in first and "unplugged" in first
    assert (out_dir / "encryption.pem").exists()
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600  # private keys inside
    saved = state.read_text()

    proc = _simulate("--state", str(state))  # the same card again: not provisioned anew
    try:
        wait_present(vpcd.reader(0), timeout=15)
    finally:
        second = _stop(proc)
    assert "demo-provisioned" not in second
    assert json.loads(state.read_text())["guid"] == json.loads(saved)["guid"]


def _simulate_sim(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "sim", "--reader", "1", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_simulate_sim_blank_then_demo(vpcd, tmp_path) -> None:
    from tokend.simulators.pcscd import list_readers

    blank = tmp_path / "blank.json"
    proc = _simulate_sim("--state", str(blank), "--provision", "none")
    try:
        wait_present(vpcd.reader(1), timeout=15)
        index = str((list_readers() or []).index(vpcd.reader(1)))
        name = subprocess.run(
            ["opensc-tool", "--reader", index, "--name"], capture_output=True, text=True
        )
    finally:
        out = _stop(proc)
    wait_absent(vpcd.reader(1), timeout=5)
    assert "IsoApplet" in name.stdout  # OpenSC's isoApplet driver claims the virtual SIM
    assert "virtual SIM plugged" in out and "demo-provisioned" not in out
    iccid = next(line.split("=", 1)[1] for line in out.splitlines() if line.startswith("ICCID="))
    assert json.loads(blank.read_text())["iccid"] == iccid
    assert stat.S_IMODE(os.stat(blank).st_mode) == 0o600

    state, out_dir = tmp_path / "demo.json", tmp_path / "demo"
    proc = _simulate_sim("--state", str(state), "--export-dir", str(out_dir))
    try:
        wait_present(vpcd.reader(1), timeout=15)
        listing = subprocess.run(
            ["pkcs15-tool", "--reader", index, "--list-keys", "--list-certificates"],
            capture_output=True,
            text=True,
        )
    finally:
        out = _stop(proc)
    assert "demo-provisioned SIM" in out
    assert (out_dir / "encryption.pem").exists() and (out_dir / "ca.pem").exists()
    for label in ("Encryption key", "Signing key", "Retired encryption key 1"):
        assert f"Private RSA Key [{label}]" in listing.stdout
    # An existing SIM is never provisioned over.
    refused = subprocess.run(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "sim", "--reader", "1",
         "--state", str(state), "--provision", "demo"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 1 and "already holds a SIM" in refused.stderr


def test_simulate_takes_plug_unplug_status_quit_on_stdin(vpcd) -> None:
    """Design §6.1: another project's CI pulls the card and puts it back through stdin,
    one answer line per command; EOF stops the simulator and unplugs the card."""
    reader = vpcd.reader(0)
    proc = _simulate()
    try:
        assert proc.stdout is not None
        names = {}
        for line in proc.stdout:
            if "=" in line and line.split("=", 1)[0].isupper():
                key, value = line.strip().split("=", 1)
                names[key] = value
            if {"PCSC_READER", "PIV_SERIAL"} <= names.keys():
                break
        assert names["PCSC_READER"] == reader
        wait_present(reader, timeout=15)
        assert _ask(proc, "status") == f"ok plugged {reader}"
        assert _ask(proc, "unplug") == "ok unplug"
        wait_absent(reader, timeout=5)
        assert _ask(proc, "unplug") == "error not plugged"
        assert _ask(proc, "status") == f"ok unplugged {reader}"
        assert _ask(proc, "plug") == "ok plug"
        wait_present(reader, timeout=15)
        assert _ask(proc, "dance").startswith("error unknown command 'dance'")
        assert proc.stdin is not None
        proc.stdin.close()  # EOF = quit
        assert proc.wait(timeout=10) == 0
        wait_absent(reader, timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
