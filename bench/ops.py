"""The two measured operations — RSA-2048 decrypt (9D, CKM_RSA_PKCS) and P-256 sign (9C,
CKM_ECDSA over a SHA-256 digest) — on a demo PIV card, in-process through the driver or
through tokend's native socket. Each factory returns a zero-argument callable that does one
operation and checks nothing after the first call (checking costs time we do not measure).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from bench.common import PIN

#: CKA_ID of PIV slots as tokend numbers them (9C = 2, 9D = 3).
ID_9C, ID_9D = b"\x02", b"\x03"
DIGEST = hashlib.sha256(b"tokend bench message").digest()

Op = Callable[[], bytes]


@dataclass(frozen=True)
class Blob:
    """A PKCS#1 v1.5 key-transport blob for one card's 9D key, and its plaintext."""

    ciphertext: bytes
    secret: bytes


def rsa_blob(public_key: rsa.RSAPublicKey) -> Blob:
    secret = os.urandom(32)
    return Blob(public_key.encrypt(secret, padding.PKCS1v15()), secret)


def check_decrypt(out: bytes, blob: Blob) -> None:
    if out != blob.secret:
        raise AssertionError("decrypt returned the wrong plaintext")


def check_sign(signature: bytes, public_key: ec.EllipticCurvePublicKey) -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    public_key.verify(encode_dss_signature(r, s), DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --- (a) in-process, through the driver ---------------------------------------------------


@dataclass
class InProcessCard:
    decrypt: Op
    sign: Op
    sign_once: Op
    close: Callable[[], None]


def in_process_card() -> InProcessCard:
    """A demo card in an in-process reader, opened with `PivToken.open`, logged in."""
    from tokend.drivers.piv import PivToken
    from tokend.model import Mechanism
    from tokend.pkcs11 import CKM
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    demo = provision_demo(card, key_agreement=True)
    reader = MemoryReader("Bench In-Process Reader")
    reader.insert(card)
    token = PivToken.open(reader.connect())
    assert token is not None
    token.login(bytearray(PIN.encode()))
    blob = rsa_blob(demo.encryption_public_key)
    pkcs1 = Mechanism(CKM.CKM_RSA_PKCS)
    ecdsa = Mechanism(CKM.CKM_ECDSA)

    def decrypt() -> bytes:
        return token.decrypt("priv:9d", pkcs1, blob.ciphertext)

    def sign() -> bytes:
        # 9C is PIN-always. The same driver calls the daemon makes for one signature:
        # C_Login(CKU_CONTEXT_SPECIFIC) checks the PIN on the card, C_Sign verifies it again
        # right before signing (docs/protocol.md), so (b) - (a) is tokend's own cost only.
        token.login(bytearray(PIN.encode()))
        return token.sign("priv:9c", ecdsa, DIGEST, context_pin=bytearray(PIN.encode()))

    def sign_once() -> bytes:
        # 9A: a PIN-once key, the call shape of decryption (Init + one card operation).
        return token.sign("priv:9a", ecdsa, DIGEST)

    check_decrypt(decrypt(), blob)
    check_sign(sign(), demo.signing_public_key)
    check_sign(sign_once(), demo.key_agreement_public_key)
    return InProcessCard(decrypt, sign, sign_once, token.close)


# --- (b) through the native socket --------------------------------------------------------


@dataclass
class SocketSession:
    client: object
    session: int
    decrypt: Op
    sign: Op
    sign_once: Op
    decrypt_key: int
    blob: Blob

    def close(self) -> None:
        self.client.close()  # type: ignore[attr-defined]


def socket_session(sock: Path, slot: int, cert_dir: Path, *, check: bool = True) -> SocketSession:
    """A logged-in session on ``slot`` through tokend's socket, with the card's own
    certificates from ``cert_dir`` (written by ``--export-dir``)."""
    from tokend.client import Client
    from tokend.pkcs11 import CKA

    client = Client(sock)
    session = client.open_session(slot)
    client.login(session, PIN)

    def key(cka_id: bytes) -> int:
        handles = client.find_objects(
            session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: cka_id}
        )
        assert len(handles) == 1
        return handles[0]

    k9d, k9c, k9a = key(ID_9D), key(ID_9C), key(b"\x01")
    enc_public = load_cert(cert_dir / "encryption.pem").public_key()
    sig_public = load_cert(cert_dir / "signing.pem").public_key()
    assert isinstance(enc_public, rsa.RSAPublicKey)
    assert isinstance(sig_public, ec.EllipticCurvePublicKey)
    blob = rsa_blob(enc_public)

    def decrypt() -> bytes:
        return client.decrypt(session, k9d, "CKM_RSA_PKCS", blob.ciphertext)

    def sign() -> bytes:
        return client.sign(session, k9c, "CKM_ECDSA", DIGEST, context_pin=PIN)

    def sign_once() -> bytes:
        return client.sign(session, k9a, "CKM_ECDSA", DIGEST)

    if check:
        check_decrypt(decrypt(), blob)
        check_sign(sign(), sig_public)
    return SocketSession(client, session, decrypt, sign, sign_once, k9d, blob)


def rpc_floor(ss: SocketSession) -> Callable[[], object]:
    """One round trip that never touches the card (C_GetSessionInfo): the socket + JSON +
    dispatch cost of a single call."""
    client = ss.client

    def call() -> object:
        return client.call("C_GetSessionInfo", {"h_session": ss.session})  # type: ignore[attr-defined]

    return call


def pipelined_decrypt(ss: SocketSession) -> Op:
    """C_DecryptInit and C_Decrypt written in one go, both answers read after: what a client
    that pipelines (the protocol answers a connection's requests in order) would pay."""
    import json

    from tokend.protocol import b64, encode_request

    client = ss.client
    sock = client._sock  # type: ignore[attr-defined]
    rfile = client._file  # type: ignore[attr-defined]
    ids = iter(range(10**6, 10**9))
    key = ss.decrypt_key
    blob = ss.blob

    def decrypt() -> bytes:
        a, b = next(ids), next(ids)
        sock.sendall(
            encode_request(
                a,
                "C_DecryptInit",
                {"h_session": ss.session, "p_mechanism": "CKM_RSA_PKCS", "h_key": key},
            )
            + encode_request(
                b, "C_Decrypt", {"h_session": ss.session, "p_encrypted_data": b64(blob.ciphertext)}
            )
        )
        first = json.loads(rfile.readline())
        second = json.loads(rfile.readline())
        if "error" in first or "error" in second:
            raise RuntimeError(f"pipelined decrypt failed: {first} {second}")
        from tokend.protocol import unb64

        return unb64(second["result"]["data"])

    check_decrypt(decrypt(), blob)
    return decrypt
