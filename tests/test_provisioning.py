"""Provisioning end to end, as a person at a terminal does it: `tokenctl` (its `main`) talks
to the running daemon through its socket, the daemon drives a virtual PIV card in an
in-process reader, and the real `openssl` makes the PKCS#12 files, encrypts the mail,
checks the CSR, plays the CA and verifies the signature. PINs go through a pipe (--pin-fd),
one per line, as a script would pass them."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.conftest import RunningDaemon, start_daemon, stop_daemon
from tests.helpers import ID_9D, PIN, private_key
from tokend.cli.tokenctl import main
from tokend.client import Client
from tokend.errors import (
    KeyFunctionNotPermittedError,
    KeyHandleInvalidError,
    PinIncorrectError,
    PinLockedError,
    SessionReadOnlyError,
    TemplateInconsistentError,
    UserNotLoggedInError,
)
from tokend.protocol import b64

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

PUK = "12345678"


@pytest.fixture
def blank_piv(sock_path: Path) -> Iterator[RunningDaemon]:
    """The daemon with a factory-fresh virtual PIV card (default PIN, PUK, management key)."""
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    reader = MemoryReader("Memory Reader 0")
    reader.insert(card)
    running = start_daemon(sock_path, [MemoryWatcher(reader)])
    running.extras.update(card=card, reader=reader)
    try:
        yield running
    finally:
        stop_daemon(running)


@dataclass
class Ran:
    rc: int
    out: bytes
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.strip().splitlines()


def ctl(daemon: RunningDaemon, *args: str, secrets: tuple[str, ...] = ()) -> Ran:
    """Run `tokenctl`; every "{fd}" in ``args`` is a pipe carrying ``secrets``, one a line."""
    r, w = os.pipe()
    os.write(w, "".join(f"{s}\n" for s in secrets).encode())
    os.close(w)
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8")
    argv = ["--socket", str(daemon.socket), *(a.replace("{fd}", str(r)) for a in args)]
    try:
        with redirect_stdout(stdout), redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse usage errors
                rc = int(exc.code or 0)
            stdout.flush()
    finally:
        os.close(r)
    return Ran(rc, out.getvalue(), err.getvalue())


def ok(ran: Ran) -> Ran:
    assert ran.rc == 0, ran.err
    return ran


def status(daemon: RunningDaemon) -> dict:
    ran = ok(ctl(daemon, "status", "--json"))
    data = json.loads(ran.out)["status"]
    for s in data["slots"]:  # a day may pass during the test; nothing else may change
        if s["certificate"]:
            s["certificate"].pop("days_left")
    return data


def slots(daemon: RunningDaemon) -> dict[str, dict]:
    return {s["slot"]: s for s in status(daemon)["slots"]}


def openssl(*args: str | Path, cwd: Path, stdin: bytes | None = None) -> str:
    done = subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, input=stdin, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    return (done.stdout + done.stderr).decode(errors="replace")


def make_p12(tmp: Path, name: str, password: str) -> Path:
    """An encryption key and certificate as the key-management service hands them over."""
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.crt", "-subj", f"/CN={name}/emailAddress={name}@example.org",
        "-days", "1186", "-addext", "keyUsage=critical,keyEncipherment", cwd=tmp,
    )  # fmt: skip
    openssl(
        "pkcs12", "-export", "-inkey", f"{name}.key", "-in", f"{name}.crt",
        "-out", f"{name}.p12", "-passout", f"pass:{password}", cwd=tmp,
    )  # fmt: skip
    return tmp / f"{name}.p12"


def encrypt_mail(tmp: Path, cert: str, text: bytes, name: str) -> Path:
    (tmp / f"{name}.txt").write_bytes(text)
    openssl(
        "cms", "-encrypt", "-binary", "-aes256", "-in", f"{name}.txt",
        "-out", f"{name}.p7m", cert, cwd=tmp,
    )  # fmt: skip
    return tmp / f"{name}.p7m"


# --- the encryption story -----------------------------------------------------------------


def test_imported_p12_decrypts_mail_and_renewal_keeps_old_mail_readable(
    blank_piv, tmp_path
) -> None:
    p12_old = make_p12(tmp_path, "enc2024", "first pass")
    ran = ok(
        ctl(
            blank_piv, "import-p12", str(p12_old), "--slot", "encrypt",
            "--password-fd", "{fd}", "--pin-fd", "{fd}", secrets=("first pass", PIN),
        )
    )  # fmt: skip
    assert "slot 9d" in ran.err
    assert slots(blank_piv)["9d"]["certificate"]["subject"] == (
        "emailAddress=enc2024@example.org,CN=enc2024"
    )

    old_mail = encrypt_mail(tmp_path, "enc2024.crt", b"old secret mail\r\n", "old")
    decrypted = ok(
        ctl(blank_piv, "smime-decrypt", str(old_mail), "--pin-fd", "{fd}", secrets=(PIN,))
    )
    assert decrypted.out == b"old secret mail\r\n"
    # `openssl smime` with its default cipher, and CMS with RSA-OAEP in DER: the same key
    openssl(
        "smime", "-encrypt", "-binary", "-in", "old.txt", "-out", "old-smime.msg",
        "enc2024.crt", cwd=tmp_path,
    )  # fmt: skip
    openssl(
        "cms", "-encrypt", "-binary", "-aes128", "-outform", "DER", "-in", "old.txt",
        "-out", "old-oaep.der", "-recip", "enc2024.crt", "-keyopt", "rsa_padding_mode:oaep",
        "-keyopt", "rsa_oaep_md:sha256", cwd=tmp_path,
    )  # fmt: skip
    old_mails = [old_mail, tmp_path / "old-smime.msg", tmp_path / "old-oaep.der"]
    for mail in old_mails[1:]:
        ran = ok(ctl(blank_piv, "smime-decrypt", str(mail), "--pin-fd", "{fd}", secrets=(PIN,)))
        assert ran.out == b"old secret mail\r\n"

    p12_new = make_p12(tmp_path, "enc2027", "second pass")
    ran = ok(
        ctl(
            blank_piv, "renew-encryption", str(p12_new), "--password-fd", "{fd}",
            "--pin-fd", "{fd}", secrets=("second pass", PIN),
        )
    )  # fmt: skip
    assert "retired slot 82" in ran.err
    new_mail = encrypt_mail(tmp_path, "enc2027.crt", b"new secret mail\r\n", "new")
    expected = [(m, b"old secret mail\r\n") for m in old_mails]
    for mail, text in [*expected, (new_mail, b"new secret mail\r\n")]:
        ran = ok(ctl(blank_piv, "smime-decrypt", str(mail), "--pin-fd", "{fd}", secrets=(PIN,)))
        assert ran.out == text

    after = slots(blank_piv)
    assert "enc2027" in after["9d"]["certificate"]["subject"]
    assert "enc2024" in after["82"]["certificate"]["subject"]
    assert after["82"]["role"] == "retired" and after["82"]["usage"] == ["decrypt"]
    text = ok(ctl(blank_piv, "status")).out.decode()
    assert "retired keys (decrypt only)" in text and "82 retired" in text

    # The old key stays decrypt-only: the daemon refuses to sign with it.
    with Client(blank_piv.socket) as client:
        session = client.open_session(0)
        client.login(session, PIN)
        old_key = private_key(client, session, b"\x05")
        with pytest.raises(KeyFunctionNotPermittedError):
            client.sign(session, old_key, "CKM_SHA256_RSA_PKCS", b"mail")


def test_renewal_invalidates_the_old_handle(memory_piv, tmp_path) -> None:
    """A mail client holding the 9D handle from before the renewal must not silently use
    the new key through it."""
    p12 = make_p12(tmp_path, "next", "pw")
    with Client(memory_piv.socket) as client:
        session = client.open_session(0)
        client.login(session, PIN)
        before = private_key(client, session, ID_9D)
        ok(
            ctl(
                memory_piv, "renew-encryption", str(p12), "--password-fd", "{fd}",
                "--pin-fd", "{fd}", secrets=("pw", PIN),
            )
        )  # fmt: skip
        with pytest.raises(KeyHandleInvalidError):
            client.decrypt(session, before, "CKM_RSA_PKCS", b"\x00" * 256)
        assert private_key(client, session, ID_9D) != before
    # the demo already had a retired key in 82: the old 9D key went to the next free slot
    assert "83" in slots(memory_piv)


# --- the signing story --------------------------------------------------------------------


def test_generated_key_csr_certificate_and_signature_verify_with_openssl(
    blank_piv, tmp_path
) -> None:
    ran = ok(
        ctl(
            blank_piv, "keys", "generate", "--slot", "sign", "--alg", "p256",
            "--pin-fd", "{fd}", secrets=(PIN,),
        )
    )  # fmt: skip
    assert ran.out.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "generating p256 key in slot 9c done in" in ran.err  # no tty: one progress line
    generated = slots(blank_piv)["9c"]
    assert generated["origin"] == "generated" and generated["certificate"] is None

    ok(
        ctl(
            blank_piv, "csr", "--slot", "9c", "--subject", "CN=Ann Signer,O=Example",
            "--email", "ann@example.org", "--out", str(tmp_path / "req.pem"),
            "--pin-fd", "{fd}", secrets=(PIN,),
        )
    )  # fmt: skip
    assert "verify OK" in openssl("req", "-verify", "-noout", "-in", "req.pem", cwd=tmp_path)

    # the test CA issues the 13-month signing certificate
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=Test CA", "-days", "30", cwd=tmp_path,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "req.pem", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "396", "-copy_extensions", "copy", "-out", "sign.crt",
        cwd=tmp_path,
    )  # fmt: skip
    ok(
        ctl(
            blank_piv, "cert", "import", str(tmp_path / "sign.crt"), "--slot", "sign",
            "--pin-fd", "{fd}", secrets=(PIN,),
        )
    )  # fmt: skip
    cert = slots(blank_piv)["9c"]["certificate"]
    assert cert["subject"] == "CN=Ann Signer,O=Example" and cert["issuer"] == "CN=Test CA"

    message = tmp_path / "mail.txt"
    message.write_bytes(b"From: ann@example.org\r\n\r\nsigned on the token\r\n")
    # 9C is PIN-always: the PIN once for the login, once for this signature
    ok(
        ctl(
            blank_piv, "sign", "--key", "pkcs11:id=%02", "--mechanism", "ecdsa-sha256",
            "--der", "--in", str(message), "--out", str(tmp_path / "mail.sig"),
            "--pin-fd", "{fd}", secrets=(PIN, PIN),
        )
    )  # fmt: skip
    openssl("x509", "-pubkey", "-noout", "-in", "sign.crt", "-out", "pub.pem", cwd=tmp_path)
    verified = openssl(
        "dgst", "-sha256", "-verify", "pub.pem", "-signature", "mail.sig", "mail.txt",
        cwd=tmp_path,
    )  # fmt: skip
    assert "Verified OK" in verified

    # a certificate for another key is refused, and the slot keeps the right one
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "other.key", "-out", "other.crt", "-subj", "/CN=Other", cwd=tmp_path,
    )  # fmt: skip
    before = status(blank_piv)
    ran = ctl(
        blank_piv, "cert", "import", str(tmp_path / "other.crt"), "--slot", "9c",
        "--pin-fd", "{fd}", secrets=(PIN,),
    )  # fmt: skip
    assert ran.rc == 1 and len(ran.lines) == 1
    assert "does not match the key in slot 9c" in ran.err
    assert status(blank_piv) == before


def test_rsa_key_generation_and_csr(blank_piv, tmp_path) -> None:
    ok(
        ctl(
            blank_piv, "keys", "generate", "--slot", "9a", "--alg", "rsa2048",
            "--public-out", str(tmp_path / "pub.pem"), "--pin-fd", "{fd}", secrets=(PIN,),
        )
    )  # fmt: skip
    ok(
        ctl(
            blank_piv, "csr", "--slot", "auth", "--subject", "CN=Ann", "--out",
            str(tmp_path / "req.pem"), "--pin-fd", "{fd}", secrets=(PIN,),
        )
    )  # fmt: skip
    assert "verify OK" in openssl("req", "-verify", "-noout", "-in", "req.pem", cwd=tmp_path)
    pub = openssl("req", "-pubkey", "-noout", "-in", "req.pem", cwd=tmp_path)
    assert pub.strip() == (tmp_path / "pub.pem").read_text().strip()


# --- PIN, PUK, reset ----------------------------------------------------------------------


def test_wrong_pin_three_times_blocks_and_the_puk_unblocks(memory_piv) -> None:
    messages = []
    for _ in range(3):
        ran = ctl(memory_piv, "pin", "change", "--pin-fd", "{fd}", secrets=("999999", "111111"))
        assert ran.rc == 1 and len(ran.lines) == 1
        messages.append(ran.err.strip())
    assert messages[0] == "tokenctl: wrong PIN (2 tries left)"
    assert messages[1] == "tokenctl: wrong PIN (1 tries left)"
    assert "PIN is now blocked: unblock it with the PUK: tokenctl pin unblock" in messages[2]
    assert status(memory_piv)["pin_retries"] == 0

    ran = ctl(
        memory_piv,
        "decrypt",
        "--key",
        "9d",
        "--in",
        "/dev/null",
        "--pin-fd",
        "{fd}",
        secrets=(PIN,),
    )
    assert ran.rc == 1
    assert ran.err.strip() == "tokenctl: PIN blocked: unblock it with the PUK: tokenctl pin unblock"

    ran = ctl(memory_piv, "pin", "unblock", "--puk-fd", "{fd}", secrets=("00000000", "246810"))
    assert ran.rc == 1 and ran.err.strip() == "tokenctl: wrong PUK (2 tries left)"
    ok(ctl(memory_piv, "pin", "unblock", "--puk-fd", "{fd}", secrets=(PUK, "246810")))
    after = status(memory_piv)
    assert after["pin_retries"] == 3 and after["puk_retries"] == 3

    with Client(memory_piv.socket) as client:
        client.login(client.open_session(0), "246810")
    ok(ctl(memory_piv, "pin", "change", "--pin-fd", "{fd}", secrets=("246810", PIN)))
    ok(ctl(memory_piv, "puk", "change", "--puk-fd", "{fd}", secrets=(PUK, "87654321")))
    ran = ctl(memory_piv, "pin", "unblock", "--puk-fd", "{fd}", secrets=(PUK, PIN))
    assert ran.rc == 1 and "wrong PUK" in ran.err


def test_reset_only_when_pin_and_puk_are_blocked(memory_piv) -> None:
    ran = ctl(memory_piv, "reset", "--yes")
    assert ran.rc == 1 and "only when PIN and PUK are both blocked" in ran.err
    assert "9d" in slots(memory_piv)
    with Client(memory_piv.socket) as client:
        session = client.open_session(0, rw=True)
        for _ in range(3):
            with pytest.raises((PinIncorrectError, PinLockedError)):
                client.login(session, "000000")
        for _ in range(3):
            with pytest.raises((PinIncorrectError, PinLockedError)):
                client.call(
                    "tokend_UnblockPin",
                    {"h_session": session, "p_puk": "00000000", "p_new_pin": "123456"},
                )
    ran = ctl(memory_piv, "pin", "unblock", "--puk-fd", "{fd}", secrets=(PUK, PIN))
    assert ran.rc == 1 and "PUK blocked" in ran.err and "tokenctl reset" in ran.err
    ran = ctl(memory_piv, "reset")
    assert ran.rc == 2 and "--yes" in ran.err
    ok(ctl(memory_piv, "reset", "--yes"))
    after = status(memory_piv)
    assert after["slots"] == [] and after["pin_retries"] == 3
    with Client(memory_piv.socket) as client:
        client.login(client.open_session(0), "123456")


# --- refusals leave the token as it was ---------------------------------------------------


def _p12_bytes(key, cert, extra=(), password=b"pw") -> bytes:  # type: ignore[no-untyped-def]
    return pkcs12.serialize_key_and_certificates(
        b"x", key, cert, list(extra) or None, serialization.BestAvailableEncryption(password)
    )


def _self_signed(key, name: str, not_after: dt.datetime | None = None):  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_after = not_after or now + dt.timedelta(days=30)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=400))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256() if not isinstance(key, ed25519.Ed25519PrivateKey) else None)
    )


def test_bad_pkcs12_files_fail_in_one_line_and_change_nothing(memory_piv, tmp_path) -> None:
    good = make_p12(tmp_path, "good", "right")
    corrupt = tmp_path / "corrupt.p12"
    corrupt.write_bytes(good.read_bytes()[:300])
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    mismatch = tmp_path / "mismatch.p12"
    mismatch.write_bytes(_p12_bytes(key, None, [_self_signed(other, "Other")]))
    ed = ed25519.Ed25519PrivateKey.generate()
    edfile = tmp_path / "ed25519.p12"
    edfile.write_bytes(_p12_bytes(ed, _self_signed(ed, "Ed")))
    small = rsa.generate_private_key(65537, 1536)
    smallfile = tmp_path / "rsa1536.p12"
    smallfile.write_bytes(_p12_bytes(small, _self_signed(small, "Small")))

    before = status(memory_piv)
    cases = [
        (good, "wrong", "wrong password for"),
        (corrupt, "right", "is not a PKCS#12 file"),
        (mismatch, "pw", "the certificate does not match the private key; nothing was written"),
        (edfile, "pw", "Ed25519 keys cannot go on a PIV token"),
        (smallfile, "pw", "RSA-1536 keys cannot go on a PIV token"),
    ]
    for path, password, expected in cases:
        for command in (["import-p12", str(path), "--slot", "9d"], ["renew-encryption", str(path)]):
            ran = ctl(
                memory_piv, *command, "--password-fd", "{fd}", "--pin-fd", "{fd}",
                secrets=(password, PIN),
            )  # fmt: skip
            assert ran.rc == 1, (command, ran.err)
            assert len(ran.lines) == 1 and expected in ran.err, ran.err
    assert status(memory_piv) == before

    # The daemon checks on its own too (for other clients of the socket).
    with Client(memory_piv.socket) as client:
        session = client.open_session(0, rw=True)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        params = {
            "h_session": session,
            "key_slot": "9d",
            "private_key": b64(der),
            "certificate": b64(
                _self_signed(other, "Other").public_bytes(serialization.Encoding.DER)
            ),
        }
        with pytest.raises(UserNotLoggedInError):
            client.call("tokend_ImportKey", params)
        client.login(session, PIN)
        with pytest.raises(TemplateInconsistentError):
            client.call("tokend_ImportKey", params)
        ro = client.open_session(0)
        with pytest.raises(SessionReadOnlyError):
            client.call("tokend_ImportKey", {**params, "h_session": ro})
    assert status(memory_piv) == before


def test_full_retired_slots_refuse_renewal_until_pruned(memory_piv, tmp_path) -> None:
    expired = dt.datetime(2020, 6, 1, tzinfo=dt.UTC)
    with Client(memory_piv.socket) as client:
        session = client.open_session(0, rw=True)
        client.login(session, PIN)
        for n in range(0x83, 0x96):  # the demo card already keeps one old key in 82
            filler = ec.generate_private_key(ec.SECP256R1())
            client.call(
                "tokend_ImportKey",
                {
                    "h_session": session,
                    "key_slot": f"{n:02x}",
                    "private_key": b64(
                        filler.private_bytes(
                            serialization.Encoding.DER,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption(),
                        )
                    ),
                    "certificate": b64(
                        _self_signed(filler, f"old {n:02x}", expired).public_bytes(
                            serialization.Encoding.DER
                        )
                    ),
                },
            )
    before = status(memory_piv)
    assert sum(1 for s in before["slots"] if s["role"] == "retired") == 20

    p12 = make_p12(tmp_path, "renewed", "pw")
    args = ("renew-encryption", str(p12), "--password-fd", "{fd}", "--pin-fd", "{fd}")
    ran = ctl(memory_piv, *args, secrets=("pw", PIN))
    assert ran.rc == 1 and len(ran.lines) == 1
    assert "all 20 retired key slots (82-95) are full" in ran.err
    assert "tokenctl retired prune --before" in ran.err
    assert status(memory_piv) == before

    ran = ok(
        ctl(memory_piv, "retired", "prune", "--before", "2021-01-01", "--yes",
            "--pin-fd", "{fd}", secrets=(PIN,))
    )  # fmt: skip
    left = [s["slot"] for s in status(memory_piv)["slots"] if s["role"] == "retired"]
    assert left == ["82"]  # only the recently expired demo key stays
    ran = ok(ctl(memory_piv, *args, secrets=("pw", PIN)))
    assert "retired slot 83" in ran.err


# --- management key, export, selection ----------------------------------------------------


def test_management_key_change_is_stored_only_where_asked(blank_piv, tmp_path) -> None:
    store = tmp_path / "mgmt.hex"
    ran = ok(
        ctl(blank_piv, "mgmt-key", "set", "--store", str(store), "--pin-fd", "{fd}", secrets=(PIN,))
    )
    assert ran.out == b""  # not printed when stored
    assert store.stat().st_mode & 0o777 == 0o600
    new_key = store.read_text().strip()
    assert len(bytes.fromhex(new_key)) == 24

    # a change that fails (wrong current key) leaves the stored key file as it was
    ran = ctl(blank_piv, "mgmt-key", "set", "--store", str(store), "--force", "--pin-fd", "{fd}",
              secrets=(PIN,))  # fmt: skip
    assert ran.rc == 1 and "wrong management key" in ran.err
    assert store.read_text().strip() == new_key

    generate = ("keys", "generate", "--slot", "9c", "--alg", "p256", "--pin-fd", "{fd}")
    ran = ctl(blank_piv, *generate, secrets=(PIN,))
    assert ran.rc == 1 and "wrong management key" in ran.err and "--mgmt-key-file" in ran.err
    assert status(blank_piv)["slots"] == []
    ok(ctl(blank_piv, *generate, "--mgmt-key-file", str(store), secrets=(PIN,)))
    ok(ctl(blank_piv, *generate, "--mgmt-key-fd", "{fd}", secrets=(PIN, new_key)))

    ran = ok(
        ctl(blank_piv, "mgmt-key", "set", "--mgmt-key-file", str(store), "--algorithm",
            "aes256", "--pin-fd", "{fd}", secrets=(PIN,))
    )  # fmt: skip
    printed = ran.out.decode().strip()
    assert len(bytes.fromhex(printed)) == 32 and "keep it safe" in ran.err


def test_certs_export_and_pkcs11_uri_selection(memory_piv, tmp_path) -> None:
    demo = memory_piv.extras["demo"]
    serial = status(memory_piv)["serial"]
    with Client(memory_piv.socket) as client:
        short_serial = client.token_info(0)["serial_number"]
    enc_der = demo.encryption_cert.public_bytes(serialization.Encoding.DER)

    ran = ok(ctl(memory_piv, "certs", "export", "--slot", "pkcs11:id=%03", "--der"))
    assert ran.out == enc_der
    ran = ok(
        ctl(memory_piv, "certs", "export", "--slot",
            "pkcs11:object=PIV%20Key%20Management%20(9D);type=cert",
            "--token", f"pkcs11:serial={short_serial}", "--pem")
    )  # fmt: skip
    assert x509.load_pem_x509_certificate(ran.out) == demo.encryption_cert
    everything = ok(ctl(memory_piv, "certs", "export")).out
    assert everything.count(b"BEGIN CERTIFICATE") == 4  # 9a, 9c, 9d and retired 82

    assert ok(ctl(memory_piv, "status", f"pkcs11:serial={serial}")).out.startswith(b"slot 0:")
    ran = ctl(memory_piv, "status", "pkcs11:token=No%20Such%20Token")
    assert ran.rc == 2 and "no token match" in ran.err
    ran = ctl(memory_piv, "status", "pkcs11:colour=blue")
    assert ran.rc == 2 and "unknown PKCS#11 URI attribute" in ran.err
    ran = ctl(memory_piv, "certs", "export", "--slot", "pkcs11:id=%7f")
    assert ran.rc == 2 and "not a PIV key" in ran.err
    assert ctl(memory_piv, "keys", "generate", "--alg", "p256").rc == 2  # --slot missing
    ran = ctl(memory_piv, "certs", "export", "--der")
    assert ran.rc == 2 and "--slot" in ran.err
