"""PIV codes shared by the PIV driver and the virtual PIV card (pure values, no I/O).

These are YubiKey-compatible vendor extensions to SP 800-73-4 (tags AA/AB at GENERATE and
IMPORT, GET METADATA's origin); the simulator may not import the driver, so both take
them from here.
"""

from __future__ import annotations

from enum import IntEnum

from cryptography.hazmat.primitives.asymmetric import ec

from tokend.iso7816.pin import PinFormat


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
STANDARD_SLOTS = (0x9A, 0x9C, 0x9D, 0x9E)
RETIRED_SLOTS = tuple(range(0x82, 0x96))


def parse_slot(name: str) -> int:
    """A key slot from its name: "sign", "encrypt", "auth", "card-auth", "retiredN" (1-20)
    or hex ("9d", "82"). ValueError for anything else."""
    text = name.strip().lower()
    if text in SLOT_ALIASES:
        return SLOT_ALIASES[text]
    if text.startswith("retired") and text[7:].isdigit() and 1 <= int(text[7:]) <= 20:
        return 0x81 + int(text[7:])
    try:
        value = int(text, 16)
    except ValueError:
        value = -1
    if value not in STANDARD_SLOTS and value not in RETIRED_SLOTS:
        raise ValueError(f"unknown key slot {name!r} (9a, 9c, 9d, 9e or 82-95)")
    return value


#: SP 800-73-4 §2.4.3: the PIV card application PIN (and, with any bytes, the PUK):
#: 6-8 characters, FF-padded to 8.
PIV_PIN = PinFormat(min_length=6, max_length=8, stored_length=8, pad_char=0xFF)
