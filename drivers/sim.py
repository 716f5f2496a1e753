"""SIM PKI applet driver: a SIM (UICC) in a PC/SC reader carrying the legacy IsoApplet
(API 00.06, the one OpenSC 0.23 drives), behind the `Token` seam.

What is the SIM's own here, on top of the shared parts (`SelectedApplet` for select /
re-select / transaction / identity check, `KeyPairToken` for the PKCS#11 objects and the
host side of every operation, `tokend.iso7816` for T=0, chaining and status words):

- **Identity** = the ICCID (EF 2FE2 of the UICC, read before the applet is selected; on a
  logical channel when another program left the applet selected on the basic channel)
  plus the fingerprints of the keys' public keys. The PKCS#15 serial is "0000" on every
  card and identifies nothing.
- **The PIN** is the applet's own (reference 01, 4-16 digits, 00-padded to 16). The SIM's
  PIN1 (the USIM's reference 01) is never touched: every command naming reference 01
  (VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER) is preceded by a SELECT of the
  PKI applet in the same exclusive section. The applet forgets a verified PIN on every
  SELECT: a re-selection is a lost login (`CardNotVerifiedError` from the next 6982, or
  `CardResetError` after a reset), never a silent re-VERIFY.
- **Keys** are read from the PKCS#15 structures (EF.DIR, ODF, TokenInfo, PrKDF, PuKDF, CDF
  and the public-key and certificate files) with `tokend.pkcs15`. On this applet that
  metadata is writable without the PIN, so it is never trusted for a security decision:
  a certificate is shown for a key only when its public key equals the key's public key,
  and every signature is checked against the public key before it is returned.
- **Mechanisms**: the card pads and strips PKCS#1 v1.5 itself and has no raw RSA, so
  RSA-2048 ``CKM_RSA_PKCS`` decryption and ``CKM_RSA_PKCS`` / ``CKM_SHAx_RSA_PKCS``
  signatures are all it offers. OAEP, PSS, raw RSA, ECDH and plain ECDSA are
  ``CKR_MECHANISM_INVALID`` (its only ECDSA hashes with SHA-1 on the card: not for mail).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tokend import pkcs15
from tokend.drivers.applet import SelectedApplet
from tokend.drivers.base import Transport
from tokend.errors import (
    ArgumentsBadError,
    CardResetError,
    DeviceError,
    DeviceMemoryError,
    EncryptedDataInvalidError,
    FunctionFailedError,
    FunctionNotSupportedError,
    KeySizeRangeError,
    MechanismInvalidError,
    TokendError,
    TransportError,
)
from tokend.iso7816 import ApduChannel, CommandApdu
from tokend.iso7816.status import SW, check_sw, retries_in
from tokend.mechanisms.keypair import (
    KeyPair,
    KeyPairToken,
    PublicKey,
    key_pair_mechanisms,
    key_pair_objects,
)
from tokend.model import (
    KeySlotInfo,
    MechanismInfo,
    PinStatus,
    TokenIdentity,
    TokenInfo,
    TokenObject,
    TokenStatus,
)
from tokend.pkcs11 import CKF_TOKEN
from tokend.sim import commands as cmd
from tokend.sim.codes import (
    ACL_DIRECTORY,
    ACL_OBJECT,
    APPLET_VERSION,
    DIRECTORY_SIZE,
    EF_ICCID,
    FID_CDF,
    FID_CERTIFICATE_BASE,
    FID_PRKDF,
    FID_PUBLIC_KEY_BASE,
    FID_PUKDF,
    ICCID_LENGTH,
    ISOAPPLET_AID,
    KEY_REFERENCES,
    PIN_FORMAT,
    PIN_MAX,
    PIN_MIN,
    PUK_FORMAT,
    RSA_BITS,
    Alg,
    Fdb,
    SeTemplate,
    decode_iccid,
)
from tokend.sim.profile import DELETE_KEY, SIM_PROFILE, role
from tokend.wipe import wipe

log = logging.getLogger(__name__)

__all__ = ["SimKey", "SimToken"]

#: MANAGE CHANNEL (ISO 7816-4 §11.1.2): open a logical channel to read the UICC's ICCID
#: when the basic channel already has the applet selected.
MANAGE_CHANNEL = 0x70
#: Largest certificate or directory file read from the card.
MAX_FILE = pkcs15.MAX_FILE
#: Object references for certificates without a key on the card (CA certificates …).
LONE_CERT_BASE = 0x100


@dataclass(frozen=True, slots=True)
class SimKey:
    """One private key of the applet as the PKCS#15 files describe it."""

    ref: int  # the applet's key reference (MSE tag 84)
    info: pkcs15.KeyInfo
    public_key: PublicKey | None
    cert_der: bytes | None
    certificate: x509.Certificate | None


def _fingerprint(public_key: PublicKey) -> bytes:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


class SimToken(SelectedApplet, KeyPairToken):
    """One SIM instance (one insertion). ``aid``: the PKI applet's AID (IsoApplet's by
    default); ``channel``: the logical channel it is used on (0, the basic channel, as
    OpenSC does in a PC/SC reader; 1-19 for a phone or modem path)."""

    AID = ISOAPPLET_AID
    APPLET_NAME = "SIM-PKI"
    card_pads_pkcs1 = True

    def __init__(
        self, transport: Transport, *, aid: bytes = ISOAPPLET_AID, channel: int = 0
    ) -> None:
        self.AID = aid  # type: ignore[misc]  # per instance: configurable
        self.CHANNEL = channel  # type: ignore[misc]
        super().__init__(transport)
        self._iccid: str | None = None
        self._seen_iccid: str | None = None
        self._version: tuple[int, int] = (0, 0)
        self._features = 0
        self._df = pkcs15.PKCS15_DF
        self._odf: dict[pkcs15.OdfKind, bytes] = {}
        self._token_label: str | None = None
        self._keys: dict[int, SimKey] = {}
        self._pairs: dict[int, KeyPair] = {}
        self._objects: tuple[TokenObject, ...] = ()
        self._identity: TokenIdentity | None = None
        self._info: TokenInfo | None = None
        self._marker: bytes | None = None

    @classmethod
    def opener(
        cls, *, aid: bytes = ISOAPPLET_AID, channel: int = 0
    ) -> Callable[[Transport], SimToken | None]:
        """An applet opener for `tokend.wiring.APPLETS` with another AID or channel."""

        def open_sim(transport: Transport) -> SimToken | None:
            token = cls(transport, aid=aid, channel=channel)
            with transport.transaction():
                if not token._select():
                    return None
                token._read_card()
            return token

        return open_sim

    @classmethod
    def open(cls, transport: Transport) -> SimToken | None:  # type: ignore[override]
        return cls.opener()(transport)

    # -- selection and identity --

    def _select(self) -> bool:
        """Read the ICCID first (the UICC's file, reachable only while no applet is
        selected on the channel), then SELECT the applet."""
        self._seen_iccid = self._read_iccid()
        rapdu = self._send(self._select_command())
        self._selected = rapdu.ok
        if rapdu.ok:
            answer = rapdu.data + bytes(max(0, 3 - len(rapdu.data)))  # < 3 bytes: 00.00
            if answer[0] != APPLET_VERSION[0]:
                log.info(
                    "applet %s answers major version %02X: not the legacy IsoApplet",
                    self.AID.hex(),
                    answer[0],
                )
                self._selected = False
                return False
            self._version, self._features = (answer[0], answer[1]), answer[2]
        return self._selected

    def _read_iccid(self) -> str | None:
        """EF ICCID, on the basic channel, else on a logical channel of its own."""
        iccid = self._read_iccid_on(self._channel)
        if iccid is not None or self.CHANNEL != 0:
            return iccid
        opened = self._send(CommandApdu(0, MANAGE_CHANNEL, 0x00, 0x00, le=1))
        if not opened.ok or len(opened.data) != 1 or not 1 <= opened.data[0] <= 19:
            return None
        number = opened.data[0]
        try:
            side = ApduChannel(self._transmit, extended=False, t0=self._channel.t0, channel=number)
            return self._read_iccid_on(side)
        finally:
            self._send(CommandApdu(0, MANAGE_CHANNEL, 0x80, number))

    @staticmethod
    def _read_iccid_on(channel: ApduChannel) -> str | None:
        send = channel.send
        selected = send(CommandApdu(0, 0xA4, 0x00, 0x04, EF_ICCID.to_bytes(2, "big"), le=0))
        if not selected.ok:
            return None
        content = send(cmd.read_binary(0, ICCID_LENGTH))
        if not content.ok:
            return None
        try:
            return decode_iccid(content.data)
        except ValueError:
            log.warning("EF ICCID does not hold an ICCID")
            return None

    def _identity_marker(self) -> bytes | None:
        return self._marker

    def _read_identity_marker(self) -> bytes | None:
        """After a re-select: the ICCID read just before it, and the public keys now."""
        keys = self._read_keys()
        return self._marker_of(self._seen_iccid, keys)

    @staticmethod
    def _marker_of(iccid: str | None, keys: Mapping[int, SimKey]) -> bytes:
        digest = hashlib.sha256((iccid or "").encode())
        for ref in sorted(keys):
            public = keys[ref].public_key
            digest.update(ref.to_bytes(2, "big") + (_fingerprint(public) if public else b""))
        return digest.digest()

    # -- reading the card --

    def _read_card(self) -> None:
        self._iccid = self._seen_iccid
        keys = self._read_keys()
        self._set_keys(keys)
        self._marker = self._marker_of(self._iccid, keys)
        if self._iccid is not None:
            serial = self._iccid
        else:  # no UICC file system reachable: the keys alone say which SIM this is
            serial = "keys-" + self._marker.hex()[:16]
            log.warning("no ICCID readable on this card; identifying it by its keys")
        self._identity = TokenIdentity(applet="SIM-PKI", serial=serial, atr=self._transport.atr())
        self._info = TokenInfo(
            label=f"SIM {serial}"[:32],
            manufacturer_id="SIM (IsoApplet)",
            model=f"IsoApplet {self._version[0]}.{self._version[1]}",
            serial_number=serial[-16:],
            flags=CKF_TOKEN.CKF_LOGIN_REQUIRED
            | CKF_TOKEN.CKF_USER_PIN_INITIALIZED
            | CKF_TOKEN.CKF_TOKEN_INITIALIZED,
            firmware_version=self._version,
            min_pin_len=PIN_MIN,
            max_pin_len=PIN_MAX,
        )

    def _read_file(self, path: bytes, *, limit: int = MAX_FILE) -> bytes | None:
        """A transparent EF by path (from the MF): SELECT with FCP, size from tag 81 (80),
        READ BINARY in 256-byte chunks. None if the file does not exist."""
        rapdu = self._send(cmd.select_path(path, fcp=True))
        if rapdu.sw == SW.SW_FILE_NOT_FOUND:
            return None
        fcp = check_sw(rapdu)
        try:
            size = cmd.fcp_size(fcp)
        except ValueError:
            raise DeviceError(f"malformed FCP of {path.hex()}") from None
        if size is None or size > limit:
            raise DeviceError(f"file {path.hex()}: no usable size in its FCP")
        out = bytearray()
        while len(out) < size:
            chunk = check_sw(self._send(cmd.read_binary(len(out), min(256, size - len(out)))))
            if not chunk:
                raise DeviceError(f"file {path.hex()}: READ BINARY returned nothing")
            out += chunk
        return bytes(out[:size])

    def _directory(self, what: str, path: bytes | None, parse: Callable[[bytes], list]) -> list:
        """A PKCS#15 file parsed; [] (logged) when it is absent or malformed: the token stays
        usable (and provisionable) with what else it has."""
        if path is None:
            return []
        try:
            data = self._read_file(path)
            return [] if data is None else parse(data)
        except (TransportError, CardResetError):
            raise
        except TokendError as exc:
            log.warning("PKCS#15 %s at %s unusable: %s", what, path.hex(), exc)
            return []

    def _read_keys(self) -> dict[int, SimKey]:
        apps = self._directory("EF.DIR", b"\x3f\x00\x2f\x00", pkcs15.parse_dir)
        app = next((a for a in apps if a.aid == pkcs15.PKCS15_AID and a.path), None)
        self._df = app.path if app is not None and app.path else pkcs15.PKCS15_DF
        odf_path = self._df + pkcs15.EF_ODF.to_bytes(2, "big")
        odf = {e.kind: e.path for e in self._directory("ODF", odf_path, pkcs15.parse_odf)}
        self._odf = dict(odf)
        infos = self._directory(
            "TokenInfo", self._df + b"\x50\x32", lambda d: [pkcs15.parse_tokeninfo(d)]
        )
        self._token_label = infos[0].label if infos else None
        private = self._directory("PrKDF", odf.get(pkcs15.OdfKind.PRIVATE_KEYS), pkcs15.parse_prkdf)
        public = self._directory("PuKDF", odf.get(pkcs15.OdfKind.PUBLIC_KEYS), pkcs15.parse_pukdf)
        certs = self._directory("CDF", odf.get(pkcs15.OdfKind.CERTIFICATES), pkcs15.parse_cdf)
        public_by_id = {p.id: p for p in public}
        certs_by_id: dict[bytes, pkcs15.CertificateInfo] = {}
        for cert_info in certs:
            certs_by_id.setdefault(cert_info.id, cert_info)
        keys: dict[int, SimKey] = {}
        for info in private:
            ref = info.key_reference
            if ref is None or ref not in KEY_REFERENCES or ref in keys:
                log.warning("PrKDF entry %r: no usable key reference", info.label)
                continue
            public_key = self._public_key(public_by_id.get(info.id))
            cert_der, certificate = self._certificate(certs_by_id.pop(info.id, None))
            if public_key is None and certificate is not None:
                # No public-key file: the certificate is all there is (as OpenSC does).
                candidate = certificate.public_key()
                if isinstance(candidate, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                    public_key = candidate
            if certificate is not None and (
                public_key is None or certificate.public_key() != public_key
            ):
                log.warning("certificate %r does not match key %d: not shown", info.label, ref)
                cert_der, certificate = None, None
            keys[ref] = SimKey(ref, info, public_key, cert_der, certificate)
        for index, cert_info in enumerate(certs_by_id.values()):
            cert_der, certificate = self._certificate(cert_info)
            if certificate is not None:
                ref = LONE_CERT_BASE + index
                info = pkcs15.KeyInfo(
                    kind="cert", label=cert_info.label, id=cert_info.id, usage=frozenset(),
                    key_reference=None, auth_id=None, path=cert_info.path, value=None,
                    modulus_bits=None, private_flag=False,
                )  # fmt: skip
                keys[ref] = SimKey(ref, info, None, cert_der, certificate)
        return keys

    def _public_key(self, info: pkcs15.KeyInfo | None) -> PublicKey | None:
        if info is None:
            return None
        try:
            der = info.value if info.value is not None else self._read_file(info.path or b"")
            return None if not der else pkcs15.load_public_key(der, info.kind)
        except (TransportError, CardResetError):
            raise
        except (TokendError, ValueError) as exc:
            log.warning("public key %r unusable: %s", info.label, exc)
            return None

    def _certificate(
        self, info: pkcs15.CertificateInfo | None
    ) -> tuple[bytes | None, x509.Certificate | None]:
        if info is None:
            return None, None
        try:
            der = info.value if info.value is not None else self._read_file(info.path or b"")
            if not der:
                return None, None
            return der, x509.load_der_x509_certificate(der)
        except (TransportError, CardResetError):
            raise
        except (TokendError, ValueError) as exc:
            log.warning("certificate %r unusable: %s", info.label, exc)
            return None, None

    def _set_keys(self, keys: dict[int, SimKey]) -> None:
        self._keys = keys
        pairs: dict[int, KeyPair] = {}
        for ref, key in keys.items():
            usage = key.info.usage
            is_rsa = isinstance(key.public_key, rsa.RSAPublicKey)
            label = key.info.label or (f"Key {ref}" if ref < LONE_CERT_BASE else "Certificate")
            pairs[ref] = KeyPair(
                ref=ref,
                name=f"{ref:02x}",
                cka_id=key.info.id,
                label=label,
                public_key=key.public_key,
                cert_der=key.cert_der,
                certificate=key.certificate,
                # The applet signs and deciphers with RSA only (its ECDSA is SHA-1 on card).
                can_sign=is_rsa and bool(usage & {"sign", "signRecover", "nonRepudiation"}),
                can_decrypt=is_rsa and bool(usage & {"decrypt", "unwrap"}),
                local="local" in key.info.access_flags,
            )
        self._pairs = pairs
        objects: list[TokenObject] = []
        for ref in sorted(pairs):
            objects += key_pair_objects(pairs[ref])
        self._objects = tuple(objects)

    # -- the Token protocol --

    @property
    def identity(self) -> TokenIdentity:
        assert self._identity is not None
        return self._identity

    @property
    def info(self) -> TokenInfo:
        assert self._info is not None
        return self._info

    @property
    def iccid(self) -> str | None:
        return self._iccid

    def objects(self) -> Sequence[TokenObject]:
        return self._objects

    def refresh(self) -> None:
        """Re-read the PKCS#15 structures (after provisioning by another program)."""
        with self._session():
            keys = self._read_keys()
            self._set_keys(keys)
            self._marker = self._marker_of(self._iccid, keys)

    def mechanisms(self) -> Sequence[MechanismInfo]:
        return key_pair_mechanisms(
            rsa_min=RSA_BITS, rsa_max=RSA_BITS, raw_rsa=False, ecdsa=False, ecdh=False
        )

    def pin_status(self) -> PinStatus:
        with self._session():
            rapdu = self._send(cmd.verify(None))
            # 9000: verified (the card does not say how many tries; all of them, after a
            # successful VERIFY); 63Cx: x left. The PUK's counter is not readable.
            pin = retries_in(rapdu.sw)
            return PinStatus(pin_retries=pin, puk_retries=None)

    def login(self, pin: bytearray) -> None:
        with self._session():
            self._verify(pin)

    def _reselect(self) -> None:
        """SELECT the applet right before a command that names PIN reference 01. Another
        program may have selected another application on the basic channel since (the
        USIM, whose PIN1 is reference 01 too): without this, a wrong PIN typed for the PKI
        applet could count against the SIM's own PIN1."""
        if not self._send(self._select_command()).ok:
            raise TransportError(f"{self.APPLET_NAME} applet no longer answers SELECT")

    def _verify(self, pin: bytearray) -> None:
        block = PIN_FORMAT.block(pin)
        try:
            self._reselect()
            check_sw(self._send(cmd.verify(block)))
        finally:
            wipe(block)

    def logout(self) -> None:
        """The applet has no "reset security status": a SELECT forgets the PIN."""
        with self._session():
            check_sw(self._send(self._select_command()))

    # -- operations (the card pads and unpads PKCS#1 v1.5) --

    def key_pairs(self) -> Mapping[int, KeyPair]:
        return self._pairs

    @contextmanager
    def _card_section(self, context_pin: bytearray | None) -> Iterator[None]:
        with self._session():
            if context_pin is not None:
                self._verify(context_pin)
            yield

    def _mse(self, template: SeTemplate, alg: Alg, ref: int) -> None:
        check_sw(self._send(cmd.mse_set(template, alg, ref)))

    def _card_pkcs1_decrypt(self, pair: KeyPair, ciphertext: bytes) -> bytes:
        self._mse(SeTemplate.DECIPHER, Alg.RSA_PKCS1, pair.ref)
        rapdu = self._send(cmd.pso_decipher(ciphertext))
        # 6A80: the card found no valid padding (one uniform error, as for raw-RSA cards)
        return check_sw(rapdu, wrong_data=EncryptedDataInvalidError)

    def _card_pkcs1_sign(self, pair: KeyPair, digest_info: bytes) -> bytes:
        assert isinstance(pair.public_key, rsa.RSAPublicKey)
        self._mse(SeTemplate.SIGN, Alg.RSA_PKCS1, pair.ref)
        signature = check_sw(self._send(cmd.pso_sign(digest_info)))
        k = (pair.public_key.key_size + 7) // 8
        if len(signature) != k:
            raise DeviceError("card returned a signature of the wrong size")
        # The public key came from metadata anyone can write: a signature that does not
        # verify under it is refused rather than handed out.
        try:
            recovered = pair.public_key.recover_data_from_signature(
                signature, padding.PKCS1v15(), None
            )
        except InvalidSignature:
            raise DeviceError("the card's key does not match its public key") from None
        if recovered != digest_info:
            raise DeviceError("the card's key does not match its public key")
        return signature

    def _card_ecdsa(self, pair: KeyPair, digest: bytes) -> bytes:
        raise MechanismInvalidError("the SIM applet's ECDSA hashes with SHA-1 on the card")

    # -- provisioning: the PIN protects it (the applet has no management key) --

    profile = SIM_PROFILE

    def authenticate_management_key(self, key: bytes) -> None:
        """Nothing to authenticate: the application is logged in with the PIN, and the card
        itself refuses key and file changes without it (6982 = lost login)."""
        if key:
            raise FunctionNotSupportedError(NO_ADMIN_KEY)

    def set_management_key(
        self, new_key: bytes, alg: int = 0, *, require_touch: bool = False
    ) -> None:
        raise FunctionNotSupportedError(NO_ADMIN_KEY)

    def change_pin(self, old: bytearray, new: bytearray) -> None:
        first, second = PIN_FORMAT.block(old), PIN_FORMAT.block(new)
        try:
            with self._session():
                self._reselect()
                check_sw(self._send(cmd.change_pin(first, second)))
        finally:
            wipe(first)
            wipe(second)

    def unblock_pin(self, puk: bytearray, new: bytearray) -> None:
        first, second = PUK_FORMAT.block(puk), PIN_FORMAT.block(new)
        try:
            with self._session():
                self._reselect()
                check_sw(self._send(cmd.unblock_pin(first, second)))
        finally:
            wipe(first)
            wipe(second)

    def change_puk(self, old: bytearray, new: bytearray) -> None:
        raise FunctionNotSupportedError(
            "the IsoApplet's PUK is set once, when the SIM is initialised; it cannot change"
        )

    def reset(self) -> None:
        raise FunctionNotSupportedError(
            "the IsoApplet has no erase: delete keys one by one (tokenctl keys delete)"
        )

    def generate_key(
        self, slot: int, alg: int, pin_policy: int | None = None, touch_policy: int | None = None
    ) -> PublicKey:
        """RSA-2048 on the card into key reference ``slot`` (a key there is replaced)."""
        if alg != Alg.GEN_RSA_2048:
            raise ArgumentsBadError("a SIM generates RSA-2048 keys only")
        with self._session():
            self._mse(SeTemplate.GENERATE, Alg.GEN_RSA_2048, slot)
            try:
                n, e = cmd.parse_rsa_public(check_sw(self._send(cmd.generate_rsa())))
            except ValueError:
                raise DeviceError("malformed answer to GENERATE") from None
            public = rsa.RSAPublicNumbers(e, n).public_key()
            self._write_key_entries(slot, public, local=True)
        return public

    def import_key(
        self,
        slot: int,
        private_key: object,
        pin_policy: int | None = None,
        touch_policy: int | None = None,
    ) -> None:
        """PUT DATA import, where the applet build allows it (the default build does not)."""
        if not isinstance(private_key, rsa.RSAPrivateKey) or private_key.key_size != RSA_BITS:
            raise KeySizeRangeError("a SIM holds RSA-2048 keys only")
        numbers = private_key.private_numbers()
        command = cmd.put_rsa_key(numbers.p, numbers.q, numbers.iqmp, numbers.dmp1, numbers.dmq1)
        with self._session():
            self._mse(SeTemplate.GENERATE, Alg.GEN_RSA_2048, slot)
            rapdu = self._send(command)
            if rapdu.sw == SW.SW_COMMAND_NOT_ALLOWED:
                raise FunctionNotSupportedError(
                    "this SIM's applet is built without key import (PUT DATA answers 6900): "
                    "generate the key on the SIM instead (tokenctl keys generate)"
                )
            check_sw(rapdu)
            self._write_key_entries(slot, private_key.public_key(), local=False)

    def put_certificate(self, slot: int, der: bytes) -> None:
        cert = x509.load_der_x509_certificate(der)
        public = cert.public_key()
        key = self._keys.get(slot)
        if key is not None and key.public_key is not None:
            key_id = key.info.id
        elif isinstance(public, rsa.RSAPublicKey):
            key_id = pkcs15.native_id(public.public_numbers().n)
        else:
            key_id = bytes((slot,))
        path = self._df + (FID_CERTIFICATE_BASE + slot).to_bytes(2, "big")
        with self._session():
            self._replace_ef(FID_CERTIFICATE_BASE + slot, der)
            entry = pkcs15.build_certificate(label=role(slot)[0], cert_id=key_id, path=path)
            self._rewrite_directory(
                pkcs15.OdfKind.CERTIFICATES,
                lambda e: pkcs15.certificate_entry_is(e, key_id, path),
                entry,
            )

    def delete_certificate(self, slot: int) -> None:
        key = self._keys.get(slot)
        path = self._df + (FID_CERTIFICATE_BASE + slot).to_bytes(2, "big")
        key_id = key.info.id if key is not None else None
        with self._session():
            self._rewrite_directory(
                pkcs15.OdfKind.CERTIFICATES,
                lambda e: pkcs15.certificate_entry_is(e, key_id, path),
                None,
            )
            self._delete_ef(FID_CERTIFICATE_BASE + slot)

    def move_key(self, src: int, dst: int, *, with_certificate: bool = True) -> None:
        """Only deletion (``dst`` = DELETE_KEY): the applet cannot move keys between key
        references, and has no delete either, so the key material is overwritten with a
        fresh key nobody knows before its PKCS#15 entries go."""
        if dst != DELETE_KEY:
            raise FunctionNotSupportedError(
                "the SIM applet cannot move a key to another key reference (so no "
                "renew-encryption on a SIM yet: import the new key into a free reference)"
            )
        key = self._keys.get(src)
        with self._session():
            self._mse(SeTemplate.GENERATE, Alg.GEN_RSA_2048, src)
            check_sw(self._send(cmd.generate_rsa()))  # the old key is gone from the card
            key_id = key.info.id if key is not None else None
            public_path = self._df + (FID_PUBLIC_KEY_BASE + src).to_bytes(2, "big")
            self._rewrite_directory(
                pkcs15.OdfKind.PRIVATE_KEYS,
                lambda e: pkcs15.private_entry_has_reference(e, src),
                None,
            )
            self._rewrite_directory(
                pkcs15.OdfKind.PUBLIC_KEYS,
                lambda e: pkcs15.public_entry_is(e, key_id, public_path),
                None,
            )
            self._delete_ef(FID_PUBLIC_KEY_BASE + src)
            if with_certificate:
                self.delete_certificate(src)

    def status(self) -> TokenStatus:
        slots = []
        for ref in sorted(k for k in self._keys if k < LONE_CERT_BASE):
            key = self._keys[ref]
            public = key.public_key
            algorithm = None
            if isinstance(public, rsa.RSAPublicKey):
                algorithm = f"rsa{public.key_size}"
            elif isinstance(public, ec.EllipticCurvePublicKey):
                algorithm = {"secp256r1": "p256", "secp384r1": "p384"}.get(public.curve.name)
            slots.append(
                KeySlotInfo(
                    slot=f"{ref:02x}",
                    role=role(ref)[2],
                    algorithm=algorithm,
                    certificate=key.cert_der,
                    origin="generated" if "local" in key.info.access_flags else "imported",
                )
            )
        return TokenStatus(
            identity=self.identity,
            info=self.info,
            pin=self.pin_status(),
            slots=tuple(slots),
            version=f"IsoApplet {self._version[0]}.{self._version[1]}",
        )

    # -- writing the PKCS#15 structures (as pkcs15-init lays them out) --

    def _write_key_entries(self, ref: int, public: rsa.RSAPublicKey, *, local: bool) -> None:
        old = self._keys.get(ref)
        old_id = old.info.id if old is not None else None
        key_id = pkcs15.native_id(public.public_numbers().n)
        label, usage, _role_name = role(ref)
        public_path = self._df + (FID_PUBLIC_KEY_BASE + ref).to_bytes(2, "big")
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        self._replace_ef(FID_PUBLIC_KEY_BASE + ref, der)
        flags = (
            {"sensitive", "alwaysSensitive", "neverExtractable", "local"}
            if local
            else {"sensitive"}
        )
        self._rewrite_directory(
            pkcs15.OdfKind.PRIVATE_KEYS,
            lambda e: pkcs15.private_entry_has_reference(e, ref),
            pkcs15.build_private_rsa_key(
                label=label,
                key_id=key_id,
                usage=usage,
                key_reference=ref,
                auth_id=b"\xff",
                path=self._df,
                modulus_bits=public.key_size,
                access_flags=frozenset(flags),
            ),
        )
        public_usage = frozenset({"encrypt", "wrap"} if "decrypt" in usage else {"verify"})
        self._rewrite_directory(
            pkcs15.OdfKind.PUBLIC_KEYS,
            lambda e: (
                pkcs15.public_entry_is(e, old_id, public_path)
                or pkcs15.public_entry_is(e, key_id, public_path)
            ),
            pkcs15.build_public_rsa_key(
                label=label,
                key_id=key_id,
                usage=public_usage,
                path=public_path,
                modulus_bits=public.key_size,
            ),
        )

    def _select_df(self) -> None:
        check_sw(self._send(cmd.select_path(self._df, fcp=False)))

    def _delete_ef(self, fid: int) -> None:
        rapdu = self._send(cmd.delete_file(fid))
        if rapdu.sw != SW.SW_FILE_NOT_FOUND:
            check_sw(rapdu)

    def _replace_ef(self, fid: int, content: bytes, acl: bytes = ACL_OBJECT) -> None:
        """(Re)create EF ``fid`` in the PKCS#15 DF exactly as big as ``content``."""
        self._delete_ef(fid)
        self._select_df()
        fcp = cmd.fcp(fid, fdb=Fdb.TRANSPARENT_EF, size=len(content), acl=acl)
        check_sw(self._send(cmd.create_file(fcp)))
        for command in cmd.update_binary(0, content):  # the new file is the current one
            check_sw(self._send(command))

    def _directory_path(self, kind: pkcs15.OdfKind) -> bytes:
        """The directory file of ``kind``, created (512 bytes) and listed in the ODF when
        the SIM has none yet (pkcs15-init creates them with the first key or certificate)."""
        path = self._odf.get(kind)
        if path is not None:
            return path
        fid = {
            pkcs15.OdfKind.PRIVATE_KEYS: FID_PRKDF,
            pkcs15.OdfKind.PUBLIC_KEYS: FID_PUKDF,
            pkcs15.OdfKind.CERTIFICATES: FID_CDF,
        }[kind]
        self._select_df()
        fcp = cmd.fcp(fid, fdb=Fdb.TRANSPARENT_EF, size=DIRECTORY_SIZE, acl=ACL_DIRECTORY)
        check_sw(self._send(cmd.create_file(fcp)))
        path = self._df + fid.to_bytes(2, "big")
        odf_path = self._df + pkcs15.EF_ODF.to_bytes(2, "big")
        odf = self._read_file(odf_path)
        if odf is None:
            raise FunctionFailedError("the SIM has no PKCS#15 structure (initialise it first)")
        content = b"".join(pkcs15.split_elements(odf)) + pkcs15.build_odf([(kind, path)])
        self._write_padded(odf_path, content, len(odf))
        self._odf[kind] = path
        return path

    def _write_padded(self, path: bytes, content: bytes, size: int) -> None:
        if len(content) > size:
            raise DeviceMemoryError(f"PKCS#15 file {path.hex()} is full")
        check_sw(self._send(cmd.select_path(path, fcp=False)))
        for command in cmd.update_binary(0, content + bytes(size - len(content))):
            check_sw(self._send(command))

    def _rewrite_directory(
        self, kind: pkcs15.OdfKind, drop: Callable[[bytes], bool], add: bytes | None
    ) -> None:
        """Keep every entry of a directory file except those ``drop`` names (entries
        written by other tools are kept byte for byte), append ``add``."""
        path = self._directory_path(kind)
        data = self._read_file(path)
        if data is None:
            raise FunctionFailedError(f"PKCS#15 file {path.hex()} is missing")
        kept = [e for e in pkcs15.split_elements(data) if not drop(e)]
        content = b"".join(kept) + (add or b"")
        self._write_padded(path, content, len(data))


NO_ADMIN_KEY = "a SIM has no management key: the PIN protects provisioning"
