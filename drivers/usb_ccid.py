"""The direct USB transport family: CCID tokens driven over pyusb, without pcscd.

`UsbCcidWatcher` finds USB interfaces of class 0x0B (Smart Card, bulk protocol) whose
CCID descriptor offers short- or extended-APDU exchange with automatic parameter
negotiation; everything else (TPDU and character-level readers) is left to pcscd + libccid
with a log line saying why. It claims the interface — which is also how "one token, one
path" holds: an interface pcscd (or anyone) has claimed fails with EBUSY and stays with the
PC/SC path, and once tokend holds it pcscd cannot open it. tokend never calls
``set_configuration`` (the kernel configured the device; usbhid holds a composite token's
other interfaces) and never detaches a kernel driver.

`UsbCcidTransport` wraps APDUs in PC_to_RDR_XfrBlock messages (codec: `tokend.ccid`), with
bSeq checks (stale answers are dropped), time extensions (bounded by an overall cap), XfrBlock
chaining for extended-APDU readers whose messages are smaller than the APDU, and Abort to
resynchronise after a malformed answer. Short-APDU readers report ``extended = False``, so the
ISO 7816 channel chains commands and pages responses (61xx) as for any T=0 card.

Presence, fastest signal first: a permanently pending interrupt-IN read (NotifySlotChange;
completes with ENODEV the moment the kernel drops the device), the transport's own errors
(ENODEV / EIO / EPIPE / timeout on a bulk transfer = a disconnect, design §5.1), a pyudev
monitor on the ``usb`` subsystem (when pyudev and udevd are there), and a periodic
re-enumeration (`POLL_INTERVAL` without udev, `RECOVERY_INTERVAL` with it — the latter also
picks up a token once pcscd lets go of it). pyusb blocks, so it runs only in this module's
threads and in the token's worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import usb.core
import usb.util

from tokend import ccid
from tokend.ccid import (
    CcidDescriptor,
    CcidMessage,
    CcidMessageError,
    ChainParameter,
    CommandStatus,
    IccStatus,
    LevelParameter,
    MessageType,
    SlotError,
)
from tokend.drivers.base import CardProtocol, EventFanout, ReaderEvent, ReaderEventKind
from tokend.errors import DeviceError, TransportError

log = logging.getLogger(__name__)

# PYUSB_DEBUG makes pyusb log every backend call with its arguments — a VERIFY's PIN and
# every decrypted key included. tokend's logs carry no secrets at any level, so pyusb's
# loggers never go below INFO in this process.
logging.getLogger("usb").setLevel(logging.INFO)
if os.environ.get("PYUSB_DEBUG"):
    log.warning("PYUSB_DEBUG is set: pyusb's transfer tracing stays off (it would log PINs)")

#: Timeout of one bulk-IN read (libccid: 3 s); a time extension restarts it, multiplied by
#: the reader's bError when that is > 0.
READ_TIMEOUT = 5.0
#: Cap for one command, time extensions included: a reader that asks for more time forever
#: is a broken reader (RSA-4096 key generation on slow tokens takes about a minute).
MAX_OPERATION_TIME = 120.0
#: Answers with a stale bSeq (to commands that timed out earlier) dropped before giving up.
MAX_STALE_ANSWERS = 10
#: Re-enumeration interval when no udev monitor runs (every present device is re-listed;
#: libusb reads cached descriptors from sysfs, no device I/O).
POLL_INTERVAL = 2.0
#: Re-enumeration interval beside a udev monitor: recovery only, and the retry of devices
#: another program (pcscd) had claimed.
RECOVERY_INTERVAL = 10.0
#: How long a pending interrupt-IN read waits before it is re-armed (lets close() finish).
INTERRUPT_REARM = 0.5
#: Largest response assembled from chained DataBlocks (an extended APDU's 65536 + SW).
MAX_RESPONSE = 65538

_GONE_ERRNOS = frozenset({errno.ENODEV, errno.ENOENT, errno.ESHUTDOWN})


def _errno(exc: usb.core.USBError) -> int | None:
    return getattr(exc, "errno", None)


@dataclass(frozen=True, slots=True)
class CcidInterface:
    """Where a device's CCID interface is and what its class descriptor says."""

    number: int
    ep_out: int
    ep_in: int
    ep_interrupt: int | None
    in_packet: int
    descriptor: CcidDescriptor

    @property
    def read_size(self) -> int:
        """dwMaxCCIDMessageLength rounded up to whole packets (less risks EOVERFLOW)."""
        n = self.descriptor.max_message_length
        return -(-n // self.in_packet) * self.in_packet


def find_ccid_interface(dev: Any) -> CcidInterface | None:
    """The device's bulk-protocol CCID interface, from cached descriptors only (no I/O).
    Raises `CcidMessageError` for a CCID interface with an unusable descriptor."""
    for config in dev:
        for intf in config:
            if (
                intf.bInterfaceClass != ccid.CCID_CLASS
                or intf.bInterfaceProtocol != ccid.CCID_PROTOCOL_BULK
                or intf.bAlternateSetting != 0
            ):
                continue
            endpoints = list(intf)
            extra = bytes(intf.extra_descriptors or b"")
            if len(extra) < ccid.DESCRIPTOR_LEN and endpoints:
                # Old readers hang the class descriptor on the last endpoint (libccid too).
                extra = bytes(endpoints[-1].extra_descriptors or b"")
            descriptor = CcidDescriptor.decode(extra)
            ep_out = ep_in = ep_int = None
            in_packet = 64
            for ep in endpoints:
                kind = usb.util.endpoint_type(ep.bmAttributes)
                inbound = usb.util.endpoint_direction(ep.bEndpointAddress) == usb.util.ENDPOINT_IN
                if kind == usb.util.ENDPOINT_TYPE_BULK and inbound:
                    ep_in, in_packet = ep.bEndpointAddress, ep.wMaxPacketSize or 64
                elif kind == usb.util.ENDPOINT_TYPE_BULK:
                    ep_out = ep.bEndpointAddress
                elif kind == usb.util.ENDPOINT_TYPE_INTR and inbound:
                    ep_int = ep.bEndpointAddress
            if ep_out is None or ep_in is None:
                raise CcidMessageError("CCID interface without bulk endpoints")
            return CcidInterface(
                intf.bInterfaceNumber, ep_out, ep_in, ep_int, in_packet, descriptor
            )
    return None


def port_path(dev: Any) -> str:
    """``bus-port.port…`` (stable for a physical port; the address changes on replug)."""
    ports = getattr(dev, "port_numbers", None)
    if ports:
        return f"{dev.bus}-" + ".".join(str(p) for p in ports)
    return f"{dev.bus}:{dev.address}"


class CcidDevice:
    """One claimed CCID interface: the message exchange with sequence numbers. Blocking;
    one command at a time (the reader rejects a second one with CMD_SLOT_BUSY anyway)."""

    def __init__(
        self,
        dev: Any,
        interface: CcidInterface,
        reader: str,
        *,
        read_timeout: float = READ_TIMEOUT,
        max_operation_time: float = MAX_OPERATION_TIME,
        on_gone: Callable[[CcidDevice], None] | None = None,
    ) -> None:
        self.dev = dev
        self.interface = interface
        self.descriptor = interface.descriptor
        self.reader = reader
        self.read_timeout = read_timeout
        self.max_operation_time = max_operation_time
        self._on_gone = on_gone
        self._lock = threading.RLock()
        self._seq = 0
        self.gone: str | None = None
        self.closed = False
        #: The transport that powered the card on last; older ones are dead.
        self.owner: object | None = None

    def __repr__(self) -> str:
        return f"CcidDevice({self.reader!r})"

    # -- claiming -----------------------------------------------------------------------

    def claim(self) -> None:
        """Take the interface; raises USBError (EBUSY when pcscd holds it)."""
        usb.util.claim_interface(self.dev, self.interface.number)

    def release(self) -> None:
        """Give the interface back (also after the device is gone: errors ignored)."""
        with self._lock:
            self.closed = True
            with contextlib.suppress(Exception):
                usb.util.dispose_resources(self.dev)

    # -- errors -------------------------------------------------------------------------

    def _usb_failure(self, exc: usb.core.USBError, what: str) -> TransportError:
        """Every USB error in the middle of an exchange is a disconnect (§5.1); ENODEV
        means the device is gone for good."""
        code = _errno(exc)
        if code in _GONE_ERRNOS and self.gone is None:
            self.gone = str(exc)
            log.info("%s: device gone (%s)", self.reader, exc)
            if self._on_gone is not None:
                self._on_gone(self)
        return TransportError(f"{what} on {self.reader!r} failed: {exc}")

    def _check(self) -> None:
        if self.gone is not None:
            raise TransportError(f"{self.reader!r} is gone: {self.gone}")
        if self.closed:
            raise TransportError(f"{self.reader!r} is no longer watched")

    # -- raw I/O ------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _write(self, message: CcidMessage) -> None:
        try:
            self.dev.write(self.interface.ep_out, message.encode(), int(self.read_timeout * 1000))
        except usb.core.USBError as exc:
            raise self._usb_failure(exc, "bulk-OUT") from None

    def _read(self, timeout: float) -> bytes:
        try:
            data = self.dev.read(
                self.interface.ep_in, self.interface.read_size, max(1, int(timeout * 1000))
            )
        except usb.core.USBError as exc:
            raise self._usb_failure(exc, "bulk-IN") from None
        return bytes(data)

    def _resync(self, seq: int) -> None:
        """Abort the command ``seq`` (class request + bulk Abort, CCID §5.3.1) and drop
        what the reader still had to say, so the next command starts clean."""
        with contextlib.suppress(usb.core.USBError):
            self.dev.ctrl_transfer(
                ccid.REQUEST_TYPE_CLASS_INTERFACE_OUT,
                ccid.REQUEST_ABORT,
                (seq << 8) | 0,
                self.interface.number,
                None,
                int(self.read_timeout * 1000),
            )
        try:
            self._write(ccid.abort(seq))
            for _ in range(MAX_STALE_ANSWERS):
                raw = self._read(min(self.read_timeout, 0.5))
                with contextlib.suppress(CcidMessageError):
                    msg = CcidMessage.decode(raw)
                    if msg.msg_type == MessageType.RDR_TO_PC_SLOT_STATUS and msg.seq == seq:
                        return
        except TransportError:
            pass  # nothing more to read, or gone: the next command finds out
        log.debug("%s: abort of bSeq %d not confirmed", self.reader, seq)

    def exchange(self, command: CcidMessage) -> CcidMessage:
        """Send ``command`` and return its final answer (time extensions absorbed).
        Raises `TransportError` (link failed: a disconnect) or `DeviceError` (the reader
        answered wrongly)."""
        with self._lock:
            self._check()
            expected = ccid.RESPONSE_TYPE[MessageType(command.msg_type)]
            self._write(command)
            deadline = time.monotonic() + self.max_operation_time
            timeout = self.read_timeout
            stale = 0
            while True:
                if time.monotonic() > deadline:
                    self._resync(command.seq)
                    raise DeviceError(
                        f"{self.reader!r} kept asking for more time "
                        f"(> {self.max_operation_time:g} s); command aborted"
                    )
                try:
                    raw = self._read(min(timeout, max(0.001, deadline - time.monotonic())))
                except TransportError:
                    if stale and self.gone is None:
                        raise DeviceError(
                            f"{self.reader!r} answered with wrong sequence numbers only"
                        ) from None
                    raise
                try:
                    answer = CcidMessage.decode(raw, max_length=self.interface.read_size)
                except CcidMessageError as exc:
                    self._resync(command.seq)
                    raise DeviceError(f"{self.reader!r}: {exc}") from None
                if answer.seq != command.seq:
                    stale += 1
                    log.debug("%s: dropped an answer with bSeq %d", self.reader, answer.seq)
                    if stale > MAX_STALE_ANSWERS:
                        self._resync(command.seq)
                        raise DeviceError(f"{self.reader!r} answers out of sequence")
                    continue
                if answer.msg_type != expected or answer.slot != command.slot:
                    self._resync(command.seq)
                    raise DeviceError(
                        f"{self.reader!r} answered message type 0x{answer.msg_type:02X} "
                        f"slot {answer.slot} to 0x{command.msg_type:02X}"
                    )
                status = answer.command_status
                if status == CommandStatus.TIME_EXTENSION:
                    # The card works on; read again without resending (bError = multiplier).
                    timeout = self.read_timeout * max(1, answer.error)
                    continue
                if status == CommandStatus.FAILED:
                    raise self._slot_error(command, answer)
                if status != CommandStatus.OK:
                    self._resync(command.seq)
                    raise DeviceError(f"{self.reader!r}: reserved command status {status}")
                return answer

    def _slot_error(self, command: CcidMessage, answer: CcidMessage) -> Exception:
        try:
            name = SlotError(answer.error).name
        except ValueError:
            name = f"0x{answer.error:02X}"
        if answer.icc_status is IccStatus.ABSENT:
            return TransportError(f"no card in {self.reader!r} ({name})")
        return DeviceError(
            f"{self.reader!r} failed command 0x{command.msg_type:02X}: bError {name}"
        )

    # -- commands -----------------------------------------------------------------------

    def slot_status(self) -> IccStatus:
        with self._lock:
            return self.exchange(ccid.get_slot_status(self._next_seq())).icc_status

    def power_on(self, owner: object) -> bytes:
        with self._lock:
            answer = self.exchange(ccid.power_on(self._next_seq(), self.descriptor.power_select))
            if len(answer.data) < 2:
                raise DeviceError(f"{self.reader!r} returned no ATR")
            self.owner = owner
            return answer.data

    def power_off(self, owner: object | None = None) -> None:
        """IccPowerOff: the token forgets its verified PIN. Only the current owner (or the
        watcher, with None) may do it."""
        with self._lock:
            if owner is not None and self.owner is not owner:
                return
            self.owner = None
            if self.gone is None and not self.closed:
                with contextlib.suppress(TransportError, DeviceError):
                    self.exchange(ccid.power_off(self._next_seq()))

    def transmit(self, apdu: bytes, owner: object) -> bytes:
        with self._lock:
            if self.owner is not owner:
                raise TransportError(f"the card in {self.reader!r} was powered off")
            room = self.descriptor.max_message_length - ccid.HEADER_LEN
            if not self.descriptor.extended:
                if len(apdu) > min(room, ccid.SHORT_APDU_MAX):
                    raise DeviceError(f"{len(apdu)}-byte APDU for a short-APDU reader")
                answer = self.exchange(ccid.xfr_block(self._next_seq(), apdu))
                if answer.chain != ChainParameter.BEGIN_AND_END:
                    raise DeviceError(f"{self.reader!r} chained a short-APDU answer")
                return answer.data
            answer = None
            for data, level in ccid.split_command(apdu, room):
                answer = self.exchange(ccid.xfr_block(self._next_seq(), data, level))
                if level in (LevelParameter.BEGIN_MORE, LevelParameter.CONTINUE_MORE) and (
                    answer.chain != ChainParameter.NEXT_COMMAND or answer.data
                ):
                    raise DeviceError(f"{self.reader!r} did not ask for the rest of the command")
            assert answer is not None
            if answer.chain == ChainParameter.BEGIN_AND_END:
                return answer.data
            if answer.chain != ChainParameter.BEGIN_MORE:
                raise DeviceError(f"{self.reader!r}: bChainParameter 0x{answer.chain:02X}")
            response = bytearray(answer.data)
            while True:
                answer = self.exchange(
                    ccid.xfr_block(self._next_seq(), b"", LevelParameter.NEXT_RESPONSE)
                )
                if answer.chain not in (ChainParameter.CONTINUE_MORE, ChainParameter.CONTINUE_END):
                    raise DeviceError(f"{self.reader!r}: bChainParameter 0x{answer.chain:02X}")
                response += answer.data
                if len(response) > MAX_RESPONSE:
                    raise DeviceError(f"{self.reader!r}: chained answer too long")
                if answer.chain == ChainParameter.CONTINUE_END:
                    return bytes(response)


class UsbCcidTransport:
    """The `Transport` to the card in one CCID token: powers it on when opened, off when
    closed. Dead for good after a transport error (a new instance opens a new transport)."""

    def __init__(self, device: CcidDevice) -> None:
        self.reader = device.reader
        self.extended = device.descriptor.extended
        #: APDU-level exchange: the reader runs T=0/T=1 itself, so no T=0 rules apply here
        self.protocol = CardProtocol.DIRECT
        self._device = device
        self._lock = threading.RLock()
        self._closed = False
        self._dead: str | None = None
        if device.slot_status() is IccStatus.ABSENT:
            raise TransportError(f"no card in {device.reader!r}")
        self._atr = device.power_on(self)

    def __repr__(self) -> str:
        return f"UsbCcidTransport({self.reader!r})"

    def _check(self) -> None:
        if self._closed:
            raise TransportError(f"transport to {self.reader!r} is closed")
        if self._dead is not None:
            raise TransportError(f"{self.reader!r} failed earlier: {self._dead}")

    def atr(self) -> bytes:
        self._check()
        return self._atr

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            self._check()
            try:
                return self._device.transmit(bytes(apdu), self)
            except TransportError as exc:
                self._dead = str(exc)
                raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        # The claimed interface is ours alone: no other program can come between our
        # APDUs. The lock keeps this process's threads apart.
        with self._lock:
            self._check()
            yield

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._device.power_off(self)


# -- hotplug -------------------------------------------------------------------------------


class HotplugSource(Protocol):
    """Tells the watcher that the bus changed. ``callback(action, bus, address)``: action
    as udev names it (``add``, ``remove``, …); bus/address of the usb_device when known."""

    def start(self, callback: Callable[..., None]) -> None: ...

    def stop(self) -> None: ...


class UdevHotplug:
    """A pyudev monitor on the ``usb`` subsystem (source ``udev``: after the rules ran, so
    the device node's ACL is in place on ``add``), in pyudev's observer thread."""

    def __init__(self) -> None:
        import pyudev  # optional: tokend[usb]

        self._pyudev = pyudev
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        self._monitor.filter_by("usb")
        self._observer: Any = None

    def start(self, callback: Callable[..., None]) -> None:
        def on_event(device: Any) -> None:
            props = device.properties
            bus, address = props.get("BUSNUM"), props.get("DEVNUM")
            callback(
                device.action or "change",
                int(bus) if bus and bus.isdigit() else None,
                int(address) if address and address.isdigit() else None,
            )

        self._observer = self._pyudev.MonitorObserver(
            self._monitor, callback=on_event, name="tokend-udev"
        )
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            with contextlib.suppress(Exception):
                self._observer.send_stop()
            self._observer = None


def default_hotplug() -> HotplugSource | None:
    """A udev monitor if pyudev and a running udevd allow one, else None (polling)."""
    if not os.path.exists("/run/udev/control"):  # udevd is not running: no events to hear
        log.info("udevd not running: USB tokens are found by polling every %g s", POLL_INTERVAL)
        return None
    try:
        return UdevHotplug()
    except ImportError:
        log.info("pyudev not installed: USB tokens are found by polling every %g s", POLL_INTERVAL)
    except Exception as exc:  # no libudev, netlink refused (containers)
        log.info(
            "no udev monitor (%s): USB tokens are found by polling every %g s", exc, POLL_INTERVAL
        )
    return None


# -- the watcher ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Attached:
    key: tuple[int, int]
    device: CcidDevice
    present: bool = False
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)


class UsbCcidWatcher:
    """`Watcher` over USB CCID tokens. ``backend``: a pyusb backend (None: libusb1);
    ``hotplug``: what wakes a re-enumeration (None: a udev monitor when possible, else
    polling every ``poll_interval``)."""

    def __init__(
        self,
        *,
        backend: Any = None,
        hotplug: HotplugSource | None = None,
        name: str = "usb",
        poll_interval: float | None = None,
        read_timeout: float = READ_TIMEOUT,
        max_operation_time: float = MAX_OPERATION_TIME,
    ) -> None:
        self.name = name
        self._backend = backend
        self._hotplug = hotplug
        self._auto_hotplug = hotplug is None and backend is None
        self._poll_interval = poll_interval
        self.read_timeout = read_timeout
        self.max_operation_time = max_operation_time
        self._lock = threading.Lock()
        self._attached: dict[tuple[int, int], _Attached] = {}
        self._by_reader: dict[str, _Attached] = {}
        self._skipped: dict[tuple[int, int], str] = {}
        self._busy: set[tuple[int, int]] = set()
        self._fanout = EventFanout(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ready: asyncio.Event | None = None
        self._closed = False

    # -- asyncio side ---------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        if self._auto_hotplug:
            self._hotplug = default_hotplug()
        if self._hotplug is not None:
            self._hotplug.start(self._on_hotplug)
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-watcher", daemon=True)
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
            ReaderEvent(ReaderEventKind.ARRIVED, a.device.reader)
            for a in self._attached.values()
            if a.present
        ]

    async def connect(self, reader: str) -> UsbCcidTransport:
        with self._lock:
            attached = self._by_reader.get(reader)
        if attached is None or attached.device.gone is not None:
            raise TransportError(f"{reader!r} is not attached")
        return await asyncio.to_thread(UsbCcidTransport, attached.device)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._hotplug is not None:
            self._hotplug.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        with self._lock:
            attached = list(self._attached.values())
            self._attached.clear()
            self._by_reader.clear()
        await asyncio.to_thread(self._release_all, attached)
        self._fanout.close()

    def _release_all(self, attached: list[_Attached]) -> None:
        for item in attached:
            item.stop.set()
        for item in attached:
            if item.thread is not None:
                item.thread.join(INTERRUPT_REARM * 4)
            item.device.power_off()  # the token forgets its PIN state
            item.device.release()

    # -- any thread -----------------------------------------------------------------------

    def _emit_locked(self, event: ReaderEvent) -> None:
        loop = self._loop
        assert loop is not None
        log.debug("usb %s %s", event.kind.value, event.reader)
        self._fanout.emit_locked(loop, event)

    def _set_present(self, attached: _Attached, present: bool) -> None:
        with self._lock:
            if attached.present == present or self._attached.get(attached.key) is not attached:
                return
            attached.present = present
            kind = ReaderEventKind.ARRIVED if present else ReaderEventKind.LEFT
            self._emit_locked(ReaderEvent(kind, attached.device.reader))

    def _drop(self, attached: _Attached, reason: str) -> None:
        """The device left (or can no longer be trusted): LEFT first, then let go of it."""
        with self._lock:
            if self._attached.get(attached.key) is not attached:
                return
            if attached.present:
                attached.present = False
                self._emit_locked(ReaderEvent(ReaderEventKind.LEFT, attached.device.reader))
            del self._attached[attached.key]
            if self._by_reader.get(attached.device.reader) is attached:
                del self._by_reader[attached.device.reader]
        log.info("%s: %s", attached.device.reader, reason)
        attached.stop.set()
        thread = attached.thread
        if thread is not None and thread is not threading.current_thread():
            # Let the interrupt reader finish first: a read after release() would make
            # pyusb open and claim the device again behind our back.
            thread.join(INTERRUPT_REARM * 4)
        if attached.device.gone is None:
            attached.device.power_off()
        attached.device.release()
        self._wake.set()

    def _on_hotplug(self, action: str, bus: int | None = None, address: int | None = None) -> None:
        if action in ("remove", "unbind") and bus is not None and address is not None:
            with self._lock:
                attached = self._attached.get((bus, address))
            if attached is not None:
                attached.device.gone = attached.device.gone or "udev: removed"
                self._drop(attached, "removed (udev)")
        self._wake.set()

    def _on_device_gone(self, device: CcidDevice) -> None:
        with self._lock:
            attached = next((a for a in self._attached.values() if a.device is device), None)
        if attached is not None:
            self._drop(attached, f"gone ({device.gone})")

    # -- watcher thread -------------------------------------------------------------------

    def _mark_ready(self) -> None:
        ready, loop = self._ready, self._loop
        if ready is not None and loop is not None and not ready.is_set():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ready.set)

    def _interval(self) -> float:
        if self._poll_interval is not None:
            return self._poll_interval
        return RECOVERY_INTERVAL if self._hotplug is not None else POLL_INTERVAL

    def _run(self) -> None:
        try:
            if self._backend is None:
                import usb.backend.libusb1

                self._backend = usb.backend.libusb1.get_backend()
                if self._backend is None:
                    log.warning("direct USB disabled: libusb-1.0 not found")
                    return
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    self._scan()
                except Exception:
                    log.exception("USB enumeration failed; trying again")
                self._mark_ready()
                self._wake.wait(self._interval())
        finally:
            self._mark_ready()
            self._fanout.finish(self._loop)

    def _scan(self) -> None:
        seen: set[tuple[int, int]] = set()
        for dev in usb.core.find(find_all=True, backend=self._backend):
            key = (int(dev.bus or 0), int(dev.address or 0))
            seen.add(key)
            with self._lock:
                known = key in self._attached or key in self._skipped
            if not known:
                self._consider(key, dev)
        with self._lock:
            gone = [a for k, a in self._attached.items() if k not in seen]
            for key in list(self._skipped):
                if key not in seen:
                    del self._skipped[key]
            self._busy &= seen
        for attached in gone:
            attached.device.gone = attached.device.gone or "no longer enumerated"
            self._drop(attached, "removed (no longer enumerated)")

    def _skip(
        self, key: tuple[int, int], where: str, reason: str, level: int = logging.INFO
    ) -> None:
        self._skipped[key] = reason
        log.log(level, "%s: %s", where, reason)

    def _consider(self, key: tuple[int, int], dev: Any) -> None:
        where = f"USB {dev.idVendor:04x}:{dev.idProduct:04x} at {port_path(dev)}"
        try:
            interface = find_ccid_interface(dev)
        except (CcidMessageError, usb.core.USBError, ValueError) as exc:
            self._skip(key, where, f"left to pcscd: unusable CCID descriptor ({exc})")
            return
        if interface is None:
            self._skipped[key] = "not a CCID device"  # keyboards, mice: nothing to say
            return
        reason = interface.descriptor.unsupported_reason()
        if reason is not None:
            self._skip(key, where, f"left to pcscd: {reason}")
            return
        try:
            if dev.is_kernel_driver_active(interface.number):
                usb.util.dispose_resources(dev)
                self._skip(
                    key,
                    where,
                    "a kernel driver holds the CCID interface; tokend never detaches one",
                )
                return
        except NotImplementedError:
            pass  # pyusb backends without is_kernel_driver_active: nothing attached to check
        except usb.core.USBError as exc:
            with contextlib.suppress(Exception):
                usb.util.dispose_resources(dev)
            self._busy_or_gone(key, where, exc)
            return
        reader = f"{self._product(dev)} ({port_path(dev)})"
        device = CcidDevice(
            dev,
            interface,
            reader,
            read_timeout=self.read_timeout,
            max_operation_time=self.max_operation_time,
            on_gone=self._on_device_gone,
        )
        try:
            device.claim()
        except usb.core.USBError as exc:
            with contextlib.suppress(Exception):
                usb.util.dispose_resources(dev)
            self._busy_or_gone(key, where, exc)
            return
        try:
            present = device.slot_status() is not IccStatus.ABSENT
        except (TransportError, DeviceError) as exc:
            if key not in self._busy:  # said once; tried again at every enumeration
                self._busy.add(key)
                log.warning("%s: no slot status (%s); trying again", where, exc)
            device.release()
            return
        self._busy.discard(key)
        attached = _Attached(key, device)
        with self._lock:
            if self._stop.is_set():
                device.release()
                return
            old = self._by_reader.get(reader)
            self._attached[key] = attached
            self._by_reader[reader] = attached
        if old is not None:
            self._drop(old, "replaced by a new attachment on the same port")
        log.info(
            "%s: CCID token %r (%s APDU level)",
            where,
            reader,
            "extended" if interface.descriptor.extended else "short",
        )
        if interface.ep_interrupt is not None:
            attached.thread = threading.Thread(
                target=self._interrupt_loop, args=(attached,), name="usb-interrupt", daemon=True
            )
            attached.thread.start()
        self._set_present(attached, present)

    def _busy_or_gone(self, key: tuple[int, int], where: str, exc: usb.core.USBError) -> None:
        code = _errno(exc)
        if code in _GONE_ERRNOS:
            return
        if code == errno.EBUSY:
            if key not in self._busy:
                self._busy.add(key)
                log.info(
                    "%s: claimed by another program (pcscd?): served over PC/SC; "
                    "checking again every %g s",
                    where,
                    self._interval(),
                )
            return
        if code == errno.EACCES:
            if key not in self._busy:
                self._busy.add(key)
                log.warning(
                    "%s: no permission to open the device: install udev/69-tokend.rules "
                    "(see udev/README.md)",
                    where,
                )
            return
        if key not in self._busy:
            self._busy.add(key)
            log.warning("%s: cannot claim the CCID interface: %s", where, exc)

    @staticmethod
    def _product(dev: Any) -> str:
        try:
            name = " ".join(p for p in (dev.manufacturer, dev.product) if p)
        except (usb.core.USBError, ValueError, NotImplementedError):
            name = ""  # no string descriptors (or backend support): named by its ids below
        return name or f"USB CCID {dev.idVendor:04x}:{dev.idProduct:04x}"

    def _interrupt_loop(self, attached: _Attached) -> None:
        """A permanently pending interrupt-IN read: NotifySlotChange, and the fastest word
        that the device is gone (the kernel fails the pending URB with ENODEV)."""
        device = attached.device
        endpoint = device.interface.ep_interrupt
        while not attached.stop.is_set():
            try:
                data = bytes(device.dev.read(endpoint, 8, int(INTERRUPT_REARM * 1000)))
            except usb.core.USBTimeoutError:
                continue
            except usb.core.USBError as exc:
                if attached.stop.is_set():
                    return
                code = _errno(exc)
                if code in _GONE_ERRNOS:
                    device.gone = device.gone or str(exc)
                    self._drop(attached, f"unplugged ({exc})")
                else:  # EIO, EPIPE: presence unknown → fail closed, find it again
                    self._drop(attached, f"interrupt-IN failed ({exc}); re-enumerating")
                return
            if not data:
                continue
            if data[0] == MessageType.RDR_TO_PC_NOTIFY_SLOT_CHANGE:
                try:
                    change = ccid.parse_notify_slot_change(data)
                except CcidMessageError:
                    continue
                if change.changed and not change.present:
                    device.power_off()
                self._set_present(attached, change.present)
            elif data[0] == MessageType.RDR_TO_PC_HARDWARE_ERROR:
                self._drop(attached, f"hardware error {data.hex()}; re-enumerating")
                return
