"""Item 2: the C anchor. A SoftHSM2 token used in-process through python-pkcs11, and the
same token served by ``p11-kit server`` and reached through p11-kit-client.so (both in this
process, alternating in rounds). Its RPC overhead per operation sits next to tokend's native
socket overhead from item 1 (RSA-2048 decrypt, P-256 sign).

python-pkcs11 makes three PKCS#11 calls per operation here (Init, a size query, the
operation), so through p11-kit each operation is three RPC round trips.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import PIN, SectionResult, Summary, interleave, short_tempdir, verdict

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
P11KIT_CLIENT = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
SO_PIN = "12345678"
LABEL = "bench"
DIGEST = hashlib.sha256(b"tokend bench message").digest()


def unavailable_reason() -> str | None:
    for path in (SOFTHSM_MODULE, P11KIT_CLIENT):
        if not path.exists():
            return f"{path} missing (Debian packages softhsm2, p11-kit-modules)"
    for tool in ("softhsm2-util", "p11-kit"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH (Debian packages softhsm2, p11-kit)"
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 not installed"
    return None


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str


@contextlib.contextmanager
def softhsm_and_server() -> Iterator[tuple[Path, Server]]:
    """A fresh SoftHSM2 token (own SOFTHSM2_CONF and token dir) and a p11-kit server child
    serving it; both removed/stopped (by PID) at exit."""
    work = short_tempdir("tokend-bench-softhsm-")
    conf = work / "softhsm2.conf"
    (work / "tokens").mkdir()
    conf.write_text(
        f"directories.tokendir = {work / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    old_conf = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    proc = None
    try:
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                LABEL,
                "--pin",
                PIN,
                "--so-pin",
                SO_PIN,
            ],
            check=True,
            capture_output=True,
        )
        sock = work / "p11kit.sock"
        proc = subprocess.Popen(
            [
                "p11-kit",
                "server",
                "--provider",
                str(SOFTHSM_MODULE),
                "-f",
                "-n",
                str(sock),
                "pkcs11:",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        address = ""
        for raw in proc.stdout:  # it prints the address first, in sh syntax
            line = raw.decode()
            if line.startswith("P11_KIT_SERVER_ADDRESS="):
                address = line.split("=", 1)[1].split(";", 1)[0]
                break
        if not address:
            raise RuntimeError("p11-kit server printed no P11_KIT_SERVER_ADDRESS")
        yield work, Server(proc, address)
    finally:
        if proc is not None and proc.poll() is None:
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
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Pkcs11Ops:
    decrypt: Callable[[], bytes]
    sign: Callable[[], bytes]
    close: Callable[[], None]


def _provision(lib) -> None:  # type: ignore[no-untyped-def]
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    with lib.get_token(token_label=LABEL).open(rw=True, user_pin=PIN) as session:
        session.generate_keypair(KeyType.RSA, 2048, store=True, label="rsa")
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        params.generate_keypair(store=True, label="ec")


def _ops(lib) -> Pkcs11Ops:  # type: ignore[no-untyped-def]
    from pkcs11 import KeyType, Mechanism, ObjectClass

    session = lib.get_token(token_label=LABEL).open(user_pin=PIN)
    rsa_priv = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="rsa")
    rsa_pub = session.get_key(ObjectClass.PUBLIC_KEY, KeyType.RSA, label="rsa")
    ec_priv = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label="ec")
    secret = os.urandom(32)
    blob = rsa_pub.encrypt(secret, mechanism=Mechanism.RSA_PKCS)

    def decrypt() -> bytes:
        return rsa_priv.decrypt(blob, mechanism=Mechanism.RSA_PKCS)

    def sign() -> bytes:
        # CKM_ECDSA over a digest: p11-kit 0.24.1's client does not carry CKM_ECDSA_SHA256.
        return ec_priv.sign(DIGEST, mechanism=Mechanism.ECDSA)

    if decrypt() != secret:
        raise AssertionError("SoftHSM decrypt returned the wrong plaintext")
    if len(sign()) != 64:
        raise AssertionError("SoftHSM ECDSA signature has the wrong size")
    return Pkcs11Ops(decrypt, sign, session.close)


def run(quick: bool = False, tokend_overhead: dict[str, float] | None = None) -> SectionResult:
    """``tokend_overhead``: item 1's (b) - (a) medians, {"decrypt": ms, "sign": ms}."""
    res = SectionResult("2 C anchor")
    reason = unavailable_reason()
    if reason is not None:
        res.row("SoftHSM2 via p11-kit server", f"skipped: {reason}", "", "skipped")
        res.data["skipped"] = reason
        return res
    import pkcs11

    rounds, per_round = (4, 5) if quick else (40, 10)
    with softhsm_and_server() as (_work, server):
        direct = pkcs11.lib(str(SOFTHSM_MODULE))
        _provision(direct)
        # p11-kit-client.so reads the address when its function list is fetched (at load).
        os.environ["P11_KIT_SERVER_ADDRESS"] = server.address
        try:
            remote_lib = pkcs11.lib(str(P11KIT_CLIENT))
            local, remote = _ops(direct), _ops(remote_lib)
            try:
                for _ in range(2 * per_round):
                    local.decrypt(), remote.decrypt(), local.sign(), remote.sign()
                series = {
                    "decrypt": interleave(rounds, per_round, [local.decrypt, remote.decrypt]),
                    "sign": interleave(rounds, per_round, [local.sign, remote.sign]),
                }
            finally:
                remote.close()
                local.close()
                with contextlib.suppress(Exception):
                    remote_lib.finalize()
                with contextlib.suppress(Exception):
                    direct.finalize()
        finally:
            os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
    labels = {"decrypt": "RSA-2048 decrypt", "sign": "P-256 sign"}
    for op, (a, b) in series.items():
        sa, sb = Summary.of(a), Summary.of(b)
        overhead = round(sb.median_ms - sa.median_ms, 4)
        entry: dict[str, object] = {
            "in_process": sa.as_dict(),
            "p11kit_client": sb.as_dict(),
            "ops_per_s_in_process": round(1000.0 / sa.median_ms, 1),
            "ops_per_s_p11kit": round(1000.0 / sb.median_ms, 1),
            "rpc_overhead_ms_median": overhead,
            "rpc_round_trips": 3,
        }
        res.row(
            f"SoftHSM2 {labels[op]} in-process / via p11-kit",
            f"{entry['ops_per_s_in_process']:.0f} / {entry['ops_per_s_p11kit']:.0f} ops/s "
            f"(median {sa.median_ms:.3f} / {sb.median_ms:.3f} ms)",
        )
        row_value = f"p11-kit {overhead:.3f} ms (3 RT)"
        if tokend_overhead and op in tokend_overhead:
            ours = tokend_overhead[op]
            entry["tokend_overhead_ms_median"] = ours
            entry["ratio_tokend_over_p11kit"] = round(ours / overhead, 3) if overhead > 0 else None
            row_value += f" vs tokend {ours:.3f} ms"
            if overhead > 0:
                row_value += f" (ratio {ours / overhead:.2f})"
            res.row(
                f"{labels[op]} RPC overhead per op",
                row_value,
                "tokend ≤ p11-kit",
                verdict(ours <= overhead),
            )
        else:
            res.row(f"{labels[op]} RPC overhead per op", row_value)
        res.data[op] = entry
    res.data["rounds"], res.data["per_round"] = rounds, per_round
    return res
