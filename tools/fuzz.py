"""`make fuzz`: every parser's target (tests/fuzz_targets.py), coverage-guided under atheris
(libFuzzer) when it is installed, else under hypothesis with a long budget.

    python tools/fuzz.py [--inputs N] [--targets a,b] [--out DIR]
    FUZZ_INPUTS=N FUZZ_TARGETS=a,b make fuzz

Each target runs in its own process (libFuzzer exits when done) for N inputs, with a 2 s
per-input timeout (a hang is a finding) and its corpus kept in DIR/corpus/NAME, so a
rerun continues where the last one stopped. A crash leaves DIR/crash-NAME-* (the input);
keep it as a regression test and fix the parser. Results: a table on stdout and
DIR/results.json (inputs run, seconds, crashes per target). Exit status 1 on any finding.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUTS = 1_000_000
PER_INPUT_TIMEOUT = 2  # seconds; design §8: no hang


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# -- one target, in a child process ------------------------------------------------------


def _child_atheris(name: str, inputs: int, out: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["tokend"]):
        # The targets import some parsers lazily; import them here so they are instrumented.
        import tokend.ble_framing
        import tokend.config
        import tokend.drivers.piv
        import tokend.p11kit.codec
        import tokend.pkcs15
        import tokend.simulators.memory
        import tokend.smime.envelope
        import tokend.smime.verifying  # noqa: F401
        from tests.fuzz_targets import SEEDS, TARGETS
    corpus = out / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(SEEDS[name]):
        (corpus / f"seed-{i}").write_bytes(seed)
    target = TARGETS[name]
    args = [
        sys.argv[0],
        f"-runs={inputs}",
        f"-timeout={PER_INPUT_TIMEOUT}",
        "-max_len=4096",
        "-rss_limit_mb=1024",
        "-print_final_stats=1",
        f"-artifact_prefix={out}/crash-{name}-",
        str(corpus),
    ]
    atheris.Setup(args, target)
    atheris.Fuzz()


def _child_hypothesis(name: str, inputs: int, out: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.database import DirectoryBasedExampleDatabase

    from tests.fuzz_targets import TARGETS

    count = 0

    @settings(
        max_examples=inputs,
        deadline=PER_INPUT_TIMEOUT * 1000,
        database=DirectoryBasedExampleDatabase(str(out / "hypothesis" / name)),
        suppress_health_check=list(HealthCheck),
    )
    @given(st.binary(max_size=4096))
    def run(data: bytes) -> None:
        nonlocal count
        count += 1
        TARGETS[name](data)

    try:
        run()
    except Exception as exc:
        (out / f"crash-{name}-hypothesis.txt").write_text(repr(exc))
        print(f"stat::number_of_executed_units: {count}")
        raise
    print(f"stat::number_of_executed_units: {count}")


# -- the driver --------------------------------------------------------------------------


def _run_one(name: str, inputs: int, out: Path, engine: str) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKEND_FUZZ_CHILD="1")
    cmd = [sys.executable, __file__, "--child", name, "--inputs", str(inputs), "--out", str(out)]
    cmd += ["--engine", engine]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", proc.stdout + proc.stderr)
    done = re.findall(r"Done (\d+) runs", proc.stdout + proc.stderr)
    executed = int(runs[-1]) if runs else int(done[-1]) if done else 0
    crashes = sorted(p.name for p in out.glob(f"crash-{name}-*"))
    timeouts = sorted(p.name for p in out.glob(f"timeout-{name}-*"))
    return {
        "target": name,
        "engine": engine,
        "inputs": executed,
        "seconds": round(seconds, 1),
        "exit": proc.returncode,
        "crashes": crashes,
        "timeouts": timeouts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--inputs",
        type=int,
        default=int(os.environ.get("FUZZ_INPUTS", DEFAULT_INPUTS)),
        help="inputs per target (env FUZZ_INPUTS; default 1000000)",
    )
    parser.add_argument(
        "--targets",
        default=os.environ.get("FUZZ_TARGETS", ""),
        help="comma-separated target names (env FUZZ_TARGETS; default all)",
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("FUZZ_DIR", ".fuzz")))
    parser.add_argument(
        "--engine",
        choices=("auto", "atheris", "hypothesis"),
        default=os.environ.get("FUZZ_ENGINE", "auto"),
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _have_atheris() else "hypothesis"

    if args.child:
        import logging

        logging.disable(logging.CRITICAL)  # drivers log every bad answer; noise here
        (_child_atheris if engine == "atheris" else _child_hypothesis)(
            args.child, args.inputs, args.out
        )
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.fuzz_targets import TARGETS

    names = [n for n in args.targets.split(",") if n] or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    print(f"fuzzing {len(names)} parsers, {args.inputs} inputs each, engine {engine}", flush=True)
    results = []
    for name in names:
        res = _run_one(name, args.inputs, args.out, engine)
        results.append(res)
        verdict = (
            "ok" if not res["crashes"] and not res["timeouts"] and res["exit"] == 0 else "FINDING"
        )
        print(
            f"  {name:<14} {res['inputs']:>10} inputs {res['seconds']:>8.1f} s  {verdict}"
            + (f"  {res['crashes'] + res['timeouts']}" if verdict != "ok" else ""),
            flush=True,
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    short = [r["target"] for r in results if int(r["inputs"]) < args.inputs]
    bad = [r["target"] for r in results if r["crashes"] or r["timeouts"] or r["exit"] != 0]
    if short:
        print(f"ran fewer inputs than asked: {', '.join(short)} (see {args.out}/NAME.log)")
    print(f"results: {args.out / 'results.json'}")
    return 1 if bad or short else 0


if __name__ == "__main__":
    sys.exit(main())
