"""An in-process reader: the `Transport` and `Watcher` seams over a `VirtualCard` held in
memory. Plug and unplug are explicit calls, so disconnect tests need no services at all.
The PC/SC path (`vpcd.py`) is the same card behind real pcscd."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator

from tokend.drivers.base import CardProtocol, ReaderEvent, ReaderEventKind, Transport
from tokend.errors import CardResetError, TransportError
from tokend.simulators.base import VirtualCard


class MemoryTransport:
    """A connection to the card in a `MemoryReader`; dead once the card is pulled. The
    protocol is the card's own (`VirtualCard.protocol`, T=1 when it does not say)."""

    def __init__(self, reader: MemoryReader, card: VirtualCard, insertion: int) -> None:
        self.reader = reader.name
        self.protocol: CardProtocol = getattr(card, "protocol", CardProtocol.T1)
        self.extended = self.protocol is not CardProtocol.T0
        self._owner = reader
        self._card = card
        self._insertion = insertion
        self._lock = threading.RLock()
        self._closed = False

    def _check(self, *, reset: bool = True) -> None:
        if self._closed or self._owner.insertion != self._insertion:
            raise TransportError(f"card removed from {self.reader}")
        if reset and self._owner.take_reset_notice(self):
            raise CardResetError(f"card in {self.reader} was reset by another program")

    def atr(self) -> bytes:
        self._check()
        return self._card.atr

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            self._check()
            self._owner.before_transmit(apdu)
            rapdu = self._card.process(bytes(apdu))
            # A card pulled while the command was in flight: its answer must not count.
            self._check(reset=False)
            return rapdu

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._check(reset=False)  # a reset is reported by the next transmit, as PC/SC does
            yield

    def close(self) -> None:
        self._closed = True


class MemoryReader:
    """One reader slot. ``insert(card)`` / ``remove()`` are the plug and unplug of tests;
    ``reset_by_other_program()`` simulates another PC/SC client resetting the card."""

    def __init__(self, name: str = "Memory Reader 0") -> None:
        self.name = name
        self.card: VirtualCard | None = None
        self.insertion = 0
        self._pending_reset: set[int] = set()
        self._watchers: list[MemoryWatcher] = []
        #: Test hook: called with each APDU before the card sees it (e.g. to pull the card
        #: mid-operation from another thread).
        self.on_transmit: list = []

    def insert(self, card: VirtualCard) -> None:
        if self.card is not None:
            self.remove()
        card.power_on()
        self.card = card
        self.insertion += 1
        self._notify(ReaderEvent(ReaderEventKind.ARRIVED, self.name, card.atr))

    def remove(self) -> None:
        if self.card is None:
            return
        self.card.power_off()
        self.card = None
        self.insertion += 1
        self._notify(ReaderEvent(ReaderEventKind.LEFT, self.name))

    def reset_by_other_program(self) -> None:
        if self.card is not None:
            self.card.reset()
            self._pending_reset.add(self.insertion)

    def take_reset_notice(self, transport: MemoryTransport) -> bool:
        if transport._insertion in self._pending_reset:
            self._pending_reset.discard(transport._insertion)
            return True
        return False

    def before_transmit(self, apdu: bytes) -> None:
        for hook in list(self.on_transmit):
            hook(apdu)

    def _notify(self, event: ReaderEvent) -> None:
        for watcher in list(self._watchers):
            watcher.push(event)

    def connect(self) -> Transport:
        if self.card is None:
            raise TransportError(f"no card in {self.name}")
        return MemoryTransport(self, self.card, self.insertion)


class MemoryWatcher:
    """`Watcher` over a set of `MemoryReader`s. Events may be raised from any thread."""

    name = "memory"

    def __init__(self, *readers: MemoryReader) -> None:
        self.readers = {r.name: r for r in readers}
        self._queue: asyncio.Queue[ReaderEvent | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        for reader in readers:
            reader._watchers.append(self)

    def add_reader(self, reader: MemoryReader) -> None:
        self.readers[reader.name] = reader
        reader._watchers.append(self)
        if reader.card is not None:
            self.push(ReaderEvent(ReaderEventKind.ARRIVED, reader.name, reader.card.atr))

    def push(self, event: ReaderEvent | None) -> None:
        if self._loop is None or self._queue is None:
            return  # not watched yet: events() starts with the current state anyway
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._queue.put_nowait(event)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[ReaderEvent]:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        for reader in self.readers.values():
            if reader.card is not None:
                yield ReaderEvent(ReaderEventKind.ARRIVED, reader.name, reader.card.atr)
        while True:
            event = await self._queue.get()
            if event is None:
                return
            yield event

    async def connect(self, reader: str) -> Transport:
        return self.readers[reader].connect()

    async def aclose(self) -> None:
        self.push(None)
        for reader in self.readers.values():
            with contextlib.suppress(ValueError):
                reader._watchers.remove(self)


class MemoryToken:
    """A named card in a `MemoryReader` (`tokend serve --simulate piv`): plug inserts the
    same card again, unplug pulls it."""

    def __init__(self, name: str, reader: MemoryReader, card: VirtualCard) -> None:
        self.name = name
        self.reader = reader
        self.card = card

    @property
    def plugged(self) -> bool:
        return self.reader.card is not None

    def plug(self) -> None:
        if self.reader.card is None:
            self.reader.insert(self.card)

    def unplug(self) -> None:
        self.reader.remove()
