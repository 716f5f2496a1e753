"""BER-TLV as used by ISO 7816 and PIV (tags of one to three bytes, definite lengths).

Only the simple TLV layer that APDU payloads use; X.509/CMS go through `cryptography`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tlv:
    tag: int
    value: bytes

    @property
    def constructed(self) -> bool:
        first = self.tag
        while first > 0xFF:
            first >>= 8
        return bool(first & 0x20)

    def children(self) -> list[Tlv]:
        return parse_tlvs(self.value)

    def encode(self) -> bytes:
        return encode_tlv(self.tag, self.value)


def _encode_tag(tag: int) -> bytes:
    if tag < 0:
        raise ValueError("negative tag")
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    if length <= 0xFF:
        return b"\x81" + bytes((length,))
    if length <= 0xFFFF:
        return b"\x82" + length.to_bytes(2, "big")
    if length <= 0xFFFFFF:
        return b"\x83" + length.to_bytes(3, "big")
    raise ValueError("TLV value too long")


def encode_tlv(tag: int, value: bytes | Iterable[bytes] = b"") -> bytes:
    """Encode one TLV; ``value`` may be a sequence of already encoded children."""
    if not isinstance(value, bytes | bytearray | memoryview):
        value = b"".join(value)
    return _encode_tag(tag) + encode_length(len(value)) + bytes(value)


def read_tlv(buf: bytes, offset: int = 0) -> tuple[Tlv, int]:
    """Read one TLV at ``offset``; returns it and the offset after it. ValueError if malformed."""
    end = len(buf)
    if offset >= end:
        raise ValueError("TLV: no data")
    start = offset
    tag = buf[offset]
    offset += 1
    if tag & 0x1F == 0x1F:  # multi-byte tag
        for _ in range(2):
            if offset >= end:
                raise ValueError("TLV: truncated tag")
            tag = (tag << 8) | buf[offset]
            offset += 1
            if not buf[offset - 1] & 0x80:
                break
        else:
            raise ValueError("TLV: tag longer than three bytes")
    if offset >= end:
        raise ValueError("TLV: missing length")
    length = buf[offset]
    offset += 1
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 3:
            raise ValueError("TLV: unsupported length form")
        if offset + n > end:
            raise ValueError("TLV: truncated length")
        length = int.from_bytes(buf[offset : offset + n], "big")
        offset += n
    if offset + length > end:
        raise ValueError(f"TLV: value of tag {tag:X} truncated (at {start})")
    return Tlv(tag, bytes(buf[offset : offset + length])), offset + length


def parse_tlvs(buf: bytes) -> list[Tlv]:
    """Parse a concatenation of TLVs (one level). Duplicate tags are kept, in order."""
    out: list[Tlv] = []
    offset = 0
    while offset < len(buf):
        if buf[offset] in (0x00, 0xFF) and not out and offset == len(buf) - 1:
            break  # lone padding byte
        tlv, offset = read_tlv(buf, offset)
        out.append(tlv)
    return out


def find_tlv(buf: bytes | list[Tlv], tag: int) -> bytes | None:
    """The value of the first TLV with ``tag`` at this level, or None."""
    tlvs = parse_tlvs(buf) if isinstance(buf, bytes | bytearray) else buf
    for tlv in tlvs:
        if tlv.tag == tag:
            return tlv.value
    return None
