"""`tokend serve` as a process: answers on its socket, stops cleanly on SIGTERM, and logs
no PIN at either log level."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import PIN
from tokend.client import Client
from tokend.errors import PinIncorrectError

WRONG_PIN = "864209"


class Output:
    """The process's output, line by line, read on a thread so waits have timeouts."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float) -> None:
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout} s: {self.text}") from None
            if line is None:
                raise AssertionError(f"tokend ended before {text!r}: {self.text}")
            if text in line:
                return

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def finish(self) -> str:
        self._thread.join(10)
        return self.text


@pytest.mark.parametrize("verbose", [False, True], ids=["default level", "-v (DEBUG)"])
def test_serve_simulated_token_and_graceful_sigterm(
    sock_path: Path, tmp_path: Path, verbose: bool
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokend.cli.tokend_main",
            *(["-v"] if verbose else []),
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
    output = Output(proc)
    try:
        # The banner comes once the daemon listens; the token may still be on its way, so
        # subscribe first, then look, then wait for its arrival (no race, no polling).
        output.wait_for("tokend: listening on", timeout=30)
        with Client(sock_path) as client:
            client.subscribe()
            if client.slot_list(token_present=True) != [0]:
                event = client.next_event(timeout=20)
                assert event["event"] == "arrived", event
            assert client.slot_list(token_present=True) == [0]
            session = client.open_session(0)
            with pytest.raises(PinIncorrectError):
                client.login(session, WRONG_PIN)
            client.login(session, PIN)
        assert (tmp_path / "encryption.pem").exists()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = output.finish()
    assert proc.returncode == 0, out
    assert not sock_path.exists()  # removed on the way out
    if verbose:
        assert " DEBUG " in out  # the level really was on
    for pin in (PIN, WRONG_PIN):
        assert pin not in out  # PINs are never logged
