"""The bench keeps working: its quick mode's cheapest section runs end to end (a daemon in a
child process, the in-process driver, the native socket) and writes a readable report.
No timing is asserted: the figures belong to docs/performance.md, not to the test suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main


def test_quick_overhead_section_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    assert main(["--quick", "--only", "overhead", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["quick"] is True
    section = report["sections"]["overhead"]
    for op in ("decrypt", "sign_once", "sign"):
        # Every path ran and produced latencies.
        assert section[op]["a_in_process"]["n"] > 0
        assert section[op]["b_native_socket"]["n"] > 0
    for op in ("decrypt", "sign_once"):
        # (c) through p11-kit-client.so and the p11-kit front end.
        assert section[op]["c_p11kit_client"]["c_p11kit_client"]["n"] > 0
    # python-pkcs11 cannot log in context-specific, which 9C needs.
    assert section["sign"]["c_p11kit_client"].startswith("n/a")
    verdicts = {row["verdict"] for row in report["table"]}
    assert "error" not in verdicts


def test_quick_ble_section_runs(tmp_path: Path, bluetoothctl_shim) -> None:  # type: ignore[no-untyped-def]
    from tests.ble_fixtures import ble_unavailable_reason

    if ble_unavailable_reason():
        import pytest

        pytest.skip(ble_unavailable_reason() or "")
    out = tmp_path / "results.json"
    assert main(["--quick", "--only", "ble", "--out", str(out)]) == 0
    section = json.loads(out.read_text())["sections"]["ble"]
    assert section["decrypt_ble"]["n"] > 0 and section["decrypt_memory"]["n"] > 0
    assert section["framing_us_4096"] > 0


@pytest.mark.slow
def test_quick_modules_section_has_every_row(tmp_path: Path) -> None:
    """Section 8 runs the SoftHSM2 token behind (i) nothing, (ii) p11-kit server, (iii)
    tokend, (iv) p11-kit-client.so to tokend's p11-kit front end; no timing is asserted."""
    from bench.modules import unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(str(unavailable_reason()))
    out = tmp_path / "results.json"
    assert main(["--quick", "--only", "modules", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["sections"]["modules"]["table"]
    for op in ("decrypt", "sign"):
        for clients in (1, 8):
            for mode in ("i", "ii", "iii", "iv"):
                assert table[f"{op}/{clients}/{mode}"]["n"] > 0
        assert table[f"{op}/8/iii-1w"]["n"] > 0
