"""Provision a `VirtualPivCard` as the product would: a demo CA; an imported RSA-2048
encryption key + certificate in 9D (39 months); a P-256 signing key generated on the card +
certificate in 9C (13 months); one expired encryption key + certificate kept in retired slot
82; optionally (``key_agreement=True``) a P-256 key generated on the card + certificate in 9A
(13 months) for ECDH tests; PIN 123456, PUK 12345678, default management key.

Everything goes through the card's own APDUs (SELECT, 9B mutual authentication, vendor FE
IMPORT, GENERATE, PUT DATA), so the result is exactly what a provisioning client would leave.
The RSA keys, the CA and their certificates are generated once per process (tests call this
a lot); each card keeps its own serial and CHUID GUID unless ``serial`` is given.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tokend.iso7816 import ApduChannel, CommandApdu, encode_tlv, find_tlv
from tokend.piv.codes import (
    DEFAULT_MANAGEMENT_KEY,
    PIV_AID,
    TAG_CHALLENGE,
    TAG_DYN_AUTH,
    TAG_GEN_ALGORITHM,
    TAG_GEN_TEMPLATE,
    TAG_PUBLIC_KEY,
    TAG_RESPONSE,
    TAG_WITNESS,
    Ins,
    KeyRef,
    PivAlgorithm,
    PivObject,
    PivSlot,
)
from tokend.piv.commands import (
    build_chuid,
    certificate_object,
    dyn_auth,
    mgmt_cipher,
    put_data_command,
)
from tokend.simulators.piv import DEFAULT_PIN, DEFAULT_PUK, VirtualPivCard

DEMO_NAME = "Demo User"
DEMO_EMAIL = "demo@example.org"
RETIRED_SLOT = PivSlot.RETIRED1


@dataclass(frozen=True)
class DemoMaterial:
    """What a test needs to talk to a provisioned demo card: certificates (public keys
    through them), the secrets it was left with and its identity."""

    ca_cert: x509.Certificate
    encryption_cert: x509.Certificate  # 9D, RSA-2048, keyEncipherment
    signing_cert: x509.Certificate  # 9C, P-256, digitalSignature
    retired_cert: x509.Certificate  # 82, RSA-2048, expired
    pin: bytes
    puk: bytes
    management_key: bytes
    serial: int
    guid: bytes
    out_dir: Path | None = None
    #: 9A, P-256, digitalSignature + keyAgreement; only with ``key_agreement=True``.
    authentication_cert: x509.Certificate | None = None

    @property
    def encryption_public_key(self) -> rsa.RSAPublicKey:
        key = self.encryption_cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    @property
    def signing_public_key(self) -> ec.EllipticCurvePublicKey:
        key = self.signing_cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key

    @property
    def key_agreement_public_key(self) -> ec.EllipticCurvePublicKey:
        """The 9A key (PIN once) for ECDH; provision with ``key_agreement=True``."""
        if self.authentication_cert is None:
            raise ValueError("provisioned without key_agreement=True: no key in 9A")
        key = self.authentication_cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key

    @property
    def retired_public_key(self) -> rsa.RSAPublicKey:
        key = self.retired_cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key


@dataclass(frozen=True)
class _EncryptionKeys:
    """An encryption key in use and the one it replaced, with their certificates."""

    encryption_key: rsa.RSAPrivateKey
    encryption_cert: x509.Certificate
    retired_key: rsa.RSAPrivateKey
    retired_cert: x509.Certificate


@dataclass(frozen=True)
class _HostMaterial:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    encryption_key: rsa.RSAPrivateKey
    encryption_cert: x509.Certificate
    retired_key: rsa.RSAPrivateKey
    retired_cert: x509.Certificate


def _add_months(when: dt.datetime, months: int) -> dt.datetime:
    month = when.month - 1 + months
    year, month = when.year + month // 12, month % 12 + 1
    day = min(when.day, 28)  # valid in every month; a few days either way do not matter
    return when.replace(year=year, month=month, day=day)


def _user_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    *,
    not_before: dt.datetime,
    months: int,
    encryption: bool,
    key_agreement: bool = False,
) -> x509.Certificate:
    usage = {
        "digital_signature": not encryption,
        "content_commitment": False,
        "key_encipherment": encryption,
        "data_encipherment": False,
        "key_agreement": key_agreement,
        "key_cert_sign": False,
        "crl_sign": False,
        "encipher_only": False,
        "decipher_only": False,
    }
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, DEMO_NAME),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, DEMO_EMAIL),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(_add_months(not_before, months))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(DEMO_EMAIL)]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )


@functools.cache
def _host_material() -> _HostMaterial:
    """Generated once per process: RSA key generation is the slow part of provisioning."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokend Demo CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(_add_months(now, 120))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    keys = _encryption_keys(ca_key, ca_cert, now)
    return _HostMaterial(
        ca_key,
        ca_cert,
        keys.encryption_key,
        keys.encryption_cert,
        keys.retired_key,
        keys.retired_cert,
    )


def _encryption_keys(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, now: dt.datetime
) -> _EncryptionKeys:
    """Two fresh RSA-2048 keys: one with a 39-month encryption certificate from yesterday,
    one (the previous) whose 39 months ended a month ago."""
    encryption_key = rsa.generate_private_key(65537, 2048)
    retired_key = rsa.generate_private_key(65537, 2048)
    encryption_cert = _user_cert(
        ca_key,
        ca_cert,
        encryption_key.public_key(),
        not_before=now - dt.timedelta(days=1),
        months=39,
        encryption=True,
    )
    retired_cert = _user_cert(
        ca_key,
        ca_cert,
        retired_key.public_key(),
        not_before=_add_months(now, -40),
        months=39,
        encryption=True,
    )
    return _EncryptionKeys(encryption_key, encryption_cert, retired_key, retired_cert)


class _Provisioner:
    """The APDU side: what a provisioning client sends."""

    def __init__(self, card: VirtualPivCard) -> None:
        self._channel = ApduChannel(card.process, extended=True)

    def send(self, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
        return self._channel.send(CommandApdu(0x00, ins, p1, p2, data, le)).check()

    def select(self) -> None:
        self.send(Ins.SELECT, 0x04, 0x00, PIV_AID, 0)

    def authenticate(self, key: bytes) -> None:
        """9B mutual authentication with the (3DES) management key."""
        cipher = mgmt_cipher(PivAlgorithm.TDES, key)
        reply = self.send(
            Ins.GENERAL_AUTHENTICATE,
            PivAlgorithm.TDES,
            KeyRef.MANAGEMENT_KEY,
            dyn_auth((TAG_WITNESS, b"")),
        )
        encrypted_witness = find_tlv(find_tlv(reply, TAG_DYN_AUTH) or b"", TAG_WITNESS) or b""
        decryptor = cipher.decryptor()
        witness = decryptor.update(encrypted_witness) + decryptor.finalize()
        challenge = secrets.token_bytes(8)
        reply = self.send(
            Ins.GENERAL_AUTHENTICATE,
            PivAlgorithm.TDES,
            KeyRef.MANAGEMENT_KEY,
            dyn_auth((TAG_WITNESS, witness), (TAG_CHALLENGE, challenge)),
        )
        encryptor = cipher.encryptor()
        expected = encryptor.update(challenge) + encryptor.finalize()
        if find_tlv(find_tlv(reply, TAG_DYN_AUTH) or b"", TAG_RESPONSE) != expected:
            raise RuntimeError("card failed the management-key challenge")

    def import_rsa(self, slot: int, key: rsa.RSAPrivateKey) -> None:
        numbers = key.private_numbers()
        half = key.key_size // 16
        parts = (numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp)
        data = b"".join(encode_tlv(i, v.to_bytes(half, "big")) for i, v in enumerate(parts, 1))
        self.send(Ins.IMPORT_KEY, PivAlgorithm.RSA_2048, slot, data)

    def generate_p256(self, slot: int) -> ec.EllipticCurvePublicKey:
        template = encode_tlv(
            TAG_GEN_TEMPLATE, encode_tlv(TAG_GEN_ALGORITHM, bytes((PivAlgorithm.ECC_P256,)))
        )
        reply = self.send(Ins.GENERATE_ASYMMETRIC_KEY_PAIR, 0x00, slot, template, 0)
        point = find_tlv(find_tlv(reply, TAG_PUBLIC_KEY) or b"", 0x86) or b""
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)

    def put_object(self, tag: int, value: bytes) -> None:
        self._channel.send(put_data_command(tag, value)).check()

    def put_certificate(self, slot: int, cert: x509.Certificate) -> None:
        der = cert.public_bytes(serialization.Encoding.DER)
        self.put_object(PivSlot(slot).object_id, certificate_object(der))


def provision_demo(
    card: VirtualPivCard,
    out_dir: Path | None = None,
    *,
    serial: int | None = None,
    key_agreement: bool = False,
) -> DemoMaterial:
    """Provision a factory-fresh ``card`` (default management key) for the demo user.

    ``serial``: give the card this vendor serial and a CHUID GUID derived from it (stable
    across runs); otherwise the card keeps its own random identity. ``out_dir``: also write
    ``ca.pem``, ``encryption.pem``, ``signing.pem``, ``retired-82.pem`` and ``README.txt``
    (and ``authentication.pem``). ``key_agreement``: also generate a P-256 key in 9A with a
    certificate (keyAgreement), the card's ECDH key.
    """
    host = _host_material()
    if serial is not None:
        card.set_serial(serial)
    card.reset()
    apdu = _Provisioner(card)
    apdu.select()
    apdu.authenticate(DEFAULT_MANAGEMENT_KEY)
    if serial is not None:
        guid = hashlib.sha256(b"tokend demo card %d" % serial).digest()[:16]
        apdu.put_object(PivObject.CHUID, build_chuid(guid))
    apdu.import_rsa(PivSlot.KEY_MANAGEMENT, host.encryption_key)
    apdu.put_certificate(PivSlot.KEY_MANAGEMENT, host.encryption_cert)
    apdu.import_rsa(RETIRED_SLOT, host.retired_key)
    apdu.put_certificate(RETIRED_SLOT, host.retired_cert)
    # The signing key is generated on the token and never leaves it (as in the product).
    signing_public = apdu.generate_p256(PivSlot.SIGNATURE)
    not_before = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)
    signing_cert = _user_cert(
        host.ca_key,
        host.ca_cert,
        signing_public,
        not_before=not_before,
        months=13,
        encryption=False,
    )
    apdu.put_certificate(PivSlot.SIGNATURE, signing_cert)
    authentication_cert = None
    if key_agreement:
        authentication_cert = _user_cert(
            host.ca_key,
            host.ca_cert,
            apdu.generate_p256(PivSlot.AUTHENTICATION),
            not_before=not_before,
            months=13,
            encryption=False,
            key_agreement=True,
        )
        apdu.put_certificate(PivSlot.AUTHENTICATION, authentication_cert)
    card.reset()  # leave no management-key authentication behind

    material = DemoMaterial(
        ca_cert=host.ca_cert,
        encryption_cert=host.encryption_cert,
        signing_cert=signing_cert,
        retired_cert=host.retired_cert,
        pin=DEFAULT_PIN,
        puk=DEFAULT_PUK,
        management_key=DEFAULT_MANAGEMENT_KEY,
        serial=card.serial,
        guid=card.guid,
        out_dir=out_dir,
        authentication_cert=authentication_cert,
    )
    if out_dir is not None:
        _write_files(material, Path(out_dir))
    return material


def write_demo_files(out_dir: Path, certs: dict[str, x509.Certificate], readme: str) -> None:
    """What `tokend simulate --out DIR` leaves for a user: the certificates as PEM files
    and a README with the credentials and two commands to try."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, cert in certs.items():
        (out_dir / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out_dir / "README.txt").write_text(readme)


def _write_files(material: DemoMaterial, out_dir: Path) -> None:
    files = {
        "ca.pem": material.ca_cert,
        "encryption.pem": material.encryption_cert,
        "signing.pem": material.signing_cert,
        "retired-82.pem": material.retired_cert,
    }
    if material.authentication_cert is not None:
        files["authentication.pem"] = material.authentication_cert
    write_demo_files(
        out_dir,
        files,
        f"Demo PIV token {material.serial} (GUID {material.guid.hex()}), "
        f"PIN {DEFAULT_PIN.decode()}, PUK {DEFAULT_PUK.decode()}.\n"
        "Encrypt a mail to the token (decrypt it with the key in slot 9D):\n"
        "  openssl cms -encrypt -aes256 -recip encryption.pem -in message.txt "
        "-out message.p7m\n"
        "Verify a signature made with slot 9C:\n"
        "  openssl cms -verify -CAfile ca.pem -in signed.p7m\n",
    )
