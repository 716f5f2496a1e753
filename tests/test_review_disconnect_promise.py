"""Adversarial review of the disconnect rule and per-application login (docs/disconnect.md):
races between logins, logouts and removal, the context-specific PIN, and slot events.
Each test talks to the daemon through its socket; white-box peeks only synchronise races."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from tests.helpers import ID_9C, ID_9D, PIN, logged_in_session, pkcs1_blob, private_key
from tokend.client import Client
from tokend.errors import (
    DeviceRemovedError,
    KeyHandleInvalidError,
    SessionHandleInvalidError,
    UserNotLoggedInError,
)
from tokend.protocol import b64, unb64

#: VERIFY of the PIV PIN carrying a PIN (not the status query, not the P1=FF reset).
_VERIFY_WITH_PIN = bytes.fromhex("00200080")


def _is_pin_verify(apdu: bytes) -> bool:
    return apdu[:4] == _VERIFY_WITH_PIN and len(apdu) > 5


def _card_says_verified(card) -> bool:  # type: ignore[no-untyped-def]
    return card.process(bytes.fromhex("0020008000"))[-2:] == b"\x90\x00"


def _app_of(running, session: int):  # type: ignore[no-untyped-def]
    engine = running.daemon.engine
    return next(app for app in list(engine.apps.values()) if session in app.sessions)


def _wait_until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def _session_state(client: Client, session: int) -> str:
    return str(client.call("C_GetSessionInfo", {"h_session": session})["info"]["state"])


def test_login_during_which_the_token_leaves_is_not_recorded(memory_piv) -> None:
    plug, card = memory_piv.extras["plug"], memory_piv.extras["card"]
    fired = threading.Event()

    def pull_during_verify(apdu: bytes) -> None:
        if _is_pin_verify(apdu) and not fired.is_set():
            fired.set()
            plug.remove()

    with Client(memory_piv.socket) as client:
        session = client.open_session(memory_piv.extras["slot"])
        plug.on_transmit.append(pull_during_verify)
        with pytest.raises(DeviceRemovedError):
            client.login(session, PIN)
        assert fired.is_set()
        # DEVICE_REMOVED was the login's answer; the session went with the token.
        with pytest.raises(SessionHandleInvalidError):
            client.call("C_GetSessionInfo", {"h_session": session})
        plug.on_transmit.clear()
        client.subscribe()
        plug.insert(card)
        while client.next_event()["event"] != "arrived":
            pass
        fresh = client.open_session(memory_piv.extras["slot"])
        assert _session_state(client, fresh) == "CKS_RO_PUBLIC_SESSION"


def test_last_logout_racing_another_login_does_not_undo_that_login(memory_piv) -> None:
    """A's last logout resets the card (VERIFY P1=FF). If B's VERIFY is on the card at that
    moment, the reset must not land after it: B was told it is logged in."""
    demo, plug, card = (memory_piv.extras[k] for k in ("demo", "plug", "card"))
    slot = memory_piv.extras["slot"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as a, Client(memory_piv.socket) as b:
        sa = logged_in_session(a, slot)
        sb = b.open_session(slot)
        app_a = _app_of(memory_piv, sa)
        fired = threading.Event()
        logout_thread = threading.Thread(target=a.logout, args=(sa,))

        def logout_a_while_b_verifies(apdu: bytes) -> None:
            if _is_pin_verify(apdu) and not fired.is_set():
                fired.set()
                logout_thread.start()
                _wait_until(lambda: not app_a.logins)  # A's logout is being handled...
                # ...and, once the loop has run one more callback, is parked at its await
                # (the login lock, or the card's queue): everything before it is synchronous.
                memory_piv.run(asyncio.sleep(0))

        plug.on_transmit.append(logout_a_while_b_verifies)
        b.login(sb, PIN)
        logout_thread.join(5)
        plug.on_transmit.clear()
        assert fired.is_set() and not logout_thread.is_alive()

        assert _session_state(b, sb) == "CKS_RO_USER_FUNCTIONS"
        key = private_key(b, sb, ID_9D)
        assert b.decrypt(sb, key, "CKM_RSA_PKCS", blob) == secret
        b.logout(sb)
        assert not _card_says_verified(card)  # and the last logout still resets the card


def test_always_authenticate_decryption_key_needs_the_context_login(memory_piv) -> None:
    """A PIN-always decryption key: tokend must ask for C_Login(CKU_CONTEXT_SPECIFIC) itself
    (never rely on the card to refuse), and with it every decryption works."""
    slot = memory_piv.extras["slot"]
    with Client(memory_piv.socket) as client, Client(memory_piv.socket) as other:
        session = client.open_session(slot, rw=True)
        client.login(session, PIN)
        generated = client.call(
            "tokend_GenerateKeyPair",
            {
                "h_session": session,
                "key_slot": "9d",
                "algorithm": "rsa2048",
                "pin_policy": "always",
            },
        )
        public = serialization.load_der_public_key(unb64(generated["public_key"]))
        key = private_key(client, session, ID_9D)
        attrs = client.get_attributes(session, key, ["CKA_ALWAYS_AUTHENTICATE"])
        assert attrs["CKA_ALWAYS_AUTHENTICATE"] is True
        other_session = logged_in_session(other, slot)
        blob, secret = pkcs1_blob(public)  # type: ignore[arg-type]

        with pytest.raises(UserNotLoggedInError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        # The refusal came from tokend, not from the card: nobody's login was lost.
        assert _session_state(client, session) == "CKS_RW_USER_FUNCTIONS"
        assert _session_state(other, other_session) == "CKS_RO_USER_FUNCTIONS"

        for _ in range(2):  # each decryption with its own context PIN
            init = {
                "h_session": session,
                "h_key": key,
                "p_mechanism": {"mechanism": "CKM_RSA_PKCS"},
            }
            client.call("C_DecryptInit", init)
            client.call(
                "C_Login",
                {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": PIN},
            )
            answer = client.call("C_Decrypt", {"h_session": session, "p_encrypted_data": b64(blob)})
            assert unb64(answer["data"]) == secret


def test_repeated_context_login_keeps_the_data_to_sign(memory_piv) -> None:
    demo = memory_piv.extras["demo"]
    message = b"From: demo@example.org\r\n\r\nsigned in two parts"
    with Client(memory_piv.socket) as client:
        session = logged_in_session(client, memory_piv.extras["slot"])
        key = private_key(client, session, ID_9C)
        mech = {"mechanism": "CKM_ECDSA_SHA256"}
        client.call("C_SignInit", {"h_session": session, "p_mechanism": mech, "h_key": key})
        client.call("C_SignUpdate", {"h_session": session, "p_part": b64(message[:10])})
        for _ in range(2):  # e.g. the user re-typed the PIN
            client.call(
                "C_Login",
                {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": PIN},
            )
        client.call("C_SignUpdate", {"h_session": session, "p_part": b64(message[10:])})
        raw = unb64(client.call("C_SignFinal", {"h_session": session})["signature"])
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    demo.signing_public_key.verify(
        utils.encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256())
    )


def test_logout_forgets_a_context_pin_given_before_it(memory_piv) -> None:
    """A context-specific PIN is kept only for the operation it was given for; a logout
    ends that: after logging in again the signature needs the PIN again."""
    digest = hashlib.sha256(b"mail").digest()
    with Client(memory_piv.socket) as client:
        session = logged_in_session(client, memory_piv.extras["slot"])
        key = private_key(client, session, ID_9C)
        init = {"h_session": session, "p_mechanism": {"mechanism": "CKM_ECDSA"}, "h_key": key}
        client.call("C_SignInit", init)
        client.call(
            "C_Login", {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": PIN}
        )
        client.logout(session)
        client.login(session, PIN)
        with pytest.raises(UserNotLoggedInError):
            client.call("C_Sign", {"h_session": session, "p_data": b64(digest)})


def test_subscribing_again_after_unsubscribe_delivers_events(memory_piv) -> None:
    plug = memory_piv.extras["plug"]
    with Client(memory_piv.socket) as client:
        client.subscribe()
        client.call("unsubscribe")
        client.subscribe()
        plug.remove()
        event = client.next_event(timeout=2)
        assert event["event"] == "left" and event["slot_id"] == memory_piv.extras["slot"]


def test_session_handles_belong_to_their_application(memory_piv) -> None:
    with Client(memory_piv.socket) as a, Client(memory_piv.socket) as b:
        sa = logged_in_session(a, memory_piv.extras["slot"])
        with pytest.raises(SessionHandleInvalidError):
            b.call("C_GetSessionInfo", {"h_session": sa})
        with pytest.raises(SessionHandleInvalidError):
            b.find_objects(sa, {})
        assert _session_state(a, sa) == "CKS_RO_USER_FUNCTIONS"


def test_operation_started_on_a_replaced_key_never_uses_the_new_key(memory_piv) -> None:
    """Provisioning forgets the handles of the slots it changed; an operation initialised
    with the old key's handle must not run with the key that replaced it."""
    slot = memory_piv.extras["slot"]
    with Client(memory_piv.socket) as a, Client(memory_piv.socket) as admin:
        sa = logged_in_session(a, slot)
        old_key = private_key(a, sa, ID_9D)
        a.call(
            "C_DecryptInit",
            {"h_session": sa, "h_key": old_key, "p_mechanism": {"mechanism": "CKM_RSA_PKCS"}},
        )
        s_admin = admin.open_session(slot, rw=True)
        admin.login(s_admin, PIN)
        generated = admin.call(
            "tokend_GenerateKeyPair",
            {"h_session": s_admin, "key_slot": "9d", "algorithm": "rsa2048"},
        )
        new_public = serialization.load_der_public_key(unb64(generated["public_key"]))
        blob, _ = pkcs1_blob(new_public)
        with pytest.raises(KeyHandleInvalidError):
            a.call("C_Decrypt", {"h_session": sa, "p_encrypted_data": b64(blob)})


def test_pin_always_ecdh_key_is_refused_by_tokend_not_the_card(memory_piv) -> None:
    """C_DeriveKey has no Init to attach a context login to: a PIN-always EC key is refused
    by tokend before any APDU, so nobody's login is dropped by a card refusal."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from tokend.model import Ecdh1DeriveParams, Mechanism
    from tokend.pkcs11 import CKD, CKM

    slot = memory_piv.extras["slot"]
    with Client(memory_piv.socket) as client, Client(memory_piv.socket) as other:
        session = client.open_session(slot, rw=True)
        client.login(session, PIN)
        client.call(
            "tokend_GenerateKeyPair",
            {"h_session": session, "key_slot": "9d", "algorithm": "p256", "pin_policy": "always"},
        )
        key = private_key(client, session, ID_9D)
        other_session = logged_in_session(other, slot)
        peer = ec.generate_private_key(ec.SECP256R1()).public_key()
        point = peer.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        mech = Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, point))
        with pytest.raises(UserNotLoggedInError):
            client.derive(session, key, mech)
        assert _session_state(client, session) == "CKS_RW_USER_FUNCTIONS"
        assert _session_state(other, other_session) == "CKS_RO_USER_FUNCTIONS"
