"""`tokend.mechanisms.KeyPairToken` for a card that pads and strips PKCS#1 v1.5 itself
(IsoApplet-style, what a SIM's PKI applet driver builds on): the host offers only what such
a card can do and never pads twice. The "card" is a `cryptography` key doing exactly the
card-side operations; PIV's raw-RSA path is covered by tests/test_driver_piv.py."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tokend.errors import MechanismInvalidError, UserNotLoggedInError
from tokend.mechanisms import KeyPair, KeyPairToken, key_pair_mechanisms, key_pair_objects
from tokend.model import Mechanism, OaepParams, ObjectKey, ObjectKind
from tokend.pkcs11 import CKA, CKM

RSA_KEY = rsa.generate_private_key(65537, 2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


class PaddingCard(KeyPairToken):
    card_pads_pkcs1 = True

    def __init__(self) -> None:
        self.sections: list[bytearray | None] = []
        self._pairs = {
            1: KeyPair(
                1, "01", b"\x01", "mail key", RSA_KEY.public_key(), can_sign=True, can_decrypt=True
            ),
            2: KeyPair(
                2,
                "02",
                b"\x02",
                "pin-always",
                RSA_KEY.public_key(),
                can_sign=True,
                always_authenticate=True,
            ),
            3: KeyPair(3, "03", b"\x03", "ec", EC_KEY.public_key(), can_sign=True),
        }

    def key_pairs(self) -> Mapping[int, KeyPair]:
        return self._pairs

    @contextmanager
    def _card_section(self, context_pin: bytearray | None) -> Iterator[None]:
        self.sections.append(context_pin)
        yield

    def _card_pkcs1_decrypt(self, pair: KeyPair, ciphertext: bytes) -> bytes:
        return RSA_KEY.decrypt(ciphertext, padding.PKCS1v15())

    def _card_pkcs1_sign(self, pair: KeyPair, digest_info: bytes) -> bytes:
        # what the card does: type-1 pad the DigestInfo and exponentiate
        k = 256
        block = b"\x00\x01" + b"\xff" * (k - 3 - len(digest_info)) + b"\x00" + digest_info
        n = RSA_KEY.public_key().public_numbers().n
        d = RSA_KEY.private_numbers().d
        return pow(int.from_bytes(block, "big"), d, n).to_bytes(k, "big")

    def _card_ecdsa(self, pair: KeyPair, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        return EC_KEY.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_a_padding_card_decrypts_and_signs_through_the_shared_code() -> None:
    card = PaddingCard()
    priv = ObjectKey(ObjectKind.PRIVATE_KEY, 1)
    ct = RSA_KEY.public_key().encrypt(b"content key", padding.PKCS1v15())
    assert card.decrypt(priv, Mechanism(CKM.CKM_RSA_PKCS), ct) == b"content key"
    sig = card.sign("priv:01", Mechanism(CKM.CKM_SHA256_RSA_PKCS), b"mail")
    RSA_KEY.public_key().verify(sig, b"mail", padding.PKCS1v15(), hashes.SHA256())
    raw = card.sign("priv:03", Mechanism(CKM.CKM_ECDSA_SHA256), b"mail")
    assert len(raw) == 64


def test_a_padding_card_refuses_what_it_cannot_do() -> None:
    card = PaddingCard()
    ct = RSA_KEY.public_key().encrypt(
        b"x", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    )
    for mech in (CKM.CKM_RSA_PKCS_OAEP, CKM.CKM_RSA_X_509):
        with pytest.raises(MechanismInvalidError):
            card.decrypt("priv:01", Mechanism(mech, OaepParams()), ct)
    with pytest.raises(MechanismInvalidError):
        card.sign("priv:01", Mechanism(CKM.CKM_SHA256_RSA_PKCS_PSS), b"mail")
    with pytest.raises(UserNotLoggedInError):  # never relies on the card to refuse
        card.sign("priv:02", Mechanism(CKM.CKM_SHA256_RSA_PKCS), b"mail")
    assert card.sections == []  # nothing reached the card
    offered = {m.mechanism for m in key_pair_mechanisms(rsa_max=2048, raw_rsa=False, ecdh=False)}
    assert CKM.CKM_RSA_PKCS_OAEP not in offered and CKM.CKM_RSA_PKCS_PSS not in offered
    assert CKM.CKM_SHA256_RSA_PKCS in offered


def test_object_builder_shows_a_key_pair_without_certificate_as_two_objects() -> None:
    objects = key_pair_objects(PaddingCard().key_pairs()[1])
    assert [str(o.key) for o in objects] == ["priv:01", "pub:01"]  # no certificate here
    assert objects[0].attributes[CKA.CKA_DECRYPT] is True
