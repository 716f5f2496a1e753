"""The daemon with a demo virtual PIV card inside a virtual USB CCID token, reached through
pyusb and the real CCID driver (`tokend.drivers.usb_ccid`); the simulated bus is pyusb's
backend, so nothing above the backend is replaced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HookedCard, RunningDaemon, start_daemon, stop_daemon, wait_for_token


class UsbPlug:
    """Plug/unplug a card's CCID token on the simulated bus (a new token each insert)."""

    kind = "usb"

    def __init__(self, bus, profile) -> None:  # type: ignore[no-untyped-def]
        self.bus = bus
        self.profile = profile
        self.on_transmit: list = []
        self.after_answer: list = []
        self.token = None

    def insert(self, card) -> None:  # type: ignore[no-untyped-def]
        from tokend.simulators.usb_ccid import VirtualCcidToken

        self.remove()
        self.hooked = HookedCard(card, self.on_transmit, self.after_answer)
        self.token = VirtualCcidToken(self.hooked, self.profile)
        self.bus.plug(self.token, port=1)

    def remove(self) -> None:
        if getattr(self, "hooked", None) is not None:
            self.hooked.pulled = True
        if self.token is not None:
            self.bus.unplug(self.token)

    def reset_by_other_program(self) -> None:
        pytest.skip("tokend holds the claimed CCID interface alone: no other program can reset it")


def usb_piv_daemon(sock_path: Path, profile_name: str = "extended") -> Iterator[RunningDaemon]:
    from tokend.drivers.usb_ccid import UsbCcidWatcher
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard
    from tokend.simulators.usb_ccid import PROFILES, SimulatedUsbBus

    card = VirtualPivCard()
    demo = provision_demo(card, key_agreement=True)
    bus = SimulatedUsbBus()
    plug = UsbPlug(bus, PROFILES[profile_name])
    plug.insert(card)
    running = start_daemon(sock_path, [UsbCcidWatcher(backend=bus, hotplug=bus)])
    try:
        slot = wait_for_token(running)
        running.extras.update(card=card, demo=demo, plug=plug, slot=slot, bus=bus)
        yield running
    finally:
        stop_daemon(running)
