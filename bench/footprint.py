"""Item 5: footprint. Daemon start to first answer (a client's C_GetInfo answered), resident
memory with four tokens, and the import time of `tokend` (``python -X importtime``)."""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    REPO,
    SectionResult,
    child_env,
    rss_kib,
    short_tempdir,
    tokend_daemon,
    verdict,
)

TARGET_START_MS = 300.0
TARGET_RSS_MB = 60.0


def _first_answer(args: list[str], sock: Path, timeout: float = 30.0) -> tuple[float, int]:
    """Seconds from spawning ``args`` to the first answered C_GetInfo; and the child's RSS
    (KiB) at that moment. The child is stopped (by its PID) afterwards."""
    from tokend.client import Client

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{args} exited with {proc.returncode}")
            try:
                with Client(sock, timeout=5) as client:
                    client.call("C_GetInfo")
                    elapsed = time.perf_counter() - t0
                    return elapsed, rss_kib(proc.pid)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from {args} within {timeout} s")
            time.sleep(0.002)  # nothing to wait on before the socket exists
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _import_time_ms(module: str, runs: int) -> float:
    """Median cumulative import time of ``module`` (and everything it imports), ms."""
    values = []
    root = module.split(".")[0]
    for _ in range(runs + 1):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        total = 0
        for line in out.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
            # Top-level lines of the package only (the interpreter's own start-up imports
            # are top-level too); a line's cumulative time covers what it imported first.
            name = m.group(4) if m else ""
            if m and not m.group(3) and (name == root or name.startswith(root + ".")):
                total += int(m.group(2))
        values.append(total / 1000.0)
    return statistics.median(values[1:])  # the first run warms the bytecode caches


def _pcsc_ok() -> bool:
    try:
        from tokend.simulators.pcscd import pcscd_unavailable_reason

        return pcscd_unavailable_reason() is None
    except ImportError:
        return False


async def _use_all(sock: Path, count: int) -> None:
    """Open a logged-in session on every token and decrypt once on each (memory in use,
    not just at rest)."""
    from bench.ops import ID_9D, load_cert, rsa_blob
    from tokend.client import AsyncClient
    from tokend.pkcs11 import CKA

    async with await AsyncClient.connect(sock) as c:
        for slot in await c.slot_list(True):
            s = await c.open_session(slot)
            await c.login(s, "123456")
            (key,) = await c.find_objects(s, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: ID_9D})
            pub = load_cert(sock.parent / f"card{slot}" / "encryption.pem").public_key()
            blob = rsa_blob(pub)  # type: ignore[arg-type]
            assert await c.decrypt(s, key, "CKM_RSA_PKCS", blob.ciphertext) == blob.secret
        _ = count


def run(quick: bool = False) -> SectionResult:
    res = SectionResult("5 footprint")
    runs = 2 if quick else 5
    serve = [sys.executable, "-m", "tokend.cli.tokend_main", "serve"]
    variants = [("no tokens, --no-pcsc", ["--no-pcsc"])]
    if not quick and _pcsc_ok():
        variants.append(("PC/SC watcher on (pcscd running)", []))
    for name, extra in variants:
        times, rss = [], []
        for _ in range(runs):
            sock = short_tempdir("tokend-bench-start-") / "tokend.sock"
            try:
                elapsed, kib = _first_answer(serve + extra + ["--socket", str(sock)], sock)
            finally:
                shutil.rmtree(sock.parent, ignore_errors=True)
            times.append(elapsed)
            rss.append(kib)
        med = statistics.median(times) * 1000
        res.data[f"start_{name}"] = {
            "median_ms": round(med, 1),
            "max_ms": round(max(times) * 1000, 1),
            "runs": runs,
            "rss_mb_at_first_answer": round(statistics.median(rss) / 1024, 1),
        }
        res.row(
            f"start → first answer ({name})",
            f"median {med:.0f} ms, max {max(times) * 1000:.0f} ms (n={runs})",
            f"≤ {TARGET_START_MS:.0f} ms",
            verdict(med <= TARGET_START_MS),
        )
    # With the product's demo token: includes provisioning it (two RSA-2048 key generations
    # in the simulator), which a real token does not cost.
    t0 = time.perf_counter()
    with tokend_daemon() as d:
        t_token = time.perf_counter() - t0
        res.data["start_to_demo_token_present_ms"] = round(t_token * 1000, 1)
        res.row(
            "start → demo token present (tokend serve --simulate piv)",
            f"{t_token * 1000:.0f} ms (includes the simulator's RSA key generation)",
            "",
            "info",
        )
        _ = d
    with tokend_daemon(tokens=4, launcher=True) as d:
        asyncio.run(_use_all(d.socket, 4))
        kib = rss_kib(d.pid)
        hwm = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{d.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:")
            )
        )
    res.data["rss_four_tokens_mb"] = round(kib / 1024, 1)
    res.data["rss_peak_four_tokens_mb"] = round(hwm / 1024, 1)
    res.row(
        "resident memory, 4 tokens in use (daemon + in-process simulated cards)",
        f"{kib / 1024:.1f} MB (peak {hwm / 1024:.1f} MB)",
        f"≤ {TARGET_RSS_MB:.0f} MB",
        verdict(kib / 1024 <= TARGET_RSS_MB),
    )
    for module in ("tokend", "tokend.daemon", "tokend.cli.tokend_main"):
        value = _import_time_ms(module, runs)
        res.data[f"import_ms_{module}"] = round(value, 1)
        res.row(f"import time: {module}", f"{value:.1f} ms (median of {runs})", "", "info")
    return res
