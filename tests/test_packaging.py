"""The wheel carries the one import root of the design brief: drivers/ as tokend.drivers,
simulators/ as tokend.simulators, and both console scripts."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_maps_drivers_and_simulators_under_tokend(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("tokend-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    for module in (
        "tokend/drivers/piv.py",
        "tokend/drivers/pcsc.py",
        "tokend/simulators/piv.py",
        "tokend/simulators/vpcd.py",
        "tokend/daemon.py",
        "tokend/cli/tokenctl.py",
    ):
        assert module in names
    assert not any(n.startswith(("drivers/", "simulators/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = archive.read(entry_points).decode()
    assert "tokend = tokend.cli.tokend_main:main" in text
    assert "tokenctl = tokend.cli.tokenctl:main" in text
