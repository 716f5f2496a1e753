"""What every tokend socket listener shares (the native daemon and the p11-kit front end):
an accept loop that survives running out of descriptors, the peer check
(`tokend.socket_security.is_trusted_uid`) and the connection caps (`tokend.limits`), in
total and per uid. Each listener says its own log lines and serves its own protocol."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from tokend.limits import Limits
from tokend.socket_security import PeerCredentials, is_trusted_uid, peer_credentials


class SocketListener:
    """Base of a listener: subclasses give the limits, the log lines for a failed accept,
    a refused peer and a connection over the cap, and ``_serve`` (which must call
    ``_release(creds.uid)`` when the connection ends)."""

    def __init__(self) -> None:
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._per_uid: dict[int, int] = {}

    # -- what a listener says and does (each subclass overrides all five) ---------------

    def _limits(self) -> Limits:
        raise NotImplementedError

    def _accept_failed(self, exc: OSError) -> None:
        raise NotImplementedError

    def _refused(self, creds: PeerCredentials) -> None:
        raise NotImplementedError

    def _busy(self, conn: socket.socket, creds: PeerCredentials) -> None:
        """Over the cap: say so (the connection is closed afterwards)."""
        raise NotImplementedError

    async def _serve(self, conn: socket.socket, creds: PeerCredentials) -> None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------

    def _start_accepting(self, listener: socket.socket) -> None:
        self._listener = listener
        self._accept_task = asyncio.create_task(self._accept_loop(listener))

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if listener.fileno() == -1:
                    return  # closed by stop()
                # Out of descriptors (EMFILE/ENFILE) or memory: the pending connection stays
                # queued in the kernel; try again later instead of spinning (and logging)
                # on it. Anything else is retried the same way: the listener must not die.
                self._accept_failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        try:
            creds = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        if not is_trusted_uid(creds.uid):
            self._refused(creds)
            conn.close()
            return
        limits = self._limits()
        if (
            len(self._connections) >= limits.max_connections
            or self._per_uid.get(creds.uid, 0) >= limits.max_connections_per_uid
        ):
            self._busy(conn, creds)
            conn.close()
            return
        self._per_uid[creds.uid] = self._per_uid.get(creds.uid, 0) + 1
        task = asyncio.create_task(self._serve(conn, creds))
        self._connections.add(task)

    def _release(self, uid: int) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.discard(task)
        left = self._per_uid.get(uid, 1) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)

    async def _stop_accepting(self) -> None:
        """Stop accepting, close the listener, end every connection and wait for it."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["SocketListener"]
