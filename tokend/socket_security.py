"""Who may serve a tokend socket and who may talk to it: the checks every Unix socket of
tokend applies — the native API, the p11-kit RPC front end (``pkcs11.sock`` in the same
directory), the simulator control socket — written once so no listener forgets one.

A socket is only as private as the directories above it: whoever can rename a directory
on the path can swap the socket for their own and read the PINs a client sends. So:

Server side
  `secure_socket_directory(dir)`  walks the path from ``/`` one component at a time
      without following a link anyone else made, creates what is missing 0700 (whatever
      the umask), and refuses a directory on the way that is owned by another user or
      writable by group/others (except a root-owned sticky directory such as ``/tmp``)
      and a socket directory that is not the caller's own.
  `bind_private_socket(path)`     the above, then refuses a live server on the path,
      removes a stale socket, binds and listens; the socket file is 0600.
  `peer_credentials(sock)`        SO_PEERCRED of the other end.
  `is_trusted_uid(uid)`           the caller's own uid or root: the only peers served.

Client side
  `check_server(sock, path)`      before anything is sent: the server's uid (SO_PEERCRED)
      must be the client's own or root, else `UntrustedServerError`.
  `connect_checked(path)`         connect + `check_server`, for blocking clients.

Rank 0 (stdlib only), so the client library, the daemon and every front end can use it.
docs/threat-model.md says what these checks protect against.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

#: Symbolic links followed on one path before giving up (the kernel's own limit).
_MAX_LINKS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class InsecurePathError(PermissionError):
    """A directory on the socket's path could let another user replace the socket."""


class DaemonAlreadyRunning(RuntimeError):
    """A live server already answers on the socket path."""


class UntrustedServerError(PermissionError):
    """The process serving the socket is not run by this user (nor root)."""

    def __init__(self, path: str | Path, uid: int, pid: int) -> None:
        super().__init__(
            f"{path} is served by uid {uid} (pid {pid}), not by you (uid {os.getuid()}) "
            "or root: refusing to talk to it (another user may be trying to capture your PIN)"
        )
        self.uid = uid
        self.pid = pid


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def trusted_uids() -> frozenset[int]:
    """Peers (and servers) a tokend process trusts: its own user and root."""
    return frozenset({os.getuid(), 0})


def is_trusted_uid(uid: int) -> bool:
    return uid in trusted_uids()


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The other end's pid/uid/gid as the kernel recorded them at connect/listen time."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return PeerCredentials(pid, uid, gid)


# --- client side ---------------------------------------------------------------------------


def check_server(sock: socket.socket, path: str | Path) -> PeerCredentials:
    """Raise `UntrustedServerError` unless the connected server runs as us or root. Call it
    right after connect(), before sending a byte (a PIN must never reach a stranger)."""
    creds = peer_credentials(sock)
    if not is_trusted_uid(creds.uid):
        raise UntrustedServerError(path, creds.uid, creds.pid)
    return creds


def connect_checked(path: str | Path, timeout: float | None = None) -> socket.socket:
    """A blocking Unix stream socket connected to ``path`` whose server passed
    `check_server`; closed again (and the error raised) otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        check_server(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


# --- server side ---------------------------------------------------------------------------


def _describe_mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def _check_ancestor(st: os.stat_result, where: str) -> None:
    """A directory above the socket: only root or we may own it, and nobody else may
    change its entries (a root-owned sticky directory lets others add, never rename ours)."""
    if not is_trusted_uid(st.st_uid):
        raise InsecurePathError(
            f"{where} belongs to uid {st.st_uid}: another user could replace the tokend "
            "socket below it; use a directory of your own (set XDG_RUNTIME_DIR or "
            "TOKEND_SOCKET, or --socket)"
        )
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not (st.st_mode & stat.S_ISVTX and st.st_uid == 0):
        raise InsecurePathError(
            f"{where} (mode {_describe_mode(st.st_mode)}) is writable by group or others: "
            "they could replace the tokend socket below it; chmod go-w it or choose "
            "another directory"
        )


def _check_own(st: os.stat_result, where: str) -> None:
    """The socket's own directory: ours, and not open for others to put entries in."""
    if st.st_uid != os.getuid():
        raise InsecurePathError(
            f"{where} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): refusing "
            "to serve a socket there (set XDG_RUNTIME_DIR or TOKEND_SOCKET, or --socket)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise InsecurePathError(
            f"{where} (mode {_describe_mode(st.st_mode)}) is writable by group or others, "
            "so anything in it may be someone else's; remove it (or check it and chmod 700 it)"
        )


def _open_directory(path: Path, create: bool) -> tuple[int, Path]:
    """Open ``path`` as a directory, component by component from ``/``, never letting the
    kernel follow a link: each link is read and followed here, and only if root or we
    made it. Every directory passed is checked (`_check_ancestor`); missing ones are
    created 0700 when ``create``. Returns the open fd and the link-free path."""
    text = str(path) if path.is_absolute() else os.path.join(os.getcwd(), str(path))
    todo = [p for p in text.split("/") if p][::-1]  # a stack: next component last
    root = os.open("/", _DIR_FLAGS)
    stack: list[tuple[int, str]] = [(root, "/")]
    links = 0
    try:
        _check_ancestor(os.fstat(root), "/")
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            parent_fd, parent_path = stack[-1]
            where = os.path.join(parent_path, name)
            created = False
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
                    created = True
                except FileExistsError:
                    pass  # made meanwhile by someone: the checks below judge it
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                # The parent is trusted, so the link was made by its owner, root, or (in a
                # sticky directory) anyone: its own owner says which.
                if not is_trusted_uid(st.st_uid):
                    raise InsecurePathError(
                        f"{where} is a symbolic link made by uid {st.st_uid}: not following it"
                    )
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, f"too many symbolic links in {path}")
                target = os.readlink(name, dir_fd=parent_fd)
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop()[0])
                todo.extend([p for p in target.split("/") if p][::-1])
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, f"{where} is not a directory")
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            stack.append((fd, where))
            if created:
                os.fchmod(fd, 0o700)  # exactly 0700, whatever the umask took away or left
            _check_ancestor(os.fstat(fd), where)
        fd, real = stack.pop()
        return fd, Path(real)
    finally:
        for fd, _ in stack:
            os.close(fd)


def _shared_sticky(st: os.stat_result) -> bool:
    """A root-owned sticky directory such as /tmp: others may add entries, but never
    rename or remove ours."""
    return st.st_uid == 0 and bool(st.st_mode & stat.S_ISVTX)


def secure_socket_directory(directory: str | Path) -> Path:
    """Create (0700) and check the directory a socket will live in; returns its real
    path (links resolved), the one to bind in. Raises `InsecurePathError` with a
    one-line explanation when another user could replace the socket. A socket placed
    directly in a shared sticky directory (``--socket /tmp/x.sock``) is allowed — nobody
    can rename it there — and that directory is never chmod-ed."""
    fd, real = _open_directory(Path(directory), create=True)
    try:
        st = os.fstat(fd)
        if _shared_sticky(st) and st.st_mode & stat.S_IWOTH:
            return real
        _check_own(st, str(real))
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)  # through the fd we opened without following links
    finally:
        os.close(fd)
    return real


def prepare_socket_path(path: str | Path) -> Path:
    """`secure_socket_directory` for the socket's directory, then: refuse a live server
    (`DaemonAlreadyRunning`), remove a stale socket, refuse anything else in the way.
    Returns the path to bind (in the real directory)."""
    path = Path(path)
    real = secure_socket_directory(path.parent) / path.name
    try:
        st = os.lstat(real)
    except FileNotFoundError:
        return real
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{real} exists and is not a socket")
    if not is_trusted_uid(st.st_uid):
        raise InsecurePathError(f"{real} exists and belongs to uid {st.st_uid}: not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(real))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        real.unlink(missing_ok=True)  # nobody listens: a crashed server's leftover
    else:
        raise DaemonAlreadyRunning(f"another server is already listening on {path}")
    finally:
        probe.close()
    return real


def bind_private_socket(path: str | Path, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking Unix stream socket at ``path`` (0600, in a checked 0700
    directory of ours). Every tokend listener is made with this."""
    real = prepare_socket_path(path)
    # Bound under a temporary name, made 0600, then renamed into place: the socket never
    # exists under its real name with the umask's mode (and no process-wide umask change).
    # The staging name is as long as the real one: a path that fits sockaddr_un still does.
    name = real.name
    if len(name) < 2:
        staging = real.with_name(f".{name}")
    else:
        staging = real.with_name(("~" if name.startswith(".") else ".") + name[1:])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        staging.unlink(missing_ok=True)
        sock.bind(str(staging))
        os.chmod(staging, 0o600)
        sock.listen(backlog)
        os.rename(staging, real)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        staging.unlink(missing_ok=True)
        raise
    return sock
