"""The daemon: a Unix socket serving the native JSON-RPC API to clients of the same user.

Security: the socket's directory is 0700 and the socket 0600; every peer's uid is read
with SO_PEERCRED and anyone but the daemon's own user (and root) is refused. A second
daemon on the same path is refused; a stale socket (nobody answering) is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import struct
from pathlib import Path

from tokend.api import Api
from tokend.consent import ClientInfo
from tokend.errors import TokendError
from tokend.paths import default_socket_path
from tokend.protocol import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    MAX_REQUEST_BYTES,
    METHOD_NOT_FOUND,
    SLOT_EVENT_NOTIFICATION,
    Params,
    ProtocolError,
    decode_request,
    encode_error,
    encode_notification,
    encode_result,
)
from tokend.registry import SlotEvent
from tokend.session import Application, Engine

log = logging.getLogger(__name__)

#: Calls that may block for long; they run beside the connection's other requests.
_BLOCKING = {"C_WaitForSlotEvent"}


class DaemonAlreadyRunning(RuntimeError):
    pass


def client_info(pid: int, uid: int) -> ClientInfo:
    """The program behind a connection, from /proc (best effort: it may be gone already).
    Read at connect time, for prompts and the per-program policy."""
    exe = ""
    cmdline: list[str] = []
    with contextlib.suppress(OSError):
        exe = os.readlink(f"/proc/{pid}/exe")
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
        cmdline = [part.decode(errors="replace") for part in fh.read(4096).split(b"\0") if part]
    return ClientInfo(pid=pid, uid=uid, exe=exe, cmdline=tuple(cmdline))


def peer_uid(sock: socket.socket) -> tuple[int, int, int]:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def prepare_socket_path(path: Path) -> None:
    """Create the 0700 directory; refuse a live daemon; remove a stale socket."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to uid {st.st_uid}, not to us")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(directory, 0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            log.info("removing stale socket %s", path)
            path.unlink()
        else:
            raise DaemonAlreadyRunning(f"another tokend is already serving {path}")
        finally:
            probe.close()


class Connection:
    def __init__(
        self,
        daemon: Daemon,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        app: Application,
    ) -> None:
        self.daemon = daemon
        self.reader = reader
        self.writer = writer
        self.app = app
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(self, data: bytes) -> None:
        async with self._write_lock:
            if self.writer.is_closing():
                return
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def serve(self) -> None:
        notifier = asyncio.create_task(self._notifications())
        pending = bytearray()
        try:
            while True:
                try:
                    chunk = await self.reader.read(1 << 16)
                except ConnectionError:
                    return
                if not chunk:
                    if pending.strip():  # a last request without its newline
                        await self._answer([bytes(pending)])
                    return
                pending += chunk
                if b"\n" not in chunk:
                    if len(pending) > MAX_REQUEST_BYTES:
                        await self._refuse_oversized()
                        return
                    continue
                *lines, rest = pending.split(b"\n")
                pending = bytearray(rest)
                if len(pending) > MAX_REQUEST_BYTES or any(
                    len(line) > MAX_REQUEST_BYTES for line in lines
                ):
                    await self._refuse_oversized()
                    return
                # Requests that arrived together (a pipelined batch) are answered together:
                # one write instead of one per request.
                await self._answer(lines)
        finally:
            notifier.cancel()
            for task in list(self._tasks):
                task.cancel()
            await self.daemon.engine.close_application(self.app)
            with contextlib.suppress(Exception):
                self.writer.close()
                await self.writer.wait_closed()

    async def _refuse_oversized(self) -> None:
        log.warning("client %s: request over %d bytes, closing", self.app.peer, MAX_REQUEST_BYTES)
        message = f"request larger than {MAX_REQUEST_BYTES} bytes"
        await self.send(encode_error(None, INVALID_REQUEST, message))

    async def _answer(self, lines: list[bytes]) -> None:
        responses = []
        for line in lines:
            if line.strip():
                response = await self.handle(line)
                if response:
                    responses.append(response)
        if responses:
            await self.send(b"".join(responses))

    async def handle(self, line: bytes) -> bytes | None:
        """The response to one request line (None for notifications and for blocking calls,
        which answer on their own when they finish)."""
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            log.info("client %s: %s", self.app.peer, exc)
            return encode_error(exc.request_id, exc.code, str(exc))
        if request.method in _BLOCKING:
            task = asyncio.create_task(self._dispatch_and_send(request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return None
        return await self._dispatch(request)

    async def _dispatch_and_send(self, request) -> None:  # type: ignore[no-untyped-def]
        response = await self._dispatch(request)
        if response:
            await self.send(response)

    async def _dispatch(self, request) -> bytes | None:  # type: ignore[no-untyped-def]
        try:
            result = await self.daemon.api.call(self.app, request.method, Params(request.params))
        except KeyError:
            response = encode_error(
                request.id, METHOD_NOT_FOUND, f"method not found: {request.method}"
            )
        except TokendError as exc:
            # Messages never carry secrets; log the code and the method only.
            log.debug("client %s: %s -> %s", self.app.peer, request.method, exc.ckr_name)
            response = encode_error(
                request.id, int(exc.ckr), f"{exc.ckr_name}: {exc}", exc.data() or None
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("client %s: internal error in %s", self.app.peer, request.method)
            response = encode_error(
                request.id, INTERNAL_ERROR, f"internal error in {request.method}"
            )
        else:
            response = encode_result(request.id, result)
        return None if request.notification else response

    async def _notifications(self) -> None:
        while True:
            queue = self.app.notify
            if queue is None:
                await self.app.subscribed.wait()
                continue
            event: SlotEvent | None = await queue.get()
            if event is None or queue is not self.app.notify:
                continue  # unsubscribed since: this queue is dead, look again
            await self.send(
                encode_notification(
                    SLOT_EVENT_NOTIFICATION,
                    {
                        "slot_id": event.slot_id,
                        "event": event.kind.value,
                        "serial": event.serial,
                        "generation": event.generation,
                    },
                )
            )


class Daemon:
    def __init__(
        self,
        engine: Engine,
        socket_path: Path | None = None,
        *,
        listen_socket: socket.socket | None = None,
    ) -> None:
        self.engine = engine
        self.api = Api(engine)
        self.socket_path = socket_path or default_socket_path()
        #: A listening socket handed over by systemd (socket activation): its path, mode and
        #: directory belong to the socket unit, so the daemon neither creates nor removes it.
        self.listen_socket = listen_socket
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self.allowed_uids = {os.getuid(), 0}

    async def start(self) -> None:
        if self.listen_socket is not None:
            name = self.listen_socket.getsockname()
            if name:
                self.socket_path = Path(name)
            self._server = await asyncio.start_unix_server(self._accept, sock=self.listen_socket)
            await self.engine.registry.start()
            log.info("listening on %s (socket activation)", self.socket_path)
            return
        prepare_socket_path(self.socket_path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        await self.engine.registry.start()
        log.info("listening on %s", self.socket_path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            pid, uid, _gid = peer_uid(sock)
        except OSError:
            writer.close()
            return
        if uid not in self.allowed_uids:
            log.warning("refused client pid %d uid %d", pid, uid)
            writer.close()
            return
        app = self.engine.open_application(peer=f"pid {pid}", client=client_info(pid, uid))
        conn = Connection(self, reader, writer, app)
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await conn.serve()
        except asyncio.CancelledError:
            pass  # the daemon is stopping; asyncio's stream callback must not see this
        finally:
            if task is not None:
                self._connections.discard(task)

    def request_stop(self) -> None:
        self._stopped.set()

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._stopped.wait()
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.engine.registry.stop()
        if self.listen_socket is None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        log.info("stopped")
