"""`make soak`: many clients mixing list / login / decrypt / sign / logout while tokens are
unplugged and plugged again, for a fixed time, against one `tokend serve` child process.

    python -m bench.soak [--seconds 300] [--clients 64] [--transports memory,usb,pcsc]
                         [--json FILE]

Tokens: ``memory`` = a virtual PIV card in the daemon's in-process reader (``--simulate
piv``), ``usb`` = a virtual CCID token on the simulated USB bus driven through pyusb and the
CCID driver (``--simulate usb``) — both plugged through ``--simulate-control`` —, and
``pcsc`` = a virtual PIV card behind the real pcscd + vpcd (a vpcd lease is held for the
run). A chaos task unplugs one token at a time for 0.2 to 1 s.

Verdicts: **wrong results** (a plaintext or signature that does not match the token's own
certificate, a token answering with another token's certificate) must be 0; **unexpected
errors** — any error on a token that was not unplugged since the session was opened —
must be 0; the daemon's RSS and open fds are sampled each second: start (after warm-up),
end, peak; "flat" = end RSS within 10 MiB + 10 % of start and end fds within 4 of start;
once every client has gone, the fds return to what they were before the clients came.
Exit status 1 on any failed verdict. It stops by itself.
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

PIN = "123456"
ID_9C, ID_9D = b"\x02", b"\x03"
DIGEST = hashlib.sha256(b"tokend soak").digest()
TRANSPORTS = ("memory", "usb", "pcsc")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Token:
    """One virtual token: how to plug/unplug it and the certificates it must answer with."""

    name: str
    transport: str
    encryption: x509.Certificate
    signing: x509.Certificate
    plug: object = None
    unplug: object = None
    epoch: int = 0  # incremented at every unplug
    present: bool = True


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
    def __init__(self, tokens: list[Token], sock: Path, seconds: float, clients: int) -> None:
        self.tokens = tokens
        # The demo encryption key is imported (the same on every demo token); the signing key is
        # generated on each token, so its certificate tells the tokens apart.
        self.by_cert = {t.signing.public_bytes(Encoding.DER): t for t in tokens}
        self.sock = sock
        self.seconds = seconds
        self.clients = clients
        self.tally = Tally()
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
        try:
            session = await client.open_session(slot)
            token = await self._identify(client, session)
            if epochs[token.name] != token.epoch:
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
        rng = random.Random(180)
        while time.monotonic() < self.stop_at - 1.5:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            token = rng.choice(self.tokens)
            token.epoch += 1
            token.present = False
            await asyncio.to_thread(token.unplug)  # type: ignore[arg-type]
            self.tally.unplugs += 1
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await asyncio.to_thread(token.plug)  # type: ignore[arg-type]
            token.present = True

    async def run(self, pid: int) -> dict[str, object]:
        samples: list[tuple[float, int, int]] = []
        fds_before = fd_count(pid)
        self.stop_at = time.monotonic() + self.seconds
        start = time.monotonic()
        tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        chaos = asyncio.create_task(self._chaos())
        while time.monotonic() < self.stop_at:
            await asyncio.sleep(1.0)
            if time.monotonic() < self.stop_at:  # while the clients are still connected
                samples.append((round(time.monotonic() - start, 1), rss_kib(pid), fd_count(pid)))
        await asyncio.gather(*tasks, chaos)
        await asyncio.sleep(0.5)  # the daemon closes the connections' applications
        fds_after = fd_count(pid)
        warm = [s for s in samples if s[0] >= min(5.0, self.seconds / 3)] or samples
        rss = [s[1] for s in warm]
        fds = [s[2] for s in warm]
        return {
            "seconds": round(time.monotonic() - start, 1),
            "clients": self.clients,
            "tokens": {t.name: t.transport for t in self.tokens},
            "ops": dict(sorted(self.tally.ops.items())),
            "private_key_ops_per_token": dict(sorted(self.tally.per_token.items())),
            "unplugs": self.tally.unplugs,
            "expected_errors": dict(sorted(self.tally.expected_errors.items())),
            "unexpected_errors": self.tally.unexpected[:50],
            "unexpected_count": len(self.tally.unexpected),
            "wrong_results": self.tally.wrong[:50],
            "wrong_count": len(self.tally.wrong),
            "rss_kib": {"start": rss[0], "end": rss[-1], "peak": max(rss)},
            # every ~30 s: (seconds, RSS KiB, fds), to tell a plateau from a slow leak
            "trajectory": [list(x) for x in samples[:: max(1, len(samples) // 10)]]
            + [list(samples[-1])]
            if samples
            else [],
            "fds": {
                "before_clients": fds_before,
                "start": fds[0],
                "end": fds[-1],
                "peak": max(fds),
                "after_clients": fds_after,
            },
        }


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
        "RSS flat": rss["end"] <= rss["start"] * 1.10 + 10 * 1024,
        "fds flat": fds["end"] <= fds["start"] + 4,
        "fds back after clients": fds["after_clients"] <= fds["before_clients"] + 2,
        "every operation ran": all(result["ops"].get(k, 0) > 0 for k in ("decrypt", "sign")),
        "every token served": all(
            result["private_key_ops_per_token"].get(name, 0) > 0 for name in result["tokens"]
        ),
    }


def run(seconds: float, clients: int, transports: tuple[str, ...]) -> dict:  # type: ignore[type-arg]
    from tokend.client import Client

    workdir = short_tempdir("tokend-soak-")
    sock, ctl, exports = workdir / "tokend.sock", workdir / "control.sock", workdir / "export"
    simulate = [t for t in transports if t in ("memory", "usb")]
    args = [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--socket", str(sock)]
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
        soak = Soak(tokens, sock, seconds, clients)
        result = asyncio.run(soak.run(proc.pid))
        result["daemon_alive"] = proc.poll() is None
        result["verdicts"] = verdicts(result)
        result["verdicts"]["daemon alive"] = result["daemon_alive"]
    with contextlib.suppress(OSError):
        import shutil

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
    result = run(args.seconds, args.clients, transports)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    failed = [k for k, ok in result["verdicts"].items() if not ok]
    print("soak: " + ("PASS" if not failed else "FAIL: " + ", ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
