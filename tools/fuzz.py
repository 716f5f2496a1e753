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
PROGRESS_EVERY = 30.0  # seconds between progress lines on a long run


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# -- one target, in a child process ------------------------------------------------------


def _child_atheris(name: str, inputs: int, out: Path) -> None:
    import atheris

    # The simulators stand in for hardware; their coverage is not what we look for, and
    # instrumenting the virtual card made the piv_driver target several times slower.
    with atheris.instrument_imports(include=["tokend"], exclude=["tokend.simulators"]):
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


def _print_progress(name: str, log_path: Path, elapsed: float) -> None:
    """One line: the latest input count libFuzzer reported, and how fast it goes."""
    counts = re.findall(r"^#(\d+)\s.*?exec/s: (\d+)", log_path.read_text(errors="replace"), re.M)
    if counts:
        done, rate = counts[-1]
        print(f"  {name:<14} {int(done):>10} inputs after {elapsed:>6.0f} s ({rate}/s)", flush=True)
    else:
        print(f"  {name:<14} running for {elapsed:.0f} s", flush=True)


def _run_child(cmd: list[str], env: dict[str, str], name: str, log_path: Path) -> tuple[int, int]:
    """One child run; (inputs it executed, exit status). The child writes straight to its
    log, so a long run shows its progress (libFuzzer's "#N ... exec/s" lines) while it
    runs, and nothing is lost if it is killed."""
    start = time.monotonic()
    with open(log_path, "a") as log:
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        while True:
            try:
                child.wait(timeout=PROGRESS_EVERY)
                break
            except subprocess.TimeoutExpired:
                _print_progress(name, log_path, time.monotonic() - start)
    text = log_path.read_text(errors="replace")
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
    done = re.findall(r"Done (\d+) runs", text)
    return (int(runs[-1]) if runs else int(done[-1]) if done else 0), child.returncode


def _timeout_reproduces(name: str, artifact: Path, env: dict[str, str]) -> bool:
    """Replay an input that libFuzzer timed out on, three times in a fresh process: a hang
    of the parser shows again; a stall of a loaded machine does not."""
    cmd = [sys.executable, __file__, "--replay", name, str(artifact)]
    for _ in range(3):
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=PER_INPUT_TIMEOUT * 5
            )
        except subprocess.TimeoutExpired:
            return True
        took = re.findall(r"replay took ([0-9.]+) s", proc.stdout)
        if proc.returncode != 0 or not took or float(took[-1]) >= PER_INPUT_TIMEOUT:
            return True
    return False


def _run_one(name: str, inputs: int, out: Path, engine: str) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKEND_FUZZ_CHILD="1")
    log_path = out / f"{name}.log"
    log_path.write_text("")
    start = time.monotonic()
    executed, status = 0, 0
    stalls: list[str] = []
    while executed < inputs:
        before = set(out.glob(f"crash-{name}-timeout-*"))
        cmd = [sys.executable, __file__, "--child", name, "--inputs", str(inputs - executed)]
        cmd += ["--out", str(out), "--engine", engine]
        ran, status = _run_child(cmd, env, name, log_path)
        executed += ran
        new_timeouts = sorted(set(out.glob(f"crash-{name}-timeout-*")) - before)
        if status == 0 or not new_timeouts or ran == 0:
            break
        # A timeout that does not reproduce was the machine, not the parser: keep the
        # input aside (named so), and go on with the inputs still to run.
        artifact = new_timeouts[-1]
        if _timeout_reproduces(name, artifact, env):
            break
        stall = artifact.with_name(artifact.name.replace("crash-", "stall-", 1))
        artifact.rename(stall)
        stalls.append(stall.name)
        print(f"  {name:<14} timeout at input {executed} did not reproduce (a stall of the "
              "machine); going on", flush=True)  # fmt: skip
    seconds = time.monotonic() - start
    found = sorted(p.name for p in out.glob(f"crash-{name}-*"))
    return {
        "target": name,
        "engine": engine,
        "inputs": executed,
        "seconds": round(seconds, 1),
        "exit": status,
        "crashes": [f for f in found if not f.startswith(f"crash-{name}-timeout-")],
        "timeouts": [f for f in found if f.startswith(f"crash-{name}-timeout-")],
        "stalls_not_reproduced": stalls,
    }


def _replay(name: str, path: Path) -> None:
    from tests.fuzz_targets import SEEDS, TARGETS

    for seed in SEEDS[name]:  # one-time set-up (a provisioned virtual card) is not the input's
        TARGETS[name](seed)
    data = path.read_bytes()
    start = time.perf_counter()
    TARGETS[name](data)
    print(f"replay took {time.perf_counter() - start:.3f} s")


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
    parser.add_argument("--replay", nargs=2, metavar=("TARGET", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _have_atheris() else "hypothesis"

    if args.replay:
        import logging

        logging.disable(logging.CRITICAL)
        sys.path.insert(0, str(ROOT))
        _replay(args.replay[0], Path(args.replay[1]))
        return 0
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
