"""The p11-kit RPC codec against byte strings observed on the wire between Debian 12's
p11-kit-client.so (0.24.1) and a server, and the encodings of newer client generations
that no client on this machine sends (0.25.x format A extensions, 0.25.6+ format B)."""

from __future__ import annotations

import struct

import pytest

from tokend.errors import MechanismInvalidError
from tokend.p11kit.codec import (
    Call,
    Generation,
    OutCapacity,
    ParseError,
    Reader,
    RequestedAttribute,
    Writer,
    error_body,
    parse_header,
)
from tokend.pkcs11 import CKA, CKD, CKG, CKM


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_slot_list_size_query_as_observed() -> None:
    header = parse_header(h("00000012 00000006 00000010"))
    assert (header.code, header.options_length, header.body_length) == (0x12, 6, 0x10)
    r = Reader(h("00000004 00000003 796675 00 00000000"))
    assert (r.call, r.signature) == (Call.C_GetSlotList, "yfu")
    assert r.byte() == 0 and r.ulong_capacity() == 0
    r.finish()
    answer = Writer(Call.C_GetSlotList, "au").ulong_array([0], 0).done()
    assert answer == h("00000004 00000002 6175 00 00000001")


def test_sign_init_and_sign_as_observed() -> None:
    r = Reader(h("0000002a 00000003 754d75 0000000000000003 00000001 ffffffff 0000000000000002"))
    assert r.ulong() == 3
    mech = r.mechanism()
    assert mech is not None and mech.mechanism == CKM.CKM_RSA_PKCS and mech.params is None
    assert r.ulong() == 2
    r.finish()
    r = Reader(
        h("0000002a 00000003 754d75 0000000000000003 0000000d")
        + struct.pack(">QQQ", 0x250, 2, 0x20)
        + bytes(8)
    )
    r.ulong()
    pss = r.mechanism()
    assert pss is not None and pss.params is not None
    assert (pss.params.hash_alg, pss.params.mgf, pss.params.s_len) == (
        CKM.CKM_SHA256,
        CKG.CKG_MGF1_SHA256,
        32,
    )  # type: ignore[union-attr]
    r = Reader(h("0000002b 00000005 7561796679 0000000000000003 01 00000003 aaaaaa 00000100"))
    assert r.ulong() == 3 and r.byte_array() == h("aaaaaa")
    assert r.out_capacity() == OutCapacity(False, 256)
    r.finish()
    sig = bytes(range(256))
    answer = Writer(Call.C_Sign, "ay").out_bytes(sig, OutCapacity(False, 256)).done()
    assert answer == h("0000002b 00000002 6179 01 00000100") + sig
    # Size query and too-small buffer: "no data, this many needed".
    assert (
        Writer(Call.C_Sign, "ay")
        .out_bytes(sig, OutCapacity(True, 0))
        .done()
        .endswith(h("00 00000100"))
    )
    assert (
        Writer(Call.C_Sign, "ay")
        .out_bytes(sig, OutCapacity(False, 10))
        .done()
        .endswith(h("00 00000100"))
    )


def test_get_attribute_value_reply_as_observed() -> None:
    w = Writer(Call.C_GetAttributeValue, "aAu")
    rv = w.attribute_values(
        [RequestedAttribute(CKA.CKA_CLASS, 8), RequestedAttribute(CKA.CKA_LABEL, 4)],
        {CKA.CKA_CLASS: 3, CKA.CKA_LABEL: "abcd"},
        Generation.V0_24,
    )
    w.ulong(rv)
    assert w.done() == h(
        "00000018 00000003 614175 00000002"
        "00000000 01 00000008 0000000000000003"
        "00000003 01 00000004 00000004 61626364"
        "0000000000000000"
    )


def test_error_frame_and_null_pin() -> None:
    assert error_body(0xB3) == h("00000000 00000001 75 00000000000000B3")
    assert error_body(0) == h("00000000 00000001 75 0000000000000030")  # never CKR_OK
    # C_Login with a NULL PIN: 0.24.1 sends 00 + length, 0.25+ 01 FFFFFFFF.
    for pin in ("00 00000000", "01 ffffffff"):
        r = Reader(h("00000012 00000004 75756179 0000000000000001 0000000000000001") + h(pin))
        r.ulong(), r.ulong()
        assert r.byte_array() is None
        r.finish()


def test_oaep_parameters_and_newer_mechanism_formats() -> None:
    oaep = h("00000009") + struct.pack(">QQQ", 0x250, 2, 1) + h("00000003 616263")
    mech = Reader(h("00000021 00000001 4d") + oaep).mechanism()
    assert mech is not None and mech.params.source_data == b"abc"  # type: ignore[union-attr]
    # 0.24.1 cannot carry ECDH: its params are not a structure there.
    ecdh = h("00001050") + struct.pack(">Q", 1) + h("00000000 00000003 040506")
    with pytest.raises(ParseError):
        r = Reader(h("0000003e 00000001 4d") + ecdh, Generation.V0_24)
        r.mechanism()
        r.finish()
    # 0.25.x (format A): ECDH1 params follow the type directly.
    mech = Reader(h("0000003e 00000001 4d") + ecdh, Generation.V0_25).mechanism()
    assert mech is not None and mech.params.kdf == CKD.CKD_NULL  # type: ignore[union-attr]
    assert mech.params.public_data == h("040506")  # type: ignore[union-attr]
    # 0.25.6+ (format B): nothing after a no-parameter type; has_param before a structure.
    r = Reader(
        h("0000002a 00000001 4d 00000001") + h("0000000d 01") + struct.pack(">QQQ", 0x250, 2, 32),
        Generation.V0_25_6,
    )
    first, second = r.mechanism(), r.mechanism()
    r.finish()
    assert first is not None and first.mechanism == CKM.CKM_RSA_PKCS and first.params is None
    assert second is not None and second.params.s_len == 32  # type: ignore[union-attr]
    # The NULL mechanism (cancel, 0.25.3+) and unknown types.
    assert Reader(h("0000002a 00000001 4d ffffffff"), Generation.V0_25).mechanism() is None
    with pytest.raises(MechanismInvalidError):
        Reader(h("0000002a 00000001 4d 80001234 ffffffff")).mechanism()


def test_nested_get_attribute_request_of_newer_clients() -> None:
    wrap = 0x40000211
    body = h("00000018 00000002 6641") + struct.pack(">I", 2) + struct.pack(">II", wrap, 48)
    body += struct.pack(">I", 1) + struct.pack(">II", CKA.CKA_CLASS, 8)
    body += struct.pack(">II", CKA.CKA_LABEL, 0)
    r = Reader(body, Generation.V0_25)
    requested = r.requested_attributes()
    r.finish()
    assert requested[0].nested == (RequestedAttribute(CKA.CKA_CLASS, 8),)
    assert requested[1] == RequestedAttribute(CKA.CKA_LABEL, 0)


def test_limits() -> None:
    with pytest.raises(ParseError):
        parse_header(struct.pack(">III", 0x10, 0, 1 << 21))
    with pytest.raises(ParseError):
        parse_header(struct.pack(">III", 0x10, 5000, 0))
    with pytest.raises(ParseError, match="too long"):
        Reader(struct.pack(">II", 1, 1000))
    r = Reader(h("0000001a 00000003 756141 0000000000000001 00100000"))
    r.ulong()
    with pytest.raises(ParseError, match="exceeds"):
        r.attributes()
    # Space-padded strings have the exact C size and are cut on a character boundary.
    out = Writer(Call.C_GetInfo, "s").space_string("é" * 20, 32).done()
    assert out[-36:-32] == struct.pack(">I", 32)
    assert out[-32:].decode("utf-8") == "é" * 16
