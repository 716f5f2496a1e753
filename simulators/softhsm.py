"""SoftHSM2 (Debian ``softhsm2``) as the vendor PKCS#11 module in tests, benchmarks and CI:
a private token directory and ``SOFTHSM2_CONF``, tokens made with ``softhsm2-util``, and
mail keys put on a token *through the module* (python-pkcs11), the way the product's
provisioning would: the encryption key (RSA-2048, issued by the key service) imported with
its certificate, the signing key (P-256) generated on the token, plus a P-256
key-agreement key generated on the token for ECDH tests. Certificates come from the same
demo CA as the virtual PIV card's (`tokend.simulators.demo`).

SoftHSM2's state lives in the process that loads it: provisioning loads the module, does
its work and unloads it again (C_Finalize), so a daemon started afterwards in the same
process gets a fresh module. ``SOFTHSM2_CONF`` is read at C_Initialize, so the harness sets
it in the environment of this process (`use`) and hands it to children (`env`).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pkcs11
from asn1crypto.core import OctetString
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, CertificateType, KeyType, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters
from pkcs11.util.rsa import decode_rsa_private_key

from tokend.simulators.demo import _host_material, _user_cert

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
#: Demo credentials of the SoftHSM2 test token (README, design §6.2: set by the fixture).
TEST_PIN = "246810"
TEST_SO_PIN = "13579246"

ENCRYPTION_ID = b"\x01"
SIGNING_ID = b"\x02"
KEY_AGREEMENT_ID = b"\x03"


def unavailable_reason() -> str | None:
    if not SOFTHSM_MODULE.exists():
        return f"{SOFTHSM_MODULE} missing (Debian package softhsm2)"
    if shutil.which("softhsm2-util") is None:
        return "softhsm2-util not on PATH (Debian package softhsm2)"
    return None


@dataclass
class SoftHsm:
    """A private SoftHSM2 configuration: token directory and SOFTHSM2_CONF file."""

    workdir: Path

    @property
    def conf(self) -> Path:
        return self.workdir / "softhsm2.conf"

    @property
    def tokendir(self) -> Path:
        return self.workdir / "tokens"

    @classmethod
    def create(cls, workdir: Path) -> SoftHsm:
        hsm = cls(workdir)
        hsm.tokendir.mkdir(parents=True, exist_ok=True)
        hsm.conf.write_text(
            f"directories.tokendir = {hsm.tokendir}\n"
            "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )
        return hsm

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def use(self) -> None:
        """Point this process's SoftHSM2 at this configuration (read at C_Initialize)."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def _util(self, *args: str) -> str:
        done = subprocess.run(
            ["softhsm2-util", *args], env=self.env(), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"softhsm2-util {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def init_token(self, label: str, pin: str = TEST_PIN, so_pin: str = TEST_SO_PIN) -> None:
        """A new token in the first free slot (another process, as an admin would)."""
        self._util("--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin)

    def reinit_token(self, slot_id: int, label: str, pin: str, so_pin: str = TEST_SO_PIN) -> None:
        """Re-initialise an existing token: every object on it is gone."""
        self._util(
            "--init-token", "--slot", str(slot_id), "--label", label, "--pin", pin,
            "--so-pin", so_pin,
        )  # fmt: skip

    def delete_token(self, label: str) -> None:
        """Remove the token for good ("unplug" by the module's own means)."""
        self._util("--delete-token", "--token", label)


@dataclass(frozen=True)
class SoftHsmMaterial:
    """What tests need about a provisioned token (public parts only, plus the demo PIN)."""

    label: str
    serial: str
    slot_id: int
    ca_cert: x509.Certificate
    encryption_cert: x509.Certificate
    signing_cert: x509.Certificate
    key_agreement_cert: x509.Certificate
    pin: str


def _point(public: object) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the point (SoftHSM2, PKCS#11 v2.40)."""
    raw = public[Attribute.EC_POINT]  # type: ignore[index]
    try:
        return bytes(OctetString.load(raw).native)
    except ValueError:
        return bytes(raw)


def _cert_template(cert: x509.Certificate, key_id: bytes, label: str) -> dict[Attribute, object]:
    return {
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.ID: key_id,
        Attribute.LABEL: label,
        Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
        Attribute.SUBJECT: cert.subject.public_bytes(),
        Attribute.ISSUER: cert.issuer.public_bytes(),
        Attribute.SERIAL_NUMBER: cert.serial_number.to_bytes(20, "big").lstrip(b"\0") or b"\0",
    }


def provision_mail(
    label: str, pin: str = TEST_PIN, module: Path = SOFTHSM_MODULE
) -> SoftHsmMaterial:
    """Put the mail keys on token ``label`` through the module, then unload the module."""
    host = _host_material()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    lib = pkcs11.lib(str(module))
    try:
        token = lib.get_token(token_label=label)
        slot_id = next(s.slot_id for s in lib.get_slots() if s.get_token().label == label)
        with token.open(rw=True, user_pin=pin) as session:
            # The encryption key as the key service issues it: imported, never generated here.
            der = host.encryption_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            attrs = decode_rsa_private_key(der)
            attrs.update(
                {
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ID: ENCRYPTION_ID,
                    Attribute.LABEL: "encryption",
                    Attribute.DECRYPT: True,
                    Attribute.UNWRAP: True,
                    Attribute.SIGN: False,
                }
            )
            session.create_object(attrs)
            session.create_object(_cert_template(host.encryption_cert, ENCRYPTION_ID, "encryption"))
            params = session.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            certs = {}
            for key_id, key_label, caps, encryption in (
                (SIGNING_ID, "signature", MechanismFlag.SIGN | MechanismFlag.VERIFY, False),
                (KEY_AGREEMENT_ID, "key agreement", MechanismFlag.DERIVE, True),
            ):
                public, _private = params.generate_keypair(
                    store=True, id=key_id, label=key_label, capabilities=caps
                )
                point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _point(public))
                cert = _user_cert(
                    host.ca_key,
                    host.ca_cert,
                    point,
                    not_before=now - dt.timedelta(days=1),
                    months=13,
                    encryption=False,
                    key_agreement=encryption,
                )
                session.create_object(_cert_template(cert, key_id, key_label))
                certs[key_id] = cert
        serial = token.serial.decode("ascii", "replace").strip()
    finally:
        pkcs11.unload(str(module))
    return SoftHsmMaterial(
        label,
        serial,
        slot_id,
        host.ca_cert,
        host.encryption_cert,
        certs[SIGNING_ID],
        certs[KEY_AGREEMENT_ID],
        pin,
    )
