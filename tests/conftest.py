"""Shared fixtures. The daemon under test runs in its own thread and event loop, exactly
as the installed daemon would, and tests talk to it through its socket."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tokend.drivers.base import Watcher

from tokend.daemon import Daemon
from tokend.registry import SlotRegistry
from tokend.session import Engine


@dataclass
class RunningDaemon:
    socket: Path
    loop: asyncio.AbstractEventLoop
    daemon: Daemon
    thread: threading.Thread
    extras: dict[str, object] = field(default_factory=dict)

    def run(self, coro, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        """Run a coroutine on the daemon's loop (for white-box checks)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def settle(self) -> None:
        self.run(self.daemon.engine.registry.wait_settled())


def start_daemon(socket: Path, watchers: list[Watcher]) -> RunningDaemon:
    from tokend.drivers.piv import PivToken

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
        except BaseException as exc:  # surface start-up failures in the test
            holder["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="tokend-under-test", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in holder:
        raise holder["error"]  # type: ignore[misc]
    return RunningDaemon(socket, loop, holder["daemon"], thread)  # type: ignore[arg-type]


def stop_daemon(running: RunningDaemon) -> None:
    fut = asyncio.run_coroutine_threadsafe(running.daemon.stop(), running.loop)
    fut.result(15)
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(10)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    # Unix socket paths are limited to 108 bytes; tmp_path can be long.
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="tokend-"))
    return d / "tokend.sock"


@pytest.fixture
def memory_piv(sock_path: Path) -> Iterator[RunningDaemon]:
    """The daemon with one demo-provisioned virtual PIV card in an in-process reader."""
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    demo = provision_demo(card, key_agreement=True)
    reader = MemoryReader("Memory Reader 0")
    reader.insert(card)
    running = start_daemon(sock_path, [MemoryWatcher(reader)])
    running.extras.update(card=card, demo=demo, reader=reader)
    try:
        yield running
    finally:
        stop_daemon(running)
