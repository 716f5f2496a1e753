"""USB CCID (Smart Card class, rev 1.1) messages and the class descriptor. Pure: no I/O.

The USB driver (`tokend.drivers.usb_ccid`) and the virtual CCID token
(`tokend.simulators.usb_ccid`) both speak through this module, so the two sides of a test
can only disagree about bytes where the specification lets them. Every bulk message is a
10-byte header (type, dwLength LE, bSlot, bSeq, three message-specific bytes) and abData.
Only APDU-level exchange is modelled (short or extended APDU in ``dwFeatures``): TPDU and
character-level readers need T=0/T=1 in the host and are left to pcscd + libccid.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

HEADER_LEN = 10
DESCRIPTOR_LEN = 54
#: bDescriptorType of the CCID class descriptor (it follows the interface descriptor).
CCID_DESCRIPTOR_TYPE = 0x21
#: bInterfaceClass "Smart Card"; bInterfaceProtocol 0 = CCID over bulk (1/2 = ICCD A/B).
CCID_CLASS = 0x0B
CCID_PROTOCOL_BULK = 0
#: A short APDU: CLA INS P1 P2 Lc (≤255 data) Le.
SHORT_APDU_MAX = 261


class CcidMessageError(ValueError):
    """A message that does not follow the CCID layout (truncated, wrong length, …)."""


class MessageType(IntEnum):
    # bulk-OUT, host to reader
    PC_TO_RDR_SET_PARAMETERS = 0x61
    PC_TO_RDR_ICC_POWER_ON = 0x62
    PC_TO_RDR_ICC_POWER_OFF = 0x63
    PC_TO_RDR_GET_SLOT_STATUS = 0x65
    PC_TO_RDR_SECURE = 0x69
    PC_TO_RDR_T0APDU = 0x6A
    PC_TO_RDR_ESCAPE = 0x6B
    PC_TO_RDR_GET_PARAMETERS = 0x6C
    PC_TO_RDR_RESET_PARAMETERS = 0x6D
    PC_TO_RDR_ICC_CLOCK = 0x6E
    PC_TO_RDR_XFR_BLOCK = 0x6F
    PC_TO_RDR_MECHANICAL = 0x71
    PC_TO_RDR_ABORT = 0x72
    PC_TO_RDR_SET_DATA_RATE = 0x73
    # bulk-IN, reader to host
    RDR_TO_PC_DATA_BLOCK = 0x80
    RDR_TO_PC_SLOT_STATUS = 0x81
    RDR_TO_PC_PARAMETERS = 0x82
    RDR_TO_PC_ESCAPE = 0x83
    RDR_TO_PC_DATA_RATE = 0x84
    # interrupt-IN
    RDR_TO_PC_NOTIFY_SLOT_CHANGE = 0x50
    RDR_TO_PC_HARDWARE_ERROR = 0x51


#: The response type each command is answered with.
RESPONSE_TYPE = {
    MessageType.PC_TO_RDR_ICC_POWER_ON: MessageType.RDR_TO_PC_DATA_BLOCK,
    MessageType.PC_TO_RDR_XFR_BLOCK: MessageType.RDR_TO_PC_DATA_BLOCK,
    MessageType.PC_TO_RDR_SECURE: MessageType.RDR_TO_PC_DATA_BLOCK,
    MessageType.PC_TO_RDR_ICC_POWER_OFF: MessageType.RDR_TO_PC_SLOT_STATUS,
    MessageType.PC_TO_RDR_GET_SLOT_STATUS: MessageType.RDR_TO_PC_SLOT_STATUS,
    MessageType.PC_TO_RDR_ICC_CLOCK: MessageType.RDR_TO_PC_SLOT_STATUS,
    MessageType.PC_TO_RDR_T0APDU: MessageType.RDR_TO_PC_SLOT_STATUS,
    MessageType.PC_TO_RDR_MECHANICAL: MessageType.RDR_TO_PC_SLOT_STATUS,
    MessageType.PC_TO_RDR_ABORT: MessageType.RDR_TO_PC_SLOT_STATUS,
    MessageType.PC_TO_RDR_SET_PARAMETERS: MessageType.RDR_TO_PC_PARAMETERS,
    MessageType.PC_TO_RDR_GET_PARAMETERS: MessageType.RDR_TO_PC_PARAMETERS,
    MessageType.PC_TO_RDR_RESET_PARAMETERS: MessageType.RDR_TO_PC_PARAMETERS,
    MessageType.PC_TO_RDR_ESCAPE: MessageType.RDR_TO_PC_ESCAPE,
    MessageType.PC_TO_RDR_SET_DATA_RATE: MessageType.RDR_TO_PC_DATA_RATE,
}


class IccStatus(IntEnum):
    """bStatus bits 1:0 (bmICCStatus)."""

    PRESENT_ACTIVE = 0
    PRESENT_INACTIVE = 1
    ABSENT = 2


class CommandStatus(IntEnum):
    """bStatus bits 7:6 (bmCommandStatus)."""

    OK = 0
    FAILED = 1
    TIME_EXTENSION = 2


class SlotError(IntEnum):
    """bError when bmCommandStatus is FAILED (1..127 = offset of the bad header field)."""

    CMD_NOT_SUPPORTED = 0x00
    BAD_SLOT = 0x05
    BAD_POWER_SELECT = 0x07
    CMD_SLOT_BUSY = 0xE0
    PIN_CANCELLED = 0xEF
    PIN_TIMEOUT = 0xF0
    BUSY_WITH_AUTO_SEQUENCE = 0xF2
    DEACTIVATED_PROTOCOL = 0xF3
    PROCEDURE_BYTE_CONFLICT = 0xF4
    ICC_CLASS_NOT_SUPPORTED = 0xF5
    ICC_PROTOCOL_NOT_SUPPORTED = 0xF6
    BAD_ATR_TCK = 0xF7
    BAD_ATR_TS = 0xF8
    HW_ERROR = 0xFB
    XFR_OVERRUN = 0xFC
    XFR_PARITY_ERROR = 0xFD
    ICC_MUTE = 0xFE
    CMD_ABORTED = 0xFF


class PowerSelect(IntEnum):
    AUTO = 0
    V5 = 1
    V3 = 2
    V1_8 = 3


class LevelParameter(IntEnum):
    """wLevelParameter of an XfrBlock at extended-APDU level."""

    BEGIN_AND_END = 0x0000
    BEGIN_MORE = 0x0001
    CONTINUE_END = 0x0002
    CONTINUE_MORE = 0x0003
    NEXT_RESPONSE = 0x0010  # empty abData: "send me the next part of the response"


class ChainParameter(IntEnum):
    """bChainParameter of a DataBlock at extended-APDU level."""

    BEGIN_AND_END = 0x00
    BEGIN_MORE = 0x01
    CONTINUE_END = 0x02
    CONTINUE_MORE = 0x03
    NEXT_COMMAND = 0x10  # empty abData: the reader wants the next part of the command


class Features(IntFlag):
    """dwFeatures of the class descriptor."""

    AUTO_CONFIG_FROM_ATR = 0x02
    AUTO_ACTIVATION = 0x04
    AUTO_VOLTAGE = 0x08
    AUTO_CLOCK = 0x10
    AUTO_BAUD = 0x20
    AUTO_PARAMETER_NEGOTIATION = 0x40
    AUTO_PPS = 0x80
    CLOCK_STOP = 0x100
    NAD_NOT_ZERO = 0x200
    AUTO_IFSD = 0x400
    ICCD_TOKEN = 0x800
    LEVEL_TPDU = 0x10000
    LEVEL_SHORT_APDU = 0x20000
    LEVEL_EXTENDED_APDU = 0x40000
    USB_WAKE_UP = 0x100000


class ExchangeLevel(IntEnum):
    """``dwFeatures & 0x70000``."""

    CHARACTER = 0x00000
    TPDU = 0x10000
    SHORT_APDU = 0x20000
    EXTENDED_APDU = 0x40000


EXCHANGE_LEVEL_MASK = 0x70000

#: Class-specific control requests (recipient: interface, wIndex = bInterfaceNumber).
REQUEST_ABORT = 0x01
REQUEST_GET_CLOCK_FREQUENCIES = 0x02
REQUEST_GET_DATA_RATES = 0x03
#: bmRequestType host-to-device, class, interface.
REQUEST_TYPE_CLASS_INTERFACE_OUT = 0x21

_DESCRIPTOR = struct.Struct("<BBHBBIIIBIIBIIIIIBBHBB")
assert _DESCRIPTOR.size == DESCRIPTOR_LEN
_HEADER = struct.Struct("<BIBBBBB")
assert _HEADER.size == HEADER_LEN


@dataclass(frozen=True, slots=True)
class CcidDescriptor:
    """The 54-byte CCID class descriptor (offsets in docs/usb.md)."""

    bcd_ccid: int = 0x0110
    max_slot_index: int = 0
    voltage_support: int = 0x07
    protocols: int = 0x03
    default_clock: int = 4000
    maximum_clock: int = 4000
    num_clock_supported: int = 0
    data_rate: int = 10752
    max_data_rate: int = 10752
    num_data_rates_supported: int = 0
    max_ifsd: int = 254
    synch_protocols: int = 0
    mechanical: int = 0
    features: int = 0x000400FE
    max_message_length: int = 3072
    class_get_response: int = 0xFF
    class_envelope: int = 0xFF
    lcd_layout: int = 0
    pin_support: int = 0
    max_busy_slots: int = 1

    @classmethod
    def decode(cls, raw: bytes) -> CcidDescriptor:
        if len(raw) < DESCRIPTOR_LEN:
            raise CcidMessageError(f"CCID descriptor has {len(raw)} bytes, needs {DESCRIPTOR_LEN}")
        fields = _DESCRIPTOR.unpack_from(raw)
        if fields[0] != DESCRIPTOR_LEN or fields[1] != CCID_DESCRIPTOR_TYPE:
            raise CcidMessageError(
                f"not a CCID class descriptor (bLength {fields[0]}, type 0x{fields[1]:02X})"
            )
        return cls(*fields[2:])

    def encode(self) -> bytes:
        return _DESCRIPTOR.pack(
            DESCRIPTOR_LEN,
            CCID_DESCRIPTOR_TYPE,
            self.bcd_ccid,
            self.max_slot_index,
            self.voltage_support,
            self.protocols,
            self.default_clock,
            self.maximum_clock,
            self.num_clock_supported,
            self.data_rate,
            self.max_data_rate,
            self.num_data_rates_supported,
            self.max_ifsd,
            self.synch_protocols,
            self.mechanical,
            self.features,
            self.max_message_length,
            self.class_get_response,
            self.class_envelope,
            self.lcd_layout,
            self.pin_support,
            self.max_busy_slots,
        )

    @property
    def level(self) -> ExchangeLevel:
        value = self.features & EXCHANGE_LEVEL_MASK
        try:
            return ExchangeLevel(value)
        except ValueError:  # two level bits at once: not a reader anyone ships
            return ExchangeLevel.CHARACTER

    @property
    def extended(self) -> bool:
        return self.level is ExchangeLevel.EXTENDED_APDU

    @property
    def power_select(self) -> PowerSelect:
        """What libccid sends in IccPowerOn: automatic voltage if the reader picks it,
        else the first class it supports, 5 V first."""
        if self.features & (Features.AUTO_VOLTAGE | Features.AUTO_ACTIVATION):
            return PowerSelect.AUTO
        for bit, select in ((1, PowerSelect.V5), (2, PowerSelect.V3), (4, PowerSelect.V1_8)):
            if self.voltage_support & bit:
                return select
        return PowerSelect.AUTO

    def unsupported_reason(self) -> str | None:
        """Why tokend leaves this reader to pcscd (None: tokend can drive it)."""
        if self.level not in (ExchangeLevel.SHORT_APDU, ExchangeLevel.EXTENDED_APDU):
            return f"{self.level.name.lower().replace('_', ' ')}-level exchange needs libccid"
        if not self.features & (Features.AUTO_PARAMETER_NEGOTIATION | Features.AUTO_PPS):
            return "no automatic parameter negotiation (PPS would be ours to do)"
        if self.max_message_length <= HEADER_LEN:
            return f"dwMaxCCIDMessageLength {self.max_message_length} leaves no room for data"
        if self.level is ExchangeLevel.SHORT_APDU and (
            self.max_message_length < HEADER_LEN + SHORT_APDU_MAX
        ):
            return f"short-APDU reader with dwMaxCCIDMessageLength {self.max_message_length}"
        return None


@dataclass(frozen=True, slots=True)
class CcidMessage:
    """One bulk message. ``p1``..``p3`` are header bytes 7, 8, 9: for responses bStatus,
    bError and bChainParameter/bClockStatus; for commands what the command says."""

    msg_type: int
    slot: int
    seq: int
    p1: int = 0
    p2: int = 0
    p3: int = 0
    data: bytes = b""

    def encode(self) -> bytes:
        return (
            _HEADER.pack(
                self.msg_type, len(self.data), self.slot, self.seq, self.p1, self.p2, self.p3
            )
            + self.data
        )

    @classmethod
    def decode(cls, raw: bytes, *, max_length: int | None = None) -> CcidMessage:
        """Exactly one message: the length field must account for every byte."""
        if len(raw) < HEADER_LEN:
            raise CcidMessageError(f"CCID message truncated: {len(raw)} bytes, header needs 10")
        msg_type, length, slot, seq, p1, p2, p3 = _HEADER.unpack_from(raw)
        if max_length is not None and HEADER_LEN + length > max_length:
            raise CcidMessageError(
                f"CCID message claims {length} data bytes, beyond dwMaxCCIDMessageLength"
            )
        if len(raw) != HEADER_LEN + length:
            raise CcidMessageError(
                f"CCID message length mismatch: header says {length} data bytes, "
                f"{len(raw) - HEADER_LEN} arrived"
            )
        return cls(msg_type, slot, seq, p1, p2, p3, bytes(raw[HEADER_LEN:]))

    @staticmethod
    def expected_length(raw: bytes) -> int | None:
        """Total length announced by a header (None until 10 bytes are there)."""
        if len(raw) < HEADER_LEN:
            return None
        return HEADER_LEN + int.from_bytes(raw[1:5], "little")

    # -- response fields ----------------------------------------------------------------

    @property
    def status(self) -> int:
        return self.p1

    @property
    def error(self) -> int:
        return self.p2

    @property
    def chain(self) -> int:
        return self.p3

    @property
    def icc_status(self) -> IccStatus:
        value = self.p1 & 0x03
        return IccStatus(value) if value in (0, 1, 2) else IccStatus.ABSENT

    @property
    def command_status(self) -> int:
        """0 OK, 1 failed, 2 time extension (3 is reserved and treated as malformed)."""
        return (self.p1 >> 6) & 0x03


# -- commands ---------------------------------------------------------------------------


def power_on(seq: int, select: PowerSelect = PowerSelect.AUTO, slot: int = 0) -> CcidMessage:
    return CcidMessage(MessageType.PC_TO_RDR_ICC_POWER_ON, slot, seq, int(select))


def power_off(seq: int, slot: int = 0) -> CcidMessage:
    return CcidMessage(MessageType.PC_TO_RDR_ICC_POWER_OFF, slot, seq)


def get_slot_status(seq: int, slot: int = 0) -> CcidMessage:
    return CcidMessage(MessageType.PC_TO_RDR_GET_SLOT_STATUS, slot, seq)


def xfr_block(
    seq: int, data: bytes, level: int = LevelParameter.BEGIN_AND_END, slot: int = 0
) -> CcidMessage:
    return CcidMessage(
        MessageType.PC_TO_RDR_XFR_BLOCK, slot, seq, 0, level & 0xFF, (level >> 8) & 0xFF, data
    )


def abort(seq: int, slot: int = 0) -> CcidMessage:
    return CcidMessage(MessageType.PC_TO_RDR_ABORT, slot, seq)


def level_parameter(message: CcidMessage) -> int:
    """wLevelParameter of an XfrBlock (little-endian in header bytes 8..9)."""
    return message.p2 | (message.p3 << 8)


# -- responses --------------------------------------------------------------------------


def status_byte(icc: IccStatus, command: CommandStatus = CommandStatus.OK) -> int:
    return (int(command) << 6) | int(icc)


def data_block(
    seq: int,
    data: bytes,
    *,
    icc: IccStatus = IccStatus.PRESENT_ACTIVE,
    command: CommandStatus = CommandStatus.OK,
    error: int = 0,
    chain: int = ChainParameter.BEGIN_AND_END,
    slot: int = 0,
) -> CcidMessage:
    return CcidMessage(
        MessageType.RDR_TO_PC_DATA_BLOCK, slot, seq, status_byte(icc, command), error, chain, data
    )


def slot_status(
    seq: int,
    *,
    icc: IccStatus,
    command: CommandStatus = CommandStatus.OK,
    error: int = 0,
    slot: int = 0,
) -> CcidMessage:
    return CcidMessage(
        MessageType.RDR_TO_PC_SLOT_STATUS, slot, seq, status_byte(icc, command), error, 0
    )


def split_command(apdu: bytes, max_data: int) -> list[tuple[bytes, int]]:
    """An extended APDU cut into XfrBlock payloads with their wLevelParameter, for readers
    whose dwMaxCCIDMessageLength is smaller than the APDU (Gnuk: 64)."""
    if max_data <= 0:
        raise ValueError("no room for data in a CCID message")
    if len(apdu) <= max_data:
        return [(apdu, LevelParameter.BEGIN_AND_END)]
    parts = [apdu[i : i + max_data] for i in range(0, len(apdu), max_data)]
    out = [(parts[0], int(LevelParameter.BEGIN_MORE))]
    out += [(p, int(LevelParameter.CONTINUE_MORE)) for p in parts[1:-1]]
    out.append((parts[-1], int(LevelParameter.CONTINUE_END)))
    return out


def split_response(rapdu: bytes, max_data: int) -> list[tuple[bytes, int]]:
    """A response cut into DataBlock payloads with their bChainParameter."""
    if len(rapdu) <= max_data:
        return [(rapdu, ChainParameter.BEGIN_AND_END)]
    parts = [rapdu[i : i + max_data] for i in range(0, len(rapdu), max_data)]
    out = [(parts[0], int(ChainParameter.BEGIN_MORE))]
    out += [(p, int(ChainParameter.CONTINUE_MORE)) for p in parts[1:-1]]
    out.append((parts[-1], int(ChainParameter.CONTINUE_END)))
    return out


# -- interrupt-IN -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotChange:
    present: bool
    changed: bool


def notify_slot_change(present: bool, changed: bool = True, slot: int = 0) -> bytes:
    """RDR_to_PC_NotifySlotChange for a reader with slots 0..``slot``."""
    state = bytearray(1 + slot // 4)
    shift = 2 * (slot % 4)
    state[slot // 4] = (int(present) << shift) | (int(changed) << (shift + 1))
    return bytes([MessageType.RDR_TO_PC_NOTIFY_SLOT_CHANGE]) + bytes(state)


def parse_notify_slot_change(raw: bytes, slot: int = 0) -> SlotChange:
    if len(raw) < 2 + slot // 4 or raw[0] != MessageType.RDR_TO_PC_NOTIFY_SLOT_CHANGE:
        raise CcidMessageError(f"not a NotifySlotChange: {bytes(raw[:8]).hex()}")
    bits = raw[1 + slot // 4] >> (2 * (slot % 4))
    return SlotChange(present=bool(bits & 1), changed=bool(bits & 2))
