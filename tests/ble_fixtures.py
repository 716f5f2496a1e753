"""Fixtures for the BLE tier: a private dbus-daemon per session, the fake BlueZ per test
(own thread and loop, in the pytest process), the virtual BLE key, and the daemon with the
real BLE driver on real bleak. conftest.py imports them.

bleak asks ``bluetoothctl --version`` once per process before its first connect; without
the binary it only warns. The test environment answers with a shim on PATH (here, never in
the product), as bleak's own CI does.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HookedCard, RunningDaemon, start_daemon, stop_daemon, wait_for_token


def ble_unavailable_reason() -> str | None:
    if shutil.which("dbus-daemon") is None:
        return "dbus-daemon not installed (Debian: dbus)"
    try:
        import bleak  # noqa: F401
        import dbus_fast  # noqa: F401
    except ImportError as exc:
        return f"BLE extra not installed: {exc}"
    return None


@pytest.fixture(scope="session")
def bluetoothctl_shim() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="tokend-btctl-"))
    shim = folder / "bluetoothctl"
    shim.write_text("#!/bin/sh\necho 'bluetoothctl: 5.66'\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{folder}:{old}"
    try:
        yield folder
    finally:
        os.environ["PATH"] = old
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ble_bus(bluetoothctl_shim: Path) -> Iterator[str]:
    """A private dbus-daemon standing in for the system bus, for the whole session."""
    reason = ble_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from tokend.simulators.ble import PrivateBus

    bus = PrivateBus()
    address = bus.start()
    try:
        yield address
    finally:
        bus.stop()


@pytest.fixture
def fake_bluez(ble_bus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The fake org.bluez on the private bus; bleak and tokend find it through
    DBUS_SYSTEM_BUS_ADDRESS. tokend's state (trusted keys) lives in tmp_path."""
    from tokend.simulators.ble import FakeBlueZThread

    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", ble_bus)
    monkeypatch.setenv("TOKEND_STATE_DIR", str(tmp_path / "state"))
    fake = FakeBlueZThread(ble_bus).start()
    try:
        yield fake
    finally:
        fake.stop()


class BlePlug:
    """Plug/unplug for the disconnect scenarios: the key goes out of radio range (its link
    drops, as a supervision timeout does) and comes back."""

    kind = "ble"

    def __init__(self, fake, key) -> None:  # type: ignore[no-untyped-def]
        self.fake = fake
        self.key = key
        self.on_transmit: list = []

    def insert(self, card) -> None:  # type: ignore[no-untyped-def]
        current = self.key.card.card if isinstance(self.key.card, HookedCard) else self.key.card
        if current is not card:
            self.remove()
            self.key.swap_card(HookedCard(card, self.on_transmit))
        self.fake.in_range(self.key.address)

    def remove(self) -> None:
        self.fake.out_of_range(self.key.address)

    def reset_by_other_program(self) -> None:
        pytest.skip("a BLE link has one central: no other program can reset the card")


@pytest.fixture
def ble_piv(fake_bluez, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    """The daemon (real BLE driver, real bleak) with a demo virtual PIV card in a bonded,
    trusted virtual BLE key. ``extras``: card, demo, plug, slot, fake, key."""
    from tokend.drivers.ble import BleWatcher, TrustStore
    from tokend.simulators.ble import VirtualBleKey
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    demo = provision_demo(card, key_agreement=True)
    plug_hooks: list = []
    key = VirtualBleKey(HookedCard(card, plug_hooks))
    fake_bluez.add_key(key, paired=True)
    TrustStore().add(key.address, key.name)  # what `tokenctl ble pair` records
    plug = BlePlug(fake_bluez, key)
    plug.on_transmit = plug_hooks
    running = start_daemon(sock_path, [BleWatcher()])
    try:
        slot = wait_for_token(running)
        running.extras.update(card=card, demo=demo, plug=plug, slot=slot, fake=fake_bluez, key=key)
        yield running
    finally:
        stop_daemon(running)
