"""The daemon: a Unix socket serving the native JSON-RPC API to clients of the same user.

Security (tokend.socket_security, shared with every other listener): the socket's
directory chain is checked and created 0700, the socket is 0600; every peer's uid is read
with SO_PEERCRED and anyone but the daemon's own user (and root) is refused. A second
daemon on the same path is refused; a stale socket (nobody answering) is replaced.

Resources (tokend.limits): connections are capped in total and per uid; when the process
runs out of file descriptors the accept loop backs off and says so once per interval
(asyncio's own accept loop logged a traceback per attempt: 96 MB in 37 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Protocol

from tokend.api import Api
from tokend.consent import ClientInfo
from tokend.errors import FunctionFailedError, TokendError
from tokend.limits import Limits
from tokend.listener import SocketListener
from tokend.paths import default_socket_path
from tokend.protocol import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    LOGIN_LOST_NOTIFICATION,
    MAX_REQUEST_BYTES,
    METHOD_NOT_FOUND,
    SERVER_BUSY,
    SLOT_EVENT_NOTIFICATION,
    Params,
    ProtocolError,
    decode_request,
    encode_error,
    encode_notification,
    encode_result,
)
from tokend.registry import SlotEvent
from tokend.session import Application, Engine, LoginLost
from tokend.socket_security import (
    DaemonAlreadyRunning,
    PeerCredentials,
    bind_private_socket,
    peer_credentials,
    prepare_socket_path,
)

__all__ = ["Daemon", "DaemonAlreadyRunning", "peer_uid", "prepare_socket_path"]

log = logging.getLogger(__name__)

#: Calls that may block for long; they run beside the connection's other requests.
_BLOCKING = {"C_WaitForSlotEvent"}


class FrontEnd(Protocol):
    async def stop(self) -> None: ...


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
    """(pid, uid, gid) of the peer (kept for callers of the old name)."""
    creds = peer_credentials(sock)
    return creds.pid, creds.uid, creds.gid


class _RateLimitedLog:
    """One log line per reason per interval, with the count of those held back, so a
    flood (fd exhaustion, a refused peer hammering the socket) cannot flood the log."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" ({held} more like this in the last {self.interval:.0f} s)" if held else ""
        log.log(level, message + suffix, *args)


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
        # Answers go out every `max_batch` requests: a client pipelining thousands of
        # small requests never makes the daemon hold thousands of answers, and since
        # `send` waits for the client to read (drain), one that does not read is not read.
        batch = self.daemon.limits.max_batch
        responses = []
        for line in lines:
            if line.strip():
                response = await self.handle(line)
                if response:
                    responses.append(response)
                if len(responses) >= batch:
                    await self.send(b"".join(responses))
                    responses = []
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
            limit = self.daemon.limits.max_pending_waits
            if len(self._tasks) >= limit:
                # Answered in order, without a task: a flood of waits costs nothing.
                message = f"{limit} blocking calls are already waiting on this connection"
                error = FunctionFailedError(message)
                return (
                    None
                    if request.notification
                    else encode_error(request.id, int(error.ckr), f"{error.ckr_name}: {message}")
                )
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
            event: SlotEvent | LoginLost | None = await queue.get()
            if event is None or queue is not self.app.notify:
                continue  # unsubscribed since: this queue is dead, look again
            if isinstance(event, LoginLost):
                params = {
                    "slot_id": event.slot_id,
                    "generation": event.generation,
                    "serial": event.serial,
                    "reason": event.reason,
                }
                await self.send(encode_notification(LOGIN_LOST_NOTIFICATION, params))
                continue
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


class Daemon(SocketListener):
    def __init__(
        self,
        engine: Engine,
        socket_path: Path | None = None,
        *,
        listen_socket: socket.socket | None = None,
        limits: Limits | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.api = Api(engine)
        self.socket_path = socket_path or default_socket_path()
        #: A listening socket handed over by systemd (socket activation): its path, mode and
        #: directory belong to the socket unit, so the daemon neither creates nor removes it.
        self.listen_socket = listen_socket
        self.limits = limits or engine.limits
        self._stopped = asyncio.Event()
        self._log_limited = _RateLimitedLog()
        #: Other listeners on the same engine (the p11-kit front end); stopped first.
        self.front_ends: list[FrontEnd] = []

    async def start(self) -> None:
        if self.listen_socket is not None:
            # Socket activation: systemd made the socket (the unit sets its mode and
            # directory); peers, caps and the accept loop are the same as ours.
            name = self.listen_socket.getsockname()
            if name:
                self.socket_path = Path(name)
            self.listen_socket.setblocking(False)
            self._start_accepting(self.listen_socket)
            await self.engine.registry.start()
            log.info("listening on %s (socket activation)", self.socket_path)
            return
        self._start_accepting(bind_private_socket(self.socket_path))
        await self.engine.registry.start()
        log.info("listening on %s", self.socket_path)

    # -- SocketListener -------------------------------------------------------------------

    def _limits(self) -> Limits:
        return self.limits

    def _accept_failed(self, exc: OSError) -> None:
        self._log_limited(
            "accept",
            logging.ERROR,
            "cannot accept connections: %s (%d open); retrying",
            exc.strerror or exc,
            len(self._connections),
        )

    def _refused(self, creds: PeerCredentials) -> None:
        self._log_limited(
            "refused", logging.WARNING, "refused client pid %d uid %d", creds.pid, creds.uid
        )

    def _busy(self, conn: socket.socket, creds: PeerCredentials) -> None:
        self._log_limited(
            "busy",
            logging.WARNING,
            "too many connections (%d open, %d from uid %d): refusing pid %d",
            len(self._connections),
            self._per_uid.get(creds.uid, 0),
            creds.uid,
            creds.pid,
        )
        with contextlib.suppress(OSError):
            conn.send(encode_error(None, SERVER_BUSY, "too many connections to tokend"))

    async def _serve(self, conn: socket.socket, creds: PeerCredentials) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn)
        except OSError:
            conn.close()
            self._release(creds.uid)
            return
        app = self.engine.open_application(
            peer=f"pid {creds.pid}", client=client_info(creds.pid, creds.uid)
        )
        try:
            await Connection(self, reader, writer, app).serve()
        except asyncio.CancelledError:
            pass  # the daemon is stopping
        finally:
            self._release(creds.uid)

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
        for front_end in self.front_ends:
            await front_end.stop()
        await self._stop_accepting()
        await self.engine.registry.stop()
        if self.listen_socket is None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        log.info("stopped")
