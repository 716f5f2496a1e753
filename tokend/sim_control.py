"""The control socket of in-process simulators (`tokend serve --simulate KIND
--simulate-control PATH`), so that other programs — and other projects' CI — can script
removals of the virtual tokens living inside the daemon.

One command per line, one answer line each:

    list           → ok piv0=plugged usb0=unplugged
    unplug NAME    → ok usb0 unplugged
    plug NAME      → ok usb0 plugged
    anything else  → error: …

The socket is created 0600 in a 0700 directory and only peers of the daemon's own uid (or
root) are served, as on the API socket. It exists only when asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tokend.daemon import peer_uid, prepare_socket_path
from tokend.simulators.base import SimulatedToken

log = logging.getLogger(__name__)

MAX_LINE = 1024
USAGE = "commands: list, unplug NAME, plug NAME"


class SimControl:
    def __init__(self, path: Path, tokens: Sequence[SimulatedToken]) -> None:
        self.path = path
        self.tokens = {t.name: t for t in tokens}
        self.allowed_uids = {os.getuid(), 0}
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        prepare_socket_path(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._accept, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
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
            pid, uid, _gid = peer_uid(writer.get_extra_info("socket"))
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
