"""`tokend serve` with a memory tracer beside it, for finding what grows in a soak
(bench/soak.py ``--trace FILE``). Debugging only: the product's entry point is untouched;
this runs the same ``main`` with a sampler thread in the same process.

    python -m bench.soak_trace FILE serve …      # same arguments as `tokend serve`

Every ``SOAK_TRACE_EVERY`` seconds (default 15) it appends one JSON line to FILE: RSS, the
number of gc-tracked objects, the live count of the daemon's own classes that hold token
state (token instances, sessions, applications, drivers), the types whose counts grew most
since the second sample (the first after start-up), and with ``SOAK_TRACEMALLOC=1`` the
Python heap (tracemalloc) and the source lines whose allocations grew most since then. A
last line comes at exit. With ``SOAK_TRACE_TRIM=1`` each sample also calls glibc's
``malloc_trim(0)`` and records the RSS after it (free heap memory glibc had kept: what
remains is live or pinned by live data).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

from bench.common import rss_kib

WATCH = (
    "TokenInstance",
    "Session",
    "Application",
    "Operation",
    "PivToken",
    "SimToken",
    "TokenObject",
    "ThreadPoolExecutor",
    "Thread",
)


def _counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def sampler(out: Path, every: float, use_tracemalloc: bool, trim: bool) -> None:
    started = time.monotonic()
    first_counts: collections.Counter[str] | None = None
    first_snapshot = None
    samples = 0
    lock = threading.Lock()

    def sample() -> None:
        nonlocal first_counts, first_snapshot, samples
        with lock:
            gc.collect()
            counts = _counts()
            line: dict[str, object] = {
                "t": round(time.monotonic() - started, 1),
                "rss_kib": rss_kib(os.getpid()),
                "gc_objects": sum(counts.values()),
                "watch": {name: counts.get(name, 0) for name in WATCH},
                "threads": threading.active_count(),
            }
            if trim:
                # Free heap memory glibc kept: what is left is live (or pinned) data.
                began = time.perf_counter()
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                line["trim_ms"] = round((time.perf_counter() - began) * 1000, 2)
                line["rss_after_trim_kib"] = rss_kib(os.getpid())
            # The reference is the second sample (the first after start-up and warm-up).
            if samples == 1:
                first_counts = counts
            elif first_counts is not None:
                grown = counts.copy()
                grown.subtract(first_counts)
                line["grown_types"] = [[k, n] for k, n in grown.most_common(15) if n > 0]
            if use_tracemalloc:
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)]
                )
                line["traced_kib"] = tracemalloc.get_traced_memory()[0] // 1024
                if samples == 1:
                    first_snapshot = snap
                elif first_snapshot is not None:
                    line["grown_lines"] = [
                        [str(st.traceback[0]), st.size_diff // 1024, st.count_diff]
                        for st in snap.compare_to(first_snapshot, "lineno")[:15]
                    ]
            with out.open("a") as f:
                f.write(json.dumps(line) + "\n")
            samples += 1

    atexit.register(sample)
    while True:
        sample()
        time.sleep(every)


def main() -> int:
    out = Path(sys.argv[1])
    use_tracemalloc = os.environ.get("SOAK_TRACEMALLOC") == "1"
    if use_tracemalloc:
        tracemalloc.start(1)
    every = float(os.environ.get("SOAK_TRACE_EVERY", "15"))
    threading.Thread(
        target=sampler,
        args=(out, every, use_tracemalloc, os.environ.get("SOAK_TRACE_TRIM") == "1"),
        daemon=True,
        name="soak-trace",
    ).start()
    from tokend.cli.tokend_main import main as tokend_main

    return tokend_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
