"""Unpadding promises (issue 16): every malformed block is refused with the one uniform
error, through the socket, by the driver's own RSA unpadding (the card returns the raw
block). The blocks are built here, bit by bit, and encrypted with the public key alone
(raw RSA), so each test breaks exactly one rule of RFC 8017 and nothing else."""

from __future__ import annotations

import hashlib
import os

import pytest

from tests.helpers import ID_9D, OAEP_SHA256, logged_in_session, private_key
from tokend.client import Client
from tokend.errors import EncryptedDataInvalidError
from tokend.pkcs11 import CKR

H_LEN = 32  # SHA-256


def _mgf1(seed: bytes, length: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def oaep_block(
    k: int,
    message: bytes,
    *,
    first: int = 0,
    ps_byte: tuple[int, int] | None = None,
    separator: int = 1,
    label_hash: bytes | None = None,
) -> bytes:
    """EME-OAEP (SHA-256, MGF1-SHA-256, empty label), optionally broken in one place:
    the first byte, one byte of the zero padding string (index, value), the 01 separator,
    or the label hash."""
    ps = bytearray(k - len(message) - 2 * H_LEN - 2)
    if ps_byte is not None:
        ps[ps_byte[0]] = ps_byte[1]
    l_hash = label_hash if label_hash is not None else hashlib.sha256(b"").digest()
    db = l_hash + bytes(ps) + bytes([separator]) + message
    seed = os.urandom(H_LEN)
    masked_db = _xor(db, _mgf1(seed, k - H_LEN - 1))
    masked_seed = _xor(seed, _mgf1(masked_db, H_LEN))
    return bytes([first]) + masked_seed + masked_db


def pkcs1_block(
    k: int, message: bytes, *, first: int = 0, block_type: int = 2, ps_len: int | None = None
) -> bytes:
    """EME-PKCS1-v1_5, optionally broken: first byte, block type, padding-string length."""
    n_ps = k - len(message) - 3 if ps_len is None else ps_len
    ps = bytes(b % 255 + 1 for b in os.urandom(n_ps))  # non-zero
    block = bytes([first, block_type]) + ps + b"\x00" + message
    return block.ljust(k, b"\x01") if ps_len is not None else block


def raw_encrypt(public_key, block: bytes) -> bytes:  # type: ignore[no-untyped-def]
    numbers = public_key.public_numbers()
    k = (public_key.key_size + 7) // 8
    assert int.from_bytes(block, "big") < numbers.n
    return pow(int.from_bytes(block, "big"), numbers.e, numbers.n).to_bytes(k, "big")


@pytest.fixture
def rsa_decryption(memory_piv):  # type: ignore[no-untyped-def]
    """(decrypt(mechanism, ciphertext), k, public key) over the socket."""
    public = memory_piv.extras["demo"].encryption_public_key
    with Client(memory_piv.socket) as client:
        session = logged_in_session(client, memory_piv.extras["slot"])
        key = private_key(client, session, ID_9D)

        def decrypt(mechanism, ciphertext: bytes) -> bytes:  # type: ignore[no-untyped-def]
            return client.decrypt(session, key, mechanism, ciphertext)

        yield decrypt, (public.key_size + 7) // 8, public


def _refusal(decrypt, mechanism, ciphertext: bytes) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(EncryptedDataInvalidError) as refused:
        decrypt(mechanism, ciphertext)
    return refused.value.ckr, str(refused.value)


def test_well_formed_blocks_decrypt(rsa_decryption) -> None:
    """The control: the blocks built here are right when not broken on purpose."""
    decrypt, k, public = rsa_decryption
    message = os.urandom(32)
    assert decrypt(OAEP_SHA256, raw_encrypt(public, oaep_block(k, message))) == message
    assert decrypt("CKM_RSA_PKCS", raw_encrypt(public, pkcs1_block(k, message))) == message


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"first": 0x01}, id="non-zero first byte"),
        pytest.param({"first": 0x7F}, id="first byte 7F"),
        pytest.param({"ps_byte": (0, 0x02)}, id="non-zero first padding byte"),
        pytest.param({"ps_byte": (-1, 0x05)}, id="non-zero byte just before the 01"),
        pytest.param({"separator": 0x02}, id="02 instead of the 01 separator"),
        pytest.param({"label_hash": bytes(H_LEN)}, id="wrong label hash"),
    ],
)
def test_malformed_oaep_is_refused_with_the_one_error(rsa_decryption, broken: dict) -> None:
    decrypt, k, public = rsa_decryption
    garbage = _refusal(decrypt, OAEP_SHA256, raw_encrypt(public, b"\x00" + os.urandom(k - 1)))
    refused = _refusal(decrypt, OAEP_SHA256, raw_encrypt(public, oaep_block(k, b"m", **broken)))
    assert refused == garbage  # the same code and message, whatever was wrong
    assert refused[0] == CKR.CKR_ENCRYPTED_DATA_INVALID


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"first": 0x01}, id="non-zero first byte"),
        pytest.param({"block_type": 0x01}, id="block type 1"),
        pytest.param({"ps_len": 7}, id="padding string of 7 bytes"),
        pytest.param({"ps_len": 300}, id="no zero separator"),
    ],
)
def test_malformed_pkcs1_is_refused_with_the_one_error(rsa_decryption, broken: dict) -> None:
    decrypt, k, public = rsa_decryption
    garbage = _refusal(decrypt, "CKM_RSA_PKCS", raw_encrypt(public, b"\x00" + os.urandom(k - 1)))
    block = pkcs1_block(k, b"m" * 16, **broken)[:k]
    refused = _refusal(decrypt, "CKM_RSA_PKCS", raw_encrypt(public, block))
    assert refused == garbage
