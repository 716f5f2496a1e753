"""`tokend simulate piv`: a virtual card on pcscd's vpcd reader, in the foreground."""

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
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


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
