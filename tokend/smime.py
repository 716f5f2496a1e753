"""S/MIME decryption with a key that stays on the token: the CMS EnvelopedData is parsed
here, the content-encryption key is unwrapped by the token through the daemon, and the
content is decrypted locally (as a mail client does).

Recipients are matched against the token's certificates by issuer and serial number or by
subject key identifier — expired (retired) keys included, which is the point: old mail
stays readable. RSA key transport (PKCS#1 v1.5 and OAEP) is supported; key agreement (EC)
recipients are not yet.
"""

from __future__ import annotations

import base64
import email
import re
from collections.abc import Iterator
from dataclasses import dataclass

from asn1crypto import cms
from asn1crypto import x509 as ax509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tokend.client import Client
from tokend.model import Mechanism, OaepParams
from tokend.pkcs11 import CKA, CKG, CKM
from tokend.protocol import unb64

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 #]+)-----(.*?)-----END \1-----", re.S)
_HASHES = {
    "sha1": CKM.CKM_SHA_1,
    "sha256": CKM.CKM_SHA256,
    "sha384": CKM.CKM_SHA384,
    "sha512": CKM.CKM_SHA512,
}
_MGFS = {
    "sha1": CKG.CKG_MGF1_SHA1,
    "sha256": CKG.CKG_MGF1_SHA256,
    "sha384": CKG.CKG_MGF1_SHA384,
    "sha512": CKG.CKG_MGF1_SHA512,
}


class SmimeError(ValueError):
    """The message cannot be decrypted with this token; the text says why."""


@dataclass(frozen=True, slots=True)
class Recipient:
    """One RSA key-transport recipient of an EnvelopedData."""

    issuer: bytes | None  # DER Name
    serial: int | None
    key_identifier: bytes | None
    mechanism: Mechanism
    encrypted_key: bytes


def load(data: bytes) -> cms.ContentInfo:
    """CMS from DER, PEM (PKCS7/CMS) or an S/MIME message (application/pkcs7-mime)."""
    raw = data.lstrip()
    if raw[:1] != b"\x30":
        pem = _PEM.search(raw)
        if pem is not None:
            raw = base64.b64decode(b"".join(pem.group(2).split()))
        else:
            msg = email.message_from_bytes(data)
            part = next(
                (p for p in msg.walk() if "pkcs7-mime" in p.get_content_type()),
                None,
            )
            if part is None:
                raise SmimeError("not an S/MIME encrypted message (no application/pkcs7-mime)")
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                raise SmimeError("the S/MIME part has no body")
            raw = payload
    try:
        info = cms.ContentInfo.load(raw)
        content_type = info["content_type"].native
    except ValueError as exc:
        raise SmimeError(f"not a CMS message: {exc}") from None
    if content_type != "enveloped_data":
        raise SmimeError(f"CMS content is {content_type}, not enveloped (encrypted) data")
    return info


def recipients(info: cms.ContentInfo) -> Iterator[Recipient]:
    enveloped = info["content"]
    for ri in enveloped["recipient_infos"]:
        if ri.name != "ktri":
            continue
        ktri = ri.chosen
        rid = ktri["rid"]
        issuer = serial = ski = None
        if rid.name == "issuer_and_serial_number":
            issuer = rid.chosen["issuer"].dump()
            serial = rid.chosen["serial_number"].native
        else:
            ski = rid.chosen.native
        yield Recipient(
            issuer,
            serial,
            ski,
            _mechanism(ktri["key_encryption_algorithm"]),
            ktri["encrypted_key"].native,
        )


def _mechanism(alg: cms.KeyEncryptionAlgorithm) -> Mechanism:
    name = alg["algorithm"].native
    if name == "rsaes_pkcs1v15" or name == "rsa":
        return Mechanism(CKM.CKM_RSA_PKCS)
    if name == "rsaes_oaep":
        params = alg["parameters"]
        hash_name = params["hash_algorithm"]["algorithm"].native
        mgf_hash = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
        label = params["p_source_algorithm"]["parameters"].native or b""
        if hash_name not in _HASHES or mgf_hash not in _MGFS:
            raise SmimeError(f"OAEP with {hash_name}/{mgf_hash} is not supported")
        return Mechanism(
            CKM.CKM_RSA_PKCS_OAEP, OaepParams(_HASHES[hash_name], _MGFS[mgf_hash], label)
        )
    raise SmimeError(f"key encryption {name} is not supported")


def _token_keys(client: Client, session: int) -> list[tuple[ax509.Certificate, bytes]]:
    """(certificate, CKA_ID) of every certificate on the token."""
    out = []
    for handle in client.find_objects(session, {CKA.CKA_CLASS: "CKO_CERTIFICATE"}):
        attrs = client.get_attributes(session, handle, [CKA.CKA_VALUE, CKA.CKA_ID])
        if attrs.get("CKA_VALUE") and attrs.get("CKA_ID"):
            cert = ax509.Certificate.load(unb64(attrs["CKA_VALUE"]))
            out.append((cert, unb64(attrs["CKA_ID"])))
    return out


def _matches(recipient: Recipient, cert: ax509.Certificate) -> bool:
    tbs = cert["tbs_certificate"]
    if recipient.issuer is not None:
        return (
            tbs["issuer"].dump() == recipient.issuer
            and tbs["serial_number"].native == recipient.serial
        )
    return recipient.key_identifier in (cert.key_identifier, cert.public_key.sha1)


def decrypt(client: Client, session: int, data: bytes) -> bytes:
    """Decrypt an S/MIME / CMS enveloped message with a key on the token of ``session``
    (which must be logged in). Returns the content (usually a MIME entity)."""
    info = load(data)
    keys = _token_keys(client, session)
    tried = 0
    for recipient in recipients(info):
        for cert, key_id in keys:
            if not _matches(recipient, cert):
                continue
            handles = client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: key_id}
            )
            if not handles:
                continue
            tried += 1
            cek = bytearray(
                client.decrypt(session, handles[0], recipient.mechanism, recipient.encrypted_key)
            )
            try:
                return _decrypt_content(info["content"]["encrypted_content_info"], cek)
            finally:
                cek[:] = bytes(len(cek))
    if tried == 0:
        raise SmimeError("the message is not encrypted to any key on this token")
    raise SmimeError("no key on this token could decrypt the message")


def _decrypt_content(eci: cms.EncryptedContentInfo, cek: bytearray) -> bytes:
    alg = eci["content_encryption_algorithm"]
    cipher_name = alg.encryption_cipher
    if alg.encryption_mode != "cbc":
        raise SmimeError(f"content encryption {alg['algorithm'].native} is not supported")
    if cipher_name == "aes":
        algo: algorithms.AES | TripleDES = algorithms.AES(bytes(cek))
    elif cipher_name == "tripledes":
        algo = TripleDES(bytes(cek))
    else:
        raise SmimeError(f"content cipher {cipher_name} is not supported")
    if len(cek) != alg.key_length:
        raise SmimeError("the unwrapped key has the wrong length (wrong key?)")
    ciphertext = eci["encrypted_content"].native or b""
    decryptor = Cipher(algo, modes.CBC(alg.encryption_iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(algo.block_size).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise SmimeError("content decryption failed (wrong key?)") from None
