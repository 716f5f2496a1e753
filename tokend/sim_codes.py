"""Wire codes of a SIM carrying the legacy IsoApplet (API 00.06), shared by the SIM driver,
the virtual SIM and its demo provisioner. Pure: no I/O.

Sources: ETSI TS 102 221 (UICC file system, EF ICCID), ITU-T E.118 (ICCID digits), and the
legacy IsoApplet command set as OpenSC 0.23 drives it (see the project notes).
"""

from __future__ import annotations

from enum import IntEnum

from tokend.iso7816 import CommandApdu, encode_tlv, find_tlv, parse_tlvs

#: The IsoApplet's AID (legacy and current applets share it).
ISOAPPLET_AID = bytes.fromhex("F276A288BCFBA69D34F31001")
#: What the legacy applet answers to SELECT: major 00 (OpenSC 0.23 rejects others), minor 06,
#: features (02 SecureRandom, 04 ECC). Feature 01 (extended APDUs) stays off on a SIM.
APPLET_VERSION = (0x00, 0x06)

#: The UICC's master file and the ICCID file under it (TS 102 221 §13.2).
UICC_MF = 0x3F00
EF_ICCID = 0x2FE2
ICCID_LENGTH = 10

#: The IsoApplet's own master file (inside the applet: not the UICC's MF).
APPLET_MF = 0x3F00

PIN_MIN, PIN_MAX = 4, 16
PUK_LENGTH = 16
PIN_TRIES, PUK_TRIES = 3, 5
#: PINs go to the card 00-padded to 16 bytes.
PIN_PAD = b"\x00"
#: Key references the applet offers (MSE tag 84).
KEY_REFERENCES = range(16)
#: Largest command the applet assembles from a chain.
MAX_CHAIN = 660
#: Longest input the applet pads for an RSA-2048 signature: k - 11 (PKCS #1 v1.5 type 1).
MAX_DIGEST_INFO = 245
RSA_BITS = 2048


class Ins(IntEnum):
    """Instructions of the legacy applet (ISO 7816-4/-8) and the UICC."""

    VERIFY = 0x20
    MANAGE_SECURITY_ENVIRONMENT = 0x22
    CHANGE_REFERENCE_DATA = 0x24
    PERFORM_SECURITY_OPERATION = 0x2A
    RESET_RETRY_COUNTER = 0x2C
    GENERATE_ASYMMETRIC_KEY_PAIR = 0x46
    GET_CHALLENGE = 0x84
    SELECT = 0xA4
    READ_BINARY = 0xB0
    GET_RESPONSE = 0xC0
    UPDATE_BINARY = 0xD6
    PUT_DATA = 0xDB
    CREATE_FILE = 0xE0
    DELETE_FILE = 0xE4


class PinRef(IntEnum):
    """Inside the applet (never the SIM's own PIN1, which lives in the UICC, not here)."""

    PIN = 0x01
    PUK = 0x02


class Lifecycle(IntEnum):
    """The applet's lifecycle: no PIN yet, PUK set, operational (PIN set)."""

    NEW = 0x00
    PUK_SET = 0x01
    OPERATIONAL = 0x05


class Alg(IntEnum):
    """MSE tag 80 algorithm references."""

    RSA_PKCS1 = 0x11  # sign (DigestInfo in, card pads) and decipher (card unpads)
    ECDSA_SHA1 = 0x21  # sign: message in, card hashes with SHA-1
    GEN_RSA_2048 = 0xF3
    GEN_EC = 0xEC


class SeTemplate(IntEnum):
    """MSE SET P2: which operation the environment is for."""

    GENERATE = 0x00  # generate / import
    SIGN = 0xB6
    DECIPHER = 0xB8


class Acl(IntEnum):
    """Positions in the FCP tag 86 value (byte 0 is FF); the applet checks these."""

    DELETE_SELF = 1
    CREATE_DF = 5  # DF; WRITE on an EF (unused)
    CREATE_EF = 6  # DF; UPDATE on an EF
    UPDATE = 6
    READ = 7  # EF; DELETE (child) on a DF


class AclValue(IntEnum):
    ALWAYS = 0x00
    AUTHENTICATED = 0x90  # "files authenticated": PIN verified (or no PIN set yet)
    NEVER = 0xFF


class Fdb(IntEnum):
    """File descriptor byte (FCP tag 82)."""

    TRANSPARENT_EF = 0x01
    DF = 0x38


def encode_iccid(digits: str) -> bytes:
    """ICCID digits → EF ICCID content: BCD, nibbles swapped, padded with F."""
    if not digits.isdigit() or not 1 <= len(digits) <= 2 * ICCID_LENGTH:
        raise ValueError("ICCID: 1-20 decimal digits")
    padded = digits.ljust(2 * ICCID_LENGTH, "F")
    return bytes(int(padded[i + 1] + padded[i], 16) for i in range(0, len(padded), 2))


def decode_iccid(raw: bytes) -> str:
    """EF ICCID content → digits. ValueError for anything but BCD digits then F padding."""
    if len(raw) != ICCID_LENGTH:
        raise ValueError(f"ICCID must be {ICCID_LENGTH} bytes")
    nibbles = "".join(f"{b & 0x0F:X}{b >> 4:X}" for b in raw)
    digits = nibbles.rstrip("F")
    if not digits or not digits.isdigit():
        raise ValueError("ICCID is not BCD")
    return digits


def luhn_digit(digits: str) -> str:
    """The Luhn check digit ITU-T E.118 appends to an ICCID."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def pad_pin(pin: bytes) -> bytes:
    """A PIN as the applet compares it: 00-padded to 16 bytes."""
    if not PIN_MIN <= len(pin) <= PIN_MAX:
        raise ValueError(f"PIN must be {PIN_MIN}-{PIN_MAX} bytes")
    return pin.ljust(PIN_MAX, PIN_PAD)


# --- command builders (driver, demo provisioner and tests send the same bytes) -------------


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


def verify(pin: bytes | None) -> CommandApdu:
    """VERIFY the applet's PIN (reference 01); ``None`` asks for the status only."""
    return CommandApdu(0x00, Ins.VERIFY, 0x00, PinRef.PIN, b"" if pin is None else pad_pin(pin))


def change_pin(old: bytes, new: bytes) -> CommandApdu:
    return CommandApdu(
        0x00, Ins.CHANGE_REFERENCE_DATA, 0x00, PinRef.PIN, pad_pin(old) + pad_pin(new)
    )


def set_initial_puk(puk: bytes) -> CommandApdu:
    if len(puk) != PUK_LENGTH:
        raise ValueError(f"the PUK must be exactly {PUK_LENGTH} bytes")
    return CommandApdu(0x00, Ins.CHANGE_REFERENCE_DATA, 0x01, PinRef.PUK, puk)


def set_initial_pin(pin: bytes) -> CommandApdu:
    pad_pin(pin)  # validate the length
    return CommandApdu(0x00, Ins.CHANGE_REFERENCE_DATA, 0x01, PinRef.PIN, pin)


def unblock_pin(puk: bytes, new: bytes) -> CommandApdu:
    if len(puk) != PUK_LENGTH:
        raise ValueError(f"the PUK must be exactly {PUK_LENGTH} bytes")
    return CommandApdu(0x00, Ins.RESET_RETRY_COUNTER, 0x00, PinRef.PIN, puk + pad_pin(new))


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
    return CommandApdu(0x00, Ins.PUT_DATA, 0x3F, 0xFF, encode_tlv(0x7F48, body))


def pso_sign(data: bytes) -> CommandApdu:
    return CommandApdu(0x00, Ins.PERFORM_SECURITY_OPERATION, 0x9E, 0x9A, data, le=256)


def pso_decipher(ciphertext: bytes) -> CommandApdu:
    """00 (padding indicator) + the 256-byte cryptogram: 257 bytes, chained at 255."""
    return CommandApdu(
        0x00, Ins.PERFORM_SECURITY_OPERATION, 0x80, 0x86, b"\x00" + ciphertext, le=256
    )


def parse_rsa_public(answer: bytes) -> tuple[int, int]:
    """(n, e) from GENERATE's ``7F49 {81 n, 82 e}``; ValueError if malformed."""
    outer = find_tlv(answer, 0x7F49)
    if outer is None:
        raise ValueError("no 7F49 template")
    n, e = find_tlv(outer, 0x81), find_tlv(outer, 0x82)
    if not n or not e:
        raise ValueError("7F49 without modulus or exponent")
    return int.from_bytes(n, "big"), int.from_bytes(e, "big")
