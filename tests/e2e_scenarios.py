"""End to end through the socket, as a mail client would: the demo PIV card, the real
daemon, the real client library. Each transport's module (test_e2e_<transport>.py) runs
these scenarios with its own ``piv`` fixture."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.helpers import (
    ID_9A,
    ID_9C,
    ID_9D,
    ID_82,
    OAEP_SHA1,
    OAEP_SHA256,
    PIN,
    logged_in_session,
    oaep_blob,
    pkcs1_blob,
    private_key,
)
from tokend.client import Client
from tokend.errors import (
    KeyFunctionNotPermittedError,
    KeyHandleInvalidError,
    PinIncorrectError,
    UserNotLoggedInError,
)
from tokend.model import Ecdh1DeriveParams, Mechanism
from tokend.pkcs11 import CKA, CKD, CKM
from tokend.protocol import unb64


def test_lists_the_token_and_its_certificates(piv) -> None:
    demo = piv.extras["demo"]
    with Client(piv.socket) as client:
        assert client.slot_list(token_present=True) == [piv.extras["slot"]]
        info = client.token_info(piv.extras["slot"])
        assert info["token_serial"] == demo.guid.hex()
        session = client.open_session(piv.extras["slot"])
        certs = client.find_objects(session, {CKA.CKA_CLASS: "CKO_CERTIFICATE"})
        ders = {
            unb64(client.get_attributes(session, h, [CKA.CKA_VALUE])["CKA_VALUE"]) for h in certs
        }
        for cert in (demo.encryption_cert, demo.signing_cert, demo.retired_cert):
            assert cert.public_bytes(Encoding.DER) in ders
        # Private keys stay hidden until login.
        assert client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []


def test_decrypts_pkcs1_v15_key_transport(piv) -> None:
    demo = piv.extras["demo"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as client:
        session = logged_in_session(client, piv.extras["slot"])
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret


@pytest.mark.parametrize(
    ("mechanism", "algorithm"),
    [(OAEP_SHA1, hashes.SHA1()), (OAEP_SHA256, hashes.SHA256())],
    ids=["oaep-sha1", "oaep-sha256"],
)
def test_decrypts_oaep(piv, mechanism, algorithm) -> None:
    demo = piv.extras["demo"]
    blob, secret = oaep_blob(demo.encryption_public_key, algorithm)
    with Client(piv.socket) as client:
        session = logged_in_session(client, piv.extras["slot"])
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, mechanism, blob) == secret


def test_retired_key_still_decrypts_but_never_signs(piv) -> None:
    demo = piv.extras["demo"]
    blob, secret = pkcs1_blob(demo.retired_public_key)
    with Client(piv.socket) as client:
        session = logged_in_session(client, piv.extras["slot"])
        key = private_key(client, session, ID_82)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
        with pytest.raises(KeyFunctionNotPermittedError):
            client.sign(session, key, "CKM_SHA256_RSA_PKCS", b"mail")


def test_signature_verifies_with_the_certificate(piv) -> None:
    demo = piv.extras["demo"]
    message = b"From: demo@example.org\r\n\r\nhello"
    with Client(piv.socket) as client:
        session = logged_in_session(client, piv.extras["slot"])
        key = private_key(client, session, ID_9C)
        attrs = client.get_attributes(session, key, [CKA.CKA_ALWAYS_AUTHENTICATE])
        assert attrs["CKA_ALWAYS_AUTHENTICATE"] is True
        # 9C is PIN-always: without the context-specific login the signature is refused.
        with pytest.raises(UserNotLoggedInError):
            client.sign(session, key, "CKM_ECDSA", hashlib.sha256(message).digest())
        raw = client.sign(
            session, key, "CKM_ECDSA", hashlib.sha256(message).digest(), context_pin=PIN
        )
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    demo.signing_public_key.verify(
        utils.encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256())
    )


def test_ecdh_matches_local_agreement(piv) -> None:
    demo = piv.extras["demo"]
    ec_public = demo.key_agreement_public_key
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    expected = ephemeral.exchange(ec.ECDH(), ec_public)
    with Client(piv.socket) as client:
        session = logged_in_session(client, piv.extras["slot"])
        key = private_key(client, session, ID_9A)
        mech = Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, point))
        assert client.derive(session, key, mech) == expected


def test_wrong_pin_reports_retries_and_is_not_retried(piv) -> None:
    with Client(piv.socket) as client:
        session = client.open_session(piv.extras["slot"])
        with pytest.raises(PinIncorrectError) as first:
            client.login(session, "000000")
        with pytest.raises(PinIncorrectError) as second:
            client.login(session, "000000")
        assert first.value.retries == 2
        assert second.value.retries == 1  # exactly one try used per call
        client.login(session, PIN)  # a right PIN resets the counter...
        session2 = client.open_session(piv.extras["slot"])
        assert client.call("C_GetSessionInfo", {"h_session": session2})["info"]["state"] == (
            "CKS_RO_USER_FUNCTIONS"
        )
        client.logout(session)
        with pytest.raises(PinIncorrectError) as after_reset:
            client.login(session, "000000")
        assert after_reset.value.retries == 2  # ...so a wrong one leaves 2 of 3 again
        client.login(session, PIN)


def test_client_b_cannot_use_the_login_of_client_a(piv) -> None:
    demo = piv.extras["demo"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as a, Client(piv.socket) as b:
        session_a = logged_in_session(a, piv.extras["slot"])
        key = private_key(a, session_a, ID_9D)
        assert a.decrypt(session_a, key, "CKM_RSA_PKCS", blob) == secret
        # The card is verified now, but B never logged in: tokend refuses on its own.
        session_b = b.open_session(piv.extras["slot"])
        assert b.find_objects(session_b, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []
        # A's key handle answers B exactly as a handle that does not exist (issue 9):
        # handles tell nothing about other connections.
        with pytest.raises(KeyHandleInvalidError) as foreign:
            b.decrypt(session_b, key, "CKM_RSA_PKCS", blob)
        with pytest.raises(KeyHandleInvalidError) as missing:
            b.decrypt(session_b, 999_999, "CKM_RSA_PKCS", blob)
        assert str(foreign.value).replace(str(key), "N") == str(missing.value).replace(
            "999999", "N"
        )
        # A still works after B's refusal.
        assert a.decrypt(session_a, key, "CKM_RSA_PKCS", blob) == secret
