"""Which BLE keys tokend uses: only keys paired and bonded through BlueZ and trusted by
tokend; pairing goes through tokend's own agent (passkey comparison, no Just Works)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from tests.conftest import HookedCard, start_daemon, stop_daemon, wait_for_token
from tokend.client import Client


class Prompter:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked: list[int] = []

    def confirm_passkey(self, address: str, passkey: int) -> bool:
        self.asked.append(passkey)
        return self.answer

    def enter_passkey(self, address: str) -> int:
        return -1

    def show(self, message: str) -> None:
        pass


def _key(address: str):  # type: ignore[no-untyped-def]
    from tokend.simulators.ble import VirtualBleKey
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    demo = provision_demo(card)
    return VirtualBleKey(HookedCard(card, []), address, name=f"key {address[-2:]}"), demo


def test_only_bonded_and_trusted_keys_are_used(fake_bluez, sock_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from tokend.drivers.ble import BleWatcher, TrustStore

    unpaired, _ = _key("C0:FF:EE:00:00:0A")
    untrusted, _ = _key("C0:FF:EE:00:00:0B")
    good, good_demo = _key("C0:FF:EE:00:00:0C")
    fake_bluez.add_key(unpaired, paired=False)
    fake_bluez.add_key(untrusted, paired=True)  # bonded by someone else (bluetoothctl)
    fake_bluez.add_key(good, paired=True)
    TrustStore().add(good.address, good.name)
    TrustStore().add(unpaired.address, unpaired.name)  # trusted but never bonded
    caplog.set_level(logging.INFO)
    running = start_daemon(sock_path, [BleWatcher()])
    try:
        slot = wait_for_token(running)
        time.sleep(0.3)  # several advertising intervals of the other two keys
        with Client(running.socket) as client:
            assert client.slot_list(token_present=True) == [slot]
            assert client.token_info(slot)["token_serial"] == good_demo.guid.hex()
    finally:
        stop_daemon(running)
    assert "C0:FF:EE:00:00:0A not used: not paired" in caplog.text
    assert "C0:FF:EE:00:00:0B not used: bonded but not trusted by tokend" in caplog.text
    assert unpaired.apdus == 0 and untrusted.apdus == 0  # not one APDU reached them
    assert fake_bluez.device(unpaired.address).connected is False
    assert fake_bluez.device(untrusted.address).connected is False


def test_pairing_goes_through_tokends_agent(fake_bluez, sock_path) -> None:  # type: ignore[no-untyped-def]
    from tokend.drivers.ble import BleUnavailableError, BleWatcher, TrustStore, pair_key

    key, demo = _key("C0:FF:EE:00:00:0D")
    fake_bluez.add_key(key)
    running = start_daemon(sock_path, [BleWatcher()])
    try:
        no = Prompter(False)
        with pytest.raises(BleUnavailableError, match="Rejected"):
            asyncio.run(pair_key(key.address, no, scan_timeout=5))
        assert len(no.asked) == 1  # the user was asked to compare the passkey
        assert fake_bluez.device(key.address).paired is False
        assert key.address not in TrustStore().load()

        yes = Prompter(True)
        asyncio.run(pair_key(key.address, yes, scan_timeout=5))
        state = fake_bluez.device(key.address)
        assert state.paired and state.bonded and state.trusted
        assert TrustStore().load()[key.address].identity is None
        slot = wait_for_token(running)  # the running daemon picks the new trust up
        with Client(running.socket) as client:
            assert client.token_info(slot)["token_serial"] == demo.guid.hex()
        assert TrustStore().load()[key.address].identity == demo.guid.hex()  # pinned
        assert fake_bluez.device(key.address).connected
        path = TrustStore().path
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
    finally:
        stop_daemon(running)
    assert not fake_bluez.device(key.address).connected  # stopping tokend ends the link


def test_pairing_without_an_agent_fails(fake_bluez) -> None:  # type: ignore[no-untyped-def]
    """What a bare `Device1.Pair` (bleak's pair=True) gets from a key demanding MITM
    protection: no silent Just Works bond."""
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    key, _ = _key("C0:FF:EE:00:00:0E")
    fake_bluez.add_key(key)
    fake_bluez.fake.discovery_clients.add("test")  # make it advertise

    async def bare_pair() -> str:
        bus = await MessageBus(bus_type=__import__("dbus_fast").BusType.SYSTEM).connect()
        try:
            await asyncio.sleep(0.1)
            reply = await bus.call(
                Message(destination="org.bluez", path="/org/bluez/hci0/dev_C0_FF_EE_00_00_0E",
                        interface="org.bluez.Device1", member="Pair")
            )  # fmt: skip
            assert reply.message_type is MessageType.ERROR
            return reply.error_name
        finally:
            bus.disconnect()

    assert asyncio.run(bare_pair()) == "org.bluez.Error.AuthenticationFailed"
    assert fake_bluez.device(key.address).paired is False


def test_configured_key_with_a_pinned_identity(fake_bluez, sock_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """`[[ble_trusted]]` with `identity`: only that token is used at that address."""
    from tokend.drivers.ble import BleWatcher

    right, demo = _key("C0:FF:EE:00:00:21")
    wrong, _ = _key("C0:FF:EE:00:00:22")
    fake_bluez.add_key(right, paired=True)
    fake_bluez.add_key(wrong, paired=True)
    trusted = [
        {"address": right.address, "identity": demo.guid.hex().upper(), "label": "mine"},
        {"address": wrong.address, "identity": "00" * 16},
    ]
    running = start_daemon(sock_path, [BleWatcher(trusted=trusted)])
    try:
        slot = wait_for_token(running)
        time.sleep(0.3)
        with Client(running.socket) as client:
            assert client.slot_list(token_present=True) == [slot]
            assert client.token_info(slot)["token_serial"] == demo.guid.hex()
    finally:
        stop_daemon(running)
    assert f"not the trusted {'00' * 16}" in caplog.text
