"""A key pair with its certificate, written once for every applet: the PKCS#11 objects it
shows (`key_pair_objects`), the mechanisms it offers (`key_pair_mechanisms`) and the
host side of every operation (`KeyPairToken`: checks, padding, hashing, DER conversions,
the X9.63 KDF). A driver supplies only its key list and the raw card operations — raw RSA,
ECDSA, ECDH, or card-side PKCS#1 v1.5 for cards that pad and strip padding themselves.

No I/O here: `KeyPairToken` calls the driver's hooks, which do the card I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

from asn1crypto import core as asn1_core
from asn1crypto import keys as asn1_keys
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from tokend.errors import (
    DataInvalidError,
    DataLenRangeError,
    DeviceError,
    EncryptedDataInvalidError,
    EncryptedDataLenRangeError,
    KeyFunctionNotPermittedError,
    KeyHandleInvalidError,
    KeyTypeInconsistentError,
    MechanismInvalidError,
    MechanismParamInvalidError,
    TokendError,
    UserNotLoggedInError,
)
from tokend.mechanisms.rsa_padding import (
    DIGEST_INFO,
    oaep_unpad,
    pkcs1v15_sign_pad,
    pkcs1v15_unpad,
    pss_encode,
)
from tokend.mechanisms.tables import (
    DECRYPT_MECHANISMS,
    ECDSA_HASHED,
    HASH_OF_CKM,
    HASH_OF_MGF,
    KDF_HASHES,
    RSA_PKCS_HASHED,
    RSA_PSS_HASHED,
    RSA_SIGN_MECHANISMS,
    SIGN_MECHANISMS,
    mechanism_name,
)
from tokend.model import (
    AttributeValue,
    Ecdh1DeriveParams,
    Mechanism,
    MechanismInfo,
    OaepParams,
    ObjectKey,
    ObjectKind,
    PssParams,
    TokenObject,
)
from tokend.pkcs11 import CKA, CKC, CKD, CKF_MECH, CKK, CKM, CKO

__all__ = [
    "KeyPair",
    "KeyPairToken",
    "PublicKey",
    "ecdh_kdf",
    "ecdh_peer_point",
    "ecdsa_input",
    "ecdsa_raw_signature",
    "field_len",
    "key_pair_mechanisms",
    "key_pair_objects",
    "rsa_sign_block",
]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class KeyPair:
    """One key reference of a token as PKCS#11 sees it: a key pair (``public_key`` set) with
    or without its certificate, or a lone certificate (``public_key`` None)."""

    ref: int  # the applet's key reference (PIV key slot, PKCS#15 key reference)
    name: str  # short text for messages ("9d")
    cka_id: bytes
    label: str
    public_key: PublicKey | None = None
    cert_der: bytes | None = None
    certificate: x509.Certificate | None = None
    can_sign: bool = False
    can_decrypt: bool = False  # RSA: decrypt/unwrap; EC: derive
    #: the PIN must come with every use (CKA_ALWAYS_AUTHENTICATE)
    always_authenticate: bool = False
    #: generated on the token (CKA_LOCAL, CKA_NEVER_EXTRACTABLE)
    local: bool = False

    @property
    def has_key(self) -> bool:
        return self.public_key is not None


# --- the object builder --------------------------------------------------------------------


def key_pair_objects(pair: KeyPair) -> list[TokenObject]:
    """The certificate, private-key and public-key objects of one key reference."""
    common: dict[CKA, AttributeValue] = {
        CKA.CKA_TOKEN: True,
        CKA.CKA_ID: pair.cka_id,
        CKA.CKA_LABEL: pair.label,
        CKA.CKA_MODIFIABLE: False,
    }
    subject = pair.certificate.subject.public_bytes() if pair.certificate else b""
    out: list[TokenObject] = []
    if pair.certificate is not None and pair.cert_der is not None:
        cert = pair.certificate
        out.append(
            TokenObject(
                ObjectKey(ObjectKind.CERTIFICATE, pair.ref),
                {
                    CKA.CKA_CLASS: CKO.CKO_CERTIFICATE,
                    **common,
                    CKA.CKA_PRIVATE: False,
                    CKA.CKA_CERTIFICATE_TYPE: CKC.CKC_X_509,
                    CKA.CKA_TRUSTED: False,
                    CKA.CKA_VALUE: pair.cert_der,
                    CKA.CKA_SUBJECT: subject,
                    CKA.CKA_ISSUER: cert.issuer.public_bytes(),
                    CKA.CKA_SERIAL_NUMBER: asn1_core.Integer(cert.serial_number).dump(),
                },
            )
        )
    public = pair.public_key
    if public is None:
        return out
    key_attrs: dict[CKA, AttributeValue]
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        key_attrs = {
            CKA.CKA_KEY_TYPE: CKK.CKK_RSA,
            CKA.CKA_MODULUS: _int_bytes(numbers.n),
            CKA.CKA_PUBLIC_EXPONENT: _int_bytes(numbers.e),
            CKA.CKA_MODULUS_BITS: public.key_size,
        }
        is_rsa = True
    else:
        key_attrs = {
            CKA.CKA_KEY_TYPE: CKK.CKK_EC,
            CKA.CKA_EC_PARAMS: asn1_keys.ECDomainParameters(
                name="named", value=public.curve.name
            ).dump(),
            CKA.CKA_EC_POINT: asn1_core.OctetString(_uncompressed(public)).dump(),
        }
        is_rsa = False
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out.append(
        TokenObject(
            ObjectKey(ObjectKind.PRIVATE_KEY, pair.ref),
            {
                CKA.CKA_CLASS: CKO.CKO_PRIVATE_KEY,
                **common,
                **key_attrs,
                CKA.CKA_PRIVATE: True,
                CKA.CKA_SUBJECT: subject,
                CKA.CKA_SENSITIVE: True,
                CKA.CKA_ALWAYS_SENSITIVE: True,
                CKA.CKA_EXTRACTABLE: False,
                CKA.CKA_NEVER_EXTRACTABLE: pair.local,
                CKA.CKA_LOCAL: pair.local,
                CKA.CKA_DECRYPT: is_rsa and pair.can_decrypt,
                CKA.CKA_UNWRAP: is_rsa and pair.can_decrypt,
                CKA.CKA_DERIVE: (not is_rsa) and pair.can_decrypt,
                CKA.CKA_SIGN: pair.can_sign,
                CKA.CKA_SIGN_RECOVER: False,
                CKA.CKA_ALWAYS_AUTHENTICATE: pair.always_authenticate,
                CKA.CKA_PUBLIC_KEY_INFO: spki,
            },
        )
    )
    out.append(
        TokenObject(
            ObjectKey(ObjectKind.PUBLIC_KEY, pair.ref),
            {
                CKA.CKA_CLASS: CKO.CKO_PUBLIC_KEY,
                **common,
                **key_attrs,
                CKA.CKA_PRIVATE: False,
                CKA.CKA_SUBJECT: subject,
                CKA.CKA_ENCRYPT: is_rsa and pair.can_decrypt,
                CKA.CKA_WRAP: is_rsa and pair.can_decrypt,
                CKA.CKA_VERIFY: pair.can_sign,
                CKA.CKA_VERIFY_RECOVER: False,
                CKA.CKA_DERIVE: False,
                CKA.CKA_PUBLIC_KEY_INFO: spki,
            },
        )
    )
    return out


def key_pair_mechanisms(
    *,
    rsa_max: int,
    rsa_min: int = 1024,
    ec_min: int = 256,
    ec_max: int = 384,
    raw_rsa: bool = True,
    ecdsa: bool = True,
    ecdh: bool = True,
) -> tuple[MechanismInfo, ...]:
    """The mechanism list of a key-pair token. ``raw_rsa`` False: the card pads PKCS#1 v1.5
    itself, so only RSA_PKCS and its hashed forms are offered (no OAEP, PSS or X.509)."""
    hw = CKF_MECH.CKF_HW
    ec_flags = CKF_MECH.CKF_EC_F_P | CKF_MECH.CKF_EC_NAMED_CURVE | CKF_MECH.CKF_EC_UNCOMPRESSED
    out = [
        MechanismInfo(
            CKM.CKM_RSA_PKCS, rsa_min, rsa_max, hw | CKF_MECH.CKF_DECRYPT | CKF_MECH.CKF_SIGN
        )
    ]
    if raw_rsa:
        out += [
            MechanismInfo(CKM.CKM_RSA_PKCS_OAEP, rsa_min, rsa_max, hw | CKF_MECH.CKF_DECRYPT),
            MechanismInfo(CKM.CKM_RSA_X_509, rsa_min, rsa_max, hw | CKF_MECH.CKF_DECRYPT),
        ]
    signing = (
        (*RSA_PKCS_HASHED, CKM.CKM_RSA_PKCS_PSS, *RSA_PSS_HASHED)
        if raw_rsa
        else (*RSA_PKCS_HASHED,)
    )
    out += [MechanismInfo(m, rsa_min, rsa_max, hw | CKF_MECH.CKF_SIGN) for m in signing]
    if ecdsa:
        out += [
            MechanismInfo(m, ec_min, ec_max, hw | CKF_MECH.CKF_SIGN | ec_flags)
            for m in (CKM.CKM_ECDSA, *ECDSA_HASHED)
        ]
    if ecdh:
        out.append(
            MechanismInfo(CKM.CKM_ECDH1_DERIVE, ec_min, ec_max, hw | CKF_MECH.CKF_DERIVE | ec_flags)
        )
    return tuple(out)


# --- inputs and outputs of the card operations (pure) ------------------------------------


def rsa_sign_block(public: rsa.RSAPublicKey, mechanism: Mechanism, data: bytes) -> bytes:
    """The modulus-sized block a raw-RSA card signs, for RSA_PKCS, SHAx_RSA_PKCS and PSS."""
    mech = mechanism.mechanism
    k = (public.key_size + 7) // 8
    if mech == CKM.CKM_RSA_PKCS:
        return pkcs1v15_sign_pad(data, k)
    if mech in RSA_PKCS_HASHED:
        return pkcs1v15_sign_pad(digest_info(mech, data), k)
    params = mechanism.params
    if (
        not isinstance(params, PssParams)
        or params.hash_alg not in HASH_OF_CKM
        or params.mgf not in HASH_OF_MGF
    ):
        raise MechanismParamInvalidError("PSS needs hash_alg, mgf and s_len")
    hash_name = HASH_OF_CKM[params.hash_alg]
    if mech in RSA_PSS_HASHED:
        if RSA_PSS_HASHED[mech] != hash_name:
            raise MechanismParamInvalidError("PSS hash_alg does not match the mechanism")
        data = hashlib.new(hash_name, data).digest()
    return pss_encode(data, public.key_size, hash_name, HASH_OF_MGF[params.mgf], params.s_len)


def digest_info(mech: CKM, data: bytes) -> bytes:
    """DigestInfo of ``data`` for a SHAx_RSA_PKCS mechanism (what a padding card signs)."""
    name = RSA_PKCS_HASHED[mech]
    return DIGEST_INFO[name] + hashlib.new(name, data).digest()


def ecdsa_input(public: ec.EllipticCurvePublicKey, mech: CKM, data: bytes) -> bytes:
    """The field-sized hash a card signs with ECDSA (hashing first for ECDSA_SHAx)."""
    if mech in ECDSA_HASHED:
        data = hashlib.new(ECDSA_HASHED[mech], data).digest()
    elif not 1 <= len(data) <= 1024:
        raise DataLenRangeError("ECDSA input must be a hash")
    size = field_len(public)
    # leftmost bits of the hash (FIPS 186-4 §6.4); shorter hashes keep their value
    return data[:size].rjust(size, b"\x00")


def ecdsa_raw_signature(public: ec.EllipticCurvePublicKey, der: bytes) -> bytes:
    """PKCS#11's r‖s from the DER signature cards return."""
    try:
        r, s = decode_dss_signature(der)
    except ValueError:
        raise DeviceError("card returned a malformed ECDSA signature") from None
    size = field_len(public)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def ecdh_peer_point(own: ec.EllipticCurvePublicKey, public_data: bytes) -> bytes:
    """The peer's uncompressed point, given raw (04||X||Y) or as a DER OCTET STRING."""
    raw_len = 2 * field_len(own) + 1
    point = bytes(public_data)
    if not (len(point) == raw_len and point[0] == 0x04):
        try:
            point = bytes(asn1_core.OctetString.load(point).native)
        except (ValueError, TypeError):
            raise MechanismParamInvalidError("ECDH public data is not an EC point") from None
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(own.curve, point)
    except ValueError:
        raise MechanismParamInvalidError("ECDH public point is not on the key's curve") from None
    if len(point) != raw_len:
        raise MechanismParamInvalidError("ECDH public point must be uncompressed")
    return point


def check_ecdh_params(mechanism: Mechanism) -> Ecdh1DeriveParams:
    params = mechanism.params
    if not isinstance(params, Ecdh1DeriveParams):
        raise MechanismParamInvalidError("ECDH1_DERIVE needs CK_ECDH1_DERIVE_PARAMS")
    if params.kdf != CKD.CKD_NULL and params.kdf not in KDF_HASHES:
        raise MechanismParamInvalidError(f"unsupported KDF {params.kdf!r}")
    if params.kdf == CKD.CKD_NULL and params.shared_data:
        raise MechanismParamInvalidError("CKD_NULL takes no shared data")
    return params


def ecdh_kdf(params: Ecdh1DeriveParams, z: bytes) -> bytes:
    """The derived value: Z itself for CKD_NULL, else the ANSI X9.63 KDF of Z."""
    if params.kdf == CKD.CKD_NULL:
        return z
    algo = KDF_HASHES[params.kdf]()
    return X963KDF(algorithm=algo, length=algo.digest_size, sharedinfo=params.shared_data).derive(z)


def field_len(key: ec.EllipticCurvePublicKey) -> int:
    return (key.curve.key_size + 7) // 8


def _int_bytes(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _uncompressed(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


# --- the operations, over the driver's raw card operations -------------------------------


class KeyPairToken:
    """`tokend.model.Token`'s decrypt / sign / derive for a token of key pairs.

    A driver subclasses it and supplies:

    * `key_pairs()` — its keys by key reference;
    * `_card_section(context_pin)` — its exclusive section with the applet selected, in
      which it first verifies ``context_pin`` when one is given;
    * the raw operations its card has: `_card_rsa` (raw RSA, modulus-sized in and out),
      `_card_ecdsa` (field-sized hash in, DER signature out), `_card_ecdh` (peer point in,
      Z out); or, with ``card_pads_pkcs1 = True``, `_card_pkcs1_decrypt` (ciphertext in,
      plaintext out) and `_card_pkcs1_sign` (DigestInfo in, signature out).

    Hooks it lacks raise FunctionNotSupported through `MechanismInvalidError` checks first:
    a driver offers the matching list with `key_pair_mechanisms`.
    """

    #: the card applies and strips PKCS#1 v1.5 itself (no raw RSA: no OAEP, PSS, X.509)
    card_pads_pkcs1 = False

    # -- the driver's part (every driver overrides these; the base has no card) --

    def key_pairs(self) -> Mapping[int, KeyPair]:
        raise NotImplementedError

    def _card_section(self, context_pin: bytearray | None) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _card_rsa(
        self, pair: KeyPair, block: bytes, *, wrong_data: type[TokendError]
    ) -> bytes:  # pragma: no cover - per driver
        raise MechanismInvalidError("this card has no raw RSA")

    def _card_ecdsa(self, pair: KeyPair, digest: bytes) -> bytes:  # pragma: no cover
        raise MechanismInvalidError("this card has no ECDSA")

    def _card_ecdh(self, pair: KeyPair, point: bytes) -> bytes:  # pragma: no cover
        raise MechanismInvalidError("this card has no ECDH")

    def _card_pkcs1_decrypt(self, pair: KeyPair, ciphertext: bytes) -> bytes:  # pragma: no cover
        raise MechanismInvalidError("this card does not strip PKCS#1 padding")

    def _card_pkcs1_sign(self, pair: KeyPair, digest_info: bytes) -> bytes:  # pragma: no cover
        raise MechanismInvalidError("this card does not apply PKCS#1 padding")

    # -- the shared part --

    def _private_pair(self, key: ObjectKey | str) -> KeyPair:
        try:
            ref = ObjectKey.of(key)
        except ValueError:
            raise KeyHandleInvalidError(f"no such key: {key}") from None
        pair = self.key_pairs().get(ref.ref)
        if pair is None or not pair.has_key:
            raise KeyHandleInvalidError(f"no such key: {key}")
        if ref.kind is not ObjectKind.PRIVATE_KEY:
            raise KeyFunctionNotPermittedError("operation needs the private key")
        return pair

    def decrypt(
        self,
        key: ObjectKey | str,
        mechanism: Mechanism,
        data: bytes,
        *,
        context_pin: bytearray | None = None,
    ) -> bytes:
        mech = mechanism.mechanism
        if mech not in DECRYPT_MECHANISMS or (self.card_pads_pkcs1 and mech != CKM.CKM_RSA_PKCS):
            raise MechanismInvalidError(f"{mechanism_name(mech)} cannot decrypt")
        pair = self._private_pair(key)
        public = pair.public_key
        if not isinstance(public, rsa.RSAPublicKey):
            raise KeyTypeInconsistentError(f"{mechanism_name(mech)} needs an RSA key")
        if not pair.can_decrypt:
            raise KeyFunctionNotPermittedError(f"key {pair.name} may not decrypt")
        oaep: OaepParams | None = None
        if mech == CKM.CKM_RSA_PKCS_OAEP:
            oaep = mechanism.params if isinstance(mechanism.params, OaepParams) else None
            if oaep is None or oaep.hash_alg not in HASH_OF_CKM or oaep.mgf not in HASH_OF_MGF:
                raise MechanismParamInvalidError("OAEP needs hash_alg, mgf (SHA-1/2) and label")
        k = (public.key_size + 7) // 8
        if len(data) != k:
            raise EncryptedDataLenRangeError(f"ciphertext must be {k} bytes")
        if int.from_bytes(data, "big") >= public.public_numbers().n:
            raise EncryptedDataInvalidError()
        if pair.always_authenticate and context_pin is None:
            raise UserNotLoggedInError("this key needs the PIN with every decryption")
        with self._card_section(context_pin):
            if self.card_pads_pkcs1:
                return self._card_pkcs1_decrypt(pair, bytes(data))
            em = self._card_rsa(pair, bytes(data), wrong_data=EncryptedDataInvalidError)
        if mech == CKM.CKM_RSA_X_509:
            return em
        if oaep is not None:
            return oaep_unpad(
                em, k, HASH_OF_CKM[oaep.hash_alg], HASH_OF_MGF[oaep.mgf], oaep.source_data
            )
        return pkcs1v15_unpad(em, k)

    def sign(
        self,
        key: ObjectKey | str,
        mechanism: Mechanism,
        data: bytes,
        *,
        context_pin: bytearray | None = None,
    ) -> bytes:
        mech = mechanism.mechanism
        padded_by_card = mech == CKM.CKM_RSA_PKCS or mech in RSA_PKCS_HASHED
        if mech not in SIGN_MECHANISMS or (
            self.card_pads_pkcs1 and mech in RSA_SIGN_MECHANISMS and not padded_by_card
        ):
            raise MechanismInvalidError(f"{mechanism_name(mech)} cannot sign")
        pair = self._private_pair(key)
        public = pair.public_key
        if mech in RSA_SIGN_MECHANISMS:
            if not isinstance(public, rsa.RSAPublicKey):
                raise KeyTypeInconsistentError(f"{mechanism_name(mech)} needs an RSA key")
        elif not isinstance(public, ec.EllipticCurvePublicKey):
            raise KeyTypeInconsistentError(f"{mechanism_name(mech)} needs an EC key")
        if not pair.can_sign:
            raise KeyFunctionNotPermittedError(f"key {pair.name} may not sign")
        if pair.always_authenticate and context_pin is None:
            # never rely on the card to refuse: the PIN must come with this very signature
            raise UserNotLoggedInError("this key needs the PIN with every signature")
        if isinstance(public, rsa.RSAPublicKey):
            if self.card_pads_pkcs1:
                info = data if mech == CKM.CKM_RSA_PKCS else digest_info(mech, data)
                if len(info) > (public.key_size + 7) // 8 - 11:
                    raise DataLenRangeError("input too long for this key")
                with self._card_section(context_pin):
                    return self._card_pkcs1_sign(pair, info)
            block = rsa_sign_block(public, mechanism, data)
            with self._card_section(context_pin):
                return self._card_rsa(pair, block, wrong_data=DataInvalidError)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        digest = ecdsa_input(public, mech, data)
        with self._card_section(context_pin):
            der = self._card_ecdsa(pair, digest)
        return ecdsa_raw_signature(public, der)

    def derive(self, key: ObjectKey | str, mechanism: Mechanism) -> bytes:
        if mechanism.mechanism != CKM.CKM_ECDH1_DERIVE:
            raise MechanismInvalidError(f"{mechanism_name(mechanism.mechanism)} cannot derive")
        pair = self._private_pair(key)
        public = pair.public_key
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise KeyTypeInconsistentError("ECDH needs an EC key")
        if not pair.can_decrypt:
            raise KeyFunctionNotPermittedError(f"key {pair.name} may not derive")
        params = check_ecdh_params(mechanism)
        point = ecdh_peer_point(public, params.public_data)
        with self._card_section(None):
            z = self._card_ecdh(pair, point)
        if len(z) != field_len(public):
            raise DeviceError("card returned a shared secret of the wrong size")
        return ecdh_kdf(params, z)
