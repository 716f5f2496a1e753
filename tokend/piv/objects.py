"""Decoding what a PIV card returns (pure, rank 0): the certificate container (with the
YubiKey gzip convention) and GET METADATA (vendor F7). The driver reads; these parse, so a
virtual card's test or another tool can parse the same way."""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from enum import IntEnum
from typing import TypeVar

from tokend.iso7816 import find_tlv
from tokend.piv.codes import (
    MAX_CERT,
    TAG_CERT_INFO,
    TAG_CERTIFICATE,
    TAG_META_ALGORITHM,
    TAG_META_ORIGIN,
    TAG_META_POLICY,
    TAG_META_PUBLIC_KEY,
    KeyOrigin,
    PinPolicy,
    PivAlgorithm,
    TouchPolicy,
)
from tokend.piv.commands import PublicKey, parse_public_key

__all__ = ["SlotMetadata", "certificate_der", "parse_metadata"]


@dataclass(frozen=True, slots=True)
class SlotMetadata:
    """GET METADATA (vendor F7) for one key slot."""

    algorithm: PivAlgorithm | None
    pin_policy: PinPolicy | None = None
    touch_policy: TouchPolicy | None = None
    origin: KeyOrigin | None = None
    public_key: PublicKey | None = None


E = TypeVar("E", bound=IntEnum)


def _enum_or_none(enum: type[E], raw: bytes) -> E | None:
    if not raw:
        return None
    try:
        return enum(raw[0])
    except ValueError:
        return None


def parse_metadata(raw: dict[int, bytes]) -> SlotMetadata:
    """SlotMetadata from GET METADATA's TLVs; unknown codes become None. ValueError for a
    malformed public key."""
    try:
        alg = PivAlgorithm(raw[TAG_META_ALGORITHM][0]) if TAG_META_ALGORITHM in raw else None
    except (ValueError, IndexError):
        alg = None
    policy = raw.get(TAG_META_POLICY, b"")
    origin = raw.get(TAG_META_ORIGIN, b"")
    public = None
    if alg is not None and (alg.is_rsa or alg.is_ec) and TAG_META_PUBLIC_KEY in raw:
        public = parse_public_key(alg, raw[TAG_META_PUBLIC_KEY])
    return SlotMetadata(
        algorithm=alg,
        pin_policy=_enum_or_none(PinPolicy, policy[0:1]),
        touch_policy=_enum_or_none(TouchPolicy, policy[1:2]),
        origin=_enum_or_none(KeyOrigin, origin[0:1]),
        public_key=public,
    )


def certificate_der(content: bytes) -> bytes | None:
    """The DER certificate in a certificate container (53 value), decompressed when CertInfo
    says gzip (YubiKey convention, at most `MAX_CERT` bytes); None when empty. ValueError
    for a malformed container or a bad compressed certificate."""
    der = find_tlv(content, TAG_CERTIFICATE)
    info = find_tlv(content, TAG_CERT_INFO)
    if not der:
        return None
    if info and info[0] & 0x01:
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(der)) as packed:
                return packed.read(MAX_CERT)
        except (OSError, EOFError):
            raise ValueError("bad compressed certificate") from None
    return der
