"""The native socket protocol (JSON-RPC 2.0, one object per line): framing and the value
codecs shared by the daemon and the client. Pure: no I/O. The spec is docs/protocol.md.

Conventions: method names are PKCS#11 function names; parameter keys are the C argument
names in snake_case (``h_session``, ``p_pin``…), and the same names without the Hungarian
prefix (``session``, ``pin``) are accepted too. Byte strings are base64; codes are written
with their PKCS#11 names.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any

from tokend.errors import (
    ArgumentsBadError,
    AttributeTypeInvalidError,
    AttributeValueInvalidError,
    MechanismInvalidError,
    MechanismParamInvalidError,
)
from tokend.model import AttributeValue, Ecdh1DeriveParams, Mechanism, OaepParams, PssParams
from tokend.pkcs11 import (
    BOOL_ATTRIBUTES,
    CKA,
    CKD,
    CKG,
    CKM,
    TEXT_ATTRIBUTES,
    ULONG_ATTRIBUTES,
    by_name,
)

PROTOCOL_VERSION = "1.2"
#: Longest request line accepted; longer input closes the connection (after an error).
MAX_REQUEST_BYTES = 1 << 20

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: Server error (JSON-RPC's implementation-defined range): too many connections; the
#: daemon sends this one line (id null) and closes the connection.
SERVER_BUSY = -32000
#: CK_ULONG is at most 64 bits: larger numbers are not handles, flags or lengths.
MAX_ULONG = (1 << 64) - 1

#: Name of the notification carrying slot events to subscribers.
SLOT_EVENT_NOTIFICATION = "slot_event"
#: Name of the notification telling a subscriber its login on a token was lost.
LOGIN_LOST_NOTIFICATION = "login_lost"


class ProtocolError(Exception):
    """A request that is not valid JSON-RPC (answered with a JSON-RPC error code)."""

    def __init__(self, code: int, message: str, request_id: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Request:
    id: int | str | None
    method: str
    params: dict[str, Any]
    notification: bool


def decode_request(line: bytes) -> Request:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(PARSE_ERROR, f"parse error: {exc}") from None
    except RecursionError:
        # `[[[[…` thousands deep: the parser gives up; the line is still one bad request.
        raise ProtocolError(PARSE_ERROR, "parse error: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(INVALID_REQUEST, "invalid request: expected a JSON object")
    request_id = obj.get("id")
    if obj.get("jsonrpc") != "2.0":
        raise ProtocolError(
            INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"', _safe_id(request_id)
        )
    method = obj.get("method")
    if not isinstance(method, str):
        raise ProtocolError(
            INVALID_REQUEST, 'invalid request: "method" must be a string', _safe_id(request_id)
        )
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, int | str)
    ):
        raise ProtocolError(INVALID_REQUEST, 'invalid request: bad "id"')
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(
            INVALID_PARAMS, "invalid params: expected an object", _safe_id(request_id)
        )
    return Request(request_id, method, params, "id" not in obj)


def _safe_id(value: object) -> int | str | None:
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def encode_result(request_id: object, result: object) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "result": result})


def encode_error(request_id: object, code: int, message: str, data: object = None) -> bytes:
    error: dict[str, object] = {"code": code, "message": message}
    if data:
        error["data"] = data
    return _dump({"jsonrpc": "2.0", "id": request_id, "error": error})


def encode_request(request_id: int, method: str, params: Mapping[str, object]) -> bytes:
    return _dump({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})


def encode_notification(method: str, params: Mapping[str, object]) -> bytes:
    return _dump({"jsonrpc": "2.0", "method": method, "params": params})


# --- values ---------------------------------------------------------------------------


def b64(data: bytes | bytearray) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def unb64(text: object, what: str = "value") -> bytes:
    if not isinstance(text, str):
        raise ArgumentsBadError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ArgumentsBadError(f"{what} is not valid base64") from None


def flag_names(flags: IntFlag) -> list[str]:
    return [m.name for m in type(flags) if m.value and (flags & m) == m and m.name]


def encode_attribute(cka: CKA, value: AttributeValue) -> object:
    if value is None:
        return None
    if cka in BOOL_ATTRIBUTES:
        return bool(value)
    if cka in ULONG_ATTRIBUTES:
        return value.name if isinstance(value, IntEnum) else int(value)  # type: ignore[arg-type]
    if cka in TEXT_ATTRIBUTES:
        return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")  # type: ignore[arg-type]
    if isinstance(value, bytes | bytearray):
        return b64(value)
    if isinstance(value, bool | int | str):
        return value
    raise TypeError(f"cannot encode {cka.name}")


def encode_attributes(attrs: Mapping[CKA, AttributeValue]) -> dict[str, object]:
    return {k.name: encode_attribute(k, v) for k, v in attrs.items()}


def decode_attribute_type(name: object) -> CKA:
    try:
        return by_name(CKA, name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise AttributeTypeInvalidError(str(exc)) from None


def decode_attribute(name: object, value: object) -> tuple[CKA, AttributeValue]:
    cka = decode_attribute_type(name)
    if value is None:
        raise AttributeValueInvalidError(f"{cka.name}: null is not a value")
    if cka in BOOL_ATTRIBUTES:
        if not isinstance(value, bool):
            raise AttributeValueInvalidError(f"{cka.name} must be true or false")
        return cka, value
    if cka in ULONG_ATTRIBUTES:
        enum = ULONG_ATTRIBUTES[cka]
        if enum is not None and isinstance(value, str):
            try:
                return cka, by_name(enum, value)
            except ValueError as exc:
                raise AttributeValueInvalidError(f"{cka.name}: {exc}") from None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ULONG:
            if enum is not None:
                try:
                    return cka, enum(value)
                except ValueError:
                    return cka, value
            return cka, value
        raise AttributeValueInvalidError(f"{cka.name} must be a name or a number")
    if cka in TEXT_ATTRIBUTES:
        if not isinstance(value, str):
            raise AttributeValueInvalidError(f"{cka.name} must be a string")
        return cka, value
    try:
        return cka, unb64(value, cka.name)
    except ArgumentsBadError as exc:
        raise AttributeValueInvalidError(str(exc)) from None


def decode_template(obj: object) -> dict[CKA, AttributeValue]:
    """A template is an object ``{"CKA_CLASS": "CKO_PRIVATE_KEY", "CKA_ID": "<b64>"}``;
    a list of ``{"type": …, "value": …}`` pairs is accepted too."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(decode_attribute(k, v) for k, v in obj.items())
    if isinstance(obj, list):
        out: dict[CKA, AttributeValue] = {}
        for item in obj:
            if not isinstance(item, dict) or "type" not in item:
                raise ArgumentsBadError("template entries must be {type, value} objects")
            k, v = decode_attribute(item["type"], item.get("value"))
            out[k] = v
        return out
    raise ArgumentsBadError("template must be an object")


def decode_attribute_types(obj: object) -> list[CKA]:
    if isinstance(obj, dict):
        obj = list(obj)
    if not isinstance(obj, list):
        raise ArgumentsBadError("template must be a list of attribute names")
    return [decode_attribute_type(x) for x in obj]


def _enum_param(enum: type[IntEnum], value: object, what: str) -> Any:
    try:
        return by_name(enum, value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise MechanismParamInvalidError(f"{what}: {exc}") from None


def decode_mechanism(obj: object) -> Mechanism:
    """``"CKM_RSA_PKCS"`` or ``{"mechanism": "CKM_RSA_PKCS_OAEP", "parameter": {…}}``."""
    if isinstance(obj, str | int) and not isinstance(obj, bool):
        name, param = obj, None
    elif isinstance(obj, dict):
        name = obj.get("mechanism")
        param = obj.get("parameter", obj.get("p_parameter"))
    else:
        raise ArgumentsBadError("mechanism must be a name or an object")
    try:
        mech = by_name(CKM, name)  # type: ignore[arg-type]
    except ValueError as exc:
        raise MechanismInvalidError(str(exc)) from None
    if param is None or param == {}:
        if mech == CKM.CKM_RSA_PKCS_OAEP:
            return Mechanism(mech, OaepParams())
        if mech in (CKM.CKM_RSA_PKCS_PSS,):
            raise MechanismParamInvalidError("CKM_RSA_PKCS_PSS needs hash_alg, mgf, s_len")
        if mech == CKM.CKM_ECDH1_DERIVE:
            raise MechanismParamInvalidError("CKM_ECDH1_DERIVE needs kdf and public_data")
        return Mechanism(mech)
    if not isinstance(param, dict):
        raise MechanismParamInvalidError("mechanism parameter must be an object")
    if mech == CKM.CKM_RSA_PKCS_OAEP:
        return Mechanism(
            mech,
            OaepParams(
                hash_alg=_enum_param(CKM, param.get("hash_alg", "CKM_SHA_1"), "hash_alg"),
                mgf=_enum_param(CKG, param.get("mgf", "CKG_MGF1_SHA1"), "mgf"),
                source_data=unb64(
                    param.get("source_data", param.get("p_source_data", "")), "source_data"
                ),
            ),
        )
    if mech in (
        CKM.CKM_RSA_PKCS_PSS,
        CKM.CKM_SHA256_RSA_PKCS_PSS,
        CKM.CKM_SHA384_RSA_PKCS_PSS,
        CKM.CKM_SHA512_RSA_PKCS_PSS,
        CKM.CKM_SHA1_RSA_PKCS_PSS,
    ):
        s_len = param.get("s_len")
        if not isinstance(s_len, int) or isinstance(s_len, bool) or s_len < 0:
            raise MechanismParamInvalidError("s_len must be a non-negative integer")
        return Mechanism(
            mech,
            PssParams(
                hash_alg=_enum_param(CKM, param.get("hash_alg"), "hash_alg"),
                mgf=_enum_param(CKG, param.get("mgf"), "mgf"),
                s_len=s_len,
            ),
        )
    if mech == CKM.CKM_ECDH1_DERIVE:
        return Mechanism(
            mech,
            Ecdh1DeriveParams(
                kdf=_enum_param(CKD, param.get("kdf", "CKD_NULL"), "kdf"),
                public_data=unb64(
                    param.get("public_data", param.get("p_public_data")), "public_data"
                ),
                shared_data=unb64(
                    param.get("shared_data", param.get("p_shared_data", "")) or "", "shared_data"
                ),
            ),
        )
    raise MechanismParamInvalidError(f"{mech.name} takes no parameter")


def encode_mechanism(mech: Mechanism) -> object:
    p = mech.params
    if p is None:
        return mech.mechanism.name
    param: dict[str, object]
    if isinstance(p, OaepParams):
        param = {"hash_alg": p.hash_alg.name, "mgf": p.mgf.name, "source_data": b64(p.source_data)}
    elif isinstance(p, PssParams):
        param = {"hash_alg": p.hash_alg.name, "mgf": p.mgf.name, "s_len": p.s_len}
    else:
        param = {
            "kdf": p.kdf.name,
            "public_data": b64(p.public_data),
            "shared_data": b64(p.shared_data),
        }
    return {"mechanism": mech.mechanism.name, "parameter": param}


class Params:
    """Typed access to request params with the C-name/short-name aliases."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw

    def _get(self, names: Sequence[str], default: object = ...) -> Any:
        for name in names:
            if name in self.raw:
                return self.raw[name]
        if default is ...:
            raise ArgumentsBadError(f'missing parameter "{names[0]}"')
        return default

    def int(self, *names: str, default: object = ...) -> int:
        value = self._get(names, default)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ULONG:
            raise ArgumentsBadError(f'"{names[0]}" must be an integer from 0 to 2^64-1')
        return value

    def bool(self, *names: str, default: object = ...) -> bool:
        value = self._get(names, default)
        if not isinstance(value, bool):
            raise ArgumentsBadError(f'"{names[0]}" must be true or false')
        return value

    def bytes(self, *names: str, default: object = ...) -> bytes:
        value = self._get(names, default)
        return unb64(value, names[0]) if not isinstance(value, bytes) else value

    def str(self, *names: str, default: object = ...) -> str:
        value = self._get(names, default)
        if not isinstance(value, str):
            raise ArgumentsBadError(f'"{names[0]}" must be a string')
        return value

    def enum(self, enum: type[IntEnum], *names: str, default: object = ...) -> Any:
        value = self._get(names, default)
        try:
            return by_name(enum, value)
        except ValueError as exc:
            raise ArgumentsBadError(f'"{names[0]}": {exc}') from None

    def flags(self, flag_type: type[IntFlag], *names: str, default: object = ...) -> int:
        """Flags as a list of names, or a number."""
        value = self._get(names, default)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ULONG:
            return value
        if isinstance(value, list):
            out = 0
            for item in value:
                try:
                    out |= flag_type[item] if isinstance(item, str) else -1
                except KeyError:
                    raise ArgumentsBadError(f'"{names[0]}": unknown flag {item!r}') from None
                if out < 0:
                    raise ArgumentsBadError(f'"{names[0]}": flags must be names')
            return out
        raise ArgumentsBadError(f'"{names[0]}" must be a list of flag names')

    def get(self, *names: str, default: object = None) -> Any:
        return self._get(names, default)
