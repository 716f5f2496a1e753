"""Issue-3 acceptance over real pcscd + vpcd: latency, swaps, sharing the reader with other
PC/SC programs, pcscd going away, virtual readers refused by default, and OpenSC's own
PIV driver accepting the virtual card."""

from __future__ import annotations

import random
import subprocess
import time

import pytest

from tests.conftest import start_daemon, stop_daemon, wait_for_token
from tests.helpers import ID_9D, PIN, logged_in_session, pkcs1_blob, private_key
from tokend.client import Client
from tokend.errors import (
    DeviceError,
    DeviceRemovedError,
    SessionHandleInvalidError,
    TokenNotPresentError,
    UserNotLoggedInError,
)

pytestmark = pytest.mark.pcsc


def test_unplug_event_within_500_ms_and_no_decrypt_after(pcsc_piv) -> None:
    demo, plug, slot = (pcsc_piv.extras[k] for k in ("demo", "plug", "slot"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(pcsc_piv.socket) as client, Client(pcsc_piv.socket) as watcher:
        watcher.subscribe()
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
        time.sleep(random.uniform(0, 0.4))  # unplug at a random point of pcscd's 400 ms poll
        unplugged = time.monotonic()
        plug.remove()
        event = watcher.next_event(timeout=3)
        latency = time.monotonic() - unplugged
        assert event["event"] == "left"
        # pcscd polls vpcd every 400 ms: ≤ 500 ms end to end, plus slack for a busy CI box.
        assert latency < 0.8, f"slot event after {latency * 1000:.0f} ms"
        # The rule: the first call on the session says DEVICE_REMOVED, later ones INVALID.
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)


def test_swap_inside_one_poll_is_a_different_token(pcsc_piv) -> None:
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    demo, plug, slot = (pcsc_piv.extras[k] for k in ("demo", "plug", "slot"))
    other = VirtualPivCard()
    other_demo = provision_demo(other)
    with Client(pcsc_piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client, slot)
        plug.insert(other)  # unplug + plug at once: well inside pcscd's 400 ms poll
        events = [client.next_event(timeout=5), client.next_event(timeout=5)]
        assert [e["event"] for e in events] == ["left", "arrived"]
        assert events[1]["serial"] == other_demo.guid.hex() != demo.guid.hex()
        with pytest.raises(DeviceRemovedError):
            client.find_objects(session, {})
        assert client.token_info(slot)["token_serial"] == other_demo.guid.hex()


def test_other_pcsc_programs_share_the_reader(pcsc_piv, vpcd) -> None:
    demo, slot = pcsc_piv.extras["demo"], pcsc_piv.extras["slot"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    reader = vpcd.reader(0)
    with Client(pcsc_piv.socket) as client:
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        listed = subprocess.run(
            ["opensc-tool", "--list-readers"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert reader in listed.stdout
        index = next(line.split()[0] for line in listed.stdout.splitlines() if reader in line)
        apdu = subprocess.run(
            ["opensc-tool", "-r", index, "-s", "00 A4 04 00 05 A0 00 00 03 08"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert apdu.returncode == 0, apdu.stderr
        assert "90 00" in apdu.stdout.replace("SW1=0x90, SW2=0x00", "90 00")
        # Our next operation succeeds, or — if opensc-tool reset the card — fails cleanly.
        try:
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
        except UserNotLoggedInError:
            client.login(session, PIN)
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret


def test_opensc_piv_driver_lists_the_demo_certificates(vpcd) -> None:
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    demo = provision_demo(card)
    vpcd.plug(card)
    out = subprocess.run(
        ["pkcs15-tool", "--reader", vpcd.reader(0), "--list-certificates"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("X.509 Certificate") >= 3
    listed = out.stdout.replace(" ", "").upper()
    for cert in (demo.encryption_cert, demo.signing_cert, demo.retired_cert):
        assert f"{cert.serial_number:X}" in listed  # "Encoded serial" of each certificate


@pytest.mark.pcscd_restart
def test_pcscd_going_away_and_coming_back(pcsc_piv, pcscd_service) -> None:
    if not pcscd_service.started:  # only without a private pcscd; fails under CI
        pytest.skip("pcscd was not started by this test run; not stopping someone else's")
    plug, slot = pcsc_piv.extras["plug"], pcsc_piv.extras["slot"]
    with Client(pcsc_piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client, slot)
        pcscd_service.stop()
        assert client.next_event(timeout=5)["event"] == "left"
        assert client.slot_list(token_present=True) == []
        with pytest.raises(DeviceRemovedError):
            client.find_objects(session, {})
        pcscd_service.start()
        plug.connection.unplug()  # vpcd came back with pcscd: plug the card again
        plug.connection.plug()
        assert client.next_event(timeout=10)["event"] == "arrived"
        fresh = logged_in_session(client, client.slot_list(token_present=True)[0])
        assert private_key(client, fresh, ID_9D)


@pytest.mark.pcscd_restart
def test_pcscd_killed_while_a_decryption_is_at_the_card(pcsc_piv, pcscd_service) -> None:
    """pcscd crashes (SIGKILL) just as the card is decrypting: the caller gets a removal
    error within 2 s and never the plaintext, no PIN try is used, and after pcscd is back
    the card is not verified; logging in again works (issue 18, fault matrix)."""
    import threading

    from tests.helpers import pkcs1_blob

    if not pcscd_service.started:  # only without a private pcscd; fails under CI
        pytest.skip("pcscd was not started by this test run; not killing someone else's")
    plug, slot = pcsc_piv.extras["plug"], pcsc_piv.extras["slot"]
    card, demo = pcsc_piv.extras["card"], pcsc_piv.extras["demo"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    tries = card._pin.left
    killed_at: list[float] = []
    lock = threading.Lock()

    def kill_at_the_decryption(apdu: bytes) -> None:
        with lock:
            if apdu[1] == 0x87 and not killed_at:  # GENERAL AUTHENTICATE: the RSA operation
                killed_at.append(time.monotonic())
                pcscd_service.kill()

    with Client(pcsc_piv.socket, timeout=15) as client:
        client.subscribe()
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        plug.on_transmit.append(kill_at_the_decryption)
        try:
            with pytest.raises((DeviceRemovedError, TokenNotPresentError, DeviceError)):
                client.decrypt(session, key, "CKM_RSA_PKCS", blob)
            answered = time.monotonic()
        finally:
            plug.on_transmit.clear()
        assert killed_at and answered - killed_at[0] < 2.0, "no answer within 2 s of the crash"
        assert client.next_event(timeout=5)["event"] == "left"
    assert card._pin.left == tries  # no PIN try used
    pcscd_service.start()
    plug.connection.unplug()  # vpcd came back with pcscd: plug the card again
    plug.connection.plug()
    with Client(pcsc_piv.socket, timeout=15) as client:
        deadline = time.monotonic() + 15
        while not client.slot_list(token_present=True):
            assert time.monotonic() < deadline, "the card did not come back"
            time.sleep(0.05)
        # VERIFY without data asks the PIN state: 9000 would mean still verified
        assert card.process(bytes.fromhex("0020008000"))[-2:] != b"\x90\x00"
        fresh = logged_in_session(client, client.slot_list(token_present=True)[0])
        assert client.decrypt(fresh, private_key(client, fresh, ID_9D), "CKM_RSA_PKCS", blob) == (
            secret
        )


def test_virtual_readers_are_refused_by_default(vpcd, sock_path) -> None:
    from tokend.drivers.pcsc import PcscWatcher
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    provision_demo(card)
    vpcd.plug(card)
    running = start_daemon(sock_path, [PcscWatcher()])
    try:
        with pytest.raises(TimeoutError):
            wait_for_token(running, timeout=1.5)
    finally:
        stop_daemon(running)
