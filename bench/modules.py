"""Item 8: a vendor PKCS#11 module behind tokend, against the C program that does the same
bridging job, on the **same SoftHSM2 token**, side by side in one run:

  (i)   in-process python-pkcs11 on libsofthsm2.so (the floor: no bridge at all)
  (ii)  `p11-kit server` serving the module, reached through p11-kit-client.so
  (iii) tokend (`tokend serve --module libsofthsm2.so`) through its native socket
  (iv)  p11-kit-client.so → tokend's p11-kit front end (the (iii) daemon's pkcs11.sock)

RSA-2048 decrypt (CKM_RSA_PKCS) and P-256 sign (CKM_ECDSA over a SHA-256 digest: p11-kit
0.24.1's client does not carry CKM_ECDSA_SHA256), with 1 and 8 clients. Every client is a
process of its own (as mail clients are), started before the clock runs and released
together; the modes alternate round by round so drift on this shared machine hits all of
them alike. Reported per mode: ops/s (all clients' operations over the wall time from the
first start to the last finish), median and p99 latency, and the per-op overhead over (i)
(median difference). A further row runs tokend with one module worker at 8 clients, to show
what the driver's parallel module sessions buy, and, when uvloop is installed, a row with
the daemon on uvloop's event loop (the issue allows it if a side-by-side run shows it pays;
it is not a dependency).

python-pkcs11 makes three PKCS#11 calls per operation (Init, a size query, the operation),
so through p11-kit each operation is three RPC round trips; tokend's client sends Init and
the operation in one write (one round trip).

``python -m bench.modules worker …`` is the client process; the section itself is run by
``python -m bench --only modules``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, SectionResult, Summary, child_env, short_tempdir, wait_for_socket

DIGEST = hashlib.sha256(b"tokend bench message").digest()
MODES = {
    "i": "(i) in-process python-pkcs11",
    "ii": "(ii) p11-kit server + p11-kit-client.so",
    "iii": "(iii) tokend native socket",
    "iv": "(iv) p11-kit-client.so -> tokend p11-kit front end",
    "iii-1w": "(iii) tokend, one module worker",
    "iii-uv": "(iii) tokend under uvloop",
}
OPS = {"decrypt": "RSA-2048 decrypt", "sign": "P-256 sign"}


def _paths() -> tuple[Path, Path]:
    from tokend.simulators.softhsm import SOFTHSM_MODULE

    return SOFTHSM_MODULE, Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")


def unavailable_reason() -> str | None:
    import shutil

    from tokend.simulators.softhsm import unavailable_reason as softhsm_missing

    reason = softhsm_missing()
    if reason:
        return reason
    _module, client = _paths()
    if not client.exists() or shutil.which("p11-kit") is None:
        return "p11-kit / p11-kit-client.so missing (Debian packages p11-kit, p11-kit-modules)"
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 not installed"
    return None


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def frontend_available() -> bool:
    """(iv) needs tokend's p11-kit RPC front end (issue 14)."""
    try:
        import tokend.p11kit  # noqa: F401
    except ImportError:
        return False
    return True


# --- the client process --------------------------------------------------------------------


def _worker(mode: str, op: str, count: int, workdir: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding

    cert = x509.load_pem_x509_certificate((workdir / "encryption.pem").read_bytes())
    secret = os.urandom(32)
    blob = cert.public_key().encrypt(secret, padding.PKCS1v15())  # type: ignore[union-attr]
    pin = (workdir / "pin").read_text().strip()
    if mode in ("iii", "iii-1w", "iii-uv"):
        from tokend.client import Client
        from tokend.pkcs11 import CKA

        client = Client(workdir / f"tokend-{mode}.sock")
        slot = client.slot_list(token_present=True)[0]
        session = client.open_session(slot)
        client.login(session, pin)
        key_id = b"\x01" if op == "decrypt" else b"\x02"
        (key,) = client.find_objects(
            session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: key_id}
        )
        if op == "decrypt":

            def once() -> object:
                return client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        else:

            def once() -> object:
                return client.sign(session, key, "CKM_ECDSA", DIGEST)
    else:
        import pkcs11
        from pkcs11 import Attribute, Mechanism, ObjectClass

        module, p11kit_client = _paths()
        lib = pkcs11.lib(str(module if mode == "i" else p11kit_client))
        key_id = b"\x01" if op == "decrypt" else b"\x02"
        for attempt in range(50):
            # SoftHSM2 reads its token files with locks; when another process holds one at
            # that instant it answers CKR_GENERAL_ERROR (or leaves the token out at
            # C_Initialize, or shows it without CKF_USER_PIN_INITIALIZED: C_Login then answers
            # CKR_USER_PIN_NOT_INITIALIZED, seen once in CI). Set-up is retried; the
            # measured operations never needed it.
            try:
                token = lib.get_token(token_label="bench")
                psession = token.open(user_pin=pin)
                pkey = next(
                    psession.get_objects(
                        {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}
                    )
                )
                break
            except (pkcs11.NoSuchToken, pkcs11.GeneralError, pkcs11.UserPinNotInitialized):
                if attempt == 49:
                    raise
                time.sleep(0.05)
                lib.reinitialize()
        if op == "decrypt":

            def once() -> object:
                return pkey.decrypt(blob, mechanism=Mechanism.RSA_PKCS)
        else:

            def once() -> object:
                return pkey.sign(DIGEST, mechanism=Mechanism.ECDSA)

    for _ in range(3):  # warm-up: first-call costs are not what we compare
        once()
    if op == "decrypt" and once() != secret:
        raise SystemExit("wrong plaintext")
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    lat = []
    t0 = time.monotonic()
    for _ in range(count):
        s = time.perf_counter()
        once()
        lat.append(time.perf_counter() - s)
    t1 = time.monotonic()
    print(json.dumps({"lat": lat, "t0": t0, "t1": t1}), flush=True)


# --- servers -------------------------------------------------------------------------------


@dataclass
class Setup:
    workdir: Path
    env: dict[str, str]
    available: dict[str, str]  # mode -> "" if runnable, else why not
    #: mode -> PID of the bridge serving it (p11-kit server, a tokend daemon)
    pids: dict[str, int]


@contextlib.contextmanager
def _servers(quick: bool) -> Iterator[Setup]:
    """One SoftHSM2 token (provisioned through the module), p11-kit server and two tokend
    daemons serving it; all stopped by PID at exit."""
    import shutil

    from cryptography.hazmat.primitives.serialization import Encoding

    from tokend.simulators.softhsm import SoftHsm, provision_mail

    module, _client = _paths()
    workdir = short_tempdir("tokend-bench-modules-")
    hsm = SoftHsm.create(workdir / "hsm")
    old_conf = os.environ.get("SOFTHSM2_CONF")
    hsm.use()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        hsm.init_token("bench")
        material = provision_mail("bench")
        (workdir / "encryption.pem").write_bytes(
            material.encryption_cert.public_bytes(Encoding.PEM)
        )
        (workdir / "pin").write_text(material.pin)
        env = child_env(SOFTHSM2_CONF=str(hsm.conf), PYTHONPATH=str(REPO))
        available = {"i": "", "iii": "", "iii-1w": ""}
        # (ii) p11-kit server
        sock = workdir / "p11kit.sock"
        server = subprocess.Popen(
            ["p11-kit", "server", "--provider", str(module), "-f", "-n", str(sock), "pkcs11:"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        procs.append(server)
        pids = {"ii": server.pid}
        assert server.stdout is not None
        address = ""
        for raw in server.stdout:  # the address first, in sh syntax
            line = raw.decode()
            if line.startswith("P11_KIT_SERVER_ADDRESS="):
                address = line.split("=", 1)[1].split(";", 1)[0]
                break
        available["ii"] = "" if address else "p11-kit server printed no address"
        env["P11_KIT_SERVER_ADDRESS"] = address
        # (iii) tokend with the module, default workers; and with one worker
        (workdir / "one-worker.toml").write_text(
            f'modules = [{{path = "{module}", label = "softhsm", workers = 1}}]\n'
        )
        # Only (iii) serves the p11-kit front end (pkcs11.sock beside its socket): that
        # daemon is (iv)'s server; the others share the directory, so theirs is off.
        daemons = [
            ("iii", "tokend.cli.tokend_main", ["--module", str(module)]),
            (
                "iii-1w",
                "tokend.cli.tokend_main",
                ["--config", str(workdir / "one-worker.toml"), "--no-p11kit"],
            ),
        ]
        if uvloop_available():
            daemons.append(("iii-uv", "bench.modules", ["--module", str(module), "--no-p11kit"]))
            available["iii-uv"] = ""
        else:
            available["iii-uv"] = "uvloop not installed"
        for mode, entry, extra in daemons:
            tsock = workdir / f"tokend-{mode}.sock"
            prefix = ["serve-uvloop"] if entry == "bench.modules" else []
            with open(workdir / f"tokend-{mode}.log", "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", entry, *prefix, "serve", "--no-pcsc",
                     "--socket", str(tsock), *extra],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            procs.append(proc)
            pids[mode] = proc.pid
            wait_for_socket(tsock, proc, 60)
            from bench.common import wait_tokens

            wait_tokens(tsock, 1, 60)
        available["iv"] = (
            "" if frontend_available() else "not available yet (p11-kit front end: issue 14)"
        )
        if not available["iv"]:
            available["iv"] = _start_frontend(workdir, env)
        yield Setup(workdir, env, available, pids)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if old_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old_conf
        shutil.rmtree(workdir, ignore_errors=True)
        del quick


def _start_frontend(workdir: Path, env: dict[str, str]) -> str:
    """(iv): the (iii) daemon's own p11-kit front end, `pkcs11.sock` beside its socket
    (`tokend serve` starts it by default); p11-kit-client.so is pointed at it."""
    from tokend.p11kit import socket_path

    front = socket_path(workdir / "tokend-iii.sock")
    if not front.exists():
        return f"the (iii) daemon serves no {front.name}"
    env["TOKEND_P11KIT_ADDRESS"] = f"unix:path={front}"
    return ""


# --- one measurement -----------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of its live children (p11-kit server forks a `p11-kit
    remote` per connection), user + system, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1] is the parent PID; utime, stime are fields[11], fields[12]
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _measure(setup: Setup, mode: str, op: str, clients: int, count: int) -> dict[str, object]:
    env = dict(setup.env)
    if mode == "iv":
        env["P11_KIT_SERVER_ADDRESS"] = env.get("TOKEND_P11KIT_ADDRESS", "")
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.modules",
                "worker",
                mode,
                op,
                str(count),
                str(setup.workdir),
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline().strip()
            if line != "ready":
                err = w.stderr.read() if w.stderr else ""
                raise RuntimeError(f"{mode} {op} client failed: {line} {err.strip()[-300:]}")
        bridge = setup.pids.get(mode)
        cpu0 = _cpu_seconds(bridge) if bridge else 0.0
        for w in workers:  # released together
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        results = []
        for w in workers:
            assert w.stdout is not None
            results.append(json.loads(w.stdout.readline()))
        cpu = _cpu_seconds(bridge) - cpu0 if bridge else None
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                if w.stdin:
                    w.stdin.close()
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    lat = [x for r in results for x in r["lat"]]
    wall = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return {"lat": lat, "wall": wall, "ops": len(lat), "bridge_cpu_s": cpu}


def run(quick: bool = False) -> SectionResult:
    res = SectionResult("8 modules")
    reason = unavailable_reason()
    if reason is not None:
        res.row("SoftHSM2 behind tokend vs p11-kit server", f"skipped: {reason}", "", "skipped")
        res.data["skipped"] = reason
        return res
    rounds = 2 if quick else 4
    count = {1: 15 if quick else 150, 8: 5 if quick else 60}
    series: dict[tuple[str, str, int], list[dict[str, object]]] = {}
    with _servers(quick) as setup:
        runnable = [m for m in ("i", "ii", "iii", "iv") if not setup.available.get(m)]
        for _round in range(rounds):
            for op in OPS:
                for clients in (1, 8):
                    plan = list(runnable) + (["iii-1w"] if clients == 8 else [])
                    if not setup.available.get("iii-uv"):
                        plan.append("iii-uv")
                    if _round % 2:
                        plan.reverse()
                    for mode in plan:
                        series.setdefault((mode, op, clients), []).append(
                            _measure(setup, mode, op, clients, count[clients])
                        )
        available = setup.available
    table: dict[str, dict[str, object]] = {}
    for op, op_name in OPS.items():
        for clients in (1, 8):
            base = None
            for mode in ("i", "ii", "iii", "iv", "iii-1w", "iii-uv"):
                if mode == "iii-1w" and clients == 1:
                    continue
                if mode == "iii-uv" and available.get(mode):
                    continue
                key = f"{op}/{clients}/{mode}"
                runs = series.get((mode, op, clients))
                if not runs:
                    why = available.get(mode) or "not run"
                    table[key] = {"available": False, "why": why}
                    res.row(
                        f"{op_name}, {clients} client{'s' * (clients > 1)}: {MODES[mode]}",
                        why,
                        "",
                        "not available yet",
                    )
                    continue
                lat = [x for r in runs for x in r["lat"]]  # type: ignore[attr-defined]
                ops = sum(int(r["ops"]) for r in runs)  # type: ignore[call-overload]
                wall = sum(float(r["wall"]) for r in runs)  # type: ignore[arg-type]
                summary = Summary.of(lat)
                entry: dict[str, object] = {
                    **summary.as_dict(),
                    "ops_per_s": round(ops / wall, 1),
                }
                cpu = [r["bridge_cpu_s"] for r in runs if r.get("bridge_cpu_s") is not None]
                if cpu:
                    # CPU the bridge process(es) spent per operation (clock ticks: 10 ms)
                    entry["bridge_cpu_ms_per_op"] = round(1000 * sum(cpu) / ops, 3)  # type: ignore[arg-type]
                if mode == "i":
                    base = summary
                elif base is not None:
                    entry["overhead_ms"] = round(summary.median_ms - base.median_ms, 4)
                table[key] = entry
                over = (
                    f", +{entry['overhead_ms']:.3f} ms/op over (i)"
                    if "overhead_ms" in entry
                    else ""
                )
                if "bridge_cpu_ms_per_op" in entry:
                    over += f"; bridge CPU {entry['bridge_cpu_ms_per_op']:.2f} ms/op"
                res.row(
                    f"{op_name}, {clients} client{'s' * (clients > 1)}: {MODES[mode]}",
                    f"{entry['ops_per_s']:.0f} ops/s, median {summary.median_ms:.3f} ms, "
                    f"p99 {summary.p99_ms:.3f} ms{over}",
                )
            # the targets
            ii, iii = table.get(f"{op}/{clients}/ii", {}), table.get(f"{op}/{clients}/iii", {})
            if "ops_per_s" in ii and "ops_per_s" in iii:
                if clients == 8:
                    ok = float(iii["ops_per_s"]) >= float(ii["ops_per_s"])  # type: ignore[arg-type]
                    res.row(
                        f"{op_name}, 8 clients: tokend ops/s vs p11-kit server",
                        f"{iii['ops_per_s']} vs {ii['ops_per_s']}",
                        "tokend ≥ p11-kit",
                        "ok" if ok else "MISSED",
                    )
                else:
                    a, b = float(iii["overhead_ms"]), float(ii["overhead_ms"])  # type: ignore[arg-type]
                    res.row(
                        f"{op_name}, 1 client: overhead per op over (i)",
                        f"tokend {a:.3f} ms vs p11-kit {b:.3f} ms",
                        "tokend ≤ p11-kit",
                        "ok" if a <= b else "MISSED",
                    )
    res.data.update(
        table=table,
        rounds=rounds,
        ops_per_client_per_round=count,
        available={m: (not why) for m, why in available.items()},
    )
    return res


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve-uvloop"]:
        # `tokend serve` on uvloop's event loop: for the side-by-side row only.
        import asyncio

        import uvloop

        from tokend.cli.tokend_main import main as tokend_main

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return tokend_main(argv[1:])
    if len(argv) == 5 and argv[0] == "worker":
        _worker(argv[1], argv[2], int(argv[3]), Path(argv[4]))
        return 0
    print("usage: python -m bench.modules worker MODE OP COUNT WORKDIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
