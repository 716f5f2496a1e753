"""PKCS#11 URIs (RFC 7512) as tokenctl reads them."""

from __future__ import annotations

import pytest

from tokend.cli.uri import UriError, id_to_slot, is_uri, parse, slot_of, slot_to_id

TOKEN_INFO = {
    "label": "PIV #8f3e0a1b",
    "manufacturer_id": "PIV (YubiKey-compatible)",
    "model": "PIV",
    "serial_number": "8f3e0a1b2c3d4e5f",
    "token_serial": "8f3e0a1b2c3d4e5f0011223344556677",
}


def test_rfc7512_examples_parse() -> None:
    uri = parse(
        "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
        "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
        "id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin"
    )
    assert uri.token == "The Software PKCS#11 Softtoken"
    assert uri.manufacturer == "Snake Oil, Inc."
    assert uri.object == "my-certificate" and uri.type == "cert"
    assert uri.id == bytes.fromhex("69953e5cf4bdec91")
    assert uri.serial == ""
    assert uri.query == {"pin-source": "file:/etc/token_pin"}
    assert parse("pkcs11:").path == {}
    assert parse("pkcs11:object=%E2%82%AC").object == "€"


def test_token_matching_by_label_serial_and_slot() -> None:
    assert parse("pkcs11:token=PIV%20%238f3e0a1b").matches_token(TOKEN_INFO, 0)
    assert parse("pkcs11:serial=8f3e0a1b2c3d4e5f").matches_token(TOKEN_INFO, 0)
    assert parse("pkcs11:serial=8f3e0a1b2c3d4e5f0011223344556677").matches_token(TOKEN_INFO, 0)
    assert not parse("pkcs11:serial=8f3e").matches_token(TOKEN_INFO, 0)  # exact, not prefix
    assert not parse("pkcs11:token=Other").matches_token(TOKEN_INFO, 0)
    assert parse("pkcs11:slot-id=2").matches_token(TOKEN_INFO, 2)
    assert not parse("pkcs11:slot-id=2").matches_token(TOKEN_INFO, 0)
    assert parse("pkcs11:model=PIV;id=%03").selects_token
    assert not parse("pkcs11:id=%03").selects_token


def test_objects_map_to_piv_slots() -> None:
    assert slot_of(parse("pkcs11:id=%03")) == 0x9D
    assert slot_of(parse("pkcs11:id=%02;type=private")) == 0x9C
    assert slot_of(parse("pkcs11:id=%05")) == 0x82
    assert slot_of(parse("pkcs11:id=%18")) == 0x95
    assert slot_of(parse("pkcs11:object=Retired%20Key%203%20(84)")) == 0x84
    assert all(id_to_slot(slot_to_id(s)) == s for s in (0x9A, 0x9C, 0x9D, 0x9E, *range(0x82, 0x96)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pkcs11:colour=blue", "unknown PKCS#11 URI attribute"),
        ("pkcs11:token=a;token=b", "given twice"),
        ("pkcs11:type=key", "unknown object type"),
        ("pkcs11:slot-id=x", "slot-id must be a number"),
        ("pkcs11:token", "without a value"),
        ("pkcs11:object=%FF", "not UTF-8"),
        ("pkcs11:?colour=blue", "unknown PKCS#11 URI query attribute"),
        ("https://example.org", "not a PKCS#11 URI"),
    ],
)
def test_bad_uris_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        parse(text)


def test_objects_that_are_no_piv_key_are_refused() -> None:
    with pytest.raises(UriError, match="not a PIV key"):
        slot_of(parse("pkcs11:id=%19"))
    with pytest.raises(UriError, match="different slots"):
        slot_of(parse("pkcs11:id=%03;object=PIV%20Digital%20Signature%20(9C)"))
    with pytest.raises(UriError, match="names no object"):
        slot_of(parse("pkcs11:token=x"))
    with pytest.raises(UriError, match="does not name a PIV key slot"):
        slot_of(parse("pkcs11:object=mine"))


def test_scheme_is_case_insensitive() -> None:
    assert is_uri("PKCS11:id=%01") and not is_uri("9d") and not is_uri(None)
    assert parse("PKCS11:ID=%01").id == b"\x01"
