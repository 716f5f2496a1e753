"""PIV command builders and wire formats shared by the driver, the virtual card, the demo
provisioner and `tokenctl` (pure, rank 0): GET/PUT DATA, the dynamic authentication
template, the certificate container, Key History and CHUID objects, the public-key codec
(7F49), the management-key cipher and the policy tags."""

from __future__ import annotations

import datetime as dt

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tokend.iso7816 import CommandApdu, encode_tlv, find_tlv
from tokend.piv.codes import (
    EC_CURVES,
    RSA_BITS,
    TAG_CERT_INFO,
    TAG_CERTIFICATE,
    TAG_CHUID_GUID,
    TAG_DYN_AUTH,
    TAG_HISTORY_OFF_CARD,
    TAG_HISTORY_ON_CARD,
    TAG_HISTORY_URL,
    TAG_LRC,
    TAG_OBJ_DATA,
    TAG_OBJ_ID,
    TAG_PIN_POLICY,
    TAG_TOUCH_POLICY,
    Ins,
    PinPolicy,
    PivAlgorithm,
    PivSlot,
    TouchPolicy,
)

try:  # cryptography >= 43 keeps 3DES in the "decrepit" module
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    TripleDES = algorithms.TripleDES  # type: ignore[attr-defined,misc]

__all__ = [
    "algorithm_of",
    "build_chuid",
    "certificate_object",
    "default_pin_policy",
    "dyn_auth",
    "encode_public_key",
    "get_data_command",
    "key_history_object",
    "mgmt_block_size",
    "mgmt_cipher",
    "parse_public_key",
    "policy_tlvs",
    "put_data_command",
    "tag_bytes",
]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# FASC-N of a non-federal issuer (agency code 9999), as yubikit and OpenSC examples use.
_FASCN = bytes.fromhex("D4E739DA739CED39CE739D836858210842108421C84210C3EB")


def tag_bytes(tag: int) -> bytes:
    """A data object tag as the bytes of a 5C value (5FC105 → 5F C1 05)."""
    return tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")


def dyn_auth(*items: tuple[int, bytes]) -> bytes:
    """A dynamic authentication template 7C{…}; an empty value asks for that tag back."""
    return encode_tlv(TAG_DYN_AUTH, [encode_tlv(tag, value) for tag, value in items])


def get_data_command(obj: int) -> CommandApdu:
    return CommandApdu(0, Ins.GET_DATA, 0x3F, 0xFF, encode_tlv(TAG_OBJ_ID, tag_bytes(obj)), le=0)


def put_data_command(obj: int, content: bytes) -> CommandApdu:
    data = encode_tlv(TAG_OBJ_ID, tag_bytes(obj)) + encode_tlv(TAG_OBJ_DATA, content)
    return CommandApdu(0, Ins.PUT_DATA, 0x3F, 0xFF, data)


def certificate_object(der: bytes) -> bytes:
    """Content of a certificate container (53 value): 70 cert, 71 CertInfo (plain), FE LRC."""
    return (
        encode_tlv(TAG_CERTIFICATE, der)
        + encode_tlv(TAG_CERT_INFO, b"\x00")
        + encode_tlv(TAG_LRC, b"")
    )


def key_history_object(on_card: int, off_card: int, url: bytes | None = None) -> bytes:
    parts = [
        encode_tlv(TAG_HISTORY_ON_CARD, bytes((on_card,))),
        encode_tlv(TAG_HISTORY_OFF_CARD, bytes((off_card,))),
    ]
    if url:
        parts.append(encode_tlv(TAG_HISTORY_URL, url))
    parts.append(encode_tlv(TAG_LRC, b""))
    return b"".join(parts)


def build_chuid(guid: bytes) -> bytes:
    """CHUID content (inside 53): FASC-N, GUID, expiry in ten years, empty signature."""
    if len(guid) != 16:
        raise ValueError("GUID must be 16 bytes")
    expiry = (dt.date.today() + dt.timedelta(days=3650)).strftime("%Y%m%d").encode()
    return b"".join(
        (
            encode_tlv(0x30, _FASCN),
            encode_tlv(TAG_CHUID_GUID, guid),
            encode_tlv(0x35, expiry),
            encode_tlv(0x3E),  # issuer signature: empty (unsigned CHUID)
            encode_tlv(TAG_LRC),  # error detection code
        )
    )


def policy_tlvs(pin_policy: PinPolicy | None, touch_policy: TouchPolicy | None) -> list[bytes]:
    """Vendor tags AA/AB at GENERATE and IMPORT; DEFAULT is left out."""
    out = []
    if pin_policy is not None and pin_policy != PinPolicy.DEFAULT:
        out.append(encode_tlv(TAG_PIN_POLICY, bytes((pin_policy,))))
    if touch_policy is not None and touch_policy != TouchPolicy.DEFAULT:
        out.append(encode_tlv(TAG_TOUCH_POLICY, bytes((touch_policy,))))
    return out


def default_pin_policy(slot: int) -> PinPolicy:
    """SP 800-73-4 access rule per key reference: 9C always, 9E never, others once."""
    if slot == PivSlot.SIGNATURE:
        return PinPolicy.ALWAYS
    if slot == PivSlot.CARD_AUTH:
        return PinPolicy.NEVER
    return PinPolicy.ONCE


# --- keys ------------------------------------------------------------------------------------


def algorithm_of(key: object) -> PivAlgorithm | None:
    """The PIV algorithm of a public or private key; None if PIV has none for it."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        for alg, bits in RSA_BITS.items():
            if bits == key.key_size:
                return alg
        return None
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        for alg, curve in EC_CURVES.items():
            if isinstance(key.curve, curve):
                return PivAlgorithm(alg)
    return None


def encode_public_key(key: PublicKey | PrivateKey) -> bytes:
    """The content of the 7F49 template: RSA ``81 n 82 e``, EC ``86 point``."""
    private = isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    public = key.public_key() if private else key
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        n = numbers.n.to_bytes((public.key_size + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return encode_tlv(0x81, n) + encode_tlv(0x82, e)
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return encode_tlv(0x86, point)


def parse_public_key(alg: PivAlgorithm, data: bytes) -> PublicKey:
    """Public key from a 7F49 value (81 n, 82 e / 86 point); ValueError if malformed."""
    try:
        if alg.is_rsa:
            n, e = find_tlv(data, 0x81), find_tlv(data, 0x82)
            if n is None or e is None:
                raise ValueError("missing modulus or exponent")
            return rsa.RSAPublicNumbers(
                int.from_bytes(e, "big"), int.from_bytes(n, "big")
            ).public_key()
        point = find_tlv(data, 0x86)
        if point is None:
            raise ValueError("missing EC point")
        return ec.EllipticCurvePublicKey.from_encoded_point(EC_CURVES[alg](), point)
    except KeyError as exc:
        raise ValueError(f"no curve for {exc}") from None


# --- the card management key (9B) ----------------------------------------------------------


def mgmt_cipher(alg: int, key: bytes) -> Cipher[modes.ECB]:
    """The cipher of 9B challenge/response; ValueError for a non-management algorithm."""
    if alg in (PivAlgorithm.TDES, PivAlgorithm.TDES_LEGACY):
        algo: algorithms.AES | TripleDES = TripleDES(key)
    elif alg in (PivAlgorithm.AES_128, PivAlgorithm.AES_192, PivAlgorithm.AES_256):
        algo = algorithms.AES(key)
    else:
        raise ValueError(f"algorithm {alg:02X} is not a management key algorithm")
    # single-block challenge/response: ECB is what SP 800-73-4 specifies here
    return Cipher(algo, modes.ECB())  # noqa: S305


def mgmt_block_size(alg: int) -> int:
    return 8 if alg in (PivAlgorithm.TDES, PivAlgorithm.TDES_LEGACY) else 16
