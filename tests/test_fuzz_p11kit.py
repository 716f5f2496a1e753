"""Fuzzing the p11-kit RPC decoder: random and mutated frames, deep attribute nesting and
huge lengths never crash or hang the daemon, each frame with a sane header gets an answer
(an error frame at worst), garbage framing only closes that one connection, and another
client keeps being served throughout."""

from __future__ import annotations

import logging
import random
import socket
import struct
import time

import pytest

from tests.test_p11kit import Raw, error_of, initialize, p11, req, sockdir  # noqa: F401
from tokend.errors import TokendError
from tokend.p11kit.codec import (
    CKF_ARRAY_ATTRIBUTE,
    HANDSHAKE,
    MAX_DEPTH,
    Call,
    Generation,
    ParseError,
    Reader,
)
from tokend.pkcs11 import CKA, CKM, CKO, CKR
from tokend.testing import ThreadDaemon

WRAP_TEMPLATE = CKF_ARRAY_ATTRIBUTE | 0x211


def _valid_bodies() -> list[bytes]:
    oaep = (
        struct.pack(">I", CKM.CKM_RSA_PKCS_OAEP)
        + struct.pack(">QQQ", CKM.CKM_SHA256, 2, 1)
        + struct.pack(">I", 3)
        + b"abc"
    )
    pss = struct.pack(">IQQQ", CKM.CKM_RSA_PKCS_PSS, CKM.CKM_SHA256, 2, 32)
    template = [(CKA.CKA_CLASS, CKO.CKO_PRIVATE_KEY), (CKA.CKA_ID, b"\x03"), (CKA.CKA_TOKEN, True)]
    return [
        req(Call.C_Initialize, "ayyay").in_bytes(HANDSHAKE).byte(1).in_bytes(b"x\0").done(),
        req(Call.C_GetInfo, "").done(),
        req(Call.C_GetSlotList, "yfu").byte(1).capacity(4).done(),
        req(Call.C_GetSlotInfo, "u").ulong(0).done(),
        req(Call.C_GetTokenInfo, "u").ulong(0).done(),
        req(Call.C_GetMechanismList, "ufu").ulong(0).capacity(20).done(),
        req(Call.C_GetMechanismInfo, "uu").ulong(0).ulong(CKM.CKM_RSA_PKCS).done(),
        req(Call.C_OpenSession, "uu").ulong(0).ulong(4).done(),
        req(Call.C_GetSessionInfo, "u").ulong(1).done(),
        req(Call.C_FindObjectsInit, "uaA").ulong(1).template(template).done(),
        req(Call.C_FindObjects, "ufu").ulong(1).capacity(10).done(),
        req(Call.C_FindObjectsFinal, "u").ulong(1).done(),
        req(Call.C_GetAttributeValue, "uufA")
        .ulong(1)
        .ulong(1)
        .raw(struct.pack(">IIIII", 2, CKA.CKA_LABEL, 0, CKA.CKA_VALUE, 100))
        .done(),
        req(Call.C_DecryptInit, "uMu").ulong(1).raw(oaep).ulong(3).done(),
        req(Call.C_SignInit, "uMu").ulong(1).raw(pss).ulong(3).done(),
        req(Call.C_Decrypt, "uayfy").ulong(1).in_bytes(bytes(256)).capacity(0).done(),
        req(Call.C_Sign, "uayfy").ulong(1).in_bytes(bytes(32)).capacity(256).done(),
        req(Call.C_SignUpdate, "uay").ulong(1).in_bytes(b"part").done(),
        req(Call.C_SignFinal, "ufy").ulong(1).capacity(0).done(),
        req(Call.C_GenerateRandom, "ufy").ulong(1).capacity(16).done(),
        req(Call.C_CloseSession, "u").ulong(1).done(),
    ]


HOSTILE_U32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, 4096, 4097, 1 << 20]


def _mutate(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randrange(1, 4)):
        choice = rng.random()
        if choice < 0.3 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.5 and len(data) > 4:
            del data[rng.randrange(4, len(data)) :]
        elif choice < 0.7:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        elif len(data) >= 8:
            at = rng.randrange(4, len(data) - 3)  # keep the call id, hit a length or count
            data[at : at + 4] = struct.pack(">I", rng.choice(HOSTILE_U32))
    return bytes(data)


def _nested_template(depth: int) -> bytes:
    """A C_FindObjectsInit body whose WRAP_TEMPLATE nests ``depth`` levels deep."""
    inner = struct.pack(">I", 0)
    for _ in range(depth):
        inner = struct.pack(">I", 1) + struct.pack(">IBI", WRAP_TEMPLATE, 1, 24) + inner
    return req(Call.C_FindObjectsInit, "uaA").ulong(1).raw(inner).done()


def test_codec_raises_only_parse_or_pkcs11_errors() -> None:
    rng = random.Random(1414)
    bodies = _valid_bodies()
    readers = {
        "ayyay": lambda r: (r.byte_array(), r.byte(), r.byte_array()),
        "uaA": lambda r: (r.ulong(), r.attributes()),
        "uufA": lambda r: (r.ulong(), r.ulong(), r.requested_attributes()),
        "uMu": lambda r: (r.ulong(), r.mechanism(), r.ulong()),
        "uayfy": lambda r: (r.ulong(), r.byte_array(), r.out_capacity()),
    }
    parsed = 0
    for round_no in range(4000):
        generation = Generation(round_no % 3)
        body = (
            bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
            if round_no % 5 == 0
            else _mutate(rng, rng.choice(bodies))
        )
        started = time.perf_counter()
        try:
            reader = Reader(body, generation)
            read = readers.get(reader.signature)
            if read is not None:
                read(reader)
                reader.finish()
                parsed += 1
        except (ParseError, TokendError):
            pass
        assert time.perf_counter() - started < 0.05, body[:40]
    assert parsed > 0  # the mutations leave some bodies valid: the readers really ran
    # Nesting is capped (p11-kit's CVE-2026-13757 was unbounded recursion).
    reader = Reader(_nested_template(MAX_DEPTH + 1))
    reader.ulong()
    with pytest.raises(ParseError, match="nested too deep"):
        reader.attributes()
    reader = Reader(_nested_template(MAX_DEPTH - 1))
    reader.ulong()
    reader.attributes()
    reader.finish()


def _batch(path, frames: list[bytes]) -> list[tuple[int, bytes]]:  # type: ignore[no-untyped-def]
    """Send ``frames`` (bodies) and a final C_Finalize on a fresh connection; every frame
    is answered (a blocked wait by the Finalize)."""
    raw = Raw(path)
    try:
        codes = [raw.send(body) for body in frames]
        codes.append(raw.send(req(Call.C_Finalize, "").done()))
        answers = dict(raw.recv() for _ in codes)
        assert sorted(answers) == sorted(codes)
        return [(c, answers[c]) for c in codes]
    finally:
        raw.close()


def _closes(path, data: bytes, *, eof: bool = False) -> bool:  # type: ignore[no-untyped-def]
    """The daemon ends this connection (by itself unless ``eof``: then the client's EOF)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(b"\0" + data)
        if eof:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got == b"\0"  # only the version byte came back, then EOF


def test_fuzzed_frames_never_hurt_the_daemon(p11: ThreadDaemon, caplog) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, logger="tokend.p11kit")
    rng = random.Random(20261130)
    bodies = _valid_bodies()
    bystander = Raw(p11.p11kit_socket)
    initialize(bystander)
    slot_list = req(Call.C_GetSlotList, "yfu").byte(1).capacity(4).done()
    expected_slots = bystander.call(slot_list)
    try:
        for round_no in range(100):
            frames = []
            for _ in range(rng.randrange(1, 5)):
                if rng.random() < 0.2:
                    size = rng.randrange(0, 80)
                    frames.append(struct.pack(">I", rng.randrange(90)) + rng.randbytes(size))
                else:
                    frames.append(_mutate(rng, rng.choice(bodies)))
            for _code, answer in _batch(p11.p11kit_socket, frames):
                assert error_of(answer) != 0
            if round_no % 10 == 0:
                assert bystander.call(slot_list) == expected_slots
        # Deep nesting and hostile counts: an error frame, the connection lives on.
        deep = _batch(p11.p11kit_socket, [_nested_template(100_000 // 9)])
        assert error_of(deep[0][1]) == CKR.CKR_DEVICE_ERROR
        huge_count = req(Call.C_FindObjectsInit, "uaA").ulong(1).raw(b"\xff" * 4).done()
        assert error_of(_batch(p11.p11kit_socket, [huge_count])[0][1]) == CKR.CKR_DEVICE_ERROR
        # Garbage framing: a 4 GiB body, oversized options, call code 0 -> closed at once,
        # nothing allocated for the claimed size.
        for header in (
            struct.pack(">III", 0x10, 0, 0xFFFFFFFF),
            struct.pack(">III", 0x10, 1 << 20, 4),
            struct.pack(">III", 0, 0, 12) + bytes(12),
        ):
            assert _closes(p11.p11kit_socket, header)
        # A half-sent frame, then EOF.
        half = struct.pack(">III", 0x10, 0, 100) + bytes(10)
        assert _closes(p11.p11kit_socket, half, eof=True)
        assert bystander.call(slot_list) == expected_slots
    finally:
        bystander.close()
    # No internal error, ever: every bad input was a clean refusal.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR
    ]
