"""PINs, keys and plaintext never reach the logs, at any level (DEBUG included)."""

from __future__ import annotations

import base64
import logging

import pytest

from tests.helpers import ID_9C, ID_9D, PIN, logged_in_session, pkcs1_blob, private_key
from tokend.client import Client, ProtocolFailure
from tokend.errors import PinIncorrectError


def test_debug_logs_carry_no_pin_and_no_plaintext(memory_piv, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    demo = memory_piv.extras["demo"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    wrong_pin = "987654"
    with Client(memory_piv.socket) as client:
        session = client.open_session(0)
        with pytest.raises(PinIncorrectError):
            client.login(session, wrong_pin)
        session = logged_in_session(client)
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
        sig_key = private_key(client, session, ID_9C)
        client.sign(session, sig_key, "CKM_ECDSA", b"\x11" * 32, context_pin=PIN)
        with pytest.raises(ProtocolFailure):  # an unknown method with a PIN in its params
            client.call("C_Nonsense", {"p_pin": PIN})
    # The whole record as a handler would write it (traceback and stack included), and the
    # repr of its arguments: getMessage() alone misses both.
    full = logging.Formatter("%(message)s")
    text = "\n".join(full.format(r) + repr(r.args) for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)  # DEBUG really was on
    for needle in (PIN, wrong_pin):
        assert needle not in text
        assert needle.encode().hex() not in text.lower()
    for form in (secret.hex(), base64.b64encode(secret).decode()):
        assert form not in text


def test_ble_debug_logs_carry_no_pin_and_no_plaintext(ble_piv, caplog) -> None:  # type: ignore[no-untyped-def]
    """Over BLE the PIN crosses bleak (VERIFY fragments) and the decrypted key comes back in
    GATT notifications: neither bleak's nor dbus-fast's DEBUG logging may show them."""
    caplog.set_level(logging.DEBUG)
    demo, slot = ble_piv.extras["demo"], ble_piv.extras["slot"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(ble_piv.socket) as client:
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    pin_hex = PIN.encode().hex()
    for form in (PIN, pin_hex, str(list(PIN.encode()))[1:-1], secret.hex()):
        assert form not in text.lower()
    assert repr(secret)[2:-1] not in text
