"""Decrypting what other mail clients send (RFC 5652 EnvelopedData, RFC 5083
AuthEnvelopedData) with keys that stay on the token.

The recipient is found among the certificates of every present token — current and
retired keys alike — by issuer and serial number or by subject key identifier. The token
does its part only: RSA key transport (PKCS#1 v1.5, OAEP with SHA-1/2) through C_Decrypt,
or the ECDH shared secret (RFC 5753 ephemeral-static, P-256/P-384) through C_DeriveKey; the
X9.63 KDF, the AES key unwrap and the content decryption (AES-CBC, AES-GCM, 3DES-CBC) run
here. Every secret on the way (content key, shared secret, key-encryption key, unverified
plaintext) lives in a bytearray that is zeroed once used.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass

from asn1crypto import algos, cms, core, x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from tokend.errors import EncryptedDataInvalidError, MechanismInvalidError, TokendError
from tokend.model import Mechanism, OaepParams
from tokend.pkcs11 import CKG, CKM
from tokend.smime.errors import (
    MALFORMED,
    CorruptMessageError,
    DecryptionFailedError,
    RecipientNotPresentError,
    SmimeError,
    UnsupportedAlgorithmError,
)
from tokend.smime.keys import Keyring, NoPrivateKey, TokenCert
from tokend.smime.message import Header, unwrap, with_envelope
from tokend.wipe import wipe

_OAEP_HASH = {
    "sha1": CKM.CKM_SHA_1,
    "sha256": CKM.CKM_SHA256,
    "sha384": CKM.CKM_SHA384,
    "sha512": CKM.CKM_SHA512,
}
_MGF1 = {
    "sha1": CKG.CKG_MGF1_SHA1,
    "sha256": CKG.CKG_MGF1_SHA256,
    "sha384": CKG.CKG_MGF1_SHA384,
    "sha512": CKG.CKG_MGF1_SHA512,
}
#: RFC 5753 §7.1.4 / RFC 8418 key-agreement schemes: OID → (name, KDF hash). With the
#: prime curves tokend supports the cofactor is 1, so cofactor DH equals standard DH.
_KARI_SCHEMES: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "1.3.133.16.840.63.0.2": ("dhSinglePass-stdDH-sha1kdf", hashes.SHA1),
    "1.3.132.1.11.0": ("dhSinglePass-stdDH-sha224kdf", hashes.SHA224),
    "1.3.132.1.11.1": ("dhSinglePass-stdDH-sha256kdf", hashes.SHA256),
    "1.3.132.1.11.2": ("dhSinglePass-stdDH-sha384kdf", hashes.SHA384),
    "1.3.132.1.11.3": ("dhSinglePass-stdDH-sha512kdf", hashes.SHA512),
    "1.3.133.16.840.63.0.3": ("dhSinglePass-cofactorDH-sha1kdf", hashes.SHA1),
    "1.3.132.1.14.0": ("dhSinglePass-cofactorDH-sha224kdf", hashes.SHA224),
    "1.3.132.1.14.1": ("dhSinglePass-cofactorDH-sha256kdf", hashes.SHA256),
    "1.3.132.1.14.2": ("dhSinglePass-cofactorDH-sha384kdf", hashes.SHA384),
    "1.3.132.1.14.3": ("dhSinglePass-cofactorDH-sha512kdf", hashes.SHA512),
}
#: Key wraps and the length of their key-encryption key. 3DES wrap (RFC 3217) is what
#: `openssl cms -encrypt` uses with ECDH by default (its default content cipher is 3DES).
_DES3_WRAP = "1.2.840.113549.1.9.16.3.6"
_WRAP_BYTES = {"aes128_wrap": 16, "aes192_wrap": 24, "aes256_wrap": 32, _DES3_WRAP: 24}
_DES3_WRAP_IV = bytes.fromhex("4adda22c79e82105")  # RFC 3217 §3.2
_CURVES = {"secp256r1": 65, "secp384r1": 97}  # uncompressed point sizes


class _EccCmsSharedInfo(core.Sequence):
    """ECC-CMS-SharedInfo (RFC 5753 §7.2), the X9.63 KDF's SharedInfo."""

    _fields = [
        ("key_info", cms.KeyEncryptionAlgorithm),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


class _GcmParameters(core.Sequence):
    """GCMParameters (RFC 5084 §3.2)."""

    _fields = [
        ("aes_nonce", core.OctetString),
        ("aes_icvlen", core.Integer, {"default": 12}),
    ]


@dataclass(frozen=True, slots=True)
class Rid:
    """Who a recipient info is for: issuer + serial, or a subject key identifier."""

    issuer: bytes | None = None  # DER Name
    issuer_text: str | None = None
    serial: int | None = None
    key_identifier: bytes | None = None

    def matches(self, cert: TokenCert) -> bool:
        if self.issuer is not None:
            return cert.issuer_der == self.issuer and cert.serial == self.serial
        return self.key_identifier in cert.key_identifiers

    def __str__(self) -> str:
        if self.issuer is not None:
            return f"<{self.issuer_text}, serial {self.serial:#x}>"
        assert self.key_identifier is not None
        return f"<subject key identifier {self.key_identifier.hex(':')}>"


@dataclass(frozen=True, slots=True)
class KeyTransport:
    rid: Rid
    mechanism: Mechanism | None  # None: unsupported (see problem)
    encrypted_key: bytes
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class KeyAgreement:
    rid: Rid
    peer_point: bytes
    kdf_hash: type[hashes.HashAlgorithm] | None
    wrap: str | None
    wrap_alg: cms.KeyEncryptionAlgorithm | None  # as the sender wrote it (KDF SharedInfo)
    ukm: bytes | None
    encrypted_key: bytes
    problem: str | None = None


Recipient = KeyTransport | KeyAgreement


@dataclass(frozen=True, slots=True)
class Decrypted:
    """The decrypted MIME entity, the envelope headers of the message it came in, and the
    key that opened it."""

    content: bytes
    envelope: tuple[Header, ...]
    key: TokenCert
    authenticated: bool  # AuthEnvelopedData: the content's integrity was checked

    def message(self) -> bytes:
        """The whole message without its encryption: envelope headers + entity."""
        return with_envelope(self.envelope, self.content)


# --- parsing recipients --------------------------------------------------------------------


_RDN_SHORT = {
    "common_name": "CN",
    "organization_name": "O",
    "organizational_unit_name": "OU",
    "country_name": "C",
    "locality_name": "L",
    "state_or_province_name": "ST",
    "email_address": "emailAddress",
    "domain_component": "DC",
}


def _name_text(name: x509.Name) -> str:
    """An issuer as people read it: ``CN=…,O=…,C=…`` (most specific first)."""
    parts = []
    for rdn in reversed(list(name.chosen)):
        for atv in rdn:
            key = atv["type"].native
            parts.append(f"{_RDN_SHORT.get(key, key)}={atv['value'].native}")
    return ",".join(parts) or "(empty name)"


def _rid(choice: core.Choice) -> Rid:
    """From a RecipientIdentifier or a KeyAgreeRecipientIdentifier."""
    if choice.name == "issuer_and_serial_number":
        ias = choice.chosen
        return Rid(
            issuer=bytes(ias["issuer"].dump()),
            issuer_text=_name_text(ias["issuer"]),
            serial=int(ias["serial_number"].native),
        )
    if choice.name == "subject_key_identifier":
        return Rid(key_identifier=bytes(choice.chosen.native))
    if choice.name == "r_key_id":
        return Rid(key_identifier=bytes(choice.chosen[0].native))  # subjectKeyIdentifier
    raise CorruptMessageError(f"corrupt message: unknown recipient identifier {choice.name}")


def _oaep(alg: cms.KeyEncryptionAlgorithm) -> tuple[Mechanism | None, str | None]:
    params = alg["parameters"]
    hash_name = params["hash_algorithm"]["algorithm"].native
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        return None, f"RSA-OAEP with mask generation {mgf['algorithm'].native}"
    mgf_hash = mgf["parameters"]["algorithm"].native
    label = params["p_source_algorithm"]["parameters"].native or b""
    if hash_name not in _OAEP_HASH or mgf_hash not in _MGF1:
        return None, f"RSA-OAEP with {hash_name} and MGF1-{mgf_hash}"
    return (
        Mechanism(CKM.CKM_RSA_PKCS_OAEP, OaepParams(_OAEP_HASH[hash_name], _MGF1[mgf_hash], label)),
        None,
    )


def _key_transport(ktri: cms.KeyTransRecipientInfo) -> KeyTransport:
    alg = ktri["key_encryption_algorithm"]
    name = alg["algorithm"].native
    mechanism: Mechanism | None = None
    problem = None
    if name == "rsaes_pkcs1v15":
        mechanism = Mechanism(CKM.CKM_RSA_PKCS)
    elif name == "rsaes_oaep":
        mechanism, problem = _oaep(alg)
    else:
        problem = f"key transport {name}"
    return KeyTransport(_rid(ktri["rid"]), mechanism, bytes(ktri["encrypted_key"].native), problem)


def _key_agreements(kari: cms.KeyAgreeRecipientInfo) -> Iterator[KeyAgreement]:
    originator = kari["originator"]
    alg = kari["key_encryption_algorithm"]
    oid = alg["algorithm"].dotted
    scheme = _KARI_SCHEMES.get(oid)
    problem = None
    point = b""
    wrap: str | None = None
    wrap_alg: cms.KeyEncryptionAlgorithm | None = None
    if scheme is None:
        problem = f"key agreement {alg['algorithm'].native}"
    if originator.name != "originator_key":
        problem = problem or "key agreement with a static originator key (not ephemeral-static)"
    else:
        key = originator.chosen
        if key["algorithm"]["algorithm"].native != "ec":
            problem = problem or f"key agreement with {key['algorithm']['algorithm'].native} keys"
        point = bytes(key["public_key"].native)
    if problem is None:
        try:
            wrap_alg = alg["parameters"].parse(cms.KeyEncryptionAlgorithm)
            wrap = wrap_alg["algorithm"].native
            if wrap_alg["algorithm"].dotted == _DES3_WRAP:
                wrap = _DES3_WRAP
        except (ValueError, TypeError):
            raise CorruptMessageError("corrupt message: bad key-wrap algorithm") from None
        if wrap not in _WRAP_BYTES:
            problem = f"key wrap {wrap}"
    ukm = kari["ukm"].native if kari["ukm"].native is not None else None
    for rek in kari["recipient_encrypted_keys"]:
        yield KeyAgreement(
            _rid(rek["rid"]),
            point,
            scheme[1] if scheme else None,
            wrap,
            wrap_alg,
            ukm,
            bytes(rek["encrypted_key"].native),
            problem,
        )


def recipients(enveloped: cms.EnvelopedData | cms.AuthEnvelopedData) -> list[Recipient]:
    """The recipients tokend can be asked about (key transport and key agreement)."""
    out: list[Recipient] = []
    try:
        for ri in enveloped["recipient_infos"]:
            if ri.name == "ktri":
                out.append(_key_transport(ri.chosen))
            elif ri.name == "kari":
                out.extend(_key_agreements(ri.chosen))
            # kekri / pwri / ori: keys tokens do not hold
    except MALFORMED as exc:
        raise CorruptMessageError(f"corrupt message: bad recipient info ({exc})") from None
    return out


# --- the content-encryption key --------------------------------------------------------------


def _des3_key_unwrap(kek: bytes, wrapped: bytes) -> bytearray:
    """Triple-DES key unwrap (RFC 3217 §3.2): two CBC passes around a reversal, then the
    CMS key checksum (the first 8 bytes of SHA-1 of the key)."""
    if len(wrapped) != 40:
        raise EncryptedDataInvalidError()
    d1 = Cipher(TripleDES(kek), modes.CBC(_DES3_WRAP_IV)).decryptor()
    temp2 = bytearray(d1.update(wrapped) + d1.finalize())
    temp2.reverse()
    d2 = Cipher(TripleDES(kek), modes.CBC(bytes(temp2[:8]))).decryptor()
    wkcks = bytearray(d2.update(bytes(temp2[8:])) + d2.finalize())
    try:
        cek, icv = wkcks[:24], bytes(wkcks[24:])
        checksum = hashlib.sha1(bytes(cek), usedforsecurity=False).digest()[:8]  # RFC 3217
        if not hmac.compare_digest(checksum, icv):
            wipe(cek)
            raise EncryptedDataInvalidError()
        return cek
    finally:
        wipe(temp2)
        wipe(wkcks)


def _shared_info(wrap: str, wrap_alg: cms.KeyEncryptionAlgorithm, ukm: bytes | None) -> bytes:
    """RFC 5753 §7.2: keyInfo is the key-wrap algorithm with its parameters as sent."""
    info = {
        "key_info": wrap_alg,
        "supp_pub_info": (_WRAP_BYTES[wrap] * 8).to_bytes(4, "big"),
    }
    if ukm is not None:
        info["entity_u_info"] = ukm
    return bytes(_EccCmsSharedInfo(info).dump())


def _curve_of(cert: TokenCert) -> str | None:
    public = cert.certificate.public_key
    if public.algorithm != "ec":
        return None
    params = public["algorithm"]["parameters"]
    return params.chosen.native if params.name == "named" else None


def _content_key(keyring: Keyring, r: Recipient, cert: TokenCert) -> bytearray:
    if isinstance(r, KeyTransport):
        assert r.mechanism is not None
        if cert.certificate.public_key.algorithm != "rsa":
            raise UnsupportedAlgorithmError(
                f"the message uses RSA key transport but the key {cert.label} is not RSA"
            )
        try:
            return keyring.unwrap(cert, r.mechanism, r.encrypted_key)
        except MechanismInvalidError:
            # A SIM's IsoApplet strips PKCS#1 v1.5 padding itself: no OAEP, no raw RSA.
            what = "RSA-OAEP" if r.mechanism.mechanism == CKM.CKM_RSA_PKCS_OAEP else "this"
            raise UnsupportedAlgorithmError(
                f"the token {cert.token} cannot decrypt {what} key transport; the sender "
                "must use RSA PKCS#1 v1.5 (OpenSSL's default) for this token"
            ) from None
    curve = _curve_of(cert)
    if curve not in _CURVES:
        raise UnsupportedAlgorithmError(
            f"ECDH on curve {curve or cert.certificate.public_key.algorithm} is not supported "
            "(P-256 and P-384 are)"
        )
    if len(r.peer_point) != _CURVES[curve] or r.peer_point[:1] != b"\x04":
        raise CorruptMessageError("corrupt message: the sender's EC point does not fit the key")
    assert r.kdf_hash is not None and r.wrap is not None and r.wrap_alg is not None
    try:
        z = keyring.agree(cert, r.peer_point)
    except MechanismInvalidError:
        raise UnsupportedAlgorithmError(
            f"the token {cert.token} cannot do ECDH key agreement"
        ) from None
    kek = bytearray()
    try:
        kek = bytearray(
            X963KDF(
                algorithm=r.kdf_hash(),
                length=_WRAP_BYTES[r.wrap],
                sharedinfo=_shared_info(r.wrap, r.wrap_alg, r.ukm),
            ).derive(bytes(z))
        )
        if r.wrap == _DES3_WRAP:
            return _des3_key_unwrap(bytes(kek), r.encrypted_key)
        try:
            return bytearray(aes_key_unwrap(bytes(kek), r.encrypted_key))
        except InvalidUnwrap:
            raise EncryptedDataInvalidError() from None
    finally:
        wipe(z)
        wipe(kek)


# --- the content ---------------------------------------------------------------------------


def _cbc(eci: cms.EncryptedContentInfo, cek: bytearray) -> bytes:
    alg = eci["content_encryption_algorithm"]
    cipher = alg.encryption_cipher
    algo: algorithms.AES | TripleDES
    if len(cek) != alg.key_length:
        raise EncryptedDataInvalidError()  # the unwrapped key does not fit: wrong key
    if cipher == "aes":
        algo = algorithms.AES(bytes(cek))
    elif cipher == "tripledes":
        algo = TripleDES(bytes(cek))
    else:
        raise UnsupportedAlgorithmError(f"content encryption {alg['algorithm'].native}")
    iv = alg.encryption_iv
    ciphertext = eci["encrypted_content"].native or b""
    if not ciphertext or len(ciphertext) % (algo.block_size // 8):
        raise CorruptMessageError("corrupt message: the encrypted content is truncated")
    decryptor = Cipher(algo, modes.CBC(iv)).decryptor()
    padded = bytearray(decryptor.update(ciphertext) + decryptor.finalize())
    try:
        unpadder = sym_padding.PKCS7(algo.block_size).unpadder()
        return unpadder.update(bytes(padded)) + unpadder.finalize()
    except ValueError:
        raise EncryptedDataInvalidError() from None
    finally:
        wipe(padded)


def _gcm(envelope: cms.AuthEnvelopedData, cek: bytearray) -> bytes:
    eci = envelope["auth_encrypted_content_info"]
    alg = eci["content_encryption_algorithm"]
    name = alg["algorithm"].native
    sizes = {"aes128_gcm": 16, "aes192_gcm": 24, "aes256_gcm": 32}
    if name not in sizes:
        raise UnsupportedAlgorithmError(f"authenticated content encryption {name}")
    if len(cek) != sizes[name]:
        raise EncryptedDataInvalidError()
    params = alg["parameters"].parse(_GcmParameters)
    nonce = bytes(params["aes_nonce"].native)
    tag_len = int(params["aes_icvlen"].native)
    tag = bytes(envelope["mac"].native)
    if len(tag) != tag_len or not 12 <= tag_len <= 16:
        raise CorruptMessageError(f"corrupt message: a {len(tag)}-byte GCM tag")
    aad = b""
    if envelope["auth_attrs"].native is not None:
        # RFC 5083 §2.1: the attributes are authenticated in their DER SET OF form
        aad = bytes(cms.CMSAttributes.load(envelope["auth_attrs"].untag().dump()).dump())
    ciphertext = eci["encrypted_content"].native or b""
    decryptor = Cipher(
        algorithms.AES(bytes(cek)), modes.GCM(nonce, tag, min_tag_length=12)
    ).decryptor()
    decryptor.authenticate_additional_data(aad)
    # Held back until the tag has been checked: a mismatch releases nothing.
    plain = bytearray(decryptor.update(ciphertext))
    try:
        decryptor.finalize()
    except InvalidTag:
        wipe(plain)
        raise DecryptionFailedError(
            "the message failed its integrity check (AES-GCM tag mismatch): it was altered "
            "or damaged in transit, or the wrong key was used; nothing of it is released"
        ) from None
    out = bytes(plain)
    wipe(plain)
    return out


#: Names for ciphers asn1crypto does not know, so the error can say what was used.
_CIPHER_NAMES = {
    "1.2.392.200011.61.1.1.1.2": "camellia128_cbc",
    "1.2.392.200011.61.1.1.1.3": "camellia192_cbc",
    "1.2.392.200011.61.1.1.1.4": "camellia256_cbc",
    "1.2.410.200046.1.1.2": "aria128_cbc",
    "1.2.410.200046.1.1.7": "aria192_cbc",
    "1.2.410.200046.1.1.12": "aria256_cbc",
    "1.2.840.113549.1.9.16.3.18": "chacha20_poly1305",
}


def _describe(alg: algos.EncryptionAlgorithm) -> str:
    return _CIPHER_NAMES.get(alg["algorithm"].dotted, str(alg["algorithm"].native))


def _check_content_algorithm(info: cms.ContentInfo) -> None:
    """Refuse an unsupported content cipher before the token is asked anything."""
    content = info["content"]
    if info["content_type"].native == "enveloped_data":
        alg = content["encrypted_content_info"]["content_encryption_algorithm"]
        if alg["algorithm"].native not in (
            "aes128_cbc", "aes192_cbc", "aes256_cbc", "tripledes_3key",
        ):  # fmt: skip
            raise UnsupportedAlgorithmError(
                f"content encryption {_describe(alg)} is not supported "
                "(AES-CBC, AES-GCM and 3DES-CBC are)"
            )
    else:
        alg = content["auth_encrypted_content_info"]["content_encryption_algorithm"]
        if alg["algorithm"].native not in ("aes128_gcm", "aes192_gcm", "aes256_gcm"):
            raise UnsupportedAlgorithmError(
                f"authenticated content encryption {_describe(alg)} is not supported (AES-GCM is)"
            )


def _open(info: cms.ContentInfo, cek: bytearray) -> tuple[bytes, bool]:
    content = info["content"]
    if info["content_type"].native == "enveloped_data":
        return _cbc(content["encrypted_content_info"], cek), False
    return _gcm(content, cek), True


# --- the whole ----------------------------------------------------------------------------


def decrypt(keyring: Keyring, data: bytes) -> Decrypted:
    """Decrypt an S/MIME message (or bare CMS, DER or PEM) with a key on a present token."""
    found = unwrap(data)
    info = found.info
    kind = info["content_type"].native
    if kind == "signed_data":
        raise SmimeError("the message is signed, not encrypted: verify it instead")
    if kind not in ("enveloped_data", "authenticated_enveloped_data"):
        raise SmimeError(f"CMS content is {kind}, not an encrypted (enveloped) message")
    try:
        _check_content_algorithm(info)
    except SmimeError:
        raise
    except MALFORMED as exc:
        raise CorruptMessageError(f"corrupt message: {exc}") from None
    wanted = recipients(info["content"])
    if not wanted:
        raise UnsupportedAlgorithmError(
            "the message has no key-transport or key-agreement recipient (password or "
            "pre-shared-key messages cannot be decrypted with a token)"
        )
    certs = keyring.certificates()
    candidates = [(r, c) for r in wanted for c in certs if r.rid.matches(c)]
    if not candidates:  # perhaps a certificate written since the keyring read them
        certs = keyring.certificates(refresh=True)
        candidates = [(r, c) for r in wanted for c in certs if r.rid.matches(c)]
    if not candidates:
        raise RecipientNotPresentError(_not_present(wanted))
    supported = [(r, c) for r, c in candidates if r.problem is None]
    if not supported:
        problem = candidates[0][0].problem
        raise UnsupportedAlgorithmError(f"{problem} is not supported")
    failed = 0
    for r, cert in supported:
        cek = bytearray()
        try:
            cek = _content_key(keyring, r, cert)
            content, authenticated = _open(info, cek)
        except EncryptedDataInvalidError:
            failed += 1
            continue
        except NoPrivateKey:
            continue  # a certificate without a usable private key next to it
        except MALFORMED as exc:
            if isinstance(exc, SmimeError | TokendError):
                raise
            raise CorruptMessageError(f"corrupt message: {exc}") from None
        finally:
            wipe(cek)
        return Decrypted(content, found.envelope, cert, authenticated)
    if failed:
        raise DecryptionFailedError(
            "the message does not decrypt with the matching key on the token "
            f"({supported[0][1].label} of {supported[0][1].token}): it is damaged or altered"
        )
    raise RecipientNotPresentError(
        f"{_not_present(wanted)} (the token has the certificate but not its private key)"
    )


def _not_present(wanted: list[Recipient]) -> str:
    rids = list(dict.fromkeys(str(r.rid) for r in wanted))
    if len(rids) == 1:
        return f"the message is for {rids[0]}; insert the token that holds it"
    return f"the message is for {' or '.join(rids)}; insert a token that holds one of them"
