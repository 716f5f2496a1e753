"""A PKCS#11 consumer for any token behind tokend's p11-kit front end: python-pkcs11 loading
Debian's unmodified p11-kit-client.so, run as its own process (the client reads
P11_KIT_SERVER_ADDRESS once per process, and a crash must show as a dead process). The
token's PIN and key labels come on the command line, so the SIM, the BLE key and the PIV
card run the same checks.

    python -m tests.p11kit_token_consumer basic --pin P --decrypt LABEL --sign LABEL ...
        one JSON line: what was listed, decrypted and signed (signatures verified here)
    python -m tests.p11kit_token_consumer hold --pin P --decrypt LABEL
        line protocol on stdin/stdout: decrypt | slots | relogin | quit
    python -m tests.p11kit_token_consumer protected --decrypt LABEL
        log in with no PIN (the protected authentication path), then decrypt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import MGF, PROTECTED_AUTH, Attribute, Mechanism, ObjectClass, TokenFlag

# The shared pieces of the PIV consumer (it runs with the repository on sys.path, -m).
from tests.p11kit_consumer import CLIENT, _cert, _key_for, _public, _slots


def _decrypt(session, label: str, message: bytes, oaep: bool = False) -> bytes:  # type: ignore[no-untyped-def]
    cert = _cert(session, label)
    key = _key_for(session, cert)
    if not oaep:
        ct = _public(cert).encrypt(message, padding.PKCS1v15())
        return bytes(key.decrypt(ct, mechanism=Mechanism.RSA_PKCS))
    sha256 = hashes.SHA256()
    ct = _public(cert).encrypt(
        message, padding.OAEP(mgf=padding.MGF1(sha256), algorithm=sha256, label=None)
    )
    return bytes(
        key.decrypt(
            ct,
            mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=(Mechanism.SHA256, MGF.SHA256, None),
        )
    )


def _sign_and_verify(session, label: str) -> int:  # type: ignore[no-untyped-def]
    """Sign with the key behind ``label`` (RSA: SHA256-RSA-PKCS; EC: ECDSA over a SHA-256
    digest) and verify with its certificate; returns the signature length."""
    cert = _cert(session, label)
    key = _key_for(session, cert)
    public = _public(cert)
    data = f"signed with {label}".encode()
    if isinstance(public, rsa.RSAPublicKey):
        sig = key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        public.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        return len(sig)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    digest = hashlib.sha256(data).digest()
    sig = key.sign(digest, mechanism=Mechanism.ECDSA)
    half = len(sig) // 2
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
    )
    public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    return len(sig)


def _token(lib):  # type: ignore[no-untyped-def]
    return lib.get_slots(token_present=True)[0].get_token()


def basic(args: argparse.Namespace) -> dict[str, object]:
    lib = pkcs11.lib(CLIENT)
    slots = lib.get_slots(token_present=True)
    token = slots[0].get_token()
    out: dict[str, object] = {
        "manufacturer": lib.manufacturer_id.strip(),
        "slots": len(slots),
        "label": token.label,
        "serial": token.serial.decode(errors="replace").strip(),
    }
    with token.open(user_pin=args.pin) as session:
        out["decrypt_v15"] = _decrypt(session, args.decrypt, b"key transport v1.5").decode()
        if args.oaep:
            out["decrypt_oaep_sha256"] = _decrypt(
                session, args.decrypt, b"oaep sha256", oaep=True
            ).decode()
        out["signatures"] = {label: _sign_and_verify(session, label) for label in args.sign}
    return out


def hold(args: argparse.Namespace) -> None:
    """Hold a logged-in session; on each command line from the test, try a decryption and
    report the outcome. ``relogin`` opens a new session and logs in again."""
    lib = pkcs11.lib(CLIENT)
    session = _token(lib).open(user_pin=args.pin)

    def attempt() -> str:
        try:
            return "ok " + _decrypt(session, args.decrypt, b"still here").decode()
        except pkcs11.PKCS11Error as exc:
            return "error " + type(exc).__name__

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "decrypt":
            print(attempt(), flush=True)
        elif cmd == "slots":
            print(_slots(lib), flush=True)
        elif cmd == "relogin":
            try:
                session = _token(lib).open(user_pin=args.pin)
                print("ok relogin", flush=True)
            except pkcs11.PKCS11Error as exc:
                print("error " + type(exc).__name__, flush=True)
        elif cmd == "quit":
            break


def protected(args: argparse.Namespace) -> None:
    """C_Login with a NULL PIN, as a program does when the token advertises a protected
    authentication path: whoever owns that path (tokend's pinentry) asks for the PIN."""
    lib = pkcs11.lib(CLIENT)
    token = _token(lib)
    print(f"flags protected={bool(token.flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH)}")
    print("logging in", flush=True)
    try:
        session = token.open(user_pin=PROTECTED_AUTH)
    except pkcs11.PKCS11Error as exc:
        print("error " + type(exc).__name__, flush=True)
        # Not logged in: the private key stays out of reach for this program.
        with token.open() as public:
            keys = list(public.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        print(f"private keys visible {len(keys)}", flush=True)
        return
    with session:
        print("ok " + _decrypt(session, args.decrypt, b"behind the prompt").decode(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("basic", "hold", "protected"))
    parser.add_argument("--pin", help="the user PIN (not for protected)")
    parser.add_argument("--decrypt", required=True, help="label part of the decryption cert")
    parser.add_argument("--sign", action="append", default=[], help="label part of a signer")
    parser.add_argument("--oaep", action="store_true", help="also decrypt RSA-OAEP (SHA-256)")
    args = parser.parse_args()
    if args.mode == "basic":
        print(json.dumps(basic(args)), flush=True)
    elif args.mode == "hold":
        hold(args)
    else:
        protected(args)


if __name__ == "__main__":
    main()
