"""Command builders of the legacy IsoApplet on a SIM (rank 0, no I/O): what the SIM driver,
the demo provisioner and the tests send, byte for byte as OpenSC 0.23 sends them. PIN
arguments are ready blocks (`PIN_FORMAT.block`), wiped by the caller."""

from __future__ import annotations

from tokend.iso7816 import CommandApdu, encode_tlv, find_tlv, parse_tlvs
from tokend.sim.codes import (
    ISOAPPLET_AID,
    KEY_REFERENCES,
    PUK_LENGTH,
    RSA_BITS,
    TAG_PRIVATE_KEY_TEMPLATE,
    TAG_PUBLIC_KEY_TEMPLATE,
    AclValue,
    Alg,
    Fdb,
    Ins,
    PinRef,
    Pso,
    SeTemplate,
)


def fcp(fid: int, *, fdb: Fdb, size: int, acl: bytes | None) -> bytes:
    """The FCP CREATE FILE sends, as pkcs15-init builds it: ``6F {81 size, 82 FDB, 83 FID,
    86 FF+7 ACL bytes}``. The applet stores it verbatim and returns it on SELECT."""
    if acl is not None and (len(acl) != 8 or acl[0] != 0xFF):
        raise ValueError("ACL: FF then 7 bytes")
    body = (
        encode_tlv(0x81, size.to_bytes(2, "big"))
        + encode_tlv(0x82, bytes((fdb,)))
        + encode_tlv(0x83, fid.to_bytes(2, "big"))
    )
    if acl is not None:
        body += encode_tlv(0x86, acl)
    return encode_tlv(0x6F, body)


def acl(*values: AclValue) -> bytes:
    """Tag 86 value: FF, then the 7 operation bytes (see `Acl` for the positions)."""
    if len(values) != 7:
        raise ValueError("seven ACL bytes")
    return bytes((0xFF, *values))


def fcp_size(fcp_bytes: bytes) -> int | None:
    """Tag 81 (file size) of an FCP the applet returned; None if absent."""
    for outer in parse_tlvs(fcp_bytes):
        if outer.tag in (0x62, 0x6F):
            value = find_tlv(outer.children(), 0x81) or find_tlv(outer.children(), 0x80)
            if value:
                return int.from_bytes(value, "big")
    return None


def select_aid(aid: bytes = ISOAPPLET_AID) -> CommandApdu:
    """As OpenSC sends it: case 3, no Le (on T=0 the version bytes are never read)."""
    return CommandApdu(0x00, Ins.SELECT, 0x04, 0x00, aid)


def select_path(path: bytes, *, fcp: bool) -> CommandApdu:
    """SELECT by path from the MF (the path without 3F00); the MF itself by its FID."""
    if path in (b"", b"\x3f\x00"):
        return CommandApdu(
            0x00, Ins.SELECT, 0x00, 0x00 if fcp else 0x0C, b"\x3f\x00", 0 if fcp else None
        )
    if path[:2] == b"\x3f\x00":
        path = path[2:]
    return CommandApdu(0x00, Ins.SELECT, 0x08, 0x00 if fcp else 0x0C, path, 0 if fcp else None)


def read_binary(offset: int, length: int) -> CommandApdu:
    if not 0 <= offset <= 0x7FFF or not 1 <= length <= 256:
        raise ValueError("READ BINARY offset/length")
    return CommandApdu(0x00, Ins.READ_BINARY, offset >> 8, offset & 0xFF, le=length)


def update_binary(offset: int, data: bytes) -> list[CommandApdu]:
    """UPDATE BINARY split at 255 bytes (short APDUs: T=0 has nothing longer)."""
    out = []
    for start in range(0, len(data), 255):
        pos = offset + start
        out.append(
            CommandApdu(0x00, Ins.UPDATE_BINARY, pos >> 8, pos & 0xFF, data[start : start + 255])
        )
    return out


def create_file(fcp_bytes: bytes) -> CommandApdu:
    return CommandApdu(0x00, Ins.CREATE_FILE, 0x00, 0x00, fcp_bytes)


def delete_file(fid: int) -> CommandApdu:
    return CommandApdu(0x00, Ins.DELETE_FILE, 0x00, 0x00, fid.to_bytes(2, "big"))


def verify(block: bytes | bytearray | None) -> CommandApdu:
    """VERIFY the applet's PIN (reference 01) with a padded block; ``None`` asks for the
    status only (63Cx: tries left; 9000: verified)."""
    return CommandApdu(0x00, Ins.VERIFY, 0x00, PinRef.PIN, b"" if block is None else bytes(block))


def change_pin(old_block: bytes | bytearray, new_block: bytes | bytearray) -> CommandApdu:
    """CHANGE REFERENCE DATA once operational: old and new PIN, both padded blocks."""
    return CommandApdu(
        0x00, Ins.CHANGE_REFERENCE_DATA, 0x00, PinRef.PIN, bytes(old_block) + bytes(new_block)
    )


def set_initial_puk(puk: bytes | bytearray) -> CommandApdu:
    if len(puk) != PUK_LENGTH:
        raise ValueError(f"the PUK must be exactly {PUK_LENGTH} bytes")
    return CommandApdu(0x00, Ins.CHANGE_REFERENCE_DATA, 0x01, PinRef.PUK, bytes(puk))


def set_initial_pin(pin: bytes | bytearray) -> CommandApdu:
    """The first PIN of a new applet (sent unpadded, as pkcs15-init does)."""
    return CommandApdu(0x00, Ins.CHANGE_REFERENCE_DATA, 0x01, PinRef.PIN, bytes(pin))


def unblock_pin(puk: bytes | bytearray, new_block: bytes | bytearray) -> CommandApdu:
    """RESET RETRY COUNTER: the PUK (16 bytes) and the new PIN's padded block."""
    if len(puk) != PUK_LENGTH:
        raise ValueError(f"the PUK must be exactly {PUK_LENGTH} bytes")
    return CommandApdu(
        0x00, Ins.RESET_RETRY_COUNTER, 0x00, PinRef.PIN, bytes(puk) + bytes(new_block)
    )


def mse_set(template: SeTemplate, alg: Alg, key_reference: int) -> CommandApdu:
    if key_reference not in KEY_REFERENCES:
        raise ValueError("key reference 0-15")
    data = encode_tlv(0x80, bytes((alg,))) + encode_tlv(0x84, bytes((key_reference,)))
    return CommandApdu(0x00, Ins.MANAGE_SECURITY_ENVIRONMENT, 0x41, template, data)


def generate_rsa() -> CommandApdu:
    return CommandApdu(0x00, Ins.GENERATE_ASYMMETRIC_KEY_PAIR, 0x42, 0x00, le=256)


def put_rsa_key(p: int, q: int, iqmp: int, dmp1: int, dmq1: int) -> CommandApdu:
    """PUT DATA import: ``7F48 {92 p, 93 q, 94 qInv, 95 dP, 96 dQ}`` (e = 65537); the
    channel chains it (about 650 bytes)."""
    half = RSA_BITS // 16
    body = b"".join(
        encode_tlv(tag, value.to_bytes(half, "big"))
        for tag, value in zip((0x92, 0x93, 0x94, 0x95, 0x96), (p, q, iqmp, dmp1, dmq1), strict=True)
    )
    return CommandApdu(0x00, Ins.PUT_DATA, 0x3F, 0xFF, encode_tlv(TAG_PRIVATE_KEY_TEMPLATE, body))


def pso_sign(data: bytes) -> CommandApdu:
    sign = Pso.COMPUTE_DIGITAL_SIGNATURE
    return CommandApdu(0x00, Ins.PERFORM_SECURITY_OPERATION, sign.p1, sign.p2, data, le=256)


def pso_decipher(ciphertext: bytes) -> CommandApdu:
    """00 (padding indicator) + the 256-byte cryptogram: 257 bytes, chained at 255."""
    decipher = Pso.DECIPHER
    return CommandApdu(
        0x00,
        Ins.PERFORM_SECURITY_OPERATION,
        decipher.p1,
        decipher.p2,
        b"\x00" + ciphertext,
        le=256,
    )


def parse_rsa_public(answer: bytes) -> tuple[int, int]:
    """(n, e) from GENERATE's ``7F49 {81 n, 82 e}``; ValueError if malformed."""
    outer = find_tlv(answer, TAG_PUBLIC_KEY_TEMPLATE)
    if outer is None:
        raise ValueError("no 7F49 template")
    n, e = find_tlv(outer, 0x81), find_tlv(outer, 0x82)
    if not n or not e:
        raise ValueError("7F49 without modulus or exponent")
    return int.from_bytes(n, "big"), int.from_bytes(e, "big")
