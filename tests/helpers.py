"""Small helpers for end-to-end tests: what a mail client does through the socket."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tokend.client import Client
from tokend.model import Mechanism, OaepParams
from tokend.pkcs11 import CKA, CKG, CKM

PIN = "123456"
#: CKA_ID of PIV slots (ykcs11 numbering): 9A=1, 9C=2, 9D=3, 9E=4, 82..95=5..24
ID_9A, ID_9C, ID_9D, ID_82 = b"\x01", b"\x02", b"\x03", b"\x05"

OAEP_SHA1 = Mechanism(CKM.CKM_RSA_PKCS_OAEP, OaepParams(CKM.CKM_SHA_1, CKG.CKG_MGF1_SHA1))
OAEP_SHA256 = Mechanism(CKM.CKM_RSA_PKCS_OAEP, OaepParams(CKM.CKM_SHA256, CKG.CKG_MGF1_SHA256))


def private_key(client: Client, session: int, key_id: bytes) -> int:
    handles = client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: key_id})
    assert len(handles) == 1, f"expected one private key with id {key_id.hex()}"
    return handles[0]


def logged_in_session(client: Client, slot: int = 0) -> int:
    session = client.open_session(slot)
    client.login(session, PIN)
    return session


def pkcs1_blob(public_key, secret: bytes | None = None) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """A CMS key-transport blob as a sender's mail client makes it: (ciphertext, key)."""
    secret = secret or os.urandom(32)
    return public_key.encrypt(secret, padding.PKCS1v15()), secret


def oaep_blob(public_key, algorithm: hashes.HashAlgorithm) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    secret = os.urandom(32)
    pad = padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None)
    return public_key.encrypt(secret, pad), secret


#: How long to wait for the events of a re-insertion or swap. Through pcscd each is seen
#: only at a reader poll, and on a loaded machine a swap's two events once took over 5 s
#: (the Client default); this is a bound against a hang, not a latency claim.
SWAP_EVENT_WAIT = 15.0
