"""Slots, presence and token generations.

A *slot* is where a token can be (one per reader, with a stable id that is never removed —
NSS assumes slots only ever appear). A *token instance* is one insertion of one token: it
gets a new generation number every time, so nothing opened on an earlier insertion can
match it. This module turns watcher events into instances and retires them; what retiring
means for sessions and logins is the session layer's business (it registers a listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import NoReturn, TypeVar

from tokend.drivers.base import (
    IdentityCheck,
    ReaderEvent,
    ReaderEventKind,
    TokenRefused,
    Transport,
    Watcher,
)
from tokend.errors import (
    DeviceRemovedError,
    SlotIdInvalidError,
    TokenNotPresentError,
    TransportError,
)
from tokend.model import Token, TokenIdentity, TokenInfo, TokenObject
from tokend.pkcs11 import CKM

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Pauses between probe attempts of an arriving token; None marks the last attempt.
PROBE_RETRY_DELAYS: tuple[float | None, ...] = (0.05, 0.2, 0.5, None)

#: How long a stopping daemon waits for its tokens to close.
STOP_CLOSE_TIMEOUT = 5.0

#: After a token retires, how long to wait before handing free heap memory back to the
#: system (its driver closes on its own thread first); retirements in between share one.
TRIM_DELAY = 5.0


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a C library without it."""
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()

#: Opens the applet on a fresh transport: a Token, or None if this applet is not there.
AppletOpener = Callable[[Transport], Token | None]


async def _open_bounded(
    opener: AppletOpener, transport: Transport, timeout: float | None
) -> Token | None:
    """Run an applet opener off the loop, at most ``timeout`` seconds. An opener that
    answers after its time is up gets its token closed, so nothing it opened leaks."""
    future = asyncio.get_running_loop().run_in_executor(None, opener, transport)
    if timeout is None:
        return await future
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout)
    except TimeoutError:

        def close_late(done: asyncio.Future[Token | None]) -> None:
            if not done.cancelled() and done.exception() is None and done.result() is not None:
                token = done.result()
                assert token is not None
                threading.Thread(target=token.close, name="late-token-close", daemon=True).start()

        future.add_done_callback(close_late)
        raise


class SlotEventKind(Enum):
    ARRIVED = "arrived"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class SlotEvent:
    slot_id: int
    kind: SlotEventKind
    serial: str | None
    generation: int
    monotonic: float


class RetiredToken:
    """What a retired instance keeps of its token: who it was (for logs, events and
    prompts). The driver — parsed certificates, public keys, the object table, key
    handles, the transport — is let go at retirement, so a session that died with the
    token and that its client never closes costs a few hundred bytes, not the token
    (found by the soak: docs/reliability.md §3). Nothing may use a retired token: each of
    the driver's methods answers CKR_DEVICE_REMOVED, as `TokenInstance.run` does for a
    retired instance; anything else (a property such as a provisioning profile, a private
    name) is simply not there, so ``getattr(token, name, default)`` still gives the
    default."""

    def __init__(
        self, identity: TokenIdentity, info: TokenInfo, methods: frozenset[str] = frozenset()
    ) -> None:
        self.identity = identity
        self.info = info
        self._methods = methods

    @classmethod
    def of(cls, token: Token) -> RetiredToken:
        kind = type(token)
        methods = frozenset(
            name
            for name in dir(kind)
            if not name.startswith("_") and callable(getattr(kind, name, None))
        )
        return cls(token.identity, token.info, methods)

    def close(self) -> None:
        pass  # the driver was closed at retirement

    def __getattr__(self, name: str) -> Callable[..., NoReturn]:
        if name.startswith("_") or name not in self._methods:
            raise AttributeError(name)

        def gone(*args: object, **kwargs: object) -> NoReturn:
            raise DeviceRemovedError(f"token {self.identity.serial} was removed")

        gone.__name__ = name
        return gone


class TokenInstance:
    """What is present in a slot now. All card I/O for it goes through `run`, on the
    instance's own threads, so blocking drivers never touch the event loop: one thread (one
    call at a time) unless the token says it takes parallel calls (``workers``, a vendor
    module's token). A token with a ``call_timeout`` has every call bounded by it: a call
    that does not return in time retires the instance (its thread is left to the driver)."""

    def __init__(
        self,
        registry: SlotRegistry,
        slot: Slot,
        generation: int,
        token: Token,
        transport: Transport,
    ) -> None:
        self.registry = registry
        self.slot_id = slot.slot_id
        self.generation = generation
        #: the driver; a `RetiredToken` once the instance is retired (see `shutdown`)
        self.token: Token = token
        self.transport: Transport | None = transport
        self.retired = False
        self.retire_reason = ""
        self._mechanisms: frozenset[CKM] | None = None
        self._objects_seen: object = None
        self._object_index: dict[str, TokenObject] = {}
        workers = max(1, int(getattr(token, "workers", 1)))
        self.call_timeout: float | None = getattr(token, "call_timeout", None)
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"slot{slot.slot_id}"
        )

    @property
    def key(self) -> tuple[int, int]:
        return (self.slot_id, self.generation)

    def mechanism_set(self) -> frozenset[CKM]:
        """The token's mechanisms, computed once per instance (they never change on it)."""
        if self._mechanisms is None:
            self._mechanisms = frozenset(m.mechanism for m in self.token.mechanisms())
        return self._mechanisms

    def object_index(self) -> dict[str, TokenObject]:
        """Objects by key; rebuilt only when the driver hands out a new objects list
        (after provisioning)."""
        objects = self.token.objects()
        if self._objects_seen is not objects:
            self._object_index = {obj.key: obj for obj in objects}
            self._objects_seen = objects
        return self._object_index

    def ensure_live(self) -> None:
        if self.retired:
            raise DeviceRemovedError(f"token in slot {self.slot_id} was removed")

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run a blocking token call. A transport failure retires the instance (§5.1); a
        result that arrives after the instance was retired is dropped (§5.2)."""
        self.ensure_live()
        executor = self._executor
        if executor is None:  # only a retired instance has none (never the loop's default)
            raise DeviceRemovedError(f"token in slot {self.slot_id} was removed")
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(executor, lambda: fn(*args, **kwargs))
            if self.call_timeout is None:
                result = await future
            else:
                # asyncio.timeout, not wait_for: no extra task per call (it is measurable).
                async with asyncio.timeout(self.call_timeout):
                    result = await future
        except TimeoutError:
            log.warning(
                "slot %d: token call %s did not return within %g s: token counted as removed",
                self.slot_id,
                getattr(fn, "__name__", "?"),
                self.call_timeout,
            )
            self.registry.retire(self, f"no answer within {self.call_timeout:g} s")
            raise DeviceRemovedError(f"token in slot {self.slot_id} stopped answering") from None
        except TransportError as exc:
            self.registry.retire(self, f"transport failure: {exc}")
            raise DeviceRemovedError(f"token in slot {self.slot_id} is gone") from None
        if self.retired:
            raise DeviceRemovedError(f"token in slot {self.slot_id} was removed during the call")
        return result

    def shutdown(self) -> Future[None]:
        """Close token and transport on the instance's own thread; returns when that is
        done (the registry waits for it when the daemon stops). From now on the instance
        holds no driver state: sessions that died with it may live on (until their
        client touches or closes them) and must not keep the token's objects alive."""
        token, transport = self.token, self.transport

        def _close() -> None:
            with contextlib.suppress(Exception):
                token.close()
            with contextlib.suppress(Exception):
                if transport is not None:
                    transport.close()

        executor = self._executor
        assert executor is not None, "shutdown twice"  # retire is idempotent: it calls once
        done = executor.submit(_close)
        executor.shutdown(wait=False)
        # A call already on the executor keeps the driver alive until it returns (its
        # result is dropped: `run` sees `retired`); nothing else reaches it through here.
        self.token = RetiredToken.of(token)  # type: ignore[assignment]
        self.transport = None
        self._object_index = {}
        self._objects_seen = None
        self._mechanisms = None  # asked again, the retired token answers DEVICE_REMOVED
        self._executor = None  # its thread ends after _close; `run` refuses before this
        return done


@dataclass
class Slot:
    slot_id: int
    reader: str
    watcher: Watcher
    description: str
    instance: TokenInstance | None = None
    generation: int = 0
    #: Set while an arrival is being probed, so a LEFT during the probe wins.
    pending: int = 0
    hardware: bool = True
    unrecognized: bool = field(default=False)

    @property
    def token_present(self) -> bool:
        return self.instance is not None and not self.instance.retired


RetireListener = Callable[[TokenInstance], None]


class SlotRegistry:
    def __init__(self, applets: Sequence[AppletOpener]) -> None:
        self._applets = list(applets)
        self._slots: dict[int, Slot] = {}
        self._by_reader: dict[tuple[str, str], Slot] = {}
        self._ids = itertools.count(0)
        self._watchers: list[Watcher] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._retire_listeners: list[RetireListener] = []
        self._subscribers: list[Callable[[SlotEvent], None]] = []
        self._probes: set[asyncio.Task[None]] = set()
        self._closing: list[Future[None]] = []
        self._trim: asyncio.TimerHandle | None = None

    # --- wiring ------------------------------------------------------------------------

    def add_watcher(self, watcher: Watcher) -> None:
        self._watchers.append(watcher)
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            if self._tasks:
                self._tasks.append(asyncio.create_task(self._consume(watcher)))

    def on_retire(self, listener: RetireListener) -> None:
        self._retire_listeners.append(listener)

    def subscribe(self, callback: Callable[[SlotEvent], None]) -> Callable[[], None]:
        """Call ``callback`` (on the loop) for every slot event; returns an unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    async def start(self) -> None:
        for watcher in self._watchers:
            self._tasks.append(asyncio.create_task(self._consume(watcher)))

    async def wait_settled(self) -> None:
        """Wait for the probes of tokens that are arriving (used at start-up and in tests)."""
        while self._probes:
            await asyncio.gather(*list(self._probes), return_exceptions=True)

    async def stop(self) -> None:
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.aclose()
        for task in self._tasks + list(self._probes):
            task.cancel()
        for task in self._tasks + list(self._probes):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for slot in self._slots.values():
            if slot.instance is not None:
                self.retire(slot.instance, "daemon stopping", emit=False)
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        # Let the tokens close (a module logs out and is finalised) before the daemon is
        # gone; a token that does not answer is not waited for long.
        closing = [asyncio.wrap_future(f) for f in self._closing if not f.done()]
        self._closing.clear()
        if closing:
            await asyncio.wait(closing, timeout=STOP_CLOSE_TIMEOUT)

    # --- queries -----------------------------------------------------------------------

    def slots(self) -> list[Slot]:
        return [self._slots[k] for k in sorted(self._slots)]

    def slot(self, slot_id: int) -> Slot:
        try:
            return self._slots[slot_id]
        except KeyError:
            raise SlotIdInvalidError(f"no slot {slot_id}") from None

    def instance(self, slot_id: int) -> TokenInstance:
        slot = self.slot(slot_id)
        if not slot.token_present:
            raise TokenNotPresentError(f"no token in slot {slot_id}")
        assert slot.instance is not None
        return slot.instance

    # --- events ------------------------------------------------------------------------

    def _slot_for(self, watcher: Watcher, reader: str) -> Slot:
        key = (watcher.name, reader)
        slot = self._by_reader.get(key)
        if slot is None:
            slot = Slot(next(self._ids), reader, watcher, description=reader[:64])
            self._slots[slot.slot_id] = slot
            self._by_reader[key] = slot
            log.info("slot %d: reader %r", slot.slot_id, reader)
        return slot

    async def _consume(self, watcher: Watcher) -> None:
        try:
            async for event in watcher.events():
                self.handle_event(watcher, event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watcher %s failed", watcher.name)

    def handle_event(self, watcher: Watcher, event: ReaderEvent) -> None:
        slot = self._slot_for(watcher, event.reader)
        if event.kind is ReaderEventKind.LEFT:
            slot.pending += 1  # cancels a probe in progress
            if slot.instance is not None and not slot.instance.retired:
                self.retire(slot.instance, "token removed")
            return
        # ARRIVED: whatever was there before is a different instance now (a swap).
        if slot.instance is not None and not slot.instance.retired:
            self.retire(slot.instance, "token replaced")
        slot.pending += 1
        task = asyncio.create_task(self._probe(slot, slot.pending))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, slot: Slot, ticket: int) -> None:
        token, transport = None, None
        # A watcher may bring its own opener (a vendor module: the module is the applet).
        own_opener = getattr(slot.watcher, "open_token", None)
        applets = [own_opener] if own_opener is not None else self._applets
        timeout: float | None = getattr(slot.watcher, "probe_timeout", None)
        # A card that has just arrived may not answer yet (pcscd powers it up while we
        # connect: SCARD_E_NOT_TRANSACTED): a failure is retried a few times; a card
        # that answers but carries no supported applet is not.
        for delay in PROBE_RETRY_DELAYS:
            if ticket != slot.pending:
                return
            try:
                transport = await slot.watcher.connect(slot.reader)
                for opener in applets:
                    token = await _open_bounded(opener, transport, timeout)
                    if token is not None:
                        break
                break
            except Exception as exc:
                log.info("slot %d: token not ready (%s); trying again", slot.slot_id, exc)
                if transport is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(transport.close)
                    transport = None
                if delay is None:
                    log.warning("slot %d: token not usable: %s", slot.slot_id, exc)
                    return
                await asyncio.sleep(delay)
        if token is None or ticket != slot.pending:
            if transport is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(transport.close)
            if token is None and ticket == slot.pending:
                slot.unrecognized = True
                log.warning("slot %d: no supported applet on the token", slot.slot_id)
            return
        assert transport is not None
        if isinstance(transport, IdentityCheck):
            try:
                await asyncio.to_thread(transport.accept_identity, token.identity.serial)
            except TokenRefused as exc:
                log.warning("slot %d: token not used: %s", slot.slot_id, exc)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(token.close)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(transport.close)
                return
        slot.unrecognized = False
        slot.generation += 1
        instance = TokenInstance(self, slot, slot.generation, token, transport)
        slot.instance = instance
        log.info(
            "slot %d: token %s arrived (generation %d)",
            slot.slot_id,
            token.identity.serial,
            slot.generation,
        )
        self._emit(
            SlotEvent(
                slot.slot_id,
                SlotEventKind.ARRIVED,
                token.identity.serial,
                slot.generation,
                time.monotonic(),
            )
        )

    def retire(self, instance: TokenInstance, reason: str, *, emit: bool = True) -> None:
        """The one place a token instance ends (§5.2). Idempotent."""
        if instance.retired:
            return
        instance.retired = True
        instance.retire_reason = reason
        slot = self._slots[instance.slot_id]
        slot.generation += 1  # anything keyed by the old generation can never match again
        log.info(
            "slot %d: token %s retired: %s", slot.slot_id, instance.token.identity.serial, reason
        )
        for listener in list(self._retire_listeners):
            try:
                listener(instance)
            except Exception:
                log.exception("retire listener failed")
        self._closing = [f for f in self._closing if not f.done()]
        self._closing.append(instance.shutdown())
        self._schedule_trim()
        if emit:
            self._emit(
                SlotEvent(
                    slot.slot_id,
                    SlotEventKind.LEFT,
                    instance.token.identity.serial,
                    instance.generation,
                    time.monotonic(),
                )
            )
        if reason.startswith("transport failure") and not getattr(
            slot.watcher, "reports_returns", False
        ):
            # The card may still be there (a glitch): probe again; it becomes a new instance.
            with contextlib.suppress(RuntimeError):
                slot.pending += 1
                task = asyncio.get_running_loop().create_task(self._reprobe(slot, slot.pending))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _reprobe(self, slot: Slot, ticket: int) -> None:
        await asyncio.sleep(0.2)
        if ticket == slot.pending and slot.instance is not None and slot.instance.retired:
            await self._probe(slot, ticket)

    def _schedule_trim(self) -> None:
        """Hand the heap memory glibc keeps after frees back to the system, a little after
        a token retired. Its driver's memory (certificates, objects, buffers) is freed
        then, but glibc keeps freed memory in its heaps, so a daemon that sees tokens come
        and go grows in RSS without holding more: the soak measured about 0.5 MiB a
        minute of it, all of it returned by ``malloc_trim`` (docs/reliability.md §3)."""
        if _MALLOC_TRIM is None or self._trim is not None:
            return
        with contextlib.suppress(RuntimeError):  # no loop: nothing retires in bulk there
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._run_trim)

    def _run_trim(self) -> None:
        self._trim = None
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def _emit(self, event: SlotEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("slot event subscriber failed")
