"""Where things live by default (shared by the daemon, the client and the CLI)."""

from __future__ import annotations

import os
from pathlib import Path


def runtime_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    if not os.path.isdir(runtime):
        runtime = f"/tmp/tokend-{os.getuid()}"
    return Path(runtime)


def default_socket_path() -> Path:
    """``$TOKEND_SOCKET``, else ``$XDG_RUNTIME_DIR/tokend/tokend.sock`` (design §4.1)."""
    env = os.environ.get("TOKEND_SOCKET")
    if env:
        return Path(env)
    return runtime_dir() / "tokend" / "tokend.sock"
