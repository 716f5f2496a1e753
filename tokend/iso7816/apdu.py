"""Command and response APDUs (ISO/IEC 7816-4 §5.1), short and extended."""

from __future__ import annotations

from dataclasses import dataclass

from tokend.iso7816.status import SW


class ApduError(Exception):
    """An applet answered with a status word other than 9000. Keeps unknown codes."""

    def __init__(self, sw: int, message: str = "") -> None:
        self.sw = sw
        super().__init__(message or f"status word {sw:04X}")

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF


@dataclass(frozen=True, slots=True)
class CommandApdu:
    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    #: expected response length; None = no Le field, 0 = "as much as possible".
    le: int | None = None

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            if not 0 <= getattr(self, name) <= 0xFF:
                raise ValueError(f"{name} out of range")
        if len(self.data) > 0xFFFF:
            raise ValueError("command data longer than 65535 bytes")
        if self.le is not None and not 0 <= self.le <= 0x10000:
            raise ValueError("Le out of range")

    @property
    def needs_extended(self) -> bool:
        return len(self.data) > 255 or (self.le is not None and self.le > 256)

    def encode(self, *, extended: bool | None = None) -> bytes:
        """Encode as a short APDU, or an extended one when required (or ``extended=True``)."""
        if extended is None:
            extended = self.needs_extended
        header = bytes((self.cla, self.ins, self.p1, self.p2))
        if not extended:
            if self.needs_extended:
                raise ValueError("APDU does not fit a short encoding")
            body = b""
            if self.data:
                body += bytes((len(self.data),)) + self.data
            if self.le is not None:
                body += bytes((self.le & 0xFF,))  # 256 encodes as 00
            return header + body
        body = b""
        if self.data:
            body += b"\x00" + len(self.data).to_bytes(2, "big") + self.data
        if self.le is not None:
            le = self.le & 0xFFFF  # 65536 encodes as 0000
            body += le.to_bytes(2, "big") if self.data else b"\x00" + le.to_bytes(2, "big")
        return header + body

    @classmethod
    def decode(cls, raw: bytes) -> CommandApdu:
        """Parse any of the seven APDU cases; ValueError for malformed input."""
        if len(raw) < 4:
            raise ValueError("APDU shorter than 4 bytes")
        cla, ins, p1, p2 = raw[:4]
        body = raw[4:]
        if not body:
            return cls(cla, ins, p1, p2)
        if len(body) == 1:  # case 2S
            return cls(cla, ins, p1, p2, le=body[0] or 256)
        if body[0] != 0 or len(body) < 3:  # short cases 3S / 4S
            lc = body[0]
            if lc == 0:
                raise ValueError("malformed short APDU")
            if len(body) == 1 + lc:
                return cls(cla, ins, p1, p2, bytes(body[1:]))
            if len(body) == 2 + lc:
                return cls(cla, ins, p1, p2, bytes(body[1:-1]), le=body[-1] or 256)
            raise ValueError("APDU length does not match Lc")
        # extended: body[0] == 0
        if len(body) == 3:  # case 2E
            return cls(cla, ins, p1, p2, le=int.from_bytes(body[1:3], "big") or 65536)
        lc = int.from_bytes(body[1:3], "big")
        if lc == 0:
            raise ValueError("malformed extended APDU")
        if len(body) == 3 + lc:
            return cls(cla, ins, p1, p2, bytes(body[3:]))
        if len(body) == 5 + lc:
            return cls(
                cla, ins, p1, p2, bytes(body[3:-2]), le=int.from_bytes(body[-2:], "big") or 65536
            )
        raise ValueError("extended APDU length does not match Lc")


@dataclass(frozen=True, slots=True)
class ResponseApdu:
    data: bytes
    sw: int

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    @property
    def ok(self) -> bool:
        return self.sw == SW.SW_OK

    def encode(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @classmethod
    def decode(cls, raw: bytes) -> ResponseApdu:
        if len(raw) < 2:
            raise ValueError("response shorter than the status word")
        return cls(bytes(raw[:-2]), int.from_bytes(raw[-2:], "big"))

    def check(self) -> bytes:
        """Return the data, or raise ApduError for any status word but 9000."""
        if self.sw != SW.SW_OK:
            raise ApduError(self.sw)
        return self.data
