"""The seam every virtual card implements, whatever carries its APDUs (an in-memory
reader, the vpcd bridge to pcscd, a fake CCID device, a fake BLE GATT service)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class VirtualCard(Protocol):
    """A card as a reader sees it. Volatile state (selected applet, verified PINs,
    chaining/GET RESPONSE buffers) is dropped on power off/on and reset, as real cards do."""

    @property
    def atr(self) -> bytes: ...

    def power_on(self) -> None: ...

    def power_off(self) -> None: ...

    def reset(self) -> None: ...

    def process(self, apdu: bytes) -> bytes:
        """One command APDU in, one response APDU (data + SW1 SW2) out. Never raises:
        internal errors answer 6F00."""
        ...


@runtime_checkable
class SimulatedToken(Protocol):
    """A virtual token living inside the daemon (`tokend serve --simulate KIND`), named
    like ``piv0`` or ``usb0``, that the control socket plugs and unplugs."""

    name: str

    @property
    def plugged(self) -> bool: ...

    def plug(self) -> None: ...

    def unplug(self) -> None: ...
