"""Keys with CKA_ALWAYS_AUTHENTICATE in a vendor module (SoftHSM2 here; a PIV token's
signing key 9C behind OpenSC's or a vendor's module is one): the PIN goes with each
operation, C_Login(CKU_CONTEXT_SPECIFIC) between Init and the operation, through the
daemon's socket the way a mail client signs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from tests.conftest import RunningDaemon, start_daemon, stop_daemon
from tests.helpers import OAEP_SHA1, oaep_blob, pkcs1_blob
from tokend.client import Client
from tokend.errors import PinIncorrectError, UserNotLoggedInError
from tokend.pkcs11 import CKA
from tokend.simulators.softhsm import SOFTHSM_MODULE, TEST_PIN, SoftHsm, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

LABEL = "always"
RSA_ID, EC_ID = b"\x21", b"\x22"


def _put_keys() -> tuple[rsa.RSAPublicKey, ec.EllipticCurvePublicKey]:
    """An RSA-2048 and a P-256 key pair generated on the token, each private key with
    CKA_ALWAYS_AUTHENTICATE; their public keys for checking the results."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, MechanismFlag
    from pkcs11.util.ec import encode_named_curve_parameters

    lib = pkcs11.lib(str(SOFTHSM_MODULE))
    try:
        token = lib.get_token(token_label=LABEL)
        with token.open(rw=True, user_pin=TEST_PIN) as session:
            always = {Attribute.ALWAYS_AUTHENTICATE: True, Attribute.SENSITIVE: True}
            pub, _ = session.generate_keypair(
                KeyType.RSA, 2048, id=RSA_ID, label="rsa always", store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.DECRYPT
                | MechanismFlag.VERIFY | MechanismFlag.ENCRYPT,
                private_template=always,
            )  # fmt: skip
            rsa_public = rsa.RSAPublicNumbers(
                int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                int.from_bytes(pub[Attribute.MODULUS], "big"),
            ).public_key()
            params = session.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            ec_pub, _ = params.generate_keypair(
                store=True, id=EC_ID, label="ec always",
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                private_template=always,
            )  # fmt: skip
            from asn1crypto.core import OctetString

            point = OctetString.load(ec_pub[Attribute.EC_POINT]).native
            ec_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    finally:
        pkcs11.unload(str(SOFTHSM_MODULE))
    return rsa_public, ec_public


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch, sock_path: Path) -> Iterator[RunningDaemon]:
    from tests.test_module_softhsm import wait_slots
    from tokend.drivers.pkcs11_module import ModuleConfig, ModuleWatcher

    work = Path(tempfile.mkdtemp(prefix="tokend-hsm-"))
    try:
        hsm = SoftHsm.create(work)
        monkeypatch.setenv("SOFTHSM2_CONF", str(hsm.conf))
        hsm.init_token(LABEL)
        rsa_public, ec_public = _put_keys()
        running = start_daemon(sock_path, [ModuleWatcher(ModuleConfig(SOFTHSM_MODULE, "softhsm"))])
        try:
            wait_slots(running, 1)
            running.extras.update(rsa=rsa_public, ec=ec_public)
            yield running
        finally:
            stop_daemon(running)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _session(client: Client) -> int:
    slot = client.slot_list(token_present=True)[0]
    session = client.open_session(slot)
    client.login(session, TEST_PIN)
    return session


def _key(client: Client, session: int, key_id: bytes) -> int:
    (key,) = client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: key_id})
    attrs = client.get_attributes(session, key, [CKA.CKA_ALWAYS_AUTHENTICATE])
    assert attrs["CKA_ALWAYS_AUTHENTICATE"] is True
    return key


def test_decrypts_with_the_pin_given_for_the_operation(daemon) -> None:  # type: ignore[no-untyped-def]
    with Client(daemon.socket) as client:
        session = _session(client)
        key = _key(client, session, RSA_ID)
        blob, secret = pkcs1_blob(daemon.extras["rsa"])
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob, context_pin=TEST_PIN) == secret
        blob, secret = oaep_blob(daemon.extras["rsa"], hashes.SHA1())
        assert client.decrypt(session, key, OAEP_SHA1, blob, context_pin=TEST_PIN) == secret


def test_signs_with_the_pin_given_for_the_operation(daemon) -> None:  # type: ignore[no-untyped-def]
    digest = os.urandom(32)
    with Client(daemon.socket) as client:
        session = _session(client)
        key = _key(client, session, EC_ID)
        sig = client.sign(session, key, "CKM_ECDSA", digest, context_pin=TEST_PIN)
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        daemon.extras["ec"].verify(
            utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))
        )
        key = _key(client, session, RSA_ID)
        sig = client.sign(session, key, "CKM_SHA256_RSA_PKCS", b"mail", context_pin=TEST_PIN)
        daemon.extras["rsa"].verify(sig, b"mail", padding.PKCS1v15(), hashes.SHA256())


def test_without_the_pin_or_with_a_wrong_one_nothing_is_signed(daemon) -> None:  # type: ignore[no-untyped-def]
    digest = os.urandom(32)
    with Client(daemon.socket) as client:
        session = _session(client)
        key = _key(client, session, EC_ID)
        with pytest.raises(UserNotLoggedInError):
            client.sign(session, key, "CKM_ECDSA", digest)
        with pytest.raises(PinIncorrectError):
            client.sign(session, key, "CKM_ECDSA", digest, context_pin="999999")
        # as on a card, a wrong PIN ends the login (design §5): log in again, and signing
        # works (no operation was left active in the module's sessions)
        with pytest.raises(UserNotLoggedInError):
            client.sign(session, key, "CKM_ECDSA", digest, context_pin=TEST_PIN)
        client.login(session, TEST_PIN)
        assert len(client.sign(session, key, "CKM_ECDSA", digest, context_pin=TEST_PIN)) == 64
