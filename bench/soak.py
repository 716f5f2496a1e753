"""`make soak`: many clients mixing list / login / decrypt / sign / logout while tokens are
unplugged and plugged again, for a fixed time, against one `tokend serve` child process.

    python -m bench.soak [--seconds 300] [--clients 64] [--p11kit-clients 8]
                         [--transports memory,usb,pcsc] [--json FILE]

Tokens: ``memory`` = a virtual PIV card in the daemon's in-process reader (``--simulate
piv``), ``usb`` = a virtual CCID token on the simulated USB bus driven through pyusb and the
CCID driver (``--simulate usb``) — both plugged through ``--simulate-control`` —, and
``pcsc`` = a virtual PIV card behind the real pcscd + vpcd (a vpcd lease is held for the
run). A chaos task unplugs one token at a time for 0.2 to 1 s; the token counts as back
once the daemon lists it again.

Clients: ``--clients`` in all, of which ``--p11kit-clients`` are PKCS#11 programs (Debian's
p11-kit-client.so through python-pkcs11, one process each: bench/soak_p11kit.py) talking
to the daemon's p11-kit front end; the others are native asyncio clients of its socket.

Verdicts: **wrong results** (a plaintext or signature that does not match the token's own
certificate, a token answering with another token's certificate) must be 0; **unexpected
errors** — any error on a token that was not unplugged at some point since the session was
opened — must be 0; the daemon's RSS and open fds are sampled each second: start (after
5 s of warm-up), at 60 s, end, peak; "RSS flat" = end within 2 MiB of the RSS at 60 s
(runs under 90 s: within 10 MiB + 10 % of start); "fds flat" = end within 4 of start, and
once every client has gone the fds return to what they were before the clients came.
Exit status 1 on any failed verdict. It stops by itself.

Debugging the daemon's memory: ``--tidy`` (native clients close the sessions that failed),
``--no-unplug``, ``--trace FILE`` (bench/soak_trace.py samples inside the daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from bench.common import REPO, child_env, rss_kib, short_tempdir, wait_for_socket
from tokend.p11kit import socket_path as p11kit_socket_path

PIN = "123456"
ID_9C, ID_9D = b"\x02", b"\x03"
DIGEST = hashlib.sha256(b"tokend soak").digest()
TRANSPORTS = ("memory", "usb", "pcsc")
#: The RSS-flat verdict of runs of 90 s and more: end ≤ RSS at 60 s + this (KiB).
RSS_AFTER_60S_KIB = 2 * 1024


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Token:
    """One virtual token: how to plug/unplug it and the certificates it must answer with."""

    name: str
    transport: str
    encryption: x509.Certificate
    signing: x509.Certificate
    authentication: x509.Certificate
    plug: object = None
    unplug: object = None
    epoch: int = 0  # incremented at every unplug
    present: bool = True
    #: monotonic [unplug began, replug done] per cycle (the p11-kit clients' errors are
    #: classified with these afterwards; their process shares the clock)
    away: list[list[float | None]] = field(default_factory=list)

    def away_during(self, began: float, seen: float) -> bool:
        """Was the token unplugged at some moment of [began, seen]?"""
        return any(start <= seen and (end is None or end >= began) for start, end in self.away)


@dataclass
class Tally:
    ops: dict[str, int] = field(default_factory=dict)
    per_token: dict[str, int] = field(default_factory=dict)  # decrypts + signs
    expected_errors: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    unplugs: int = 0

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


def _der_of(value: str) -> bytes:
    import base64

    return base64.b64decode(value)


class Soak:
    def __init__(
        self, tokens: list[Token], sock: Path, seconds: float, clients: int, p11kit_clients: int = 0
    ) -> None:
        self.tokens = tokens
        # The demo encryption key is imported (the same on every demo token); the signing key is
        # generated on each token, so its certificate tells the tokens apart.
        self.by_cert = {t.signing.public_bytes(Encoding.DER): t for t in tokens}
        self.sock = sock
        self.seconds = seconds
        self.clients = clients
        #: of ``clients``, how many are p11-kit-client.so processes (the rest: native)
        self.p11kit_clients = min(p11kit_clients, clients)
        self.tally = Tally()  # native clients
        self.p11kit = Tally()
        #: native clients close a session that failed (a tidy program) instead of leaving it
        self.tidy = False
        #: False: no token is unplugged (to tell per-operation from per-unplug growth)
        self.unplug = True
        self.rng = random.Random(18)
        self.stop_at = 0.0

    async def _identify(self, client, session: int) -> Token:  # type: ignore[no-untyped-def]
        from tokend.pkcs11 import CKA

        (cert,) = await client.find_objects(
            session, {CKA.CKA_CLASS: "CKO_CERTIFICATE", CKA.CKA_ID: ID_9C}
        )
        attrs = await client.get_attributes(session, cert, [CKA.CKA_VALUE])
        der = attrs["CKA_VALUE"]
        der = der if isinstance(der, bytes) else _der_of(der)
        token = self.by_cert.get(der)
        if token is None:
            raise AssertionError("a slot answered with a certificate of no soak token")
        return token

    async def _session_work(self, client, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
        from tokend.errors import UserAlreadyLoggedInError
        from tokend.pkcs11 import CKA

        slots = await client.slot_list(token_present=True)
        self.tally.count(self.tally.ops, "list")
        if not slots:
            return
        slot = rng.choice(slots)
        # A token absent at this point may still be listed (the daemon has not yet seen the
        # unplug): count it as moved, like one unplugged while we work.
        epochs = {t.name: t.epoch if t.present else -1 for t in self.tokens}
        token: Token | None = None
        session: int | None = None
        try:
            session = await client.open_session(slot)
            token = await self._identify(client, session)
            if epochs[token.name] != token.epoch:
                if self.tidy:
                    with contextlib.suppress(Exception):
                        await client.call("C_CloseSession", {"h_session": session})
                return  # unplugged and back while we looked: start again
            try:
                await client.login(session, PIN)
                self.tally.count(self.tally.ops, "login")
            except UserAlreadyLoggedInError:
                pass  # login is per connection: an earlier session of this client did it
            (key,) = await client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: ID_9D}
            )
            for _ in range(rng.randint(1, 3)):
                secret = os.urandom(32)
                blob = token.encryption.public_key().encrypt(secret, padding.PKCS1v15())  # type: ignore[union-attr]
                out = await client.decrypt(session, key, "CKM_RSA_PKCS", blob)
                self.tally.count(self.tally.ops, "decrypt")
                self.tally.count(self.tally.per_token, token.name)
                if out != secret:
                    self.tally.wrong.append(f"decrypt on {token.name}: wrong plaintext")
            if rng.random() < 0.5:
                (sign_key,) = await client.find_objects(
                    session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: ID_9C}
                )
                sig = await client.sign(session, sign_key, "CKM_ECDSA", DIGEST, context_pin=PIN)
                self.tally.count(self.tally.ops, "sign")
                self.tally.count(self.tally.per_token, token.name)
                half = len(sig) // 2
                der = encode_dss_signature(
                    int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
                )
                try:
                    token.signing.public_key().verify(  # type: ignore[call-arg]
                        der,
                        DIGEST,
                        ec.ECDSA(Prehashed(hashes.SHA256())),  # type: ignore[call-arg]
                    )
                except Exception:
                    self.tally.wrong.append(f"sign on {token.name}: signature does not verify")
            if rng.random() < 0.5:
                await client.call("C_Logout", {"h_session": session})
                self.tally.count(self.tally.ops, "logout")
            await client.call("C_CloseSession", {"h_session": session})
        except AssertionError as exc:
            self.tally.wrong.append(str(exc))
        except Exception as exc:  # classified: a token that left may fail its sessions
            name = type(exc).__name__
            moved = token is None and any(epochs[t.name] != t.epoch for t in self.tokens)
            if (token is not None and epochs[token.name] != token.epoch) or moved:
                self.tally.count(self.tally.expected_errors, name)
            elif token is None and not all(t.present for t in self.tokens):
                self.tally.count(self.tally.expected_errors, name)  # slot emptied before we knew it
            else:
                where = token.name if token else f"slot {slot}"
                self.tally.unexpected.append(f"{where}: {name}: {exc}")
            if self.tidy and session is not None:
                with contextlib.suppress(Exception):  # CKR_DEVICE_REMOVED, then it is gone
                    await client.call("C_CloseSession", {"h_session": session})

    async def _client(self, index: int) -> None:
        from tokend.client import AsyncClient

        rng = random.Random(1800 + index)
        client = await AsyncClient.connect(self.sock)
        try:
            while time.monotonic() < self.stop_at:
                roll = rng.random()
                if roll < 0.15:
                    await client.slot_list()
                    self.tally.count(self.tally.ops, "list")
                elif roll < 0.2:
                    await asyncio.sleep(rng.random() * 0.05)
                else:
                    await self._session_work(client, rng)
        finally:
            await client.close()

    async def _chaos(self) -> None:
        from tokend.client import AsyncClient

        rng = random.Random(180)
        watcher = await AsyncClient.connect(self.sock)
        try:
            await self._chaos_loop(rng, watcher)
        finally:
            await watcher.close()

    async def _chaos_loop(self, rng: random.Random, watcher) -> None:  # type: ignore[no-untyped-def]
        while self.unplug and time.monotonic() < self.stop_at - 1.5:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            token = rng.choice(self.tokens)
            token.epoch += 1
            token.present = False
            cycle: list[float | None] = [time.monotonic(), None]
            token.away.append(cycle)
            await asyncio.to_thread(token.unplug)  # type: ignore[arg-type]
            self.tally.unplugs += 1
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await asyncio.to_thread(token.plug)  # type: ignore[arg-type]
            # Back once the daemon lists it again (it probes the token after the plug):
            # until then a client may rightly find its slot empty or the slot list growing.
            deadline = time.monotonic() + 10
            while len(listed := await watcher.slot_list(token_present=True)) < len(self.tokens):
                if time.monotonic() > deadline:
                    self.tally.unexpected.append(
                        f"{token.name}: 10 s after its replug the daemon lists tokens in "
                        f"slots {listed} only"
                    )
                    break
                await asyncio.sleep(0.02)
            token.present = True
            cycle[1] = time.monotonic()

    async def _p11kit_client(self, index: int, tokens_file: Path) -> None:
        """A p11-kit-client.so process (bench/soak_p11kit.py); its errors are classified
        here, by the times its session began and the error was seen."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.soak_p11kit",
            "--address",
            f"unix:path={p11kit_socket_path(self.sock)}",
            "--tokens",
            str(tokens_file),
            "--until",
            repr(self.stop_at),
            "--seed",
            str(1850 + index),
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        tally = self.p11kit
        if proc.returncode != 0:
            tally.unexpected.append(
                f"p11-kit client {index} exited with {proc.returncode}: {err.decode()[-500:]}"
            )
            return
        report = json.loads(out)
        for key, n in report["ops"].items():
            tally.ops[key] = tally.ops.get(key, 0) + n
        for key, n in report["per_token"].items():
            tally.per_token[key] = tally.per_token.get(key, 0) + n
        tally.wrong += [f"p11-kit: {w}" for w in report["wrong"]]
        by_name = {t.name: t for t in self.tokens}
        for began, seen, name, kind, message in report["errors"]:
            token = by_name.get(name)
            expected = (
                token.away_during(began, seen)
                if token is not None
                # before the token was identified: any token may have been the one
                else any(t.away_during(began, seen) for t in self.tokens)
            )
            if expected:
                tally.count(tally.expected_errors, kind)
            else:
                tally.unexpected.append(f"p11-kit {name or 'slot'}: {kind}: {message}")

    async def run(self, pid: int, workdir: Path) -> dict[str, object]:
        samples: list[tuple[float, int, int]] = []
        fds_before = fd_count(pid)
        tokens_file = workdir / "soak-tokens.json"
        tokens_file.write_text(
            json.dumps(
                {
                    t.name: {
                        kind: cert.public_bytes(Encoding.PEM).decode()
                        for kind, cert in (
                            ("signing", t.signing),
                            ("encryption", t.encryption),
                            ("authentication", t.authentication),
                        )
                    }
                    for t in self.tokens
                }
            )
        )
        self.stop_at = time.monotonic() + self.seconds
        start = time.monotonic()
        native = self.clients - self.p11kit_clients
        tasks = [asyncio.create_task(self._client(i)) for i in range(native)]
        tasks += [
            asyncio.create_task(self._p11kit_client(i, tokens_file))
            for i in range(self.p11kit_clients)
        ]
        chaos = asyncio.create_task(self._chaos())
        while time.monotonic() < self.stop_at:
            await asyncio.sleep(1.0)
            if time.monotonic() < self.stop_at:  # while the clients are still connected
                samples.append((round(time.monotonic() - start, 1), rss_kib(pid), fd_count(pid)))
        await asyncio.gather(*tasks, chaos)
        await asyncio.sleep(0.5)  # the daemon closes the connections' applications
        fds_after = fd_count(pid)
        warm = [s for s in samples if s[0] >= min(5.0, self.seconds / 3)] or samples
        at_60s = [s for s in samples if s[0] >= 60.0] if self.seconds >= 90 else []
        rss = [s[1] for s in warm]
        fds = [s[2] for s in warm]
        kinds = {"native": self.tally, "p11kit": self.p11kit}
        unexpected = self.tally.unexpected + self.p11kit.unexpected
        wrong = self.tally.wrong + self.p11kit.wrong
        return {
            "seconds": round(time.monotonic() - start, 1),
            "clients": self.clients,
            "clients_by_kind": {"native": native, "p11kit": self.p11kit_clients},
            "tokens": {t.name: t.transport for t in self.tokens},
            # per client kind: native = the daemon's JSON-RPC socket (asyncio, one connection
            # each); p11kit = Debian's p11-kit-client.so in its own process
            "ops": {k: dict(sorted(t.ops.items())) for k, t in kinds.items()},
            "private_key_ops_per_token": {
                t.name: sum(k.per_token.get(t.name, 0) for k in kinds.values()) for t in self.tokens
            },
            "private_key_ops_per_token_by_kind": {
                k: dict(sorted(t.per_token.items())) for k, t in kinds.items()
            },
            "unplugs": self.tally.unplugs,
            "expected_errors": {
                k: dict(sorted(t.expected_errors.items())) for k, t in kinds.items()
            },
            "unexpected_errors": unexpected[:50],
            "unexpected_count": len(unexpected),
            "wrong_results": wrong[:50],
            "wrong_count": len(wrong),
            "rss_kib": {
                "start": rss[0],
                # the first sample after 60 s: the reference of the RSS-flat verdict
                **({"at_60s": at_60s[0][1]} if at_60s else {}),
                "end": rss[-1],
                "peak": max(rss),
            },
            # every 30 s (a tenth of a shorter run): (seconds, RSS KiB, fds), to tell a
            # plateau from a slow leak
            "trajectory": _every(samples, 30.0 if self.seconds >= 150 else self.seconds / 10),
            "fds": {
                "before_clients": fds_before,
                "start": fds[0],
                "end": fds[-1],
                "peak": max(fds),
                "after_clients": fds_after,
            },
        }


def _every(samples: list[tuple[float, int, int]], step: float) -> list[list[float | int]]:
    """The first sample at or after each multiple of ``step`` seconds, and the last one."""
    out: list[list[float | int]] = []
    mark = 0.0
    for sample in samples:
        if sample[0] >= mark:
            out.append(list(sample))
            mark = (sample[0] // step + 1) * step
    if samples and out[-1] != list(samples[-1]):
        out.append(list(samples[-1]))
    return out


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _control(path: Path, line: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode().strip()


def verdicts(result: dict) -> dict[str, bool]:  # type: ignore[type-arg]
    rss, fds = result["rss_kib"], result["fds"]
    return {
        "0 wrong results": result["wrong_count"] == 0,
        "0 unexpected errors": result["unexpected_count"] == 0,
        # After the first minute's warm-up (pools, caches, allocator arenas fill), the end
        # is within 2 MiB of the RSS at 60 s: the leak this soak found (about 1 MiB a
        # minute) would exceed it within three minutes. Runs under 90 s have no 60 s
        # reference: then the loose start-based bound only catches gross growth.
        "RSS flat": rss["end"] <= rss["at_60s"] + RSS_AFTER_60S_KIB
        if "at_60s" in rss
        else rss["end"] <= rss["start"] * 1.10 + 10 * 1024,
        "fds flat": fds["end"] <= fds["start"] + 4,
        "fds back after clients": fds["after_clients"] <= fds["before_clients"] + 2,
        "every operation ran": all(
            ops.get(k, 0) > 0
            for kind, ops in result["ops"].items()
            if result["clients_by_kind"][kind]
            for k in ("decrypt", "sign")
        ),
        "every token served": all(
            result["private_key_ops_per_token"].get(name, 0) > 0 for name in result["tokens"]
        ),
    }


def table(result: dict) -> str:  # type: ignore[type-arg]
    """The figures of a run as the plain-text table docs/reliability.md §3 quotes."""

    def mib(kib: int) -> str:
        return f"{kib / 1024:.1f}"

    kinds = [k for k, n in result["clients_by_kind"].items() if n]
    rows = [("duration, clients", f"{result['seconds']:g} s, {result['clients']} clients")]
    for kind in kinds:
        ops = result["ops"][kind]
        rows.append(
            (
                f"{kind} clients ({result['clients_by_kind'][kind]}): operations",
                ", ".join(f"{n} {k}" for k, n in ops.items()),
            )
        )
    for kind in kinds:
        per = result["private_key_ops_per_token_by_kind"][kind]
        rows.append(
            (
                f"{kind}: private-key operations per token",
                ", ".join(f"{t} ({result['tokens'][t]}) {per.get(t, 0)}" for t in result["tokens"]),
            )
        )
    rows.append(("unplug/replug cycles", str(result["unplugs"])))
    for kind in kinds:
        errs = result["expected_errors"][kind]
        rows.append(
            (f"{kind}: expected errors", ", ".join(f"{n} {k}" for k, n in errs.items()) or "0")
        )
    rows += [
        ("wrong results", str(result["wrong_count"])),
        ("unexpected errors", str(result["unexpected_count"])),
    ]
    rss, fds = result["rss_kib"], result["fds"]
    rows.append(
        (
            "daemon RSS start / at 60 s / end / peak (MiB)",
            " / ".join(mib(rss[k]) for k in ("start", "at_60s", "end", "peak") if k in rss),
        )
    )
    rows.append(
        ("daemon RSS every ~30 s (MiB)", ", ".join(mib(x[1]) for x in result["trajectory"]))
    )
    rows.append(
        (
            "daemon fds before clients / start / end / peak / after clients",
            " / ".join(
                str(fds[k]) for k in ("before_clients", "start", "end", "peak", "after_clients")
            ),
        )
    )
    rows += [(f"verdict: {k}", "pass" if ok else "FAIL") for k, ok in result["verdicts"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(
    seconds: float,
    clients: int,
    transports: tuple[str, ...],
    p11kit_clients: int = 0,
    *,
    tidy: bool = False,
    trace: Path | None = None,
    unplug: bool = True,
    daemon_log: Path | None = None,
) -> dict:  # type: ignore[type-arg]
    from tokend.client import Client

    workdir = short_tempdir("tokend-soak-")
    sock, ctl, exports = workdir / "tokend.sock", workdir / "control.sock", workdir / "export"
    simulate = [t for t in transports if t in ("memory", "usb")]
    entry = ["bench.soak_trace", str(trace.resolve())] if trace else ["tokend.cli.tokend_main"]
    args = [sys.executable, "-m", *entry, "serve", "--socket", str(sock)]
    for kind in simulate:
        args += ["--simulate", "piv" if kind == "memory" else "usb"]
    if simulate:
        args += ["--simulate-control", str(ctl), "--export-dir", str(exports)]
    args += ["--allow-virtual-readers"] if "pcsc" in transports else ["--no-pcsc"]
    with contextlib.ExitStack() as stack:
        tokens: list[Token] = []
        if "pcsc" in transports:
            from tokend.simulators.demo import provision_demo
            from tokend.simulators.pcscd import PcscdService, wait_present
            from tokend.simulators.piv import VirtualPivCard
            from tokend.simulators.vpcd import VpcdCardConnection

            service = stack.enter_context(PcscdService())
            entry = stack.enter_context(service.lease())
            card = VirtualPivCard()
            provision_demo(card, workdir / "pcsc0", key_agreement=True)
            conn = VpcdCardConnection(card, port=entry.port(0))
            conn.plug()
            stack.callback(conn.unplug)
            wait_present(entry.reader_names[0], timeout=10)

            def pcsc_plug(conn=conn, reader=entry.reader_names[0]) -> None:  # type: ignore[no-untyped-def]
                conn.plug()
                wait_present(reader, timeout=10)

            tokens.append(
                Token(
                    "pcsc0",
                    "pcsc",
                    _load(workdir / "pcsc0" / "encryption.pem"),
                    _load(workdir / "pcsc0" / "signing.pem"),
                    _load(workdir / "pcsc0" / "authentication.pem"),
                    pcsc_plug,
                    conn.unplug,
                )
            )
        log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - closed by the stack
        stack.callback(log.close)
        proc = subprocess.Popen(
            args, cwd=REPO, env=child_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )

        def stop_daemon() -> None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        stack.callback(stop_daemon)
        wait_for_socket(sock, proc, 60)
        for i, kind in enumerate(simulate):
            name = f"{'piv' if kind == 'memory' else 'usb'}{sum(k == kind for k in simulate[:i])}"
            folder = exports / name if len(simulate) > 1 else exports
            tokens.append(
                Token(
                    name,
                    kind,
                    _load(folder / "encryption.pem"),
                    _load(folder / "signing.pem"),
                    _load(folder / "authentication.pem"),
                    lambda n=name: _control(ctl, f"plug {n}"),
                    lambda n=name: _control(ctl, f"unplug {n}"),
                )
            )
        deadline = time.monotonic() + 60
        with Client(sock) as c:
            while len(c.slot_list(token_present=True)) < len(tokens):
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not list every soak token")
                time.sleep(0.05)
        soak = Soak(tokens, sock, seconds, clients, p11kit_clients)
        soak.tidy, soak.unplug = tidy, unplug
        result = asyncio.run(soak.run(proc.pid, workdir))
        result["daemon_alive"] = proc.poll() is None
        result["verdicts"] = verdicts(result)
        result["verdicts"]["daemon alive"] = result["daemon_alive"]
    import shutil

    if daemon_log is not None:
        shutil.copyfile(workdir / "daemon.log", daemon_log)
    with contextlib.suppress(OSError):
        shutil.rmtree(workdir)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 300)))
    parser.add_argument("--clients", type=int, default=int(os.environ.get("SOAK_CLIENTS", 64)))
    parser.add_argument(
        "--transports",
        default=os.environ.get("SOAK_TRANSPORTS", ",".join(TRANSPORTS)),
        help="comma-separated: memory, usb, pcsc (default all three)",
    )
    parser.add_argument(
        "--p11kit-clients",
        type=int,
        default=int(os.environ.get("SOAK_P11KIT_CLIENTS", 8)),
        help="of the clients, how many are PKCS#11 programs loading Debian's p11-kit-client.so "
        "(one process each) talking to the daemon's p11-kit front end (default 8)",
    )
    parser.add_argument(
        "--tidy",
        action="store_true",
        help="native clients close a session that failed (default: they leave it, like a "
        "sloppy program)",
    )
    parser.add_argument(
        "--no-unplug",
        action="store_true",
        help="debugging: unplug nothing (tells growth per operation from growth per unplug)",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        help="debugging: run the daemon under bench/soak_trace.py, appending memory samples "
        "(object counts; the Python heap too with SOAK_TRACEMALLOC=1) to this file",
    )
    parser.add_argument("--daemon-log", type=Path, help="keep the daemon's log here")
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    transports = tuple(t for t in args.transports.split(",") if t)
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad:
        parser.error(f"unknown transport(s) {', '.join(bad)}; known: {', '.join(TRANSPORTS)}")
    print(
        f"soak: {args.clients} clients, {args.seconds:g} s, tokens over {', '.join(transports)}",
        flush=True,
    )
    result = run(
        args.seconds,
        args.clients,
        transports,
        args.p11kit_clients,
        tidy=args.tidy,
        trace=args.trace,
        unplug=not args.no_unplug,
        daemon_log=args.daemon_log,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print(table(result))
    failed = [k for k, ok in result["verdicts"].items() if not ok]
    print("soak: " + ("PASS" if not failed else "FAIL: " + ", ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
