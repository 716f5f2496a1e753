"""Item 3: 1, 8 and 64 clients decrypting on one token at once (each its own connection,
session and login), for a fixed time each. Throughput, p50/p99 latency, errors (must be 0)
and fairness (p99/p50 ≤ 3; also the spread of operations per client). The token is one card:
its calls are serialised, so throughput stays at one card's rate and latency grows with the
queue — fairness is whether every client waits about as long as the others."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from bench.common import PIN, SectionResult, Summary, percentile, tokend_daemon, verdict
from bench.ops import ID_9D, load_cert, rsa_blob

CLIENTS = (1, 8, 64)
TARGET_FAIRNESS = 3.0


async def _run_clients(sock: Path, cert_dir: Path, clients: int, seconds: float) -> dict:
    from tokend.client import AsyncClient
    from tokend.pkcs11 import CKA

    public = load_cert(cert_dir / "encryption.pem").public_key()
    blob = rsa_blob(public)  # type: ignore[arg-type]
    conns = []
    for _ in range(clients):
        c = await AsyncClient.connect(sock)
        session = await c.open_session(0)
        await c.login(session, PIN)
        (key,) = await c.find_objects(
            session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: ID_9D}
        )
        conns.append((c, session, key))
    latencies: list[float] = []
    per_client = [0] * clients
    errors: list[str] = []
    start = asyncio.Event()
    stop_at = 0.0

    async def worker(i: int) -> None:
        c, session, key = conns[i]
        await start.wait()
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                out = await c.decrypt(session, key, "CKM_RSA_PKCS", blob.ciphertext)
            except Exception as exc:  # counted, never expected
                errors.append(type(exc).__name__)
                continue
            latencies.append(time.perf_counter() - t0)
            per_client[i] += 1
            if out != blob.secret:
                errors.append("wrong plaintext")

    tasks = [asyncio.create_task(worker(i)) for i in range(clients)]
    await asyncio.sleep(0)
    t_start = time.perf_counter()
    stop_at = t_start + seconds
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t_start
    for c, _s, _k in conns:
        await c.close()
    return {
        "latencies": latencies,
        "per_client": per_client,
        "errors": errors,
        "elapsed": elapsed,
    }


def run(quick: bool = False, clients: tuple[int, ...] = CLIENTS) -> SectionResult:
    res = SectionResult("3 concurrency")
    seconds = 1.0 if quick else 4.0
    with tokend_daemon() as daemon:
        for n in clients:
            out = asyncio.run(_run_clients(daemon.socket, daemon.workdir / "card0", n, seconds))
            lat = out["latencies"]
            s = Summary.of(lat)
            p50 = statistics.median(lat) if lat else float("nan")
            fairness = percentile(lat, 99) / p50 if lat else float("nan")
            throughput = len(lat) / out["elapsed"]
            spread = (min(out["per_client"]), max(out["per_client"]))
            ok = not out["errors"] and fairness <= TARGET_FAIRNESS
            res.data[f"{n}_clients"] = {
                "throughput_ops_s": round(throughput, 1),
                "latency": s.as_dict(),
                "errors": len(out["errors"]),
                "error_kinds": sorted(set(out["errors"])),
                "fairness_p99_over_p50": round(fairness, 3),
                "ops_per_client_min_max": list(spread),
                "seconds": round(out["elapsed"], 3),
            }
            res.row(
                f"{n} client{'s' if n > 1 else ''} decrypting",
                f"{throughput:.0f} ops/s, p50 {s.median_ms:.2f} ms, p99 {s.p99_ms:.2f} ms, "
                f"errors {len(out['errors'])}, p99/p50 {fairness:.2f}, "
                f"ops/client {spread[0]}-{spread[1]}",
                "errors 0, p99/p50 ≤ 3",
                verdict(ok),
            )
    return res
