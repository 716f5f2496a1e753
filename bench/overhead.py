"""Item 1: overhead per operation. RSA-2048 decrypt and P-256 sign on a demo PIV card,
(a) in-process through the driver, (b) through tokend's native socket (the daemon in its
own process: ``tokend serve --no-pcsc --simulate piv``), (c) through Debian's p11-kit-client.so
(python-pkcs11) and tokend's p11-kit front end on the same daemon. (a) and (b) alternate in
rounds, so the noise of a shared machine hits both; the overhead is the difference of the
medians. (c) runs in a child process (`bench.p11kit_client`) that alternates its own (a)
with (c) the same way.

Two floors measured in the same run explain the overhead: one socket round trip that never
touches the card (C_GetSessionInfo), and one hop of a no-op onto a worker thread and back
(``loop.run_in_executor``), which every card call in the daemon makes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import (
    REPO,
    SectionResult,
    Summary,
    child_env,
    interleave,
    tokend_daemon,
    verdict,
)
from bench.ops import in_process_card, pipelined_decrypt, rpc_floor, socket_session

#: (b) - (a), median, per operation.
TARGET_OVERHEAD_MS = 0.15
#: Socket round trips per operation, and card calls (each one thread hop in the daemon).
# The client pipelines Init + operation (+ context login) in one round trip.
ROUND_TRIPS = {"decrypt": 1, "sign_once": 1, "sign": 1}
CARD_CALLS = {"decrypt": 1, "sign_once": 1, "sign": 2}
#: Through python-pkcs11 + p11-kit-client.so: Init, a size query (answered without the
#: card), the operation.
P11KIT_ROUND_TRIPS = 3
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
LABELS = {
    "decrypt": "RSA-2048 decrypt",
    "sign_once": "P-256 sign (9A, PIN-once)",
    "sign": "P-256 sign (9C, PIN-always)",
}


def executor_hop(n: int) -> list[float]:
    """Durations of ``await loop.run_in_executor(one_worker, noop)`` on a fresh loop."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        out = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            await loop.run_in_executor(pool, lambda: None)
            for _ in range(n):
                t0 = time.perf_counter()
                await loop.run_in_executor(pool, lambda: None)
                out.append(time.perf_counter() - t0)
        return out

    return asyncio.run(main())


def p11kit_series(daemon, rounds: int, per_round: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """(a), (b) and (c) from `bench.p11kit_client`, or {"unavailable": reason}."""
    from pathlib import Path

    if not Path(P11KIT_CLIENT).exists():
        return {"unavailable": "p11-kit-client.so missing (Debian package p11-kit-modules)"}
    address = f"unix:path={daemon.socket.parent / 'pkcs11.sock'}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.p11kit_client",
            "--socket",
            str(daemon.socket),
            "--address",
            address,
            "--cert-dir",
            str(daemon.workdir / "card0"),
            "--rounds",
            str(rounds),
            "--per-round",
            str(per_round),
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench.p11kit_client failed: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def run(quick: bool = False) -> SectionResult:
    res = SectionResult("1 overhead")
    rounds, per_round = (4, 5) if quick else (40, 10)
    local = in_process_card()
    with tokend_daemon() as daemon:
        remote = socket_session(daemon.socket, 0, daemon.workdir / "card0")
        piped = pipelined_decrypt(remote)
        try:
            for _ in range(2 * per_round):  # warm both paths
                local.decrypt(), remote.decrypt(), local.sign(), remote.sign()
                local.sign_once(), remote.sign_once()
            series = {
                "decrypt": interleave(rounds, per_round, [local.decrypt, remote.decrypt, piped]),
                "sign_once": interleave(rounds, per_round, [local.sign_once, remote.sign_once]),
                "sign": interleave(rounds, per_round, [local.sign, remote.sign]),
            }
            floor = interleave(rounds, per_round, [rpc_floor(remote)])[0]
        finally:
            remote.close()
            local.close()
        via_p11kit = p11kit_series(daemon, rounds, per_round)
    hop = executor_hop(rounds * per_round)
    floor_s, hop_s = Summary.of(floor), Summary.of(hop)
    res.data["rpc_round_trip_no_card"] = floor_s.as_dict()
    res.data["executor_hop_noop"] = hop_s.as_dict()
    for op, runs in series.items():
        sa, sb = Summary.of(runs[0]), Summary.of(runs[1])
        overhead = round(sb.median_ms - sa.median_ms, 4)
        overhead_p99 = round(sb.p99_ms - sa.p99_ms, 4)
        floor_est = ROUND_TRIPS[op] * floor_s.median_ms + CARD_CALLS[op] * hop_s.median_ms
        res.data[op] = {
            "a_in_process": sa.as_dict(),
            "b_native_socket": sb.as_dict(),
            "overhead_ms_median": overhead,
            "overhead_ms_p99": overhead_p99,
            "round_trips": ROUND_TRIPS[op],
            "card_calls": CARD_CALLS[op],
            "floor_estimate_ms": round(floor_est, 4),
            "ratio_b_over_a": round(sb.median_ms / sa.median_ms, 3),
        }
        label = LABELS[op]
        res.row(f"{label} (a) in-process", f"median {sa.median_ms:.3f} ms, p99 {sa.p99_ms:.3f} ms")
        res.row(
            f"{label} (b) native socket", f"median {sb.median_ms:.3f} ms, p99 {sb.p99_ms:.3f} ms"
        )
        res.row(
            f"{label} overhead (b)-(a)",
            f"{overhead:.3f} ms median, p99 {overhead_p99:+.3f} ms; floor "
            f"{ROUND_TRIPS[op]} RT + {CARD_CALLS[op]} hop = {floor_est:.3f} ms",
            f"≤ {TARGET_OVERHEAD_MS} ms",
            verdict(overhead <= TARGET_OVERHEAD_MS),
        )
        if op == "decrypt":
            sp = Summary.of(runs[2])
            piped_over = round(sp.median_ms - sa.median_ms, 4)
            res.data[op]["b_pipelined"] = sp.as_dict()
            res.data[op]["overhead_pipelined_ms_median"] = piped_over
            res.row(
                f"{label} (b') socket, Init+Decrypt pipelined",
                f"median {sp.median_ms:.3f} ms; overhead {piped_over:.3f} ms",
                "",
                "info",
            )
        _row_c(res, op, label, via_p11kit)
    res.row(
        "one socket round trip, no card (C_GetSessionInfo)",
        f"median {floor_s.median_ms:.3f} ms, p99 {floor_s.p99_ms:.3f} ms",
        "",
        "info",
    )
    res.row(
        "one worker-thread hop (run_in_executor no-op)",
        f"median {hop_s.median_ms:.3f} ms, p99 {hop_s.p99_ms:.3f} ms",
        "",
        "info",
    )
    res.data["rounds"], res.data["per_round"] = rounds, per_round
    return res


def _row_c(res: SectionResult, op: str, label: str, via: dict[str, object]) -> None:
    what = f"{label} (c) p11-kit-client → tokend"
    if "unavailable" in via:
        res.data[op]["c_p11kit_client"] = f"skipped: {via['unavailable']}"
        res.row(what, f"skipped: {via['unavailable']}", "", "skipped")
        return
    if op not in via:
        # 9C is PIN-always: python-pkcs11 has no CKU_CONTEXT_SPECIFIC login.
        res.data[op]["c_p11kit_client"] = "n/a: python-pkcs11 cannot log in context-specific"
        res.row(what, "n/a (python-pkcs11 has no context-specific login)", "", "n/a")
        return
    series = via[op]
    sa, sb, sc = (Summary.of(series[k]) for k in "abc")  # type: ignore[index]
    overhead = round(sc.median_ms - sa.median_ms, 4)
    over_native = round(sc.median_ms - sb.median_ms, 4)
    res.data[op]["c_p11kit_client"] = {
        "a_in_process_same_child": sa.as_dict(),
        "b_native_socket_same_child": sb.as_dict(),
        "c_p11kit_client": sc.as_dict(),
        "overhead_ms_median": overhead,
        "c_minus_b_ms_median": over_native,
        "round_trips": P11KIT_ROUND_TRIPS,
    }
    res.row(
        what,
        f"median {sc.median_ms:.3f} ms, p99 {sc.p99_ms:.3f} ms; (c)-(a) {overhead:.3f} ms, "
        f"(c)-(b) {over_native:+.3f} ms ({P11KIT_ROUND_TRIPS} RT vs 1; own child run)",
        "",
        "info",
    )
