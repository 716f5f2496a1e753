"""The PC/SC transport family (pcscd via pyscard): `PcscTransport`, a shared-mode
connection to one card, and `PcscWatcher`, one ``SCardGetStatusChange`` thread reporting
cards arriving and leaving.

pyscard calls block, so they run only in threads (the watcher's own thread, the caller's
worker thread for transports, ``asyncio.to_thread`` for ``connect``), never on the loop.
Each transport has its own PC/SC context: pcsc-lite serialises calls per context, and the
watcher's context sits in ``SCardGetStatusChange`` most of the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from smartcard import scard

from tokend.drivers.base import CardProtocol, EventFanout, ReaderEvent, ReaderEventKind
from tokend.errors import CardResetError, TransportError

log = logging.getLogger(__name__)

#: pcsc-lite's pseudo reader whose state changes when readers are added or removed.
PNP_NOTIFICATION = "\\\\?PnP?\\Notification"
#: vsmartcard's vpcd readers. vpcd listens on every interface, so anyone on the network can
#: "insert" a card there: never trusted unless explicitly allowed (tests, `tokend simulate`).
VIRTUAL_READER_PREFIX = "Virtual PCD"

_PROTOCOLS = scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1

#: Codes meaning the card (or reader, or pcscd) is gone for this handle: the handle stays
#: dead even if the card comes back, so the transport marks itself gone.
_GONE_CODES = frozenset(
    {
        scard.SCARD_E_NOT_TRANSACTED,  # 0x80100016: removed mid-APDU
        scard.SCARD_W_REMOVED_CARD,  # 0x80100069
        scard.SCARD_E_NO_SMARTCARD,  # 0x8010000C
        scard.SCARD_E_READER_UNAVAILABLE,  # 0x80100017
        scard.SCARD_E_NO_SERVICE,  # 0x8010001D
        scard.SCARD_E_SERVICE_STOPPED,  # 0x8010001E
        scard.SCARD_E_INVALID_HANDLE,
        scard.SCARD_F_COMM_ERROR,
    }
)
#: Codes from the watcher's context meaning pcscd went away: re-establish the context.
_SERVICE_LOST_CODES = frozenset(
    {
        scard.SCARD_E_NO_SERVICE,
        scard.SCARD_E_SERVICE_STOPPED,
        scard.SCARD_E_INVALID_HANDLE,
        scard.SCARD_F_COMM_ERROR,
    }
)


def _describe(rv: int) -> str:
    return f"{scard.SCardGetErrorMessage(rv)} (0x{rv & 0xFFFFFFFF:08X})"


def is_virtual_reader(reader: str) -> bool:
    return reader.startswith(VIRTUAL_READER_PREFIX)


class PcscTransport:
    """A shared-mode (T=0 or T=1) connection to the card in ``reader``; blocking.

    Opening connects at once and raises `TransportError` when there is no card. A removed
    card leaves the transport dead for good (a new card is a new transport).
    """

    def __init__(self, reader: str) -> None:
        self.reader = reader
        self._lock = threading.RLock()
        self._depth = 0
        self._closed = False
        self._gone: str | None = None
        rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if rv != scard.SCARD_S_SUCCESS:
            raise TransportError(f"pcscd not reachable: {_describe(rv)}")
        self._ctx = ctx
        rv, card, protocol = scard.SCardConnect(ctx, reader, scard.SCARD_SHARE_SHARED, _PROTOCOLS)
        if rv != scard.SCARD_S_SUCCESS:
            scard.SCardReleaseContext(ctx)
            raise TransportError(f"cannot connect to the card in {reader!r}: {_describe(rv)}")
        self._card = card
        self._set_protocol(protocol)
        rv, atr = self._status()
        if rv != scard.SCARD_S_SUCCESS:
            self.close()
            raise TransportError(f"card in {reader!r} gone while connecting: {_describe(rv)}")
        self._atr = atr

    def _set_protocol(self, protocol: int) -> None:
        self._protocol = protocol
        self.protocol = CardProtocol.T0 if protocol == scard.SCARD_PROTOCOL_T0 else CardProtocol.T1
        #: pcscd passes extended APDUs to PC/SC v2 readers (vpcd included), but T=0 has
        #: no extended length at all.
        self.extended = self.protocol is CardProtocol.T1

    def __repr__(self) -> str:
        return f"PcscTransport({self.reader!r})"

    # -- helpers ------------------------------------------------------------------------

    def _status(self) -> tuple[int, bytes]:
        rv, _reader, _state, _protocol, atr = scard.SCardStatus(self._card)
        return rv, bytes(atr) if rv == scard.SCARD_S_SUCCESS else b""

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"transport to {self.reader!r} is closed")
        if self._gone is not None:
            raise TransportError(f"card in {self.reader!r} is gone: {self._gone}")

    def _fail(self, rv: int, what: str) -> TransportError:
        """The error to raise for a failed call; any failure counts as the token gone."""
        if rv in _GONE_CODES:
            self._gone = _describe(rv)
        return TransportError(f"{what} on {self.reader!r} failed: {_describe(rv)}")

    def _after_reset(self, what: str) -> CardResetError:
        """Another program reset the card: reconnect so the next call works, report the
        lost login. The caller must re-select its application."""
        rv, protocol = scard.SCardReconnect(
            self._card, scard.SCARD_SHARE_SHARED, _PROTOCOLS, scard.SCARD_LEAVE_CARD
        )
        if rv != scard.SCARD_S_SUCCESS:
            raise self._fail(rv, "reconnect after reset")
        self._set_protocol(protocol)
        if self._depth > 0:
            # The reset ended our transaction; take it again so the outer `with` balances.
            rv = scard.SCardBeginTransaction(self._card)
            if rv != scard.SCARD_S_SUCCESS:
                raise self._fail(rv, "transaction after reset")
        log.info("card in %r was reset by another program (%s)", self.reader, what)
        return CardResetError(f"card in {self.reader!r} was reset by another program")

    # -- Transport ------------------------------------------------------------------------

    def atr(self) -> bytes:
        self._check_open()
        return self._atr

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            self._check_open()
            rv, response = scard.SCardTransmit(self._card, self._protocol, list(apdu))
            if rv == scard.SCARD_S_SUCCESS:
                if len(response) < 2:  # vpcd's socket died mid-command: no status word
                    self._gone = "the card answered nothing"
                    raise TransportError(f"no response from the card in {self.reader!r}")
                return bytes(response)
            if rv == scard.SCARD_W_RESET_CARD:
                raise self._after_reset("transmit")
            raise self._fail(rv, "transmit")

    def check_identity(self) -> None:
        """Cheap same-card check: pcscd's ATR for our handle equals the one at connect."""
        with self._lock:
            self._check_open()
            rv, atr = self._status()
            if rv == scard.SCARD_W_RESET_CARD:
                raise self._after_reset("status")
            if rv != scard.SCARD_S_SUCCESS:
                raise self._fail(rv, "status")
            if atr != self._atr:
                self._gone = "a different card is in the reader"
                raise TransportError(f"card in {self.reader!r} was replaced")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self.check_identity()
                rv = scard.SCardBeginTransaction(self._card)
                if rv == scard.SCARD_W_RESET_CARD:
                    raise self._after_reset("begin transaction")
                if rv != scard.SCARD_S_SUCCESS:
                    raise self._fail(rv, "begin transaction")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and not self._closed:
                    # Fails only when the card is gone, which the next call reports anyway.
                    scard.SCardEndTransaction(self._card, scard.SCARD_LEAVE_CARD)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        card = getattr(self, "_card", None)
        if card is not None:
            scard.SCardDisconnect(card, scard.SCARD_LEAVE_CARD)
        scard.SCardReleaseContext(self._ctx)


@dataclass(frozen=True, slots=True)
class _CardSeen:
    atr: bytes
    #: pcsc-lite's per-reader event counter (high 16 bits of dwEventState): it moves on
    #: every insertion and removal, so a changed value means "not the card we saw before".
    counter: int


class PcscWatcher:
    """`Watcher` over pcscd: one thread in ``SCardGetStatusChange`` on every reader plus the
    PnP pseudo reader (finite timeout; ``SCardCancel`` on close). Survives pcscd restarts:
    every present card is reported LEFT, then a context is retried every ``retry_interval``.
    """

    name = "pcsc"

    def __init__(
        self,
        *,
        allow_virtual_readers: bool = False,
        poll_timeout: float = 1.0,
        retry_interval: float = 1.0,
    ) -> None:
        self.allow_virtual_readers = allow_virtual_readers
        self.poll_timeout = poll_timeout
        self.retry_interval = retry_interval
        self._lock = threading.Lock()
        self._present: dict[str, _CardSeen] = {}
        self._fanout = EventFanout(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready: asyncio.Event | None = None
        self._ctx: int | None = None
        self._warned_virtual: set[str] = set()
        self._closed = False

    # -- asyncio side -------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="pcsc-watcher", daemon=True)
        self._thread.start()

    async def events(self) -> AsyncIterator[ReaderEvent]:
        if self._closed:
            return
        self._ensure_started()
        assert self._ready is not None
        await self._ready.wait()
        async with contextlib.aclosing(self._fanout.subscribe(self._snapshot_locked)) as stream:
            async for event in stream:
                yield event

    def _snapshot_locked(self) -> list[ReaderEvent]:
        return [
            ReaderEvent(ReaderEventKind.ARRIVED, reader, seen.atr)
            for reader, seen in self._present.items()
        ]

    async def connect(self, reader: str) -> PcscTransport:
        if not self._allowed(reader):
            raise TransportError(f"reader {reader!r} is a virtual reader and not allowed")
        return await asyncio.to_thread(PcscTransport, reader)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._lock:
            if self._ctx is not None:
                scard.SCardCancel(self._ctx)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fanout.close()

    # -- watcher thread -------------------------------------------------------------------

    def _allowed(self, reader: str) -> bool:
        if self.allow_virtual_readers or not is_virtual_reader(reader):
            return True
        if reader not in self._warned_virtual:
            self._warned_virtual.add(reader)
            log.warning(
                "ignoring virtual reader %r (vpcd accepts cards from the network); "
                "enable allow_virtual_readers only for tests",
                reader,
            )
        return False

    def _emit_locked(self, event: ReaderEvent) -> None:
        loop = self._loop
        assert loop is not None
        log.debug("pcsc %s %s", event.kind.value, event.reader)
        self._fanout.emit_locked(loop, event)

    def _observe(self, reader: str, seen: _CardSeen | None) -> None:
        with self._lock:
            old = self._present.get(reader)
            if seen is None:
                if old is not None:
                    del self._present[reader]
                    self._emit_locked(ReaderEvent(ReaderEventKind.LEFT, reader))
                return
            if old is not None and old == seen:
                return
            if old is not None:
                # Swapped between two observations: the old token is gone all the same.
                self._emit_locked(ReaderEvent(ReaderEventKind.LEFT, reader))
            self._present[reader] = seen
            self._emit_locked(ReaderEvent(ReaderEventKind.ARRIVED, reader, seen.atr))

    def _mark_ready(self) -> None:
        ready, loop = self._ready, self._loop
        if ready is not None and loop is not None and not ready.is_set():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ready.set)

    def _service_lost(self, ctx: int, rv: int) -> None:
        log.warning(
            "pcscd went away (%s); retrying every %.1f s", _describe(rv), self.retry_interval
        )
        for reader in list(self._present):
            self._observe(reader, None)
        with self._lock:
            self._ctx = None
        scard.SCardReleaseContext(ctx)
        self._mark_ready()
        self._stop.wait(self.retry_interval)

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:
            log.exception("PC/SC watcher failed; no more PC/SC events")
        finally:
            # Never leave events() waiting on a thread that is gone.
            self._mark_ready()
            self._fanout.finish(self._loop)

    def _watch(self) -> None:
        ctx: int | None = None
        known: dict[str, int] = {}
        pnp_state = scard.SCARD_STATE_UNAWARE
        down_logged = False
        timeout_ms = int(self.poll_timeout * 1000)
        while not self._stop.is_set():
            if ctx is None:
                rv, new_ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
                if rv != scard.SCARD_S_SUCCESS:
                    if not down_logged:
                        log.info("pcscd not available (%s)", _describe(rv))
                        down_logged = True
                    self._mark_ready()
                    self._stop.wait(self.retry_interval)
                    continue
                with self._lock:
                    self._ctx = ctx = new_ctx
                if down_logged:
                    log.info("pcscd is back")
                down_logged = False
                known = {}
                pnp_state = scard.SCARD_STATE_UNAWARE

            rv, listed = scard.SCardListReaders(ctx, [])
            if rv == scard.SCARD_E_NO_READERS_AVAILABLE:
                listed = []
            elif rv != scard.SCARD_S_SUCCESS:
                self._service_lost(ctx, rv)
                ctx = None
                continue
            readers = [r for r in listed if self._allowed(r)]
            for reader in list(known):
                if reader not in readers:  # reader unplugged (or pcscd dropped it)
                    del known[reader]
                    self._observe(reader, None)

            states = [(r, known.get(r, scard.SCARD_STATE_UNAWARE)) for r in readers]
            states.append((PNP_NOTIFICATION, pnp_state))
            if self._stop.is_set():
                break
            rv, changed = scard.SCardGetStatusChange(ctx, timeout_ms, states)
            if rv in (scard.SCARD_E_TIMEOUT, scard.SCARD_E_CANCELLED):
                self._mark_ready()
                continue
            if rv == scard.SCARD_E_UNKNOWN_READER:
                continue  # a reader vanished between list and wait: list again
            if rv != scard.SCARD_S_SUCCESS:
                self._service_lost(ctx, rv)
                ctx = None
                continue
            for reader, event_state, atr in changed:
                current = event_state & ~scard.SCARD_STATE_CHANGED
                if reader == PNP_NOTIFICATION:
                    pnp_state = current
                    continue
                known[reader] = current
                self._observe(reader, self._seen(event_state, atr))
            self._mark_ready()

        with self._lock:
            self._ctx = None
        if ctx is not None:
            scard.SCardReleaseContext(ctx)

    @staticmethod
    def _seen(event_state: int, atr: list[int]) -> _CardSeen | None:
        unusable = (
            scard.SCARD_STATE_MUTE
            | scard.SCARD_STATE_UNAVAILABLE
            | scard.SCARD_STATE_UNKNOWN
            | scard.SCARD_STATE_IGNORE
        )
        if not event_state & scard.SCARD_STATE_PRESENT or event_state & unusable:
            return None
        return _CardSeen(bytes(atr), (event_state >> 16) & 0xFFFF)
