"""The short bounded versions of `make fuzz` and `make soak` (docs/reliability.md): the same
code as the long runs, with small budgets, so a change that breaks a harness — or that a
harness catches — fails `make test`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz_targets import TARGETS

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_fuzz_short_run_covers_every_parser(tmp_path: Path) -> None:
    out = tmp_path / "fuzz"
    proc = subprocess.run(
        [sys.executable, "tools/fuzz.py", "--inputs", "200", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert {r["target"] for r in results} == set(TARGETS)
    for r in results:
        assert r["inputs"] >= 200 and not r["crashes"] and not r["timeouts"], r


@pytest.mark.slow
def test_make_soak_short_run_has_no_wrong_result_and_no_leak() -> None:
    from bench.soak import run
    from tokend.simulators.pcscd import pcscd_unavailable_reason

    transports = ("memory", "usb") + (("pcsc",) if pcscd_unavailable_reason() is None else ())
    # 4 of the 16 clients are PKCS#11 programs through Debian's p11-kit-client.so
    result = run(seconds=6, clients=16, transports=transports, p11kit_clients=4)
    assert result["unplugs"] >= 2
    assert result["clients_by_kind"] == {"native": 12, "p11kit": 4}
    assert result["ops"]["p11kit"].get("decrypt", 0) > 0, result["ops"]
    assert all(result["verdicts"].values()), {
        k: result[k]
        for k in ("verdicts", "unexpected_errors", "wrong_results", "rss_kib", "fds", "ops")
    }
