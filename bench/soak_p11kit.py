"""One p11-kit client of `make soak` (bench/soak.py), in its own process: python-pkcs11
loading Debian's unmodified p11-kit-client.so (package p11-kit-modules), pointed at the
daemon's p11-kit front end by P11_KIT_SERVER_ADDRESS. A process per client because the C
module reads the address once per process and keeps one connection.

    python -m bench.soak_p11kit --address unix:path=… --tokens FILE --until T --seed N

It loops until the monotonic clock (system-wide, so the parent's) reaches ``--until``:
10 % C_GetSlotList, else a session on a random present token — C_OpenSession + C_Login,
identify the token by its 9C certificate, 1 to 3 RSA decryptions with 9D (PKCS#1 v1.5,
checked against the secret), half the time an ECDSA signature with 9A (verified against
that token's 9A certificate), then C_Logout + C_CloseSession. A session that fails is left
as it is (like a sloppy program): the daemon must still answer correctly.

Prints one JSON object: op counts, private-key ops per token, wrong results, and every
error with the monotonic times its session began and it was seen; the parent classifies
errors as expected (the token was away at some point in between) or not, the same way it
does for its native clients.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
PIN = "123456"
ID_9A, ID_9C, ID_9D = b"\x01", b"\x02", b"\x03"
DIGEST = hashlib.sha256(b"tokend soak p11-kit").digest()


def _count(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1


def _kind(exc: Exception) -> str:
    """The error's class; python-pkcs11 raises its base class for the return codes it has
    no class for (CKR_BUFFER_TOO_SMALL …), so then its message tells which."""
    name = type(exc).__name__
    return f"{name}: {exc}" if name == "PKCS11Error" else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_p11kit")
    parser.add_argument("--address", required=True, help="the p11-kit front end (unix:path=…)")
    parser.add_argument(
        "--tokens",
        type=Path,
        required=True,
        help="JSON: token name -> PEM of its signing (9C), encryption (9D), auth (9A) certs",
    )
    parser.add_argument("--until", type=float, required=True, help="time.monotonic() to stop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ["P11_KIT_SERVER_ADDRESS"] = args.address
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    certs = {
        name: {k: x509.load_pem_x509_certificate(v.encode()) for k, v in pems.items()}
        for name, pems in json.loads(args.tokens.read_text()).items()
    }
    by_signing = {
        hashlib.sha256(c["signing"].tbs_certificate_bytes).digest(): n for n, c in certs.items()
    }
    rng = random.Random(args.seed)
    ops: dict[str, int] = {}
    per_token: dict[str, int] = {}
    wrong: list[str] = []
    errors: list[list[object]] = []  # [began, seen, token or None, error type, message]
    lib = pkcs11.lib(CLIENT)
    print("ready", file=sys.stderr, flush=True)

    def slot_list(token_present: bool) -> list | None:  # type: ignore[type-arg]
        began = time.monotonic()
        try:
            slots = lib.get_slots(token_present=token_present)
        except pkcs11.PKCS11Error as exc:
            # python-pkcs11 asks for the count, then the list: a token that arrives in
            # between makes the second call CKR_BUFFER_TOO_SMALL (PKCS#11 §5.5).
            errors.append([began, time.monotonic(), None, _kind(exc), str(exc)[:200]])
            return None
        _count(ops, "list")
        return slots

    def session_work() -> None:
        slots = slot_list(True)
        if not slots:
            time.sleep(0.01)
            return
        slot = rng.choice(slots)
        began = time.monotonic()
        name: str | None = None
        try:
            session = slot.get_token().open(user_pin=PIN)
            _count(ops, "login")
            (cert,) = session.get_objects(
                {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.ID: ID_9C}
            )
            value = x509.load_der_x509_certificate(cert[Attribute.VALUE])
            name = by_signing.get(hashlib.sha256(value.tbs_certificate_bytes).digest())
            if name is None:
                wrong.append("a slot answered with a certificate of no soak token")
                return
            mine = certs[name]
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ID_9D)
            for _ in range(rng.randint(1, 3)):
                secret = os.urandom(32)
                blob = mine["encryption"].public_key().encrypt(secret, padding.PKCS1v15())  # type: ignore[union-attr]
                out = key.decrypt(blob, mechanism=Mechanism.RSA_PKCS)
                _count(ops, "decrypt")
                _count(per_token, name)
                if out != secret:
                    wrong.append(f"decrypt on {name}: wrong plaintext")
            if rng.random() < 0.5:
                sign_key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ID_9A)
                sig = sign_key.sign(DIGEST, mechanism=Mechanism.ECDSA)
                _count(ops, "sign")
                _count(per_token, name)
                half = len(sig) // 2
                der = encode_dss_signature(
                    int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
                )
                try:
                    mine["authentication"].public_key().verify(  # type: ignore[call-arg]
                        der,
                        DIGEST,
                        ec.ECDSA(Prehashed(hashes.SHA256())),  # type: ignore[call-arg]
                    )
                except Exception:
                    wrong.append(f"sign on {name}: signature does not verify")
            session.close()  # C_Logout + C_CloseSession
            _count(ops, "logout")
        except Exception as exc:  # classified by the parent, by time
            errors.append([began, time.monotonic(), name, _kind(exc), str(exc)[:200]])

    while time.monotonic() < args.until:
        if rng.random() < 0.1:
            slot_list(False)
        else:
            session_work()
    json.dump(
        {
            "ops": dict(sorted(ops.items())),
            "per_token": per_token,
            "wrong": wrong,
            "errors": errors,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
