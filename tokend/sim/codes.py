"""Wire codes of a SIM carrying the legacy IsoApplet (API 00.06), shared by the SIM driver,
the virtual SIM and its demo provisioner. Pure: no I/O.

Sources: ETSI TS 102 221 (UICC file system, EF ICCID), ITU-T E.118 (ICCID digits), and the
legacy IsoApplet command set as OpenSC 0.23 drives it (see the project notes).
"""

from __future__ import annotations

from enum import IntEnum

from tokend.iso7816.pin import PinEncoding, PinFormat

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


class Pso(IntEnum):
    """PERFORM SECURITY OPERATION P1-P2 (ISO 7816-8 §11): output tag, input tag."""

    COMPUTE_DIGITAL_SIGNATURE = 0x9E9A
    DECIPHER = 0x8086

    @property
    def p1(self) -> int:
        return self.value >> 8

    @property
    def p2(self) -> int:
        return self.value & 0xFF


#: ISO 7816-8 key templates: the public key GENERATE returns, the private key PUT DATA
#: imports. (PIV answers its GENERATE with the same 7F49 template.)
TAG_PUBLIC_KEY_TEMPLATE = 0x7F49
TAG_PRIVATE_KEY_TEMPLATE = 0x7F48


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


#: The applet's PIN as pkcs15-init declares it (AODF: ascii-numeric, 4-16, stored 16, pad 00).
PIN_FORMAT = PinFormat(
    min_length=PIN_MIN,
    max_length=PIN_MAX,
    stored_length=PIN_MAX,
    pad_char=0x00,
    encoding=PinEncoding.ASCII_NUMERIC,
)
#: The PUK: exactly 16 bytes, sent as they are.
PUK_FORMAT = PinFormat(
    min_length=PUK_LENGTH,
    max_length=PUK_LENGTH,
    stored_length=None,
    encoding=PinEncoding.UTF8,
    label="PUK",
)


# --- the PKCS#15 layout pkcs15-init builds on this applet (isoApplet.profile) --------------

#: Tag 86 values (FF + DELETE_SELF, LOCK, ACTIVATE, DEACTIVATE, CREATE_DF/WRITE,
#: CREATE_EF/UPDATE, READ/DELETE): 00 always, 90 PIN verified, FF never.
ACL_OPEN = bytes.fromhex("FF00000000000000")  # EF.DIR, ODF, TokenInfo
ACL_PKCS15_DF = bytes.fromhex("FF00000000000090")  # DF 5015
ACL_DIRECTORY = bytes.fromhex("FF90909090909000")  # AODF, PrKDF, PuKDF, CDF
ACL_OBJECT = bytes.fromhex("FF90FFFFFFFF9000")  # public-key and certificate files
#: Directory files: FIDs inside the PKCS#15 DF and their fixed size.
FID_AODF, FID_PRKDF, FID_PUKDF, FID_CDF = 0x4401, 0x4402, 0x4403, 0x4404
DIRECTORY_SIZE = 512
#: Public-key and certificate files of key reference n: 3300 + n, 3400 + n.
FID_PUBLIC_KEY_BASE, FID_CERTIFICATE_BASE = 0x3300, 0x3400
