"""systemd's two protocols, without a dependency: socket activation (`LISTEN_FDS`,
`LISTEN_PID`, `LISTEN_FDNAMES`; sd_listen_fds(3)) and readiness notification
(`NOTIFY_SOCKET`; sd_notify(3)). Both are a few lines of environment and one datagram.

`tokend.socket` passes the native socket named `tokend` and the p11-kit socket named
`pkcs11`; `tokend.service` is `Type=notify`, so `READY=1` is sent once the tokens present
at start have been probed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Mapping

#: The first passed descriptor (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


class ActivationError(ValueError):
    """The environment says sockets were passed, but they are not usable."""


def listen_fds(
    environ: Mapping[str, str] | None = None, *, unset: bool = True
) -> dict[str, socket.socket]:
    """The listening Unix sockets systemd passed to this process, by name
    (`FileDescriptorName=`; an unnamed one is called "unknown", as systemd does).

    Empty when the process was not socket-activated or the variables were meant for another
    process (`LISTEN_PID` differs). With ``unset`` the variables are removed so children
    (pinentry, simulators) do not inherit them."""
    env = os.environ if environ is None else environ
    try:
        pid = int(env.get("LISTEN_PID", ""))
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    if pid != os.getpid() or count <= 0:
        return {}
    names = env.get("LISTEN_FDNAMES", "")
    labels = names.split(":") if names else []
    if unset and environ is None:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    sockets: dict[str, socket.socket] = {}
    for index in range(count):
        fd = LISTEN_FDS_START + index
        name = labels[index] if index < len(labels) and labels[index] else "unknown"
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ActivationError(f"passed descriptor {fd} ({name}) is not open") from exc
        if not stat.S_ISSOCK(mode):
            raise ActivationError(f"passed descriptor {fd} ({name}) is not a socket")
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise ActivationError(f"passed socket {name} is not a Unix stream socket")
        if name in sockets:
            raise ActivationError(f"two passed sockets are named {name!r}")
        sockets[name] = sock
    return sockets


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. "READY=1", "STOPPING=1", "STATUS=…") to the service manager.
    False when there is no manager to tell (not started by systemd with Type=notify)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), target)
        except OSError:
            return False
    return True


def under_journal() -> bool:
    """Whether stderr goes to the journal ($JOURNAL_STREAM names it): log lines then carry
    no timestamp of their own (journald adds one)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device or not inode:
        return False
    with contextlib.suppress(OSError, ValueError):
        st = os.fstat(2)
        return st.st_dev == int(device) and st.st_ino == int(inode)
    return False
