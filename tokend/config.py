"""The daemon's configuration: one TOML file, `$XDG_CONFIG_HOME/tokend/config.toml` by
default (`--config FILE`). Every key is declared once below, with its type, default and a
line of documentation (docs/configuration.md lists the same table). An unknown key or a bad
value is an error naming the file, the line and the key — a typo must never silently
weaken a setting. `tokend check-config [FILE]` runs the same checks without starting.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokend.config_values import FieldError, check_ble_trusted_tables, check_module_tables
from tokend.consent import Policy
from tokend.paths import default_socket_path
from tokend.pinentry import PinentryOptions, PinentryPrompter, PolicyAuthorizer
from tokend.wiring import SIMULATORS, TRANSPORTS

#: Transports a daemon can watch; the wiring knows which of them are installed.
KNOWN_TRANSPORTS = (*TRANSPORTS, "none")
#: In-process simulated tokens (`--simulate KIND`).
KNOWN_SIMULATIONS = tuple(SIMULATORS)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tokend" / "config.toml"


class ConfigError(ValueError):
    """A configuration problem, located: ``FILE:LINE: KEY: what is wrong``."""

    def __init__(self, path: Path | None, line: int | None, key: str, problem: str) -> None:
        where = str(path) if path is not None else "configuration"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {key}: {problem}")
        self.path, self.line, self.key = path, line, key


@dataclass
class ServeConfig:
    socket: Path = field(default_factory=default_socket_path)
    transports: list[str] = field(default_factory=lambda: ["pcsc"])
    simulate: list[str] = field(default_factory=list)
    allow_simulation: bool = True
    allow_virtual_readers: bool = False
    log_level: str = "INFO"
    p11kit: bool = True
    modules: list[dict[str, Any]] = field(default_factory=list)
    ble_trusted: list[dict[str, Any]] = field(default_factory=list)
    #: the SIM PKI applet's AID (None: IsoApplet's)
    sim_applet_aid: bytes | None = None
    #: PIN typed into the daemon's own pinentry (C_Login without a PIN); docs/consent.md
    protected_authentication_path: bool = False
    pinentry_program: str | None = None
    pinentry_timeout: float = 60.0
    pinentry_tty: str | None = None
    #: per-program policy: `[[policy]]` tables and how long one confirmation lasts
    policy: list[dict[str, Any]] = field(default_factory=list)
    confirm_window: float = 300.0
    #: not from the file: set by flags
    export_dir: Path | None = None
    simulate_control: Path | None = None
    #: `--module PATH` (repeatable): modules labelled after their file name
    module_paths: list[str] = field(default_factory=list)
    source: Path | None = None
    #: what `tokend check-config` warns about (the daemon starts, but skips something):
    #: ``FILE:LINE: KEY: warning: …`` lines
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | None) -> ServeConfig:
        """Read ``path`` (None: defaults only). Raises ConfigError, located."""
        cfg = cls()
        if path is None:
            return cfg
        try:
            text = path.read_text(encoding="utf-8")  # TOML is UTF-8 whatever the locale
        except OSError as exc:
            raise ConfigError(path, None, "(file)", exc.strerror or str(exc)) from None
        except UnicodeDecodeError as exc:  # found by fuzzing: a stray byte is a user error
            raise ConfigError(path, None, "(file)", f"not UTF-8 text ({exc.reason})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = re.search(r"at line (\d+)", str(exc))
            raise ConfigError(
                path, int(match.group(1)) if match else None, "(syntax)", str(exc)
            ) from None
        cfg.source = path
        locate = _Locator(text)
        for key, value in data.items():
            spec = SCHEMA.get(key)
            if spec is None:
                known = ", ".join(sorted(SCHEMA))
                raise ConfigError(path, locate(key), key, f"unknown key (known: {known})")
            try:
                setattr(cfg, spec.attribute or key, spec.parse(value))
            except FieldError as exc:  # a value inside one table of an array of tables
                where = f"{key}[{exc.index}]" + (f".{exc.field}" if exc.field else "")
                line = locate(key, exc.index, exc.field or None)
                raise ConfigError(path, line, where, exc.problem) from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(path, locate(key), key, str(exc)) from None
        try:
            cfg.build_policy()
        except ValueError as exc:  # "policy[1].operations: …": point at that key
            match = re.match(r"(policy\[(\d+)\](?:\.(\w+))?): (.*)", str(exc), re.S)
            if match is None:
                raise ConfigError(path, locate("policy"), "policy", str(exc)) from None
            where, index, sub, problem = match.groups()
            raise ConfigError(path, locate("policy", int(index), sub), where, problem) from None
        for index, table in enumerate(cfg.modules):
            warning = _module_path_warning(table["path"])
            if warning:
                line = locate("modules", index, "path")
                cfg.warnings.append(
                    str(ConfigError(path, line, f"modules[{index}].path", f"warning: {warning}"))
                )
        return cfg

    def build_policy(self) -> Policy:
        return Policy.from_config(self.policy, self.confirm_window)

    def consent(self) -> dict[str, Any]:
        """The Engine's prompt and policy seams for this configuration."""
        options = PinentryOptions(self.pinentry_program, self.pinentry_timeout, self.pinentry_tty)
        policy = self.build_policy()
        return {
            "pin_prompter": (
                PinentryPrompter(options) if self.protected_authentication_path else None
            ),
            "authorizer": PolicyAuthorizer(policy, options) if policy.enforced else None,
        }


# --- the schema ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    parse: Callable[[Any], Any]
    default: str
    doc: str
    attribute: str | None = None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("must be a non-empty string")
    return value


def _aid(value: Any) -> bytes:
    """An application identifier in hex (ISO 7816-4: 5 to 16 bytes); spaces and colons
    between the digits are allowed."""
    text = _string(value).replace(" ", "").replace(":", "")
    try:
        aid = bytes.fromhex(text)
    except ValueError:
        raise ValueError('must be hex digits, e.g. "F276A288BCFBA69D34F31001"') from None
    if not 5 <= len(aid) <= 16:
        raise ValueError(f"must be 5 to 16 bytes (ISO 7816-4), not {len(aid)}")
    return aid


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TypeError("must be a number of seconds >= 0")
    return float(value)


def _words(allowed: tuple[str, ...]) -> Callable[[Any], list[str]]:
    def parse(value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError("must be a list of strings")
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ValueError(f"unknown value {bad[0]!r} (known: {', '.join(allowed)})")
        return list(value)

    return parse


def _level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _policy(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise TypeError("must be a list of tables ([[policy]])")
    return list(value)  # checked as a whole by Policy.from_config


SCHEMA: dict[str, Key] = {
    "socket": Key(
        lambda v: Path(_string(v)),
        "$TOKEND_SOCKET, else $XDG_RUNTIME_DIR/tokend/tokend.sock",
        "the native socket (its directory is made 0700, the socket 0600)",
    ),
    "transports": Key(
        _words(KNOWN_TRANSPORTS),
        '["pcsc"]',
        'token transports to watch: pcsc, usb, ble ([] or ["none"]: none)',
    ),
    "simulate": Key(
        _words(KNOWN_SIMULATIONS), "[]", "in-process demo tokens (like --simulate KIND)"
    ),
    "allow_simulation": Key(_bool, "true", "false refuses --simulate (a production machine)"),
    "allow_virtual_readers": Key(
        _bool, "false", 'trust vpcd\'s "Virtual PCD" readers (tests only)'
    ),
    "log_level": Key(
        _level, '"INFO"', "DEBUG, INFO, WARNING or ERROR; never PINs, keys or plaintext"
    ),
    "p11kit": Key(_bool, "true", "serve the p11-kit RPC socket pkcs11.sock beside the native one"),
    "modules": Key(
        check_module_tables,
        "[]",
        "vendor PKCS#11 modules: [[modules]] path = …, label = … (docs/configuration.md)",
    ),
    "ble_trusted": Key(
        check_ble_trusted_tables,
        "[]",
        "BLE keys tokend may use: [[ble_trusted]] address = …",
    ),
    "sim_applet_aid": Key(
        _aid,
        '"F276A288BCFBA69D34F31001" (IsoApplet)',
        "the AID of the SIM's PKI applet, for a SIM whose applet was loaded under another one",
    ),
    "protected_authentication_path": Key(
        _bool, "false", "C_Login without a PIN opens tokend's own pinentry (docs/consent.md)"
    ),
    "pinentry_program": Key(_string, "first pinentry found", "the pinentry to run"),
    "pinentry_timeout": Key(_seconds, "60", "seconds a prompt waits, then it counts as canceled"),
    "pinentry_tty": Key(_string, "$GPG_TTY", "terminal for pinentry-curses/-tty"),
    "policy": Key(
        _policy,
        "[] (every program may do everything)",
        "per-program rules: [[policy]] program, tokens, operations, confirm",
    ),
    "confirm_window": Key(_seconds, "300", "seconds one confirmation covers"),
}


def _module_path_warning(path: str) -> str | None:
    """A module path the daemon will not load: it then skips that module with one log line
    (`module LABEL not used: …`) and serves everything else, so this is a warning."""
    if not os.path.isabs(path):
        return (
            "a relative path: the daemon looks for it in its working directory (under "
            "systemd, your home directory); give an absolute path"
        )
    if not os.path.exists(path):
        return "does not exist: the daemon will skip this module"
    if not os.path.isfile(path):
        return "is not a file: the daemon will skip this module"
    return None


class _Locator:
    """Line numbers for keys, so errors point into the file (tomllib gives none).

    ``locate(key)``: the top-level ``key = …`` line, else the first ``[[key]]`` header.
    ``locate(key, index)``: the header of the index-th ``[[key]]`` table (from 0);
    ``locate(key, index, sub)``: the ``sub = …`` line inside that table, else its header.
    Tables written inline (``key = [{…}, {…}]``) fall back to the ``key = …`` line.
    """

    _HEADER = re.compile(r"^\s*\[\[\s*(?P<name>[^\]]+?)\s*\]\]")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    @staticmethod
    def _assigns(line: str, key: str) -> bool:
        return bool(
            re.match(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')\s*=", line)
        )

    def __call__(
        self, key: str, table_index: int | None = None, sub: str | None = None
    ) -> int | None:
        section: tuple[str, int] | None = None  # None: top level; else (array name, index)
        counts: dict[str, int] = {}
        top_level = header = found = None
        for number, line in enumerate(self.lines, 1):
            match = self._HEADER.match(line)
            if match:
                name = match.group("name").strip().strip('"')
                index = counts.get(name, 0)
                counts[name] = index + 1
                section = (name, index)
                if name == key and (table_index is None or index == table_index):
                    header = header or number
                    if sub is None:
                        break
                continue
            if line.lstrip().startswith("["):  # a [table]: not ours
                section = ("", 0)
                continue
            if section is None and top_level is None and self._assigns(line, key):
                top_level = number
            if (
                sub is not None
                and section == (key, table_index)
                and found is None
                and self._assigns(line, sub)
            ):
                found = number
        return found or header or top_level


def describe() -> list[tuple[str, str, str]]:
    """(key, default, doc) for docs and `tokend check-config --keys`."""
    return [(name, spec.default, spec.doc) for name, spec in SCHEMA.items()]
