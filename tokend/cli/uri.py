"""PKCS#11 URIs (RFC 7512) for choosing tokens and objects, and the PIV slot ↔ CKA_ID
numbering (ykcs11's: 9A=1, 9C=2, 9D=3, 9E=4, 82..95=5..24) used to turn an object into a
key slot.

    pkcs11:token=PIV%20%2312345678;serial=8f3e0a1b2c3d4e5f
    pkcs11:id=%03;type=private
    pkcs11:object=PIV%20Key%20Management%20(9D)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes

from tokend.piv.profile import PIV_PROFILE

SCHEME = "pkcs11:"

#: RFC 7512 §2.3 path attributes.
TOKEN_ATTRIBUTES = ("token", "manufacturer", "serial", "model")
SLOT_ATTRIBUTES = ("slot-description", "slot-manufacturer", "slot-id")
OBJECT_ATTRIBUTES = ("object", "type", "id")
LIBRARY_ATTRIBUTES = ("library-manufacturer", "library-description", "library-version")
PATH_ATTRIBUTES = frozenset(
    TOKEN_ATTRIBUTES + SLOT_ATTRIBUTES + OBJECT_ATTRIBUTES + LIBRARY_ATTRIBUTES
)
QUERY_ATTRIBUTES = frozenset(("pin-source", "pin-value", "module-name", "module-path"))
OBJECT_TYPES = frozenset(("public", "private", "cert", "secret-key", "data"))

_LABEL_SLOT = re.compile(r"\(([0-9a-fA-F]{2})\)\s*$")


class UriError(ValueError):
    """Not a usable PKCS#11 URI; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """A parsed URI: path attributes (``id`` as bytes, the rest as text) and the query."""

    path: Mapping[str, str | bytes] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)

    def _text(self, name: str) -> str | None:
        value = self.path.get(name)
        return value if isinstance(value, str) else None

    @property
    def token(self) -> str | None:
        return self._text("token")

    @property
    def serial(self) -> str | None:
        return self._text("serial")

    @property
    def manufacturer(self) -> str | None:
        return self._text("manufacturer")

    @property
    def model(self) -> str | None:
        return self._text("model")

    @property
    def slot_id(self) -> int | None:
        value = self._text("slot-id")
        return int(value) if value is not None else None

    @property
    def object(self) -> str | None:
        return self._text("object")

    @property
    def type(self) -> str | None:
        return self._text("type")

    @property
    def id(self) -> bytes | None:
        value = self.path.get("id")
        return value if isinstance(value, bytes) else None

    @property
    def selects_token(self) -> bool:
        return any(k in self.path for k in TOKEN_ATTRIBUTES + SLOT_ATTRIBUTES)

    @property
    def selects_object(self) -> bool:
        return any(k in self.path for k in ("object", "id"))

    def matches_token(self, info: Mapping[str, object], slot_id: int) -> bool:
        """Whether a token (C_GetTokenInfo result, plus tokend's ``token_serial``) fits."""
        if self.slot_id is not None and self.slot_id != slot_id:
            return False
        for attr, key in (
            ("token", "label"),
            ("manufacturer", "manufacturer_id"),
            ("model", "model"),
        ):
            want = self._text(attr)
            if want is not None and str(info.get(key, "")).strip() != want:
                return False
        serial = self.serial
        return serial is None or serial in (
            str(info.get("serial_number", "")).strip(),
            str(info.get("token_serial", "")),
        )


def is_uri(text: str | None) -> bool:
    return text is not None and text[: len(SCHEME)].lower() == SCHEME


def parse(text: str) -> Pkcs11Uri:
    """Parse ``pkcs11:path?query`` (percent-decoding each value)."""
    if not is_uri(text):
        raise UriError(f"not a PKCS#11 URI (must start with {SCHEME!r}): {text!r}")
    body = text[len(SCHEME) :]
    path_part, _, query_part = body.partition("?")
    path: dict[str, str | bytes] = {}
    for item in filter(None, path_part.split(";")):
        name, value = _split(item)
        if name not in PATH_ATTRIBUTES and not name.startswith("x-"):
            raise UriError(f"unknown PKCS#11 URI attribute {name!r}")
        if name in path:
            raise UriError(f"PKCS#11 URI attribute {name!r} given twice")
        path[name] = unquote_to_bytes(value) if name == "id" else _text(value, name)
    if "type" in path and path["type"] not in OBJECT_TYPES:
        raise UriError(f"unknown object type {path['type']!r} ({', '.join(sorted(OBJECT_TYPES))})")
    if "slot-id" in path and not str(path["slot-id"]).isdigit():
        raise UriError("slot-id must be a number")
    query: dict[str, str] = {}
    for item in filter(None, query_part.split("&")):
        name, value = _split(item)
        if name not in QUERY_ATTRIBUTES and not name.startswith("x-"):
            raise UriError(f"unknown PKCS#11 URI query attribute {name!r}")
        query[name] = _text(value, name)
    return Pkcs11Uri(path, query)


def _split(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise UriError(f"PKCS#11 URI attribute without a value: {item!r}")
    return name.strip().lower(), value


def _text(value: str, name: str) -> str:
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise UriError(f"attribute {name!r} is not UTF-8 after percent-decoding") from None


# --- PIV slots and CKA_ID ------------------------------------------------------------------


def slot_to_id(slot: int) -> bytes:
    """The CKA_ID the token gives the key in ``slot`` (the PIV numbering, like ykcs11)."""
    key_id = PIV_PROFILE.key_ids.get(slot)
    if key_id is None:
        raise UriError(f"no PIV key slot {slot:02x}")
    return key_id


def id_to_slot(key_id: bytes) -> int:
    slot = PIV_PROFILE.slot_of_key_id(key_id)
    if slot is None:
        raise UriError(f"id={key_id.hex()} is not a PIV key (ids 01-18)")
    return slot


def slot_of(uri: Pkcs11Uri) -> int:
    """The PIV key slot an object URI points at (by ``id``, or the "(9D)" in a label)."""
    if uri.id is not None:
        slot = id_to_slot(uri.id)
        if uri.object is not None and _label_slot(uri.object) not in (None, slot):
            raise UriError("the URI's id and object name point at different slots")
        return slot
    if uri.object is not None:
        slot = _label_slot(uri.object)
        if slot is None:
            raise UriError(f"object {uri.object!r} does not name a PIV key slot")
        return slot
    raise UriError("the URI names no object: add id=%03 or object=<label>")


def _label_slot(label: str) -> int | None:
    match = _LABEL_SLOT.search(label)
    return int(match.group(1), 16) if match else None
