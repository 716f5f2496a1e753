"""Secrets are wiped and never logged (docs/disconnect.md §4, issue 16).

Wiping cannot be seen from outside the daemon, so these tests hold on to the very buffers
the daemon uses (a spy that passes every call through to the real code, or a reference
read on the daemon's own loop) and check them after use. The log tests format every record
in full — message, arguments, traceback, stack — at DEBUG and at the default level."""

from __future__ import annotations

import base64
import logging

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.helpers import ID_9A, ID_9C, ID_9D, PIN, logged_in_session, pkcs1_blob, private_key
from tests.test_promises_disconnect import reset_seen
from tokend.client import Client, ProtocolFailure
from tokend.errors import DeviceRemovedError, PinIncorrectError, TokendError, UserNotLoggedInError
from tokend.protocol import b64, unb64

WRONG_PIN = "987654"


def _zeroed(buf: bytearray) -> bool:
    return len(buf) > 0 and not any(buf)


@pytest.fixture
def login_spy(memory_piv):  # type: ignore[no-untyped-def]
    """Every PIN buffer the API hands to `Engine.login` (the call itself is unchanged)."""
    engine = memory_piv.daemon.engine
    real = engine.login
    seen: list[bytearray] = []

    async def spy(app, handle, user_type, pin):  # type: ignore[no-untyped-def]
        seen.append(pin)
        return await real(app, handle, user_type, pin)

    engine.login = spy
    yield seen
    engine.login = real


@pytest.fixture
def pin_blocks(monkeypatch):  # type: ignore[no-untyped-def]
    """Every 8-byte VERIFY block the PIV driver builds (the real `pad_pin`, recorded)."""
    from tokend.drivers import piv as piv_driver

    real = piv_driver.pad_pin
    blocks: list[bytearray] = []

    def recording_pad_pin(pin, **kwargs):  # type: ignore[no-untyped-def]
        block = real(pin, **kwargs)
        blocks.append(block)
        return block

    monkeypatch.setattr(piv_driver, "pad_pin", recording_pad_pin)
    return blocks


def _operation_pin(running, session: int) -> bytearray:  # type: ignore[no-untyped-def]
    """The context PIN kept by the pending operation of ``session`` (read on the loop)."""

    async def read() -> bytearray:
        operation = running.daemon.engine._sessions[session].operation
        assert operation is not None and operation.context_pin is not None
        return operation.context_pin

    return running.run(read())


def _session_secret(running, obj_handle: int) -> bytearray:  # type: ignore[no-untyped-def]
    async def read() -> bytearray:
        return running.daemon.engine._session_objects[obj_handle].secret

    return running.run(read())


# --- PIN buffers and the VERIFY block ------------------------------------------------------------


def test_pin_buffers_are_zero_after_login_right_or_wrong(memory_piv, login_spy) -> None:
    with Client(memory_piv.socket) as client:
        session = client.open_session(memory_piv.extras["slot"])
        with pytest.raises(PinIncorrectError):
            client.login(session, WRONG_PIN)
        client.login(session, PIN)
    assert [bytes(b) for b in login_spy] == [bytes(6), bytes(6)]


def test_verify_blocks_are_zero_after_use(memory_piv, pin_blocks) -> None:
    with Client(memory_piv.socket) as client:
        session = client.open_session(memory_piv.extras["slot"])
        with pytest.raises(PinIncorrectError):
            client.login(session, WRONG_PIN)
        client.login(session, PIN)
        key = private_key(client, session, ID_9C)
        client.sign(session, key, "CKM_ECDSA", b"\x11" * 32, context_pin=PIN)
    # Wrong PIN, right PIN, the context login and the VERIFY right before the signature.
    assert len(pin_blocks) == 4
    assert all(_zeroed(block) for block in pin_blocks), [b.hex() for b in pin_blocks]


def _sign_init_with_context_pin(client: Client, session: int, key: int) -> None:
    mech = {"mechanism": "CKM_ECDSA"}
    client.call("C_SignInit", {"h_session": session, "p_mechanism": mech, "h_key": key})
    client.call(
        "C_Login", {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": PIN}
    )


@pytest.mark.parametrize(
    "ending", ["operation", "logout", "close", "removal", "disconnect", "card reset"]
)
def test_a_kept_context_pin_is_zeroed_when_its_operation_ends(memory_piv, ending: str) -> None:
    plug = memory_piv.extras["plug"]
    reset = reset_seen(plug)
    client = Client(memory_piv.socket)
    with client:
        session = logged_in_session(client, memory_piv.extras["slot"])
        key = private_key(client, session, ID_9C)
        _sign_init_with_context_pin(client, session, key)
        kept = _operation_pin(memory_piv, session)
        assert bytes(kept) == PIN.encode()  # the reference really is the kept PIN
        if ending == "operation":
            client.call("C_Sign", {"h_session": session, "p_data": b64(b"\x11" * 32)})
        elif ending == "logout":
            client.logout(session)
        elif ending == "close":
            client.close_session(session)
        elif ending == "removal":
            client.subscribe()
            plug.remove()
            assert client.next_event(timeout=5)["event"] == "left"
        elif ending == "card reset":
            # Another program resets the card: the login the PIN was given under is lost
            # (noticed by the next command, here from another session of the client).
            blob, _ = pkcs1_blob(memory_piv.extras["demo"].encryption_public_key)
            decrypt_key = private_key(client, session, ID_9D)
            other = client.open_session(memory_piv.extras["slot"])
            plug.reset_by_other_program()
            with pytest.raises(UserNotLoggedInError):
                client.decrypt(other, decrypt_key, "CKM_RSA_PKCS", blob)
            # (the signature is still pending: only the lost login can have zeroed the PIN)
    if ending == "disconnect":
        # The client left with the operation pending; its last-logout card reset comes
        # after its sessions are dropped, so once the card has seen it, the PIN is gone.
        assert reset.wait(5)
    assert _zeroed(kept), f"the context PIN survived the {ending}"


def test_buffered_data_to_sign_is_zeroed_when_the_token_leaves(memory_piv) -> None:
    plug = memory_piv.extras["plug"]
    with Client(memory_piv.socket) as client:
        session = logged_in_session(client, memory_piv.extras["slot"])
        key = private_key(client, session, ID_9C)
        mech = {"mechanism": "CKM_ECDSA_SHA256"}
        client.call("C_SignInit", {"h_session": session, "p_mechanism": mech, "h_key": key})
        client.call("C_SignUpdate", {"h_session": session, "p_part": b64(b"confidential")})

        async def read() -> bytearray:
            operation = memory_piv.daemon.engine._sessions[session].operation
            assert operation is not None
            return operation.buffer

        buffered = memory_piv.run(read())
        assert bytes(buffered) == b"confidential"
        client.subscribe()
        plug.remove()
        assert client.next_event(timeout=5)["event"] == "left"
        assert _zeroed(buffered)


# --- derived ECDH secrets ---------------------------------------------------------------


def _derive(client: Client, session: int, key: int) -> int:
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = peer.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    mech = {
        "mechanism": "CKM_ECDH1_DERIVE",
        "parameter": {"kdf": "CKD_NULL", "public_data": b64(point)},
    }
    answer = client.call(
        "C_DeriveKey",
        {"h_session": session, "p_mechanism": mech, "h_base_key": key, "p_template": {}},
    )
    return int(answer["h_key"])


@pytest.mark.parametrize("ending", ["removal", "close", "destroy", "disconnect"])
def test_a_derived_ecdh_secret_is_zeroed_when_it_ends(memory_piv, ending: str) -> None:
    plug = memory_piv.extras["plug"]
    reset = reset_seen(plug)
    with Client(memory_piv.socket) as client:
        session = logged_in_session(client, memory_piv.extras["slot"])
        obj = _derive(client, session, private_key(client, session, ID_9A))
        secret = _session_secret(memory_piv, obj)
        value = client.get_attributes(session, obj, ["CKA_VALUE"])["CKA_VALUE"]
        assert bytes(secret) == unb64(value) and any(secret)  # the reference is the secret
        if ending == "removal":
            client.subscribe()
            plug.remove()
            assert client.next_event(timeout=5)["event"] == "left"
            with pytest.raises(DeviceRemovedError):
                client.get_attributes(session, obj, ["CKA_VALUE"])
        elif ending == "close":
            client.close_session(session)
        elif ending == "destroy":
            client.call("C_DestroyObject", {"h_session": session, "h_object": obj})
    if ending == "disconnect":
        # The client left (EOF): its sessions close, then its last-logout card reset.
        assert reset.wait(5)
    assert _zeroed(secret), f"the ECDH secret survived the {ending}"


# --- logs ------------------------------------------------------------------------------


class FullText(logging.Handler):
    """Every record as an operator would see it: message, arguments, traceback, stack."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(self.format(record))
        self.texts.append(repr(record.args))
        self.texts.append(repr(record.__dict__))


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
def test_no_pin_and_no_plaintext_in_any_log_text(memory_piv, level: int) -> None:
    demo, plug, card = (memory_piv.extras[k] for k in ("demo", "plug", "card"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    handler = FullText()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        with Client(memory_piv.socket) as client:
            session = client.open_session(memory_piv.extras["slot"])
            with pytest.raises(PinIncorrectError):
                client.login(session, WRONG_PIN)
            client.login(session, PIN)
            key = private_key(client, session, ID_9D)
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
            sig = private_key(client, session, ID_9C)
            client.sign(session, sig, "CKM_ECDSA", b"\x11" * 32, context_pin=PIN)
            # PINs in requests that fail in every way the daemon can refuse them.
            bad_requests = [
                ("C_Nonsense", {"p_pin": PIN}),
                ("C_Login", {"h_session": session, "p_pin": int(PIN)}),
                ("C_Login", {"h_session": session, "p_pin": [PIN]}),
                ("C_Login", {"h_session": "x" + PIN, "p_pin": PIN}),
                ("C_Login", {"h_session": session, "user_type": PIN, "p_pin": PIN}),
            ]
            for method, params in bad_requests:
                with pytest.raises((ProtocolFailure, TokendError)):
                    client.call(method, params)  # type: ignore[arg-type]
            for line in (
                '{"jsonrpc":"2.0","id":9,"method":"C_Login","params":{"p_pin":"' + PIN,
                '{"jsonrpc":"2.0","id":{"p_pin":"' + PIN + '"},"method":"C_Login"}',
                '{"jsonrpc":"' + PIN + '","id":9,"method":"C_Login"}',
                '{"jsonrpc":"2.0","id":9,"method":"' + PIN + '"}',
                '{"jsonrpc":"2.0","id":9,"method":"C_Login","params":["' + PIN + '"]}',
            ):
                with pytest.raises(ProtocolFailure):
                    _raw(memory_piv.socket, line)
            # A login cut short by a card pulled during the VERIFY (the error paths log).
            fresh = Client(memory_piv.socket)
            with fresh:
                s2 = fresh.open_session(memory_piv.extras["slot"])
                plug.on_transmit.append(
                    lambda apdu: plug.remove() if apdu[1] == 0x20 and len(apdu) > 5 else None
                )
                with pytest.raises(TokendError):
                    fresh.login(s2, WRONG_PIN)
                plug.on_transmit.clear()
            plug.insert(card)
            memory_piv.settle()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = "\n".join(handler.texts)
    assert any(f"{logging.getLevelName(level)} " in t for t in handler.texts)  # logs were made
    for pin in (PIN, WRONG_PIN):
        for form in (pin, pin.encode().hex(), b64(pin.encode()), repr(pin.encode())):
            assert form not in text, f"{form!r} in the logs"
    for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]):
        assert form not in text
    assert unb64(b64(secret)) == secret


def _raw(sock_path, line: str) -> None:  # type: ignore[no-untyped-def]
    """Send one malformed line; raise ProtocolFailure with the daemon's error answer."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock_path))
        s.sendall(line.encode() + b"\n")
        answer = json.loads(s.makefile("rb").readline())
    assert "error" in answer, answer
    raise ProtocolFailure(answer["error"]["code"], answer["error"]["message"])


def test_a_context_pin_kept_for_a_decryption_is_zeroed_after_it(memory_piv) -> None:
    from tests.test_promises_login import _pin_always_decryption_key

    with Client(memory_piv.socket) as client:
        session = client.open_session(memory_piv.extras["slot"], rw=True)
        client.login(session, PIN)
        key, public = _pin_always_decryption_key(client, session)
        blob, secret = pkcs1_blob(public)
        mech = {"mechanism": "CKM_RSA_PKCS"}
        client.call("C_DecryptInit", {"h_session": session, "p_mechanism": mech, "h_key": key})
        client.call(
            "C_Login", {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": PIN}
        )
        kept = _operation_pin(memory_piv, session)
        assert bytes(kept) == PIN.encode()
        answer = client.call("C_Decrypt", {"h_session": session, "p_encrypted_data": b64(blob)})
        assert unb64(answer["data"]) == secret
        assert _zeroed(kept), "the context PIN survived the decryption"
