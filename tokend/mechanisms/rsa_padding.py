"""RSA encoding and decoding on the host (RFC 8017): PKCS#1 v1.5 (both block types), OAEP,
PSS, MGF1 and the DigestInfo prefixes. Pure: no I/O. Every applet whose card does only raw
RSA uses these; the unpadding is written once, in constant time, with one uniform error, so
no driver can reintroduce a padding oracle."""

from __future__ import annotations

import hashlib
import hmac
import os

from tokend.errors import DataLenRangeError, EncryptedDataInvalidError, MechanismParamInvalidError

__all__ = [
    "DIGEST_INFO",
    "mgf1",
    "oaep_unpad",
    "pkcs1v15_sign_pad",
    "pkcs1v15_unpad",
    "pss_encode",
]

#: DigestInfo prefixes from RFC 8017 §9.2 note 1 (spec constants), by hashlib name.
DIGEST_INFO = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _ct_eq(a: int, b: int) -> int:
    """1 if a == b else 0, without a data-dependent branch (0 <= a, b < 2**31)."""
    return (((a ^ b) - 1) >> 31) & 1


def _ct_ge(a: int, b: int) -> int:
    """1 if a >= b else 0 (0 <= a, b < 2**31)."""
    return 1 ^ (((a - b) >> 31) & 1)


def pkcs1v15_unpad(em: bytes, k: int) -> bytes:
    """Remove PKCS#1 v1.5 type 2 padding (RFC 8017 §7.2.2) from the raw RSA output.

    Every failure raises the same EncryptedDataInvalidError, after a scan of the whole block
    that does not depend on where the first problem is."""
    if k < 11 or len(em) != k:
        raise EncryptedDataInvalidError()
    good = _ct_eq(em[0], 0) & _ct_eq(em[1], 2)
    looking = 1
    sep = 0
    for i in range(2, k):
        is_zero = _ct_eq(em[i], 0)
        sep |= i & -(looking & is_zero)
        looking &= 1 ^ is_zero
    good &= 1 ^ looking
    good &= _ct_ge(sep, 10)  # at least 8 padding bytes
    if not good:
        raise EncryptedDataInvalidError()
    return em[sep + 1 :]


def mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    """MGF1 (RFC 8017 appendix B.2.1) with a hashlib hash."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def oaep_unpad(em: bytes, k: int, hash_name: str, mgf_hash_name: str, label: bytes) -> bytes:
    """EME-OAEP decoding (RFC 8017 §7.1.2 step 3) with one uniform error, no early exit."""
    h_len = hashlib.new(hash_name).digest_size
    if len(em) != k or k < 2 * h_len + 2:
        raise EncryptedDataInvalidError()
    l_hash = hashlib.new(hash_name, label).digest()
    masked_seed, masked_db = em[1 : 1 + h_len], em[1 + h_len :]
    seed = bytes(
        a ^ b for a, b in zip(masked_seed, mgf1(masked_db, h_len, mgf_hash_name), strict=True)
    )
    db = bytes(
        a ^ b for a, b in zip(masked_db, mgf1(seed, k - h_len - 1, mgf_hash_name), strict=True)
    )
    good = _ct_eq(em[0], 0) & int(hmac.compare_digest(db[:h_len], l_hash))
    looking = 1
    invalid = 0
    sep = 0
    for i in range(h_len, len(db)):
        is_zero = _ct_eq(db[i], 0)
        is_one = _ct_eq(db[i], 1)
        sep |= i & -(looking & is_one)
        invalid |= looking & (1 ^ is_zero) & (1 ^ is_one)
        looking &= 1 ^ is_one
    good &= (1 ^ looking) & (1 ^ invalid)
    if not good:
        raise EncryptedDataInvalidError()
    return db[sep + 1 :]


def pkcs1v15_sign_pad(data: bytes, k: int) -> bytes:
    """EMSA-PKCS1-v1_5 block type 1 around ``data`` (normally a DigestInfo)."""
    if len(data) > k - 11:
        raise DataLenRangeError(f"input of {len(data)} bytes is too long for a {k}-byte key")
    return b"\x00\x01" + b"\xff" * (k - 3 - len(data)) + b"\x00" + data


def pss_encode(
    m_hash: bytes, mod_bits: int, hash_name: str, mgf_hash_name: str, s_len: int
) -> bytes:
    """EMSA-PSS-ENCODE (RFC 8017 §9.1.1) from the message hash; returns a modulus-sized block."""
    h_len = hashlib.new(hash_name).digest_size
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    if len(m_hash) != h_len:
        raise DataLenRangeError(f"PSS input must be a {h_len}-byte hash")
    if s_len < 0 or em_len < h_len + s_len + 2:
        raise MechanismParamInvalidError("PSS salt too long for this key")
    salt = os.urandom(s_len)
    h = hashlib.new(hash_name, b"\x00" * 8 + m_hash + salt).digest()
    db = b"\x00" * (em_len - s_len - h_len - 2) + b"\x01" + salt
    masked = bytearray(
        a ^ b for a, b in zip(db, mgf1(h, em_len - h_len - 1, mgf_hash_name), strict=True)
    )
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = bytes(masked) + h + b"\xbc"
    k = (mod_bits + 7) // 8
    return em.rjust(k, b"\x00")
