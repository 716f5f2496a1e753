"""APDU framing over GATT for BLE keys: the FIDO CTAP-BLE frame format, byte for byte, under
tokend's own service. Pure (no I/O): the BLE driver and the virtual BLE key both use it.

A *frame* is one command and its payload (≤ 65535 bytes). On the air it is cut into
*fragments* of at most the key's control-point length (20-512 bytes):

- initialisation fragment: ``CMD`` (bit 7 set) ``HLEN LLEN`` (payload length, big endian)
  then as much payload as fits;
- continuation fragments: ``SEQ`` (0x00-0x7F, wrapping after 0x7F) then payload.

MSG carries exactly one ISO 7816-4 command APDU host → key and its response (data ‖ SW1 SW2)
key → host. Chaining, GET RESPONSE and wrong-length retries stay in the ISO 7816 channel,
exactly as over PC/SC.

The service UUID is tokend's own, never FIDO's 0xFFFD: hosts treat a device advertising the
FIDO service as a FIDO authenticator and would send CTAP commands to the PIV applet.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

#: tokend-apdu-v1 (the last 6 bytes spell "tokend").
SERVICE_UUID = "6f1c0000-7e3d-4c1a-9b1e-746f6b656e64"
#: Write with response: fragments host → key.
CONTROL_POINT_UUID = "6f1c0001-7e3d-4c1a-9b1e-746f6b656e64"
#: Notify: fragments key → host.
STATUS_UUID = "6f1c0002-7e3d-4c1a-9b1e-746f6b656e64"
#: Read: 2 bytes big endian, the largest fragment the key accepts (20-512).
CONTROL_POINT_LENGTH_UUID = "6f1c0003-7e3d-4c1a-9b1e-746f6b656e64"
#: Read/write: protocol revision bits (REVISION_1 only, so far).
SERVICE_REVISION_UUID = "6f1c0004-7e3d-4c1a-9b1e-746f6b656e64"

REVISION_1 = 0x80

MIN_FRAGMENT = 20
MAX_FRAGMENT = 512
MAX_PAYLOAD = 0xFFFF
INIT_HEADER = 3
CONT_HEADER = 1
MAX_SEQ = 0x7F


class Cmd(IntEnum):
    PING = 0x81
    KEEPALIVE = 0x82
    MSG = 0x83
    CANCEL = 0xBE
    ERROR = 0xBF


class KeepaliveStatus(IntEnum):
    PROCESSING = 0x01
    UP_NEEDED = 0x02  # the key waits for its user (touch / PIN on the key)


class ErrorCode(IntEnum):
    INVALID_CMD = 0x01
    INVALID_PAR = 0x02
    INVALID_LEN = 0x03
    INVALID_SEQ = 0x04
    REQ_TIMEOUT = 0x05
    BUSY = 0x06
    OTHER = 0x7F


class FramingError(ValueError):
    """A fragment that cannot belong to a valid frame. ``code`` is what a key answers."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Frame:
    cmd: Cmd
    data: bytes


def check_fragment_size(size: int) -> int:
    if not MIN_FRAGMENT <= size <= MAX_FRAGMENT:
        raise ValueError(f"fragment size {size} outside {MIN_FRAGMENT}-{MAX_FRAGMENT}")
    return size


def fragments(cmd: Cmd, data: bytes, size: int) -> list[bytes]:
    """Cut one frame into fragments of at most ``size`` bytes."""
    check_fragment_size(size)
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
    first = size - INIT_HEADER
    out = [bytes((cmd, len(data) >> 8, len(data) & 0xFF)) + data[:first]]
    step = size - CONT_HEADER
    for index, start in enumerate(range(first, len(data), step)):
        out.append(bytes((index & MAX_SEQ,)) + data[start : start + step])
    return out


class Reassembler:
    """Collects fragments into frames, one frame at a time. ``feed`` returns the frame once
    its last fragment is in, None while more are expected; a fragment that breaks the
    format raises `FramingError` and drops the partial frame."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._cmd: Cmd | None = None
        self._want = 0
        self._buf = bytearray()
        self._seq = 0

    @property
    def busy(self) -> bool:
        """A frame has started and is not complete."""
        return self._cmd is not None

    def reset(self) -> None:
        self._cmd = None
        self._want = 0
        self._buf = bytearray()
        self._seq = 0

    def feed(self, fragment: bytes) -> Frame | None:
        if not fragment:
            raise FramingError("empty fragment", ErrorCode.INVALID_LEN)
        head = fragment[0]
        if head & 0x80:
            if self._cmd is not None:
                # A new command while a frame is incomplete: the old one is abandoned.
                self.reset()
            if len(fragment) < INIT_HEADER:
                raise FramingError("initialisation fragment shorter than 3", ErrorCode.INVALID_LEN)
            try:
                cmd = Cmd(head)
            except ValueError:
                raise FramingError(f"unknown command 0x{head:02X}", ErrorCode.INVALID_CMD) from None
            want = (fragment[1] << 8) | fragment[2]
            body = fragment[INIT_HEADER:]
            if want > self.max_payload or len(body) > want:
                raise FramingError(f"bad frame length {want}", ErrorCode.INVALID_LEN)
            self._cmd, self._want, self._buf, self._seq = cmd, want, bytearray(body), 0
        else:
            if self._cmd is None:
                raise FramingError("continuation without a frame", ErrorCode.INVALID_SEQ)
            if head != self._seq:
                expected = self._seq
                self.reset()
                raise FramingError(
                    f"sequence 0x{head:02X}, expected 0x{expected:02X}", ErrorCode.INVALID_SEQ
                )
            body = fragment[CONT_HEADER:]
            if len(self._buf) + len(body) > self._want:
                self.reset()
                raise FramingError("more data than the frame length", ErrorCode.INVALID_LEN)
            self._buf += body
            self._seq = (self._seq + 1) & MAX_SEQ
        if len(self._buf) < self._want:
            return None
        frame = Frame(self._cmd, bytes(self._buf))
        self.reset()
        return frame


def error_frame(code: ErrorCode) -> Frame:
    return Frame(Cmd.ERROR, bytes((code,)))


def encode_length(size: int) -> bytes:
    """The control-point-length characteristic's value."""
    return check_fragment_size(size).to_bytes(2, "big")


def decode_length(value: bytes) -> int:
    if len(value) != 2:
        raise ValueError(f"control point length must be 2 bytes, got {len(value)}")
    return check_fragment_size(int.from_bytes(value, "big"))
