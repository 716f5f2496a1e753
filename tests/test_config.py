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


_MOD, _BLE = "[[modules]]\n", "[[ble_trusted]]\n"


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        ('log_level = "INFO"\ntransprots = ["pcsc"]\n', 2, "transprots", "unknown key"),
        ('\n\ntransports = ["pcsc", "bluetooth"]\n', 3, "transports", "'bluetooth'"),
        ("allow_virtual_readers = 1\n", 1, "allow_virtual_readers", "true or false"),
        ('log_level = "LOUD"\n', 1, "log_level", "DEBUG, INFO"),
        ("pinentry_timeout = -3\n", 1, "pinentry_timeout", "seconds"),
        ('sim_applet_aid = "F276A2"\n', 1, "sim_applet_aid", "5 to 16 bytes"),
        ('sim_applet_aid = "not hex"\n', 1, "sim_applet_aid", "hex digits"),
        (
            '[[policy]]\nprogram = "/a"\n\n[[policy]]\nprogram = "/b"\noperations = ["fly"]\n',
            6,
            "policy[1].operations",
            "use only decrypt",
        ),
        ('[[modules]]\nlabel = "x"\n', 1, "modules[0].path", "required"),
        ("socket = \n", 1, "(syntax)", "Invalid value"),
        # Values inside tables: checked like top-level keys, at the line of the key itself.
        (f'{_MOD}path = "/m/a.so"\ntimeout = "abc"\n', 3, "modules[0].timeout", "seconds > 0"),
        (f'{_MOD}path = "/m/a.so"\nworkers = -3\n', 3, "modules[0].workers", "number >= 1"),
        (f'{_MOD}path = "/m/a.so"\nworkers = true\n', 3, "modules[0].workers", ">= 1"),
        (f'{_MOD}path = "/m/a.so"\npoll_interval = 0\n', 3, "modules[0].poll_interval", "> 0"),
        (f'{_MOD}path = "/m/a.so"\nlabel = ""\n', 3, "modules[0].label", "non-empty"),
        (f"{_MOD}path = 5\n", 2, "modules[0].path", "non-empty string"),
        (
            f'{_MOD}path = "/m/a.so"\nlabel = "v"\n\n{_MOD}path = "/m/b.so"\nlabel = "v"\n',
            7,
            "modules[1].label",
            "label 'v' is already used by [0]",
        ),
        (  # the same label from the file names (libx.so → x): the slots would clash
            f'{_MOD}path = "/m/libx.so"\n{_MOD}path = "/n/libx.so"\n',
            4,
            "modules[1].path",
            "label 'x' is already used by [0]",
        ),
        (
            f'{_MOD}path = "/m/a.so"\nlabel = "a"\n{_MOD}path = "/m/./a.so"\nlabel = "b"\n',
            5,
            "modules[1].path",
            "module file '/m/a.so' is already used by [0]",
        ),
        (  # a typo in a later table: its own line, not the first table's header
            f'{_MOD}path = "/m/a.so"\nlabel = "a"\n\n{_MOD}path = "/m/b.so"\nlable = "b"\n',
            7,
            "modules[1].lable",
            "unknown key (known: path, label, timeout, workers, poll_interval)",
        ),
        ('modules = [{path = "/m/a.so", workers = 0}]\n', 1, "modules[0].workers", ">= 1"),
        ("modules = [1]\n", 1, "modules[0]", "must be a table"),
        (f'{_BLE}address = "nonsense"\n', 2, "ble_trusted[0].address", "not a Bluetooth"),
        (f'{_BLE}address = "C0:FF:EE:00:00:01"\nidentity = 5\n', 3, "ble_trusted[0].identity", ""),
        (
            f'{_BLE}address = "C0:FF:EE:00:00:01"\n{_BLE}label = "spare"\n',
            3,
            "ble_trusted[1].address",
            "required",
        ),
        (
            f'{_BLE}address = "C0:FF:EE:00:00:01"\n{_BLE}address = "c0-ff-ee-00-00-01"\n',
            4,
            "ble_trusted[1].address",
            "'C0:FF:EE:00:00:01' is already used by [0]",
        ),
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


def test_module_paths_the_daemon_would_skip_are_warnings(tmp_path: Path) -> None:
    """The daemon starts with a module it cannot load (one log line, everything else
    served), so check-config warns (exit 0) rather than fails, naming file, line and key."""
    module = tmp_path / "libvendor.so"
    module.write_bytes(b"")
    path = tmp_path / "config.toml"
    path.write_text(
        f'[[modules]]\npath = "{module}"\n\n[[modules]]\npath = "{tmp_path}/libgone.so"\n'
        '\n[[modules]]\npath = "librel.so"\n'
    )
    result = _check(path)
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK (2 warnings)" in result.stdout
    lines = result.stderr.splitlines()
    assert lines[0] == (
        f"{path}:5: modules[1].path: warning: does not exist: the daemon will skip this module"
    )
    assert lines[1].startswith(f"{path}:8: modules[2].path: warning: a relative path")
    assert len(lines) == 2  # the module that exists is not mentioned
    path.write_text(f'[[modules]]\npath = "{module}"\n')
    result = _check(path)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, f"{path}: OK", "")


def test_the_documented_example_checks_clean(tmp_path: Path) -> None:
    """The example in docs/configuration.md is a file a user may copy: check-config takes
    it (keys after a [[table]] header belong to that table, so top-level keys come first)."""
    import re

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert example is not None
    module = tmp_path / "libsofthsm2.so"
    module.write_bytes(b"")  # the path must exist for no warning; its content is not read
    path = tmp_path / "config.toml"
    path.write_text(example.group(1).replace("/usr/lib/softhsm/libsofthsm2.so", str(module)))
    result = _check(path)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert f"{path}: OK" in result.stdout


@pytest.mark.parametrize(
    ("aid", "served"),
    [
        (None, True),  # the default: IsoApplet's AID
        ('"F2:76:A2:88:BC:FB:A6:9D:34:F3:10:01"', True),  # the same, written with colons
        ('"A000000063504B43532D3135"', False),  # the PKCS#15 AID: the applet is not there
    ],
    ids=["default", "isoapplet-colons", "other-aid"],
)
def test_the_sim_applet_is_selected_by_the_configured_aid(
    tmp_path: Path, aid: str | None, served: bool
) -> None:
    """`sim_applet_aid` is the AID the daemon selects the SIM's PKI applet by: a SIM
    whose applet answers to another one is not a SIM token to tokend."""
    import time

    from tokend.client import Client

    path, sock = tmp_path / "config.toml", tmp_path / "s.sock"
    path.write_text(f"sim_applet_aid = {aid}\n" if aid else "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--config", str(path),
         "--simulate", "sim", "--no-pcsc", "--no-p11kit", "--socket", str(sock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        with Client(sock) as client:
            # the card is probed once at start: present, or left unserved for good
            deadline = time.monotonic() + (15 if served else 3)
            present: list[int] = []
            while time.monotonic() < deadline and not present:
                present = client.slot_list(token_present=True)
                time.sleep(0.05)
            assert bool(present) == served
    finally:
        proc.terminate()
        proc.wait(timeout=10)
