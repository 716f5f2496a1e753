"""The disconnect rule (design §5) over the in-process transport: explicit remove/insert."""

from __future__ import annotations

import threading
import time

import pytest

from tests.helpers import ID_9D, PIN, logged_in_session, pkcs1_blob, private_key
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


def test_remove_locks_at_once_and_reports_the_event(memory_piv) -> None:
    demo, reader = memory_piv.extras["demo"], memory_piv.extras["reader"]
    blob, _ = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as client, Client(memory_piv.socket) as watcher:
        watcher.subscribe()
        session = logged_in_session(client)
        key = _decrypt_ok(client, session, demo)

        reader.remove()

        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        event = watcher.next_event(timeout=2)
        assert event["event"] == "left" and event["slot_id"] == 0
        assert event["serial"] == demo.guid.hex()
        assert client.wait_for_slot_event() == 0
        assert client.slot_list(token_present=True) == []
        assert client.slot_list() == [0]  # slots are never removed
        with pytest.raises(TokenNotPresentError):
            client.open_session(0)


def test_session_info_reports_removal_without_the_card(memory_piv) -> None:
    reader = memory_piv.extras["reader"]
    with Client(memory_piv.socket) as client:
        session = client.open_session(0)
        reader.remove()
        with pytest.raises(DeviceRemovedError):
            client.call("C_GetSessionInfo", {"h_session": session})
        with pytest.raises(SessionHandleInvalidError):
            client.call("C_GetSessionInfo", {"h_session": session})


def test_reinserting_the_same_card_restores_nothing(memory_piv) -> None:
    demo, reader, card = (memory_piv.extras[k] for k in ("demo", "reader", "card"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client)
        old_key = _decrypt_ok(client, session, demo)
        generation = client.token_info(0)["generation"]

        reader.remove()
        reader.insert(card)
        assert client.next_event()["event"] == "left"
        arrived = client.next_event()
        assert arrived["event"] == "arrived" and arrived["serial"] == demo.guid.hex()

        with pytest.raises(DeviceRemovedError):
            client.call("C_GetSessionInfo", {"h_session": session})
        assert client.token_info(0)["generation"] > generation
        fresh = client.open_session(0)
        info = client.call("C_GetSessionInfo", {"h_session": fresh})["info"]
        assert info["state"] == "CKS_RO_PUBLIC_SESSION"  # not logged in
        # The old key handle belongs to the old instance.
        with pytest.raises(KeyHandleInvalidError):
            client.decrypt(fresh, old_key, "CKM_RSA_PKCS", blob)
        assert client.find_objects(fresh, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []
        client.login(fresh, PIN)
        key = private_key(client, fresh, ID_9D)
        assert client.decrypt(fresh, key, "CKM_RSA_PKCS", blob) == secret


def test_a_different_card_in_the_same_slot_inherits_nothing(memory_piv) -> None:
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    demo, reader = memory_piv.extras["demo"], memory_piv.extras["reader"]
    other = VirtualPivCard()
    other_demo = provision_demo(other)
    assert other_demo.guid != demo.guid
    with Client(memory_piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client)
        _decrypt_ok(client, session, demo)
        reader.insert(other)  # a swap: insert() pulls the first card
        events = [client.next_event(), client.next_event()]
        assert [e["event"] for e in events] == ["left", "arrived"]
        assert events[1]["serial"] == other_demo.guid.hex()
        with pytest.raises(DeviceRemovedError):
            client.find_objects(session, {})
        fresh = client.open_session(0)
        assert client.token_info(0)["token_serial"] == other_demo.guid.hex()
        assert client.call("C_GetSessionInfo", {"h_session": fresh})["info"]["state"] == (
            "CKS_RO_PUBLIC_SESSION"
        )


def test_removal_during_an_operation_delivers_no_result(memory_piv) -> None:
    demo, reader = memory_piv.extras["demo"], memory_piv.extras["reader"]
    blob, _ = pkcs1_blob(demo.encryption_public_key)
    pulled = threading.Event()

    def pull_on_general_authenticate(apdu: bytes) -> None:
        if apdu[1] == 0x87 and not pulled.is_set():  # GENERAL AUTHENTICATE is on its way
            pulled.set()
            reader.remove()

    with Client(memory_piv.socket) as client:
        session = logged_in_session(client)
        key = private_key(client, session, ID_9D)
        reader.on_transmit.append(pull_on_general_authenticate)
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert pulled.is_set()
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)


def test_wait_for_slot_event_blocks_until_removal(memory_piv) -> None:
    reader = memory_piv.extras["reader"]
    with Client(memory_piv.socket) as client:
        from tokend.errors import NoEventError

        while True:  # drain the arrival queued at start-up, if any
            try:
                client.wait_for_slot_event(dont_block=True)
            except NoEventError:
                break
        timer = threading.Timer(0.2, reader.remove)
        timer.start()
        start = time.monotonic()
        assert client.wait_for_slot_event() == 0
        assert time.monotonic() - start >= 0.15
        timer.join()


def _card_says_verified(card) -> bool:  # type: ignore[no-untyped-def]
    # VERIFY without data asks the card for the PIN status: 9000 = verified (SP 800-73-4).
    return card.process(bytes.fromhex("0020008000"))[-2:] == b"\x90\x00"


def test_last_logout_resets_the_card_security_state(memory_piv) -> None:
    card = memory_piv.extras["card"]
    with Client(memory_piv.socket) as a, Client(memory_piv.socket) as b:
        sa, sb = logged_in_session(a), logged_in_session(b)
        a.logout(sa)
        assert _card_says_verified(card)  # B is still logged in
        b.logout(sb)
        assert not _card_says_verified(card)


def test_card_reset_by_another_program_loses_the_login(memory_piv) -> None:
    demo, reader = memory_piv.extras["demo"], memory_piv.extras["reader"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as client:
        session = logged_in_session(client)
        key = _decrypt_ok(client, session, demo)
        reader.reset_by_other_program()
        with pytest.raises(UserNotLoggedInError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        # Same instance: the session survives, the login must be redone.
        client.login(session, PIN)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
