"""Promises of docs/disconnect.md that an audit (issue 16) could break without a test
noticing: the card's own security state after the last client leaves (§5), a result that
arrives after its token was retired (§2), and a swap reported without a LEFT (§1).

Each test here was seen to fail on a build with the promise broken (docs/testing.md,
"what each promise's tests are"). The card is asked directly (PIV VERIFY status query) —
the daemon's own view of the login is not evidence of what the card will allow."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import ID_9D, logged_in_session, pkcs1_blob, private_key
from tokend.client import Client
from tokend.drivers.base import ReaderEvent, ReaderEventKind
from tokend.errors import DeviceRemovedError, SessionHandleInvalidError

#: VERIFY with no data: the PIN status (9000 verified, 63Cx not verified, x tries left).
STATUS_QUERY = bytes.fromhex("0020008000")
#: VERIFY P1=FF: what the daemon sends to reset the card's security state.
RESET_HEADER = bytes.fromhex("0020FF80")
GENERAL_AUTHENTICATE = 0x87


@pytest.fixture(params=["memory", "usb", pytest.param("pcsc", marks=pytest.mark.pcsc)])
def piv(request):  # type: ignore[no-untyped-def]
    """The demo card in the in-process reader, in a virtual USB CCID token, and behind real
    pcscd + vpcd."""
    if request.param == "usb":
        from tests.usb_fixtures import usb_piv_daemon

        yield from usb_piv_daemon(request.getfixturevalue("sock_path"))
        return
    yield request.getfixturevalue(f"{request.param}_piv")


def pin_status(card) -> bytes:  # type: ignore[no-untyped-def]
    return bytes(card.process(STATUS_QUERY)[-2:])


def assert_card_unverified(card) -> None:  # type: ignore[no-untyped-def]
    sw = pin_status(card)
    assert sw[0] == 0x63, f"the card still answers {sw.hex()} to the PIN status query"


def assert_card_verified(card) -> None:  # type: ignore[no-untyped-def]
    assert pin_status(card) == b"\x90\x00"


def reset_seen(plug) -> threading.Event:  # type: ignore[no-untyped-def]
    """Set once the card has answered a security-state reset (VERIFY P1=FF)."""
    seen = threading.Event()

    def hook(apdu: bytes, rapdu: bytes) -> None:
        if apdu[:4] == RESET_HEADER:
            seen.set()

    plug.after_answer.append(hook)
    return seen


# --- 1. the last client leaving leaves the card unverified (§5) ------------------------------


def test_a_client_that_disconnects_leaves_the_card_unverified(piv) -> None:
    card, plug, slot = (piv.extras[k] for k in ("card", "plug", "slot"))
    reset = reset_seen(plug)
    with Client(piv.socket) as client:
        logged_in_session(client, slot)
        assert_card_verified(card)
    # EOF: the daemon ends the application; it was the token's last logged-in one.
    assert reset.wait(5), "the card's security state was not reset when the client left"
    assert_card_unverified(card)


def test_closing_the_last_session_leaves_the_card_unverified(piv) -> None:
    card, slot = piv.extras["card"], piv.extras["slot"]
    with Client(piv.socket) as client:
        first = logged_in_session(client, slot)
        second = client.open_session(slot)
        client.close_session(first)
        assert_card_verified(card)  # the application still has a session on the token
        client.close_session(second)  # its last: PKCS#11 logs it out
        assert_card_unverified(card)


def test_closing_all_sessions_leaves_the_card_unverified(piv) -> None:
    card, slot = piv.extras["card"], piv.extras["slot"]
    with Client(piv.socket) as client:
        logged_in_session(client, slot)
        client.open_session(slot)
        client.call("C_CloseAllSessions", {"slot_id": slot})
        assert_card_unverified(card)


def test_a_client_leaving_keeps_the_card_verified_for_another_logged_in_client(piv) -> None:
    card, demo, slot = (piv.extras[k] for k in ("card", "demo", "slot"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as a, Client(piv.socket) as b:
        sa, sb = logged_in_session(a, slot), logged_in_session(b, slot)
        a.close_session(sa)  # A's last session: A is logged out, B is not
        assert_card_verified(card)
        key = private_key(b, sb, ID_9D)
        assert b.decrypt(sb, key, "CKM_RSA_PKCS", blob) == secret


# --- 2. a result that arrives after retirement is never delivered (§2) -----------------------


def test_an_answer_that_arrives_after_the_token_left_is_dropped(memory_piv) -> None:
    """The PC/SC case: the card answers, then pcscd reports it gone before the daemon hands
    the answer on. The in-process reader plays it exactly: the card computes the plaintext,
    the watcher reports LEFT, and only once the daemon has retired the token (a subscriber
    sees "left") does the answer travel back — through a transport that still works, so
    only the session engine's own check can drop it."""
    demo, plug, slot = (memory_piv.extras[k] for k in ("demo", "plug", "slot"))
    watcher, reader = memory_piv.extras["watcher"], memory_piv.extras["reader"]
    blob, _ = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as client, Client(memory_piv.socket) as observer:
        observer.subscribe()
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        answered = threading.Event()
        seen_left: list[dict] = []

        def report_left_after_the_answer(apdu: bytes, rapdu: bytes) -> None:
            if apdu[1] == GENERAL_AUTHENTICATE and rapdu[-2:] == b"\x90\x00":
                answered.set()
                plug.after_answer.clear()
                watcher.push(ReaderEvent(ReaderEventKind.LEFT, reader.name))
                seen_left.append(observer.next_event(timeout=5))  # retired: now answer

        plug.after_answer.append(report_left_after_the_answer)
        with pytest.raises(DeviceRemovedError):  # not the plaintext
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert answered.is_set(), "the card never answered: the test did not run its case"
        assert seen_left and seen_left[0]["event"] == "left"
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)


def test_arrived_for_an_occupied_slot_retires_the_old_instance(memory_piv) -> None:
    """A watcher that reports ARRIVED for a slot that holds a token, without LEFT first (a
    swap inside one poll, an event counter that moved): the old instance is gone."""
    demo, card, slot = (memory_piv.extras[k] for k in ("demo", "card", "slot"))
    watcher, reader = memory_piv.extras["watcher"], memory_piv.extras["reader"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        generation = client.token_info(slot)["generation"]

        watcher.push(ReaderEvent(ReaderEventKind.ARRIVED, reader.name, card.atr))

        events = [client.next_event(timeout=5), client.next_event(timeout=5)]
        assert [e["event"] for e in events] == ["left", "arrived"]
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert client.token_info(slot)["generation"] > generation
        fresh = logged_in_session(client, slot)
        assert client.decrypt(fresh, private_key(client, fresh, ID_9D), "CKM_RSA_PKCS", blob) == (
            secret
        )


def test_a_transport_failure_during_an_operation_retires_the_token(memory_piv) -> None:
    """A transport-level failure in the middle of an operation (what pyscard reports as
    SCARD_E_NOT_TRANSACTED, a vpcd socket that closed) counts as a disconnect although no
    watcher said LEFT: the session is gone, and the card, still there, comes back as a new
    instance after the re-probe."""
    from tokend.errors import TransportError

    demo, plug, slot = (memory_piv.extras[k] for k in ("demo", "plug", "slot"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as client:
        client.subscribe()
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        generation = client.token_info(slot)["generation"]
        failed = threading.Event()

        def fail_once_on_general_authenticate(apdu: bytes) -> None:
            if apdu[1] == GENERAL_AUTHENTICATE and not failed.is_set():
                failed.set()
                raise TransportError("the reader stopped answering")

        plug.on_transmit.append(fail_once_on_general_authenticate)
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert failed.is_set()
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        events = [client.next_event(timeout=5), client.next_event(timeout=5)]
        assert [e["event"] for e in events] == ["left", "arrived"]
        assert client.token_info(slot)["generation"] > generation
        fresh = logged_in_session(client, slot)  # no login came back with it
        assert client.decrypt(fresh, private_key(client, fresh, ID_9D), "CKM_RSA_PKCS", blob) == (
            secret
        )
