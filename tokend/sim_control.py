"""The control socket of in-process simulators (`tokend serve --simulate KIND
--simulate-control PATH`), so that other programs — and other projects' CI — can script
removals of the virtual tokens living inside the daemon.

One command per line, one answer line each:

    list           → ok piv0=plugged usb0=unplugged
    unplug NAME    → ok usb0 unplugged
    plug NAME      → ok usb0 plugged
    anything else  → error: …

The socket is created 0600 in a 0700 directory and only peers of the daemon's own uid (or
root) are served, as on the API socket (the shared checks of tokend.socket_security). It
exists only when asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from tokend.simulators.base import SimulatedToken
from tokend.socket_security import bind_private_socket, peer_credentials, trusted_uids

log = logging.getLogger(__name__)

MAX_LINE = 1024
USAGE = "commands: list, unplug NAME, plug NAME"


class SimControl:
    def __init__(self, path: Path, tokens: Sequence[SimulatedToken]) -> None:
        self.path = path
        self.tokens = {t.name: t for t in tokens}
        self.allowed_uids = set(trusted_uids())
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        listener = bind_private_socket(self.path, backlog=16)
        self._server = await asyncio.start_unix_server(self._accept, sock=listener, limit=MAX_LINE)
        log.info("simulator control socket on %s (%s)", self.path, ", ".join(self.tokens))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def answer(self, line: str) -> str:
        words = line.split()
        if not words:
            return f"error: empty command ({USAGE})"
        command, args = words[0], words[1:]
        if command == "list" and not args:
            states = (
                f"{n}={'plugged' if t.plugged else 'unplugged'}" for n, t in self.tokens.items()
            )
            return "ok " + " ".join(states)
        if command in ("plug", "unplug") and len(args) == 1:
            token = self.tokens.get(args[0])
            if token is None:
                known = ", ".join(self.tokens) or "none"
                return f"error: no simulated token {args[0]!r} (known: {known})"
            action = token.plug if command == "plug" else token.unplug
            # Plugging powers a virtual card up; keep it off the event loop.
            await asyncio.to_thread(action)
            log.info("simulator control: %s %s", command, token.name)
            return f"ok {token.name} {command}ged"
        return f"error: unknown command {line.strip()[:40]!r} ({USAGE})"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            creds = peer_credentials(writer.get_extra_info("socket"))
            pid, uid = creds.pid, creds.uid
        except OSError:
            writer.close()
            return
        if uid not in self.allowed_uids:
            log.warning("simulator control: refused pid %d uid %d", pid, uid)
            writer.close()
            return
        try:
            while True:
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b"error: line too long\n")
                    break
                if not raw:
                    break
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    reply = "error: not UTF-8"
                else:
                    reply = await self.answer(line)
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
