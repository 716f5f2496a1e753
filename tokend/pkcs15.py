"""PKCS#15 (ISO/IEC 7816-15) structures as the SIM PKI applet carries them: EF.DIR, ODF,
TokenInfo and the directory files (AODF, PrKDF, PuKDF, CDF). Pure: no I/O.

The ASN.1 is declared with `asn1crypto` (the PKCS #15 v1.1 module, IMPLICIT TAGS; tagged
CHOICEs and parameterised types are explicit, as X.680 says), never hand-rolled. Parsers
return frozen dataclasses and raise only `Pkcs15FormatError` (a `DeviceError`, so
``CKR_DEVICE_ERROR`` reaches the client): asn1crypto parses lazily, so every value a
caller needs is read inside the parser's ``try``.

On the legacy IsoApplet this metadata is writable without the PIN: callers must treat it as
hints (which file to read, what a key is called), never as a security decision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any as _AnyType
from typing import TypeVar

from asn1crypto import keys as asn1_keys
from asn1crypto import parser
from asn1crypto.core import (
    Any,
    BitString,
    Boolean,
    Choice,
    Enumerated,
    GeneralizedTime,
    Integer,
    Null,
    OctetString,
    PrintableString,
    Sequence,
    SequenceOf,
    UTF8String,
)
from asn1crypto.x509 import Name
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokend.errors import DeviceError

#: The PKCS#15 application identifier (ISO 7816-15: RID A0 00 00 00 63, "PKCS-15").
PKCS15_AID = bytes.fromhex("A000000063504B43532D3135")
#: Where pkcs15-init puts the PKCS#15 application on the IsoApplet (and most cards).
PKCS15_DF = bytes.fromhex("3F005015")
EF_DIR = 0x2F00
EF_ODF = 0x5031
EF_TOKENINFO = 0x5032

#: Longest directory file we accept (IsoApplet files are at most a few kilobytes).
MAX_FILE = 0x8000


class Pkcs15FormatError(DeviceError):  # type: ignore[misc,valid-type]
    """A PKCS#15 file is truncated or malformed: the token answered something unusable."""


# --- ASN.1 declarations ------------------------------------------------------------------


class Path(Sequence):
    _fields = [
        ("efid_or_path", OctetString),
        ("index", Integer, {"optional": True}),
        ("length", Integer, {"implicit": 0, "optional": True}),
    ]


class ObjectValue(Choice):
    """``ObjectValue {Type}``: a path (what cards use), a URL, or the value inline."""

    _alternatives = [
        ("path", Path),
        ("url", PrintableString),
        ("direct", Any, {"explicit": 0}),
        ("indirect_protected", Any, {"explicit": 1}),
        ("direct_protected", Any, {"explicit": 2}),
    ]


class CommonObjectFlags(BitString):
    _map = {0: "private", 1: "modifiable"}


class CommonObjectAttributes(Sequence):
    _fields = [
        ("label", UTF8String, {"optional": True}),
        ("flags", CommonObjectFlags, {"optional": True}),
        ("auth_id", OctetString, {"optional": True}),
        ("user_consent", Integer, {"optional": True}),
        ("access_control_rules", SequenceOf, {"optional": True, "spec": Any}),
    ]


class KeyUsageFlags(BitString):
    _map = {
        0: "encrypt",
        1: "decrypt",
        2: "sign",
        3: "signRecover",
        4: "wrap",
        5: "unwrap",
        6: "verify",
        7: "verifyRecover",
        8: "derive",
        9: "nonRepudiation",
    }


class KeyAccessFlags(BitString):
    _map = {
        0: "sensitive",
        1: "extractable",
        2: "alwaysSensitive",
        3: "neverExtractable",
        4: "local",
    }


class CommonKeyAttributes(Sequence):
    _fields = [
        ("id", OctetString),
        ("usage", KeyUsageFlags),
        ("native", Boolean, {"default": True}),
        ("access_flags", KeyAccessFlags, {"optional": True}),
        ("key_reference", Integer, {"optional": True}),
        ("start_date", GeneralizedTime, {"optional": True}),
        ("end_date", GeneralizedTime, {"implicit": 0, "optional": True}),
    ]


class CommonPrivateKeyAttributes(Sequence):
    _fields = [
        ("subject_name", Name, {"optional": True}),
        ("key_identifiers", SequenceOf, {"implicit": 0, "optional": True, "spec": Any}),
    ]


class CommonPublicKeyAttributes(Sequence):
    _fields = [
        ("subject_name", Name, {"optional": True}),
        ("trusted_usage", Any, {"explicit": 0, "optional": True}),
    ]


class PrivateRsaKeyAttributes(Sequence):
    _fields = [
        ("value", ObjectValue),
        ("modulus_length", Integer),
        ("key_info", Any, {"optional": True}),
    ]


class PrivateEcKeyAttributes(Sequence):
    _fields = [
        ("value", ObjectValue),
        ("field_size", Integer, {"optional": True}),  # OpenSC's extension
        ("key_info", Any, {"optional": True}),
    ]


PublicRsaKeyAttributes = PrivateRsaKeyAttributes  # same shape: value, modulusLength, keyInfo
PublicEcKeyAttributes = PrivateEcKeyAttributes


def _object(class_attrs: type, sub_attrs: type, type_attrs: type) -> type[Sequence]:
    """``PKCS15Object {ClassAttributes, SubClassAttributes, TypeAttributes}``."""

    class _Obj(Sequence):
        _fields = [
            ("common", CommonObjectAttributes),
            ("class_attributes", class_attrs),
            ("sub_class_attributes", sub_attrs, {"explicit": 0, "optional": True}),
            ("type_attributes", type_attrs, {"explicit": 1}),
        ]

    return _Obj


PrivateRsaKeyObject = _object(
    CommonKeyAttributes, CommonPrivateKeyAttributes, PrivateRsaKeyAttributes
)
PrivateEcKeyObject = _object(
    CommonKeyAttributes, CommonPrivateKeyAttributes, PrivateEcKeyAttributes
)
PublicRsaKeyObject = _object(CommonKeyAttributes, CommonPublicKeyAttributes, PublicRsaKeyAttributes)
PublicEcKeyObject = _object(CommonKeyAttributes, CommonPublicKeyAttributes, PublicEcKeyAttributes)


class PrivateKeyType(Choice):
    _alternatives = [
        ("rsa", PrivateRsaKeyObject),
        ("ec", PrivateEcKeyObject, {"implicit": 0}),
    ]


class PublicKeyType(Choice):
    _alternatives = [
        ("rsa", PublicRsaKeyObject),
        ("ec", PublicEcKeyObject, {"implicit": 0}),
    ]


class CommonCertificateAttributes(Sequence):
    _fields = [
        ("id", OctetString),
        ("authority", Boolean, {"default": False}),
        ("identifier", Any, {"optional": True}),
        ("cert_hash", Any, {"implicit": 0, "optional": True}),
    ]


class X509CertificateAttributes(Sequence):
    _fields = [
        ("value", ObjectValue),
        ("subject", Name, {"optional": True}),
        ("issuer", Name, {"explicit": 0, "optional": True}),
        ("serial_number", Integer, {"optional": True}),
    ]


X509CertificateObject = _object(CommonCertificateAttributes, Null, X509CertificateAttributes)


class CertificateType(Choice):
    _alternatives = [("x509", X509CertificateObject)]


class PinFlags(BitString):
    _map = {
        0: "case-sensitive",
        1: "local",
        2: "change-disabled",
        3: "unblock-disabled",
        4: "initialized",
        5: "needs-padding",
        6: "unblockingPin",
        7: "soPin",
        8: "disable-allowed",
        9: "integrity-protected",
        10: "confidentiality-protected",
        11: "exchangeRefData",
    }


class PinTypeCode(IntEnum):
    """PinType (PKCS #15 v1.1)."""

    BCD = 0
    ASCII_NUMERIC = 1
    UTF8 = 2
    HALF_NIBBLE_BCD = 3
    ISO9564_1 = 4


class PinType(Enumerated):
    _map = {code.value: code.name.lower() for code in PinTypeCode}


class PinAttributes(Sequence):
    _fields = [
        ("pin_flags", PinFlags),
        ("pin_type", PinType),
        ("min_length", Integer),
        ("stored_length", Integer),
        ("max_length", Integer, {"optional": True}),
        ("pin_reference", Integer, {"implicit": 0, "default": 0}),
        ("pad_char", OctetString, {"optional": True}),
        ("last_pin_change", GeneralizedTime, {"optional": True}),
        ("path", Path, {"optional": True}),
    ]


class CommonAuthenticationObjectAttributes(Sequence):
    _fields = [
        ("auth_id", OctetString),
        ("auth_reference", Integer, {"optional": True}),
    ]


PinObject = _object(CommonAuthenticationObjectAttributes, Null, PinAttributes)


class AuthenticationType(Choice):
    _alternatives = [("pin", PinObject)]


class PathOrObjects(Choice):
    _alternatives = [
        ("path", Path),
        ("objects", Any, {"explicit": 0}),
        ("indirect_protected", Any, {"explicit": 1}),
        ("direct_protected", Any, {"explicit": 2}),
    ]


class OdfKind(IntEnum):
    """The PKCS15Objects CHOICE tags (which directory file an ODF entry points to)."""

    PRIVATE_KEYS = 0
    PUBLIC_KEYS = 1
    TRUSTED_PUBLIC_KEYS = 2
    SECRET_KEYS = 3
    CERTIFICATES = 4
    TRUSTED_CERTIFICATES = 5
    USEFUL_CERTIFICATES = 6
    DATA_OBJECTS = 7
    AUTH_OBJECTS = 8


class Pkcs15Objects(Choice):
    _alternatives = [
        (kind.name.lower(), PathOrObjects, {"explicit": kind.value}) for kind in OdfKind
    ]


class TokenFlags(BitString):
    _map = {0: "readonly", 1: "loginRequired", 2: "prnGeneration", 3: "eidCompliant"}


class TokenInfo(Sequence):
    _fields = [
        ("version", Integer),
        ("serial_number", OctetString),
        ("manufacturer_id", UTF8String, {"optional": True}),
        ("label", UTF8String, {"implicit": 0, "optional": True}),
        ("token_flags", TokenFlags),
        ("se_info", SequenceOf, {"optional": True, "spec": Any}),
        ("record_info", Any, {"explicit": 1, "optional": True}),
        ("supported_algorithms", Any, {"implicit": 2, "optional": True}),
        ("issuer_id", UTF8String, {"implicit": 3, "optional": True}),
        ("holder_id", UTF8String, {"implicit": 4, "optional": True}),
        ("last_update", Any, {"explicit": 5, "optional": True}),
        ("preferred_language", PrintableString, {"optional": True}),
    ]


class DirRecord(Sequence):
    """EF.DIR application template ``[APPLICATION 1]`` (ISO 7816-4 §8.2.1.1)."""

    class_ = 1
    tag = 1
    _fields = [
        ("aid", OctetString, {"implicit": ("application", 15)}),
        ("label", UTF8String, {"implicit": ("application", 16), "optional": True}),
        ("path", OctetString, {"implicit": ("application", 17), "optional": True}),
        ("ddo", Any, {"explicit": ("application", 19), "optional": True}),
    ]


# --- parsed values -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirApplication:
    aid: bytes
    label: str | None
    path: bytes | None


@dataclass(frozen=True, slots=True)
class OdfEntry:
    kind: OdfKind
    path: bytes


@dataclass(frozen=True, slots=True)
class TokenInfoValue:
    version: int
    serial: bytes
    manufacturer: str | None
    label: str | None
    flags: frozenset[str]


@dataclass(frozen=True, slots=True)
class PinInfo:
    label: str | None
    auth_id: bytes
    flags: frozenset[str]
    pin_type: PinTypeCode
    min_length: int
    stored_length: int
    max_length: int | None
    reference: int
    pad_char: bytes | None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A private or public key entry (PrKDF / PuKDF). ``path``: the key's file (private
    keys: the DF holding it); ``value``: an inline value instead of a path (rare)."""

    kind: str  # "rsa" | "ec"
    label: str | None
    id: bytes
    usage: frozenset[str]
    key_reference: int | None
    auth_id: bytes | None
    path: bytes | None
    value: bytes | None
    modulus_bits: int | None
    private_flag: bool
    access_flags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    label: str | None
    id: bytes
    authority: bool
    path: bytes | None
    value: bytes | None


# --- parsing -----------------------------------------------------------------------------

_T = TypeVar("_T")


def _guard(what: str, fn: Callable[[], _T]) -> _T:
    """Run ``fn``; any failure inside asn1crypto becomes one `Pkcs15FormatError`."""
    try:
        return fn()
    except Pkcs15FormatError:
        raise
    except Exception as exc:  # asn1crypto raises ValueError/TypeError/KeyError/… lazily
        raise Pkcs15FormatError(f"malformed {what}: {type(exc).__name__}") from None


def split_elements(data: bytes) -> Iterator[bytes]:
    """The DER elements of a directory file, in order. The files are zero-padded to their
    fixed size: a 00 (or FF, erased flash) where a tag would be ends the list."""
    if len(data) > MAX_FILE:
        raise Pkcs15FormatError("PKCS#15 file too large")
    offset = 0
    while offset < len(data) and data[offset] not in (0x00, 0xFF):
        try:
            _c, _m, _t, header, contents, trailer = parser.parse(data[offset:], strict=False)
        except ValueError as exc:
            raise Pkcs15FormatError(f"malformed PKCS#15 element at {offset}: {exc}") from None
        if trailer:  # indefinite length: not DER
            raise Pkcs15FormatError("indefinite length in a PKCS#15 file")
        size = len(header) + len(contents)
        yield data[offset : offset + size]
        offset += size


def _label(common: _AnyType) -> str | None:
    label = common["label"]
    return None if label.native is None else str(label.native)


def _path_or_value(value: ObjectValue) -> tuple[bytes | None, bytes | None]:
    if value.name == "path":
        path = bytes(value.chosen["efid_or_path"].native)
        if not path:
            raise Pkcs15FormatError("empty path")
        return path, None
    if value.name == "direct":
        return None, value.chosen.dump()
    raise Pkcs15FormatError(f"unsupported object value form {value.name}")


def _flags(bits: BitString) -> frozenset[str]:
    native = bits.native
    return frozenset() if native is None else frozenset(str(x) for x in native)


def parse_dir(data: bytes) -> list[DirApplication]:
    """EF.DIR: the application templates."""

    def run() -> list[DirApplication]:
        out = []
        for element in split_elements(data):
            record = DirRecord.load(element, strict=True)
            label = record["label"].native
            path = record["path"].native
            out.append(
                DirApplication(
                    bytes(record["aid"].native),
                    None if label is None else str(label),
                    None if path is None else bytes(path),
                )
            )
        return out

    return _guard("EF.DIR", run)


def parse_odf(data: bytes) -> list[OdfEntry]:
    """ODF: where each directory file is. Entries other than a path are skipped."""

    def run() -> list[OdfEntry]:
        out = []
        for element in split_elements(data):
            entry = Pkcs15Objects.load(element, strict=True)
            inner = entry.chosen
            if inner.name != "path":
                continue
            path = bytes(inner.chosen["efid_or_path"].native)
            if not path:
                raise Pkcs15FormatError("empty ODF path")
            out.append(OdfEntry(OdfKind[entry.name.upper()], path))
        return out

    return _guard("ODF", run)


def parse_tokeninfo(data: bytes) -> TokenInfoValue:
    def run() -> TokenInfoValue:
        elements = list(split_elements(data))
        if not elements:
            raise Pkcs15FormatError("empty TokenInfo")
        info = TokenInfo.load(elements[0], strict=True)
        manufacturer = info["manufacturer_id"].native
        label = info["label"].native
        return TokenInfoValue(
            int(info["version"].native),
            bytes(info["serial_number"].native),
            None if manufacturer is None else str(manufacturer),
            None if label is None else str(label),
            _flags(info["token_flags"]),
        )

    return _guard("TokenInfo", run)


def parse_aodf(data: bytes) -> list[PinInfo]:
    """AODF: the PIN objects (other authentication object types are skipped)."""

    def run() -> list[PinInfo]:
        out = []
        for element in split_elements(data):
            auth = AuthenticationType.load(element, strict=True)
            obj = auth.chosen
            attrs = obj["type_attributes"]
            pad = attrs["pad_char"].native
            max_length = attrs["max_length"].native
            out.append(
                PinInfo(
                    label=_label(obj["common"]),
                    auth_id=bytes(obj["class_attributes"]["auth_id"].native),
                    flags=_flags(attrs["pin_flags"]),
                    pin_type=PinTypeCode[str(attrs["pin_type"].native).upper().replace("-", "_")],
                    min_length=int(attrs["min_length"].native),
                    stored_length=int(attrs["stored_length"].native),
                    max_length=None if max_length is None else int(max_length),
                    reference=int(attrs["pin_reference"].native),
                    pad_char=None if pad is None else bytes(pad),
                )
            )
        return out

    return _guard("AODF", run)


def _key(choice: Choice) -> KeyInfo:
    obj = choice.chosen
    common = obj["common"]
    key_attrs = obj["class_attributes"]
    attrs = obj["type_attributes"]
    path, value = _path_or_value(attrs["value"])
    modulus = attrs["modulus_length"].native if choice.name == "rsa" else None
    auth_id = common["auth_id"].native
    reference = key_attrs["key_reference"].native
    return KeyInfo(
        kind=choice.name,
        label=_label(common),
        id=bytes(key_attrs["id"].native),
        usage=_flags(key_attrs["usage"]),
        key_reference=None if reference is None else int(reference),
        auth_id=None if auth_id is None else bytes(auth_id),
        path=path,
        value=value,
        modulus_bits=None if modulus is None else int(modulus),
        private_flag="private" in _flags(common["flags"]),
        access_flags=_flags(key_attrs["access_flags"]),
    )


def parse_prkdf(data: bytes) -> list[KeyInfo]:
    def run() -> list[KeyInfo]:
        return [_key(PrivateKeyType.load(e, strict=True)) for e in split_elements(data)]

    return _guard("PrKDF", run)


def parse_pukdf(data: bytes) -> list[KeyInfo]:
    def run() -> list[KeyInfo]:
        return [_key(PublicKeyType.load(e, strict=True)) for e in split_elements(data)]

    return _guard("PuKDF", run)


def parse_cdf(data: bytes) -> list[CertificateInfo]:
    def run() -> list[CertificateInfo]:
        out = []
        for element in split_elements(data):
            obj = CertificateType.load(element, strict=True).chosen
            attrs = obj["class_attributes"]
            path, value = _path_or_value(obj["type_attributes"]["value"])
            out.append(
                CertificateInfo(
                    label=_label(obj["common"]),
                    id=bytes(attrs["id"].native),
                    authority=bool(attrs["authority"].native),
                    path=path,
                    value=value,
                )
            )
        return out

    return _guard("CDF", run)


# --- building (what pkcs15-init writes, so OpenSC reads ours) ------------------------------


def build_dir_record(label: str, path: bytes = PKCS15_DF, aid: bytes = PKCS15_AID) -> bytes:
    return DirRecord({"aid": aid, "label": label, "path": path}).dump()


def build_odf(entries: list[tuple[OdfKind, bytes]]) -> bytes:
    out = b""
    for kind, path in entries:
        choice = PathOrObjects(name="path", value=Path({"efid_or_path": path}))
        out += Pkcs15Objects(name=kind.name.lower(), value=choice).dump()
    return out


def build_tokeninfo(
    serial: bytes, label: str, manufacturer: str = "unknown", flags: frozenset[str] = frozenset()
) -> bytes:
    return TokenInfo(
        {
            "version": 0,
            "serial_number": serial,
            "manufacturer_id": manufacturer,
            "label": label,
            "token_flags": set(flags),
        }
    ).dump()


def build_pin(
    *,
    label: str,
    auth_id: bytes,
    reference: int,
    min_length: int,
    stored_length: int,
    max_length: int,
    pad_char: bytes,
    flags: frozenset[str] = frozenset({"case-sensitive", "initialized", "needs-padding"}),
    pin_type: PinTypeCode = PinTypeCode.ASCII_NUMERIC,
) -> bytes:
    obj = PinObject(
        {
            "common": {"label": label, "flags": {"modifiable"}},
            "class_attributes": {"auth_id": auth_id},
            "type_attributes": {
                "pin_flags": set(flags),
                "pin_type": pin_type.name.lower(),
                "min_length": min_length,
                "stored_length": stored_length,
                "max_length": max_length,
                "pin_reference": reference,
                "pad_char": pad_char,
            },
        }
    )
    return AuthenticationType(name="pin", value=obj).dump()


def _common(label: str, auth_id: bytes | None, private: bool) -> dict[str, object]:
    common: dict[str, object] = {"label": label}
    common["flags"] = {"private", "modifiable"} if private else {"modifiable"}
    if auth_id is not None:
        common["auth_id"] = auth_id
    return common


def build_private_rsa_key(
    *,
    label: str,
    key_id: bytes,
    usage: frozenset[str],
    key_reference: int,
    auth_id: bytes,
    path: bytes,
    modulus_bits: int,
    access_flags: frozenset[str] = frozenset({"sensitive"}),
) -> bytes:
    """A PrKDF entry. ``access_flags``: add alwaysSensitive, neverExtractable and local for
    a key generated on the card, as pkcs15-init does."""
    obj = PrivateRsaKeyObject(
        {
            "common": _common(label, auth_id, True),
            "class_attributes": {
                "id": key_id,
                "usage": set(usage),
                "native": True,
                "access_flags": set(access_flags),
                "key_reference": key_reference,
            },
            "type_attributes": {
                "value": ObjectValue(name="path", value=Path({"efid_or_path": path})),
                "modulus_length": modulus_bits,
            },
        }
    )
    return PrivateKeyType(name="rsa", value=obj).dump()


def build_public_rsa_key(
    *, label: str, key_id: bytes, usage: frozenset[str], path: bytes, modulus_bits: int
) -> bytes:
    obj = PublicRsaKeyObject(
        {
            "common": _common(label, None, False),
            "class_attributes": {"id": key_id, "usage": set(usage), "native": True},
            "type_attributes": {
                "value": ObjectValue(name="path", value=Path({"efid_or_path": path})),
                "modulus_length": modulus_bits,
            },
        }
    )
    return PublicKeyType(name="rsa", value=obj).dump()


def build_certificate(*, label: str, cert_id: bytes, path: bytes, authority: bool = False) -> bytes:
    attrs: dict[str, object] = {"id": cert_id}
    if authority:
        attrs["authority"] = True
    obj = X509CertificateObject(
        {
            "common": _common(label, None, False),
            "class_attributes": attrs,
            "type_attributes": {
                "value": ObjectValue(name="path", value=Path({"efid_or_path": path}))
            },
        }
    )
    return CertificateType(name="x509", value=obj).dump()


# --- helpers for tools that rewrite directory files and read key files ---------------------


def native_id(modulus: int) -> bytes:
    """The ID OpenSC gives a key it creates (its "native" style): SHA-1 of the modulus."""
    return hashlib.sha1(modulus.to_bytes((modulus.bit_length() + 7) // 8, "big")).digest()  # noqa: S324


def private_entry_has_reference(element: bytes, ref: int) -> bool:
    """Whether a PrKDF element describes key reference ``ref`` (False if unreadable)."""
    try:
        return any(k.key_reference == ref for k in parse_prkdf(element))
    except Pkcs15FormatError:
        return False


def public_entry_is(element: bytes, key_id: bytes | None, path: bytes) -> bool:
    """Whether a PuKDF element has ID ``key_id`` or lives at ``path``."""
    try:
        return any(k.id == key_id or k.path == path for k in parse_pukdf(element))
    except Pkcs15FormatError:
        return False


def certificate_entry_is(element: bytes, cert_id: bytes | None, path: bytes) -> bool:
    """Whether a CDF element has ID ``cert_id`` or lives at ``path``."""
    try:
        return any(c.id == cert_id or c.path == path for c in parse_cdf(element))
    except Pkcs15FormatError:
        return False


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def load_public_key(der: bytes, kind: str) -> PublicKey:
    """A public-key file: SubjectPublicKeyInfo, or (what pkcs15-init stores for RSA) a
    PKCS#1 RSAPublicKey. ValueError if it is neither."""
    try:
        key = serialization.load_der_public_key(der)
    except ValueError:
        if kind != "rsa":
            raise
        try:
            parsed = asn1_keys.RSAPublicKey.load(der, strict=True)
            n, e = int(parsed["modulus"].native), int(parsed["public_exponent"].native)
            key = rsa.RSAPublicNumbers(e, n).public_key()
        except Exception as exc:  # asn1crypto / cryptography: any malformed input
            raise ValueError(f"not an RSA public key ({type(exc).__name__})") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("unsupported public key type")
    return key
