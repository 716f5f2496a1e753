"""PIV codes (NIST SP 800-73-4, algorithm ids from SP 800-78-4) and the YubiKey-compatible
vendor extensions: the one copy, shared by the PIV driver, the virtual PIV card, the demo
provisioner and `tokenctl`. Pure values, no I/O (rank 0): simulators may not import the
driver, so both take the codes from here.
"""

from __future__ import annotations

from enum import IntEnum

from cryptography.hazmat.primitives.asymmetric import ec

from tokend.iso7816.pin import PinFormat

PIV_AID = bytes.fromhex("A000000308000010000100")
DEFAULT_MANAGEMENT_KEY = bytes.fromhex("010203040506070801020304050607080102030405060708")


class Ins(IntEnum):
    """Instructions: SP 800-73-4 part 2 §3, then YubiKey vendor ones."""

    SELECT = 0xA4
    VERIFY = 0x20
    CHANGE_REFERENCE_DATA = 0x24
    RESET_RETRY_COUNTER = 0x2C
    GENERATE_ASYMMETRIC_KEY_PAIR = 0x47
    GENERAL_AUTHENTICATE = 0x87
    GET_DATA = 0xCB
    PUT_DATA = 0xDB
    # vendor (YubiKey, PivApplet)
    MOVE_KEY = 0xF6
    GET_METADATA = 0xF7
    GET_SERIAL = 0xF8
    ATTEST = 0xF9
    SET_PIN_RETRIES = 0xFA
    RESET = 0xFB
    GET_VERSION = 0xFD
    IMPORT_KEY = 0xFE
    SET_MANAGEMENT_KEY = 0xFF


class PivSlot(IntEnum):
    """Asymmetric key references (SP 800-73-4 part 1 table 4b)."""

    AUTHENTICATION = 0x9A
    SIGNATURE = 0x9C
    KEY_MANAGEMENT = 0x9D
    CARD_AUTH = 0x9E
    RETIRED1 = 0x82
    RETIRED2 = 0x83
    RETIRED3 = 0x84
    RETIRED4 = 0x85
    RETIRED5 = 0x86
    RETIRED6 = 0x87
    RETIRED7 = 0x88
    RETIRED8 = 0x89
    RETIRED9 = 0x8A
    RETIRED10 = 0x8B
    RETIRED11 = 0x8C
    RETIRED12 = 0x8D
    RETIRED13 = 0x8E
    RETIRED14 = 0x8F
    RETIRED15 = 0x90
    RETIRED16 = 0x91
    RETIRED17 = 0x92
    RETIRED18 = 0x93
    RETIRED19 = 0x94
    RETIRED20 = 0x95

    @property
    def is_retired(self) -> bool:
        return 0x82 <= self <= 0x95

    @property
    def retired_index(self) -> int:
        """1 for 82 … 20 for 95; 0 for the four standard slots."""
        return self - 0x81 if self.is_retired else 0

    @property
    def object_id(self) -> PivObject:
        if self.is_retired:
            return PivObject(PivObject.RETIRED1 + self - 0x82)
        return _CERT_OBJECTS[self]

    @property
    def cka_id(self) -> bytes:
        """One byte, numbered like ykcs11: 9A=1, 9C=2, 9D=3, 9E=4, 82..95=5..24."""
        if self.is_retired:
            return bytes((self - 0x82 + 5,))
        return bytes((_STANDARD_IDS[self],))

    @property
    def label(self) -> str:
        if self.is_retired:
            return f"Retired Key {self.retired_index} ({self:02X})"
        return f"{_STANDARD_NAMES[self]} ({self:02X})"

    @property
    def role(self) -> str:
        if self.is_retired:
            return "retired"
        return _ROLES[self]

    @property
    def hex(self) -> str:
        return f"{self:02x}"


class KeyRef(IntEnum):
    """Key references that are not key slots (SP 800-73-4 part 1 table 4b)."""

    PIN = 0x80  # VERIFY / CHANGE REFERENCE DATA / RESET RETRY COUNTER
    PUK = 0x81
    MANAGEMENT_KEY = 0x9B  # the symmetric card management key (administration)


MANAGEMENT_KEY_REF = KeyRef.MANAGEMENT_KEY
PIN_REF = KeyRef.PIN
PUK_REF = KeyRef.PUK
#: P1 of MOVE KEY that deletes the key instead of moving it.
DELETE_KEY = 0xFF


class PivObject(IntEnum):
    """Data object tags (SP 800-73-4 part 1 table 3), plus two vendor ones."""

    CARD_CAPABILITY_CONTAINER = 0x5FC107
    CHUID = 0x5FC102
    CERT_AUTHENTICATION = 0x5FC105
    FINGERPRINTS = 0x5FC103
    SECURITY_OBJECT = 0x5FC106
    FACIAL_IMAGE = 0x5FC108
    PRINTED_INFORMATION = 0x5FC109
    CERT_SIGNATURE = 0x5FC10A
    CERT_KEY_MANAGEMENT = 0x5FC10B
    CERT_CARD_AUTH = 0x5FC101
    DISCOVERY = 0x7E
    KEY_HISTORY = 0x5FC10C
    RETIRED1 = 0x5FC10D
    RETIRED2 = 0x5FC10E
    RETIRED3 = 0x5FC10F
    RETIRED4 = 0x5FC110
    RETIRED5 = 0x5FC111
    RETIRED6 = 0x5FC112
    RETIRED7 = 0x5FC113
    RETIRED8 = 0x5FC114
    RETIRED9 = 0x5FC115
    RETIRED10 = 0x5FC116
    RETIRED11 = 0x5FC117
    RETIRED12 = 0x5FC118
    RETIRED13 = 0x5FC119
    RETIRED14 = 0x5FC11A
    RETIRED15 = 0x5FC11B
    RETIRED16 = 0x5FC11C
    RETIRED17 = 0x5FC11D
    RETIRED18 = 0x5FC11E
    RETIRED19 = 0x5FC11F
    RETIRED20 = 0x5FC120
    IRIS_IMAGES = 0x5FC121
    BIOMETRIC_GROUP_TEMPLATE = 0x7F61
    # vendor (YubiKey)
    YUBICO_ADMIN_DATA = 0x5FFF00
    YUBICO_ATTESTATION = 0x5FFF01


_CERT_OBJECTS = {
    PivSlot.AUTHENTICATION: PivObject.CERT_AUTHENTICATION,
    PivSlot.SIGNATURE: PivObject.CERT_SIGNATURE,
    PivSlot.KEY_MANAGEMENT: PivObject.CERT_KEY_MANAGEMENT,
    PivSlot.CARD_AUTH: PivObject.CERT_CARD_AUTH,
}
_STANDARD_IDS = {
    PivSlot.AUTHENTICATION: 1,
    PivSlot.SIGNATURE: 2,
    PivSlot.KEY_MANAGEMENT: 3,
    PivSlot.CARD_AUTH: 4,
}
_STANDARD_NAMES = {
    PivSlot.AUTHENTICATION: "PIV Authentication",
    PivSlot.SIGNATURE: "PIV Digital Signature",
    PivSlot.KEY_MANAGEMENT: "PIV Key Management",
    PivSlot.CARD_AUTH: "PIV Card Authentication",
}
_ROLES = {
    PivSlot.AUTHENTICATION: "authentication",
    PivSlot.SIGNATURE: "signature",
    PivSlot.KEY_MANAGEMENT: "encryption",
    PivSlot.CARD_AUTH: "card-auth",
}
RETIRED_SLOTS = tuple(s for s in PivSlot if s.is_retired)
STANDARD_SLOTS = tuple(s for s in PivSlot if not s.is_retired)
KEY_SLOTS = (*STANDARD_SLOTS, *RETIRED_SLOTS)
#: Objects readable only after PIN verification (SP 800-73-4 part 1 table 2).
PIN_PROTECTED_OBJECTS = frozenset(
    {
        PivObject.FINGERPRINTS,
        PivObject.FACIAL_IMAGE,
        PivObject.PRINTED_INFORMATION,
        PivObject.IRIS_IMAGES,
    }
)


# TLV tags inside the dynamic authentication template (7C) and elsewhere
TAG_DYN_AUTH = 0x7C
TAG_WITNESS = 0x80
TAG_CHALLENGE = 0x81
TAG_RESPONSE = 0x82
TAG_EXPONENTIATION = 0x85
TAG_OBJ_ID = 0x5C
TAG_OBJ_DATA = 0x53
TAG_CERTIFICATE = 0x70
TAG_CERT_INFO = 0x71
TAG_LRC = 0xFE
TAG_GEN_TEMPLATE = 0xAC
TAG_GEN_ALGORITHM = 0x80
TAG_PIN_POLICY = 0xAA
TAG_TOUCH_POLICY = 0xAB
TAG_PUBLIC_KEY = 0x7F49
TAG_CHUID_GUID = 0x34
TAG_HISTORY_ON_CARD = 0xC1
TAG_HISTORY_OFF_CARD = 0xC2
TAG_HISTORY_URL = 0xF3
TAG_DISCOVERY_PIN_POLICY = 0x5F2F
# GET METADATA
TAG_META_ALGORITHM = 0x01
TAG_META_POLICY = 0x02
TAG_META_ORIGIN = 0x03
TAG_META_PUBLIC_KEY = 0x04
TAG_META_IS_DEFAULT = 0x05
TAG_META_RETRIES = 0x06

#: Data objects PUT DATA may write: the 5FC1xx range (SP 800-73-4 table 3) and the
#: vendor 5FFFxx range.
WRITABLE_OBJECTS = (range(0x5FC101, 0x5FC124), range(0x5FFF00, 0x600000))

#: Biggest certificate we accept after gzip decompression (the card holds a few KiB).
MAX_CERT = 64 * 1024


class PivAlgorithm(IntEnum):
    """Cryptographic mechanism identifiers (SP 800-78-4 Table 6-2; 05/16 are YubiKey 5.7
    vendor extensions)."""

    TDES_LEGACY = 0x00  # the legacy id of the 3-key 3DES card management key
    TDES = 0x03
    RSA_3072 = 0x05
    RSA_1024 = 0x06
    RSA_2048 = 0x07
    AES_128 = 0x08
    AES_192 = 0x0A
    AES_256 = 0x0C
    ECC_P256 = 0x11
    ECC_P384 = 0x14
    RSA_4096 = 0x16

    @property
    def is_rsa(self) -> bool:
        return self in RSA_BITS

    @property
    def is_ec(self) -> bool:
        return self in EC_CURVES


RSA_BITS = {
    PivAlgorithm.RSA_1024: 1024,
    PivAlgorithm.RSA_2048: 2048,
    PivAlgorithm.RSA_3072: 3072,
    PivAlgorithm.RSA_4096: 4096,
}
EC_CURVES: dict[int, type[ec.EllipticCurve]] = {
    PivAlgorithm.ECC_P256: ec.SECP256R1,
    PivAlgorithm.ECC_P384: ec.SECP384R1,
}
#: Algorithm names `tokenctl status` shows.
ALG_NAMES = {
    PivAlgorithm.RSA_1024: "rsa1024",
    PivAlgorithm.RSA_2048: "rsa2048",
    PivAlgorithm.RSA_3072: "rsa3072",
    PivAlgorithm.RSA_4096: "rsa4096",
    PivAlgorithm.ECC_P256: "p256",
    PivAlgorithm.ECC_P384: "p384",
}

#: Card management key (9B) lengths by algorithm.
MGMT_KEY_LENGTHS = {
    PivAlgorithm.TDES_LEGACY: 24,
    PivAlgorithm.TDES: 24,
    PivAlgorithm.AES_128: 16,
    PivAlgorithm.AES_192: 24,
    PivAlgorithm.AES_256: 32,
}


class PinPolicy(IntEnum):
    """Vendor tag AA at GENERATE / IMPORT (YubiKey, PivApplet)."""

    DEFAULT = 0
    NEVER = 1
    ONCE = 2
    ALWAYS = 3
    MATCH_ONCE = 4
    MATCH_ALWAYS = 5


class TouchPolicy(IntEnum):
    """Vendor tag AB at GENERATE / IMPORT. The simulator stores it and never waits."""

    DEFAULT = 0
    NEVER = 1
    ALWAYS = 2
    CACHED = 3


class KeyOrigin(IntEnum):
    """Vendor GET METADATA tag 03."""

    GENERATED = 1
    IMPORTED = 2


#: Key slot names users type (tokenctl, provisioning calls).
SLOT_ALIASES = {
    "auth": 0x9A,
    "authentication": 0x9A,
    "sign": 0x9C,
    "signature": 0x9C,
    "encrypt": 0x9D,
    "encryption": 0x9D,
    "key-management": 0x9D,
    "card-auth": 0x9E,
}

#: SP 800-73-4 §2.4.3: the PIV card application PIN (and, with any bytes, the PUK):
#: 6-8 characters, FF-padded to 8.
PIV_PIN = PinFormat(min_length=6, max_length=8, stored_length=8, pad_char=0xFF)
