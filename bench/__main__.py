"""``python -m bench`` (``make bench``): run every section, print one table, write
``bench/results.json``. ``--quick`` is a fast smoke run (small loops, no vpcd idle wait);
``--only NAME`` runs some sections. See docs/performance.md for how to read the table."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import REPO, Row, SectionResult, format_table

SECTIONS = (
    "overhead",
    "softhsm",
    "modules",
    "concurrency",
    "lock",
    "footprint",
    "scale",
    "ble",
    "sim",
)
DEFAULT_OUT = REPO / "bench" / "results.json"


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def _runner(
    name: str, quick: bool, shared: dict[str, SectionResult]
) -> Callable[[], SectionResult]:
    def run() -> SectionResult:
        if name == "overhead":
            from bench import overhead

            return overhead.run(quick)
        if name == "softhsm":
            from bench import softhsm

            first = shared.get("overhead")
            ours = (
                {op: first.data[op]["overhead_ms_median"] for op in ("decrypt", "sign")}
                if first is not None and "decrypt" in first.data
                else None
            )
            return softhsm.run(quick, ours)
        if name == "modules":
            from bench import modules

            return modules.run(quick)
        if name == "concurrency":
            from bench import concurrency

            return concurrency.run(quick)
        if name == "lock":
            from bench import lock

            return lock.run(quick)
        if name == "footprint":
            from bench import footprint

            return footprint.run(quick)
        if name == "ble":
            from bench import ble

            return ble.run(quick)
        if name == "scale":
            from bench import scale

            return scale.run(quick)
        if name == "sim":
            from bench import sim

            return sim.run(quick)
        raise ValueError(name)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small loops: a smoke run")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run this section (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write JSON")
    args = parser.parse_args(argv)
    chosen = [s for s in SECTIONS if not args.only or s in args.only]
    if "softhsm" in chosen and "overhead" not in chosen:
        print("note: softhsm compares with the overhead section; run both for the ratio")

    started = time.perf_counter()
    results: dict[str, SectionResult] = {}
    for name in chosen:
        t0 = time.perf_counter()
        print(f"== {name} …", flush=True)
        try:
            res = _runner(name, args.quick, results)()
        except Exception as exc:  # one broken section must not hide the others
            traceback.print_exc()
            res = SectionResult(name)
            res.row(name, f"error: {type(exc).__name__}: {exc}", "", "error")
            res.data["error"] = f"{type(exc).__name__}: {exc}"
        res.data["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        print(format_table(res.rows), flush=True)

    rows: list[Row] = [r for res in results.values() for r in res.rows]
    total = time.perf_counter() - started
    print(f"\n== tokend bench ({'quick' if args.quick else 'full'}, {total:.0f} s)\n")
    print(format_table(rows))
    report = {
        "meta": {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "seconds": round(total, 1),
            "git": _git_rev(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "table": [r.as_dict() for r in rows],
        "sections": {name: res.data for name, res in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    print(f"\nwritten: {args.out}")
    return 1 if any(r.verdict == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
