"""Where things live by default (shared by the daemon, the client and the CLI)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR``, else ``/run/user/$UID``, else ``$TMPDIR/tokend-$UID`` (TMPDIR
    defaults to /tmp). The last one lives in a directory everyone can write to: the
    daemon refuses it unless it is ours and private (tokend.socket_security), and the
    client checks who serves the socket, so another user cannot pre-create it and
    capture PINs."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    if not os.path.isdir(runtime):
        runtime = os.path.join(tempfile.gettempdir(), f"tokend-{os.getuid()}")
    return Path(runtime)


def default_socket_path() -> Path:
    """``$TOKEND_SOCKET``, else ``$XDG_RUNTIME_DIR/tokend/tokend.sock`` (design §4.1)."""
    env = os.environ.get("TOKEND_SOCKET")
    if env:
        return Path(env)
    return runtime_dir() / "tokend" / "tokend.sock"


def state_dir() -> Path:
    """tokend's own persistent state (e.g. the BLE keys it trusts): ``$TOKEND_STATE_DIR``,
    else ``$XDG_STATE_HOME/tokend``, else ``~/.local/state/tokend``."""
    env = os.environ.get("TOKEND_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local/state")
    return Path(base) / "tokend"
