"""Signing mail (RFC 8551 §3.5) with a key on the token: detached `multipart/signed` or
opaque `application/pkcs7-mime; smime-type=signed-data`, SHA-256/384/512, RSA PKCS#1 v1.5,
RSA-PSS or ECDSA by the key's type.

The host hashes and builds the CMS SignedData (asn1crypto); the token signs only the
digest of the signed attributes (C_Sign with CKM_RSA_PKCS over a DigestInfo,
CKM_RSA_PKCS_PSS or CKM_ECDSA over the hash). The signed attributes are those mail clients
expect: content type, signing time, message digest and S/MIME capabilities (what tokend can
decrypt, in order of preference); the signer's certificate travels in the message. A
PIN-always key (PIV 9C) gets its PIN with the signature itself (context login).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from asn1crypto import algos, cms, core
from asn1crypto import x509 as ax509

from tokend.model import Mechanism, PssParams
from tokend.pkcs11 import CKG, CKM
from tokend.smime.errors import SignerError
from tokend.smime.keys import Keyring, TokenCert
from tokend.smime.message import multipart_signed, outgoing, pkcs7_mime

DIGESTS = ("sha256", "sha384", "sha512")
_CKM_HASH = {"sha256": CKM.CKM_SHA256, "sha384": CKM.CKM_SHA384, "sha512": CKM.CKM_SHA512}
_MGF1 = {
    "sha256": CKG.CKG_MGF1_SHA256,
    "sha384": CKG.CKG_MGF1_SHA384,
    "sha512": CKG.CKG_MGF1_SHA512,
}
#: Content encryption tokend decrypts, best first (RFC 8551 §2.7: the SMIMECapabilities
#: attribute tells senders what to use). 3DES is decrypted for old mail but not invited.
CAPABILITIES = ("aes256_gcm", "aes128_gcm", "aes256_cbc", "aes192_cbc", "aes128_cbc")


@dataclass(frozen=True, slots=True)
class SignOptions:
    digest: str = "sha256"
    pss: bool = False  # RSA keys: RSASSA-PSS instead of PKCS#1 v1.5
    opaque: bool = False  # application/pkcs7-mime instead of multipart/signed
    signing_time: dt.datetime | None = None  # default: now


def _usable_for_signing(cert: ax509.Certificate) -> bool:
    usage = cert.key_usage_value
    if usage is not None and not ({"digital_signature", "non_repudiation"} & usage.native):
        return False
    eku = cert.extended_key_usage_value
    return eku is None or bool({"email_protection", "any_extended_key_usage"} & set(eku.native))


def _rank(cert: ax509.Certificate) -> tuple[int, int]:
    """Lower is better: a certificate made for mail signing first, then one that does
    nothing else (not also key agreement / encipherment)."""
    eku = cert.extended_key_usage_value
    usage = cert.key_usage_value
    mail = 0 if eku is not None and "email_protection" in eku.native else 1
    other = usage is not None and bool(
        {"key_agreement", "key_encipherment", "data_encipherment"} & usage.native
    )
    return mail, int(other)


def signing_certificates(keyring: Keyring) -> list[TokenCert]:
    """Certificates on the present tokens that can sign mail, best first."""
    certs = [c for c in keyring.certificates() if _usable_for_signing(c.certificate)]
    usable = []
    for cert in certs:
        usage = keyring.public_key_usage(cert)
        if usage.get("CKA_VERIFY") is False:
            continue
        usable.append(cert)
    return sorted(usable, key=lambda c: _rank(c.certificate))


def choose_signer(
    keyring: Keyring, key: str | None = None, *, token_serial: str | None = None
) -> TokenCert:
    """The signing certificate: the one ``key`` names (CKA_ID hex, label, or a PIV slot
    like 9c), else the best mail-signing certificate — if that choice is clear. With
    ``token_serial`` (or its prefix), only that token's certificates count."""
    candidates = signing_certificates(keyring)
    if token_serial is not None:
        candidates = [c for c in candidates if c.token.serial.startswith(token_serial)]
    if key is not None:
        want = key.lower()
        candidates = [
            c
            for c in candidates
            if want in (c.key_id.hex(), c.label.lower()) or f"({want})" in c.label.lower()
        ]
        if not candidates:
            raise SignerError(f"no signing key {key!r} with a certificate on the present tokens")
    if not candidates:
        raise SignerError(
            "no present token has a signing key with a mail-signing certificate: insert the "
            "token that holds yours"
        )
    best = [c for c in candidates if _rank(c.certificate) == _rank(candidates[0].certificate)]
    if len(best) > 1:
        names = ", ".join(f"{c.label} on {c.token}" for c in best)
        raise SignerError(f"several signing keys fit ({names}): choose one with --key/--token")
    return best[0]


def _digest_algorithm(name: str) -> algos.DigestAlgorithm:
    return algos.DigestAlgorithm({"algorithm": name, "parameters": core.Null()})


def _signed_attributes(content_digest: bytes, when: dt.datetime) -> cms.CMSAttributes:
    caps = [cms.SMIMECapabilityIdentifier({"capability_id": c}) for c in CAPABILITIES]
    time = {"utc_time": when} if 1950 <= when.year < 2050 else {"generalized_time": when}
    attrs = [
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "signing_time", "values": [cms.Time(time)]}),
        cms.CMSAttribute({"type": "message_digest", "values": [content_digest]}),
        cms.CMSAttribute({"type": "smime_capabilities", "values": [cms.SMIMECapabilites(caps)]}),
    ]
    # DER: a SET OF is sorted by its elements' encodings (X.690 §11.6)
    attrs.sort(key=lambda a: a.dump())
    return cms.CMSAttributes(attrs)


def _token_signature(
    keyring: Keyring, cert: TokenCert, digest_name: str, to_sign: bytes, pss: bool
) -> tuple[bytes, algos.SignedDigestAlgorithm]:
    h = hashlib.new(digest_name, to_sign).digest()
    algorithm = cert.certificate.public_key.algorithm
    if algorithm == "rsa" and pss:
        params = PssParams(_CKM_HASH[digest_name], _MGF1[digest_name], len(h))
        sig = keyring.sign(cert, Mechanism(CKM.CKM_RSA_PKCS_PSS, params), h)
        alg = algos.SignedDigestAlgorithm(
            {
                "algorithm": "rsassa_pss",
                "parameters": algos.RSASSAPSSParams(
                    {
                        "hash_algorithm": {"algorithm": digest_name},
                        "mask_gen_algorithm": {
                            "algorithm": "mgf1",
                            "parameters": {"algorithm": digest_name},
                        },
                        "salt_length": len(h),
                    }
                ),
            }
        )
        return sig, alg
    if algorithm == "rsa":
        info = algos.DigestInfo(
            {"digest_algorithm": _digest_algorithm(digest_name), "digest": h}
        ).dump()
        sig = keyring.sign(cert, Mechanism(CKM.CKM_RSA_PKCS), info)
        return sig, algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})
    if algorithm == "ec":
        if pss:
            raise SignerError("PSS is for RSA keys; this signing key is an EC key")
        raw = keyring.sign(cert, Mechanism(CKM.CKM_ECDSA), h)
        sig = algos.DSASignature.from_p1363(raw).dump()
        return sig, algos.SignedDigestAlgorithm({"algorithm": f"{digest_name}_ecdsa"})
    raise SignerError(f"cannot sign with a {algorithm} key")


def sign_cms(
    keyring: Keyring, cert: TokenCert, content: bytes, options: SignOptions, *, detached: bool
) -> bytes:
    """CMS SignedData (DER ContentInfo) over ``content``."""
    if options.digest not in DIGESTS:
        raise SignerError(f"digest {options.digest} is not supported ({', '.join(DIGESTS)} are)")
    now = options.signing_time or dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = cert.certificate["tbs_certificate"]["validity"]["not_after"].native
    if not_after < now:
        raise SignerError(
            f"the signing certificate {cert.label} on {cert.token} expired on "
            f"{not_after:%Y-%m-%d}: renew it before signing"
        )
    digest = hashlib.new(options.digest, content).digest()
    attrs = _signed_attributes(digest, now)
    signature, sig_alg = _token_signature(keyring, cert, options.digest, attrs.dump(), options.pss)
    tbs = cert.certificate["tbs_certificate"]
    signer = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                {
                    "issuer_and_serial_number": cms.IssuerAndSerialNumber(
                        {"issuer": tbs["issuer"], "serial_number": tbs["serial_number"]}
                    )
                }
            ),
            "digest_algorithm": _digest_algorithm(options.digest),
            "signed_attrs": attrs,
            "signature_algorithm": sig_alg,
            "signature": signature,
        }
    )
    encap: dict[str, object] = {"content_type": "data"}
    if not detached:
        encap["content"] = content
    signed = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [_digest_algorithm(options.digest)],
            "encap_content_info": encap,
            "certificates": [cert.certificate],
            "signer_infos": [signer],
        }
    )
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump())


def sign(
    keyring: Keyring,
    data: bytes,
    options: SignOptions | None = None,
    *,
    signer: TokenCert | None = None,
) -> bytes:
    """Sign an outgoing message (a whole message or a bare text) into an S/MIME message."""
    options = options or SignOptions()
    cert = signer or choose_signer(keyring)
    out = outgoing(data)
    der = sign_cms(keyring, cert, out.entity, options, detached=not options.opaque)
    if options.opaque:
        return pkcs7_mime(out.envelope, der, "signed-data")
    return multipart_signed(out, der, "sha-" + options.digest[3:])
