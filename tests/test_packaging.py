"""The wheel carries the one import root of the design brief: drivers/ as tokend.drivers,
simulators/ as tokend.simulators, and both console scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
        "tokend/cli/smime_cmd.py",
        "tokend/smime/envelope.py",
        "tokend/drivers/sim.py",
        "tokend/simulators/sim.py",
        "tokend/simulators/isoapplet.py",
        "tokend/sim/codes.py",
        "tokend/pkcs15.py",
    ):
        assert module in names
    assert not any(n.startswith(("drivers/", "simulators/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = archive.read(entry_points).decode()
    assert "tokend = tokend.cli.tokend_main:main" in text
    assert "tokenctl = tokend.cli.tokenctl:main" in text


def test_one_debian_package_list_with_pyscard_build_packages() -> None:
    """The fresh-machine guard (issue: pyscard has no wheel): the build packages are in the
    one list, marked for pyscard, and neither the Makefile nor .ci/run keeps a second copy."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_build_deps
    finally:
        sys.path.pop(0)
    marked = check_build_deps.build_packages()
    assert {"libpcsclite-dev", "swig", "gcc"} <= set(marked["pyscard"])
    assert set(marked) <= set(check_build_deps.python_dependencies())
    listed = subprocess.run(
        [str(ROOT / "tools/debian-packages.sh")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert {"pcscd", "vsmartcard-vpcd", "libpcsclite-dev", "swig"} <= set(listed)
    for script in ("Makefile", ".ci/run"):
        text = (ROOT / script).read_text()
        assert "vsmartcard-vpcd" not in text and "libpcsclite" not in text, script


def test_failed_venv_step_names_the_missing_packages(tmp_path: Path) -> None:
    """When pip fails on pyscard, the user gets one line naming the step and the packages."""
    fake_python = tmp_path / "python3"
    # A python whose venv's pip fails the way pip does when winscard.h is missing.
    fake_python.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; '
        'cp "$0" "$3/bin/python"; exit 0; fi\n'
        'if [ "$3" = install ] && [ "$5" = -e ]; then '
        'echo "src/smartcard/scard/helpers.c:28:10: fatal error: winscard.h: No such file" >&2;'
        " echo 'ERROR: Failed building wheel for pyscard' >&2; exit 1; fi\n"
        "exit 0\n"
    )
    fake_python.chmod(0o755)
    fake_dpkg = tmp_path / "dpkg-query"  # every package reads as not installed
    fake_dpkg.write_text("#!/bin/sh\nexit 1\n")
    fake_dpkg.chmod(0o755)
    result = subprocess.run(
        [str(ROOT / "tools/venv.sh"), str(tmp_path / "venv")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": str(fake_python)},
        timeout=60,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("tokend setup:")]
    assert len(lines) == 1, result.stderr
    assert "building pyscard needs" in lines[0]
    assert "libpcsclite-dev" in lines[0] and "swig" in lines[0] and "make deps" in lines[0]


@pytest.mark.pcsc
@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_simulate_and_tokenctl(vpcd, tmp_path: Path) -> None:
    """`pip install` of the wheel into a fresh venv, outside the checkout: `tokend simulate
    --piv` runs there and that venv's `tokenctl list` sees the token."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("tokend-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[pcsc]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    sim = subprocess.Popen(
        [str(venv / "bin" / "tokend"), "simulate", "--piv"],
        cwd=outside,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        exports = {}
        for line in sim.stdout:  # type: ignore[union-attr]
            if line.startswith("export "):
                name, _, value = line[7:].strip().partition("=")
                exports[name] = value
            if line.strip() == "READY":
                break
        listed = subprocess.run(
            [str(venv / "bin" / "tokenctl"), "list"],
            cwd=outside,
            env={**env, "TOKEND_SOCKET": exports["TOKEND_SOCKET"]},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert "serial" in listed.stdout and "PIV" in listed.stdout.upper()
    finally:
        sim.stdin.close()  # type: ignore[union-attr]
        sim.wait(30)
