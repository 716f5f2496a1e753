"""PIV codes shared by the PIV driver and the virtual PIV card (pure values, no I/O).

These are YubiKey-compatible vendor extensions to SP 800-73-4 (tags AA/AB at GENERATE and
IMPORT, GET METADATA's origin); the simulator may not import the driver, so both take
them from here.
"""

from __future__ import annotations

from enum import IntEnum


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
