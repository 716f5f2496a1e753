"""Row (c) of item 1, in its own process: the same two operations (a) in-process through
the driver, (b) through tokend's native socket and (c) through Debian's p11-kit-client.so
(python-pkcs11) to tokend's p11-kit front end of the same daemon, interleaved. A child
process because p11-kit-client.so reads P11_KIT_SERVER_ADDRESS once per process and
python-pkcs11 loads one module per process (the SoftHSM section loads the same client for
p11-kit's own server).

    python -m bench.p11kit_client --socket S --address unix:path=… --cert-dir DIR \
        --rounds R --per-round N

Prints one JSON object: per operation the per-call durations (seconds) of (a), (b) and (c)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench.common import PIN, interleave
from bench.ops import (
    DIGEST,
    ID_9D,
    check_decrypt,
    check_sign,
    in_process_card,
    load_cert,
    rsa_blob,
    socket_session,
)

P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
ID_9A = b"\x01"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.p11kit_client")
    parser.add_argument("--socket", type=Path, required=True, help="the native socket")
    parser.add_argument("--address", required=True, help="the p11-kit front end")
    parser.add_argument("--cert-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--per-round", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ["P11_KIT_SERVER_ADDRESS"] = args.address
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    lib = pkcs11.lib(P11KIT_CLIENT)
    session = lib.get_slots(token_present=True)[0].get_token().open(user_pin=PIN)

    def key(cka_id: bytes):  # type: ignore[no-untyped-def]
        return session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cka_id)

    k9d, k9a = key(ID_9D), key(ID_9A)
    blob = rsa_blob(load_cert(args.cert_dir / "encryption.pem").public_key())  # type: ignore[arg-type]
    auth_public = load_cert(args.cert_dir / "authentication.pem").public_key()

    def decrypt() -> bytes:
        # python-pkcs11: C_DecryptInit, a size query (no card operation), C_Decrypt.
        return k9d.decrypt(blob.ciphertext, mechanism=Mechanism.RSA_PKCS)

    def sign_once() -> bytes:
        return k9a.sign(DIGEST, mechanism=Mechanism.ECDSA)

    check_decrypt(decrypt(), blob)
    check_sign(sign_once(), auth_public)  # type: ignore[arg-type]
    local = in_process_card()
    native = socket_session(args.socket, 0, args.cert_dir)
    try:
        for _ in range(2 * args.per_round):
            local.decrypt(), native.decrypt(), decrypt()
            local.sign_once(), native.sign_once(), sign_once()
        out = {}
        for op, runners in (
            ("decrypt", [local.decrypt, native.decrypt, decrypt]),
            ("sign_once", [local.sign_once, native.sign_once, sign_once]),
        ):
            a, b, c = interleave(args.rounds, args.per_round, runners)
            out[op] = {"a": a, "b": b, "c": c}
    finally:
        native.close()
        local.close()
        session.close()
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
