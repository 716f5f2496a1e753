"""The virtual BLE key and its world: `VirtualBleKey` (tokend's APDU service over GATT in
front of any `VirtualCard`, normally `VirtualPivCard`), `PrivateBus` (a private dbus-daemon
started and stopped by process id) and `FakeBlueZThread` (the fake ``org.bluez`` of
`tokend.simulators.bluez` on its own thread and loop, with thread-safe controls for tests
and for ``tokend simulate ble``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tokend import ble_framing as bf
from tokend.simulators.base import VirtualCard
from tokend.simulators.bluez import FakeBlueZ

T = TypeVar("T")

DEMO_ADDRESS = "C0:FF:EE:00:00:01"

#: A session bus configuration with a permissive policy: the stock system configuration
#: would refuse to let the fake own org.bluez without BlueZ's policy file.
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow eavesdrop="false"/>
  </policy>
  <limit name="max_incoming_bytes">133169152</limit>
  <limit name="max_outgoing_bytes">133169152</limit>
  <limit name="max_message_size">33554432</limit>
</busconfig>
"""


class PrivateBus:
    """A dbus-daemon of our own (Debian ``dbus``); ``address`` is what to put in
    ``DBUS_SYSTEM_BUS_ADDRESS``. Stopped by its process id."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tokend-dbus-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> str:
        daemon = shutil.which("dbus-daemon")
        if daemon is None:
            raise OSError("dbus-daemon not found (Debian: apt-get install dbus)")
        config = self.dir / "bus.conf"
        config.write_text(BUS_CONFIG.format(dir=self.dir))
        self.process = subprocess.Popen(
            [daemon, f"--config-file={config}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # "Failed to set fd limit" in containers: harmless
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line:
            self.stop()
            raise OSError("dbus-daemon did not start")
        self.address = line
        return line

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class VirtualBleKey:
    """A BLE key carrying a smart-card applet: tokend's APDU service (control point,
    status, control-point length, service revision) in front of ``card``. One frame is
    processed at a time; a long command sends KEEPALIVE every ``keepalive_interval``."""

    characteristics = (
        (bf.CONTROL_POINT_UUID, ("write",)),
        (bf.STATUS_UUID, ("notify",)),
        (bf.CONTROL_POINT_LENGTH_UUID, ("read",)),
        (bf.SERVICE_REVISION_UUID, ("read", "write")),
    )
    service_uuid = bf.SERVICE_UUID

    def __init__(
        self,
        card: VirtualCard,
        address: str = DEMO_ADDRESS,
        name: str = "tokend virtual key",
        *,
        fragment_size: int = 244,
        keepalive_interval: float = 0.5,
    ) -> None:
        self.card = card
        self.address = address.upper()
        self.name = name
        self.fragment_size = bf.check_fragment_size(fragment_size)
        self.keepalive_interval = keepalive_interval
        self.apdus = 0
        #: Test switch: swallow MSG frames without answering (a hung key).
        self.mute = False
        self._notify: Callable[[str, bytes], None] | None = None
        self._reassembler = bf.Reassembler()
        self._inbox: asyncio.Queue[bf.Frame] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._passkey = 0
        card.power_on()

    # -- Peripheral --------------------------------------------------------------------

    def read(self, uuid: str) -> bytes:
        if uuid == bf.CONTROL_POINT_LENGTH_UUID:
            return bf.encode_length(self.fragment_size)
        if uuid == bf.SERVICE_REVISION_UUID:
            return bytes((bf.REVISION_1,))
        return b""

    def max_write(self, uuid: str) -> int:
        return self.fragment_size if uuid == bf.CONTROL_POINT_UUID else 1

    def write(self, uuid: str, value: bytes) -> None:
        if uuid != bf.CONTROL_POINT_UUID:
            return
        try:
            frame = self._reassembler.feed(value)
        except bf.FramingError as exc:
            self._send(bf.error_frame(exc.code))
            return
        if frame is None:
            return
        if frame.cmd is bf.Cmd.CANCEL:
            return  # nothing to abort between APDUs; a card command cannot be interrupted
        if self._inbox is not None:
            self._inbox.put_nowait(frame)

    def connected(self, notify: Callable[[str, bytes], None]) -> None:
        self._notify = notify
        self._reassembler.reset()
        self._inbox = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work(self._inbox))

    def disconnected(self) -> None:
        """A link ends: the key drops the card's security state (power cycle), as a key
        must — a verified PIN never outlives the bond's session."""
        self._notify = None
        self._inbox = None
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        self.card.power_off()
        self.card.power_on()

    def passkey(self) -> int:
        self._passkey = secrets.randbelow(1_000_000)
        return self._passkey

    def swap_card(self, card: VirtualCard) -> None:
        self.card.power_off()
        self.card = card
        card.power_on()

    # -- processing --------------------------------------------------------------------

    def _send(self, frame: bf.Frame) -> None:
        notify = self._notify
        if notify is None:
            return
        for fragment in bf.fragments(frame.cmd, frame.data, self.fragment_size):
            notify(bf.STATUS_UUID, fragment)

    async def _work(self, inbox: asyncio.Queue[bf.Frame]) -> None:
        while True:
            frame = await inbox.get()
            if frame.cmd is bf.Cmd.PING:
                self._send(frame)
            elif frame.cmd is bf.Cmd.MSG:
                if self.mute:
                    continue
                response = await self._process(frame.data)
                if self._inbox is inbox:  # still the same link
                    self._send(bf.Frame(bf.Cmd.MSG, response))
            else:
                self._send(bf.error_frame(bf.ErrorCode.INVALID_CMD))

    async def _process(self, apdu: bytes) -> bytes:
        """Run the card off the loop (key generation takes a while) with keepalives."""
        self.apdus += 1
        job = asyncio.ensure_future(asyncio.to_thread(self.card.process, apdu))
        try:
            while True:
                done, _ = await asyncio.wait({job}, timeout=self.keepalive_interval)
                if done:
                    return job.result()
                self._send(bf.Frame(bf.Cmd.KEEPALIVE, bytes((bf.KeepaliveStatus.PROCESSING,))))
        finally:
            job.cancel()  # link gone mid-command: the card finishes, nobody waits for it


class FakeBlueZThread:
    """The fake BlueZ on its own thread and event loop, on the bus at ``bus_address``. The
    methods are safe to call from any other thread (tests, stdin readers, card hooks)."""

    def __init__(self, bus_address: str, **fake_options: Any) -> None:
        self.bus_address = bus_address
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-bluez", daemon=True)
        self.fake = FakeBlueZ(bus_address=bus_address, **fake_options)
        self.keys: dict[str, VirtualBleKey] = {}

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> FakeBlueZThread:
        self.thread.start()
        self.start_bluez()
        return self

    def start_bluez(self) -> None:
        self.run(self.fake.start())

    def kill_bluez(self) -> None:
        self.run(self.fake.kill())

    def add_key(self, key: VirtualBleKey, *, paired: bool = False, in_range: bool = True) -> None:
        async def _add() -> None:
            self.fake.add_device(key, paired=paired, in_range=in_range)

        self.keys[key.address] = key
        self.run(_add())

    def out_of_range(self, address: str = DEMO_ADDRESS) -> None:
        self.run(self.fake.out_of_range(address))

    def in_range(self, address: str = DEMO_ADDRESS) -> None:
        async def _in() -> None:
            self.fake.in_range(address)

        self.run(_in())

    def power(self, on: bool) -> None:
        self.run(self.fake.set_powered(on))

    def device(self, address: str = DEMO_ADDRESS):  # type: ignore[no-untyped-def]
        return self.fake.devices[address.upper()]

    def stop(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(self.fake.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
