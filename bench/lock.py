"""Item 4: lock latency per transport. From the simulated unplug to (i) the first refused
call of a client decrypting in a loop and (ii) the ``left`` slot event at a subscriber.

The daemon runs in a thread of this process (so the unplug can be timestamped); the
decrypting client and the subscriber are blocking clients on their own threads, each
stamping the moment its answer arrives. (i) includes the card operation in flight at the
unplug: its answer is refused when it completes (docs/disconnect.md §2).
"""

from __future__ import annotations

import contextlib
import queue
import random
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import PIN, SectionResult, Summary, short_tempdir, verdict
from bench.ops import ID_9D, rsa_blob

TARGET_MEMORY_MS = 50.0
TARGET_VPCD_MS = 500.0


class OnlyReaders:
    """A `Watcher` showing only some readers of another one: the bench's pcscd may be
    shared with other test runs, whose cards this daemon must not touch."""

    def __init__(self, inner, names: set[str]) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.names = names
        self.name = inner.name

    async def events(self) -> AsyncIterator:  # type: ignore[type-arg]
        async for event in self.inner.events():
            if event.reader in self.names:
                yield event

    async def connect(self, reader: str):  # type: ignore[no-untyped-def]
        return await self.inner.connect(reader)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Subscriber:
    """A subscribed client on its own thread; events land in a queue with arrival times."""

    def __init__(self, sock: Path) -> None:
        from tokend.client import Client

        self.client = Client(sock, timeout=None)
        self.client.subscribe()
        self.events: queue.Queue[tuple[dict, float]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bench-subscriber", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, ConnectionError, ValueError):
            while True:
                event = self.client.next_event(timeout=3600)
                self.events.put((event, time.perf_counter()))

    def wait(self, kind: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} slot event within {timeout} s")
            event, stamp = self.events.get(timeout=left)
            if event.get("event") == kind:
                return stamp

    def close(self) -> None:
        import socket

        # Wake the reading thread first: closing its buffered file would wait for it.
        with contextlib.suppress(OSError):
            self.client._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.client.close()


class Decryptor:
    """A logged-in client decrypting in a loop on its own thread until a call is refused."""

    def __init__(self, sock: Path, slot: int, public_key) -> None:  # type: ignore[no-untyped-def]
        from tokend.client import Client
        from tokend.pkcs11 import CKA

        self.client = Client(sock)
        self.session = self.client.open_session(slot)
        self.client.login(self.session, PIN)
        (self.key,) = self.client.find_objects(
            self.session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: ID_9D}
        )
        self.blob = rsa_blob(public_key)
        self.running = threading.Event()
        self.refused_at: float | None = None
        self.refused_with = ""
        self._thread = threading.Thread(target=self._run, name="bench-decryptor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from tokend.errors import TokendError

        while True:
            try:
                self.client.decrypt(self.session, self.key, "CKM_RSA_PKCS", self.blob.ciphertext)
            except TokendError as exc:
                self.refused_at = time.perf_counter()
                self.refused_with = type(exc).__name__
                self.running.set()
                return
            self.running.set()

    def join(self, timeout: float) -> float:
        self._thread.join(timeout)
        if self.refused_at is None:
            raise TimeoutError("the decrypting client was never refused")
        return self.refused_at

    def close(self) -> None:
        self.client.close()


@dataclass
class Harness:
    sock: Path
    plug: Callable[[], None]
    unplug: Callable[[], None]
    public_key: object
    timeout: float
    replugs: int = 0
    poll_period: float = 0.005
    #: After an unplug: wait until the transport itself reports the reader empty (a
    #: replug faster than pcscd's poll is not a thing a hand can do).
    settle: Callable[[], None] = lambda: None
    #: Stop repeating after this many seconds (the repetitions done are reported).
    budget: float = 120.0


def _measure(
    h: Harness, reps: int, *, busy: bool = True
) -> tuple[list[float], list[float], set[str]]:
    """``busy``: a client decrypts in a loop across the unplug; else the token is idle and
    only the subscriber's slot event is timed (the transport's own presence signal)."""
    refused, events, kinds = [], [], set()
    sub = Subscriber(h.sock)
    deadline = time.monotonic() + h.budget
    try:
        for _ in range(reps):
            if time.monotonic() > deadline:
                break
            for attempt in range(3):
                h.plug()
                try:
                    sub.wait("arrived", h.timeout)
                    break
                except (TimeoutError, queue.Empty):
                    # The token was seen but not opened (a failed probe): replug it.
                    h.replugs += 1
                    h.unplug()
                    h.settle()
                    if attempt == 2:
                        raise
            if not busy:
                # A random pause: an unplug at a fixed time after the arrival would always
                # hit the same phase of a polling transport's cycle.
                time.sleep(random.uniform(0.0, h.poll_period))
                t0 = time.perf_counter()
                h.unplug()
                events.append(sub.wait("left", h.timeout) - t0)
                h.settle()
                continue
            dec = Decryptor(h.sock, 0, h.public_key)
            try:
                if not dec.running.wait(h.timeout):
                    raise TimeoutError("decrypting client did not start")
                t0 = time.perf_counter()
                h.unplug()
                t_event = sub.wait("left", h.timeout)
                t_refused = dec.join(h.timeout)
            finally:
                dec.close()
            h.settle()
            refused.append(t_refused - t0)
            events.append(t_event - t0)
            kinds.add(dec.refused_with)
    finally:
        sub.close()
    return refused, events, kinds


def _report(
    res: SectionResult,
    name: str,
    reps: int,
    data: tuple[list[float], list[float], set[str]],
    target_ms: float,
    note: str = "",
) -> None:
    refused, events, kinds = data
    sr, se = Summary.of(refused), Summary.of(events)
    res.data[name] = {
        "repetitions": len(events),
        "repetitions_planned": reps,
        "first_refused_call": sr.as_dict() if refused else None,
        "slot_event": se.as_dict(),
        "refused_with": sorted(kinds),
        "target_ms": target_ms,
        "note": note,
    }
    series = [("(ii) slot event at subscriber, token idle", se)]
    if refused:
        series = [("(i) first refused call", sr), ("(ii) slot event at subscriber", se)]
    for what, s in series:
        res.row(
            f"{name}: unplug → {what}",
            f"median {s.median_ms:.1f} ms, max {s.max_ms:.1f} ms (n={s.n})",
            f"≤ {target_ms:.0f} ms",
            verdict(s.max_ms <= target_ms),
            note,
        )


@contextlib.contextmanager
def _memory_harness() -> Iterator[Harness]:
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard
    from tokend.testing import start_thread_daemon

    card = VirtualPivCard()
    demo = provision_demo(card)
    reader = MemoryReader("Bench Lock Reader")
    sock = short_tempdir("tokend-bench-lock-") / "tokend.sock"
    daemon = start_thread_daemon(sock, [MemoryWatcher(reader)])
    try:
        yield Harness(
            sock, lambda: reader.insert(card), reader.remove, demo.encryption_public_key, 10.0
        )
    finally:
        daemon.stop()
        shutil.rmtree(sock.parent, ignore_errors=True)


@contextlib.contextmanager
def _usb_harness() -> Iterator[Harness]:
    """A virtual CCID token on a simulated USB bus, driven through pyusb and the real CCID
    driver; unplug fails the pending interrupt-IN read with ENODEV, as the kernel does."""
    from tokend.drivers.usb_ccid import UsbCcidWatcher
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard
    from tokend.simulators.usb_ccid import SimulatedUsbBus, VirtualCcidToken
    from tokend.testing import start_thread_daemon

    card = VirtualPivCard()
    demo = provision_demo(card)
    bus = SimulatedUsbBus()
    token = VirtualCcidToken(card)
    sock = short_tempdir("tokend-bench-usb-") / "tokend.sock"
    daemon = start_thread_daemon(sock, [UsbCcidWatcher(backend=bus, hotplug=bus)])
    try:
        yield Harness(
            sock,
            lambda: bus.plug(token),
            lambda: bus.unplug(token),
            demo.encryption_public_key,
            10.0,
        )
    finally:
        daemon.stop()
        shutil.rmtree(sock.parent, ignore_errors=True)


def usb_unavailable_reason() -> str | None:
    try:
        import usb.core  # noqa: F401
    except ImportError as exc:
        return f"pyusb not installed ({exc}): pip install tokend[usb]"
    return None


def pcsc_unavailable_reason() -> str | None:
    try:
        from tokend.simulators.pcscd import pcscd_unavailable_reason
    except ImportError as exc:
        return f"pyscard / PC/SC harness not importable: {exc}"
    reason = pcscd_unavailable_reason()
    if reason is not None:
        return reason
    try:
        from tokend.drivers.pcsc import PcscWatcher  # noqa: F401
    except ImportError as exc:
        return f"PC/SC driver not importable: {exc}"
    return None


@contextlib.contextmanager
def _vpcd_harness() -> Iterator[Harness]:
    from tokend.drivers.pcsc import PcscWatcher
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.pcscd import PcscdService, wait_absent
    from tokend.simulators.piv import VirtualPivCard
    from tokend.simulators.vpcd import VpcdCardConnection
    from tokend.testing import start_thread_daemon

    card = VirtualPivCard()
    demo = provision_demo(card)
    with PcscdService() as service, service.lease() as entry:
        reader = entry.reader_names[0]
        wait_absent(reader, timeout=5.0)
        watcher = OnlyReaders(PcscWatcher(allow_virtual_readers=True), {reader})
        sock = short_tempdir("tokend-bench-vpcd-") / "tokend.sock"
        daemon = start_thread_daemon(sock, [watcher])
        conn = VpcdCardConnection(card, port=entry.port(0))
        try:
            yield Harness(
                sock,
                conn.plug,
                conn.unplug,
                demo.encryption_public_key,
                5.0,
                poll_period=0.4,
                settle=lambda: wait_absent(reader, timeout=5.0),
                budget=60.0,
            )
        finally:
            conn.unplug()
            daemon.stop()
            shutil.rmtree(sock.parent, ignore_errors=True)


def run(quick: bool = False, vpcd_reps: int | None = None) -> SectionResult:
    res = SectionResult("4 lock latency")
    reps = 10 if quick else 100
    with _memory_harness() as h:
        _report(
            res,
            "in-process reader",
            reps,
            _measure(h, reps),
            TARGET_MEMORY_MS,
            "card calls and the unplug share one GIL here",
        )
        _report(
            res, "in-process reader, idle", reps, _measure(h, reps, busy=False), TARGET_MEMORY_MS
        )
    reason = usb_unavailable_reason()
    if reason is not None:
        res.row("usb ccid", f"skipped: {reason}", "", "skipped")
        res.data["usb ccid"] = {"skipped": reason}
    else:
        with _usb_harness() as h:
            _report(
                res,
                "usb ccid (pyusb, simulated bus)",
                reps,
                _measure(h, reps),
                TARGET_MEMORY_MS,
                "signal: ENODEV on the pending interrupt-IN read; the bus runs in-process",
            )
            _report(
                res,
                "usb ccid (pyusb, simulated bus), idle",
                reps,
                _measure(h, reps, busy=False),
                TARGET_MEMORY_MS,
            )
    reason = pcsc_unavailable_reason()
    if reason is not None:
        res.row("vpcd via pcscd", f"skipped: {reason}", "", "skipped")
        res.data["vpcd"] = {"skipped": reason}
        return res
    n = vpcd_reps if vpcd_reps is not None else (3 if quick else 20)
    n_idle = 3 if quick else 10
    try:
        with _vpcd_harness() as h:
            data = _measure(h, n)
            idle = _measure(h, n_idle, busy=False)
            replugs = h.replugs
    except Exception as exc:  # a harness that cannot run here is reported, not fatal
        msg = f"{type(exc).__name__}: {exc}"
        res.row("vpcd via pcscd", f"skipped: {msg}", "", "skipped")
        res.data["vpcd"] = {"skipped": msg}
        return res
    _report(
        res,
        "vpcd via pcscd",
        n,
        data,
        TARGET_VPCD_MS,
        f"{n} repetitions (each waits for pcscd's 400 ms presence poll twice)"
        + (f"; {replugs} failed arrival probes replugged" if replugs else ""),
    )
    _report(
        res,
        "vpcd via pcscd, idle",
        n_idle,
        idle,
        TARGET_VPCD_MS,
        f"{n_idle} repetitions; detection waits for pcscd's 400 ms presence poll",
    )
    res.data["vpcd via pcscd"]["replugs"] = replugs
    return res
