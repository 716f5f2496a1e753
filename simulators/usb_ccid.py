"""A virtual USB CCID token behind a pyusb backend: the lowest seam of the direct-USB path.

`SimulatedUsbBus` is a `usb.backend.IBackend`: handed to `usb.core.find(backend=…)` it
enumerates `VirtualCcidToken`s with full device, configuration, interface (with the 54-byte
CCID class descriptor in ``extra_descriptors``) and endpoint descriptors, and carries bulk,
interrupt and control transfers. Everything above it — pyusb's `Device`, the resource
manager that claims interfaces, `tokend.drivers.usb_ccid` — is the product code, unchanged.

The card inside is any `VirtualCard` (the demo `VirtualPivCard`). Unplugging makes every
pending and later transfer on that device fail exactly as pyusb's libusb1 backend reports a
vanished device (``USBError(…, -4, ENODEV)``, built by that backend's own error check); a
replugged token is a new attachment with a new device address, as on a real bus.

Knobs for tests: ``time_extensions`` (time-extension frames before every answer),
``inject(fault)`` (rewrite the next answer: truncate, corrupt, change bSeq …),
``fail_next_read(code)`` (a libusb error such as EIO or EPIPE on the next bulk-IN read),
``stall()`` (time extensions until an Abort), ``claimed_elsewhere`` (pcscd holds it: claim
fails with EBUSY), ``remove_card()`` / ``insert_card()`` (NotifySlotChange on interrupt-IN).
"""

from __future__ import annotations

import array
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import usb.backend
import usb.backend.libusb1 as libusb1
from usb.core import USBError

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
from tokend.simulators.base import VirtualCard

#: pid.codes' test VID:PIDs (1209:0001…): never a real product's identity.
TEST_VENDOR_ID = 0x1209

EP_BULK_OUT = 0x01
EP_BULK_IN = 0x82
EP_INTERRUPT_IN = 0x83
_BULK, _INTERRUPT = 0x02, 0x03


def libusb_error(code: int) -> USBError:
    """The exception pyusb's libusb1 backend raises for a libusb error code — produced by
    that backend's own check, so message, backend code and errno are exactly its own."""
    try:
        libusb1._check(code)
    except USBError as exc:
        return exc
    raise AssertionError(f"libusb code {code} is not an error")


def enodev() -> USBError:
    return libusb_error(libusb1.LIBUSB_ERROR_NO_DEVICE)


@dataclass(frozen=True, slots=True)
class CcidTokenProfile:
    """What the token looks like on the bus. The presets mirror real tokens' descriptors
    (docs/usb.md has the table they come from)."""

    vendor_id: int
    product_id: int
    manufacturer: str
    product: str
    descriptor: CcidDescriptor
    interrupt_endpoint: bool = True
    #: HID interfaces in front of the CCID one (a composite token: OTP keyboard, FIDO).
    hid_interfaces: int = 0
    max_packet: int = 64


#: Extended APDUs, 3072-byte messages, interrupt-IN, behind an OTP and a FIDO interface
#: (the shape of a YubiKey 5).
EXTENDED = CcidTokenProfile(
    TEST_VENDOR_ID,
    0x0001,
    "tokend",
    "Virtual CCID token",
    CcidDescriptor(bcd_ccid=0x0100, features=0x000400FE, max_message_length=3072),
    interrupt_endpoint=True,
    hid_interfaces=2,
)
#: Short APDUs only (host chains commands, card pages responses with 61xx), two endpoints
#: (the shape of a Nitrokey Start).
SHORT_APDU = CcidTokenProfile(
    TEST_VENDOR_ID,
    0x0002,
    "tokend",
    "Virtual CCID token (short APDU)",
    CcidDescriptor(features=0x00020842, max_message_length=271, voltage_support=0x01),
    interrupt_endpoint=False,
)
#: Extended APDUs in 64-byte messages: XfrBlock chaining both ways (the shape of Gnuk).
SMALL_MESSAGES = CcidTokenProfile(
    TEST_VENDOR_ID,
    0x0003,
    "tokend",
    "Virtual CCID token (64-byte messages)",
    CcidDescriptor(features=0x00040042, max_message_length=64, voltage_support=0x01),
    interrupt_endpoint=False,
)
#: A TPDU-level reader (the shape of a Nitrokey Pro): tokend must leave it to pcscd.
TPDU_READER = CcidTokenProfile(
    TEST_VENDOR_ID,
    0x0004,
    "tokend",
    "Virtual TPDU reader",
    CcidDescriptor(features=0x000104BA, max_message_length=271),
)
PROFILES = {
    "extended": EXTENDED,
    "short": SHORT_APDU,
    "small": SMALL_MESSAGES,
    "tpdu": TPDU_READER,
}

#: A fault rewrites the encoded answer frames of the next command (fuzzing).
Fault = Callable[[CcidMessage, list[bytes]], list[bytes]]


class VirtualCcidToken:
    """The device model: one CCID slot with ``card`` in it. Thread-safe: pyusb calls bulk
    and interrupt transfers from different threads at once."""

    def __init__(
        self,
        card: VirtualCard,
        profile: CcidTokenProfile = EXTENDED,
        *,
        serial: str = "0001",
    ) -> None:
        self.card = card
        self.profile = profile
        self.serial = serial
        self.time_extensions = 0
        self.claimed_elsewhere = False
        self.kernel_driver_active = False
        self._cond = threading.Condition()
        self._bulk_in: deque[bytes] = deque()
        self._interrupt_in: deque[bytes] = deque()
        self._faults: deque[Fault] = deque()
        self._stalled_seq: int | None = None
        self._stall_next = False
        self._fail_read: int | None = None
        self._card_present = True
        self._powered = False
        self._command = bytearray()  # extended-level command being assembled
        self._response_parts: deque[tuple[bytes, int]] = deque()
        self.attachment: _Attachment | None = None
        #: Counters tests read. The newest command types only: a simulated device lives as
        #: long as the daemon that simulates it (the soak's RSS must not count its log).
        self.commands: deque[int] = deque(maxlen=1024)
        self.aborts = 0
        self.unplugged_at: float | None = None
        self.first_enodev_at: float | None = None

    # -- test knobs ---------------------------------------------------------------------

    def inject(self, fault: Fault) -> None:
        with self._cond:
            self._faults.append(fault)

    def fail_next_read(self, libusb_code: int) -> None:
        """Fail the next bulk-IN transfer with this libusb error (e.g. LIBUSB_ERROR_IO:
        the port glitched; LIBUSB_ERROR_PIPE: the endpoint stalled)."""
        with self._cond:
            self._fail_read = libusb_code

    def stall(self) -> None:
        """Answer the next command with time extensions until the host aborts it."""
        with self._cond:
            self._stall_next = True

    def remove_card(self) -> None:
        with self._cond:
            self._card_present = False
            self._powered = False
            self.card.power_off()
            self._interrupt_in.append(ccid.notify_slot_change(present=False))
            self._cond.notify_all()

    def insert_card(self) -> None:
        with self._cond:
            self._card_present = True
            self._interrupt_in.append(ccid.notify_slot_change(present=True))
            self._cond.notify_all()

    @property
    def plugged(self) -> bool:
        return self.attachment is not None and self.attachment.alive

    # -- bus side -----------------------------------------------------------------------

    def _attach(self, attachment: _Attachment) -> None:
        with self._cond:
            self.attachment = attachment
            self._bulk_in.clear()
            self._interrupt_in.clear()
            self._stalled_seq = None
            self._powered = False
            self._command.clear()
            self._response_parts.clear()
            self.unplugged_at = self.first_enodev_at = None

    def _detach(self) -> None:
        with self._cond:
            if self.attachment is not None:
                self.attachment.alive = False
            self.unplugged_at = time.monotonic()
            self._powered = False
            self.card.power_off()
            self._cond.notify_all()

    def _gone(self, attachment: _Attachment) -> USBError:
        if self.first_enodev_at is None and self.attachment is attachment:
            self.first_enodev_at = time.monotonic()
        return enodev()

    def write(self, attachment: _Attachment, data: bytes) -> None:
        with self._cond:
            if not attachment.alive:
                raise self._gone(attachment)
            try:
                command = CcidMessage.decode(data)
            except CcidMessageError:
                # A real reader stalls the pipe on garbage; libusb reports EPIPE.
                raise libusb_error(libusb1.LIBUSB_ERROR_PIPE) from None
            self.commands.append(command.msg_type)
            frames = [m.encode() for m in self._answer(command)]
            if command.msg_type != MessageType.PC_TO_RDR_ABORT:
                if self._stall_next:
                    self._stall_next = False
                    self._stalled_seq = command.seq
                    frames = []
                elif self._faults:
                    frames = self._faults.popleft()(command, frames)
                elif self.time_extensions:
                    te = ccid.data_block(command.seq, b"", command=CommandStatus.TIME_EXTENSION)
                    frames = [te.encode()] * self.time_extensions + frames
            self._bulk_in.extend(frames)
            self._cond.notify_all()

    def read(self, attachment: _Attachment, queue_name: str, size: int, timeout_ms: int) -> bytes:
        deadline = None if timeout_ms == 0 else time.monotonic() + timeout_ms / 1000
        with self._cond:
            queue = self._bulk_in if queue_name == "bulk" else self._interrupt_in
            while True:
                if not attachment.alive:
                    raise self._gone(attachment)
                if queue_name == "bulk" and self._fail_read is not None:
                    code, self._fail_read = self._fail_read, None
                    queue.clear()  # the transfer's answer is lost with it
                    raise libusb_error(code)
                if queue:
                    frame = queue.popleft()
                    if len(frame) > size:
                        raise libusb_error(libusb1.LIBUSB_ERROR_OVERFLOW)
                    return frame
                if queue_name == "bulk" and self._stalled_seq is not None:
                    # A reader sends a time extension per waiting period, not in a burst.
                    self._cond.wait(0.01)
                    if not attachment.alive or self._stalled_seq is None:
                        continue
                    te = ccid.data_block(
                        self._stalled_seq, b"", command=CommandStatus.TIME_EXTENSION, error=1
                    )
                    return te.encode()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise libusb_error(libusb1.LIBUSB_ERROR_TIMEOUT)
                self._cond.wait(remaining)

    def control_abort(self, attachment: _Attachment, slot: int, seq: int) -> None:
        with self._cond:
            if not attachment.alive:
                raise self._gone(attachment)
            self.aborts += 1
            if self._stalled_seq == seq:
                self._stalled_seq = None
                failed = ccid.data_block(
                    seq, b"", command=CommandStatus.FAILED, error=SlotError.CMD_ABORTED
                )
                self._bulk_in.append(failed.encode())
                self._cond.notify_all()

    # -- the reader's firmware ----------------------------------------------------------

    def _icc(self) -> IccStatus:
        if not self._card_present:
            return IccStatus.ABSENT
        return IccStatus.PRESENT_ACTIVE if self._powered else IccStatus.PRESENT_INACTIVE

    def _failed(self, command: CcidMessage, error: int) -> CcidMessage:
        kind = ccid.RESPONSE_TYPE.get(MessageType(command.msg_type))
        if kind is MessageType.RDR_TO_PC_DATA_BLOCK:
            return ccid.data_block(
                command.seq, b"", icc=self._icc(), command=CommandStatus.FAILED, error=error
            )
        return ccid.slot_status(
            command.seq, icc=self._icc(), command=CommandStatus.FAILED, error=error
        )

    def _answer(self, command: CcidMessage) -> list[CcidMessage]:
        try:
            kind = MessageType(command.msg_type)
        except ValueError:
            kind = None
        if kind is None or kind not in ccid.RESPONSE_TYPE:
            return [ccid.slot_status(command.seq, icc=self._icc(), command=CommandStatus.FAILED)]
        if command.slot != 0:
            return [self._failed(command, SlotError.BAD_SLOT)]
        if kind is MessageType.PC_TO_RDR_ABORT:
            return [ccid.slot_status(command.seq, icc=self._icc())]
        if kind is MessageType.PC_TO_RDR_GET_SLOT_STATUS:
            return [ccid.slot_status(command.seq, icc=self._icc())]
        if kind is MessageType.PC_TO_RDR_ICC_POWER_OFF:
            if self._powered:
                self.card.power_off()
            self._powered = False
            return [ccid.slot_status(command.seq, icc=self._icc())]
        if not self._card_present:
            return [self._failed(command, SlotError.ICC_MUTE)]
        if kind is MessageType.PC_TO_RDR_ICC_POWER_ON:
            voltage = self.profile.descriptor.voltage_support
            if command.p1 not in (0, 1, 2, 3) or (
                command.p1 and not voltage & (1 << (command.p1 - 1))
            ):
                return [self._failed(command, SlotError.BAD_POWER_SELECT)]
            if self._powered:
                self.card.power_off()
            self.card.power_on()
            self._powered = True
            self._command.clear()
            self._response_parts.clear()
            return [ccid.data_block(command.seq, self.card.atr)]
        if kind is MessageType.PC_TO_RDR_XFR_BLOCK:
            if not self._powered:
                return [self._failed(command, SlotError.ICC_MUTE)]
            return [self._xfr_block(command)]
        return [self._failed(command, SlotError.CMD_NOT_SUPPORTED)]

    def _xfr_block(self, command: CcidMessage) -> CcidMessage:
        descriptor = self.profile.descriptor
        room = descriptor.max_message_length - ccid.HEADER_LEN
        if ccid.HEADER_LEN + len(command.data) > descriptor.max_message_length:
            return self._failed(command, 1)  # offset of dwLength: too long for this reader
        if not descriptor.extended:
            if len(command.data) > ccid.SHORT_APDU_MAX:
                return self._failed(command, 1)
            return ccid.data_block(command.seq, self.card.process(command.data))
        level = ccid.level_parameter(command)
        if level == LevelParameter.NEXT_RESPONSE:
            if not self._response_parts:
                return self._failed(command, 8)  # offset of wLevelParameter
            data, chain = self._response_parts.popleft()
            return ccid.data_block(command.seq, data, chain=chain)
        if level in (LevelParameter.BEGIN_AND_END, LevelParameter.BEGIN_MORE):
            self._command = bytearray()
        elif not self._command:
            return self._failed(command, 8)  # a continuation without a beginning
        self._command += command.data
        if level in (LevelParameter.BEGIN_MORE, LevelParameter.CONTINUE_MORE):
            return ccid.data_block(command.seq, b"", chain=ChainParameter.NEXT_COMMAND)
        if level not in (LevelParameter.BEGIN_AND_END, LevelParameter.CONTINUE_END):
            return self._failed(command, 8)
        apdu, self._command = bytes(self._command), bytearray()
        parts = deque(ccid.split_response(self.card.process(apdu), room))
        data, chain = parts.popleft()
        self._response_parts = parts
        return ccid.data_block(command.seq, data, chain=chain)


@dataclass(eq=False)
class _Attachment:
    """One plug-in of a token: pyusb's opaque device id. Dead for good once unplugged."""

    token: VirtualCcidToken
    bus: int
    address: int
    port: int
    alive: bool = True
    claimed: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _Handle:
    attachment: _Attachment
    claimed: set[int] = field(default_factory=set)


def _descriptor(**fields: Any) -> SimpleNamespace:
    return SimpleNamespace(**fields)


class SimulatedUsbBus(usb.backend.IBackend):  # type: ignore[misc]
    """A USB bus with virtual CCID tokens, as a pyusb backend. ``plug``/``unplug`` are the
    hands of a test; ``start``/``stop`` let a watcher hear about them the way a udev
    monitor would (after the kernel has already failed the device's transfers)."""

    def __init__(self, bus_number: int = 1, *, udev_delay: float | None = 0.005) -> None:
        """``udev_delay``: how long after an unplug the removal is announced to hotplug
        listeners (on Linux the kernel fails the device's transfers first and udevd
        reports a few ms later); None: never announced, the transport's errors must do."""
        self.bus_number = bus_number
        self.udev_delay = udev_delay
        self._lock = threading.Lock()
        self._attached: dict[int, _Attachment] = {}  # port → attachment
        self._addresses = itertools.count(2)
        self._listeners: list[Callable[[str, int, int], None]] = []

    # -- hands --------------------------------------------------------------------------

    def plug(self, token: VirtualCcidToken, port: int | None = None) -> None:
        with self._lock:
            if token.plugged:
                return
            if port is None:
                port = next(p for p in itertools.count(1) if p not in self._attached)
            if port in self._attached:
                raise ValueError(f"port {port} is taken")
            attachment = _Attachment(token, self.bus_number, next(self._addresses), port)
            token._attach(attachment)
            self._attached[port] = attachment
        self._notify("add", attachment)

    def unplug(self, token: VirtualCcidToken) -> None:
        with self._lock:
            attachment = token.attachment
            if attachment is None or not attachment.alive:
                return
            token._detach()
            self._attached.pop(attachment.port, None)
        if self.udev_delay is not None:
            announce = threading.Timer(self.udev_delay, self._notify, ("remove", attachment))
            announce.daemon = True
            announce.start()

    # -- hotplug source (what udev would tell) --------------------------------------------

    def start(self, callback: Callable[[str, int, int], None]) -> None:
        """``callback(action, bus, address)``, as a udev monitor reports ACTION, BUSNUM and
        DEVNUM of a usb_device."""
        with self._lock:
            self._listeners.append(callback)

    def stop(self) -> None:
        with self._lock:
            self._listeners.clear()

    def _notify(self, action: str, attachment: _Attachment) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback(action, attachment.bus, attachment.address)

    # -- IBackend: descriptors ----------------------------------------------------------

    def enumerate_devices(self):  # type: ignore[no-untyped-def]
        with self._lock:
            return [a for _, a in sorted(self._attached.items()) if a.alive]

    def get_device_descriptor(self, dev: _Attachment) -> SimpleNamespace:
        profile = dev.token.profile
        return _descriptor(
            bLength=18,
            bDescriptorType=1,
            bcdUSB=0x0200,
            bDeviceClass=0,
            bDeviceSubClass=0,
            bDeviceProtocol=0,
            bMaxPacketSize0=64,
            idVendor=profile.vendor_id,
            idProduct=profile.product_id,
            bcdDevice=0x0100,
            iManufacturer=1,
            iProduct=2,
            iSerialNumber=3,
            bNumConfigurations=1,
            address=dev.address,
            bus=dev.bus,
            port_number=dev.port,
            port_numbers=(dev.port,),
            speed=3,  # LIBUSB_SPEED_HIGH
        )

    def _endpoints(self, dev: _Attachment, intf: int) -> list[tuple[int, int, int, int]]:
        profile = dev.token.profile
        if intf < profile.hid_interfaces:
            return [(0x84 + intf, _INTERRUPT, 64, 1)]
        eps = [
            (EP_BULK_OUT, _BULK, profile.max_packet, 0),
            (EP_BULK_IN, _BULK, profile.max_packet, 0),
        ]
        if profile.interrupt_endpoint:
            eps.append((EP_INTERRUPT_IN, _INTERRUPT, 8, 32))
        return eps

    def get_configuration_descriptor(self, dev: _Attachment, config: int) -> SimpleNamespace:
        if config != 0:
            raise IndexError(config)
        interfaces = dev.token.profile.hid_interfaces + 1
        return _descriptor(
            bLength=9,
            bDescriptorType=2,
            wTotalLength=9 + interfaces * 9 + 54 + 7 * 4,
            bNumInterfaces=interfaces,
            bConfigurationValue=1,
            iConfiguration=0,
            bmAttributes=0x80,
            bMaxPower=15,
            extra_descriptors=array.array("B"),
        )

    def get_interface_descriptor(
        self, dev: _Attachment, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        profile = dev.token.profile
        if config != 0 or alt != 0 or intf > profile.hid_interfaces:
            raise IndexError((intf, alt, config))
        if intf < profile.hid_interfaces:
            klass, protocol, extra = 0x03, 0x00, b""
        else:
            klass, protocol = ccid.CCID_CLASS, ccid.CCID_PROTOCOL_BULK
            extra = profile.descriptor.encode()
        return _descriptor(
            bLength=9,
            bDescriptorType=4,
            bInterfaceNumber=intf,
            bAlternateSetting=0,
            bNumEndpoints=len(self._endpoints(dev, intf)),
            bInterfaceClass=klass,
            bInterfaceSubClass=0,
            bInterfaceProtocol=protocol,
            iInterface=0,
            extra_descriptors=array.array("B", extra),
        )

    def get_endpoint_descriptor(
        self, dev: _Attachment, ep: int, intf: int, alt: int, config: int
    ) -> SimpleNamespace:
        endpoints = self._endpoints(dev, intf)
        if ep >= len(endpoints):
            raise IndexError(ep)
        address, attributes, packet, interval = endpoints[ep]
        return _descriptor(
            bLength=7,
            bDescriptorType=5,
            bEndpointAddress=address,
            bmAttributes=attributes,
            wMaxPacketSize=packet,
            bInterval=interval,
            bRefresh=0,
            bSynchAddress=0,
            extra_descriptors=array.array("B"),
        )

    # -- IBackend: handles and interfaces -----------------------------------------------

    def _live(self, handle: _Handle) -> _Attachment:
        attachment = handle.attachment
        if not attachment.alive:
            raise attachment.token._gone(attachment)
        return attachment

    def open_device(self, dev: _Attachment) -> _Handle:
        if not dev.alive:
            raise enodev()
        return _Handle(dev)

    def close_device(self, dev_handle: _Handle) -> None:
        with self._lock:
            dev_handle.attachment.claimed -= dev_handle.claimed
            dev_handle.claimed.clear()

    def get_configuration(self, dev_handle: _Handle) -> int:
        self._live(dev_handle)
        return 1

    def set_configuration(self, dev_handle: _Handle, config_value: int) -> None:
        # The kernel configured the device; a driver that tries again is a bug (EBUSY on
        # a composite token whose other interfaces usbhid holds).
        self._live(dev_handle)
        raise libusb_error(libusb1.LIBUSB_ERROR_BUSY)

    def set_interface_altsetting(self, dev_handle: _Handle, intf: int, altsetting: int) -> None:
        self._live(dev_handle)

    def claim_interface(self, dev_handle: _Handle, intf: int) -> None:
        attachment = self._live(dev_handle)
        with self._lock:
            held_by_other = intf in attachment.claimed and intf not in dev_handle.claimed
            if held_by_other or attachment.token.claimed_elsewhere:
                raise libusb_error(libusb1.LIBUSB_ERROR_BUSY)
            attachment.claimed.add(intf)
            dev_handle.claimed.add(intf)

    def release_interface(self, dev_handle: _Handle, intf: int) -> None:
        with self._lock:
            dev_handle.attachment.claimed.discard(intf)
            dev_handle.claimed.discard(intf)
        self._live(dev_handle)

    def is_kernel_driver_active(self, dev_handle: _Handle, intf: int) -> bool:
        attachment = self._live(dev_handle)
        if intf < attachment.token.profile.hid_interfaces:
            return True  # usbhid holds the keyboard and FIDO interfaces
        return attachment.token.kernel_driver_active

    def detach_kernel_driver(self, dev_handle: _Handle, intf: int) -> None:
        raise AssertionError("tokend must never detach a kernel driver")

    def clear_halt(self, dev_handle: _Handle, ep: int) -> None:
        self._live(dev_handle)

    # -- IBackend: transfers --------------------------------------------------------------

    def _require_claim(self, dev_handle: _Handle, intf: int) -> _Attachment:
        attachment = self._live(dev_handle)
        if intf not in dev_handle.claimed:
            raise libusb_error(libusb1.LIBUSB_ERROR_NOT_FOUND)  # libusb: not claimed
        return attachment

    def bulk_write(self, dev_handle: _Handle, ep: int, intf: int, data, timeout: int) -> int:  # type: ignore[no-untyped-def]
        attachment = self._require_claim(dev_handle, intf)
        if ep != EP_BULK_OUT:
            raise libusb_error(libusb1.LIBUSB_ERROR_PIPE)
        attachment.token.write(attachment, bytes(data))
        return len(data)

    def _read_into(self, dev_handle: _Handle, which: str, intf: int, buff, timeout: int) -> int:  # type: ignore[no-untyped-def]
        attachment = self._require_claim(dev_handle, intf)
        frame = attachment.token.read(attachment, which, len(buff), timeout)
        buff[: len(frame)] = array.array("B", frame)
        return len(frame)

    def bulk_read(self, dev_handle: _Handle, ep: int, intf: int, buff, timeout: int) -> int:  # type: ignore[no-untyped-def]
        if ep != EP_BULK_IN:
            raise libusb_error(libusb1.LIBUSB_ERROR_PIPE)
        return self._read_into(dev_handle, "bulk", intf, buff, timeout)

    def intr_read(self, dev_handle: _Handle, ep: int, intf: int, buff, timeout: int) -> int:  # type: ignore[no-untyped-def]
        attachment = self._live(dev_handle)
        if ep != EP_INTERRUPT_IN or not attachment.token.profile.interrupt_endpoint:
            raise libusb_error(libusb1.LIBUSB_ERROR_PIPE)
        return self._read_into(dev_handle, "interrupt", intf, buff, timeout)

    def ctrl_transfer(  # type: ignore[no-untyped-def]
        self, dev_handle: _Handle, bmRequestType, bRequest, wValue, wIndex, data, timeout
    ) -> int:
        attachment = self._live(dev_handle)
        token = attachment.token
        if bmRequestType == 0x80 and bRequest == 0x06 and wValue >> 8 == 0x03:
            index = wValue & 0xFF
            if index == 0:
                raw = bytes([4, 3, 0x09, 0x04])  # LANGID en-US
            else:
                strings = {1: token.profile.manufacturer, 2: token.profile.product, 3: token.serial}
                if index not in strings:
                    raise libusb_error(libusb1.LIBUSB_ERROR_PIPE)
                text = strings[index].encode("utf-16-le")
                raw = bytes([2 + len(text), 3]) + text
            raw = raw[: len(data)]
            data[: len(raw)] = array.array("B", raw)
            return len(raw)
        ccid_interface = token.profile.hid_interfaces
        if (
            bmRequestType == ccid.REQUEST_TYPE_CLASS_INTERFACE_OUT
            and bRequest == ccid.REQUEST_ABORT
            and wIndex == ccid_interface
        ):
            token.control_abort(attachment, wValue & 0xFF, wValue >> 8)
            return 0
        raise libusb_error(libusb1.LIBUSB_ERROR_PIPE)  # a stall: request not supported


class SimulatedUsbToken:
    """A named virtual USB token for `tokend serve --simulate usb` and its control socket."""

    def __init__(self, name: str, bus: SimulatedUsbBus, token: VirtualCcidToken) -> None:
        self.name = name
        self.bus = bus
        self.token = token

    @property
    def plugged(self) -> bool:
        return self.token.plugged

    def plug(self) -> None:
        self.bus.plug(self.token)

    def unplug(self) -> None:
        self.bus.unplug(self.token)
