#!/usr/bin/env python3
"""Break the code on purpose and see whether the suite notices (issue 16).

Two modes, both working on a scratch copy of the checkout (the checkout itself is never
modified; the copy imports its own `tokend`, `tokend.drivers`, `tokend.simulators`):

``break-it``  the hand-written breaks in `tools/breaks.py`, one per promise: each is applied
              alone and the tests named for it must fail. Prints the table that
              docs/testing.md carries ("what each promise's tests are").
``score``     mechanical mutants of the session engine, the registry and the unpadding
              code (a statement removed, a condition negated, a comparison or boolean
              operator flipped, a constant changed); each runs against the in-process suite
              (``-x``, so a killed mutant is quick). Prints killed/total and the survivors.

    .venv/bin/python tools/mutate.py break-it [ID ...]
    .venv/bin/python tools/mutate.py score [--limit N] [--seed S] [--json out.json]

A mutant that makes the tests time out (a hang) counts as killed: the suite noticed.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from breaks import BREAKS, Break  # noqa: E402

#: The in-process suite the score runs against (no pcscd: fast, and no shared resources).
SCORE_TESTS = [
    "-m",
    "not pcsc",
    "tests/test_promises_disconnect.py",
    "tests/test_promises_login.py",
    "tests/test_promises_secrets.py",
    "tests/test_promises_unpadding.py",
    "tests/test_disconnect_memory.py",
    "tests/test_e2e_memory.py",
    "tests/test_review_disconnect_promise.py",
    "tests/test_registry.py",
    "tests/test_daemon_socket.py",
    "tests/test_driver_piv.py",
    "tests/test_mechanisms.py",
    "tests/test_no_secrets_in_logs.py",
    "tests/test_async_client.py",
]

#: What the score mutates: (file, qualified function names).
SCORE_TARGETS: dict[str, tuple[str, ...]] = {
    "tokend/session.py": (
        "Operation.forget_context_pin",
        "Operation.wipe",
        "SessionObject.wipe",
        "Engine.close_application",
        "Engine._on_retire",
        "Engine._lost_card_login",
        "Engine._forget_context_pins",
        "Engine._card",
        "Engine._session",
        "Engine._drop_session",
        "Engine.close_session",
        "Engine.close_all_sessions",
        "Engine.session_info",
        "Engine.login",
        "Engine.logout",
        "Engine._release_login",
        "Engine._visible",
        "Engine._token_object",
        "Engine._private_key",
        "Engine.decrypt",
        "Engine._finish_sign",
        "Engine._take",
        "Engine._require_login",
        "Engine.derive_key",
    ),
    "tokend/registry.py": (
        "TokenInstance.ensure_live",
        "TokenInstance.run",
        "SlotRegistry.handle_event",
        "SlotRegistry._probe",
        "SlotRegistry.retire",
        "Slot.token_present",
    ),
    "tokend/mechanisms/rsa_padding.py": (
        "_ct_eq",
        "_ct_ge",
        "pkcs1v15_unpad",
        "mgf1",
        "oaep_unpad",
    ),
    "tokend/wipe.py": ("wipe",),
}


@dataclass(frozen=True)
class Mutant:
    ident: str
    path: str
    line: int
    old: str
    new: str

    def describe(self) -> str:
        return f"{self.path}:{self.line}: {self.old.strip()}  ->  {self.new.strip()}"


# --- the scratch copy -------------------------------------------------------------------------


def make_copy() -> Path:
    """A copy of the checkout's files (tracked and new) whose packages import from the copy."""
    dest = Path(tempfile.mkdtemp(prefix="tokend-mutate-"))
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # The installed package maps tokend.drivers/.simulators to the checkout (editable
    # finder, consulted after sys.path): these links make the copy's own modules win.
    (dest / "tokend" / "drivers").symlink_to(dest / "drivers")
    (dest / "tokend" / "simulators").symlink_to(dest / "simulators")
    return dest


@functools.cache
def _private_pcscd_possible() -> bool:
    try:
        from tokend.simulators.pcscd import private_pcscd_unavailable_reason
    except ImportError:  # no pyscard
        return False
    return private_pcscd_unavailable_reason() is None


def run_tests(
    copy: Path, tests: list[str], timeout: float, *, exitfirst: bool = True
) -> tuple[str, float]:
    """'failed', 'passed' or 'timeout' (with '(n of m)' failed when not ``exitfirst``), and
    the seconds it took."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    env.pop("CI", None)  # a skip is not what we measure here
    if _private_pcscd_possible():
        # A pcscd of the run's own: the machine's is shared with other test runs, which
        # stop and start it (the break-it runs name no test that needs the machine's).
        env["TOKEND_TEST_PRIVATE_PCSCD"] = "1"
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                *(["-x"] if exitfirst else []),
                "-q",
                "-p",
                "no:cacheprovider",
                *tests,
            ],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started
    if proc.returncode == 0:
        return "passed", time.monotonic() - started
    if os.environ.get("MUTATE_VERBOSE"):
        print(proc.stdout[-3000:], proc.stderr[-2000:], file=sys.stderr)
    if proc.returncode == 1:
        if exitfirst:
            return "failed", time.monotonic() - started
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        failed = re.search(r"(\d+) failed", summary)
        passed = re.search(r"(\d+) passed", summary)
        n_failed = int(failed.group(1)) if failed else 0
        n_all = n_failed + (int(passed.group(1)) if passed else 0)
        return f"failed ({n_failed} of {n_all})", time.monotonic() - started
    # 2..5: interrupted, internal error, usage, no tests: the run itself is broken
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
    raise RuntimeError(f"pytest exited {proc.returncode}:\n{tail}")


def apply(copy: Path, path: str, old: str, new: str) -> str:
    target = copy / path
    original = target.read_text()
    if original.count(old) != 1:
        raise ValueError(f"{path}: the text to break occurs {original.count(old)} times")
    target.write_text(original.replace(old, new))
    return original


# --- break-it -----------------------------------------------------------------------------------


def break_it(idents: list[str]) -> int:
    chosen = [b for b in BREAKS if not idents or b.ident in idents]
    copy = make_copy()
    rows: list[tuple[Break, str, float]] = []
    try:
        baseline = sorted({t for b in chosen for t in b.tests})
        outcome, _ = run_tests(copy, baseline, timeout=900)
        if outcome != "passed":
            print(f"the unbroken build does not pass these tests ({outcome})", file=sys.stderr)
            return 2
        for brk in chosen:
            original = apply(copy, brk.path, brk.old, brk.new)
            try:
                outcome, took = run_tests(copy, list(brk.tests), timeout=300, exitfirst=False)
            finally:
                (copy / brk.path).write_text(original)
            rows.append((brk, outcome, took))
            mark = "caught" if outcome != "passed" else "NOT CAUGHT"
            print(f"{brk.ident}: {mark} ({outcome}, {took:.0f} s) - {brk.promise}", flush=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    print()
    print("| # | promise | break (temporary patch) | test that fails | result |")
    print("|---|---|---|---|---|")
    for brk, outcome, _ in rows:
        tests = ", ".join(f"`{t.split('::')[-1]}`" for t in brk.tests)
        result = {"timeout": "hangs", "passed": "PASSES"}.get(
            outcome, outcome.replace("failed", "fails")
        )
        print(f"| {brk.ident} | {brk.promise} | {brk.how} | {tests} | {result} |")
    return 0 if all(outcome != "passed" for _, outcome, _ in rows) else 1


# --- score ---------------------------------------------------------------------------------------

_SWAPS = [
    (r" == ", " != "),
    (r" != ", " == "),
    (r" < ", " <= "),
    (r" <= ", " < "),
    (r" > ", " >= "),
    (r" >= ", " > "),
    (r" and ", " or "),
    (r" or ", " and "),
    (r" is not ", " is "),
    (r" not in ", " in "),
    (r" & ", " | "),
    (r" \| ", " & "),
    (r"\bTrue\b", "False"),
    (r"\bFalse\b", "True"),
    (r"\+= 1\b", "+= 0"),
    (r"\b1 \^ ", "0 ^ "),
]
_SIMPLE_STATEMENT = re.compile(
    r"^\s*(?!return\b|raise\b|yield\b|pass\b|def\b|class\b|if\b|elif\b|else\b|for\b|while\b|"
    r"try\b|except\b|finally\b|with\b|async\b|@|#|\)|\]|\})\S"
)


def _function_lines(source: str, names: tuple[str, ...]) -> list[tuple[int, int]]:
    tree = ast.parse(source)
    spans: list[tuple[int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif (
                isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                and f"{prefix}{child.name}" in names
            ):
                first = child.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    first_line = (first.end_lineno or first.lineno) + 1  # skip the docstring
                else:
                    first_line = first.lineno
                spans.append((first_line, child.end_lineno or first_line))

    visit(tree, "")
    return spans


def generate(root: Path) -> list[Mutant]:
    mutants: list[Mutant] = []
    for path, names in SCORE_TARGETS.items():
        source = (root / path).read_text()
        lines = source.splitlines(keepends=True)
        for first, last in _function_lines(source, names):
            for lineno in range(first, last + 1):
                line = lines[lineno - 1]
                code = line.split("#", 1)[0]
                if not code.strip() or code.strip().startswith(('"', "'")):
                    continue
                candidates: list[str] = []
                for pattern, repl in _SWAPS:
                    for match in re.finditer(pattern, code):
                        candidates.append(line[: match.start()] + repl + line[match.end() :])
                stripped = code.strip()
                if stripped.startswith(("if ", "elif ")) and stripped.endswith(":"):
                    keyword, cond = stripped.split(" ", 1)
                    indent = line[: len(line) - len(line.lstrip())]
                    candidates.append(f"{indent}{keyword} not ({cond[:-1]}):\n")
                # A one-line statement removed (inside a multi-line one it would not parse).
                if (
                    _SIMPLE_STATEMENT.match(code)
                    and code.count("(") == code.count(")")
                    and code.count("[") == code.count("]")
                ):
                    indent = line[: len(line) - len(line.lstrip())]
                    candidates.append(f"{indent}pass  # mutant: removed\n")
                for new in candidates:
                    mutated = "".join(lines[: lineno - 1]) + new + "".join(lines[lineno:])
                    try:
                        ast.parse(mutated)
                    except SyntaxError:
                        continue
                    ident = f"{Path(path).stem}:{lineno}:{len(mutants)}"
                    mutants.append(Mutant(ident, path, lineno, line, new))
    return mutants


def score(limit: int, seed: int, out: Path | None) -> int:
    copy = make_copy()
    try:
        outcome, baseline = run_tests(copy, SCORE_TESTS, timeout=1200)
        if outcome != "passed":
            print(f"the unbroken build does not pass the score suite ({outcome})")
            return 2
        mutants = generate(copy)
        total_generated = len(mutants)
        if limit and len(mutants) > limit:
            mutants = random.Random(seed).sample(mutants, limit)
            mutants.sort(key=lambda m: (m.path, m.line))
        print(
            f"{len(mutants)} mutants (of {total_generated}), suite {baseline:.0f} s unbroken",
            flush=True,
        )
        results = []
        for mutant in mutants:
            target = copy / mutant.path
            original = target.read_text()
            lines = original.splitlines(keepends=True)
            lines[mutant.line - 1] = mutant.new
            target.write_text("".join(lines))
            try:
                outcome, _ = run_tests(copy, SCORE_TESTS, timeout=max(120.0, 3 * baseline))
            finally:
                target.write_text(original)
            killed = outcome != "passed"
            results.append({"mutant": mutant.describe(), "outcome": outcome, "killed": killed})
            print(f"{'killed ' if killed else 'SURVIVED'} {mutant.describe()}", flush=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    killed = sum(r["killed"] for r in results)
    by_file: dict[str, list[int]] = {}
    for r in results:
        stats = by_file.setdefault(str(r["mutant"]).split(":", 1)[0], [0, 0])
        stats[0] += int(bool(r["killed"]))
        stats[1] += 1
    print(f"\nscore: {killed}/{len(results)} killed ({100 * killed / max(1, len(results)):.0f} %)")
    for path, (k, n) in sorted(by_file.items()):
        print(f"  {path}: {k}/{n}")
    if out is not None:
        summary = {"killed": killed, "total": len(results), "by_file": by_file, "seed": seed}
        out.write_text(json.dumps({"summary": summary, "mutants": results}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("break-it", help="apply each hand-written break; its tests must fail")
    p.add_argument("ids", nargs="*", help="only these breaks (default: all)")
    p = sub.add_parser("score", help="mechanical mutants against the in-process suite")
    p.add_argument("--limit", type=int, default=0, help="sample this many mutants (0: all)")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--without",
        nargs="*",
        default=[],
        help="leave these test modules out of the score suite (to compare suites)",
    )
    args = parser.parse_args(argv)
    for module in getattr(args, "without", []):
        SCORE_TESTS.remove(module)
    if args.mode == "break-it":
        return break_it(args.ids)
    return score(args.limit, args.seed, args.json)


if __name__ == "__main__":
    sys.exit(main())
