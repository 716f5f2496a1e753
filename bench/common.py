"""Shared bench plumbing: statistics, result rows, the table, daemons in child processes.

Every comparison is measured side by side in one run (interleaved rounds) and reported as a
difference or a ratio: the machine is shared and noisy, so absolute figures from different
runs are not comparable, but two things measured in alternation are.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PIN = "123456"


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 4)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; no interpolation, so p99 of a
    small sample is an observed value, not an invented one."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    """Latency summary of one series, in milliseconds."""

    n: int
    median_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Summary:
        return cls(
            len(seconds),
            ms(statistics.median(seconds)) if seconds else float("nan"),
            ms(percentile(seconds, 99)),
            ms(max(seconds)) if seconds else float("nan"),
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "median_ms": self.median_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


@dataclass
class Row:
    """One line of the printed table (and of ``results.json``'s ``table``)."""

    section: str
    what: str
    value: str
    target: str = ""
    verdict: str = ""  # "ok", "MISSED", "n/a", "skipped", "not available yet"
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "section": self.section,
            "what": self.what,
            "value": self.value,
            "target": self.target,
            "verdict": self.verdict,
            "note": self.note,
        }


@dataclass
class SectionResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def row(
        self, what: str, value: str, target: str = "", verdict: str = "", note: str = ""
    ) -> None:
        self.rows.append(Row(self.name, what, value, target, verdict, note))


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def format_table(rows: Sequence[Row]) -> str:
    headers = ("section", "measurement", "value", "target", "verdict")
    cells = [(r.section, r.what, r.value, r.target, r.verdict) for r in rows]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for c in cells:
        lines.append(" | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    return "\n".join(lines)


def interleave(
    rounds: int, per_round: int, runners: Sequence[Callable[[], None]]
) -> list[list[float]]:
    """Time ``runners`` alternately (Axper_round, Bxper_round, A…) for ``rounds`` rounds.
    Returns one list of per-call durations (seconds) per runner. The order inside a round
    flips each round (AB, BA, …) so neither side always runs right after the other."""
    out: list[list[float]] = [[] for _ in runners]
    clock = time.perf_counter
    for r in range(rounds):
        order = list(range(len(runners)))
        if r % 2:
            order.reverse()
        for i in order:
            fn = runners[i]
            series = out[i]
            for _ in range(per_round):
                t0 = clock()
                fn()
                series.append(clock() - t0)
    return out


def short_tempdir(prefix: str) -> Path:
    """Unix socket paths are limited to 108 bytes: keep them under /tmp."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float) -> float:
    """Wait until something accepts on ``path``; returns the monotonic time it first did."""
    import socket as _socket

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"child exited with {proc.returncode} before listening on {path}")
        if path.exists():
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return time.monotonic()
            except OSError:
                pass
            finally:
                s.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {path} after {timeout} s")
        # No event to wait on for a socket that does not exist yet; the period bounds the
        # start-up figure's resolution only where we do not use the child's own timestamp.
        time.sleep(0.002)


@dataclass
class Child:
    """A child process we started; stopped by its PID only."""

    proc: subprocess.Popen[bytes]
    socket: Path
    workdir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def tokend_daemon(
    *,
    tokens: int = 1,
    launcher: bool = False,
    timeout: float = 60.0,
    simulate: str = "piv",
) -> Iterator[Child]:
    """tokend serving ``tokens`` demo-provisioned virtual PIV cards (``simulate="sim"``: one
    virtual SIM), in a child process.

        ``launcher=False`` runs the product's own ``tokend serve --no-pcsc --simulate piv``
        (one card); ``launcher=True`` runs `bench.launcher`, which builds N in-process readers.
        The demo certificates of card i are written to ``workdir/card<i>``.
    """
    workdir = short_tempdir("tokend-bench-")
    sock = workdir / "tokend.sock"
    if launcher:
        args = [sys.executable, "-m", "bench.launcher", "--socket", str(sock)]
        args += ["--tokens", str(tokens), "--export-dir", str(workdir)]
    else:
        if tokens != 1:
            raise ValueError("tokend serve --simulate makes one card; use launcher=True")
        args = [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc"]
        args += ["--simulate", simulate, "--socket", str(sock)]
        args += ["--export-dir", str(workdir / "card0")]
    # The child's log goes to a file: a pipe nobody reads could fill up and stall it.
    with open(workdir / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    child = Child(proc, sock, workdir)
    try:
        wait_for_socket(sock, proc, timeout)
        wait_tokens(sock, tokens, timeout)
        yield child
    finally:
        child.stop()
        with contextlib.suppress(OSError):
            import shutil

            shutil.rmtree(workdir)


def wait_tokens(sock: Path, count: int, timeout: float = 60.0) -> float:
    """Wait until the daemon on ``sock`` lists ``count`` tokens; returns the monotonic time.

    Arrival events sent before this client connected are not replayed to it, so this asks
    the slot list; the short period only bounds when we notice, not what we measure."""
    from tokend.client import Client

    deadline = time.monotonic() + timeout
    with Client(sock) as client:
        while True:
            if len(client.slot_list(token_present=True)) >= count:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} tokens not present after {timeout} s")
            time.sleep(0.005)
