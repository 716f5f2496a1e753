"""systemd integration, with systemd's own tools: the user units pass
`systemd-analyze verify`, and socket activation (`systemd-socket-activate`, the same
LISTEN_FDS protocol the service manager uses) starts the daemon on the first connection and
answers it; `Type=notify` readiness arrives on NOTIFY_SOCKET."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokend.client import Client

ROOT = Path(__file__).resolve().parent.parent
ACTIVATE = shutil.which("systemd-socket-activate")
ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tokend-rt-"))
    os.chmod(path, 0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(ANALYZE is None and not os.environ.get("CI"), reason="no systemd-analyze")
def test_user_units_verify_clean(runtime_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    # The unit runs ~/.local/bin/tokend (pip install --user / pipx); verify checks it exists.
    (home / ".local" / "bin" / "tokend").symlink_to(Path(sys.executable).parent / "tokend")
    result = subprocess.run(
        [
            *(str(ANALYZE), "verify", "--user"),
            *(str(ROOT / "systemd" / name) for name in ("tokend.socket", "tokend.service")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime_dir)},
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.skipif(ACTIVATE is None and not os.environ.get("CI"), reason="no systemd tools")
def test_socket_activation_starts_the_daemon_on_first_connection(runtime_dir: Path) -> None:
    native = runtime_dir / "tokend" / "tokend.sock"
    native.parent.mkdir(mode=0o700)
    notify_path = runtime_dir / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    tokend = [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc"]
    proc = subprocess.Popen(
        [
            *(str(ACTIVATE), "-l", str(native), "--fdname=tokend"),
            *("-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH", "--", *tokend, "--simulate", "piv"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert "Listening on" in proc.stdout.readline()  # the activator owns the socket now
        # Nothing runs yet; the first connection starts tokend, which answers it.
        with Client(native) as client:
            assert client.call("C_GetInfo", {})["info"]["protocol_version"]
            state = notify.recv(4096).decode()
            assert "READY=1" in state
            assert client.slot_list(token_present=True) == [0]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        notify.close()
    assert "socket activation" in out


def test_sandbox_paths_that_may_be_missing_are_optional() -> None:
    """A fresh account may have no ~/.local/state or ~/.cache: a ReadWritePaths= entry that
    does not exist fails the namespace set-up (226/NAMESPACE) unless it is prefixed with
    "-" (systemd.exec(5)). Only the runtime directory (%t) always exists for a user
    manager; tokend's own state directory is created by systemd (StateDirectory=)."""
    unit = (ROOT / "systemd" / "tokend.service").read_text()
    entries = [
        path
        for line in unit.splitlines()
        if line.startswith("ReadWritePaths=")
        for path in line.partition("=")[2].split()
    ]
    assert entries, "tokend.service lists no ReadWritePaths"
    required = [path for path in entries if not path.startswith("-") and path != "%t"]
    assert not required, f"may be missing on a fresh account, so need '-': {required}"
    assert "StateDirectory=tokend" in unit.splitlines()
