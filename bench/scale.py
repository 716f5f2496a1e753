"""Item 6: 16 simulated tokens present at once (bench.launcher, one daemon process).
Slot listing time (C_GetSlotList, and the full listing a PKCS#11 consumer does: slot list
plus C_GetTokenInfo per slot), and per-token decrypt throughput with one client per token,
next to one token alone on the same daemon in the same run."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from bench.common import SectionResult, Summary, interleave, tokend_daemon
from bench.ops import ID_9D, load_cert, rsa_blob

TOKENS = 16


async def _throughput(sock: Path, slots: list[int], seconds: float) -> list[int]:
    """One client per slot decrypting for ``seconds``; operations done per slot."""
    from tokend.client import AsyncClient
    from tokend.pkcs11 import CKA

    conns = []
    for slot in slots:
        c = await AsyncClient.connect(sock)
        s = await c.open_session(slot)
        await c.login(s, "123456")
        (key,) = await c.find_objects(s, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: ID_9D})
        pub = load_cert(sock.parent / f"card{slot}" / "encryption.pem").public_key()
        conns.append((c, s, key, rsa_blob(pub)))  # type: ignore[arg-type]
    counts = [0] * len(slots)
    stop_at = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        c, s, key, blob = conns[i]
        while time.perf_counter() < stop_at:
            out = await c.decrypt(s, key, "CKM_RSA_PKCS", blob.ciphertext)
            if out != blob.secret:
                raise AssertionError("wrong plaintext")
            counts[i] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(len(slots))))
    elapsed = time.perf_counter() - t0
    for c, *_ in conns:
        await c.close()
    return [round(n / elapsed, 2) for n in counts]  # type: ignore[misc]


def run(quick: bool = False) -> SectionResult:
    from tokend.client import Client

    res = SectionResult("6 scale")
    seconds = 1.0 if quick else 4.0
    n_list = 20 if quick else 200
    with tokend_daemon(tokens=TOKENS, launcher=True) as d:
        with Client(d.socket) as c:
            slots = c.slot_list(True)

            def listing() -> None:
                c.slot_list(True)

            def full_listing() -> None:
                for slot in c.slot_list(True):
                    c.token_info(slot)

            lst, full = interleave(n_list // 10, 10, [listing, full_listing])
        single = asyncio.run(_throughput(d.socket, slots[:1], seconds))
        many = asyncio.run(_throughput(d.socket, slots, seconds))
    sl, sf = Summary.of(lst), Summary.of(full)
    per = statistics.median(many)
    res.data.update(
        tokens=len(slots),
        slot_list=sl.as_dict(),
        slot_list_plus_token_info=sf.as_dict(),
        one_token_alone_ops_s=single[0],
        per_token_ops_s=many,
        per_token_median_ops_s=per,
        aggregate_ops_s=round(sum(many), 1),
        ratio_per_token_vs_alone=round(per / single[0], 3) if single[0] else None,
    )
    res.row(
        f"{len(slots)} tokens: C_GetSlotList",
        f"median {sl.median_ms:.3f} ms, p99 {sl.p99_ms:.3f} ms",
    )
    res.row(
        f"{len(slots)} tokens: slot list + C_GetTokenInfo each",
        f"median {sf.median_ms:.2f} ms, p99 {sf.p99_ms:.2f} ms",
    )
    res.row(
        f"decrypt, 1 client per token x {len(slots)}",
        f"per token median {per:.1f} ops/s (min {min(many):.1f}, max {max(many):.1f}); "
        f"total {sum(many):.0f} ops/s; one token alone {single[0]:.0f} ops/s",
        "",
        "info",
    )
    return res
