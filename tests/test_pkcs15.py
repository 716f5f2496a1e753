"""PKCS#15 parsers and builders (tokend.pkcs15): the files OpenSC's pkcs15-init wrote on the
virtual SIM (captured from its APDUs), what tokend writes, and fuzzed input — which must
give `Pkcs15FormatError` (CKR_DEVICE_ERROR), never another exception or a hang."""

from __future__ import annotations

import random
import time

import pytest

from tokend import pkcs15
from tokend.errors import DeviceError
from tokend.pkcs11 import CKR

# Written by OpenSC 0.23's pkcs15-init on the virtual SIM (--create-pkcs15, --generate-key
# rsa/2048 --id 01 --label "mail key", --store-certificate --label Alice), zero padding cut.
OPENSC_DIR = bytes.fromhex(
    "61284f0ca000000063504b43532d313550124a617661436172642069736f4170706c657451043f005015"
) + bytes(86)
OPENSC_ODF = bytes.fromhex(
    "a80a300804063f0050154401a00a300804063f0050154402a10a300804063f0050154403"
    "a40a300804063f0050154404"
) + bytes(208)
OPENSC_TOKENINFO = bytes.fromhex(
    "303b020100040200000c07756e6b6e6f776e80124a617661436172642069736f4170706c6574"
    "03020410a511180f32303236313133303032313031375a"
)
OPENSC_AODF = bytes.fromhex(
    "302f300e0c08557365722050494e030206c030030401ffa11830160302028c0a010102010402"
    "0110020110800101040100"
) + bytes(207)
OPENSC_PRKDF = bytes.fromhex(
    "3046300e0c05416c696365030206c00401ff300e04010103020274030203b8020100a0143012"
    "3010310e300c06035504030c05416c696365a10e300c300604043f005015020208000"
    "0"
) + bytes(100)
OPENSC_PUKDF = bytes.fromhex(
    "3031300e0c086d61696c206b657903020640300d0401010302008b010100020100a110300e30"
    "0804063f005015330002020800"
) + bytes(200)
OPENSC_CDF = bytes.fromhex(
    "3020300b0c05416c696365030206403003040101a10c300a300804063f0050153400"
) + bytes(100)


def test_opensc_files_parse() -> None:
    (app,) = pkcs15.parse_dir(OPENSC_DIR)
    assert app.aid == pkcs15.PKCS15_AID and app.path == pkcs15.PKCS15_DF
    assert app.label == "JavaCard isoApplet"

    odf = {e.kind: e.path for e in pkcs15.parse_odf(OPENSC_ODF)}
    assert odf == {
        pkcs15.OdfKind.AUTH_OBJECTS: bytes.fromhex("3F0050154401"),
        pkcs15.OdfKind.PRIVATE_KEYS: bytes.fromhex("3F0050154402"),
        pkcs15.OdfKind.PUBLIC_KEYS: bytes.fromhex("3F0050154403"),
        pkcs15.OdfKind.CERTIFICATES: bytes.fromhex("3F0050154404"),
    }

    info = pkcs15.parse_tokeninfo(OPENSC_TOKENINFO)
    # The serial is "0000" on every card: it identifies nothing (tokend uses the ICCID).
    assert info.serial == b"\x00\x00" and info.label == "JavaCard isoApplet"
    assert info.flags == {"eidCompliant"} and info.manufacturer == "unknown"

    (pin,) = pkcs15.parse_aodf(OPENSC_AODF)
    assert (pin.auth_id, pin.reference, pin.label) == (b"\xff", 1, "User PIN")
    assert (pin.min_length, pin.stored_length, pin.max_length, pin.pad_char) == (4, 16, 16, b"\0")
    assert pin.pin_type == pkcs15.PinTypeCode.ASCII_NUMERIC
    assert {"case-sensitive", "initialized", "needs-padding"} <= pin.flags

    (key,) = pkcs15.parse_prkdf(OPENSC_PRKDF)
    assert (key.kind, key.id, key.key_reference, key.auth_id) == ("rsa", b"\x01", 0, b"\xff")
    assert key.usage == {"decrypt", "sign", "signRecover", "unwrap"}
    assert (key.path, key.modulus_bits, key.private_flag) == (pkcs15.PKCS15_DF, 2048, True)

    (public,) = pkcs15.parse_pukdf(OPENSC_PUKDF)
    assert (public.id, public.path) == (b"\x01", bytes.fromhex("3F0050153300"))
    assert public.label == "mail key" and not public.private_flag

    (cert,) = pkcs15.parse_cdf(OPENSC_CDF)
    assert (cert.id, cert.path, cert.label, cert.authority) == (
        b"\x01",
        bytes.fromhex("3F0050153400"),
        "Alice",
        False,
    )


def test_builders_round_trip() -> None:
    df = pkcs15.PKCS15_DF
    assert pkcs15.build_dir_record("JavaCard isoApplet") == OPENSC_DIR.rstrip(b"\0")
    odf = pkcs15.build_odf([(pkcs15.OdfKind.AUTH_OBJECTS, df + b"\x44\x01")])
    assert odf == OPENSC_ODF[:12]
    pin = pkcs15.build_pin(
        label="User PIN",
        auth_id=b"\xff",
        reference=1,
        min_length=4,
        stored_length=16,
        max_length=16,
        pad_char=b"\0",
    )
    assert pkcs15.parse_aodf(pin)[0].reference == 1
    key = pkcs15.build_private_rsa_key(
        label="k",
        key_id=b"\x07",
        usage=frozenset({"decrypt"}),
        key_reference=3,
        auth_id=b"\xff",
        path=df,
        modulus_bits=2048,
    )
    cert = pkcs15.build_certificate(label="c", cert_id=b"\x07", path=df + b"\x34\x03")
    # Concatenated and zero-padded, as the directory files are on the card.
    keys = pkcs15.parse_prkdf(key + key + bytes(40))
    assert [k.key_reference for k in keys] == [3, 3] and keys[0].usage == {"decrypt"}
    assert pkcs15.parse_cdf(cert + bytes(3))[0].path == df + b"\x34\x03"
    info = pkcs15.build_tokeninfo(b"\x00\x00", "x", flags=frozenset({"eidCompliant"}))
    assert pkcs15.parse_tokeninfo(info).label == "x"


def test_format_error_is_a_device_error() -> None:
    with pytest.raises(pkcs15.Pkcs15FormatError) as info:
        pkcs15.parse_prkdf(b"\x30\x05\x30\x00")
    assert isinstance(info.value, DeviceError) and info.value.ckr == CKR.CKR_DEVICE_ERROR


PARSERS = [
    (pkcs15.parse_dir, OPENSC_DIR),
    (pkcs15.parse_odf, OPENSC_ODF),
    (pkcs15.parse_tokeninfo, OPENSC_TOKENINFO),
    (pkcs15.parse_aodf, OPENSC_AODF),
    (pkcs15.parse_prkdf, OPENSC_PRKDF),
    (pkcs15.parse_pukdf, OPENSC_PUKDF),
    (pkcs15.parse_cdf, OPENSC_CDF),
]


def _mutations(seed: bytes, rng: random.Random) -> list[bytes]:
    out = [seed[:n] for n in range(len(seed.rstrip(b"\0")) + 1)]  # every truncation
    for _ in range(300):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.5:
                data[pos] = rng.randrange(256)
            elif choice < 0.7:
                data[pos] = rng.choice((0x00, 0x7F, 0x80, 0x81, 0x82, 0x83, 0x84, 0xFF))
            elif choice < 0.85:
                del data[pos : pos + rng.randint(1, 8)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            if not data:
                break
        out.append(bytes(data))
    out += [bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))) for _ in range(100)]
    return out


@pytest.mark.parametrize(("parse", "seed"), PARSERS, ids=lambda p: getattr(p, "__name__", ""))
def test_fuzzed_files_give_a_device_error_only(parse, seed) -> None:
    rng = random.Random(f"{parse.__name__}-1")  # reproducible
    started = time.monotonic()
    outcomes = {"parsed": 0, "rejected": 0}
    for data in _mutations(seed, rng):
        try:
            parse(data)
            outcomes["parsed"] += 1
        except pkcs15.Pkcs15FormatError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0 and outcomes["parsed"] > 0
    assert time.monotonic() - started < 20  # no pathological slowness (no hang)


def test_oversized_file_is_refused() -> None:
    with pytest.raises(pkcs15.Pkcs15FormatError):
        pkcs15.parse_cdf(b"\x30\x00" * (pkcs15.MAX_FILE // 2 + 1))
