"""The BLE link itself (driver ↔ real bleak ↔ dbus-daemon ↔ fake BlueZ ↔ virtual key):
1,000 APDUs of mixed sizes arrive complete and in order, at every fragment size the key
may announce, and the key refuses writes longer than it announced."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.pcsc_fixtures import EchoCard
from tokend.drivers.base import ReaderEventKind


def _apdu(i: int, size: int) -> bytes:
    """An extended-length case-4 APDU whose data encodes its index (echoed by EchoCard)."""
    body = i.to_bytes(4, "big") + random.Random(i).randbytes(max(0, size - 4))
    body = body[:size]  # sizes below 4 carry only part of the index
    return b"\x80\x10\x00\x00\x00" + len(body).to_bytes(2, "big") + body + b"\x00\x00"


@pytest.mark.parametrize("fragment_size", [20, 244, 512])
def test_a_thousand_mixed_apdus_no_loss_no_reordering(fake_bluez, fragment_size) -> None:  # type: ignore[no-untyped-def]
    from tokend.drivers.ble import BleWatcher, TrustStore
    from tokend.simulators.ble import VirtualBleKey

    card = EchoCard()
    key = VirtualBleKey(card, fragment_size=fragment_size)
    fake_bluez.add_key(key, paired=True)
    TrustStore().add(key.address, key.name)
    count = 1000 if fragment_size != 20 else 100  # 20-byte fragments: 100 keeps it quick
    rng = random.Random(fragment_size)
    sizes = [rng.choice([1, 2, 5, 64, 255, 256, 1000, 2048, 4096]) for _ in range(count)]

    async def run() -> list[bytes]:
        watcher = BleWatcher()
        events = watcher.events()
        try:
            event = await asyncio.wait_for(events.__anext__(), 10)
            assert event.kind is ReaderEventKind.ARRIVED
            transport = await watcher.connect(event.reader)

            def drive() -> list[bytes]:
                return [transport.transmit(_apdu(i, s)) for i, s in enumerate(sizes)]

            return await asyncio.to_thread(drive)
        finally:
            await watcher.aclose()

    answers = asyncio.run(run())
    assert card.commands == count
    for i, (size, answer) in enumerate(zip(sizes, answers, strict=True)):
        sent = _apdu(i, size)
        assert answer[-2:] == b"\x90\x00"
        assert answer[:-2] == sent[7 : 7 + size], f"APDU {i} ({size} bytes) came back wrong"
    writes = [n for name, n in fake_bluez.fake.calls if name == "WriteValue"]
    assert writes and max(writes) <= fragment_size


def test_key_refuses_writes_longer_than_announced(fake_bluez) -> None:  # type: ignore[no-untyped-def]
    """The fake enforces the control-point length (ATT 0x0D), so a codec that ignored the
    key's limit would fail here, not on hardware."""
    from bleak import BleakClient, BleakScanner
    from bleak.exc import BleakError

    from tokend import ble_framing as bf
    from tokend.simulators.ble import VirtualBleKey

    key = VirtualBleKey(EchoCard(), fragment_size=20)
    fake_bluez.add_key(key, paired=True)

    async def run() -> None:
        device = await BleakScanner.find_device_by_address(key.address, timeout=5)
        assert device is not None
        async with BleakClient(device) as client:
            with pytest.raises(BleakError, match=r"0x0d|INVALID_ATTRIBUTE_VALUE_LENGTH"):
                await client.write_gatt_char(bf.CONTROL_POINT_UUID, bytes(21), response=True)

    asyncio.run(run())


class SlowCard(EchoCard):
    """A card whose every command takes ``delay`` seconds (on-card key generation)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def process(self, apdu: bytes) -> bytes:
        import time

        time.sleep(self.delay)
        return super().process(apdu)


@pytest.mark.parametrize("keepalives", [True, False], ids=["keepalives", "silent"])
def test_keepalives_carry_a_long_command_and_silence_drops_the_link(fake_bluez, keepalives) -> None:  # type: ignore[no-untyped-def]
    from tokend.drivers.ble import BleWatcher, TrustStore
    from tokend.errors import TransportError
    from tokend.simulators.ble import VirtualBleKey

    key = VirtualBleKey(SlowCard(1.2), keepalive_interval=0.1 if keepalives else 30)
    fake_bluez.add_key(key, paired=True)
    TrustStore().add(key.address, key.name)

    async def run() -> list[str]:
        watcher = BleWatcher(keepalive_timeout=0.4)
        events = watcher.events()
        try:
            event = await asyncio.wait_for(events.__anext__(), 10)
            transport = await watcher.connect(event.reader)
            try:
                answer = await asyncio.to_thread(transport.transmit, _apdu(7, 10))
                outcome = "answered" if answer[-2:] == b"\x90\x00" else "bad"
            except TransportError:
                outcome = "dropped"
            after = await asyncio.wait_for(events.__anext__(), 2) if outcome == "dropped" else None
            return [outcome, after.kind.value if after else ""]
        finally:
            await watcher.aclose()

    outcome = asyncio.run(run())
    assert outcome == (["answered", ""] if keepalives else ["dropped", "left"])


def test_no_bus_says_bluetooth_unavailable_once_and_stops_cleanly(
    monkeypatch, tmp_path, caplog
) -> None:  # type: ignore[no-untyped-def]
    import logging

    from tokend.drivers.ble import BleWatcher

    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-bus")
    caplog.set_level(logging.INFO, logger="tokend.drivers.ble")

    async def run() -> None:
        watcher = BleWatcher(retry_interval=0.05)
        events = watcher.events()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(events.__anext__(), 0.5)  # nothing arrives, nothing breaks
        await watcher.aclose()

    asyncio.run(run())
    warnings = [r for r in caplog.records if "Bluetooth unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no D-Bus system bus" in warnings[0].getMessage()
