"""Verifying signed mail (RFC 8551, RFC 5652 SignedData): every signature, its signed
attributes (content type, message digest) against the content, and the signer's
certificate chain to trust anchors the user names — nothing is trusted by default.

The chain is built and checked by `cryptography`'s X.509 verifier with a mail policy: the
signer's certificate, if it restricts its use, must allow signatures (digitalSignature or
nonRepudiation) and e-mail protection. No token is involved: verifying is public-key work.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import cms, pem
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import verification as xv

from tokend.smime.errors import MALFORMED, CorruptMessageError, SmimeError, VerificationError
from tokend.smime.message import Header, canonical, unwrap, with_envelope

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass(frozen=True, slots=True)
class SignerVerdict:
    subject: str
    email: str | None
    serial: int
    signing_time: dt.datetime | None
    digest: str
    algorithm: str
    chain: tuple[str, ...]  # subjects, signer first, anchor last

    def line(self) -> str:
        who = self.subject + (f" <{self.email}>" if self.email else "")
        when = f" at {self.signing_time:%Y-%m-%d %H:%M:%S %Z}" if self.signing_time else ""
        return (
            f"signed by {who}{when} ({self.algorithm}, {self.digest}); "
            f"chain: {' → '.join(self.chain)} (trusted)"
        )


@dataclass(frozen=True, slots=True)
class Verified:
    content: bytes  # the signed MIME entity, as signed
    envelope: tuple[Header, ...]
    signers: tuple[SignerVerdict, ...]

    def message(self) -> bytes:
        return with_envelope(self.envelope, self.content)

    def verdict(self) -> str:
        return "Verification successful: " + "; ".join(s.line() for s in self.signers)


def load_anchors(path: str | Path) -> list[x509.Certificate]:
    """CA certificates from a file (PEM, several allowed, or DER) or from every file of a
    directory; at least one must be found."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
    elif p.is_file():
        files = [p]
    else:
        raise SmimeError(f"--ca {path}: no such file or directory")
    out: list[x509.Certificate] = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as exc:
            raise SmimeError(f"cannot read {f}: {exc.strerror}") from None
        out += _certificates_in(data)
    if not out:
        raise SmimeError(f"--ca {path}: no CA certificate found (PEM or DER)")
    return out


def _certificates_in(data: bytes) -> list[x509.Certificate]:
    if pem.detect(data):
        found = []
        for kind, _, der in pem.unarmor(data, multiple=True):
            if kind in ("CERTIFICATE", "TRUSTED CERTIFICATE", "X509 CERTIFICATE"):
                try:
                    found.append(x509.load_der_x509_certificate(der))
                except (ValueError, x509.InvalidVersion):
                    continue
        return found
    try:
        return [x509.load_der_x509_certificate(data)]
    except (ValueError, x509.InvalidVersion):
        return []


def _message_certificate(cert: ax509.Certificate) -> x509.Certificate:
    """A certificate the message carries, for cryptography; a malformed one (OpenSSL's
    parser is stricter than asn1crypto's) is a corrupt message."""
    try:
        return x509.load_der_x509_certificate(cert.dump())
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion: found by fuzzing
        raise CorruptMessageError(
            f"corrupt message: a certificate in it is malformed ({exc})"
        ) from None


def _ee_key_usage(policy: object, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not (ku.digital_signature or ku.content_commitment):
        raise ValueError("the signer's certificate does not allow signatures (key usage)")


def _ee_eku(policy: object, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    allowed = {
        x509.ExtendedKeyUsageOID.EMAIL_PROTECTION,
        x509.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    }
    if eku is not None and not (allowed & set(eku)):
        raise ValueError("the signer's certificate is not for e-mail (extended key usage)")


def _ca_basic_constraints(
    policy: object, cert: x509.Certificate, bc: x509.BasicConstraints | None
) -> None:
    if bc is None or not bc.ca:
        raise ValueError("an issuer in the chain is not a CA")


def _ca_key_usage(policy: object, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("an issuer in the chain may not sign certificates")


def _chain(
    signer: x509.Certificate,
    others: list[x509.Certificate],
    anchors: list[x509.Certificate],
    when: dt.datetime,
) -> list[x509.Certificate]:
    agnostic = xv.Criticality.AGNOSTIC
    ca_policy = (
        xv.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, agnostic, _ca_basic_constraints)
        .may_be_present(x509.KeyUsage, agnostic, _ca_key_usage)
    )
    ee_policy = (
        xv.ExtensionPolicy.permit_all()
        .may_be_present(x509.KeyUsage, agnostic, _ee_key_usage)
        .may_be_present(x509.ExtendedKeyUsage, agnostic, _ee_eku)
    )
    verifier = (
        xv.PolicyBuilder()
        .store(xv.Store(anchors))
        .time(when)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        return list(verifier.verify(signer, others).chain)
    except xv.VerificationError as exc:
        raise VerificationError(
            "verification failed: the signer's certificate does not chain to the trusted "
            f"CA certificates given with --ca ({exc})"
        ) from None


def _subject(cert: x509.Certificate) -> tuple[str, str | None]:
    name = cert.subject
    cns = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    mails = name.get_attributes_for_oid(x509.NameOID.EMAIL_ADDRESS)
    email = str(mails[0].value) if mails else None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        email = email or next(iter(san.get_values_for_type(x509.RFC822Name)), None)
    except x509.ExtensionNotFound:
        pass
    return (str(cns[0].value) if cns else name.rfc4514_string()), email


def _find_signer(sid: cms.SignerIdentifier, certs: list[ax509.Certificate]) -> ax509.Certificate:
    for cert in certs:
        if sid.name == "issuer_and_serial_number":
            ias = sid.chosen
            if cert.issuer == ias["issuer"] and cert.serial_number == ias["serial_number"].native:
                return cert
        elif sid.chosen.native in (cert.key_identifier, cert.public_key.sha1):
            return cert
    raise VerificationError("verification failed: the signer's certificate is not in the message")


def _check_signature(cert: x509.Certificate, si: cms.SignerInfo, signed: bytes, digest: str) -> str:
    """Verify the SignerInfo's signature over ``signed``; returns the algorithm's name."""
    try:
        public = cert.public_key()
    except UnsupportedAlgorithm as exc:  # e.g. a curve OpenSSL lacks (found by fuzzing)
        raise VerificationError(f"verification failed: the signer's key: {exc}") from None
    sig = bytes(si["signature"].native)
    alg = si["signature_algorithm"]
    name = alg["algorithm"].native
    try:
        if isinstance(public, rsa.RSAPublicKey) and name == "rsassa_pss":
            params = alg["parameters"]
            h = params["hash_algorithm"]["algorithm"].native
            mgf_h = params["mask_gen_algorithm"]["parameters"]["algorithm"].native
            if h not in _HASHES or mgf_h not in _HASHES:
                raise VerificationError(f"verification failed: RSA-PSS with {h} is not supported")
            pad = padding.PSS(padding.MGF1(_HASHES[mgf_h]()), int(params["salt_length"].native))
            public.verify(sig, signed, pad, _HASHES[h]())
            return "RSA-PSS"
        if isinstance(public, rsa.RSAPublicKey) and name.endswith(("rsa", "rsassa_pkcs1v15")):
            public.verify(sig, signed, padding.PKCS1v15(), _HASHES[digest]())
            return "RSA PKCS#1 v1.5"
        if isinstance(public, ec.EllipticCurvePublicKey) and "ecdsa" in name:
            public.verify(sig, signed, ec.ECDSA(_HASHES[digest]()))
            return "ECDSA"
    except InvalidSignature:
        raise VerificationError(
            "verification failed: the signature does not match — the message was altered "
            "after signing, or the signature is forged"
        ) from None
    raise VerificationError(f"verification failed: signature algorithm {name} is not supported")


def _attr(si: cms.SignerInfo, name: str) -> object | None:
    for attr in si["signed_attrs"]:
        if attr["type"].native == name:
            values = attr["values"]
            if len(values) != 1:
                raise CorruptMessageError(f"corrupt message: {name} must have one value")
            return values[0].native
    return None


def _verify_signer(
    si: cms.SignerInfo,
    certs: list[ax509.Certificate],
    contents: Iterable[bytes],
    content_type: str,
    anchors: list[x509.Certificate],
    when: dt.datetime,
) -> tuple[SignerVerdict, bytes]:
    digest = si["digest_algorithm"]["algorithm"].native
    if digest not in _HASHES:
        raise VerificationError(
            f"verification failed: digest {digest} is not accepted (SHA-224 to SHA-512 are)"
        )
    signer_a = _find_signer(si["sid"], certs)
    signer = _message_certificate(signer_a)
    signing_time = None
    matched: bytes | None = None
    if si["signed_attrs"].native is not None:
        if _attr(si, "content_type") != content_type:
            raise VerificationError("verification failed: the signed content type differs")
        expected = _attr(si, "message_digest")
        for content in contents:
            if hashlib.new(digest, content).digest() == expected:
                matched = content
                break
        if matched is None:
            raise VerificationError(
                "verification failed: the content does not match the signature — the message "
                "was altered after signing"
            )
        when_signed = _attr(si, "signing_time")
        signing_time = when_signed if isinstance(when_signed, dt.datetime) else None
        # RFC 5652 §5.4: the signature covers the attributes in their SET OF encoding
        signed = bytes(si["signed_attrs"].untag().dump())
        algorithm = _check_signature(signer, si, signed, digest)
    else:
        last: VerificationError | None = None
        algorithm = ""
        for content in contents:
            try:
                algorithm = _check_signature(signer, si, content, digest)
                matched = content
                break
            except VerificationError as exc:
                last = exc
        if matched is None:
            assert last is not None
            raise last
    others = [_message_certificate(c) for c in certs if c is not signer_a]
    chain = _chain(signer, others, anchors, when)
    subject, email = _subject(signer)
    verdict = SignerVerdict(
        subject,
        email,
        signer.serial_number,
        signing_time,
        digest.upper().replace("SHA", "SHA-"),
        algorithm,
        tuple(_subject(c)[0] for c in chain),
    )
    return verdict, matched


def verify(
    data: bytes, anchors: list[x509.Certificate], *, at: dt.datetime | None = None
) -> Verified:
    """Verify a signed message (multipart/signed, application/pkcs7-mime signed-data, or
    bare CMS). Raises `VerificationError` with the verdict when anything does not hold."""
    found = unwrap(data)
    info = found.info
    if info["content_type"].native != "signed_data":
        kind = info["content_type"].native
        if kind in ("enveloped_data", "authenticated_enveloped_data"):
            raise SmimeError("the message is encrypted, not signed: decrypt it first")
        raise SmimeError(f"CMS content is {kind}, not a signed message")
    try:
        sd = info["content"]
        encap = sd["encap_content_info"]
        content_type = encap["content_type"].native
        if found.detached is not None:
            contents = list(dict.fromkeys([canonical(found.detached), found.detached]))
        elif encap["content"].native is not None:
            inner = encap["content"].native
            contents = [inner if isinstance(inner, bytes) else encap["content"].contents]
        else:
            raise VerificationError(
                "the signature is detached but the signed content is not with it"
            )
        certs = [c.chosen for c in (sd["certificates"] or []) if c.name == "certificate"]
        signer_infos = list(sd["signer_infos"])
    except MALFORMED as exc:
        raise CorruptMessageError(f"corrupt message: {exc}") from None
    if not signer_infos:
        raise VerificationError("verification failed: the message has no signature")
    when = at or dt.datetime.now(dt.UTC)
    verdicts = []
    content = contents[0]
    for si in signer_infos:
        try:
            verdict, content = _verify_signer(si, certs, contents, content_type, anchors, when)
        except MALFORMED as exc:
            if isinstance(exc, SmimeError):
                raise
            raise CorruptMessageError(f"corrupt message: {exc}") from None
        verdicts.append(verdict)
    return Verified(content, found.envelope, tuple(verdicts))
