"""PIV codes live in one place. An `ast` walk, like the layer test: outside the PIV wire
package (`tokend.piv`), no module spells a PIV key reference, data-object tag or the PIV
AID as a literal, and only the PIV driver, the virtual PIV card and its demo provisioner
import PIV instructions, tags or key references (others use the provisioning profile)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.test_layers import ROOT, module_name, sources

#: Modules that speak PIV on the wire and may import its codes.
MAY_IMPORT_CODES = (
    "tokend.piv",
    "tokend.drivers.piv",
    "tokend.simulators.piv",
    "tokend.simulators.demo",
)
#: Names in `tokend.piv.codes` / `tokend.piv.commands` that are instructions, tags, key
#: references or command builders.
_KEY_REFS = {0x9A, 0x9B, 0x9C, 0x9D, 0x9E}
_AID = re.compile(r"a0\s*00\s*00\s*03\s*08", re.IGNORECASE)


def _is_piv_literal(value: int) -> bool:
    return (
        value in _KEY_REFS
        or 0x5FC100 <= value <= 0x5FC1FF
        or value in (0x5FFF00, 0x5FFF01, 0x7F49, 0x7F61)
    )


def literal_findings(path: Path, source: str | None = None) -> list[str]:
    src = source if source is not None else path.read_text()
    found = []
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.Constant):
            continue
        value = node.value
        if isinstance(value, int) and not isinstance(value, bool) and _is_piv_literal(value):
            # only the hex spelling counts (157 seconds is not key reference 9D)
            text = ast.get_source_segment(src, node) or ""
            if text.lower().startswith("0x"):
                found.append(f"{path.name}:{node.lineno} {text}")
        elif isinstance(value, str | bytes):
            flat = value if isinstance(value, str) else value.hex()
            if _AID.search(flat):
                found.append(f"{path.name}:{node.lineno} PIV AID")
    return found


def import_findings(me: str, source: str) -> list[str]:
    if me.startswith(MAY_IMPORT_CODES):
        return []
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in (
            "tokend.piv.codes",
            "tokend.piv.commands",
        ):
            found.append(f"{me} imports {node.module}")
        elif isinstance(node, ast.Import):
            found += [
                f"{me} imports {a.name}"
                for a in node.names
                if a.name in ("tokend.piv.codes", "tokend.piv.commands")
            ]
    return found


def test_piv_literals_only_in_the_wire_package() -> None:
    found = []
    for path in sources():
        # Wire packages: PIV's own, and the SIM's, whose ISO 7816-8 key template (7F49)
        # PIV happens to share.
        if module_name(path).startswith(("tokend.piv", "tokend.sim.")):
            continue
        found += literal_findings(path)
    assert found == []


def test_only_piv_modules_import_piv_codes() -> None:
    found = []
    for path in sources():
        found += import_findings(module_name(path), path.read_text())
    assert found == []


def test_checker_catches_piv_names(tmp_path: Path) -> None:
    bad = "KEY = 0x9D\nAID = bytes.fromhex('A000000308000010000100')\nTAG = 0x5FC10B\nX = 157\n"
    path = tmp_path / "bad.py"
    assert len(literal_findings(path, bad)) == 3  # the decimal 157 is not a PIV spelling
    src = "from tokend.piv.codes import Ins\n"
    assert import_findings("tokend.provisioning", src) != []
    assert import_findings("tokend.drivers.piv", src) == []
    assert ROOT.is_dir()
