"""The configuration file: every problem is named by file, line and key, at start and by
`tokend check-config`, and the default file is found where the docs say."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokend.config import SCHEMA, ConfigError, ServeConfig


def _check(path: Path | None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "tokend.cli.tokend_main", "check-config"]
    return subprocess.run(
        args + ([str(path)] if path else []),
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        ('log_level = "INFO"\ntransprots = ["pcsc"]\n', 2, "transprots", "unknown key"),
        ('\n\ntransports = ["pcsc", "bluetooth"]\n', 3, "transports", "'bluetooth'"),
        ("allow_virtual_readers = 1\n", 1, "allow_virtual_readers", "true or false"),
        ('log_level = "LOUD"\n', 1, "log_level", "DEBUG, INFO"),
        ("pinentry_timeout = -3\n", 1, "pinentry_timeout", "seconds"),
        (
            '[[policy]]\nprogram = "/a"\n\n[[policy]]\nprogram = "/b"\noperations = ["fly"]\n',
            6,
            "policy",
            "policy[1].operations",
        ),
        ('[[modules]]\nlabel = "x"\n', 1, "modules", "path: required"),
        ("socket = \n", 1, "(syntax)", "Invalid value"),
    ],
)
def test_problems_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, problem: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        ServeConfig.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    assert problem in message
    # The same message from `tokend check-config`, and from `tokend serve` at start.
    result = _check(path)
    assert result.returncode == 1 and f"{path}:{line}: {key}: " in result.stderr
    serve = subprocess.run(
        [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert serve.returncode == 1 and f"{path}:{line}: {key}: " in serve.stderr


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    missing = [key for key in SCHEMA if f"`{key}`" not in doc]
    assert not missing


def test_default_file_under_xdg_config_home(tmp_path: Path) -> None:
    (tmp_path / "tokend").mkdir()
    (tmp_path / "tokend" / "config.toml").write_text("p11kit = false\n")
    result = _check(None, {"XDG_CONFIG_HOME": str(tmp_path)})
    assert result.returncode == 0
    assert f"{tmp_path}/tokend/config.toml: OK" in result.stdout
    (tmp_path / "tokend" / "config.toml").write_text("p11kit = 0\n")
    assert _check(None, {"XDG_CONFIG_HOME": str(tmp_path)}).returncode == 1


def test_simulation_can_be_switched_off(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("allow_simulation = false\n")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--config", str(path)),
            *("--simulate", "piv", "--no-pcsc", "--socket", str(tmp_path / "s.sock")),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "simulation is switched off" in result.stderr
