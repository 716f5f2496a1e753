"""The ISO 7816 layer on its own: APDU and TLV codecs, the host channel (chaining, 61xx,
6Cxx, extended length, T=0, logical channels), the status-word mapping and PIN formats —
against the card-side helper the virtual cards use (`tokend.simulators.iso7816_card`)
or, where a card's exact bytes matter, a scripted card that fails on any other APDU."""

from __future__ import annotations

import pytest

from tokend.drivers.base import CardProtocol
from tokend.errors import (
    CardNotVerifiedError,
    DeviceError,
    PinIncorrectError,
    PinInvalidError,
    PinLenRangeError,
    PinLockedError,
)
from tokend.iso7816 import (
    SW,
    ApduChannel,
    CommandApdu,
    NotFoundError,
    PinEncoding,
    PinFormat,
    encode_tlv,
    error_for_sw,
    find_tlv,
    parse_tlvs,
    retries_in,
    sw_with_retries,
)
from tokend.iso7816.channel import channel_cla, get_response_cla
from tokend.simulators.iso7816_card import CardIo, CardStatus
from tokend.simulators.memory import MemoryReader


class Script:
    """A card that expects exactly these command APDUs, in order, and answers each."""

    def __init__(self, *steps: tuple[str, str]) -> None:
        self.steps = [(bytes.fromhex(c), bytes.fromhex(r)) for c, r in steps]
        self.seen: list[bytes] = []

    def __call__(self, apdu: bytes) -> bytes:
        self.seen.append(apdu)
        assert self.steps, f"unexpected APDU {apdu.hex()}"
        want, answer = self.steps.pop(0)
        assert apdu == want, f"sent {apdu.hex()}, card expected {want.hex()}"
        return answer

    def done(self) -> None:
        assert self.steps == [], "card still expected more APDUs"


class EchoCard:
    """A virtual card over CardIo whose one command (INS 01) answers its whole input."""

    def __init__(self, **io: object) -> None:
        self.io = CardIo(**io)  # type: ignore[arg-type]
        self.commands: list[tuple[int, bytes]] = []

    def _dispatch(self, ins: int, p1: int, p2: int, data: bytes) -> bytes:
        self.commands.append((ins, data))
        if ins != 0x01:
            raise CardStatus(SW.SW_INS_NOT_SUPPORTED)
        return data * p1 if p1 else data

    def transmit(self, raw: bytes) -> bytes:
        cmd = CommandApdu.decode(raw)
        body = raw[4:]
        return self.io.exchange(cmd, self._dispatch, extended=len(body) >= 3 and body[0] == 0)


# --- codecs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("apdu", "short", "extended"),
    [
        (CommandApdu(0, 0xA4, 4, 0), "00a40400", "00a40400"),
        (CommandApdu(0, 0xCB, 0x3F, 0xFF, le=256), "00cb3fff00", "00cb3fff000100"),
        (CommandApdu(0, 0x20, 0, 0x80, b"\x31" * 2), "002000800231 31", "00200080000002 3131"),
        (CommandApdu(0, 0x87, 7, 0x9D, b"\x01", le=0), "0087079d 01 01 00", None),
    ],
)
def test_apdu_round_trip(apdu: CommandApdu, short: str, extended: str | None) -> None:
    raw = apdu.encode(extended=False)
    assert raw == bytes.fromhex(short.replace(" ", ""))
    assert CommandApdu.decode(raw).data == apdu.data
    if extended is not None:
        assert apdu.encode(extended=True) == bytes.fromhex(extended.replace(" ", ""))


def test_malformed_apdus_are_refused() -> None:
    for raw in ("00a404", "00a4040005aabb", "00a4040002aa"):
        with pytest.raises(ValueError):
            CommandApdu.decode(bytes.fromhex(raw))


def test_tlv_codec_handles_long_lengths_and_multibyte_tags() -> None:
    value = bytes(300)
    raw = encode_tlv(0x5FC105, value) + encode_tlv(0x53, [encode_tlv(0x70, b"x")])
    tlvs = parse_tlvs(raw)
    assert [t.tag for t in tlvs] == [0x5FC105, 0x53]
    assert raw[3:6] == b"\x82\x01\x2c"
    assert find_tlv(tlvs[1].value, 0x70) == b"x"
    with pytest.raises(ValueError):
        parse_tlvs(raw[:-1])


# --- the channel ---------------------------------------------------------------------------


def test_short_channel_chains_long_data_and_pages_long_answers() -> None:
    card = EchoCard()
    channel = ApduChannel(card.transmit, extended=False)
    data = bytes(range(256)) * 3  # 768 bytes: three chain blocks, three pages
    rapdu = channel.send(CommandApdu(0, 0x01, 0, 0, data, le=0))
    assert (rapdu.sw, rapdu.data) == (SW.SW_OK, data)
    assert card.commands == [(0x01, data)]  # the card saw one whole command


def test_extended_channel_sends_one_apdu() -> None:
    sent: list[bytes] = []
    card = EchoCard()

    def transmit(raw: bytes) -> bytes:
        sent.append(raw)
        return card.transmit(raw)

    rapdu = ApduChannel(transmit, extended=True).send(CommandApdu(0, 0x01, 0, 0, bytes(600)))
    assert rapdu.data == bytes(600)
    assert len(sent) == 1 and sent[0][4] == 0  # extended Lc


def test_6cxx_resends_with_the_le_the_card_wants() -> None:
    script = Script(("00ca010000", "6c05"), ("00ca010005", "01020304059000"))
    rapdu = ApduChannel(script).send(CommandApdu(0, 0xCA, 1, 0, le=256))
    assert (rapdu.data, rapdu.sw) == (bytes.fromhex("0102030405"), SW.SW_OK)
    script.done()


def test_6cxx_during_get_response_is_followed() -> None:
    card = EchoCard(exact_le=True)  # IsoApplet: GET RESPONSE Le must be exact
    sent: list[bytes] = []

    def transmit(raw: bytes) -> bytes:
        sent.append(raw)
        return card.transmit(raw)

    rapdu = ApduChannel(transmit, extended=False).send(CommandApdu(0, 0x01, 2, 0, bytes(150)))
    assert (rapdu.sw, len(rapdu.data)) == (SW.SW_OK, 300)
    # first page 256, then 61 2C -> GET RESPONSE Le=2C is exact: no 6C needed
    assert sent[-1] == bytes.fromhex("00c000002c")
    script = Script(
        ("00b0000000", "aa" * 256 + "6100"),  # 256 more (61 00)
        ("00c0000000", "6c10"),  # card has only 16 left: exact Le please
        ("00c0000010", "bb" * 16 + "9000"),
    )
    rapdu = ApduChannel(script).send(CommandApdu(0, 0xB0, 0, 0, le=256))
    assert rapdu.data == b"\xaa" * 256 + b"\xbb" * 16
    script.done()


@pytest.mark.parametrize(
    ("channel", "cla"), [(0, 0x00), (3, 0x03), (4, 0x40), (11, 0x47), (19, 0x4F)]
)
def test_logical_channels_in_cla_and_get_response(channel: int, cla: int) -> None:
    assert channel_cla(channel) == cla
    assert get_response_cla(cla | 0x10) == cla  # chaining bit dropped, channel kept
    c = f"{cla:02x}"
    script = Script((f"{c}cb3fff00", "01" * 256 + "6102"), (f"{c}c0000002", "0203" + "9000"))
    rapdu = ApduChannel(script, channel=channel).send(CommandApdu(0, 0xCB, 0x3F, 0xFF, le=0))
    assert rapdu.data == b"\x01" * 256 + b"\x02\x03"
    script.done()
    with pytest.raises(ValueError):
        channel_cla(20)


def test_t0_sends_case_4_without_le_and_never_extended() -> None:
    script = Script(
        ("00870 79d 03 7c0182".replace(" ", ""), "6104"),
        ("00c0000004", "7c0282009000"),
    )
    channel = ApduChannel(script, extended=True, t0=True)
    assert channel.extended is False
    rapdu = channel.send(CommandApdu(0, 0x87, 0x07, 0x9D, bytes.fromhex("7c0182"), le=0))
    assert (rapdu.data, rapdu.sw) == (bytes.fromhex("7c028200"), SW.SW_OK)
    script.done()


def test_endless_61xx_is_a_device_error() -> None:
    channel = ApduChannel(lambda apdu: b"\x01\x61\x01")
    with pytest.raises(DeviceError):
        channel.send(CommandApdu(0, 0xCA, 0, 0, le=0))


def test_card_io_refuses_chained_select_and_oversized_chains() -> None:
    card = EchoCard(max_chain=300)
    assert card.transmit(bytes.fromhex("10a4040001a0")) == bytes.fromhex("6884")
    assert card.transmit(bytes.fromhex("10010000ff") + bytes(255)) == bytes.fromhex("9000")
    assert card.transmit(bytes.fromhex("10010000ff") + bytes(255)) == bytes.fromhex("6a84")
    assert card.transmit(bytes.fromhex("00c0000000")) == bytes.fromhex("6985")  # nothing pending


def test_memory_transport_reports_the_cards_protocol() -> None:
    class T0Card(EchoCard):
        protocol = CardProtocol.T0
        atr = bytes.fromhex("3b00")

        def power_on(self) -> None: ...

        def power_off(self) -> None: ...

        def reset(self) -> None: ...

        def process(self, apdu: bytes) -> bytes:
            return self.transmit(apdu)

    reader = MemoryReader("T=0 reader")
    reader.insert(T0Card())
    transport = reader.connect()
    assert (transport.protocol, transport.extended) == (CardProtocol.T0, False)


# --- status words and PINs -----------------------------------------------------------------


def test_status_words_map_to_errors_in_one_place() -> None:
    err = error_for_sw(sw_with_retries(2))
    assert isinstance(err, PinIncorrectError) and err.retries == 2
    assert retries_in(0x63C0) == 0 and retries_in(0x6300) is None and retries_in(0x9000) is None
    assert sw_with_retries(20) == 0x63CF
    assert isinstance(error_for_sw(0x6983), PinLockedError)
    assert isinstance(error_for_sw(0x6982), CardNotVerifiedError)
    assert isinstance(error_for_sw(0x6A82), NotFoundError)
    unknown = error_for_sw(0x6F42)
    assert isinstance(unknown, DeviceError) and "6F42" in str(unknown)


def test_pin_formats_pad_and_check() -> None:
    piv = PinFormat(min_length=6, max_length=8, stored_length=8, pad_char=0xFF)
    assert piv.block(b"123456") == bytearray(b"123456\xff\xff")
    with pytest.raises(PinLenRangeError):
        piv.block(b"12345")
    with pytest.raises(PinInvalidError):
        piv.block(b"12345a")
    assert piv.block(b"abcdef", encoding=PinEncoding.UTF8) == bytearray(b"abcdef\xff\xff")
    # an IsoApplet PIN as its PKCS#15 AODF states it: 4-16 ascii-numeric, 00-padded to 16
    iso = PinFormat.from_pkcs15(
        min_length=4,
        max_length=16,
        stored_length=16,
        pad_char=0x00,
        pin_type="ascii_numeric",
        needs_padding=True,
    )
    assert iso.block(b"1234") == bytearray(b"1234" + bytes(12))
    unpadded = PinFormat.from_pkcs15(
        min_length=4,
        max_length=16,
        stored_length=16,
        pad_char=0,
        pin_type="utf8",
        needs_padding=False,
    )
    assert unpadded.block(b"pass") == bytearray(b"pass")
