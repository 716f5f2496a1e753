"""Property tests (hypothesis) for every parser: arbitrary bytes give the parser's own
clean error, never another exception; what parses round-trips. The targets are shared with
`make fuzz` (tests/fuzz_targets.py), which runs the same targets for millions of inputs.
Bounded: the whole module stays within a few tens of seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests import fuzz_targets as targets
from tokend import ccid
from tokend.config import ConfigError, ServeConfig
from tokend.errors import TokendError
from tokend.iso7816 import tlv
from tokend.iso7816.apdu import CommandApdu
from tokend.iso7816.status import error_for_sw
from tokend.pinentry import PinentryProtocolError, escape, unescape_into
from tokend.protocol import decode_request, encode_request

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _seeded(name: str):  # type: ignore[no-untyped-def]
    """Arbitrary bytes, and the target's seeds with bytes spliced in (nearer the parser)."""
    seeds = targets.SEEDS[name]
    spliced = st.tuples(
        st.sampled_from(seeds), st.integers(0, 400), st.integers(0, 400), st.binary(max_size=16)
    ).map(lambda t: t[0][: t[1]] + t[3] + t[0][t[2] :])
    return st.one_of(st.binary(max_size=600), spliced)


#: Targets whose inputs cost milliseconds (a card opened, a file written, RSA decryption).
SLOW_TARGETS = ["piv_driver", "config", "smime", "smime_decrypt"]


@pytest.mark.parametrize("name", [n for n in targets.TARGETS if n not in SLOW_TARGETS])
def test_target_takes_any_input(name: str) -> None:
    @FAST
    @given(_seeded(name))
    def run(data: bytes) -> None:
        targets.TARGETS[name](data)

    run()


@pytest.mark.parametrize("name", SLOW_TARGETS)
def test_slow_target_takes_any_input(name: str) -> None:
    @SLOW
    @given(_seeded(name))
    def run(data: bytes) -> None:
        targets.TARGETS[name](data)

    run()


# -- round trips over generated valid values --------------------------------------------

tags = st.one_of(
    st.integers(0x01, 0x1E).map(lambda t: t | 0x40),  # one byte, not 1F-form
    st.integers(0x00, 0x7F).map(lambda b: 0x5F00 | b),  # two bytes (5Fxx)
    st.integers(0x00, 0x7F).map(lambda b: 0x7F00 | b),  # two bytes constructed (7Fxx)
    st.integers(0x80, 0xFF).flatmap(  # three bytes (5F 8x xx)
        lambda mid: st.integers(0, 0x7F).map(lambda last: (0x5F << 16) | (mid << 8) | last)
    ),
)


@FAST
@given(st.lists(st.tuples(tags, st.binary(max_size=300)), max_size=6))
def test_tlv_encode_then_parse_is_identity(items: list[tuple[int, bytes]]) -> None:
    encoded = b"".join(tlv.encode_tlv(t, v) for t, v in items)
    assert [(x.tag, x.value) for x in tlv.parse_tlvs(encoded)] == items


commands = st.builds(
    CommandApdu,
    st.integers(0, 0xFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFF),
    st.binary(max_size=600),
    st.one_of(st.none(), st.integers(1, 0x10000)),
)


@FAST
@given(commands, st.booleans())
def test_command_apdu_round_trips(apdu: CommandApdu, force_extended: bool) -> None:
    extended = force_extended or apdu.needs_extended
    assert CommandApdu.decode(apdu.encode(extended=extended)) == apdu


@FAST
@given(
    st.integers(0, 0xFF),
    st.integers(0, 0xFF),
    st.integers(0, 0xFF),
    st.integers(0, 3),
    st.binary(max_size=400),
)
def test_ccid_message_round_trips(msg_type: int, slot: int, seq: int, p: int, data: bytes) -> None:
    msg = ccid.CcidMessage(msg_type, slot, seq, p, p, p, data)
    assert ccid.CcidMessage.decode(msg.encode()) == msg
    assert ccid.CcidMessage.expected_length(msg.encode()) == len(msg.encode())


@FAST
@given(st.binary(max_size=2000), st.integers(1, 300))
def test_ccid_chaining_reassembles(apdu: bytes, room: int) -> None:
    parts = ccid.split_command(apdu, room)
    assert b"".join(p for p, _ in parts) == apdu
    assert all(len(p) <= room for p, _ in parts)
    assert b"".join(p for p, _ in ccid.split_response(apdu, room)) == apdu


@FAST
@given(
    st.one_of(st.integers(-(2**31), 2**31), st.text(max_size=20)),
    st.text(max_size=30),
    st.dictionaries(
        st.text(max_size=10), st.one_of(st.none(), st.booleans(), st.integers(), st.text())
    ),
)
def test_jsonrpc_request_round_trips(request_id, method: str, params: dict) -> None:  # type: ignore[no-untyped-def]
    line = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
    got = decode_request(line.encode())
    assert (got.id, got.method, got.params, got.notification) == (
        request_id,
        method,
        params,
        False,
    )
    if isinstance(request_id, int):
        assert decode_request(encode_request(request_id, method, params).rstrip()).id == request_id


def test_every_status_word_maps_to_an_error_with_a_ckr() -> None:
    """Exhaustive rather than sampled: 65 536 status words, one mapping."""
    for sw in range(0x10000):
        if sw == 0x9000:
            continue
        err = error_for_sw(sw)
        assert isinstance(err, TokendError) and isinstance(err.ckr, int), hex(sw)


@FAST
@given(st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=40))
def test_pinentry_escape_round_trips(text: str) -> None:
    assert bytes(unescape_into(escape(text).encode("latin-1"))) == text.encode("latin-1")


@FAST
@given(st.binary(max_size=40))
@example(b"%+1")
@example(b"% 1")
@example(b"%-1")
def test_pinentry_accepts_only_two_hex_digit_escapes(data: bytes) -> None:
    """Regression (found by the property test): "%+1" and "% 1" were read as byte 01 —
    int() is lenient; Assuan escapes are exactly two hex digits."""
    import re

    valid = re.fullmatch(rb"(?:[^%]|%[0-9A-Fa-f]{2})*", data, re.DOTALL) is not None
    try:
        unescape_into(data)
    except PinentryProtocolError:
        assert not valid
    else:
        assert valid


# -- reproducers of findings, kept -------------------------------------------------------


def test_config_that_is_not_utf8_is_a_located_config_error(tmp_path: Path) -> None:
    """Found by `make fuzz` (config target): a stray non-UTF-8 byte escaped as a raw
    UnicodeDecodeError traceback instead of tokend's one-line config error."""
    path = tmp_path / "tokend.toml"
    path.write_bytes(b'log_level = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        ServeConfig.load(path)


# -- findings kept as regression tests ------------------------------------------------------

SMIME_FINDINGS = sorted((targets.SMIME_VECTORS / "regressions").glob("*.bin"))


@pytest.mark.parametrize("path", SMIME_FINDINGS, ids=[p.name for p in SMIME_FINDINGS])
def test_smime_fuzz_findings_are_one_line_errors(path) -> None:  # type: ignore[no-untyped-def]
    """Malformed DER that asn1crypto or OpenSSL choke on (IndexError, AttributeError,
    InvalidVersion, UnsupportedAlgorithm) is a corrupt or unverifiable message to the user,
    as `tokenctl smime decrypt/verify` print it, never a stray exception."""
    from tokend.smime.envelope import decrypt
    from tokend.smime.errors import SmimeError
    from tokend.smime.verifying import verify

    data = path.read_bytes()
    with pytest.raises(SmimeError):
        decrypt(targets._software_keyring(), data)  # type: ignore[arg-type]
    with pytest.raises(SmimeError):
        verify(data, [])
    targets.TARGETS[path.name.split("-")[0]](data)
