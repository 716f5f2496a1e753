"""Checks of the values inside the configuration's tables (`[[modules]]`, `[[ble_trusted]]`),
shared by `tokend.config` (which reports a bad value as ``FILE:LINE: KEY: problem`` at
start and in `tokend check-config`) and the drivers that use the values (vendor modules,
BLE). One rule in one place: a value `check-config` accepts is one the driver accepts.

Pure: no I/O, no imports from the layers above (tests/test_layers.py), so the
configuration need not import a driver (and its third-party transport library) to check a
file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class FieldError(ValueError):
    """A bad value in one table of an array of tables: which table (``index``, from 0),
    which key in it (``field``) and what is wrong."""

    def __init__(self, field: str, problem: str, index: int | None = None) -> None:
        super().__init__(
            f"{field}: {problem}" if index is None else f"[{index}].{field}: {problem}"
        )
        self.field, self.problem, self.index = field, problem, index

    def at(self, index: int) -> FieldError:
        return FieldError(self.field, self.problem, index)


# --- single values ---------------------------------------------------------------------------


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be a string")
    return value


def non_empty_string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("must be a non-empty string")
    return value


def positive_int(value: Any) -> int:
    # bool is an int in Python, but `workers = true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a whole number >= 1")
    return value


def positive_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError("must be a number of seconds > 0")
    return float(value)


def normalize_address(address: str) -> str:
    """A Bluetooth device address as BlueZ spells it (``C0:FF:EE:00:00:01``); ``-`` as
    separator and lower case are accepted. ValueError otherwise."""
    parts = address.strip().upper().replace("-", ":").split(":")
    if len(parts) != 6 or not all(
        len(p) == 2 and all(c in "0123456789ABCDEF" for c in p) for p in parts
    ):
        raise ValueError(f"not a Bluetooth address: {address!r} (expected XX:XX:XX:XX:XX:XX)")
    return ":".join(parts)


def ble_address(value: Any) -> str:
    return normalize_address(non_empty_string(value))


def module_label(path: str) -> str:
    """The label a module gets from its file name (``libsofthsm2.so`` → ``softhsm2``)."""
    name = os.path.basename(path).split(".so")[0]
    return name.removeprefix("lib") or name


# --- tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    check: Callable[[Any], Any]
    required: bool = False


#: One `[[modules]]` table (a vendor PKCS#11 module).
MODULE_FIELDS: dict[str, Field] = {
    "path": Field(non_empty_string, required=True),
    "label": Field(non_empty_string),
    "timeout": Field(positive_seconds),
    "workers": Field(positive_int),
    "poll_interval": Field(positive_seconds),
}

#: One `[[ble_trusted]]` table (a BLE key tokend may use).
BLE_TRUSTED_FIELDS: dict[str, Field] = {
    "address": Field(ble_address, required=True),
    "identity": Field(non_empty_string),
    "label": Field(string),
}


def check_table(table: Any, fields: Mapping[str, Field]) -> dict[str, Any]:
    """The table's values, checked and normalised. FieldError names the key."""
    if not isinstance(table, Mapping):
        raise TypeError("must be a table")
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise FieldError(unknown[0], f"unknown key (known: {', '.join(fields)})")
    for name, spec in fields.items():
        if spec.required and name not in table:
            raise FieldError(name, "required")
    checked = {}
    for name, value in table.items():
        try:
            checked[name] = fields[name].check(value)
        except (TypeError, ValueError) as exc:
            raise FieldError(name, str(exc)) from None
    return checked


def _tables(tables: Any, fields: Mapping[str, Field]) -> list[dict[str, Any]]:
    if not isinstance(tables, list):
        raise TypeError("must be a list of tables ([[…]])")
    checked = []
    for index, table in enumerate(tables):
        try:
            checked.append(check_table(table, fields))
        except FieldError as exc:
            raise exc.at(index) from None
        except TypeError as exc:
            raise FieldError("", str(exc), index) from None
    return checked


def _unique(values: Iterable[tuple[int, str, str]], what: str) -> None:
    """``values``: (index, field, value); the second table with a value already seen is
    the error (naming the first)."""
    seen: dict[str, int] = {}
    for index, field, value in values:
        if value in seen:
            raise FieldError(field, f"{what} {value!r} is already used by [{seen[value]}]", index)
        seen[value] = index


def check_module_tables(tables: Any) -> list[dict[str, Any]]:
    """`[[modules]]`: each table checked; labels unique (explicit, or from the file name:
    they name the slots), and no file listed twice (a module is loaded once per process)."""
    checked = _tables(tables, MODULE_FIELDS)
    _unique(
        (
            (i, "label" if "label" in t else "path", t.get("label") or module_label(t["path"]))
            for i, t in enumerate(checked)
        ),
        "label",
    )
    _unique(
        ((i, "path", os.path.normpath(t["path"])) for i, t in enumerate(checked)), "module file"
    )
    return checked


def check_ble_trusted_tables(tables: Any) -> list[dict[str, Any]]:
    """`[[ble_trusted]]`: each table checked, each address listed once."""
    checked = _tables(tables, BLE_TRUSTED_FIELDS)
    _unique(((i, "address", t["address"]) for i, t in enumerate(checked)), "address")
    return checked
