"""`tokend serve` as a process: answers on its socket, stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tokend.client import Client


def test_serve_simulated_token_and_graceful_sigterm(sock_path: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokend.cli.tokend_main",
            "serve",
            "--no-pcsc",
            "--simulate",
            "piv",
            "--socket",
            str(sock_path),
            "--export-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock_path.exists():  # nothing to wait on but the file (a new process)
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "tokend did not start"
            time.sleep(0.02)
        with Client(sock_path) as client:
            assert client.slot_list(token_present=True) == [0]
        assert (tmp_path / "encryption.pem").exists()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert not sock_path.exists()  # removed on the way out
    assert "123456" not in out  # the demo PIN is never logged
