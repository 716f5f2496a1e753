"""Fixtures for the PC/SC tier (pcscd + vpcd). conftest.py imports them, so every test
module gets the same session-wide pcscd by naming the fixture.

The session-wide pcscd is the machine's, reused if one is running with the vpcd readers,
else started (and stopped at the end) by `PcscdService`. Every test starts and ends with
empty slots. Tests that stop and restart pcscd (marker ``pcscd_restart``) must not stop
someone else's: where a private pcscd can run (root with a mount namespace) they are
deselected here and run by `tests/test_pcscd_private.py` in a child pytest whose whole
PC/SC tier is a `PrivatePcscdService` of its own (own socket, own vpcd ports).

Under CI (``CI=true``) nothing may skip: a missing service fails the tier (see conftest).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest

from tokend.drivers.base import ReaderEvent, ReaderEventKind, Watcher
from tokend.simulators.base import VirtualCard
from tokend.simulators.pcscd import (
    PcscdService,
    PrivatePcscdService,
    VpcdEntry,
    pcscd_unavailable_reason,
    private_pcscd_unavailable_reason,
    wait_absent,
    wait_present,
)
from tokend.simulators.vpcd import VpcdCardConnection

ECHO_ATR = bytes.fromhex("3B9713810180746F6B656E649B")  # T=1, historical bytes 80 "tokend"
OTHER_ATR = bytes.fromhex("3B8880010000000000000000C1")  # T=1, another "card model"


class EchoCard:
    """A minimal `VirtualCard`: answers any command with its data and 90 00, and counts
    commands, power events and resets (so tests see what reached the card)."""

    def __init__(self, atr: bytes = ECHO_ATR) -> None:
        self._atr = atr
        self.commands = 0
        self.resets = 0
        self.powered = False

    @property
    def atr(self) -> bytes:
        return self._atr

    def power_on(self) -> None:
        self.powered = True

    def power_off(self) -> None:
        self.powered = False

    def reset(self) -> None:
        self.resets += 1

    def process(self, apdu: bytes) -> bytes:
        self.commands += 1
        if len(apdu) > 7 and apdu[4] == 0:  # extended Lc
            data = apdu[7 : 7 + int.from_bytes(apdu[5:7], "big")]
        elif len(apdu) > 5:
            data = apdu[5 : 5 + apdu[4]]
        else:
            data = b""
        return bytes(data) + b"\x90\x00"


@dataclass
class Vpcd:
    """Plugs virtual cards into the two readers of one leased vpcd entry; unplugs them all
    at teardown."""

    service: PcscdService
    entry: VpcdEntry
    connections: list[VpcdCardConnection] = field(default_factory=list)

    def reader(self, index: int = 0) -> str:
        return self.entry.reader_names[index]

    def connection(self, card: VirtualCard, reader: int = 0) -> VpcdCardConnection:
        conn = VpcdCardConnection(card, port=self.entry.port(reader))
        self.connections.append(conn)
        return conn

    def plug(self, card: VirtualCard, reader: int = 0, *, wait: bool = True) -> VpcdCardConnection:
        conn = self.connection(card, reader)
        conn.plug()
        if wait:
            wait_present(self.reader(reader))
        return conn

    def unplug_all(self) -> None:
        for conn in self.connections:
            conn.unplug()
        self.connections.clear()


def in_ci() -> bool:
    """CI runners set CI=true; there every test must run (no skip hides a missing service)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


#: Set by `prepare_private_pcscd` when pytest starts (before any PC/SC call in the process).
_private: dict[str, PrivatePcscdService] = {}


#: Set in the environment of the child pytest that runs the pcscd-restart tests.
PRIVATE_PCSCD_ENV = "TOKEND_TEST_PRIVATE_PCSCD"


def private_pcscd_session() -> bool:
    """True in the child pytest whose whole PC/SC tier runs on a private pcscd."""
    return os.environ.get(PRIVATE_PCSCD_ENV) == "1"


def prepare_private_pcscd() -> None:
    """In the private-pcscd child: point this process's PC/SC client at a pcscd of its own.
    Called from ``pytest_configure``: libpcsclite reads the socket path once, at its first
    call, so the whole process uses one pcscd. (The main test session keeps the machine's
    pcscd: `tokend simulate` subprocesses plug cards into vpcd's default ports there.)"""
    if not private_pcscd_session():
        return
    reason = private_pcscd_unavailable_reason()
    if reason is not None:
        raise pytest.UsageError(f"{PRIVATE_PCSCD_ENV}=1 but no private pcscd here: {reason}")
    service = PrivatePcscdService()
    service.activate()
    _private["service"] = service


def discard_private_pcscd() -> None:
    service = _private.pop("service", None)
    if service is not None:
        service.close()


@pytest.fixture(scope="session")
def pcscd_service() -> Iterator[PcscdService]:
    reason = pcscd_unavailable_reason()
    if reason is not None:
        if in_ci():
            pytest.fail(f"PC/SC tier cannot run under CI: {reason}")
        pytest.skip(reason)
    service = _private.get("service")
    if service is not None:
        with service:
            yield service
        return
    with PcscdService() as shared:
        yield shared


@pytest.fixture
def vpcd(pcscd_service: PcscdService) -> Iterator[Vpcd]:
    # An earlier test may have stopped ours, or a reused pcscd may have left with its owner.
    pcscd_service.ensure_running()
    # A lease: parallel test processes on this machine share one pcscd, not the slots.
    with pcscd_service.lease() as entry:
        # The pcscd we reused may belong to a test process that ended while we waited.
        pcscd_service.ensure_running()
        for name in entry.reader_names:
            # A stale client from an earlier test would hold the slot and break this one.
            wait_absent(name, timeout=5.0)
        harness = Vpcd(pcscd_service, entry)
        try:
            yield harness
        finally:
            harness.unplug_all()
            for name in entry.reader_names:
                with contextlib.suppress(RuntimeError):  # pcscd stopped by the test
                    wait_absent(name, timeout=5.0)


class EventRecorder:
    """Drains a watcher's event stream into a queue, so tests can wait with timeouts
    (cancelling a wait on an async generator would close the generator itself)."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.queue: asyncio.Queue[tuple[float, ReaderEvent]] = asyncio.Queue()
        self._task = asyncio.create_task(self._drain(watcher.events()))

    async def _drain(self, events: AsyncIterator[ReaderEvent]) -> None:
        loop = asyncio.get_running_loop()
        async for event in events:
            self.queue.put_nowait((loop.time(), event))

    async def next(self, timeout: float = 3.0) -> tuple[float, ReaderEvent]:
        """(loop time of arrival, event); TimeoutError when none comes in time."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def expect(
        self, kind: ReaderEventKind, reader: str, timeout: float = 3.0
    ) -> tuple[float, ReaderEvent]:
        at, event = await self.next(timeout)
        assert (event.kind, event.reader) == (kind, reader), f"unexpected {event}"
        return at, event

    async def aclose(self) -> None:
        await self.watcher.aclose()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5.0)


@contextlib.asynccontextmanager
async def recording(watcher: Watcher) -> AsyncIterator[EventRecorder]:
    recorder = EventRecorder(watcher)
    try:
        yield recorder
    finally:
        await recorder.aclose()
