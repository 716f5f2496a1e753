"""The p11-kit RPC wire format (pure: no I/O). See ``docs/mail-clients.md`` and the notes
on the protocol: a one-byte version handshake, then frames of a 12-byte big-endian header
(call code, options length, body length), the options, and a body of call id, signature
and arguments. CK_ULONG travels as 8 bytes big-endian, attribute and mechanism *types* as 4.

Every read is bounded by what is left of the body, by `MAX_COUNT` and by `MAX_DEPTH`:
a malformed or hostile body raises `ParseError` and never allocates more than the frame.
Semantic refusals (an unknown mechanism) raise the `tokend.errors` class of their CKR.

The encoding differs between client generations without the version byte saying so
exactly; the generation is taken from the byte the client *offered* (`Generation`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from tokend.errors import MechanismInvalidError, MechanismParamInvalidError
from tokend.model import Ecdh1DeriveParams, Mechanism, MechanismParams, OaepParams, PssParams
from tokend.pkcs11 import CKA, CKD, CKG, CKM, CKR

#: The handshake string every client sends in C_Initialize (41 bytes).
HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
HEADER_SIZE = 12
#: Larger frames are garbage (or an attack): the connection is dropped.
MAX_FRAME = 1 << 20
MAX_OPTIONS = 4096
#: Elements of one array (attributes, requested types, mechanisms).
MAX_COUNT = 4096
#: Nesting of attribute arrays (CKA_*_TEMPLATE); p11-kit 0.26 caps it at 8 too
#: (CVE-2026-13757 was unbounded recursion).
MAX_DEPTH = 8
NULL_ARRAY = 0xFFFFFFFF
#: A raw array of this length or more is refused (p11-kit's own limit).
MAX_ARRAY = 0x7FFFFFFF
NULL_MECHANISM = 0xFFFFFFFF
CKF_ARRAY_ATTRIBUTE = 0x40000000


class ParseError(ValueError):
    """A body that does not follow the call's signature (answered CKR_DEVICE_ERROR)."""


class Generation(IntEnum):
    """Client generation, from the version byte it offered (p11-kit changed the wire
    format between releases without a version bump)."""

    V0_24 = 0  # offers 0: Debian 12 (0.24.1): mechanism format A, 0.24 allowlist
    V0_25 = 1  # offers 1: 0.25.0-0.25.5 (Debian 13): format A, wider allowlist
    V0_25_6 = 2  # offers 2: 0.25.6+: mechanism format B

    @classmethod
    def from_offered(cls, offered: int) -> Generation:
        return cls(min(max(offered, 0), 2))


class Call(IntEnum):
    ERROR = 0
    C_Initialize = 1
    C_Finalize = 2
    C_GetInfo = 3
    C_GetSlotList = 4
    C_GetSlotInfo = 5
    C_GetTokenInfo = 6
    C_GetMechanismList = 7
    C_GetMechanismInfo = 8
    C_InitToken = 9
    C_OpenSession = 10
    C_CloseSession = 11
    C_CloseAllSessions = 12
    C_GetSessionInfo = 13
    C_InitPIN = 14
    C_SetPIN = 15
    C_GetOperationState = 16
    C_SetOperationState = 17
    C_Login = 18
    C_Logout = 19
    C_CreateObject = 20
    C_CopyObject = 21
    C_DestroyObject = 22
    C_GetObjectSize = 23
    C_GetAttributeValue = 24
    C_SetAttributeValue = 25
    C_FindObjectsInit = 26
    C_FindObjects = 27
    C_FindObjectsFinal = 28
    C_EncryptInit = 29
    C_Encrypt = 30
    C_EncryptUpdate = 31
    C_EncryptFinal = 32
    C_DecryptInit = 33
    C_Decrypt = 34
    C_DecryptUpdate = 35
    C_DecryptFinal = 36
    C_DigestInit = 37
    C_Digest = 38
    C_DigestUpdate = 39
    C_DigestKey = 40
    C_DigestFinal = 41
    C_SignInit = 42
    C_Sign = 43
    C_SignUpdate = 44
    C_SignFinal = 45
    C_SignRecoverInit = 46
    C_SignRecover = 47
    C_VerifyInit = 48
    C_Verify = 49
    C_VerifyUpdate = 50
    C_VerifyFinal = 51
    C_VerifyRecoverInit = 52
    C_VerifyRecover = 53
    C_DigestEncryptUpdate = 54
    C_DecryptDigestUpdate = 55
    C_SignEncryptUpdate = 56
    C_DecryptVerifyUpdate = 57
    C_GenerateKey = 58
    C_GenerateKeyPair = 59
    C_WrapKey = 60
    C_UnwrapKey = 61
    C_DeriveKey = 62
    C_SeedRandom = 63
    C_GenerateRandom = 64
    C_WaitForSlotEvent = 65


#: (request, response) signatures of the calls tokend implements; the rest are answered
#: CKR_FUNCTION_NOT_SUPPORTED without being parsed.
SIGNATURES: dict[Call, tuple[str, str]] = {
    Call.C_Initialize: ("ayyay", ""),
    Call.C_Finalize: ("", ""),
    Call.C_GetInfo: ("", "vsusv"),
    Call.C_GetSlotList: ("yfu", "au"),
    Call.C_GetSlotInfo: ("u", "ssuvv"),
    Call.C_GetTokenInfo: ("u", "ssssuuuuuuuuuuuvvs"),
    Call.C_GetMechanismList: ("ufu", "au"),
    Call.C_GetMechanismInfo: ("uu", "uuu"),
    Call.C_OpenSession: ("uu", "u"),
    Call.C_CloseSession: ("u", ""),
    Call.C_CloseAllSessions: ("u", ""),
    Call.C_GetSessionInfo: ("u", "uuuu"),
    Call.C_Login: ("uuay", ""),
    Call.C_Logout: ("u", ""),
    Call.C_DestroyObject: ("uu", ""),
    Call.C_GetAttributeValue: ("uufA", "aAu"),
    Call.C_FindObjectsInit: ("uaA", ""),
    Call.C_FindObjects: ("ufu", "au"),
    Call.C_FindObjectsFinal: ("u", ""),
    Call.C_DecryptInit: ("uMu", ""),
    Call.C_Decrypt: ("uayfy", "ay"),
    Call.C_SignInit: ("uMu", ""),
    Call.C_Sign: ("uayfy", "ay"),
    Call.C_SignUpdate: ("uay", ""),
    Call.C_SignFinal: ("ufy", "ay"),
    Call.C_DeriveKey: ("uMuaA", "u"),
    Call.C_GenerateRandom: ("ufy", "ay"),
    Call.C_WaitForSlotEvent: ("u", "u"),
}

# --- mechanisms -------------------------------------------------------------------------

#: Mechanisms p11-kit-client 0.24.1 lets through (the rest it refuses client-side and
#: drops from C_GetMechanismList): no-parameter ones plus PSS and OAEP.
_ALLOWED_0_24 = frozenset(
    {
        CKM.CKM_RSA_PKCS_KEY_PAIR_GEN,
        CKM.CKM_RSA_PKCS,
        CKM.CKM_RSA_X_509,
        CKM.CKM_SHA1_RSA_PKCS,
        CKM.CKM_SHA256_RSA_PKCS,
        CKM.CKM_SHA384_RSA_PKCS,
        CKM.CKM_SHA512_RSA_PKCS,
        CKM.CKM_RSA_PKCS_OAEP,
        CKM.CKM_RSA_PKCS_PSS,
        CKM.CKM_EC_KEY_PAIR_GEN,
        CKM.CKM_ECDSA,
        CKM.CKM_ECDSA_SHA1,
        CKM.CKM_SHA_1,
        CKM.CKM_SHA256,
        CKM.CKM_SHA384,
        CKM.CKM_SHA512,
    }
)
#: 0.25.0 added hashed ECDSA and PSS variants and ECDH1_DERIVE.
_ALLOWED_0_25 = _ALLOWED_0_24 | {
    CKM.CKM_ECDSA_SHA256,
    CKM.CKM_ECDSA_SHA384,
    CKM.CKM_ECDSA_SHA512,
    CKM.CKM_SHA1_RSA_PKCS_PSS,
    CKM.CKM_SHA256_RSA_PKCS_PSS,
    CKM.CKM_SHA384_RSA_PKCS_PSS,
    CKM.CKM_SHA512_RSA_PKCS_PSS,
    CKM.CKM_ECDH1_DERIVE,
}
_PSS = frozenset(
    {
        CKM.CKM_RSA_PKCS_PSS,
        CKM.CKM_SHA1_RSA_PKCS_PSS,
        CKM.CKM_SHA256_RSA_PKCS_PSS,
        CKM.CKM_SHA384_RSA_PKCS_PSS,
        CKM.CKM_SHA512_RSA_PKCS_PSS,
    }
)
#: Mechanisms whose parameter has a structured serializer, per generation.
_STRUCTURED = {
    Generation.V0_24: frozenset({CKM.CKM_RSA_PKCS_PSS, CKM.CKM_RSA_PKCS_OAEP}),
    Generation.V0_25: _PSS | {CKM.CKM_RSA_PKCS_OAEP, CKM.CKM_ECDH1_DERIVE},
    Generation.V0_25_6: _PSS | {CKM.CKM_RSA_PKCS_OAEP, CKM.CKM_ECDH1_DERIVE},
}
#: Format B (0.25.6+) sends nothing after the type of a mechanism on its no-parameter list.
_NO_PARAM_B = (_ALLOWED_0_25 - _PSS) - {CKM.CKM_RSA_PKCS_OAEP, CKM.CKM_ECDH1_DERIVE}


def carried_mechanisms(generation: Generation) -> frozenset[CKM]:
    """What a client of this generation can carry; advertise nothing else."""
    return _ALLOWED_0_24 if generation is Generation.V0_24 else _ALLOWED_0_25


# --- attributes ---------------------------------------------------------------------------


class Kind(IntEnum):
    BYTE_ARRAY = 0
    BBOOL = 1
    ULONG = 2
    DATE = 3
    ATTRIBUTE_ARRAY = 4
    MECHANISM_ARRAY = 5


_BBOOL_TYPES = frozenset(
    {0x1, 0x2, 0x86, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108, 0x109, 0x10A, 0x10B, 0x10C}
    | {0x162, 0x163, 0x164, 0x165, 0x170, 0x171, 0x200, 0x202, 0x210, 0x301, 0x302, 0x405}
)
_ULONG_TYPES = frozenset(
    {0x0, 0x80, 0x87, 0x88, 0x100, 0x121, 0x133, 0x134, 0x160, 0x161, 0x166, 0x201, 0x300}
    | {0x400, 0x401, 0x402, 0x403, 0x404, 0x406, 0x500}
)
_DATE_TYPES = frozenset({0x110, 0x111})
WRAP_TEMPLATE, UNWRAP_TEMPLATE, DERIVE_TEMPLATE = 0x40000211, 0x40000212, 0x40000213
ARRAY_TYPES = {
    Generation.V0_24: frozenset({WRAP_TEMPLATE, UNWRAP_TEMPLATE}),
    Generation.V0_25: frozenset({WRAP_TEMPLATE, UNWRAP_TEMPLATE, DERIVE_TEMPLATE}),
    Generation.V0_25_6: frozenset({WRAP_TEMPLATE, UNWRAP_TEMPLATE, DERIVE_TEMPLATE}),
}


def attribute_kind(attr_type: int, generation: Generation) -> Kind:
    """How the client serialises a value of this type (its built-in table)."""
    if attr_type in _BBOOL_TYPES:
        return Kind.BBOOL
    if attr_type in _ULONG_TYPES:
        return Kind.ULONG
    if attr_type in _DATE_TYPES:
        return Kind.DATE
    if attr_type in ARRAY_TYPES[generation]:
        return Kind.ATTRIBUTE_ARRAY
    if attr_type == CKA.CKA_ALLOWED_MECHANISMS:
        return Kind.MECHANISM_ARRAY
    return Kind.BYTE_ARRAY


WireValue = bool | int | bytes | tuple["WireAttribute", ...] | tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class WireAttribute:
    """One attribute of an ``aA`` array; ``value`` None = no value (validity 0 or NULL)."""

    type: int
    value: WireValue


@dataclass(frozen=True, slots=True)
class RequestedAttribute:
    """One entry of an ``fA`` array: the type and the caller's buffer size (0 = NULL)."""

    type: int
    capacity: int
    nested: tuple[RequestedAttribute, ...] = ()


@dataclass(frozen=True, slots=True)
class OutCapacity:
    """The caller's output buffer (``fy``): ``null`` = a size query."""

    null: bool
    length: int

    def fits(self, size: int) -> bool:
        return not self.null and self.length >= size


@dataclass(frozen=True, slots=True)
class Request:
    code: int
    call: int
    signature: str
    options: bytes


# --- frames -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    code: int
    options_length: int
    body_length: int


def parse_header(data: bytes) -> Header:
    """The 12-byte frame header; ParseError if the frame is over the limits."""
    if len(data) != HEADER_SIZE:
        raise ParseError("short frame header")
    code, opt_len, body_len = struct.unpack(">III", data)
    if opt_len > MAX_OPTIONS:
        raise ParseError(f"options of {opt_len} bytes")
    if opt_len + body_len > MAX_FRAME:
        raise ParseError(f"frame of {opt_len + body_len} bytes (limit {MAX_FRAME})")
    return Header(code, opt_len, body_len)


def frame(code: int, body: bytes) -> bytes:
    """A whole response frame (no options)."""
    return struct.pack(">III", code, 0, len(body)) + body


def error_body(rv: int) -> bytes:
    """The error response: call id 0, signature ``u``, the CK_RV (never 0)."""
    return Writer(Call.ERROR, "u").ulong(rv or CKR.CKR_DEVICE_ERROR).done()


# --- reading ------------------------------------------------------------------------------


class Reader:
    """Reads one request body. The signature is checked against the call's own before any
    argument is read; each read checks the bytes are there; `finish` rejects leftovers."""

    def __init__(self, body: bytes | bytearray, generation: Generation = Generation.V0_24) -> None:
        # Over the caller's buffer, not a copy: the caller wipes it after the call (PINs).
        self._buf = memoryview(body)
        self._pos = 0
        self.generation = generation
        self.call = self._u32()
        sig_len = self._u32()
        if sig_len > 64:
            raise ParseError("signature too long")
        try:
            self.signature = bytes(self._take(sig_len)).decode("ascii")
        except UnicodeDecodeError:
            raise ParseError("signature not ASCII") from None

    # primitives
    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._buf):
            raise ParseError("body too short")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def expect(self, signature: str) -> None:
        if self.signature != signature:
            raise ParseError(f"signature {self.signature!r}, expected {signature!r}")

    def finish(self) -> None:
        if self.remaining():
            raise ParseError(f"{self.remaining()} bytes left over")

    # typed reads
    def byte(self) -> int:
        return self._take(1)[0]

    def ulong(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def _count(self, min_elem: int) -> int:
        n = self._u32()
        if n > MAX_COUNT or n * min_elem > self.remaining():
            raise ParseError(f"count {n} exceeds the body")
        return n

    def raw_array(self) -> bytes | None:
        n = self._u32()
        if n == NULL_ARRAY:
            return None
        if n >= MAX_ARRAY:
            raise ParseError("array length out of range")
        return bytes(self._take(n))

    def byte_array(self) -> bytes | None:
        """``ay`` in: None for a NULL pointer (0.24 sends ``00`` + length, later clients
        ``01 FFFFFFFF``); the length after a ``00`` flag is always read."""
        flag = self.byte()
        if flag == 0:
            self._u32()
            return None
        if flag != 1:
            raise ParseError("bad array flag")
        return self.raw_array()

    def secret(self) -> bytearray | None:
        """``ay`` in, as a wipeable copy (a PIN)."""
        flag = self.byte()
        if flag == 0:
            self._u32()
            return None
        if flag != 1:
            raise ParseError("bad array flag")
        n = self._u32()
        if n == NULL_ARRAY:
            return None
        if n >= MAX_ARRAY:
            raise ParseError("array length out of range")
        return bytearray(self._take(n))

    def out_capacity(self) -> OutCapacity:
        """``fy``: 0 = NULL buffer (0.24 also for an empty non-NULL one); FFFFFFFF (0.25+) =
        a non-NULL buffer of length 0."""
        n = self._u32()
        if n == 0:
            return OutCapacity(True, 0)
        if n == NULL_ARRAY:
            return OutCapacity(False, 0)
        return OutCapacity(False, n)

    def ulong_capacity(self) -> int:
        """``fu``: room for this many ulongs (0 = NULL)."""
        n = self._u32()
        return 0 if n == NULL_ARRAY else n

    def attributes(self, depth: int = 0) -> tuple[WireAttribute, ...]:
        """``aA``: count, then type u32, validity byte, length u32 and the value in the
        attribute's kind."""
        if depth >= MAX_DEPTH:
            raise ParseError("attribute arrays nested too deep")
        count = self._count(5)
        out: list[WireAttribute] = []
        for _ in range(count):
            attr_type = self._u32()
            if not self.byte():
                out.append(WireAttribute(attr_type, None))
                continue
            self._u32()  # the C ulValueLen; the value below carries its own size
            out.append(WireAttribute(attr_type, self._value(attr_type, depth)))
        return tuple(out)

    def _value(self, attr_type: int, depth: int) -> WireValue:
        kind = attribute_kind(attr_type, self.generation)
        if kind is Kind.BBOOL:
            return bool(self.byte())
        if kind is Kind.ULONG:
            return self.ulong()
        if kind is Kind.ATTRIBUTE_ARRAY:
            return self.attributes(depth + 1)
        if kind is Kind.MECHANISM_ARRAY:
            n = self._count(8)
            return tuple(self.ulong() for _ in range(n))
        return self.raw_array()

    def requested_attributes(self, depth: int = 0) -> tuple[RequestedAttribute, ...]:
        """``fA``: count x (type, capacity); 0.25.4+ nests an ``fA`` after an array
        attribute with a buffer."""
        if depth >= MAX_DEPTH:
            raise ParseError("attribute arrays nested too deep")
        count = self._count(8)
        out: list[RequestedAttribute] = []
        for _ in range(count):
            attr_type, capacity = self._u32(), self._u32()
            nested: tuple[RequestedAttribute, ...] = ()
            if (
                self.generation >= Generation.V0_25
                and attr_type & CKF_ARRAY_ATTRIBUTE
                and capacity
                and self.remaining() >= 4
            ):
                nested = self.requested_attributes(depth + 1)
            out.append(RequestedAttribute(attr_type, capacity, nested))
        return tuple(out)

    def mechanism(self) -> Mechanism | None:
        """``M`` in the client generation's format; None = the NULL mechanism (cancel)."""
        mech_type = self._u32()
        if mech_type == NULL_MECHANISM:
            return None
        gen = self.generation
        structured = mech_type in _STRUCTURED[gen]
        if gen is Generation.V0_25_6:
            if mech_type in _NO_PARAM_B:
                return _mechanism(mech_type, None)
            if not self.byte():  # has_param
                return _mechanism(mech_type, None)
        if not structured:
            raw = self.raw_array()
            if raw:
                # tokend's non-structured mechanisms take no parameter.
                raise MechanismParamInvalidError("this mechanism takes no parameter")
            return _mechanism(mech_type, None)
        params: MechanismParams
        try:
            if mech_type in _PSS:
                hash_alg, mgf, s_len = self.ulong(), self.ulong(), self.ulong()
                params = PssParams(CKM(hash_alg), CKG(mgf), s_len)
            elif mech_type == CKM.CKM_RSA_PKCS_OAEP:
                hash_alg, mgf, _source = self.ulong(), self.ulong(), self.ulong()
                source = self.raw_array() or b""
                params = OaepParams(CKM(hash_alg), CKG(mgf), source)
            else:  # ECDH1_DERIVE
                kdf = self.ulong()
                shared, public = self.raw_array(), self.raw_array()
                params = Ecdh1DeriveParams(CKD(kdf), public or b"", shared or b"")
        except ValueError as exc:
            if isinstance(exc, ParseError):
                raise
            raise MechanismParamInvalidError(f"unknown parameter value: {exc}") from None
        return _mechanism(mech_type, params)


def _mechanism(mech_type: int, params: MechanismParams) -> Mechanism:
    try:
        return Mechanism(CKM(mech_type), params)
    except ValueError:
        raise MechanismInvalidError(f"mechanism 0x{mech_type:x} is not supported") from None


# --- writing ------------------------------------------------------------------------------


class Writer:
    """Builds one response body: call id, signature, then the arguments."""

    def __init__(self, call: int, signature: str) -> None:
        sig = signature.encode("ascii")
        self._parts: list[bytes] = [struct.pack(">II", call, len(sig)), sig]

    def done(self) -> bytes:
        return b"".join(self._parts)

    def byte(self, value: int) -> Writer:
        self._parts.append(bytes((value & 0xFF,)))
        return self

    def ulong(self, value: int) -> Writer:
        self._parts.append(struct.pack(">Q", value & 0xFFFFFFFFFFFFFFFF))
        return self

    def version(self, major: int, minor: int) -> Writer:
        self._parts.append(bytes((major & 0xFF, minor & 0xFF)))
        return self

    def space_string(self, text: str, size: int) -> Writer:
        """``s``: exactly ``size`` bytes, space padded, cut on a UTF-8 character boundary."""
        data = text.encode("utf-8")[:size]
        while data:
            try:
                data.decode("utf-8")
                break
            except UnicodeDecodeError:
                data = data[:-1]
        self._parts.append(struct.pack(">I", size) + data.ljust(size, b" "))
        return self

    def _raw(self, data: bytes) -> None:
        self._parts.append(struct.pack(">I", len(data)))
        self._parts.append(bytes(data))

    def out_bytes(self, data: bytes, capacity: OutCapacity) -> Writer:
        """``ay`` out: the data if the caller's buffer holds it, else "no data, this many
        needed" (a size query, or CKR_BUFFER_TOO_SMALL on the client side)."""
        if capacity.fits(len(data)):
            self.byte(1)
            self._raw(data)
        else:
            self.byte(0)
            self._parts.append(struct.pack(">I", len(data)))
        return self

    def ulong_array(self, values: Sequence[int], capacity: int | None) -> Writer:
        """``au`` out; ``capacity`` None = always send the items (C_FindObjects)."""
        if capacity is not None and capacity < len(values):
            self.byte(0)
            self._parts.append(struct.pack(">I", len(values)))
            return self
        self.byte(1)
        self._parts.append(struct.pack(">I", len(values)))
        self._parts.extend(struct.pack(">Q", v) for v in values)
        return self

    def attribute_values(
        self,
        requested: Sequence[RequestedAttribute],
        values: Mapping[int, object],
        generation: Generation,
    ) -> int:
        """``aA`` answer of C_GetAttributeValue, in the request's order. ``values`` holds
        each present attribute's value (bool/int/str/bytes); absent ones are not in it.
        Returns the CK_RV to send after the array."""
        rv = CKR.CKR_OK
        self._parts.append(struct.pack(">I", len(requested)))
        for req in requested:
            self._parts.append(struct.pack(">I", req.type))
            value = values.get(req.type)
            if value is None:
                self.byte(0)
                rv = rv or CKR.CKR_ATTRIBUTE_TYPE_INVALID
                continue
            kind = attribute_kind(req.type, generation)
            try:
                logical, wire = encode_value(kind, value)
            except (ValueError, TypeError, struct.error):
                # A value the client's table cannot carry in this kind: as if absent.
                self.byte(0)
                rv = rv or CKR.CKR_ATTRIBUTE_TYPE_INVALID
                continue
            if req.capacity == 0:
                # A size query: the length, then an empty value of the kind.
                self.byte(1)
                self._parts.append(struct.pack(">I", logical))
                self._parts.append(_EMPTY[kind])
            elif req.capacity < logical:
                self.byte(0)
                rv = rv or CKR.CKR_BUFFER_TOO_SMALL
            else:
                self.byte(1)
                self._parts.append(struct.pack(">I", logical))
                self._parts.append(wire)
        return int(rv)


_EMPTY = {
    Kind.BYTE_ARRAY: struct.pack(">I", NULL_ARRAY),
    Kind.DATE: struct.pack(">I", NULL_ARRAY),
    Kind.BBOOL: b"\0",
    Kind.ULONG: bytes(8),
    Kind.ATTRIBUTE_ARRAY: struct.pack(">I", 0),
    Kind.MECHANISM_ARRAY: struct.pack(">I", 0),
}


def encode_value(kind: Kind, value: object) -> tuple[int, bytes]:
    """(the C ulValueLen, the wire bytes) of a value of this kind. Types the client's table
    does not know travel as raw bytes in the client's native layout (little-endian, 8-byte
    CK_ULONG on amd64/arm64)."""
    if kind is Kind.BBOOL:
        return 1, b"\1" if value else b"\0"
    if kind is Kind.ULONG:
        return 8, struct.pack(">Q", int(value))  # type: ignore[call-overload]
    if kind is Kind.MECHANISM_ARRAY:
        items = list(value)  # type: ignore[call-overload]
        return 8 * len(items), struct.pack(">I", len(items)) + b"".join(
            struct.pack(">Q", m) for m in items
        )
    if kind is Kind.ATTRIBUTE_ARRAY:
        raise ValueError("template attributes are not served")
    if isinstance(value, bool):
        raw = b"\1" if value else b"\0"
    elif isinstance(value, int):
        raw = struct.pack("<Q", value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
    else:
        raw = bytes(value)  # type: ignore[call-overload]
    return len(raw), struct.pack(">I", len(raw)) + raw


# --- client-side encoding (tests, the fuzzer and benchmarks build requests with it) ---------


class RequestWriter(Writer):
    """Request bodies as p11-kit-client 0.24.1 writes them."""

    def in_bytes(self, data: bytes | None) -> RequestWriter:
        if data is None:
            self.byte(0)
            self._parts.append(struct.pack(">I", 0))
        else:
            self.byte(1)
            self._raw(data)
        return self

    def capacity(self, n: int) -> RequestWriter:
        self._parts.append(struct.pack(">I", n))
        return self

    def template(self, attrs: Iterable[tuple[int, object]]) -> RequestWriter:
        items = list(attrs)
        self._parts.append(struct.pack(">I", len(items)))
        for attr_type, value in items:
            self._parts.append(struct.pack(">I", attr_type))
            self.byte(1)
            logical, wire = encode_value(attribute_kind(attr_type, Generation.V0_24), value)
            self._parts.append(struct.pack(">I", logical))
            self._parts.append(wire)
        return self

    def mechanism(self, mech_type: int) -> RequestWriter:
        self._parts.append(struct.pack(">II", mech_type, NULL_ARRAY))
        return self

    def raw(self, data: bytes) -> RequestWriter:
        self._parts.append(data)
        return self
