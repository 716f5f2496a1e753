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
