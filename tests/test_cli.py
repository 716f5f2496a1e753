"""tokenctl's first commands against a running daemon, as a script would use them."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import PIN, pkcs1_blob
from tokend.cli.tokenctl import main


def _pin_fd() -> int:
    read, write = os.pipe()
    os.write(write, PIN.encode() + b"\n")
    os.close(write)
    return read


def test_list_json(memory_piv, capsys) -> None:
    demo = memory_piv.extras["demo"]
    assert main(["--socket", str(memory_piv.socket), "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["present"] and rows[0]["serial"] == demo.guid.hex()


def test_decrypt_from_a_file_with_the_pin_on_a_descriptor(memory_piv, tmp_path, capfdbinary):
    demo = memory_piv.extras["demo"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    (tmp_path / "blob").write_bytes(blob)
    code = main(
        [
            "--socket",
            str(memory_piv.socket),
            "decrypt",
            "--key",
            "9d",
            "--in",
            str(tmp_path / "blob"),
            "--out",
            str(tmp_path / "plain"),
            "--pin-fd",
            str(_pin_fd()),
        ]
    )
    assert code == 0
    assert (tmp_path / "plain").read_bytes() == secret


def test_wrong_pin_is_one_line_and_exit_1(memory_piv, tmp_path, capsys) -> None:
    read, write = os.pipe()
    os.write(write, b"000000\n")
    os.close(write)
    (tmp_path / "blob").write_bytes(b"\x00" * 256)
    code = main(
        [
            "--socket",
            str(memory_piv.socket),
            "decrypt",
            "--in",
            str(tmp_path / "blob"),
            "--pin-fd",
            str(read),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "wrong PIN" in err and "2 tries left" in err


def test_unreachable_daemon_says_what_to_do(tmp_path, capsys) -> None:
    assert main(["--socket", str(tmp_path / "nothing.sock"), "list"]) == 1
    assert "tokend serve" in capsys.readouterr().err


def test_serve_config_rejects_unknown_keys(tmp_path) -> None:
    import pytest

    from tokend.cli.tokend_main import ServeConfig

    good = tmp_path / "good.toml"
    good.write_text('socket = "/tmp/x.sock"\ntransports = []\nallow_virtual_readers = true\n')
    cfg = ServeConfig.load(good)
    assert str(cfg.socket) == "/tmp/x.sock" and cfg.transports == []
    assert cfg.allow_virtual_readers
    bad = tmp_path / "bad.toml"
    bad.write_text("alow_virtual_readers = true\n")  # a typo must not pass silently
    with pytest.raises(ValueError, match=r"bad\.toml:1: alow_virtual_readers: unknown key"):
        ServeConfig.load(bad)


def test_transports_come_from_the_config_or_the_repeatable_flag(tmp_path) -> None:
    from tokend.cli.tokend_main import ServeConfig, build_parser, build_registry

    conf = tmp_path / "tokend.toml"
    conf.write_text(
        'transports = ["pcsc", "ble"]\n[[ble_trusted]]\naddress = "c0-ff-ee-00-00-01"\n'
        'identity = "0A1B"\n'
    )
    cfg = ServeConfig.load(conf)
    assert cfg.transports == ["pcsc", "ble"]
    registry, _tokens = build_registry(cfg)
    watchers = {w.name: w for w in registry._watchers}
    assert set(watchers) == {"pcsc", "ble"}
    trusted = watchers["ble"].configured["C0:FF:EE:00:00:01"]
    assert trusted.identity == "0a1b" and trusted.source == "config"

    args = build_parser().parse_args(["serve", "--transport", "ble", "--transport", "pcsc"])
    assert args.transport == ["ble", "pcsc"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--transport", "radio"])
    cfg.transports = ["radio"]
    with pytest.raises(ValueError, match="unknown transport 'radio'"):
        build_registry(cfg)
