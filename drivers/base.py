"""The transport seams. A transport is a dumb byte pipe with presence; a watcher reports
readers and cards arriving and leaving. Simulators implement the same protocols."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable


class CardProtocol(Enum):
    """The transmission protocol negotiated with the card (ISO 7816-3), as the transport
    reports it. T=0 cards take no extended-length APDUs and want case-4 commands without
    Le (the answer comes through 61xx + GET RESPONSE)."""

    T0 = "T=0"
    T1 = "T=1"
    #: contactless / USB / BLE framings that carry whole APDUs (no T=0 restrictions)
    DIRECT = "direct"


class ReaderEventKind(Enum):
    ARRIVED = "arrived"  # a card (token) is now present in the reader
    LEFT = "left"  # the card is gone, or the reader itself went away


@dataclass(frozen=True, slots=True)
class ReaderEvent:
    kind: ReaderEventKind
    reader: str  # transport-unique reader name: stable slot identity
    atr: bytes = b""


@runtime_checkable
class Transport(Protocol):
    """A connection to the card in one reader. Blocking; called off the event loop.

    ``transmit`` raises `tokend.errors.TransportError` when the card is gone or the link
    failed, and `tokend.errors.CardResetError` when another program reset the card (the
    transport recovers the connection first, so the next transmit works). It never parses
    status words.
    """

    reader: str
    #: True when extended-length APDUs can pass (USB/PC-SC v2); False → command chaining.
    #: Always False on T=0.
    extended: bool
    #: The protocol negotiated with the card (re-read after a reconnect).
    protocol: CardProtocol

    def atr(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes: ...

    def transaction(self) -> AbstractContextManager[None]:
        """Exclusive section: no other program's APDU comes between ours. Re-entrant."""
        ...

    def close(self) -> None: ...


class TokenRefused(Exception):
    """A transport's verdict that the token opened on it must not be used (e.g. a BLE key
    whose token identity differs from the one trusted at that address). Not retried."""


@runtime_checkable
class IdentityCheck(Protocol):
    """Optional on a transport: called with the token's identity serial once the applet is
    open; raises `TokenRefused` to keep the token out."""

    def accept_identity(self, serial: str) -> None: ...


@runtime_checkable
class Watcher(Protocol):
    """Reports presence for one transport family and opens transports to present cards.

    Optional attributes the registry looks for (a vendor PKCS#11 module's watcher has them):
    ``open_token(transport) -> Token | None``, its own applet opener, used instead of the
    registry's applet list; ``probe_timeout`` (seconds) bounding that opener;
    ``reports_returns = True`` when the watcher itself reports a token again (ARRIVED)
    after the registry retired its instance on a failure, so the registry does not re-probe.
    """

    name: str

    def events(self) -> AsyncIterator[ReaderEvent]:
        """Current state first (ARRIVED for every present card), then changes, until closed."""
        ...

    async def connect(self, reader: str) -> Transport: ...

    async def aclose(self) -> None: ...


class EventFanout:
    """The subscriber side of a thread-fed `Watcher`: every ``events()`` caller gets its own
    queue; the watcher thread emits into all of them through the event loop.

    ``lock`` is the watcher's own lock, the one guarding its presence state: the snapshot
    and the subscription are taken under it together, so no change is lost or doubled.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._queues: list[asyncio.Queue[ReaderEvent | None]] = []
        self._finished = False

    async def subscribe(
        self, snapshot_locked: Callable[[], list[ReaderEvent]]
    ) -> AsyncIterator[ReaderEvent]:
        """``snapshot_locked()`` (called with the lock held: ARRIVED for every present
        card) first, then every emitted event, until `finish` or `close`."""
        queue: asyncio.Queue[ReaderEvent | None] = asyncio.Queue()
        with self._lock:
            snapshot = snapshot_locked()
            self._queues.append(queue)
            if self._finished:  # the thread is gone (closed or crashed): end at once
                queue.put_nowait(None)
        try:
            for event in snapshot:
                yield event
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._queues.remove(queue)

    def emit_locked(self, loop: asyncio.AbstractEventLoop, event: ReaderEvent) -> None:
        """From any thread, with the lock held."""
        for queue in self._queues:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(queue.put_nowait, event)

    def finish(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """From the watcher thread as it ends: never leave a subscriber waiting on a
        thread that is gone, and end later subscriptions at once."""
        with self._lock:
            self._finished = True
            for queue in self._queues:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, None)  # type: ignore[union-attr]

    def close(self) -> None:
        """On the event loop (``aclose``): end every subscription."""
        with self._lock:
            for queue in self._queues:
                queue.put_nowait(None)
