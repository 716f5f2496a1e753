"""The Bluetooth LE transport family: `BleWatcher` finds tokend BLE keys with bleak (over
BlueZ's D-Bus API), keeps one link per trusted key and reports it ARRIVED/LEFT; a
`BleTransport` carries APDUs over that link in `tokend.ble_framing` frames. Also here:
tokend's own ``org.bluez.Agent1`` and the pairing / forgetting / listing behind
``tokenctl ble``, and the `TrustStore` (the keys tokend trusts, in its state directory).

A key is used only when BlueZ reports it **paired and bonded** and tokend **trusts** its
address (configuration ``ble_trusted`` or ``tokenctl ble pair``); after the first
connection the token identity behind the address is pinned too.

Link loss is a disconnect (docs/disconnect.md): bleak's disconnected callback
(``Device1.Connected`` false, the device removed, bleak's bus gone), ``org.bluez`` losing its
bus name (bleak does not watch that: we do, on our own dbus-fast connection), any
write/notify error, and a response or KEEPALIVE not arriving in time. Every bleak/D-Bus
error becomes a `TransportError`.

bleak and dbus-fast are imported only here (and by the simulators). The blocking Transport
API is served from the registry's worker thread by scheduling on the watcher's loop.

No ``from __future__ import annotations``: dbus-fast reads the Agent1 D-Bus signatures from
the annotations at class creation.
"""

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError
from dbus_fast import BusType, DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

from tokend import ble_framing as bf
from tokend.config_values import BLE_TRUSTED_FIELDS, check_table, normalize_address
from tokend.drivers.base import CardProtocol, ReaderEvent, ReaderEventKind, TokenRefused
from tokend.errors import TransportError
from tokend.paths import state_dir

log = logging.getLogger(__name__)

# bleak logs every characteristic write (a VERIFY APDU carries the PIN) and dbus-fast whole
# messages (a notification carries decrypted key material) at DEBUG. Those never reach
# tokend's logs, whatever level the user asks for.
for _name in ("bleak", "dbus_fast"):
    if logging.getLogger(_name).level < logging.INFO:  # NOTSET would inherit DEBUG
        logging.getLogger(_name).setLevel(logging.INFO)

BLUEZ = "org.bluez"
READER_PREFIX = "BLE "
AGENT_PATH = "/org/tokend/agent"
#: Errors that mean the link (or BlueZ, or the bus) failed under us. bleak surfaces a dying
#: link as any of these rather than a disconnect (docs/ble.md §5).
LINK_ERRORS = (BleakError, DBusError, BlockingIOError, EOFError, OSError, asyncio.TimeoutError)


def reader_name(address: str) -> str:
    return READER_PREFIX + address


def device_path(address: str, adapter: str = "hci0") -> str:
    return f"/org/bluez/{adapter}/dev_{address.replace(':', '_')}"


# --- what tokend trusts ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedKey:
    address: str
    name: str = ""
    #: The token identity serial seen on the first connection (None until then).
    identity: str | None = None
    paired_at: str = ""
    #: "pair" (tokenctl ble pair) or "config" (listed in ble_trusted)
    source: str = "pair"


class TrustStore:
    """``ble-keys.json`` in tokend's state directory (0600, replaced atomically). The daemon
    re-reads it when it changes, so ``tokenctl ble pair/forget`` take effect at once."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "ble-keys.json"
        self._lock = threading.Lock()

    def stamp(self) -> float:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def load(self) -> dict[str, TrustedKey]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): no BLE key is trusted", self.path, exc)
            return {}
        keys = {}
        for entry in data.get("keys", []):
            key = TrustedKey(
                address=normalize_address(entry["address"]),
                name=str(entry.get("name", "")),
                identity=entry.get("identity"),
                paired_at=str(entry.get("paired_at", "")),
                source=str(entry.get("source", "pair")),
            )
            keys[key.address] = key
        return keys

    def _save(self, keys: dict[str, TrustedKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = {
            "version": 1,
            "keys": [
                {
                    "address": k.address,
                    "name": k.name,
                    "identity": k.identity,
                    "paired_at": k.paired_at,
                    "source": k.source,
                }
                for k in sorted(keys.values(), key=lambda k: k.address)
            ],
        }
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh, indent=2)
        os.replace(tmp, self.path)

    def add(self, address: str, name: str) -> None:
        with self._lock:
            keys = self.load()
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            keys[address] = TrustedKey(address, name, None, now, "pair")
            self._save(keys)

    def forget(self, address: str) -> bool:
        with self._lock:
            keys = self.load()
            found = keys.pop(address, None) is not None
            if found:
                self._save(keys)
            return found

    def pin_identity(self, address: str, identity: str, *, source: str) -> None:
        with self._lock:
            keys = self.load()
            old = keys.get(address) or TrustedKey(address, source=source)
            keys[address] = TrustedKey(
                address, old.name, identity, old.paired_at, old.source or source
            )
            self._save(keys)


# --- one link ----------------------------------------------------------------------------------


class _Link:
    """One connected key: its bleak client, the fragment size it accepts, and the frames
    coming back. One outstanding MSG at a time."""

    def __init__(
        self, watcher: "BleWatcher", address: str, client: BleakClient, fragment_size: int
    ) -> None:
        self.watcher = watcher
        self.address = address
        self.client = client
        self.fragment_size = fragment_size
        self.gone: str | None = None
        self._reassembler = bf.Reassembler()
        self._frames: asyncio.Queue[bf.Frame | str] = asyncio.Queue()
        self._lock = asyncio.Lock()

    def on_notify(self, _sender: object, data: bytearray) -> None:
        try:
            frame = self._reassembler.feed(bytes(data))
        except bf.FramingError as exc:
            self._frames.put_nowait(f"bad fragment from the key: {exc}")
            return
        if frame is not None:
            self._frames.put_nowait(frame)

    def lost(self, reason: str) -> None:
        """The link is over (idempotent): fail the exchange in flight, report LEFT, drop
        the connection in the background."""
        if self.gone is not None:
            return
        self.gone = reason
        self._frames.put_nowait(reason)
        self.watcher._link_ended(self, reason)

    async def exchange(self, apdu: bytes) -> bytes:
        async with self._lock:
            if self.gone is not None:
                raise TransportError(f"BLE key {self.address} is gone: {self.gone}")
            # Frames of an earlier, abandoned exchange must not answer this one; the queue is
            # ready before the first write because a notification may beat the write's reply.
            self._frames = asyncio.Queue()
            self._reassembler.reset()
            try:
                for fragment in bf.fragments(bf.Cmd.MSG, apdu, self.fragment_size):
                    await self.client.write_gatt_char(
                        bf.CONTROL_POINT_UUID, fragment, response=True
                    )
            except LINK_ERRORS as exc:
                self.lost(f"write failed: {type(exc).__name__}: {exc}")
                raise TransportError(f"BLE key {self.address}: write failed") from None
            timeout = self.watcher.keepalive_timeout
            deadline = time.monotonic() + self.watcher.operation_timeout
            while True:
                try:
                    item = await asyncio.wait_for(self._frames.get(), timeout)
                except TimeoutError:
                    await self._cancel()
                    self.lost(f"no answer or keepalive within {timeout:g} s")
                    raise TransportError(f"BLE key {self.address} stopped answering") from None
                if isinstance(item, str):
                    self.lost(item)
                    raise TransportError(f"BLE key {self.address}: {item}")
                if item.cmd is bf.Cmd.KEEPALIVE:
                    if time.monotonic() > deadline:
                        await self._cancel()
                        self.lost("operation took too long")
                        raise TransportError(f"BLE key {self.address}: operation timed out")
                    continue
                if item.cmd is bf.Cmd.MSG:
                    if len(item.data) < 2:
                        self.lost("response without a status word")
                        raise TransportError(f"BLE key {self.address}: truncated response")
                    return item.data
                code = item.data[0] if item.data else bf.ErrorCode.OTHER
                self.lost(f"key answered {item.cmd.name} 0x{code:02X}")
                raise TransportError(f"BLE key {self.address}: protocol error 0x{code:02X}")

    async def _cancel(self) -> None:
        with contextlib.suppress(*LINK_ERRORS):
            frame = bf.fragments(bf.Cmd.CANCEL, b"", self.fragment_size)[0]
            await asyncio.wait_for(
                self.client.write_gatt_char(bf.CONTROL_POINT_UUID, frame, response=True), 1
            )

    async def disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), 5)


class BleTransport:
    """`Transport` over one BLE link. Blocking (the registry calls it from its worker
    thread): each APDU is one MSG exchange on the watcher's loop."""

    #: Frames carry up to 65535 bytes: extended APDUs pass.
    extended = True
    #: Whole APDUs in MSG frames: no T=0 restrictions.
    protocol = CardProtocol.DIRECT

    def __init__(self, link: _Link, loop: asyncio.AbstractEventLoop) -> None:
        self.reader = reader_name(link.address)
        self._link = link
        self._loop = loop
        self._lock = threading.RLock()
        self._closed = False

    def __repr__(self) -> str:
        return f"BleTransport({self._link.address})"

    def _run(self, coro: Awaitable[bytes], timeout: float) -> bytes:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise TransportError(f"BLE key {self._link.address} did not answer") from None

    def atr(self) -> bytes:
        # A BLE key has no ATR; identity comes from the applet (PIV CHUID GUID).
        if self._closed or self._link.gone is not None:
            raise TransportError(f"BLE key {self._link.address} is gone")
        return b""

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            if self._closed:
                raise TransportError(f"transport to BLE key {self._link.address} is closed")
            return self._run(
                self._link.exchange(bytes(apdu)), self._link.watcher.operation_timeout + 5
            )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        # The link belongs to tokend alone (one central): the lock is the exclusive section.
        with self._lock:
            if self._closed or self._link.gone is not None:
                raise TransportError(f"BLE key {self._link.address} is gone")
            yield

    def accept_identity(self, serial: str) -> None:
        self._link.watcher._accept_identity(self._link.address, serial)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Ending the instance ends the link: a key that is still there comes back as a new
        # instance (login again), never as the old one.
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing to end
            self._loop.call_soon_threadsafe(self._link.lost, "closed by tokend")


# --- the watcher ---------------------------------------------------------------------------------


class BleWatcher:
    """`Watcher` over BlueZ: scans for tokend's service, connects to trusted bonded keys,
    reports a key ARRIVED once its link is up and LEFT the moment it ends."""

    name = "ble"

    def __init__(
        self,
        *,
        trusted: Iterable[str | Mapping[str, Any]] = (),
        store: TrustStore | None = None,
        keepalive_timeout: float = 3.0,
        operation_timeout: float = 120.0,
        connect_timeout: float = 10.0,
        retry_interval: float = 1.0,
    ) -> None:
        #: From the configuration: addresses, or ``[[ble_trusted]]`` tables (address,
        #: identity, label).
        self.configured: dict[str, TrustedKey] = {}
        for entry in trusted:
            # The same checks as `tokend check-config` (tokend.config_values): a value that
            # passed there is accepted here, and a bad one is a ValueError naming its key.
            table = check_table(
                {"address": entry} if isinstance(entry, str) else entry, BLE_TRUSTED_FIELDS
            )
            address = table["address"]
            identity = table.get("identity")
            self.configured[address] = TrustedKey(
                address,
                name=str(table.get("label", "")),
                identity=str(identity).lower() if identity else None,
                source="config",
            )
        self.store = store or TrustStore()
        self.keepalive_timeout = keepalive_timeout
        self.operation_timeout = operation_timeout
        self.connect_timeout = connect_timeout
        self.retry_interval = retry_interval
        self._links: dict[str, _Link] = {}
        self._connecting: set[str] = set()
        self._cooldown: dict[str, float] = {}
        self._refused: dict[str, float] = {}
        self._said: set[tuple[str, str]] = set()
        self._queues: list[asyncio.Queue[ReaderEvent | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._bus: MessageBus | None = None
        self._bluez_up = asyncio.Event()
        self._rescan = asyncio.Event()
        self._trust_cache: tuple[float, dict[str, TrustedKey]] = (-1, {})
        self._closed = False
        self._last_problem = ""
        self._background: set[asyncio.Task[Any]] = set()

    # -- Watcher ----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[ReaderEvent]:
        if self._closed:
            return
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ReaderEvent | None] = asyncio.Queue()
        for address in list(self._links):
            queue.put_nowait(ReaderEvent(ReaderEventKind.ARRIVED, reader_name(address)))
        self._queues.append(queue)
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                yield item
        finally:
            with contextlib.suppress(ValueError):
                self._queues.remove(queue)

    async def connect(self, reader: str) -> BleTransport:
        address = reader.removeprefix(READER_PREFIX)
        link = self._links.get(address)
        if link is None or link.gone is not None:
            raise TransportError(f"BLE key {address} is not connected")
        assert self._loop is not None
        return BleTransport(link, self._loop)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._rescan.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for link in list(self._links.values()):
            link.lost("tokend stopping")
        if self._background:
            # Disconnects finish quickly; a connect in progress is abandoned after a while.
            _done, pending = await asyncio.wait(list(self._background), timeout=5)
            for task in pending:
                task.cancel()
        if self._bus is not None:
            self._bus.disconnect()
        for queue in self._queues:
            queue.put_nowait(None)

    # -- supervision --------------------------------------------------------------------------

    def _emit(self, event: ReaderEvent) -> None:
        log.debug("ble %s %s", event.kind.value, event.reader)
        for queue in self._queues:
            queue.put_nowait(event)

    def _say_once(self, address: str, reason: str) -> None:
        if (address, reason) not in self._said:
            self._said.add((address, reason))
            log.warning("BLE key %s not used: %s", address, reason)

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._watch_bluez_owner()
                if not self._bluez_up.is_set():
                    log.info("Bluetooth unavailable: org.bluez is not on the bus; waiting")
                    await self._bluez_up.wait()
                    continue
                self._rescan.clear()
                scanner = BleakScanner(
                    detection_callback=self._on_advert, service_uuids=[bf.SERVICE_UUID]
                )
                await scanner.start()
                self._last_problem = ""
                log.info("scanning for BLE keys (service %s)", bf.SERVICE_UUID)
                try:
                    await self._rescan.wait()
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(scanner.stop(), 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Said once per distinct reason: a machine without a bus would log every second.
                reason = _describe(exc)
                if reason != self._last_problem:
                    log.warning("Bluetooth unavailable: %s; retrying", reason)
                    self._last_problem = reason
                if self._bus is not None and not self._bus.connected:
                    self._bus = None  # rebuilt (with its match rules) on the next round
                await asyncio.sleep(self.retry_interval)

    async def _watch_bluez_owner(self) -> None:
        """bleak does not notice bluetoothd going away (its links look connected for ever):
        watch ``org.bluez``'s owner ourselves."""
        if self._bus is not None and self._bus.connected:
            return
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self._bus = bus
        bus.add_message_handler(self._on_bus_message)
        await _call(
            bus,
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "AddMatch",
            "s",
            [
                "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                f"member='NameOwnerChanged',arg0='{BLUEZ}'"
            ],
        )
        # Adapter power: off ends BlueZ's discovery sessions without bleak noticing, so a
        # power-on must restart our scan.
        await _call(
            bus,
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "AddMatch",
            "s",
            [
                "type='signal',interface='org.freedesktop.DBus.Properties',"
                "member='PropertiesChanged',arg0='org.bluez.Adapter1'"
            ],
        )
        reply = await _call(
            bus,
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            [BLUEZ],
        )
        self._set_bluez(bool(reply[0]))

    def _on_bus_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL or not msg.body:
            return
        if msg.member == "NameOwnerChanged" and msg.body[0] == BLUEZ:
            self._set_bluez(bool(msg.body[2]))
        elif msg.member == "PropertiesChanged" and msg.body[0] == "org.bluez.Adapter1":
            powered = msg.body[1].get("Powered")
            if powered is None:
                return
            if powered.value:
                log.info("Bluetooth adapter %s powered on: scanning again", msg.path)
                self._rescan.set()
            else:
                # BlueZ drops the links itself (each reported by bleak); say why once.
                log.warning("Bluetooth adapter %s powered off: BLE keys are gone", msg.path)

    def _set_bluez(self, up: bool) -> None:
        if up:
            if not self._bluez_up.is_set():
                log.info("org.bluez is on the bus")
            self._bluez_up.set()
            return
        if self._bluez_up.is_set():
            log.warning("org.bluez left the bus (bluetoothd stopped): every BLE key is gone")
        self._bluez_up.clear()
        for link in list(self._links.values()):
            link.lost("bluetoothd (org.bluez) left the bus")
        self._rescan.set()

    # -- trust ------------------------------------------------------------------------------------

    def trusted(self) -> dict[str, TrustedKey]:
        stamp = self.store.stamp()
        if stamp != self._trust_cache[0]:
            self._trust_cache = (stamp, self.store.load())
        keys = dict(self._trust_cache[1])
        for address, key in self.configured.items():
            stored = keys.get(address)
            if stored is None or (key.identity and stored.identity != key.identity):
                keys[address] = key  # an identity written in the configuration wins
        return keys

    def _verdict(self, address: str, props: dict[str, Any]) -> str | None:
        """Why this advertising key must not be used, or None."""
        if not props.get("Paired"):
            return f"not paired (pair it with `tokenctl ble pair {address}`)"
        if not props.get("Bonded", False):
            return "paired but not bonded (no stored long-term key)"
        if address not in self.trusted():
            return (
                "bonded but not trusted by tokend (`tokenctl ble pair` it, or list it in "
                "ble_trusted)"
            )
        if address in self._refused and self._refused[address] == self.store.stamp():
            return "its token identity differs from the one trusted at this address"
        return None

    def _accept_identity(self, address: str, serial: str) -> None:
        trusted = self.trusted().get(address)
        if trusted is None:
            raise TokenRefused(f"BLE key {address} is no longer trusted")
        if trusted.identity is None:
            self.store.pin_identity(address, serial, source=trusted.source)
            log.info("BLE key %s: token identity %s pinned", address, serial)
            return
        if trusted.identity != serial:
            self._refused[address] = self.store.stamp()
            raise TokenRefused(
                f"BLE key {address} carries token {serial}, not the trusted {trusted.identity} "
                "(if the key was reset: `tokenctl ble forget` and pair it again)"
            )

    # -- links ------------------------------------------------------------------------------------

    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        if self._closed:
            return
        address = device.address.upper()
        if address in self._links or address in self._connecting:
            return
        if self._cooldown.get(address, 0) > time.monotonic():
            return
        # The advertisement carries BlueZ's current Device1 properties; BLEDevice.details
        # keeps the dict of the first sighting, which can be stale (Paired after pairing).
        props = _current_props(device, adv)
        verdict = self._verdict(address, props)
        if verdict is not None:
            self._say_once(address, verdict)
            return
        self._connecting.add(address)
        self._spawn(self._connect(device, address))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _connect(self, device: BLEDevice, address: str) -> None:
        client = BleakClient(
            device, disconnected_callback=self._on_disconnected, timeout=self.connect_timeout
        )
        try:
            await client.connect()
            size = bf.decode_length(
                bytes(await client.read_gatt_char(bf.CONTROL_POINT_LENGTH_UUID))
            )
            revision = bytes(await client.read_gatt_char(bf.SERVICE_REVISION_UUID))
            if not revision or not revision[0] & bf.REVISION_1:
                raise TransportError(f"unsupported service revision {revision.hex()}")
            link = _Link(self, address, client, size)
            await client.start_notify(bf.STATUS_UUID, link.on_notify)
        except asyncio.CancelledError:
            self._connecting.discard(address)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2)
            raise
        except (*LINK_ERRORS, ValueError) as exc:
            self._connecting.discard(address)
            self._cooldown[address] = time.monotonic() + self.retry_interval
            log.info("BLE key %s: cannot connect: %s", address, _describe(exc))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2)
            return
        self._connecting.discard(address)
        if self._closed or not self._bluez_up.is_set() or not client.is_connected:
            await link.disconnect()
            return
        self._links[address] = link
        log.info("BLE key %s connected (fragments of %d bytes)", address, size)
        self._emit(ReaderEvent(ReaderEventKind.ARRIVED, reader_name(address)))

    def _on_disconnected(self, client: BleakClient) -> None:
        for link in list(self._links.values()):
            if link.client is client:
                link.lost("link lost (BlueZ reports the device disconnected)")

    def _link_ended(self, link: _Link, reason: str) -> None:
        if self._links.get(link.address) is link:
            del self._links[link.address]
            log.info("BLE key %s gone: %s", link.address, reason)
            self._emit(ReaderEvent(ReaderEventKind.LEFT, reader_name(link.address)))
        # Give the key a moment to advertise again before reconnecting.
        self._cooldown[link.address] = time.monotonic() + 0.1
        if self._bluez_up.is_set():  # also when stopping: leave no link up in BlueZ
            self._spawn(link.disconnect())


def _current_props(device: BLEDevice, adv: AdvertisementData) -> dict[str, Any]:
    platform = getattr(adv, "platform_data", None)
    if isinstance(platform, tuple) and len(platform) == 2 and isinstance(platform[1], dict):
        return platform[1]
    details = device.details
    return details.get("props", {}) if isinstance(details, dict) else {}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no D-Bus system bus ({exc})"
    text = str(exc) or type(exc).__name__
    if "ServiceUnknown" in text or "org.bluez was not provided" in text:
        return "bluetoothd (org.bluez) is not running"
    return text


async def _call(
    bus: MessageBus,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
) -> list[Any]:
    reply = await bus.call(
        Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
    )
    assert reply is not None
    if reply.message_type is MessageType.ERROR:
        raise DBusError(
            reply.error_name or "org.freedesktop.DBus.Error.Failed", (reply.body or [""])[0]
        )
    return list(reply.body)


# --- pairing (tokenctl ble …) -------------------------------------------------------------------


class Prompter(Protocol):
    """How tokend's agent asks its user. Called off the event loop (may block)."""

    def confirm_passkey(self, address: str, passkey: int) -> bool: ...

    def enter_passkey(self, address: str) -> int: ...

    def show(self, message: str) -> None: ...


class TokendAgent(ServiceInterface):
    """tokend's own ``org.bluez.Agent1``: authenticated pairing only (passkey entry or
    numeric comparison). Just Works requests (RequestAuthorization) and legacy PIN codes
    are rejected, so pairing never silently falls back to an unauthenticated bond."""

    def __init__(self, prompter: Prompter) -> None:
        super().__init__("org.bluez.Agent1")
        self.prompter = prompter

    @staticmethod
    def _address(device: str) -> str:
        return device.rsplit("/dev_", 1)[-1].replace("_", ":")

    @method()
    def Release(self):
        pass

    @method()
    def RequestPinCode(self, device: "o") -> "s":
        raise DBusError("org.bluez.Error.Rejected", "legacy PIN pairing is not allowed")

    @method()
    def DisplayPinCode(self, device: "o", pincode: "s"):
        raise DBusError("org.bluez.Error.Rejected", "legacy PIN pairing is not allowed")

    @method()
    async def RequestPasskey(self, device: "o") -> "u":
        passkey = await asyncio.to_thread(self.prompter.enter_passkey, self._address(device))
        if not 0 <= passkey <= 999999:
            raise DBusError("org.bluez.Error.Rejected", "no passkey")
        return passkey

    @method()
    def DisplayPasskey(self, device: "o", passkey: "u", entered: "q"):
        self.prompter.show(f"type {passkey:06d} on the key {self._address(device)}")

    @method()
    async def RequestConfirmation(self, device: "o", passkey: "u"):
        ok = await asyncio.to_thread(self.prompter.confirm_passkey, self._address(device), passkey)
        if not ok:
            raise DBusError("org.bluez.Error.Rejected", "passkey not confirmed")

    @method()
    def RequestAuthorization(self, device: "o"):
        raise DBusError("org.bluez.Error.Rejected", "Just Works pairing is not allowed")

    @method()
    def AuthorizeService(self, device: "o", uuid: "s"):
        raise DBusError("org.bluez.Error.Rejected", "not authorized")

    @method()
    def Cancel(self):
        self.prompter.show("pairing cancelled by BlueZ")


class BleUnavailableError(Exception):
    """Bluetooth cannot be used (no bus, no bluetoothd, no adapter) or a key operation
    failed; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class KeyStatus:
    address: str
    name: str
    in_range: bool
    paired: bool
    bonded: bool
    trusted: bool
    identity: str | None


async def _managed_devices(bus: MessageBus) -> dict[str, dict[str, Any]]:
    """Device1 properties of every device BlueZ knows, by address."""
    (objects,) = await _call(
        bus, BLUEZ, "/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"
    )
    out = {}
    for path, ifaces in objects.items():
        props = ifaces.get("org.bluez.Device1")
        if props is not None:
            values = {k: v.value for k, v in props.items()}
            values["_path"] = path
            out[str(values.get("Address", "")).upper()] = values
    return out


@contextlib.asynccontextmanager
async def _system_bus() -> AsyncIterator[MessageBus]:
    try:
        bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    except (OSError, EOFError) as exc:
        raise BleUnavailableError(f"Bluetooth unavailable: {_describe(exc)}") from None
    try:
        yield bus
    finally:
        bus.disconnect()


def _unavailable(exc: BaseException) -> BleUnavailableError:
    return BleUnavailableError(f"Bluetooth unavailable: {_describe(exc)}")


async def pair_key(
    address: str,
    prompter: Prompter,
    *,
    store: TrustStore | None = None,
    scan_timeout: float = 10.0,
    progress: Callable[[str], None] = lambda _m: None,
) -> str:
    """Pair and bond with the key through tokend's agent, mark it trusted in BlueZ and in
    tokend's state. Returns the key's name."""
    address = normalize_address(address)
    store = store or TrustStore()
    async with _system_bus() as bus:
        agent = TokendAgent(prompter)
        bus.export(AGENT_PATH, agent)
        try:
            await _call(
                bus,
                BLUEZ,
                "/org/bluez",
                "org.bluez.AgentManager1",
                "RegisterAgent",
                "os",
                [AGENT_PATH, "KeyboardDisplay"],
            )
        except DBusError as exc:
            raise _unavailable(exc) from None
        try:
            progress(f"looking for {address} (up to {scan_timeout:g} s)")
            try:
                device = await BleakScanner.find_device_by_address(address, timeout=scan_timeout)
            except LINK_ERRORS as exc:
                raise _unavailable(exc) from None
            if device is None:
                raise BleUnavailableError(f"no BLE key {address} in range")
            path = device.details["path"]
            (raw,) = await _call(
                bus,
                BLUEZ,
                path,
                "org.freedesktop.DBus.Properties",
                "GetAll",
                "s",
                ["org.bluez.Device1"],
            )
            props = {k: v.value for k, v in raw.items()}
            uuids = [u.lower() for u in props.get("UUIDs", [])]
            if bf.SERVICE_UUID not in uuids:
                raise BleUnavailableError(f"{address} does not offer tokend's APDU service")
            if props.get("Paired"):
                raise BleUnavailableError(
                    f"{address} is already paired outside tokend (its bond's strength is "
                    f"unknown): run `tokenctl ble forget {address}` and pair again"
                )
            progress(f"pairing with {address} ({device.name or 'unnamed'})")
            try:
                await _call(bus, BLUEZ, path, "org.bluez.Device1", "Pair")
            except DBusError as exc:
                raise BleUnavailableError(
                    f"pairing with {address} failed: {exc.text or exc.type}"
                ) from None
            await _call(
                bus,
                BLUEZ,
                path,
                "org.freedesktop.DBus.Properties",
                "Set",
                "ssv",
                ["org.bluez.Device1", "Trusted", Variant("b", True)],
            )
            (props_now,) = await _call(
                bus,
                BLUEZ,
                path,
                "org.freedesktop.DBus.Properties",
                "GetAll",
                "s",
                ["org.bluez.Device1"],
            )
            if not (
                props_now["Paired"].value and props_now.get("Bonded", props_now["Paired"]).value
            ):
                raise BleUnavailableError(f"{address} paired but did not bond; not trusted")
            name = str(props_now.get("Name", Variant("s", "")).value)
            store.add(address, name)
            return name
        finally:
            with contextlib.suppress(Exception):
                await _call(
                    bus,
                    BLUEZ,
                    "/org/bluez",
                    "org.bluez.AgentManager1",
                    "UnregisterAgent",
                    "o",
                    [AGENT_PATH],
                )


async def forget_key(address: str, *, store: TrustStore | None = None) -> bool:
    """Remove the bond in BlueZ and the trust in tokend. False if neither knew the key."""
    address = normalize_address(address)
    store = store or TrustStore()
    known = store.forget(address)
    async with _system_bus() as bus:
        try:
            devices = await _managed_devices(bus)
        except DBusError as exc:
            if known:
                return True
            raise _unavailable(exc) from None
        device = devices.get(address)
        if device is not None:
            await _call(
                bus,
                BLUEZ,
                "/org/bluez/hci0",
                "org.bluez.Adapter1",
                "RemoveDevice",
                "o",
                [device["_path"]],
            )
            known = True
    return known


async def list_keys(*, store: TrustStore | None = None, scan_time: float = 2.0) -> list[KeyStatus]:
    """Keys in range (a scan of ``scan_time`` seconds) and keys BlueZ or tokend knows."""
    store = store or TrustStore()
    trusted = store.load()
    seen: dict[str, BLEDevice] = {}
    try:
        found = await BleakScanner.discover(
            timeout=scan_time, service_uuids=[bf.SERVICE_UUID], return_adv=True
        )
        seen = {d.address.upper(): d for d, _adv in found.values()}
        async with _system_bus() as bus:
            devices = await _managed_devices(bus)
    except LINK_ERRORS as exc:
        raise _unavailable(exc) from None
    ours = {
        a: p
        for a, p in devices.items()
        if bf.SERVICE_UUID in [u.lower() for u in p.get("UUIDs", [])]
    }
    out = []
    for address in sorted(set(seen) | set(ours) | set(trusted)):
        props = ours.get(address, {})
        key = trusted.get(address)
        name = str(
            props.get("Name")
            or (seen[address].name if address in seen else "")
            or (key.name if key else "")
        )
        out.append(
            KeyStatus(
                address=address,
                name=name,
                in_range=address in seen or bool(props.get("Connected")),
                paired=bool(props.get("Paired")),
                bonded=bool(props.get("Bonded")),
                trusted=key is not None,
                identity=key.identity if key else None,
            )
        )
    return out
