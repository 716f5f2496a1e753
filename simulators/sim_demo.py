"""Provision a `VirtualSim` for the demo user, through the applet's own APDUs and with the
PKCS#15 layout `pkcs15-init` builds for the IsoApplet (so OpenSC lists the result):

- PIN ``1234``, PUK ``1234567812345678`` (exactly 16 bytes: the applet wants that);
- key reference 0: an RSA-2048 encryption key, imported (as the cloud key service's key
  would be), with a 39-month certificate;
- key reference 1: an RSA-2048 signing key generated on the card, 13-month certificate;
- key reference 2: the previous encryption key (imported) with its expired certificate.

The certificates come from the same demo CA as the virtual PIV card's. The encryption and
retired keys are generated once per process (RSA generation is the slow part).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tokend import pkcs15
from tokend.iso7816 import ApduChannel, CommandApdu
from tokend.sim import codes
from tokend.sim import commands as sim
from tokend.sim.codes import PIN_FORMAT, Fdb
from tokend.simulators.demo import (
    _encryption_keys,
    _EncryptionKeys,
    _host_material,
    _user_cert,
    write_demo_files,
)
from tokend.simulators.sim import VirtualSim
from tokend.wipe import wipe

DEMO_PIN = b"1234"
DEMO_PUK = b"1234567812345678"
TOKEN_LABEL = "JavaCard isoApplet"
#: The key references the demo uses (the first free ones, as pkcs15-init hands them out).
ENCRYPTION_REF, SIGNING_REF, RETIRED_REF = 0, 1, 2

PRKDF, PUKDF, CDF, AODF = codes.FID_PRKDF, codes.FID_PUKDF, codes.FID_CDF, codes.FID_AODF
ACL_OPEN, ACL_PKCS15_DF = codes.ACL_OPEN, codes.ACL_PKCS15_DF
ACL_DIRECTORY, ACL_OBJECT = codes.ACL_DIRECTORY, codes.ACL_OBJECT
DIRECTORY_SIZE = codes.DIRECTORY_SIZE
IMPORTED_FLAGS = frozenset({"sensitive"})
ON_CARD_FLAGS = frozenset({"sensitive", "alwaysSensitive", "neverExtractable", "local"})


@dataclass(frozen=True)
class SimDemoMaterial:
    ca_cert: x509.Certificate
    encryption_cert: x509.Certificate
    signing_cert: x509.Certificate
    retired_cert: x509.Certificate
    pin: bytes
    puk: bytes
    iccid: str
    out_dir: Path | None = None

    @property
    def encryption_public_key(self) -> rsa.RSAPublicKey:
        key = self.encryption_cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    @property
    def signing_public_key(self) -> rsa.RSAPublicKey:
        key = self.signing_cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    @property
    def retired_public_key(self) -> rsa.RSAPublicKey:
        key = self.retired_cert.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key


@functools.cache
def _sim_keys() -> _EncryptionKeys:
    """The SIM's own encryption and retired keys (not the PIV card's), from the same CA."""
    host = _host_material()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return _encryption_keys(host.ca_key, host.ca_cert, now)


class Personaliser:
    """The APDU side of personalising an IsoApplet the way pkcs15-init does. ``send`` is
    one logical command (chaining, 61xx and 6Cxx handled below it)."""

    def __init__(self, send: Callable[[CommandApdu], bytes]) -> None:
        self.send = send

    def create(self, path: bytes, fid: int, fdb: Fdb, size: int, acl: bytes) -> None:
        self.send(sim.select_path(path, fcp=False))
        self.send(sim.create_file(sim.fcp(fid, fdb=fdb, size=size, acl=acl)))

    def write(self, path: bytes, content: bytes) -> None:
        self.send(sim.select_path(path, fcp=False))
        for command in sim.update_binary(0, content):
            self.send(command)

    def create_ef(self, df: bytes, fid: int, content: bytes, *, size: int, acl: bytes) -> None:
        self.create(df, fid, Fdb.TRANSPARENT_EF, size, acl)
        if content:
            self.write(df + fid.to_bytes(2, "big"), content)

    def create_pkcs15(self, pin: bytes, puk: bytes, label: str = TOKEN_LABEL) -> None:
        """Set PUK and PIN on a new applet, then build EF.DIR, the PKCS#15 DF, ODF,
        TokenInfo, AODF and empty PrKDF/PuKDF/CDF."""
        self.send(sim.select_aid())
        self.send(sim.set_initial_puk(puk))
        self.send(sim.set_initial_pin(pin))
        block = PIN_FORMAT.block(pin)
        try:
            self.send(sim.verify(block))
        finally:
            wipe(block)
        df = pkcs15.PKCS15_DF
        self.create_ef(
            b"\x3f\x00", pkcs15.EF_DIR, pkcs15.build_dir_record(label), size=128, acl=ACL_OPEN
        )
        self.create(b"\x3f\x00", 0x5015, Fdb.DF, 5000, ACL_PKCS15_DF)
        odf = pkcs15.build_odf(
            [
                (pkcs15.OdfKind.AUTH_OBJECTS, df + AODF.to_bytes(2, "big")),
                (pkcs15.OdfKind.PRIVATE_KEYS, df + PRKDF.to_bytes(2, "big")),
                (pkcs15.OdfKind.PUBLIC_KEYS, df + PUKDF.to_bytes(2, "big")),
                (pkcs15.OdfKind.CERTIFICATES, df + CDF.to_bytes(2, "big")),
            ]
        )
        self.create_ef(df, pkcs15.EF_ODF, odf, size=256, acl=ACL_OPEN)
        info = pkcs15.build_tokeninfo(b"\x00\x00", label, flags=frozenset({"eidCompliant"}))
        self.create_ef(df, pkcs15.EF_TOKENINFO, info, size=len(info), acl=ACL_OPEN)
        aodf = pkcs15.build_pin(
            label="User PIN",
            auth_id=b"\xff",
            reference=codes.PinRef.PIN,
            min_length=codes.PIN_MIN,
            stored_length=codes.PIN_MAX,
            max_length=codes.PIN_MAX,
            pad_char=b"\x00",
        )
        self.create_ef(df, AODF, aodf, size=256, acl=ACL_DIRECTORY)
        self.create_ef(df, 0x4946, b"\x01\x06pkcs15", size=128, acl=ACL_DIRECTORY)
        for fid in (PRKDF, PUKDF, CDF):
            self.create_ef(df, fid, b"", size=DIRECTORY_SIZE, acl=ACL_DIRECTORY)

    def import_rsa(self, ref: int, key: rsa.RSAPrivateKey) -> None:
        n = key.private_numbers()
        self.send(sim.mse_set(codes.SeTemplate.GENERATE, codes.Alg.GEN_RSA_2048, ref))
        self.send(sim.put_rsa_key(n.p, n.q, n.iqmp, n.dmp1, n.dmq1))

    def generate_rsa(self, ref: int) -> rsa.RSAPublicKey:
        self.send(sim.mse_set(codes.SeTemplate.GENERATE, codes.Alg.GEN_RSA_2048, ref))
        n, e = sim.parse_rsa_public(self.send(sim.generate_rsa()))
        return rsa.RSAPublicNumbers(e, n).public_key()

    def store_public_key(self, ref: int, public_key: rsa.RSAPublicKey) -> bytes:
        """EF 3300+ref with the RSAPublicKey; returns its path."""
        der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        fid = 0x3300 + ref
        self.create_ef(pkcs15.PKCS15_DF, fid, der, size=len(der), acl=ACL_OBJECT)
        return pkcs15.PKCS15_DF + fid.to_bytes(2, "big")

    def store_certificate(self, ref: int, cert: x509.Certificate) -> bytes:
        """EF 3400+ref with the certificate; returns its path."""
        der = cert.public_bytes(serialization.Encoding.DER)
        fid = 0x3400 + ref
        self.create_ef(pkcs15.PKCS15_DF, fid, der, size=len(der), acl=ACL_OBJECT)
        return pkcs15.PKCS15_DF + fid.to_bytes(2, "big")


def provision_sim_demo(
    card: VirtualSim, out_dir: Path | None = None, *, iccid: str | None = None
) -> SimDemoMaterial:
    """Personalise a blank ``card`` for the demo user (see the module docstring)."""
    host = _host_material()
    keys = _sim_keys()
    if iccid is not None:
        card.set_iccid(iccid)
    card.reset()
    channel = ApduChannel(card.process, extended=False)
    apdu = Personaliser(lambda command: channel.send(command).check())
    apdu.create_pkcs15(DEMO_PIN, DEMO_PUK)
    apdu.import_rsa(ENCRYPTION_REF, keys.encryption_key)
    apdu.import_rsa(RETIRED_REF, keys.retired_key)
    signing_public = apdu.generate_rsa(SIGNING_REF)  # generated on the card, never leaves it
    not_before = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=1)
    signing_cert = _user_cert(
        host.ca_key,
        host.ca_cert,
        signing_public,
        not_before=not_before,
        months=13,
        encryption=False,
    )
    entries = [
        (ENCRYPTION_REF, "Encryption key", keys.encryption_cert, frozenset({"decrypt", "unwrap"})),
        (SIGNING_REF, "Signing key", signing_cert, frozenset({"sign", "nonRepudiation"})),
        (
            RETIRED_REF,
            "Retired encryption key 1",
            keys.retired_cert,
            frozenset({"decrypt", "unwrap"}),
        ),
    ]
    prkdf = pukdf = cdf = b""
    for ref, label, cert, usage in entries:
        public_key = cert.public_key()
        assert isinstance(public_key, rsa.RSAPublicKey)
        key_id = pkcs15.native_id(public_key.public_numbers().n)
        public_path = apdu.store_public_key(ref, public_key)
        cert_path = apdu.store_certificate(ref, cert)
        prkdf += pkcs15.build_private_rsa_key(
            label=label,
            key_id=key_id,
            usage=usage,
            key_reference=ref,
            auth_id=b"\xff",
            path=pkcs15.PKCS15_DF,
            modulus_bits=2048,
            access_flags=ON_CARD_FLAGS if ref == SIGNING_REF else IMPORTED_FLAGS,
        )
        public_usage = frozenset({"encrypt", "wrap"} if "decrypt" in usage else {"verify"})
        pukdf += pkcs15.build_public_rsa_key(
            label=label, key_id=key_id, usage=public_usage, path=public_path, modulus_bits=2048
        )
        cdf += pkcs15.build_certificate(label=label, cert_id=key_id, path=cert_path)
    df = pkcs15.PKCS15_DF
    apdu.write(df + PRKDF.to_bytes(2, "big"), prkdf)
    apdu.write(df + PUKDF.to_bytes(2, "big"), pukdf)
    apdu.write(df + CDF.to_bytes(2, "big"), cdf)
    card.reset()  # leave no verified PIN behind

    material = SimDemoMaterial(
        ca_cert=host.ca_cert,
        encryption_cert=keys.encryption_cert,
        signing_cert=signing_cert,
        retired_cert=keys.retired_cert,
        pin=DEMO_PIN,
        puk=DEMO_PUK,
        iccid=card.iccid,
        out_dir=out_dir,
    )
    if out_dir is not None:
        _write_files(material, Path(out_dir))
    return material


def _write_files(material: SimDemoMaterial, out_dir: Path) -> None:
    files = {
        "ca.pem": material.ca_cert,
        "encryption.pem": material.encryption_cert,
        "signing.pem": material.signing_cert,
        "retired-1.pem": material.retired_cert,
    }
    write_demo_files(
        out_dir,
        files,
        f"Demo SIM (ICCID {material.iccid}), IsoApplet PIN {DEMO_PIN.decode()}, "
        f"PUK {DEMO_PUK.decode()}.\n"
        "Encrypt a mail to the SIM (PKCS#1 v1.5 key transport, the OpenSSL default):\n"
        "  openssl cms -encrypt -aes256 -recip encryption.pem -in message.txt "
        "-out message.p7m\n"
        "Verify a signature made with the SIM's signing key:\n"
        "  openssl cms -verify -CAfile ca.pem -in signed.p7m\n",
    )
