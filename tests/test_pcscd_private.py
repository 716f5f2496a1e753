"""The tests that stop and restart pcscd, run on a pcscd of their own.

Stopping the machine's pcscd would pull the cards from every other PC/SC program (other
test runs share it), so those tests (marker ``pcscd_restart``) used to skip whenever the
pcscd was not started by the test run. Here they run in a child pytest whose whole PC/SC
tier is a `PrivatePcscdService`: pcscd in its own mount namespace with a private
``/run/pcscd`` (its socket and PID file), the child's PC/SC client pointed at it with
``PCSCLITE_CSOCK_NAME``, and vpcd on two free ports. pcscd's socket path is compiled in and
pcscd has no option to move it, so a second pcscd is only possible this way (root with a
mount namespace); elsewhere the main session runs those tests itself, on a pcscd it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pcsc_fixtures import PRIVATE_PCSCD_ENV
from tokend.simulators.pcscd import private_pcscd_unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
#: The pcscd_restart tests; the child must run every one of them.
RESTART_TESTS = 3

pytestmark = [pytest.mark.pcsc, pytest.mark.pcscd_restart_runner]


def _pcscd_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "pcscd":
                    pids.add(int(entry.name))
            except OSError:
                continue
    return pids


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def test_pcscd_restart_tests_run_on_a_private_pcscd() -> None:
    reason = private_pcscd_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no private pcscd here ({reason}); the main session runs them")
    env = {k: v for k, v in os.environ.items() if k != "PCSCLITE_CSOCK_NAME"}
    env[PRIVATE_PCSCD_ENV] = "1"
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "pcscd_restart",
            "-rs",
            "tests",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else ""
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    assert f"{RESTART_TESTS} passed" in summary and "skipped" not in summary, summary
    # The child stopped its own pcscd (the only kind that lives in another mount namespace).
    ours = os.readlink("/proc/self/ns/mnt")
    leftover = [pid for pid in _pcscd_pids() if _mount_ns(pid) not in (ours, None)]
    assert not leftover, f"private pcscd left running: {leftover}"
