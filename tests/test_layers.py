"""Imports point down the layers of the design brief (§3). An `ast` walk over every module:
a module may import its own layer or any layer below it, never above."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (module prefix, rank). Lower rank = lower layer. Longest prefix wins.
LAYERS: list[tuple[str, int]] = [
    ("tokend", 0),  # the package root holds only __version__
    ("tokend.pkcs11", 0),
    ("tokend.errors", 0),
    ("tokend.iso7816", 0),
    ("tokend.model", 0),
    ("tokend.protocol", 0),
    ("tokend.paths", 0),
    ("tokend.piv", 0),
    ("tokend.consent", 0),
    ("tokend.ccid", 0),
    ("tokend.mechanisms", 0),
    ("tokend.wipe", 0),
    ("tokend.socket_security", 0),
    ("tokend.limits", 0),
    ("tokend.ble_framing", 0),
    ("tokend.sim", 0),
    ("tokend.pkcs15", 0),
    ("tokend.config_values", 0),
    ("tokend.drivers", 1),
    ("tokend.simulators", 1),
    ("tokend.registry", 2),
    ("tokend.wiring", 2),
    ("tokend.session", 3),
    ("tokend.provisioning", 3),
    ("tokend.api_provision", 4),
    ("tokend.api", 4),
    ("tokend.listener", 4),
    ("tokend.daemon", 4),
    ("tokend.pinentry", 4),
    ("tokend.config", 4),
    ("tokend.systemd", 0),
    ("tokend.sim_control", 4),
    ("tokend.client", 5),
    ("tokend.smime", 6),
    ("tokend.p11kit", 0),  # the package and its pure codec
    ("tokend.p11kit.server", 4),
    ("tokend.cli", 7),
    ("tokend.testing", 7),
]
#: Third-party libraries that only one layer may touch (design §3).
ONLY_IN = {
    "smartcard": ("tokend.drivers.pcsc", "tokend.simulators"),
    "usb": ("tokend.drivers.usb_ccid", "tokend.simulators.usb_ccid"),
    "pyudev": ("tokend.drivers.usb_ccid",),
    "bleak": ("tokend.drivers.ble",),
    "dbus_fast": ("tokend.drivers.ble", "tokend.simulators.bluez"),
    # python-pkcs11: the vendor-module backend, and the SoftHSM2 harness that provisions
    # test tokens through the module as a vendor's tool would
    "pkcs11": ("tokend.drivers.pkcs11_module", "tokend.simulators.softhsm"),
}
#: Simulators implement the seams; they may not reach the driver modules themselves.
SIMULATOR_MAY_IMPORT = (
    "tokend.iso7816",
    "tokend.pkcs11",
    "tokend.errors",
    "tokend.model",
    "tokend.drivers.base",
    "tokend.simulators",
    "tokend.paths",
    "tokend.piv",
    "tokend.ccid",
    "tokend.mechanisms",
    "tokend.wipe",
    "tokend.ble_framing",
    "tokend.sim",
    "tokend.pkcs15",
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("drivers", "simulators"):
        parts = ["tokend", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def rank(module: str) -> int | None:
    best: tuple[int, int] | None = None
    for prefix, r in LAYERS:
        # The package root matches only itself, so a new module must be given a layer.
        matches = module == prefix or (prefix != "tokend" and module.startswith(prefix + "."))
        if matches and (best is None or len(prefix) > best[0]):
            best = (len(prefix), r)
    return None if best is None else best[1]


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def sources() -> list[Path]:
    out = []
    for folder in ("tokend", "drivers", "simulators"):
        out += sorted((ROOT / folder).rglob("*.py"))
    return out


def test_every_module_has_a_layer() -> None:
    missing = [module_name(p) for p in sources() if rank(module_name(p)) is None]
    assert missing == []


def violations(me: str, targets: list[str]) -> list[str]:
    """What is wrong with module ``me`` importing ``targets``."""
    found = []
    my_rank = rank(me)
    for target in targets:
        if target.split(".")[0] in ("drivers", "simulators"):
            found.append(f"{me} imports {target} (use tokend.{target})")
            continue
        if not target.startswith("tokend"):
            allowed = ONLY_IN.get(target.split(".")[0])
            if allowed and not me.startswith(allowed):
                found.append(f"{me} imports {target}")
            continue
        if target == "tokend":
            continue
        their_rank = rank(target)
        if me.startswith("tokend.simulators") and not target.startswith(SIMULATOR_MAY_IMPORT):
            found.append(f"simulator {me} imports {target}")
        if their_rank is not None and my_rank is not None and their_rank > my_rank:
            found.append(f"{me} (layer {my_rank}) imports {target} (layer {their_rank})")
    return found


def test_imports_point_down() -> None:
    found = [v for path in sources() for v in violations(module_name(path), imports(path))]
    assert found == []


def test_checker_catches_bad_imports(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from tokend.daemon import Daemon\nimport smartcard\nimport drivers.piv\n")
    assert len(violations("tokend.session", imports(bad))) == 3
    assert violations("tokend.simulators.piv", ["tokend.drivers.piv"]) != []
    assert violations("tokend.drivers.pcsc", ["smartcard.scard", "tokend.iso7816"]) == []
    # the shared parts stay below the drivers; wiring stays below the session layer
    assert violations("tokend.mechanisms.keypair", ["tokend.drivers.applet"]) != []
    assert violations("tokend.piv.codes", ["tokend.registry"]) != []
    assert violations("tokend.wiring", ["tokend.session"]) != []
    assert violations("tokend.simulators.iso7816_card", ["tokend.drivers.applet"]) != []
    assert violations("tokend.drivers.piv", ["tokend.piv.codes", "tokend.mechanisms"]) == []
    assert violations("tokend.session", ["bleak", "dbus_fast.aio"]) != []
    assert violations("tokend.simulators.ble", ["bleak"]) != []
