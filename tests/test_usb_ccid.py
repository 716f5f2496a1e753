"""The USB CCID watcher and transport over the simulated bus (real pyusb above it): which
devices it takes, which it leaves to pcscd, and how a token is served by one path only."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tokend import ccid
from tokend.drivers.base import ReaderEventKind
from tokend.drivers.usb_ccid import UsbCcidWatcher
from tokend.errors import TransportError
from tokend.simulators.piv import VirtualPivCard
from tokend.simulators.usb_ccid import (
    EXTENDED,
    PROFILES,
    TPDU_READER,
    SimulatedUsbBus,
    VirtualCcidToken,
)

SELECT_PIV = bytes.fromhex("00A4040009A0000003080000100000")


class Events:
    """The watcher's events, collected by a task so a test can wait with a timeout."""

    def __init__(self, watcher: UsbCcidWatcher) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self._pump(watcher))

    async def _pump(self, watcher: UsbCcidWatcher) -> None:
        async for event in watcher.events():
            await self.queue.put(event)

    async def next(self, timeout: float = 3.0):  # type: ignore[no-untyped-def]
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def none(self, timeout: float = 0.3) -> None:
        await asyncio.sleep(timeout)  # nothing to wait on: the absence of an event
        assert self.queue.empty(), self.queue.get_nowait()


def watcher_for(bus: SimulatedUsbBus, **kw) -> UsbCcidWatcher:  # type: ignore[no-untyped-def]
    return UsbCcidWatcher(backend=bus, hotplug=bus, read_timeout=0.5, **kw)


async def test_composite_token_is_found_and_its_hid_interfaces_are_left_alone() -> None:
    bus = SimulatedUsbBus()
    token = VirtualCcidToken(VirtualPivCard(), EXTENDED)  # OTP + FIDO HID, then CCID
    bus.plug(token)
    watcher = watcher_for(bus)
    events = Events(watcher)
    try:
        event = await events.next()
        assert event.kind is ReaderEventKind.ARRIVED
        assert event.reader == "tokend Virtual CCID token (1-1)"  # product + port path
        transport = await watcher.connect(event.reader)
        assert transport.extended
        assert transport.atr() == token.card.atr
        assert (await asyncio.to_thread(transport.transmit, SELECT_PIV))[-2:] == b"\x90\x00"
        # Only the CCID interface (2) was claimed; the fake fails set_configuration and
        # detach_kernel_driver outright, so reaching here means neither was called.
        assert token.attachment is not None and token.attachment.claimed == {2}
        await asyncio.to_thread(transport.close)
        assert token.commands[-1] == ccid.MessageType.PC_TO_RDR_ICC_POWER_OFF  # PIN forgotten
    finally:
        await watcher.aclose()


async def test_tpdu_reader_is_left_to_pcscd_with_a_reason(caplog) -> None:
    bus = SimulatedUsbBus()
    bus.plug(VirtualCcidToken(VirtualPivCard(), TPDU_READER))
    watcher = watcher_for(bus)
    events = Events(watcher)
    try:
        with caplog.at_level(logging.INFO, logger="tokend.drivers.usb_ccid"):
            await events.none()
        assert "left to pcscd: tpdu-level exchange needs libccid" in caplog.text
    finally:
        await watcher.aclose()


async def test_a_token_pcscd_holds_stays_with_pcsc_until_released(caplog) -> None:
    bus = SimulatedUsbBus()
    token = VirtualCcidToken(VirtualPivCard(), PROFILES["short"])
    token.claimed_elsewhere = True  # pcscd/libccid has the interface: claim → EBUSY
    bus.plug(token)
    watcher = watcher_for(bus, poll_interval=0.1)
    events = Events(watcher)
    try:
        with caplog.at_level(logging.INFO, logger="tokend.drivers.usb_ccid"):
            await events.none(0.5)
        assert "claimed by another program (pcscd?): served over PC/SC" in caplog.text
        assert caplog.text.count("claimed by another program") == 1  # said once, not per poll
        token.claimed_elsewhere = False  # pcscd --auto-exit let go of it
        assert (await events.next()).kind is ReaderEventKind.ARRIVED
    finally:
        await watcher.aclose()


async def test_two_daemons_never_serve_one_token() -> None:
    bus = SimulatedUsbBus()
    bus.plug(VirtualCcidToken(VirtualPivCard(), EXTENDED))
    first, second = watcher_for(bus), watcher_for(bus)
    first_events, second_events = Events(first), Events(second)
    try:
        assert (await first_events.next()).kind is ReaderEventKind.ARRIVED
        await second_events.none()  # its claim fails with EBUSY
    finally:
        await first.aclose()
        await second.aclose()


async def test_card_leaving_the_slot_is_reported_from_interrupt_in() -> None:
    bus = SimulatedUsbBus()
    token = VirtualCcidToken(VirtualPivCard(), EXTENDED)
    bus.plug(token)
    watcher = watcher_for(bus)
    events = Events(watcher)
    try:
        arrived = await events.next()
        transport = await watcher.connect(arrived.reader)
        token.remove_card()  # NotifySlotChange 50 02
        assert (await events.next()).kind is ReaderEventKind.LEFT
        with pytest.raises(TransportError, match=r"powered off|no card"):
            await asyncio.to_thread(transport.transmit, SELECT_PIV)
        token.insert_card()  # 50 03
        assert (await events.next()).kind is ReaderEventKind.ARRIVED
    finally:
        await watcher.aclose()


async def test_unplug_fails_pending_transfers_with_enodev_like_libusb() -> None:
    import errno

    import usb.core

    bus = SimulatedUsbBus(udev_delay=None)
    token = VirtualCcidToken(VirtualPivCard(), EXTENDED)
    bus.plug(token)
    dev = next(iter(usb.core.find(find_all=True, backend=bus)))
    pending = asyncio.create_task(asyncio.to_thread(dev.read, 0x83, 8, 0))  # no timeout
    await asyncio.sleep(0.05)
    bus.unplug(token)
    with pytest.raises(usb.core.USBError) as caught:
        await asyncio.wait_for(pending, 2)
    assert caught.value.errno == errno.ENODEV and caught.value.backend_error_code == -4
    assert str(caught.value) == "[Errno 19] No such device (it may have been disconnected)"
    assert list(usb.core.find(find_all=True, backend=bus)) == []


async def test_udev_remove_retires_a_token_without_interrupt_in(caplog) -> None:
    """No interrupt endpoint and the token idle: the udev ``remove`` of its bus/address is
    the signal (no transfer would notice until the next command)."""
    bus = SimulatedUsbBus(udev_delay=0.005)
    token = VirtualCcidToken(VirtualPivCard(), PROFILES["short"])
    bus.plug(token)
    watcher = watcher_for(bus, poll_interval=60)  # no enumeration would see it in time
    events = Events(watcher)
    caplog.set_level(logging.INFO, logger="tokend.drivers.usb_ccid")
    try:
        assert (await events.next()).kind is ReaderEventKind.ARRIVED
        bus.unplug(token)
        assert (await events.next(1.0)).kind is ReaderEventKind.LEFT
        for _ in range(100):  # the LEFT is emitted first, the log line right after it
            if "removed (udev)" in caplog.text:
                break
            await asyncio.sleep(0.01)
        assert "removed (udev)" in caplog.text
    finally:
        await watcher.aclose()


def test_pyusb_tracing_never_logs_transfers() -> None:
    """PYUSB_DEBUG would make pyusb log every transfer's bytes (PINs included): the driver
    keeps pyusb's loggers above DEBUG."""
    import subprocess
    import sys

    script = (
        "import logging, os\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "import tokend.drivers.usb_ccid\n"
        "print(logging.getLogger('usb.backend.libusb1').isEnabledFor(logging.DEBUG))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**__import__("os").environ, "PYUSB_DEBUG": "debug"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False"
    assert "PYUSB_DEBUG is set" in done.stderr
