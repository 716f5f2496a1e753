"""The policy's decisions and the Assuan codec, without processes (the end-to-end behaviour
with a real pinentry is in test_pinentry.py)."""

from __future__ import annotations

import pytest

from tokend.consent import ClientInfo, Policy, TokenDescription, Use, UseRequest
from tokend.pinentry import PinentryProtocolError, escape, unescape_into

MAILER = ClientInfo(pid=7, uid=1000, exe="/usr/lib/thunderbird/thunderbird")
OTHER = ClientInfo(pid=8, uid=1000, exe="/usr/bin/curl")
PIV = TokenDescription(0, "PIV demo", "00aa")
SIM = TokenDescription(1, "SIM", "8949")


def _policy(*rules: dict) -> Policy:
    return Policy.from_config(list(rules))


def test_no_rules_allows_everyone() -> None:
    assert _policy().decide(UseRequest(OTHER, PIV, Use.DECRYPT)).allowed


def test_rules_allow_only_named_program_token_and_use() -> None:
    policy = _policy(
        {"program": "/usr/lib/thunderbird/*", "tokens": ["00aa"], "operations": ["decrypt"]}
    )
    assert policy.decide(UseRequest(MAILER, PIV, Use.DECRYPT)).allowed
    assert not policy.decide(UseRequest(MAILER, PIV, Use.SIGN)).allowed
    assert not policy.decide(UseRequest(MAILER, SIM, Use.DECRYPT)).allowed
    refused = policy.decide(UseRequest(OTHER, PIV, Use.DECRYPT))
    assert not refused.allowed and "/usr/bin/curl" in refused.reason
    # A client whose executable could not be read matches no rule.
    assert not policy.decide(UseRequest(ClientInfo(pid=9), PIV, Use.DECRYPT)).allowed


def test_provisioning_is_spelt_either_way() -> None:
    """The issue and the docs say "provisioning"; "provision" (how refusals name the use)
    is accepted too. Neither word allows anything else."""
    for word in ("provisioning", "provision"):
        policy = _policy({"program": MAILER.exe, "operations": [word]})
        assert policy.decide(UseRequest(MAILER, PIV, Use.PROVISION)).allowed
        assert not policy.decide(UseRequest(MAILER, PIV, Use.DERIVE)).allowed
        assert not policy.decide(UseRequest(MAILER, PIV, Use.DECRYPT)).allowed
        assert not policy.decide(UseRequest(OTHER, PIV, Use.PROVISION)).allowed


def test_first_matching_rule_decides_confirmation() -> None:
    policy = _policy(
        {"program": MAILER.exe, "operations": ["sign"], "confirm": True},
        {"program": MAILER.exe},
    )
    assert policy.decide(UseRequest(MAILER, PIV, Use.SIGN)).confirm
    assert not policy.decide(UseRequest(MAILER, PIV, Use.DECRYPT)).confirm


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"program": "/x", "color": 1}, "policy[0]: unknown key 'color'"),
        ({"tokens": ["*"]}, "policy[0].program"),
        ({"program": "/x", "operations": ["fly"]}, "policy[0].operations"),
        ({"program": "/x", "tokens": "*"}, "policy[0].tokens"),
        ({"program": "/x", "confirm": "yes"}, "policy[0].confirm"),
    ],
)
def test_bad_rules_name_the_key(rule: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _policy(rule)


def test_assuan_escaping_round_trip() -> None:
    text = "50% off\nline two\r"
    escaped = escape(text)
    assert "\n" not in escaped and "\r" not in escaped and "%25" in escaped
    assert unescape_into(escaped.encode()) == text.encode()
    assert unescape_into(b"12%2534") == bytearray(b"12%34")
    for bad in (b"%", b"%2", b"%zz"):
        with pytest.raises(PinentryProtocolError):
            unescape_into(bad)
