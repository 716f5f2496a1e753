"""Disconnect-rule scenarios over the virtual USB CCID token (pyusb + the CCID driver)."""

from __future__ import annotations

import time

import pytest

from tests.disconnect_scenarios import *  # noqa: F403 - the scenarios are collected here
from tests.helpers import ID_9D, PIN, logged_in_session, pkcs1_blob, private_key
from tests.usb_fixtures import usb_piv_daemon
from tokend.client import Client
from tokend.errors import (
    DeviceRemovedError,
    KeyHandleInvalidError,
    SessionHandleInvalidError,
    UserNotLoggedInError,
)


@pytest.fixture
def piv(sock_path):  # type: ignore[no-untyped-def]
    yield from usb_piv_daemon(sock_path)


def test_unplug_left_event_within_50_ms_of_enodev(piv) -> None:
    """Design §5.6: the transport's own signal (ENODEV on the pending interrupt-IN read)
    reaches a subscriber within 50 ms, and nothing decrypts after it."""
    demo, plug, slot = (piv.extras[k] for k in ("demo", "plug", "slot"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    latencies = []
    with Client(piv.socket) as client, Client(piv.socket) as watcher:
        watcher.subscribe()
        for _ in range(5):
            session = logged_in_session(client, slot)
            key = private_key(client, session, ID_9D)
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
            token = plug.token
            plug.remove()
            event = watcher.next_event(timeout=2)
            received = time.monotonic()
            assert event["event"] == "left" and event["slot_id"] == slot
            assert token.first_enodev_at is not None, "the driver never saw ENODEV"
            latencies.append(received - token.first_enodev_at)
            with pytest.raises(
                DeviceRemovedError
            ):  # the first use after the pull (disconnect.md §2)
                client.decrypt(session, key, "CKM_RSA_PKCS", blob)
            plug.insert(piv.extras["card"])
            assert watcher.next_event(timeout=5)["event"] == "arrived"
    assert max(latencies) < 0.050, [f"{x * 1000:.1f} ms" for x in latencies]


def test_replug_is_a_new_instance_and_needs_a_new_login(piv) -> None:
    demo, plug, slot, card = (piv.extras[k] for k in ("demo", "plug", "slot", "card"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as client:
        client.subscribe()
        generation = client.token_info(slot)["generation"]
        session = logged_in_session(client, slot)
        old_key = private_key(client, session, ID_9D)
        plug.remove()
        assert client.next_event(timeout=2)["event"] == "left"
        plug.insert(card)
        arrived = client.next_event(timeout=5)
        assert arrived["event"] == "arrived" and arrived["generation"] > generation
        with pytest.raises(DeviceRemovedError):  # first use after the pull: disconnect.md
            client.find_objects(session, {})
        fresh = client.open_session(slot)
        info = client.call("C_GetSessionInfo", {"h_session": fresh})["info"]
        assert info["state"] == "CKS_RO_PUBLIC_SESSION"  # no login came back
        assert client.find_objects(fresh, {"CKA_CLASS": "CKO_PRIVATE_KEY"}) == []
        with pytest.raises((KeyHandleInvalidError, UserNotLoggedInError)):
            client.decrypt(fresh, old_key, "CKM_RSA_PKCS", blob)
        client.login(fresh, PIN)
        key = private_key(client, fresh, ID_9D)
        assert client.decrypt(fresh, key, "CKM_RSA_PKCS", blob) == secret


def test_unplug_without_udev_is_found_by_the_transport_error(sock_path) -> None:
    """A token without interrupt-IN and no hotplug announcement: the next transfer's ENODEV
    is the signal, and that decrypt fails."""
    from tests.conftest import start_daemon, stop_daemon, wait_for_token
    from tests.usb_fixtures import UsbPlug
    from tokend.drivers.usb_ccid import UsbCcidWatcher
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard
    from tokend.simulators.usb_ccid import SHORT_APDU, SimulatedUsbBus

    card = VirtualPivCard()
    demo = provision_demo(card)
    bus = SimulatedUsbBus(udev_delay=None)
    plug = UsbPlug(bus, SHORT_APDU)
    plug.insert(card)
    running = start_daemon(sock_path, [UsbCcidWatcher(backend=bus, hotplug=bus, poll_interval=60)])
    try:
        slot = wait_for_token(running)
        blob, secret = pkcs1_blob(demo.encryption_public_key)
        with Client(running.socket) as client, Client(running.socket) as watcher:
            watcher.subscribe()
            session = logged_in_session(client, slot)
            key = private_key(client, session, ID_9D)
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
            plug.remove()
            with pytest.raises(DeviceRemovedError):
                client.decrypt(session, key, "CKM_RSA_PKCS", blob)
            event = watcher.next_event(timeout=2)
            assert event["event"] == "left"
            assert time.monotonic() - plug.token.first_enodev_at < 0.050
            assert client.slot_list(token_present=True) == []
    finally:
        stop_daemon(running)


def test_debug_logs_over_usb_carry_no_pin_and_no_plaintext(piv, caplog) -> None:
    import base64
    import logging

    caplog.set_level(logging.DEBUG)
    demo, slot = piv.extras["demo"], piv.extras["slot"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as client:
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert any(r.name == "tokend.iso7816.channel" for r in caplog.records)  # DEBUG was on
    assert PIN not in text and PIN.encode().hex() not in text.lower()
    for form in (secret.hex(), base64.b64encode(secret).decode()):
        assert form not in text


@pytest.mark.parametrize("code", ["LIBUSB_ERROR_IO", "LIBUSB_ERROR_PIPE", "LIBUSB_ERROR_TIMEOUT"])
def test_a_usb_error_mid_operation_is_a_disconnect(piv, code) -> None:
    """EIO (port glitch), EPIPE (stall), a timeout: presence is in doubt, so the instance is
    retired (§5.1). The token is still there: it comes back as a new instance."""
    import usb.backend.libusb1 as libusb1

    demo, plug, slot = (piv.extras[k] for k in ("demo", "plug", "slot"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        generation = client.token_info(slot)["generation"]
        plug.token.fail_next_read(getattr(libusb1, code))
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert client.next_event(timeout=2)["event"] == "left"
        arrived = client.next_event(timeout=5)
        assert arrived["event"] == "arrived" and arrived["generation"] > generation
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        fresh = logged_in_session(client, slot)  # a new login on the new instance
        key = private_key(client, fresh, ID_9D)
        assert client.decrypt(fresh, key, "CKM_RSA_PKCS", blob) == secret


def test_card_reset_by_another_program_loses_the_login(piv) -> None:  # type: ignore[no-redef]
    """Over PC/SC and in memory another program can reset the card (the scenario of
    disconnect_scenarios); over direct USB it cannot: tokend holds the claimed CCID
    interface, another program's claim fails with EBUSY, and the login stays."""
    import errno

    import usb.core
    import usb.util

    demo, bus, slot = (piv.extras[k] for k in ("demo", "bus", "slot"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as client:
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        devices = list(usb.core.find(find_all=True, backend=bus))
        assert devices, "the token is not on the bus"
        device = devices[0]
        ccid = next(i for cfg in device for i in cfg if i.bInterfaceClass == 0x0B)
        with pytest.raises(usb.core.USBError) as refused:
            usb.util.claim_interface(device, ccid.bInterfaceNumber)
        assert refused.value.errno == errno.EBUSY
        usb.util.dispose_resources(device)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
