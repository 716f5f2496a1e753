"""A PKCS#11 consumer for the p11-kit front end tests: python-pkcs11 loading Debian's
unmodified p11-kit-client.so, run as its own process (the client reads
P11_KIT_SERVER_ADDRESS once per process, and a crash must show as a dead process).

    python -m tests.p11kit_consumer basic       # prints one JSON line of results
    python -m tests.p11kit_consumer unplug      # line protocol on stdin/stdout
    python -m tests.p11kit_consumer hold        # logs in, then decrypts the hex lines given
"""

from __future__ import annotations

import hashlib
import json
import sys

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from pkcs11 import MGF, Attribute, Mechanism, ObjectClass

CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
PIN = "123456"


def _cert(session, label_part: str):  # type: ignore[no-untyped-def]
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE}):
        if label_part in obj[Attribute.LABEL]:
            return obj
    raise LookupError(label_part)


def _key_for(session, cert):  # type: ignore[no-untyped-def]
    """The private key whose CKA_ID is the certificate's (how mail clients pair them)."""
    return session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=cert[Attribute.ID])


def _public(cert):  # type: ignore[no-untyped-def]
    return x509.load_der_x509_certificate(cert[Attribute.VALUE]).public_key()


def _slots(lib) -> str:  # type: ignore[no-untyped-def]
    """How many slots hold a token; "slots changing" when a token left between the two
    C_GetSlotList calls of python-pkcs11's get_slots (0.10.1 ignores the smaller count the
    second call returns and asks C_GetSlotInfo for an unset id: CKR_SLOT_ID_INVALID). The
    test polls again."""
    try:
        return f"slots {len(lib.get_slots(token_present=True))}"
    except pkcs11.SlotIDInvalid:
        return "slots changing"


def basic() -> dict[str, object]:
    lib = pkcs11.lib(CLIENT)
    out: dict[str, object] = {"manufacturer": lib.manufacturer_id.strip()}
    slots = lib.get_slots(token_present=True)
    out["slots"] = len(slots)
    token = slots[0].get_token()
    out["label"] = token.label
    with token.open(user_pin=PIN) as session:
        enc = _cert(session, "(9D)")
        key = _key_for(session, enc)
        pub = _public(enc)
        ct = pub.encrypt(b"key transport v1.5", padding.PKCS1v15())
        out["decrypt_v15"] = key.decrypt(ct, mechanism=Mechanism.RSA_PKCS).decode()
        for name, h, mgf, mech in (
            ("sha1", hashes.SHA1(), MGF.SHA1, Mechanism.SHA_1),
            ("sha256", hashes.SHA256(), MGF.SHA256, Mechanism.SHA256),
        ):
            ct = pub.encrypt(
                f"oaep {name}".encode(),
                padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None),
            )
            plain = key.decrypt(
                ct, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=(mech, mgf, None)
            )
            out[f"decrypt_oaep_{name}"] = plain.decode()

        rsa_cert = _cert(session, "(9E)")
        rsa_key = _key_for(session, rsa_cert)
        sig = rsa_key.sign(b"signed by RSA", mechanism=Mechanism.SHA256_RSA_PKCS)
        _public(rsa_cert).verify(sig, b"signed by RSA", padding.PKCS1v15(), hashes.SHA256())
        out["sign_rsa"] = len(sig)

        ec_cert = _cert(session, "(9A)")
        ec_key = _key_for(session, ec_cert)
        digest = hashlib.sha256(b"signed by ECDSA").digest()
        sig = ec_key.sign(digest, mechanism=Mechanism.ECDSA)
        half = len(sig) // 2
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
        )
        _public(ec_cert).verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        out["sign_ecdsa"] = len(sig)
    return out


def unplug() -> None:
    """Hold a logged-in session; on each command line from the test, try a decryption and
    report the outcome. ``relogin`` opens a new session and logs in again."""
    lib = pkcs11.lib(CLIENT)
    session = lib.get_slots(token_present=True)[0].get_token().open(user_pin=PIN)

    def attempt() -> str:
        try:
            enc = _cert(session, "(9D)")
            key = _key_for(session, enc)
            ct = _public(enc).encrypt(b"still here", padding.PKCS1v15())
            return "ok " + key.decrypt(ct, mechanism=Mechanism.RSA_PKCS).decode()
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
                session = lib.get_slots(token_present=True)[0].get_token().open(user_pin=PIN)
                print("ok relogin", flush=True)
            except pkcs11.PKCS11Error as exc:
                print("error " + type(exc).__name__, flush=True)
        elif cmd == "quit":
            break


def hold() -> None:
    """Log in and find the 9D key, say ``ready``; then for each line of hex ciphertext
    from the test, decrypt it (PKCS#1 v1.5) and answer ``ok HEX`` or ``error NAME``. The
    fault tests pull the token, or kill this process, while such a decryption is at the
    card."""
    lib = pkcs11.lib(CLIENT)
    session = lib.get_slots(token_present=True)[0].get_token().open(user_pin=PIN)
    key = _key_for(session, _cert(session, "(9D)"))
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            plain = key.decrypt(bytes.fromhex(line.strip()), mechanism=Mechanism.RSA_PKCS)
            print("ok " + plain.hex(), flush=True)
        except pkcs11.PKCS11Error as exc:
            print("error " + type(exc).__name__, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "basic":
        print(json.dumps(basic()), flush=True)
    elif sys.argv[1] == "hold":
        hold()
    else:
        unplug()
