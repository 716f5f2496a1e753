"""A tokend daemon inside your test process, for the CI of mail clients (and our own tests
and benchmarks): it runs in its own thread and event loop, exactly as the installed daemon
would, so the test talks to it through its socket and can plug and unplug virtual tokens
(`tokend.simulators.memory`, `tokend.simulators.vpcd`) from the test's own thread.

    reader = MemoryReader(); reader.insert(card)
    daemon = start_thread_daemon(sock_path, [MemoryWatcher(reader)])
    try: ... Client(sock_path) ...
    finally: daemon.stop()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tokend.daemon import Daemon
from tokend.drivers.base import Watcher
from tokend.limits import DEFAULT_LIMITS, Limits
from tokend.p11kit import socket_path as p11kit_socket_path
from tokend.p11kit.server import P11KitServer
from tokend.session import Engine
from tokend.wiring import build_registry

T = TypeVar("T")


@dataclass
class ThreadDaemon:
    socket: Path
    loop: asyncio.AbstractEventLoop
    daemon: Daemon
    thread: threading.Thread
    #: Free for the caller (tests keep the card, the demo material, the plug here).
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def p11kit_socket(self) -> Path:
        """Where the p11-kit front end listens (with ``p11kit=True``)."""
        return p11kit_socket_path(self.socket)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the daemon's loop (white-box checks)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def settle(self) -> None:
        """Wait until tokens that are arriving have been probed."""
        self.run(self.daemon.engine.registry.wait_settled())

    def stop(self) -> None:
        """Stop the daemon (sessions end, the socket is removed) and its thread."""
        self.run(self.daemon.stop(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_thread_daemon(
    socket: Path,
    watchers: Sequence[Watcher],
    limits: Limits = DEFAULT_LIMITS,
    *,
    p11kit: bool = False,
) -> ThreadDaemon:
    """Start a daemon serving ``socket`` with these watchers (and resource ``limits``);
    returns once it listens and the tokens present at start have been probed. Start-up
    errors are raised here. ``p11kit``: also serve the p11-kit RPC front end on
    ``pkcs11.sock`` beside ``socket`` (`ThreadDaemon.p11kit_socket`)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            registry = build_registry(watchers=watchers)
            daemon = Daemon(Engine(registry, limits=limits), socket)
            await daemon.start()
            if p11kit:
                front_end = P11KitServer(daemon.engine, p11kit_socket_path(socket))
                await front_end.start()
                daemon.front_ends.append(front_end)
            await asyncio.sleep(0)
            await registry.wait_settled()
            holder["daemon"] = daemon

        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # surfaced to the caller below
            holder["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="tokend-in-thread", daemon=True)
    thread.start()
    if not ready.wait(60):
        raise TimeoutError("tokend did not start within 60 s")
    if "error" in holder:
        raise holder["error"]
    return ThreadDaemon(socket, loop, holder["daemon"], thread)
