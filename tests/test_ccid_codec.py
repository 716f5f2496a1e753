"""The CCID codec (`tokend.ccid`): byte layouts at the offsets of the specification, and
which real readers' descriptors tokend drives itself versus leaves to pcscd."""

from __future__ import annotations

import pytest

from tokend import ccid
from tokend.ccid import CcidDescriptor, CcidMessage, CcidMessageError, ExchangeLevel


def test_descriptor_fields_sit_at_the_spec_offsets() -> None:
    raw = CcidDescriptor(features=0x000400FE, max_message_length=3072, bcd_ccid=0x0100).encode()
    assert len(raw) == 54 and raw[0] == 54 and raw[1] == 0x21
    assert raw[2:4] == b"\x00\x01"  # bcdCCID 1.00, little-endian
    assert raw[40:44] == (0x000400FE).to_bytes(4, "little")  # dwFeatures
    assert raw[44:48] == (3072).to_bytes(4, "little")  # dwMaxCCIDMessageLength
    assert CcidDescriptor.decode(raw) == CcidDescriptor(
        features=0x000400FE, max_message_length=3072, bcd_ccid=0x0100
    )


@pytest.mark.parametrize(
    ("token", "features", "max_len", "driven"),
    [
        ("YubiKey 4/5", 0x000400FE, 3072, True),
        ("YubiKey NEO", 0x000400FE, 1400, True),
        ("Nitrokey 3", 0x00040840, 3072, True),
        ("Nitrokey Start", 0x00020842, 271, True),
        ("Gnuk", 0x00040042, 64, True),
        ("Feitian ePass2003", 0x00040840, 2100, True),
        ("Nitrokey Pro/HSM (TPDU)", 0x000104BA, 271, False),
        ("Feitian eJava (TPDU)", 0x00010230, 271, False),
        ("character-level reader", 0x000000BA, 271, False),
        ("APDU level without auto PPS", 0x00040002, 271, False),
    ],
)
def test_which_readers_tokend_drives(token, features, max_len, driven) -> None:
    reason = CcidDescriptor(features=features, max_message_length=max_len).unsupported_reason()
    assert (reason is None) == driven, f"{token}: {reason}"


def test_exchange_level_and_power_select() -> None:
    yubikey = CcidDescriptor(features=0x000400FE)
    assert yubikey.level is ExchangeLevel.EXTENDED_APDU and yubikey.extended
    assert yubikey.power_select is ccid.PowerSelect.AUTO  # 0x08 auto voltage
    start = CcidDescriptor(features=0x00020842, voltage_support=0x01)
    assert start.level is ExchangeLevel.SHORT_APDU and not start.extended
    assert start.power_select is ccid.PowerSelect.V5


def test_descriptor_rejects_garbage() -> None:
    with pytest.raises(CcidMessageError):
        CcidDescriptor.decode(b"\x36\x21" + bytes(10))
    with pytest.raises(CcidMessageError):
        CcidDescriptor.decode(b"\x09\x04" + bytes(52))


def test_xfr_block_header_layout() -> None:
    msg = ccid.xfr_block(0x42, b"\x00\xa4\x04\x00", ccid.LevelParameter.CONTINUE_MORE)
    raw = msg.encode()
    assert raw[0] == 0x6F and raw[1:5] == b"\x04\x00\x00\x00" and raw[5] == 0 and raw[6] == 0x42
    assert raw[7] == 0 and raw[8:10] == b"\x03\x00"  # bBWI, wLevelParameter LE
    assert CcidMessage.decode(raw) == msg and ccid.level_parameter(msg) == 3


def test_response_status_bits() -> None:
    te = ccid.data_block(7, b"", command=ccid.CommandStatus.TIME_EXTENSION, error=3)
    assert te.encode()[7] == 0x80 and te.command_status == 2 and te.error == 3
    failed = ccid.slot_status(7, icc=ccid.IccStatus.ABSENT, command=ccid.CommandStatus.FAILED)
    assert failed.encode()[7] == 0x42 and failed.icc_status is ccid.IccStatus.ABSENT


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x80\x00\x00",
        bytes.fromhex("80 05000000 00 01 00 00 00") + b"\x90",  # says 5, has 1
        bytes.fromhex("80 00000000 00 01 00 00 00") + b"\x90\x00",  # says 0, has 2
    ],
)
def test_decode_refuses_truncated_and_padded_messages(raw: bytes) -> None:
    with pytest.raises(CcidMessageError):
        CcidMessage.decode(raw)


def test_decode_refuses_lengths_beyond_the_reader_maximum() -> None:
    raw = ccid.data_block(1, bytes(100)).encode()
    with pytest.raises(CcidMessageError):
        CcidMessage.decode(raw, max_length=64)


def test_command_and_response_chaining_round_trip() -> None:
    apdu = bytes(range(256)) * 2
    parts = ccid.split_command(apdu, 54)
    assert parts[0][1] == 1 and parts[-1][1] == 2 and {p[1] for p in parts[1:-1]} == {3}
    assert b"".join(p[0] for p in parts) == apdu
    assert ccid.split_command(b"abc", 54) == [(b"abc", 0)]
    answer = ccid.split_response(apdu, 100)
    assert [c for _, c in answer] == [1, 3, 3, 3, 3, 2]


def test_notify_slot_change() -> None:
    assert ccid.notify_slot_change(present=True) == b"\x50\x03"
    assert ccid.notify_slot_change(present=False) == b"\x50\x02"
    assert ccid.parse_notify_slot_change(b"\x50\x03") == ccid.SlotChange(True, True)
    assert ccid.parse_notify_slot_change(b"\x50\x02") == ccid.SlotChange(False, True)
    with pytest.raises(CcidMessageError):
        ccid.parse_notify_slot_change(b"\x51\x00")
