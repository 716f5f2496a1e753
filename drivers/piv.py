"""PIV applet driver (NIST SP 800-73-4, algorithm ids from SP 800-78-4), with the YubiKey
vendor extensions (INS FD/F8/F7/FE/FF/FB/F6) used only where the card offers them.

The driver sits on `tokend.iso7816.ApduChannel` over a `Transport` and does no I/O of its
own. The card does raw RSA and ECDSA/ECDH; padding, hashing, KDFs and DER conversions are
done here on the host (in constant time where secrets are involved).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokend.drivers.applet import SelectedApplet
from tokend.drivers.base import Transport
from tokend.errors import (
    ArgumentsBadError,
    CardResetError,
    DataInvalidError,
    DeviceError,
    KeySizeRangeError,
    PinIncorrectError,
    PinLenRangeError,
    TokendError,
    TransportError,
)
from tokend.iso7816 import (
    SW,
    CommandApdu,
    NotFoundError,
    PinEncoding,
    check_sw,
    encode_tlv,
    error_for_sw,
    find_tlv,
    parse_tlvs,
    retries_in,
)
from tokend.mechanisms import (
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
from tokend.piv.codes import (
    ALG_NAMES,
    DELETE_KEY,
    MANAGEMENT_KEY_REF,
    MGMT_KEY_LENGTHS,
    PIN_REF,
    PIV_AID,
    PIV_PIN,
    PUK_REF,
    RETIRED_SLOTS,
    STANDARD_SLOTS,
    TAG_CHALLENGE,
    TAG_CHUID_GUID,
    TAG_DYN_AUTH,
    TAG_EXPONENTIATION,
    TAG_GEN_ALGORITHM,
    TAG_GEN_TEMPLATE,
    TAG_HISTORY_OFF_CARD,
    TAG_HISTORY_ON_CARD,
    TAG_HISTORY_URL,
    TAG_META_ALGORITHM,
    TAG_META_RETRIES,
    TAG_OBJ_DATA,
    TAG_PUBLIC_KEY,
    TAG_RESPONSE,
    TAG_WITNESS,
    Ins,
    KeyOrigin,
    PinPolicy,
    PivAlgorithm,
    PivObject,
    PivSlot,
    TouchPolicy,
)
from tokend.piv.commands import (
    algorithm_of,
    certificate_object,
    dyn_auth,
    get_data_command,
    key_history_object,
    mgmt_block_size,
    mgmt_cipher,
    parse_public_key,
    policy_tlvs,
    put_data_command,
)
from tokend.piv.objects import SlotMetadata, certificate_der, parse_metadata
from tokend.piv.profile import PIV_PROFILE
from tokend.pkcs11 import CKF_TOKEN
from tokend.wipe import wipe

log = logging.getLogger(__name__)

__all__ = [
    "PIV_AID",
    "Ins",
    "KeyOrigin",
    "PinPolicy",
    "PivAlgorithm",
    "PivNotFoundError",
    "PivObject",
    "PivSlot",
    "PivToken",
    "SlotMetadata",
    "TouchPolicy",
    "error_for_sw",
]


#: 6A82 from a PIV card: the data object or key does not exist (the shared ISO class).
PivNotFoundError = NotFoundError


def _public_key(alg: PivAlgorithm, data: bytes) -> PublicKey:
    try:
        return parse_public_key(alg, data)
    except ValueError as exc:
        raise DeviceError(f"card returned a malformed public key: {exc}") from None


def pad_pin(pin: bytes | bytearray, *, digits_only: bool = True) -> bytearray:
    """The 8-byte PIN block (ASCII, FF-padded). The caller wipes the result. PUKs are any
    6-8 bytes (``digits_only=False``)."""
    return PIV_PIN.block(pin, encoding=None if digits_only else PinEncoding.UTF8)


# --- per-slot state ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SlotState:
    slot: PivSlot
    cert_der: bytes | None = None
    certificate: x509.Certificate | None = None
    public_key: PublicKey | None = None
    metadata: SlotMetadata | None = None

    @property
    def algorithm(self) -> PivAlgorithm | None:
        if self.metadata is not None and self.metadata.algorithm is not None:
            return self.metadata.algorithm
        return algorithm_of(self.public_key) if self.public_key is not None else None

    @property
    def has_key(self) -> bool:
        return self.public_key is not None and self.algorithm is not None

    @property
    def populated(self) -> bool:
        return self.cert_der is not None or self.has_key

    # usage per slot: 9C sign only, 9D/retired decrypt only, 9A both, 9E sign
    @property
    def can_sign(self) -> bool:
        return self.slot in (PivSlot.AUTHENTICATION, PivSlot.SIGNATURE, PivSlot.CARD_AUTH)

    @property
    def can_decrypt(self) -> bool:
        return self.slot in (PivSlot.AUTHENTICATION, PivSlot.KEY_MANAGEMENT) or self.slot.is_retired

    @property
    def always_authenticate(self) -> bool:
        if self.slot == PivSlot.SIGNATURE:
            return True
        policy = self.metadata.pin_policy if self.metadata else None
        return policy in (PinPolicy.ALWAYS, PinPolicy.MATCH_ALWAYS)

    def key_pair(self) -> KeyPair:
        """This slot as the shared object builder and operations see it."""
        origin = self.metadata.origin if self.metadata else None
        return KeyPair(
            ref=int(self.slot),
            name=self.slot.hex,
            cka_id=self.slot.cka_id,
            label=self.slot.label,
            public_key=self.public_key if self.has_key else None,
            cert_der=self.cert_der,
            certificate=self.certificate,
            can_sign=self.can_sign,
            can_decrypt=self.can_decrypt,
            always_authenticate=self.always_authenticate,
            local=origin == KeyOrigin.GENERATED,
        )


# --- the token -----------------------------------------------------------------------------


class PivToken(SelectedApplet, KeyPairToken):
    """One PIV card instance (one insertion). Implements `tokend.model.Token` plus the
    provisioning API used by `tokenctl` through the daemon."""

    AID = PIV_AID
    APPLET_NAME = "PIV"
    #: key slots, algorithms and the management key, for the generic provisioning layer
    profile = PIV_PROFILE

    def __init__(self, transport: Transport) -> None:
        super().__init__(transport)
        self._version: tuple[int, int, int] | None = None
        self._vendor_serial: int | None = None
        self._guid: bytes | None = None
        self._metadata_supported = True
        self._slots: dict[PivSlot, _SlotState] = {}
        self._objects: tuple[TokenObject, ...] = ()
        self._pairs: dict[int, KeyPair] = {}
        self._identity: TokenIdentity | None = None
        self._info: TokenInfo | None = None

    def _identity_marker(self) -> bytes | None:
        return self._guid

    def _read_identity_marker(self) -> bytes | None:
        return self._read_guid()

    def _read_card(self) -> None:
        self._version = self._get_version()
        self._vendor_serial = self._get_serial()
        self._guid = self._read_guid()
        self._read_slots()
        self._identity = TokenIdentity(
            applet="PIV", serial=self._identity_serial(), atr=self._transport.atr()
        )
        serial = self._identity.serial
        version = self._version or (1, 0, 0)
        self._info = TokenInfo(
            label=f"PIV #{serial[:8]}",
            manufacturer_id="Unknown" if self._version is None else "PIV (YubiKey-compatible)",
            model="PIV",
            serial_number=serial[:16],
            flags=CKF_TOKEN.CKF_LOGIN_REQUIRED
            | CKF_TOKEN.CKF_USER_PIN_INITIALIZED
            | CKF_TOKEN.CKF_TOKEN_INITIALIZED,
            firmware_version=(version[0], version[1]),
        )

    def _identity_serial(self) -> str:
        if self._guid is not None:
            return self._guid.hex()
        if self._vendor_serial is not None:
            return str(self._vendor_serial)
        digest = hashlib.sha256(self._transport.atr())
        for slot in PivSlot:
            state = self._slots.get(slot)
            if state is not None and state.cert_der is not None:
                digest.update(state.cert_der)
        return digest.hexdigest()[:32]

    def _get_version(self) -> tuple[int, int, int] | None:
        rapdu = self._send(CommandApdu(0, Ins.GET_VERSION, 0, 0, le=0))
        if rapdu.ok and len(rapdu.data) >= 3:
            return rapdu.data[0], rapdu.data[1], rapdu.data[2]
        return None  # plain PIV card (6D00) or unexpected answer

    def _get_serial(self) -> int | None:
        rapdu = self._send(CommandApdu(0, Ins.GET_SERIAL, 0, 0, le=0))
        if rapdu.ok and len(rapdu.data) == 4:
            return int.from_bytes(rapdu.data, "big")
        return None

    def _get_object(self, obj: int) -> bytes | None:
        """The value of the 53 wrapper of a data object, or None if the card has none."""
        rapdu = self._send(get_data_command(obj))
        if rapdu.sw == SW.SW_FILE_NOT_FOUND:
            return None
        data = check_sw(rapdu)
        try:
            content = find_tlv(data, TAG_OBJ_DATA)
        except ValueError:
            raise DeviceError(f"malformed data object {obj:X}") from None
        return content or None  # "53 00" is an emptied object

    def _put_object(self, obj: int, content: bytes) -> None:
        check_sw(self._send(put_data_command(obj, content)))

    def _read_guid(self) -> bytes | None:
        try:
            chuid = self._get_object(PivObject.CHUID)
            guid = find_tlv(chuid, TAG_CHUID_GUID) if chuid else None
        except (TransportError, CardResetError):
            raise
        except (TokendError, ValueError):  # any card refusal: treat as absent
            return None
        if not guid or not any(guid):
            return None  # absent or all zero: no usable identity here
        return guid

    def _read_key_history(self) -> tuple[int, int, bytes | None] | None:
        try:
            content = self._get_object(PivObject.KEY_HISTORY)
            if content is None:
                return None
            on = find_tlv(content, TAG_HISTORY_ON_CARD)
            off = find_tlv(content, TAG_HISTORY_OFF_CARD)
            url = find_tlv(content, TAG_HISTORY_URL)
        except (TransportError, CardResetError):
            raise
        except (TokendError, ValueError):  # any card refusal: treat as absent
            return None
        return (on[0] if on else 0), (off[0] if off else 0), url

    def _read_certificate(self, slot: PivSlot) -> tuple[bytes, x509.Certificate] | None:
        try:
            content = self._get_object(slot.object_id)
        except (TransportError, CardResetError):
            raise
        except TokendError:  # any card refusal: treat as absent
            log.warning("slot %02X: unreadable certificate object", slot)
            return None
        if content is None:
            return None
        try:
            der = certificate_der(content)
        except ValueError:
            log.warning("slot %02X: unreadable certificate object", slot)
            return None
        if der is None:
            return None
        try:
            return der, x509.load_der_x509_certificate(der)
        except ValueError:
            log.warning("slot %02X: certificate is not valid DER", slot)
            return None

    def _get_metadata(self, ref: int) -> dict[int, bytes] | None:
        """Raw GET METADATA TLVs, or None when the card has no such key or no F7 at all."""
        if not self._metadata_supported:
            return None
        rapdu = self._send(CommandApdu(0, Ins.GET_METADATA, 0, ref, le=0))
        if rapdu.sw in (SW.SW_INS_NOT_SUPPORTED, SW.SW_CLA_NOT_SUPPORTED):
            self._metadata_supported = False
            return None
        if not rapdu.ok:
            return None
        try:
            return {t.tag: t.value for t in parse_tlvs(rapdu.data)}
        except ValueError:
            return None

    def _slot_metadata(self, slot: PivSlot) -> SlotMetadata | None:
        raw = self._get_metadata(slot)
        if raw is None:
            return None
        try:
            return parse_metadata(raw)
        except ValueError as exc:
            raise DeviceError(f"card returned a malformed public key: {exc}") from None

    def _read_slot(self, slot: PivSlot, known_key: PublicKey | None = None) -> _SlotState:
        """Read one slot. ``known_key`` is a public key this driver just generated or
        imported there: fresher than a certificate that may predate it."""
        cert = self._read_certificate(slot)
        metadata = self._slot_metadata(slot)
        # with GET METADATA the card says whether a key exists; without it, assume a key
        # behind every certificate (as OpenSC and ykcs11 do)
        key_known = metadata is not None or not self._metadata_supported
        public: PublicKey | None = None
        if metadata is not None and metadata.public_key is not None:
            public = metadata.public_key
        elif key_known and known_key is not None:
            public = known_key
        elif key_known and cert is not None:
            key = cert[1].public_key()
            if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                public = key
        return _SlotState(
            slot=slot,
            cert_der=cert[0] if cert else None,
            certificate=cert[1] if cert else None,
            public_key=public,
            metadata=metadata,
        )

    def _read_slots(self) -> None:
        slots: dict[PivSlot, _SlotState] = {}
        for slot in STANDARD_SLOTS:
            state = self._read_slot(slot)
            if state.populated:
                slots[slot] = state
        history = self._read_key_history()
        # Key History counts the retired keys with on-card certificates; walk 82.. until
        # that many are found. Without it (or with off-card keys) try all twenty.
        wanted = 20 if history is None or history[1] > 0 else history[0]
        found = 0
        for slot in RETIRED_SLOTS:
            if found >= wanted:
                break
            state = self._read_slot(slot)
            if state.populated:
                slots[slot] = state
                found += int(state.cert_der is not None and state.has_key)
        self._slots = slots
        self._rebuild_objects()

    def _reload(self, *slots: PivSlot, generated: dict[PivSlot, PublicKey] | None = None) -> None:
        generated = generated or {}
        for slot in slots:
            state = self._read_slot(slot, known_key=generated.get(slot))
            if state.populated:
                self._slots[slot] = state
            else:
                self._slots.pop(slot, None)
        self._rebuild_objects()

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
    def version(self) -> tuple[int, int, int] | None:
        """Vendor GET VERSION, None on plain PIV cards."""
        return self._version

    def objects(self) -> Sequence[TokenObject]:
        return self._objects

    def refresh(self) -> None:
        """Re-read every slot (after provisioning by another program)."""
        with self._session():
            self._read_slots()

    def mechanisms(self) -> Sequence[MechanismInfo]:
        rsa_bits = [
            s.public_key.key_size
            for s in self._slots.values()
            if isinstance(s.public_key, rsa.RSAPublicKey)
        ]
        rsa_max = max([2048, *rsa_bits])
        if self._version is not None and self._version >= (5, 7, 0):
            rsa_max = 4096
        return key_pair_mechanisms(rsa_max=rsa_max)

    def pin_status(self) -> PinStatus:
        with self._session():
            rapdu = self._send(CommandApdu(0, Ins.VERIFY, 0, PIN_REF))
            # 9000 = verified: then the count is only in the metadata
            pin = 0 if rapdu.sw == SW.SW_AUTH_METHOD_BLOCKED else retries_in(rapdu.sw)
            if pin is None:
                pin = self._retries_from_metadata(PIN_REF)
            return PinStatus(pin_retries=pin, puk_retries=self._retries_from_metadata(PUK_REF))

    def _retries_from_metadata(self, ref: int) -> int | None:
        raw = self._get_metadata(ref)
        if raw is None or len(raw.get(TAG_META_RETRIES, b"")) < 2:
            return None
        return raw[TAG_META_RETRIES][1]

    def login(self, pin: bytearray) -> None:
        with self._session():
            self._verify(pin)

    def _verify(self, pin: bytearray) -> None:
        block = pad_pin(pin)
        try:
            check_sw(self._send(CommandApdu(0, Ins.VERIFY, 0, PIN_REF, bytes(block))))
        finally:
            wipe(block)

    def logout(self) -> None:
        with self._session():
            check_sw(self._send(CommandApdu(0, Ins.VERIFY, 0xFF, PIN_REF)))

    # -- operations --

    def key_pairs(self) -> Mapping[int, KeyPair]:
        return self._pairs

    @contextmanager
    def _card_section(self, context_pin: bytearray | None) -> Iterator[None]:
        with self._session():
            if context_pin is not None:
                self._verify(context_pin)
            yield

    def _general_authenticate(
        self,
        pair: KeyPair,
        tag: int,
        payload: bytes,
        *,
        wrong_data: type[TokendError] = DataInvalidError,
    ) -> bytes:
        state = self._slots[PivSlot(pair.ref)]
        assert state.algorithm is not None
        data = dyn_auth((TAG_RESPONSE, b""), (tag, payload))
        rapdu = self._send(
            CommandApdu(0, Ins.GENERAL_AUTHENTICATE, state.algorithm, state.slot, data, le=0)
        )
        body = check_sw(rapdu, wrong_data=wrong_data)
        try:
            template = find_tlv(body, TAG_DYN_AUTH)
            result = find_tlv(template, TAG_RESPONSE) if template is not None else None
        except ValueError:
            result = None
        if result is None:
            raise DeviceError("GENERAL AUTHENTICATE answer has no response tag")
        return result

    def _card_rsa(self, pair: KeyPair, block: bytes, *, wrong_data: type[TokendError]) -> bytes:
        assert isinstance(pair.public_key, rsa.RSAPublicKey)
        k = (pair.public_key.key_size + 7) // 8
        result = self._general_authenticate(pair, TAG_CHALLENGE, block, wrong_data=wrong_data)
        if len(result) > k:
            raise DeviceError("RSA result longer than the modulus")
        return result.rjust(k, b"\x00")

    def _card_ecdsa(self, pair: KeyPair, digest: bytes) -> bytes:
        return self._general_authenticate(pair, TAG_CHALLENGE, digest)

    def _card_ecdh(self, pair: KeyPair, point: bytes) -> bytes:
        return self._general_authenticate(pair, TAG_EXPONENTIATION, point)

    # -- provisioning --

    def _mgmt_algorithm(self, key: bytes) -> PivAlgorithm:
        raw = self._get_metadata(MANAGEMENT_KEY_REF)
        if raw is not None and raw.get(TAG_META_ALGORITHM):
            try:
                return PivAlgorithm(raw[TAG_META_ALGORITHM][0])
            except ValueError:
                pass
        by_len = {24: PivAlgorithm.TDES, 16: PivAlgorithm.AES_128, 32: PivAlgorithm.AES_256}
        if len(key) not in by_len:
            raise PinLenRangeError("management key must be 16, 24 or 32 bytes")
        return by_len[len(key)]

    def authenticate_management_key(self, key: bytes) -> None:
        """Mutual authentication with the card management key 9B (SP 800-73-4 part 2
        appendix A.1): the card proves the key too. Wrong key → PinIncorrectError."""
        with self._session():
            alg = self._mgmt_algorithm(key)
            if len(key) != MGMT_KEY_LENGTHS.get(alg, -1):
                raise PinLenRangeError(f"management key for {alg.name} has the wrong length")
            try:
                cipher = mgmt_cipher(alg, key)
            except ValueError:
                raise ArgumentsBadError(f"{alg.name} is not a management key algorithm") from None
            block = mgmt_block_size(alg)
            answer = check_sw(
                self._send(
                    CommandApdu(
                        0,
                        Ins.GENERAL_AUTHENTICATE,
                        alg,
                        MANAGEMENT_KEY_REF,
                        dyn_auth((TAG_WITNESS, b"")),
                        le=0,
                    )
                )
            )
            witness_enc = find_tlv(find_tlv(answer, TAG_DYN_AUTH) or b"", TAG_WITNESS)
            if witness_enc is None or len(witness_enc) != block:
                raise DeviceError("card sent no witness")
            decryptor = cipher.decryptor()
            witness = decryptor.update(witness_enc) + decryptor.finalize()
            challenge = os.urandom(block)
            rapdu = self._send(
                CommandApdu(
                    0,
                    Ins.GENERAL_AUTHENTICATE,
                    alg,
                    MANAGEMENT_KEY_REF,
                    dyn_auth((TAG_WITNESS, witness), (TAG_CHALLENGE, challenge)),
                    le=0,
                )
            )
            if (
                rapdu.sw in (SW.SW_WRONG_DATA, SW.SW_SECURITY_STATUS_NOT_SATISFIED)
                or retries_in(rapdu.sw) is not None
            ):
                raise PinIncorrectError("management key incorrect")
            answer = check_sw(rapdu)
            response = find_tlv(find_tlv(answer, TAG_DYN_AUTH) or b"", TAG_RESPONSE)
            encryptor = cipher.encryptor()
            expected = encryptor.update(challenge) + encryptor.finalize()
            if response is None or not hmac.compare_digest(response, expected):
                raise DeviceError("card failed to prove the management key")

    def generate_key(
        self,
        slot: PivSlot,
        alg: PivAlgorithm,
        pin_policy: PinPolicy | None = None,
        touch_policy: TouchPolicy | None = None,
    ) -> PublicKey:
        """GENERATE ASYMMETRIC KEY PAIR in ``slot`` (needs management-key authentication).
        The slot's old certificate no longer matches; write a new one with put_certificate."""
        slot, alg = PivSlot(slot), PivAlgorithm(alg)
        if not (alg.is_rsa or alg.is_ec):
            raise KeySizeRangeError(f"{alg.name} is not an asymmetric algorithm")
        template = [encode_tlv(TAG_GEN_ALGORITHM, bytes((alg,)))]
        template += policy_tlvs(pin_policy, touch_policy)
        apdu = CommandApdu(
            0,
            Ins.GENERATE_ASYMMETRIC_KEY_PAIR,
            0,
            slot,
            encode_tlv(TAG_GEN_TEMPLATE, template),
            le=0,
        )
        with self._session():
            body = check_sw(self._send(apdu), wrong_data=KeySizeRangeError)
            try:
                inner = find_tlv(body, TAG_PUBLIC_KEY)
            except ValueError:
                inner = None
            if inner is None:
                raise DeviceError("GENERATE answer has no public key")
            public = _public_key(alg, inner)
            self._reload(slot, generated={slot: public})
        return public

    def import_key(
        self,
        slot: PivSlot,
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        pin_policy: PinPolicy | None = None,
        touch_policy: TouchPolicy | None = None,
    ) -> None:
        """Vendor IMPORT ASYMMETRIC KEY (INS FE); needs management-key authentication."""
        slot = PivSlot(slot)
        alg = algorithm_of(private_key)
        if alg is None:
            raise KeySizeRangeError("unsupported key type or size")
        if isinstance(private_key, rsa.RSAPrivateKey):
            numbers = private_key.private_numbers()
            if numbers.public_numbers.e != 65537:
                raise ArgumentsBadError("PIV cards need the public exponent 65537")
            half = private_key.key_size // 16
            parts = [
                (0x01, numbers.p),
                (0x02, numbers.q),
                (0x03, numbers.dmp1),
                (0x04, numbers.dmq1),
                (0x05, numbers.iqmp),
            ]
            items = [encode_tlv(tag, value.to_bytes(half, "big")) for tag, value in parts]
            public: PublicKey = private_key.public_key()
        else:
            size = (private_key.curve.key_size + 7) // 8
            items = [
                encode_tlv(0x06, private_key.private_numbers().private_value.to_bytes(size, "big"))
            ]
            public = private_key.public_key()
        items += policy_tlvs(pin_policy, touch_policy)
        data = bytearray(b"".join(items))
        try:
            with self._session():
                check_sw(self._send(CommandApdu(0, Ins.IMPORT_KEY, alg, slot, bytes(data))))
                self._reload(slot, generated={slot: public})
        finally:
            wipe(data)

    def put_certificate(self, slot: PivSlot, der: bytes) -> None:
        slot = PivSlot(slot)
        try:
            x509.load_der_x509_certificate(der)
        except ValueError:
            raise ArgumentsBadError("not a DER X.509 certificate") from None
        with self._session():
            self._put_object(slot.object_id, certificate_object(der))
            self._reload(slot, generated=self._known_keys(slot))
            if slot.is_retired:
                self._sync_key_history()

    def delete_certificate(self, slot: PivSlot) -> None:
        slot = PivSlot(slot)
        with self._session():
            self._put_object(slot.object_id, b"")
            self._reload(slot, generated=self._known_keys(slot))
            if slot.is_retired:
                self._sync_key_history()

    def _known_keys(self, slot: PivSlot) -> dict[PivSlot, PublicKey]:
        state = self._slots.get(slot)
        if state is None or state.public_key is None:
            return {}
        return {slot: state.public_key}

    def move_key(self, src: PivSlot, dst: PivSlot | int, *, with_certificate: bool = True) -> None:
        """Vendor MOVE KEY (INS F6). ``dst`` 0xFF deletes the key. The certificate moves
        with the key (or is deleted with it) unless ``with_certificate`` is False."""
        src = PivSlot(src)
        delete = dst == DELETE_KEY
        target = None if delete else PivSlot(dst)
        with self._session():
            cert_der = self._slots[src].cert_der if src in self._slots else None
            known = self._known_keys(src)
            check_sw(
                self._send(CommandApdu(0, Ins.MOVE_KEY, DELETE_KEY if delete else target, src))
            )
            touched = [src]
            if with_certificate and cert_der is not None:
                if target is not None:
                    self._put_object(target.object_id, certificate_object(cert_der))
                self._put_object(src.object_id, b"")
            if target is not None:
                touched.append(target)
                moved = {target: known[src]} if src in known else {}
            else:
                moved = {}
            self._reload(*touched, generated=moved)
            if src.is_retired or (target is not None and target.is_retired):
                self._sync_key_history()

    def _sync_key_history(self) -> None:
        """Key History (5FC10C) C1 = retired keys whose certificate is on the card
        (SP 800-73-4 part 1 §3.3.2); the off-card count and URL are kept as they were."""
        on_card = sum(
            1 for s in self._slots.values() if s.slot.is_retired and s.cert_der and s.has_key
        )
        current = self._read_key_history()
        if current is not None and current[0] == on_card:
            return
        off, url = (current[1], current[2]) if current else (0, None)
        self._put_object(PivObject.KEY_HISTORY, key_history_object(on_card, off, url))

    def change_pin(self, old: bytearray, new: bytearray) -> None:
        self._change_reference(Ins.CHANGE_REFERENCE_DATA, PIN_REF, old, new, digits=(True, True))

    def change_puk(self, old: bytearray, new: bytearray) -> None:
        self._change_reference(Ins.CHANGE_REFERENCE_DATA, PUK_REF, old, new, digits=(False, False))

    def unblock_pin(self, puk: bytearray, new: bytearray) -> None:
        self._change_reference(Ins.RESET_RETRY_COUNTER, PIN_REF, puk, new, digits=(False, True))

    def _change_reference(
        self, ins: Ins, ref: int, first: bytearray, second: bytearray, *, digits: tuple[bool, bool]
    ) -> None:
        a = pad_pin(first, digits_only=digits[0])
        try:
            b = pad_pin(second, digits_only=digits[1])
        except TokendError:
            wipe(a)
            raise
        data = a + b
        try:
            with self._session():
                check_sw(self._send(CommandApdu(0, ins, 0, ref, bytes(data))))
        finally:
            wipe(a)
            wipe(b)
            wipe(data)

    def set_management_key(
        self, new_key: bytes, alg: PivAlgorithm = PivAlgorithm.TDES, *, require_touch: bool = False
    ) -> None:
        """Vendor SET MANAGEMENT KEY (INS FF); needs management-key authentication first."""
        alg = PivAlgorithm(alg)
        if len(new_key) != MGMT_KEY_LENGTHS.get(alg, -1):
            raise ArgumentsBadError(
                f"{alg.name} management keys are {MGMT_KEY_LENGTHS.get(alg)} bytes"
            )
        data = bytes((alg, MANAGEMENT_KEY_REF, len(new_key))) + bytes(new_key)
        with self._session():
            check_sw(
                self._send(
                    CommandApdu(
                        0, Ins.SET_MANAGEMENT_KEY, 0xFF, 0xFE if require_touch else 0xFF, data
                    )
                )
            )

    def reset(self) -> None:
        """Vendor RESET (INS FB): blocks PIN and PUK first (the card only resets then), with
        an all-FF block that can never be a real PIN, then erases keys, certificates and
        PIN/PUK/management key to the defaults."""
        with self._session():
            # An all-FF block is never a PIV PIN (6-8 digits); to burn PUK tries, RESET
            # RETRY COUNTER carries that PUK with a well-formed new PIN, so a card that checks
            # the new PIN's format first still counts the try.
            never_puk = b"\xff" * 8 + b"00000000"
            for ins, data in ((Ins.VERIFY, b"\xff" * 8), (Ins.RESET_RETRY_COUNTER, never_puk)):
                for _ in range(16):
                    sw = self._send(CommandApdu(0, ins, 0, PIN_REF, data)).sw
                    if sw == SW.SW_AUTH_METHOD_BLOCKED or retries_in(sw) == 0:
                        break
                    if retries_in(sw) is None:
                        raise error_for_sw(sw) if sw != SW.SW_OK else DeviceError("PIN not blocked")
            check_sw(self._send(CommandApdu(0, Ins.RESET, 0, 0)))
            self._metadata_supported = True
            self._read_slots()

    def status(self) -> TokenStatus:
        slots = []
        for slot in PivSlot:
            state = self._slots.get(slot)
            if state is None:
                continue
            alg = state.algorithm
            origin = state.metadata.origin if state.metadata else None
            slots.append(
                KeySlotInfo(
                    slot=slot.hex,
                    role=slot.role,
                    algorithm=ALG_NAMES.get(alg) if alg is not None else None,
                    certificate=state.cert_der,
                    origin=origin.name.lower() if origin is not None else None,
                )
            )
        version = ".".join(map(str, self._version)) if self._version else None
        return TokenStatus(
            identity=self.identity,
            info=self.info,
            pin=self.pin_status(),
            slots=tuple(slots),
            version=version,
        )

    def slot_metadata(self, slot: PivSlot) -> SlotMetadata | None:
        state = self._slots.get(PivSlot(slot))
        return state.metadata if state else None

    # -- PKCS#11 objects --

    def _rebuild_objects(self) -> None:
        pairs: dict[int, KeyPair] = {}
        objects: list[TokenObject] = []
        for slot in PivSlot:
            state = self._slots.get(slot)
            if state is not None:
                pair = state.key_pair()
                pairs[slot] = pair
                objects += key_pair_objects(pair)
        self._pairs = pairs
        self._objects = tuple(objects)
