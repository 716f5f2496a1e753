"""The disconnect rule (design §5) as scenarios every transport must pass. Each transport's
module (test_disconnect_<transport>.py) runs them with its own ``piv`` fixture."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

from tests.helpers import ID_9D, PIN, SWAP_EVENT_WAIT, logged_in_session, pkcs1_blob, private_key
from tokend.client import Client
from tokend.errors import (
    DeviceRemovedError,
    KeyHandleInvalidError,
    SessionHandleInvalidError,
    TokenNotPresentError,
    UserNotLoggedInError,
)
from tokend.pkcs11 import CKA


def _decrypt_ok(client: Client, session: int, demo) -> int:  # type: ignore[no-untyped-def]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    key = private_key(client, session, ID_9D)
    assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
    return key


def test_remove_locks_at_once_and_reports_the_event(piv) -> None:
    demo, plug = piv.extras["demo"], piv.extras["plug"]
    blob, _ = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as client, Client(piv.socket) as watcher:
        watcher.subscribe()
        session = logged_in_session(client, piv.extras["slot"])
        key = _decrypt_ok(client, session, demo)

        plug.remove()

        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        event = watcher.next_event(timeout=2)
        assert event["event"] == "left" and event["slot_id"] == piv.extras["slot"]
        assert event["serial"] == demo.guid.hex()
        assert client.wait_for_slot_event() == piv.extras["slot"]
        assert client.slot_list(token_present=True) == []
        assert piv.extras["slot"] in client.slot_list()  # slots are never removed
        with pytest.raises(TokenNotPresentError):
            client.open_session(piv.extras["slot"])


def test_session_info_reports_removal_without_the_card(piv) -> None:
    plug = piv.extras["plug"]
    with Client(piv.socket) as client:
        client.subscribe()
        session = client.open_session(piv.extras["slot"])
        plug.remove()
        # No card I/O is involved: the transport's own signal (an event) must do it.
        assert client.next_event(timeout=2)["event"] == "left"
        with pytest.raises(DeviceRemovedError):
            client.call("C_GetSessionInfo", {"h_session": session})
        with pytest.raises(SessionHandleInvalidError):
            client.call("C_GetSessionInfo", {"h_session": session})


def test_reinserting_the_same_card_restores_nothing(piv) -> None:
    demo, plug, card = (piv.extras[k] for k in ("demo", "plug", "card"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client, piv.extras["slot"])
        old_key = _decrypt_ok(client, session, demo)
        generation = client.token_info(piv.extras["slot"])["generation"]

        plug.remove()
        plug.insert(card)
        assert client.next_event(SWAP_EVENT_WAIT)["event"] == "left"
        arrived = client.next_event(SWAP_EVENT_WAIT)
        assert arrived["event"] == "arrived" and arrived["serial"] == demo.guid.hex()

        with pytest.raises(DeviceRemovedError):
            client.call("C_GetSessionInfo", {"h_session": session})
        assert client.token_info(piv.extras["slot"])["generation"] > generation
        fresh = client.open_session(piv.extras["slot"])
        info = client.call("C_GetSessionInfo", {"h_session": fresh})["info"]
        assert info["state"] == "CKS_RO_PUBLIC_SESSION"  # not logged in
        # The old key handle belongs to the old instance.
        with pytest.raises(KeyHandleInvalidError):
            client.decrypt(fresh, old_key, "CKM_RSA_PKCS", blob)
        assert client.find_objects(fresh, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []
        client.login(fresh, PIN)
        key = private_key(client, fresh, ID_9D)
        assert client.decrypt(fresh, key, "CKM_RSA_PKCS", blob) == secret


def test_a_different_card_in_the_same_slot_inherits_nothing(piv) -> None:
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    demo, plug = piv.extras["demo"], piv.extras["plug"]
    other = VirtualPivCard()
    other_demo = provision_demo(other)
    assert other_demo.guid != demo.guid
    with Client(piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client, piv.extras["slot"])
        _decrypt_ok(client, session, demo)
        plug.insert(other)  # a swap: insert() pulls the first card
        events = [client.next_event(SWAP_EVENT_WAIT), client.next_event(SWAP_EVENT_WAIT)]
        assert [e["event"] for e in events] == ["left", "arrived"]
        assert events[1]["serial"] == other_demo.guid.hex()
        with pytest.raises(DeviceRemovedError):
            client.find_objects(session, {})
        fresh = client.open_session(piv.extras["slot"])
        assert client.token_info(piv.extras["slot"])["token_serial"] == other_demo.guid.hex()
        assert client.call("C_GetSessionInfo", {"h_session": fresh})["info"]["state"] == (
            "CKS_RO_PUBLIC_SESSION"
        )


def test_removal_during_an_operation_delivers_no_result(piv) -> None:
    demo, plug = piv.extras["demo"], piv.extras["plug"]
    blob, _ = pkcs1_blob(demo.encryption_public_key)
    pulled = threading.Event()

    def pull_on_general_authenticate(apdu: bytes) -> None:
        if apdu[1] == 0x87 and not pulled.is_set():  # GENERAL AUTHENTICATE is on its way
            pulled.set()
            plug.remove()

    with Client(piv.socket) as client:
        session = logged_in_session(client, piv.extras["slot"])
        key = private_key(client, session, ID_9D)
        plug.on_transmit.append(pull_on_general_authenticate)
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert pulled.is_set()
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)


def test_wait_for_slot_event_blocks_until_removal(piv) -> None:
    plug = piv.extras["plug"]
    with Client(piv.socket) as client:
        from tokend.errors import NoEventError

        while True:  # drain the arrival queued at start-up, if any
            try:
                client.wait_for_slot_event(dont_block=True)
            except NoEventError:
                break
        timer = threading.Timer(0.2, plug.remove)
        timer.start()
        start = time.monotonic()
        assert client.wait_for_slot_event() == piv.extras["slot"]
        assert time.monotonic() - start >= 0.15
        timer.join()


def _card_says_verified(card) -> bool:  # type: ignore[no-untyped-def]
    # VERIFY without data asks the card for the PIN status: 9000 = verified (SP 800-73-4).
    return card.process(bytes.fromhex("0020008000"))[-2:] == b"\x90\x00"


def test_last_logout_resets_the_card_security_state(piv) -> None:
    card = piv.extras["card"]
    with Client(piv.socket) as a, Client(piv.socket) as b:
        sa, sb = logged_in_session(a, piv.extras["slot"]), logged_in_session(b, piv.extras["slot"])
        a.logout(sa)
        assert _card_says_verified(card)  # B is still logged in
        b.logout(sb)
        assert not _card_says_verified(card)


def test_card_reset_by_another_program_loses_the_login(piv) -> None:
    demo, plug = piv.extras["demo"], piv.extras["plug"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as client:
        session = logged_in_session(client, piv.extras["slot"])
        key = _decrypt_ok(client, session, demo)
        plug.reset_by_other_program()
        with pytest.raises(UserNotLoggedInError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        # Same instance: the session survives, the login must be redone.
        client.login(session, PIN)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret


def test_a_session_left_open_on_a_removed_token_keeps_no_driver(piv) -> None:
    """Found by the soak (docs/reliability.md §3): a session that died with its token and
    that the client never closes kept the retired instance's driver (certificates, keys,
    object table, transport) alive, so the daemon grew with every unplug. The session
    still answers as before: CKR_DEVICE_REMOVED once, then CKR_SESSION_HANDLE_INVALID."""
    demo, plug, slot = piv.extras["demo"], piv.extras["plug"], piv.extras["slot"]
    registry = piv.daemon.engine.registry
    with Client(piv.socket) as client:
        session = logged_in_session(client, slot)
        key = _decrypt_ok(client, session, demo)
        instance = registry.slot(slot).instance
        driver = weakref.ref(instance.token)
        plug.remove()
        deadline = time.monotonic() + 5
        while driver() is not None and time.monotonic() < deadline:
            gc.collect()  # the driver closes on its own thread; then nothing holds it
            time.sleep(0.02)
        assert driver() is None, gc.get_referrers(driver())
        assert instance.retired  # the dead session still holds its (now light) instance
        engine = piv.daemon.engine
        # nor does the connection keep the handles of the private objects it was shown
        assert all(
            not app.known_private - engine._token_objects.keys() for app in engine.apps.values()
        )
        blob, _ = pkcs1_blob(demo.encryption_public_key)
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        with pytest.raises(SessionHandleInvalidError):
            client.call("C_GetSessionInfo", {"h_session": session})
