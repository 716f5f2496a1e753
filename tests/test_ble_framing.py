"""The APDU framing over GATT (tokend.ble_framing): round trips for any payload up to 64 KiB
and any fragment size, the CTAP-BLE byte layout, and garbage handled with an error code."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokend import ble_framing as bf

sizes = st.integers(bf.MIN_FRAGMENT, bf.MAX_FRAGMENT)
commands = st.sampled_from(list(bf.Cmd))


@settings(max_examples=300, deadline=None)
@given(cmd=commands, data=st.binary(max_size=bf.MAX_PAYLOAD), size=sizes)
def test_any_frame_survives_any_fragment_size(cmd, data, size) -> None:  # type: ignore[no-untyped-def]
    frags = bf.fragments(cmd, data, size)
    assert all(len(f) <= size for f in frags)
    assert len(frags) == 1 + max(0, -(-(len(data) - (size - 3)) // (size - 1)))
    r = bf.Reassembler()
    out = [r.feed(f) for f in frags]
    assert out[:-1] == [None] * (len(frags) - 1)
    assert out[-1] == bf.Frame(cmd, data)
    assert not r.busy


@settings(max_examples=50, deadline=None)
@given(size=sizes)
def test_a_64k_payload_round_trips(size) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 255 + bytes(255)  # 65535 bytes
    frags = bf.fragments(bf.Cmd.MSG, data, size)
    r = bf.Reassembler()
    frame = None
    for f in frags:
        frame = r.feed(f)
    assert frame == bf.Frame(bf.Cmd.MSG, data)
    # SEQ wraps after 0x7F
    assert [f[0] for f in frags[1:130]] == [i & 0x7F for i in range(len(frags[1:130]))]


def test_byte_layout_is_ctap_ble() -> None:
    frags = bf.fragments(bf.Cmd.MSG, bytes(range(40)), 20)
    assert frags[0] == bytes([0x83, 0x00, 40]) + bytes(range(17))
    assert frags[1] == bytes([0x00]) + bytes(range(17, 36))
    assert frags[2] == bytes([0x01]) + bytes(range(36, 40))
    assert bf.fragments(bf.Cmd.PING, b"", 20) == [bytes([0x81, 0, 0])]


def test_payload_over_64k_and_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        bf.fragments(bf.Cmd.MSG, bytes(bf.MAX_PAYLOAD + 1), 512)
    for size in (19, 513):
        with pytest.raises(ValueError):
            bf.fragments(bf.Cmd.MSG, b"x", size)
    with pytest.raises(ValueError):
        bf.decode_length(b"\x00\x13")
    assert bf.decode_length(bf.encode_length(244)) == 244


@pytest.mark.parametrize(
    ("fragments", "code"),
    [
        ([b""], bf.ErrorCode.INVALID_LEN),
        ([b"\x83\x00"], bf.ErrorCode.INVALID_LEN),
        ([b"\x90\x00\x01x"], bf.ErrorCode.INVALID_CMD),
        ([b"\x00abc"], bf.ErrorCode.INVALID_SEQ),
        ([b"\x83\x00\x30" + bytes(17), b"\x01" + bytes(19)], bf.ErrorCode.INVALID_SEQ),
        ([b"\x83\x00\x02abc"], bf.ErrorCode.INVALID_LEN),
        ([b"\x83\x00\x14" + bytes(17), b"\x00" + bytes(19)], bf.ErrorCode.INVALID_LEN),
    ],
    ids=["empty", "short-init", "unknown-cmd", "cont-first", "bad-seq", "init-overlong", "overrun"],
)
def test_malformed_fragments_raise_with_the_error_code(fragments, code) -> None:  # type: ignore[no-untyped-def]
    r = bf.Reassembler()
    with pytest.raises(bf.FramingError) as err:
        for f in fragments:
            r.feed(f)
    assert err.value.code is code
    assert not r.busy  # the broken frame is dropped; the next one starts clean
    assert r.feed(b"\x81\x00\x01z") == bf.Frame(bf.Cmd.PING, b"z")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=64), max_size=30))
def test_garbage_never_crashes_or_hangs(chunks) -> None:  # type: ignore[no-untyped-def]
    r = bf.Reassembler()
    for chunk in chunks:
        try:
            frame = r.feed(chunk)
        except bf.FramingError as exc:
            assert isinstance(exc.code, bf.ErrorCode)
        else:
            assert frame is None or len(frame.data) <= bf.MAX_PAYLOAD


def test_a_new_command_abandons_an_incomplete_frame() -> None:
    r = bf.Reassembler()
    assert r.feed(b"\x83\x00\x30" + bytes(17)) is None
    assert r.feed(b"\x81\x00\x02hi") == bf.Frame(bf.Cmd.PING, b"hi")
