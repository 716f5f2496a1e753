"""A fake ``org.bluez`` (bluetoothd's D-Bus API) exported with dbus-fast, for BLE tests
without a radio. bleak and tokend's BLE driver talk to it unmodified, over a private
dbus-daemon selected with ``DBUS_SYSTEM_BUS_ADDRESS``.

It copies the BlueZ behaviours bleak relies on (see docs/ble.md): the object path layout
``/org/bluez/hci0/dev_XX_…/serviceXXXX/charXXXX[/descXXXX]``, an adapter with the central
role, periodic RSSI updates while discovering (else bleak's find_device_* misses devices),
``ServicesResolved`` after Connect, ``UnknownObject`` for missing objects, paced
notifications, BlueZ's disconnect order, GATT errors as "Operation failed with ATT error",
and pairing that calls back the caller's registered ``org.bluez.Agent1``.

The device side (what the key answers) is a `Peripheral`; `tokend.simulators.ble` has the
virtual BLE key. Everything here runs on one asyncio loop; the thread-safe entry points for
tests are on `tokend.simulators.ble.FakeBlueZThread`.

No ``from __future__ import annotations`` here: dbus-fast reads the D-Bus signatures from
the annotations at class creation.
"""

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dbus_fast import BusType, DBusError, Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

log = logging.getLogger(__name__)

BLUEZ = "org.bluez"
ADAPTER_PATH = "/org/bluez/hci0"
CCCD_UUID = "00002902-0000-1000-8000-00805f9b34fb"
ATT_INSUFFICIENT_AUTHENTICATION = 0x05
ATT_INVALID_ATTRIBUTE_VALUE_LENGTH = 0x0D


def att_error(code: int) -> DBusError:
    """How bluetoothd reports an ATT error; bleak turns it into BleakGATTProtocolError."""
    return DBusError("org.bluez.Error.Failed", f"Operation failed with ATT error: 0x{code:02x}")


class Peripheral(Protocol):
    """The device behind a fake Device1: what it advertises and what its GATT answers."""

    address: str
    name: str
    service_uuid: str
    #: Characteristic UUIDs in handle order: control point (write), status (notify),
    #: control point length (read), service revision (read/write).
    characteristics: tuple[tuple[str, tuple[str, ...]], ...]

    def read(self, uuid: str) -> bytes: ...

    def write(self, uuid: str, value: bytes) -> None:
        """A write with response; answers arrive later through ``notify``."""
        ...

    def connected(self, notify: Callable[[str, bytes], None]) -> None: ...

    def disconnected(self) -> None: ...

    def max_write(self, uuid: str) -> int: ...

    def passkey(self) -> int:
        """The 6-digit passkey the key shows for numeric comparison."""
        ...


@dataclass
class DeviceState:
    peripheral: Peripheral
    paired: bool = False
    bonded: bool = False
    trusted: bool = False
    in_range: bool = True
    connected: bool = False
    resolved: bool = False
    notifying: bool = False
    rssi: int = -50
    epoch: int = 0
    #: time.monotonic() of the last Connected=false signal (for latency checks)
    last_disconnect: float = 0.0
    outbox: asyncio.Queue[tuple[int, str, bytes]] | None = None
    sender: asyncio.Task[None] | None = None
    exported: bool = False
    gatt_paths: list[str] = field(default_factory=list)


def device_path(address: str) -> str:
    return f"{ADAPTER_PATH}/dev_{address.upper().replace(':', '_')}"


class AdapterInterface(ServiceInterface):
    def __init__(self, fake: "FakeBlueZ") -> None:
        super().__init__("org.bluez.Adapter1")
        self.fake = fake
        self._powered = True

    @method()
    def StartDiscovery(self):
        if not self._powered:
            raise DBusError("org.bluez.Error.NotReady", "Resource Not Ready")
        self.fake.start_discovery(self.fake.current_sender())

    @method()
    def StopDiscovery(self):
        self.fake.stop_discovery(self.fake.current_sender())

    @method()
    def SetDiscoveryFilter(self, properties: "a{sv}"):
        self.fake.calls.append(("SetDiscoveryFilter", dict(properties)))

    @method()
    def GetDiscoveryFilters(self) -> "as":
        return ["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData"]

    @method()
    async def RemoveDevice(self, device: "o"):
        await self.fake.remove_device(device)

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> "s":
        return "00:AA:01:00:00:01"

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return "tokend-fake-hci0"

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> "s":
        return "tokend-fake-hci0"

    @dbus_property()
    def Powered(self) -> "b":
        return self._powered

    @Powered.setter
    def Powered(self, value: "b"):
        self.fake.spawn(self.fake.set_powered(bool(value)))

    @dbus_property(access=PropertyAccess.READ)
    def Discovering(self) -> "b":
        return bool(self.fake.discovery_clients)

    @dbus_property(access=PropertyAccess.READ)
    def Roles(self) -> "as":
        return ["central", "peripheral"]


class AgentManagerInterface(ServiceInterface):
    def __init__(self, fake: "FakeBlueZ") -> None:
        super().__init__("org.bluez.AgentManager1")
        self.fake = fake

    @method()
    def RegisterAgent(self, agent: "o", capability: "s"):
        self.fake.agents[self.fake.current_sender()] = (agent, capability)

    @method()
    def UnregisterAgent(self, agent: "o"):
        sender = self.fake.current_sender()
        if self.fake.agents.get(sender, ("",))[0] != agent:
            raise DBusError("org.bluez.Error.DoesNotExist", "No such agent")
        del self.fake.agents[sender]
        if self.fake.default_agent == sender:
            self.fake.default_agent = None

    @method()
    def RequestDefaultAgent(self, agent: "o"):
        sender = self.fake.current_sender()
        if self.fake.agents.get(sender, ("",))[0] != agent:
            raise DBusError("org.bluez.Error.DoesNotExist", "No such agent")
        self.fake.default_agent = sender


class DeviceInterface(ServiceInterface):
    def __init__(self, fake: "FakeBlueZ", state: DeviceState) -> None:
        super().__init__("org.bluez.Device1")
        self.fake = fake
        self.state = state

    @method()
    async def Connect(self):
        await self.fake.connect(self.state)

    @method()
    async def Disconnect(self):
        await self.fake.disconnect(self.state)

    @method()
    async def Pair(self):
        # The coroutine runs after the next message may have arrived: take the sender
        # recorded for this very call.
        sender = self.fake.pair_senders.pop(device_path(self.state.peripheral.address), "")
        await self.fake.pair(self.state, sender)

    @method()
    def CancelPairing(self):
        pass

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> "s":
        return self.state.peripheral.address.upper()

    @dbus_property(access=PropertyAccess.READ)
    def AddressType(self) -> "s":
        return "random"

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.state.peripheral.name

    @dbus_property(access=PropertyAccess.READ)
    def Alias(self) -> "s":
        return self.state.peripheral.name

    @dbus_property(access=PropertyAccess.READ)
    def Paired(self) -> "b":
        return self.state.paired

    @dbus_property(access=PropertyAccess.READ)
    def Bonded(self) -> "b":
        return self.state.bonded

    @dbus_property()
    def Trusted(self) -> "b":
        return self.state.trusted

    @Trusted.setter
    def Trusted(self, value: "b"):
        self.state.trusted = bool(value)

    @dbus_property(access=PropertyAccess.READ)
    def Connected(self) -> "b":
        return self.state.connected

    @dbus_property(access=PropertyAccess.READ)
    def ServicesResolved(self) -> "b":
        return self.state.resolved

    @dbus_property(access=PropertyAccess.READ)
    def UUIDs(self) -> "as":
        return [self.state.peripheral.service_uuid]

    @dbus_property(access=PropertyAccess.READ)
    def Adapter(self) -> "o":
        return ADAPTER_PATH

    @dbus_property(access=PropertyAccess.READ)
    def ManufacturerData(self) -> "a{qv}":
        return {}

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> "a{sv}":
        return {}

    @dbus_property(access=PropertyAccess.READ)
    def RSSI(self) -> "n":
        return self.state.rssi

    @dbus_property(access=PropertyAccess.READ)
    def TxPower(self) -> "n":
        return 0


class GattServiceInterface(ServiceInterface):
    def __init__(self, uuid: str, device: str) -> None:
        super().__init__("org.bluez.GattService1")
        self._uuid, self._device = uuid, device

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> "s":
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Device(self) -> "o":
        return self._device

    @dbus_property(access=PropertyAccess.READ)
    def Primary(self) -> "b":
        return True


class GattCharacteristicInterface(ServiceInterface):
    def __init__(
        self, fake: "FakeBlueZ", state: DeviceState, uuid: str, service: str, flags: list[str]
    ) -> None:
        super().__init__("org.bluez.GattCharacteristic1")
        self.fake, self.state = fake, state
        self._uuid, self._service, self._flags = uuid, service, flags
        self._value = b""

    def _check_access(self) -> None:
        # The key demands an authenticated bond for every characteristic: no APDU in clear.
        if not (self.state.paired and self.state.bonded):
            raise att_error(ATT_INSUFFICIENT_AUTHENTICATION)
        if not self.state.connected:
            raise DBusError("org.bluez.Error.Failed", "Not connected")

    @method()
    def ReadValue(self, options: "a{sv}") -> "ay":
        self._check_access()
        return self.state.peripheral.read(self._uuid)

    @method()
    def WriteValue(self, value: "ay", options: "a{sv}"):
        self._check_access()
        if len(value) > self.state.peripheral.max_write(self._uuid):
            raise att_error(ATT_INVALID_ATTRIBUTE_VALUE_LENGTH)
        self.fake.calls.append(("WriteValue", len(value)))
        self.state.peripheral.write(self._uuid, bytes(value))

    @method()
    def StartNotify(self):
        self._check_access()
        self.state.notifying = True

    @method()
    def StopNotify(self):
        self.state.notifying = False

    def notify(self, value: bytes) -> None:
        self._value = value
        self.emit_properties_changed({"Value": value})

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> "s":
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Service(self) -> "o":
        return self._service

    @dbus_property(access=PropertyAccess.READ)
    def Flags(self) -> "as":
        return self._flags

    @dbus_property(access=PropertyAccess.READ)
    def Value(self) -> "ay":
        return self._value

    @dbus_property(access=PropertyAccess.READ)
    def Notifying(self) -> "b":
        return self.state.notifying

    @dbus_property(access=PropertyAccess.READ)
    def MTU(self) -> "q":
        return 517


class GattDescriptorInterface(ServiceInterface):
    def __init__(self, uuid: str, characteristic: str) -> None:
        super().__init__("org.bluez.GattDescriptor1")
        self._uuid, self._characteristic = uuid, characteristic

    @dbus_property(access=PropertyAccess.READ)
    def UUID(self) -> "s":
        return self._uuid

    @dbus_property(access=PropertyAccess.READ)
    def Characteristic(self) -> "o":
        return self._characteristic


class FakeBlueZ:
    """bluetoothd as bleak sees it, on one asyncio loop. ``kill()`` drops off the bus
    (``org.bluez`` loses its owner, as when bluetoothd crashes); ``start()`` comes back with
    the bonds kept and every link down."""

    def __init__(
        self,
        *,
        bus_address: str | None = None,
        adv_interval: float = 0.02,
        notify_interval: float = 0.0005,
    ) -> None:
        self.bus_address = bus_address
        self.adv_interval = adv_interval
        self.notify_interval = notify_interval
        self.devices: dict[str, DeviceState] = {}
        self.discovery_clients: set[str] = set()
        self.agents: dict[str, tuple[str, str]] = {}
        self.default_agent: str | None = None
        #: Recent calls for tests to inspect (bounded: `tokend simulate ble` runs for hours).
        self.calls: deque[tuple[str, Any]] = deque(maxlen=100_000)
        self.bus: MessageBus | None = None
        self._exported: set[str] = set()
        self._adapter: AdapterInterface | None = None
        self._device_ifaces: dict[str, DeviceInterface] = {}
        self._char_ifaces: dict[tuple[str, str], GattCharacteristicInterface] = {}
        self._advertiser: asyncio.Task[None] | None = None
        self._sender_of_current_call: str = ""
        self.pair_senders: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Called with the passkey when a key shows one (the simulator prints it).
        self.on_passkey: Callable[[str, int], None] | None = None

    # --- bus life ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.bus is not None and self.bus.connected

    async def start(self) -> None:
        if self.bus_address:
            bus = await MessageBus(bus_address=self.bus_address).connect()
        else:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.bus = bus
        bus.add_message_handler(self._on_message)
        self._adapter = AdapterInterface(self)
        self._export("/org/bluez", AgentManagerInterface(self))
        self._export(ADAPTER_PATH, self._adapter)
        for state in self.devices.values():
            state.connected = state.resolved = state.notifying = False
            state.exported = False
            if state.paired:  # BlueZ keeps bonded devices across restarts
                self._export_device(state)
        self.discovery_clients.clear()
        self.agents.clear()
        self.default_agent = None
        await bus.request_name(BLUEZ)
        self._advertiser = asyncio.create_task(self._advertise())

    async def kill(self) -> None:
        """bluetoothd dies: the bus name goes away with the connection, links drop without
        any Device1 signal."""
        if self._advertiser is not None:
            self._advertiser.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._advertiser
            self._advertiser = None
        for state in self.devices.values():
            if state.connected:
                state.epoch += 1
                state.connected = state.resolved = state.notifying = False
                state.peripheral.disconnected()
                if state.sender is not None:
                    state.sender.cancel()
                    state.sender = None
        bus, self.bus = self.bus, None
        self._exported.clear()
        self._device_ifaces.clear()
        self._char_ifaces.clear()
        if bus is not None:
            bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bus.wait_for_disconnect(), 2)

    async def stop(self) -> None:
        for state in list(self.devices.values()):
            if state.connected:
                await self.disconnect(state)
        await self.kill()

    def current_sender(self) -> str:
        return self._sender_of_current_call

    def _on_message(self, msg: Message) -> Message | None:
        if msg.message_type is not MessageType.METHOD_CALL:
            return None
        self._sender_of_current_call = msg.sender or ""
        if msg.member == "Pair":
            self.pair_senders[msg.path] = msg.sender or ""
        # dbus-fast answers UnknownMethod for paths nobody exported; BlueZ answers
        # UnknownObject, which bleak maps to BleakDeviceNotFoundError.
        if (
            msg.path.startswith("/org/bluez")
            and msg.path not in self._exported
            and msg.interface != "org.freedesktop.DBus.Introspectable"
        ):
            return Message.new_error(
                msg, "org.freedesktop.DBus.Error.UnknownObject", f"{msg.path} does not exist"
            )
        return None

    def _export(self, path: str, iface: ServiceInterface) -> None:
        assert self.bus is not None
        self.bus.export(path, iface)
        self._exported.add(path)

    def _unexport(self, path: str) -> None:
        if self.bus is not None and self.bus.connected:
            self.bus.unexport(path)
        self._exported.discard(path)

    # --- devices ----------------------------------------------------------------------

    def add_device(
        self, peripheral: Peripheral, *, paired: bool = False, in_range: bool = True
    ) -> DeviceState:
        state = DeviceState(peripheral, paired=paired, bonded=paired, trusted=paired)
        state.in_range = in_range
        self.devices[peripheral.address.upper()] = state
        if paired and self.running:
            self._export_device(state)
        return state

    def _export_device(self, state: DeviceState) -> None:
        if state.exported or not self.running:
            return
        iface = DeviceInterface(self, state)
        path = device_path(state.peripheral.address)
        self._device_ifaces[path] = iface
        self._export(path, iface)
        state.exported = True

    def _device_iface(self, state: DeviceState) -> DeviceInterface | None:
        return self._device_ifaces.get(device_path(state.peripheral.address))

    def _changed(self, state: DeviceState, props: dict[str, Any]) -> None:
        iface = self._device_iface(state)
        if iface is not None and self.running:
            iface.emit_properties_changed(props)

    async def remove_device(self, path: str) -> None:
        for state in self.devices.values():
            if device_path(state.peripheral.address) == path and state.exported:
                if state.connected:
                    await self.disconnect(state)
                state.paired = state.bonded = state.trusted = False
                self._unexport(path)
                self._device_ifaces.pop(path, None)
                state.exported = False
                return
        raise DBusError("org.bluez.Error.DoesNotExist", "Does Not Exist")

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def set_powered(self, on: bool) -> None:
        """Adapter power: off drops every link and ends discovery, as bluetoothd does."""
        adapter = self._adapter
        if adapter is None or adapter._powered == on:
            return
        if not on:
            for state in list(self.devices.values()):
                await self.disconnect(state)
            if self.discovery_clients:
                self.discovery_clients.clear()
                adapter.emit_properties_changed({"Discovering": False})
        adapter._powered = on
        adapter.emit_properties_changed({"Powered": on})

    # --- discovery ----------------------------------------------------------------------

    def start_discovery(self, sender: str) -> None:
        first = not self.discovery_clients
        self.discovery_clients.add(sender)
        if first and self._adapter is not None:
            self._adapter.emit_properties_changed({"Discovering": True})

    def stop_discovery(self, sender: str) -> None:
        if sender not in self.discovery_clients:
            raise DBusError("org.bluez.Error.Failed", "No discovery started")
        self.discovery_clients.discard(sender)
        if not self.discovery_clients and self._adapter is not None:
            self._adapter.emit_properties_changed({"Discovering": False})

    async def _advertise(self) -> None:
        """While anyone discovers: every device in range and not connected advertises (an
        RSSI PropertiesChanged per advert, as bluetoothd sends)."""
        while True:
            await asyncio.sleep(self.adv_interval)
            if not self.discovery_clients or not self.running:
                continue
            assert self.bus is not None
            names = await self._live_names()
            self.discovery_clients &= names  # BlueZ ends the discovery of clients that left
            for state in list(self.devices.values()):
                if not state.in_range or state.connected:
                    continue
                if not state.exported:
                    self._export_device(state)  # InterfacesAdded = first advert
                    continue
                state.rssi = -40 - random.randrange(20)
                self._changed(state, {"RSSI": state.rssi})

    async def _live_names(self) -> set[str]:
        assert self.bus is not None
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="ListNames",
            )
        )
        return set(reply.body[0]) if reply.message_type is MessageType.METHOD_RETURN else set()

    # --- links ----------------------------------------------------------------------------

    async def connect(self, state: DeviceState) -> None:
        if state.connected:
            return
        if self._adapter is not None and not self._adapter._powered:
            raise DBusError("org.bluez.Error.NotReady", "Resource Not Ready")
        if not state.in_range:
            await asyncio.sleep(0.05)
            raise DBusError("org.bluez.Error.Failed", "Page Timeout")
        state.connected = True
        state.epoch += 1
        state.outbox = asyncio.Queue()
        self._changed(state, {"Connected": True})
        self._export_gatt(state)
        state.peripheral.connected(
            lambda uuid, value, e=state.epoch: self._queue(state, e, uuid, value)
        )
        state.sender = asyncio.create_task(self._send_notifications(state))
        state.resolved = True
        self._changed(state, {"ServicesResolved": True})

    async def disconnect(self, state: DeviceState) -> None:
        """BlueZ's order: ServicesResolved=false, GATT objects removed, Connected=false."""
        if not state.connected:
            return
        state.epoch += 1
        state.notifying = False
        state.peripheral.disconnected()
        if state.sender is not None:
            state.sender.cancel()
            state.sender = None
        state.resolved = False
        self._changed(state, {"ServicesResolved": False})
        for path in reversed(state.gatt_paths):
            self._unexport(path)
        state.gatt_paths.clear()
        state.connected = False
        state.last_disconnect = time.monotonic()
        self._changed(state, {"Connected": False})

    def _export_gatt(self, state: DeviceState) -> None:
        dev = device_path(state.peripheral.address)
        service = f"{dev}/service000a"
        self._export(service, GattServiceInterface(state.peripheral.service_uuid, dev))
        state.gatt_paths = [service]
        handles = itertools.count(0x0B)
        for uuid, flags in state.peripheral.characteristics:
            handle = next(handles)
            path = f"{service}/char{handle:04x}"
            char = GattCharacteristicInterface(self, state, uuid, service, list(flags))
            self._char_ifaces[(dev, uuid)] = char
            self._export(path, char)
            state.gatt_paths.append(path)
            if "notify" in flags:
                desc = f"{path}/desc{next(handles):04x}"
                self._export(desc, GattDescriptorInterface(CCCD_UUID, path))
                state.gatt_paths.append(desc)

    def _queue(self, state: DeviceState, epoch: int, uuid: str, value: bytes) -> None:
        if state.epoch == epoch and state.outbox is not None:
            state.outbox.put_nowait((epoch, uuid, value))

    async def _send_notifications(self, state: DeviceState) -> None:
        """Paced: one notification per loop turn (or per ``notify_interval``); a synchronous
        burst fills the bus socket and kills the connection (docs/ble.md)."""
        assert state.outbox is not None
        dev = device_path(state.peripheral.address)
        while True:
            epoch, uuid, value = await state.outbox.get()
            await asyncio.sleep(self.notify_interval)
            if epoch != state.epoch or not state.notifying or not self.running:
                continue
            char = self._char_ifaces.get((dev, uuid))
            if char is not None:
                char.notify(value)

    # --- range ----------------------------------------------------------------------------

    async def out_of_range(self, address: str) -> None:
        state = self.devices[address.upper()]
        state.in_range = False
        await self.disconnect(state)  # supervision timeout: the link drops

    def in_range(self, address: str) -> None:
        self.devices[address.upper()].in_range = True

    # --- pairing --------------------------------------------------------------------------

    async def pair(self, state: DeviceState, sender: str) -> None:
        """Pair through the caller's agent (else the default agent). The key demands MITM
        protection, so without an agent that can confirm a passkey pairing fails, as
        bluetoothd's would (no Just Works)."""
        if state.paired:
            raise DBusError("org.bluez.Error.AlreadyExists", "Already Exists")
        if not state.in_range:
            raise DBusError("org.bluez.Error.ConnectionAttemptFailed", "Page Timeout")
        owner = sender if sender in self.agents else self.default_agent
        if owner is None or self.bus is None:
            raise DBusError("org.bluez.Error.AuthenticationFailed", "Authentication Failed")
        agent_path, capability = self.agents[owner]
        passkey = state.peripheral.passkey()
        if self.on_passkey is not None:
            self.on_passkey(state.peripheral.address, passkey)
        dev = device_path(state.peripheral.address)
        if capability in ("DisplayYesNo", "KeyboardDisplay"):
            call = Message(
                destination=owner,
                path=agent_path,
                interface="org.bluez.Agent1",
                member="RequestConfirmation",
                signature="ou",
                body=[dev, passkey],
            )
        elif capability == "KeyboardOnly":
            call = Message(
                destination=owner,
                path=agent_path,
                interface="org.bluez.Agent1",
                member="RequestPasskey",
                signature="o",
                body=[dev],
            )
        else:  # DisplayOnly / NoInputNoOutput: Just Works, which the key refuses
            raise DBusError("org.bluez.Error.AuthenticationFailed", "Authentication Failed")
        reply = await self.bus.call(call)
        if reply.message_type is MessageType.ERROR:
            raise DBusError("org.bluez.Error.AuthenticationRejected", "Authentication Rejected")
        if call.member == "RequestPasskey" and int(reply.body[0]) != passkey:
            raise DBusError("org.bluez.Error.AuthenticationFailed", "Authentication Failed")
        state.paired = state.bonded = True
        self._changed(state, {"Paired": True, "Bonded": True})
