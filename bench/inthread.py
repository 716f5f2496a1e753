"""tokend run in a thread of the bench process (its own event loop), as tests/conftest.py
does: the bench can then pull a card out of an in-process reader and timestamp the pull."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokend.daemon import Daemon
from tokend.drivers.base import Watcher
from tokend.drivers.piv import PivToken
from tokend.registry import SlotRegistry
from tokend.session import Engine


@dataclass
class ThreadDaemon:
    socket: Path
    loop: asyncio.AbstractEventLoop
    daemon: Daemon
    thread: threading.Thread

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.daemon.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_thread_daemon(socket: Path, watchers: Sequence[Watcher]) -> ThreadDaemon:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            registry = SlotRegistry([PivToken.open])
            for watcher in watchers:
                registry.add_watcher(watcher)
            daemon = Daemon(Engine(registry), socket)
            await daemon.start()
            await asyncio.sleep(0)
            await registry.wait_settled()
            holder["daemon"] = daemon

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:
            holder["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="tokend-bench", daemon=True)
    thread.start()
    ready.wait(60)
    if "error" in holder:
        raise holder["error"]  # type: ignore[misc]
    return ThreadDaemon(socket, loop, holder["daemon"], thread)  # type: ignore[arg-type]
