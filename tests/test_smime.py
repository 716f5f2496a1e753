"""S/MIME interop, end to end: every message here is made or checked by another
implementation — the real `openssl cms` encrypts to the tokens' certificates and signs, NSS
`cmsutil` verifies what `tokenctl smime sign` made — and tokenctl (its `main`) talks to the
daemon through its socket. Two virtual PIV cards are present at once in in-process readers:
card A is the demo card (RSA 9D, retired RSA 82, P-256 9A for ECDH, P-256 9C signing),
card B is provisioned here with tokenctl (RSA 9D from a PKCS#12, P-384 9A, RSA-2048 9C)."""

from __future__ import annotations

import base64
import datetime as dt
import email
import mailbox
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import RunningDaemon, start_daemon, stop_daemon
from tests.helpers import PIN
from tests.test_provisioning import Ran, ctl, ok
from tokend.client import Client
from tokend.simulators.demo import DemoMaterial, provision_demo
from tokend.simulators.memory import MemoryReader, MemoryWatcher
from tokend.simulators.piv import VirtualPivCard
from tokend.smime import Keyring, TokenRemovedError, decrypt

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("cmsutil") is None,
    reason="needs openssl and NSS cmsutil (libnss3-tools)",
)

ROOT = Path(__file__).resolve().parent.parent
TEXT = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nMeet at noon by the old mill.\r\n"
GA = 0x87  # PIV GENERAL AUTHENTICATE: the token's part of every key operation


def run(*args: str | Path, cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], cwd=cwd, input=stdin, capture_output=True, check=False)


def openssl(*args: str | Path, cwd: Path, stdin: bytes | None = None) -> bytes:
    done = run("openssl", *args, cwd=cwd, stdin=stdin)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


# --- the two cards ---------------------------------------------------------------------------


@dataclass
class Pki:
    """A second CA (card B's certificates) and files for openssl."""

    dir: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    def issue(
        self, public, name: str, *, usage: dict[str, bool], days: int = 365
    ) -> x509.Certificate:  # type: ignore[no-untyped-def]
        flags = dict.fromkeys(
            (
                "digital_signature", "content_commitment", "key_encipherment",
                "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                "encipher_only", "decipher_only",
            ),
            False,
        )  # fmt: skip
        flags.update(usage)
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, name),
                        x509.NameAttribute(NameOID.EMAIL_ADDRESS, f"{name}@example.org"),
                    ]
                )
            )
            .issuer_name(self.ca_cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(**flags), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
            .add_extension(
                x509.SubjectAlternativeName([x509.RFC822Name(f"{name}@example.org")]), False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), False)
            .sign(self.ca_key, hashes.SHA256())
        )
        (self.dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert


def _make_ca(directory: Path, name: str) -> Pki:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return Pki(directory, key, cert)


@dataclass
class Cards:
    a: VirtualPivCard
    b: VirtualPivCard
    demo: DemoMaterial
    pki: Pki
    dir: Path  # certificates as PEM: a-*.pem, b-*.pem; CAs in dir/cas


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cards]:
    d = tmp_path_factory.mktemp("smime")
    card_a = VirtualPivCard()
    demo = provision_demo(card_a, d / "demo", key_agreement=True)
    for src, dst in (
        ("encryption", "a-9d"), ("authentication", "a-9a"), ("retired-82", "a-82"),
        ("signing", "a-9c"),
    ):  # fmt: skip
        shutil.copy(d / "demo" / f"{src}.pem", d / f"{dst}.pem")
    cas = d / "cas"
    cas.mkdir()
    shutil.copy(d / "demo" / "ca.pem", cas / "demo-ca.pem")
    pki = _make_ca(d, "Card B CA")
    (cas / "b-ca.pem").write_bytes(pki.ca_cert.public_bytes(serialization.Encoding.PEM))

    # Card B, provisioned the way a person does it: tokenctl through the daemon.
    card_b = VirtualPivCard()
    reader = MemoryReader("Memory Reader B")
    reader.insert(card_b)
    sock = Path(os.environ.get("TMPDIR", "/tmp")) / f"tokend-smime-{os.getpid()}.sock"
    daemon = start_daemon(sock, [MemoryWatcher(reader)])
    try:
        enc_key = rsa.generate_private_key(65537, 2048)
        enc_cert = pki.issue(enc_key.public_key(), "b-9d", usage={"key_encipherment": True})
        from cryptography.hazmat.primitives.serialization import pkcs12

        (d / "b.p12").write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"b", enc_key, enc_cert, None,
                serialization.BestAvailableEncryption(b"pw"),
            )
        )  # fmt: skip
        ok(
            ctl(
                daemon, "import-p12", str(d / "b.p12"), "--slot", "9d", "--password-fd",
                "{fd}", "--pin-fd", "{fd}", secrets=("pw", PIN),
            )
        )  # fmt: skip
        for slot, alg, usage in (
            ("9a", "p384", {"digital_signature": True, "key_agreement": True}),
            ("9c", "rsa2048", {"digital_signature": True, "content_commitment": True}),
        ):
            pub = d / f"b-{slot}.pub"
            ok(
                ctl(
                    daemon, "keys", "generate", "--slot", slot, "--alg", alg,
                    "--public-out", str(pub), "--pin-fd", "{fd}", secrets=(PIN,),
                )
            )  # fmt: skip
            public = serialization.load_pem_public_key(pub.read_bytes())
            pki.issue(public, f"b-{slot}", usage=usage)
            ok(
                ctl(
                    daemon, "cert", "import", str(d / f"b-{slot}.pem"), "--slot", slot,
                    "--pin-fd", "{fd}", secrets=(PIN,),
                )
            )  # fmt: skip
    finally:
        stop_daemon(daemon)
        reader.remove()
    yield Cards(card_a, card_b, demo, pki, d)


@dataclass
class Tokens:
    daemon: RunningDaemon
    reader_a: MemoryReader
    reader_b: MemoryReader
    cards: Cards

    @property
    def dir(self) -> Path:
        return self.cards.dir

    def serial(self, card: str) -> str:
        """The token serial the daemon reports for card "a" or "b" (what --token takes)."""
        reader = {"a": self.reader_a, "b": self.reader_b}[card].name
        with Client(self.daemon.socket) as client:
            for slot in client.slot_list(token_present=True):
                if client.slot_info(slot)["slot_description"].startswith(reader):
                    return str(client.token_info(slot)["token_serial"])
        raise AssertionError(f"card {card} is not present")


@pytest.fixture
def tokens(cards: Cards, sock_path: Path) -> Iterator[Tokens]:
    """The daemon with both cards present, each in its own reader."""
    reader_a, reader_b = MemoryReader("Memory Reader A"), MemoryReader("Memory Reader B")
    reader_a.insert(cards.a)
    reader_b.insert(cards.b)
    daemon = start_daemon(sock_path, [MemoryWatcher(reader_a, reader_b)])
    try:
        yield Tokens(daemon, reader_a, reader_b, cards)
    finally:
        stop_daemon(daemon)
        reader_a.remove()
        reader_b.remove()


def smime(t: Tokens, *args: str, pins: int = 1) -> Ran:
    return ctl(t.daemon, "smime", *args, "--pin-fd", "{fd}", secrets=(PIN,) * pins)


def encrypt(t: Tokens, cert: str, *opts: str, text: bytes = TEXT, name: str = "mail") -> Path:
    """`openssl cms -encrypt` to one of the cards' certificates (S/MIME output)."""
    src = t.dir / f"{name}.txt"
    src.write_bytes(text)
    out = t.dir / f"{name}.msg"
    cipher, keyopts = (
        [o for o in opts if not o.startswith("keyopt=")],
        [a for o in opts if o.startswith("keyopt=") for a in ("-keyopt", o[7:])],
    )
    openssl(
        "cms", "-encrypt", "-binary", *cipher, "-in", src, "-out", out,
        "-recip", f"{cert}.pem", *keyopts, cwd=t.dir,
    )  # fmt: skip
    return out


# --- decrypting what openssl sends -------------------------------------------------------------

DECRYPT_CASES = [
    # card A, RSA 9D: key transport
    ("a-9d", "-aes128"),
    ("a-9d", "-aes256"),
    ("a-9d", "-des3"),
    ("a-9d", "-aes-256-gcm"),
    ("a-9d", "-aes192", "keyopt=rsa_padding_mode:oaep"),
    ("a-9d", "-aes256", "keyopt=rsa_padding_mode:oaep", "keyopt=rsa_oaep_md:sha256"),
    ("a-9d", "-aes-128-gcm", "keyopt=rsa_padding_mode:oaep", "keyopt=rsa_oaep_md:sha384"),
    ("a-9d", "-aes128", "keyopt=rsa_padding_mode:oaep", "keyopt=rsa_oaep_md:sha512"),
    ("a-9d", "-aes128", "-keyid"),
    # card A, P-256 9A: ECDH ephemeral-static, X9.63 KDF, AES key wrap
    ("a-9a", "-aes128"),
    ("a-9a", "-aes256", "keyopt=ecdh_kdf_md:sha256"),
    ("a-9a", "-aes192", "keyopt=ecdh_kdf_md:sha224"),
    ("a-9a", "-des3", "keyopt=ecdh_kdf_md:sha384"),
    ("a-9a",),  # openssl's defaults: 3DES content, so 3DES key wrap (RFC 3217), SHA-1 KDF
    ("a-9a", "-aes-256-gcm", "keyopt=ecdh_kdf_md:sha512"),
    ("a-9a", "-aes-256-gcm"),
    ("a-9a", "-aes128", "keyopt=ecdh_cofactor_mode:1"),
    ("a-9a", "-aes256", "-keyid"),
    # the retired key on card A
    ("a-82", "-aes256"),
    # card B: the second present token (RSA from a PKCS#12, P-384 generated on the card)
    ("b-9d", "-aes256"),
    ("b-9d", "-aes-256-gcm", "keyopt=rsa_padding_mode:oaep", "keyopt=rsa_oaep_md:sha256"),
    ("b-9a", "-aes256"),
    ("b-9a", "-aes-128-gcm", "keyopt=ecdh_kdf_md:sha384"),
]


@pytest.mark.parametrize("case", DECRYPT_CASES, ids=lambda c: " ".join(c))
def test_decrypts_what_openssl_encrypts(tokens: Tokens, case: tuple[str, ...]) -> None:
    cert, *opts = case
    mail = encrypt(tokens, cert, *opts)
    ran = ok(smime(tokens, "decrypt", str(mail)))
    assert ran.out == TEXT
    assert f"(serial {tokens.serial(cert[0])})" in ran.err  # the token that held the key


def test_signed_then_encrypted_mail_decrypts_then_verifies(tokens: Tokens) -> None:
    """What Thunderbird sends by default with both on: sign, then encrypt."""
    d = tokens.dir
    key = ec.generate_private_key(ec.SECP256R1())
    tokens.cards.pki.issue(key.public_key(), "sender", usage={"digital_signature": True})
    (d / "sender.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    (d / "note.txt").write_bytes(TEXT)
    signed = openssl(
        "cms", "-sign", "-in", "note.txt", "-signer", "sender.pem", "-inkey", "sender.key",
        cwd=d,
    )  # fmt: skip
    (d / "signed.txt").write_bytes(signed)
    openssl(
        "cms", "-encrypt", "-aes-256-gcm", "-in", "signed.txt", "-out", "both.msg",
        "-recip", "a-9a.pem", cwd=d,
    )  # fmt: skip
    inner = ok(smime(tokens, "decrypt", str(d / "both.msg"))).out
    assert b"multipart/signed" in inner
    (d / "inner.eml").write_bytes(inner)
    ran = ok(ctl(tokens.daemon, "smime", "verify", "--ca", str(d / "cas"), str(d / "inner.eml")))
    assert ran.out == TEXT and "signed by sender" in ran.err


def test_decrypt_keeps_the_envelope_headers_and_reads_stdin_and_out(
    tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    mail = encrypt(tokens, "b-9d", "-aes-256-gcm")
    headers = b"From: ann@example.org\r\nTo: b-9d@example.org\r\nSubject: lunch\r\n"
    (tokens.dir / "full.eml").write_bytes(headers + mail.read_bytes())
    out = tokens.dir / "plain.eml"
    r, w = os.pipe()
    os.write(w, (headers + mail.read_bytes()))
    os.close(w)
    monkeypatch.setattr(sys, "stdin", os.fdopen(r, "r"))
    ok(smime(tokens, "decrypt", "-", "--out", str(out)))
    msg = email.message_from_bytes(out.read_bytes())
    assert msg["Subject"] == "lunch" and msg["From"] == "ann@example.org"
    assert msg.get_payload().strip() == "Meet at noon by the old mill."
    # the old command name still works
    ran = ok(ctl(tokens.daemon, "smime-decrypt", str(mail), "--pin-fd", "{fd}", secrets=(PIN,)))
    assert ran.out == TEXT


def test_token_option_limits_the_search(tokens: Tokens) -> None:
    mail = encrypt(tokens, "b-9d", "-aes128")
    ran = smime(tokens, "decrypt", str(mail), "--token", tokens.serial("a"))
    assert ran.rc == 1
    assert "insert the token that holds it" in ran.err
    assert ok(smime(tokens, "decrypt", str(mail), "--token", tokens.serial("b"))).out == TEXT


def test_mail_for_an_absent_token_says_which_token_to_insert(tokens: Tokens) -> None:
    mail = encrypt(tokens, "b-9a", "-aes256")
    tokens.reader_b.remove()
    tokens.daemon.settle()
    ran = smime(tokens, "decrypt", str(mail))
    assert ran.rc == 1 and ran.out == b""
    line = ran.err.strip()
    assert line.startswith("tokenctl: the message is for <")
    cert = x509.load_pem_x509_certificate((tokens.dir / "b-9a.pem").read_bytes())
    assert f"<CN=Card B CA, serial {cert.serial_number:#x}>" in line
    assert line.endswith("insert the token that holds it")
    tokens.reader_b.insert(tokens.cards.b)
    tokens.daemon.settle()
    assert ok(smime(tokens, "decrypt", str(mail))).out == TEXT


def test_gcm_tag_mismatch_releases_nothing(tokens: Tokens) -> None:
    der = encrypt(tokens, "a-9d", "-aes-256-gcm", "-outform", "DER", text=TEXT * 20, name="gcm")
    data = bytearray(der.read_bytes())
    assert data[:1] == b"\x30"  # DER straight from openssl cms
    data[-40] ^= 0x01  # inside the encrypted content (the tag is the last 18 bytes)
    der.write_bytes(bytes(data))
    ran = smime(tokens, "decrypt", str(der))
    assert ran.rc == 1 and ran.out == b""
    assert "integrity check" in ran.err and "nothing of it is released" in ran.err


@pytest.mark.parametrize(
    ("cert", "cipher", "named"),
    [
        ("a-9d", "-camellia128", "content encryption camellia128_cbc"),
        ("a-9a", "-aria-256-cbc", "content encryption aria256_cbc"),
    ],
)
def test_unsupported_algorithm_is_named(tokens: Tokens, cert: str, cipher: str, named: str) -> None:
    mail = encrypt(tokens, cert, cipher)
    ran = smime(tokens, "decrypt", str(mail))
    assert ran.rc == 1 and ran.out == b""
    assert ran.err.startswith(f"tokenctl: {named}") and "not supported" in ran.err


@pytest.mark.parametrize(
    "data",
    [b"hello, this is not mail at all\n", b"\x30\x82\x01\x00\x06\x09garbage", b""],
    ids=["text", "truncated DER", "empty"],
)
def test_corrupt_input_is_a_clear_error(tokens: Tokens, data: bytes) -> None:
    bad = tokens.dir / "bad.msg"
    bad.write_bytes(data)
    ran = smime(tokens, "decrypt", str(bad))
    assert ran.rc == 1 and ran.out == b""
    assert "corrupt message" in ran.err or "not an S/MIME" in ran.err
    assert "Traceback" not in ran.err


def test_token_removed_mid_message_decrypts_nothing(tokens: Tokens) -> None:
    mail = encrypt(tokens, "a-9d", "-aes256").read_bytes()

    def pull(apdu: bytes) -> None:
        if len(apdu) > 1 and apdu[1] == GA:
            tokens.reader_a.remove()

    tokens.reader_a.on_transmit.append(pull)
    try:
        with (
            Client(tokens.daemon.socket) as client,
            Keyring(client, lambda t, c: PIN) as ring,
            pytest.raises(TokenRemovedError, match="was removed while it was being used"),
        ):
            decrypt(ring, mail)
    finally:
        tokens.reader_a.on_transmit.clear()


def test_a_returning_token_needs_its_pin_again(tokens: Tokens) -> None:
    """The keyring keeps no PIN: a token that was pulled and plugged in again is a new
    instance, and the next message asks for its PIN again."""
    mail = encrypt(tokens, "a-9a", "-aes256").read_bytes()
    asked: list[str] = []

    def pin(token, context: bool) -> str:  # type: ignore[no-untyped-def]
        asked.append(token.serial)
        return PIN

    with Client(tokens.daemon.socket) as client, Keyring(client, pin) as ring:
        assert decrypt(ring, mail).content == TEXT
        assert decrypt(ring, mail).content == TEXT
        assert len(asked) == 1
        tokens.reader_a.remove()
        tokens.daemon.settle()
        tokens.reader_a.insert(tokens.cards.a)
        tokens.daemon.settle()
        assert decrypt(ring, mail).content == TEXT
        assert asked == [tokens.serial("a")] * 2


def test_retired_key_mail_after_renewal(tmp_path: Path, sock_path: Path) -> None:
    """A certificate's key moves to a retired slot (renewal); mail sent to it still opens."""
    card = VirtualPivCard()
    provision_demo(card, tmp_path, key_agreement=False)
    reader = MemoryReader("Memory Reader R")
    reader.insert(card)
    daemon = start_daemon(sock_path, [MemoryWatcher(reader)])
    try:
        (tmp_path / "m.txt").write_bytes(TEXT)
        openssl(
            "cms", "-encrypt", "-aes256", "-in", "m.txt", "-out", "old.msg",
            "-recip", "encryption.pem", cwd=tmp_path,
        )  # fmt: skip
        key = rsa.generate_private_key(65537, 2048)
        pki = _make_ca(tmp_path, "Renewal CA")
        new_cert = pki.issue(key.public_key(), "renewed", usage={"key_encipherment": True})
        from cryptography.hazmat.primitives.serialization import pkcs12

        (tmp_path / "new.p12").write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"n", key, new_cert, None, serialization.BestAvailableEncryption(b"pw")
            )
        )
        ran = ok(
            ctl(
                daemon, "renew-encryption", str(tmp_path / "new.p12"), "--password-fd",
                "{fd}", "--pin-fd", "{fd}", secrets=("pw", PIN),
            )
        )  # fmt: skip
        assert "retired slot 83" in ran.err
        ran = ok(
            ctl(daemon, "smime", "decrypt", str(tmp_path / "old.msg"), "--pin-fd", "{fd}",
                secrets=(PIN,))
        )  # fmt: skip
        assert ran.out == TEXT and "Retired Key 2 (83)" in ran.err
    finally:
        stop_daemon(daemon)
        reader.remove()


def test_pin_always_decryption_key_gets_its_context_pin(tmp_path: Path, sock_path: Path) -> None:
    """An encryption key imported with PIN policy "always": every unwrap carries the PIN."""
    card = VirtualPivCard()
    reader = MemoryReader("Memory Reader P")
    reader.insert(card)
    daemon = start_daemon(sock_path, [MemoryWatcher(reader)])
    try:
        pki = _make_ca(tmp_path, "Always CA")
        key = rsa.generate_private_key(65537, 2048)
        cert = pki.issue(key.public_key(), "always", usage={"key_encipherment": True})
        from cryptography.hazmat.primitives.serialization import pkcs12

        (tmp_path / "a.p12").write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"a", key, cert, None, serialization.BestAvailableEncryption(b"pw")
            )
        )
        ok(
            ctl(
                daemon, "import-p12", str(tmp_path / "a.p12"), "--pin-policy", "always",
                "--password-fd", "{fd}", "--pin-fd", "{fd}", secrets=("pw", PIN),
            )
        )  # fmt: skip
        (tmp_path / "m.txt").write_bytes(TEXT)
        openssl(
            "cms", "-encrypt", "-aes-256-gcm", "-in", "m.txt", "-out", "m.msg",
            "-recip", "always.pem", cwd=tmp_path,
        )  # fmt: skip
        args = ("smime", "decrypt", str(tmp_path / "m.msg"), "--pin-fd", "{fd}")
        # one PIN only: the login works, the unwrap is refused without its own PIN
        ran = ctl(daemon, *args, secrets=(PIN,))
        assert ran.rc == 1 and ran.out == b"" and "PIN" in ran.err
        ran = ok(ctl(daemon, *args, secrets=(PIN, PIN)))
        assert ran.out == TEXT
    finally:
        stop_daemon(daemon)
        reader.remove()


def test_example_uses_only_the_client_library() -> None:
    """The example is what a mail client does: tokend.client and tokend.smime, nothing
    below them (no daemon internals, no drivers)."""
    import ast

    tree = ast.parse((ROOT / "examples" / "maildir_decrypt.py").read_text())
    used = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    ours = {m for m in used if m.startswith("tokend")}
    assert ours <= {"tokend.client", "tokend.errors", "tokend.smime", "tokend.smime.signing"}


# --- signing: checked by openssl and NSS ---------------------------------------------------


@pytest.fixture(scope="module")
def nss_db(cards: Cards) -> Path:
    db = cards.dir / "nssdb"
    db.mkdir()
    done = run("certutil", "-N", "-d", f"sql:{db}", "--empty-password", cwd=cards.dir)
    assert done.returncode == 0, done.stderr.decode()
    for ca in sorted((cards.dir / "cas").iterdir()):
        done = run(
            "certutil", "-A", "-d", f"sql:{db}", "-n", ca.stem, "-t", "C,C,C", "-i", ca,
            cwd=cards.dir,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
    return db


def _cms_of(signed: bytes) -> tuple[bytes, bytes | None]:
    """(DER SignedData, detached content or None) out of an S/MIME message."""
    msg = email.message_from_bytes(signed)
    if msg.get_content_type() == "multipart/signed":
        boundary = msg.get_boundary()
        assert boundary is not None
        body = signed.split(b"--" + boundary.encode() + b"\r\n")
        content = body[1].rsplit(b"\r\n", 1)[0]
        der = msg.get_payload()[1].get_payload(decode=True)
        return der, content
    return msg.get_payload(decode=True), None


SIGN_CASES = [
    ("a", "ecdsa", "sha256", []),
    ("a", "ecdsa", "sha384", ["--opaque"]),
    ("b", "rsa", "sha256", []),
    ("b", "rsa", "sha512", ["--opaque"]),
    ("b", "rsa-pss", "sha256", ["--pss"]),
    ("b", "rsa-pss", "sha384", ["--pss", "--opaque"]),
]


@pytest.mark.parametrize("case", SIGN_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}{''.join(c[3])}")
def test_what_tokenctl_signs_verifies_with_openssl_and_nss(
    tokens: Tokens, nss_db: Path, case: tuple
) -> None:
    card, kind, digest, opts = case
    src = tokens.dir / "out.eml"
    src.write_bytes(
        b"From: demo@example.org\nTo: friend@example.org\nSubject: signed\n"
        b"Content-Type: text/plain; charset=us-ascii\n\nSee you at noon.\nFrom the mill.\n"
    )
    serial = tokens.serial(card)
    # 9C is PIN-always: the PIN goes once for the login and once with the signature
    ran = ok(smime(tokens, "sign", str(src), "--token", serial, "--digest", digest, *opts, pins=2))
    signed = ran.out
    assert "with PIV Digital Signature (9C) on" in ran.err
    msg = email.message_from_bytes(signed)
    assert msg["Subject"] == "signed" and msg["To"] == "friend@example.org"
    if "--opaque" in opts:
        assert msg.get_content_type() == "application/pkcs7-mime"
        assert msg.get_param("smime-type") == "signed-data"
    else:
        assert msg.get_content_type() == "multipart/signed"
        assert msg.get_param("micalg") == "sha-" + digest[3:]
    (tokens.dir / "signed.eml").write_bytes(signed)

    # openssl: signature, chain to the CA, the signed attributes
    cas = tokens.dir / "cas" / ("demo-ca.pem" if card == "a" else "b-ca.pem")
    done = run(
        "openssl", "cms", "-verify", "-in", "signed.eml", "-CAfile", cas, "-purpose",
        "smimesign", cwd=tokens.dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert b"Verification successful" in done.stderr
    assert b"See you at noon.\r\nFrom the mill." in done.stdout
    der, content = _cms_of(signed)
    (tokens.dir / "sig.der").write_bytes(der)
    printed = openssl(
        "cms", "-cmsout", "-print", "-inform", "DER", "-in", "sig.der", cwd=tokens.dir
    )
    for attr in (b"signingTime", b"messageDigest", b"S/MIME Capabilities", b"contentType"):
        assert attr in printed
    assert printed.count(b"cert_info:") == 1  # the signer's certificate travels along
    if kind == "rsa-pss":
        assert b"rsassaPss" in printed

    # NSS cmsutil (Debian 12: 3.87) with the CAs trusted in a fresh database
    nss = ["cmsutil", "-D", "-d", f"sql:{nss_db}", "-i", "sig.der", "-h", "1", "-n"]
    if content is not None:
        (tokens.dir / "content.bin").write_bytes(content)
        nss += ["-c", "content.bin"]
    done = run(*nss, cwd=tokens.dir)
    report = (done.stdout + done.stderr).decode()
    if kind == "rsa-pss" and "GoodSignature" not in report:
        pytest.skip(f"this NSS cannot verify RSA-PSS SignedData: {report.strip()[:200]}")
    assert done.returncode == 0 and "signer0.status=GoodSignature" in report, report

    # and tokenctl's own verify agrees; a tampered copy fails
    cas_dir = str(tokens.dir / "cas")
    ran = ok(ctl(tokens.daemon, "smime", "verify", "--ca", cas_dir, str(tokens.dir / "signed.eml")))
    assert b"See you at noon." in ran.out and "Verification successful" in ran.err


def test_verify_what_openssl_signs(tokens: Tokens) -> None:
    d = tokens.dir
    pki = tokens.cards.pki
    ec_key = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(65537, 2048)
    for name, key in (("ossl-ec", ec_key), ("ossl-rsa", rsa_key)):
        pki.issue(key.public_key(), name, usage={"digital_signature": True})
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )  # fmt: skip
    (d / "note.txt").write_bytes(b"Content-Type: text/plain\n\nsigned by openssl\n")
    made = []
    for name, extra in (
        ("ossl-ec", []), ("ossl-ec", ["-nodetach"]), ("ossl-rsa", ["-md", "sha512"]),
        ("ossl-rsa", ["-nodetach", "-keyopt", "rsa_padding_mode:pss"]),
    ):  # fmt: skip
        out = d / f"{name}{len(made)}.eml"
        openssl(
            "cms", "-sign", "-in", "note.txt", "-signer", f"{name}.pem", "-inkey",
            f"{name}.key", "-out", out, *extra, cwd=d,
        )  # fmt: skip
        made.append(out)
    for signed in made:
        ca = str(d / "cas" / "b-ca.pem")
        ran = ok(ctl(tokens.daemon, "smime", "verify", "--ca", ca, str(signed)))
        assert b"signed by openssl" in ran.out
        assert ran.err.startswith("Verification successful: signed by ossl-")
        assert "Card B CA (trusted)" in ran.err

        tampered = d / "tampered.eml"
        data = signed.read_bytes()
        if b"signed by openssl" in data:
            tampered.write_bytes(data.replace(b"signed by openssl", b"signed by 0penssl"))
        else:  # opaque: flip a bit of the encapsulated content inside the base64
            msg = email.message_from_bytes(data)
            der = bytearray(msg.get_payload(decode=True))
            at = bytes(der).index(b"signed by openssl")
            der[at] ^= 0x20
            head = data.split(b"\n\n", 1)[0]
            tampered.write_bytes(head + b"\n\n" + base64.encodebytes(bytes(der)))
        ran = ctl(tokens.daemon, "smime", "verify", "--ca", str(d / "cas"), str(tampered))
        assert ran.rc == 1 and ran.out == b""
        assert "the message was altered" in ran.err

    # untrusted: the right signature, but the demo CA alone is not its anchor
    other_ca = str(d / "cas" / "demo-ca.pem")
    ran = ctl(tokens.daemon, "smime", "verify", "--ca", other_ca, str(made[0]))
    assert ran.rc == 1 and "does not chain to the trusted CA" in ran.err


# --- the Maildir example: a mail client through tokend.client -------------------------------


def _maildir(path: Path) -> Path:
    for sub in ("cur", "new", "tmp"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    return path


def test_maildir_example_decrypts_and_signs(tokens: Tokens) -> None:
    inbox, out = _maildir(tokens.dir / "inbox1"), tokens.dir / "decrypted1"
    texts = {}
    for i, cert in enumerate(("a-9d", "a-9a", "b-9d", "b-9a", "a-82")):
        body = TEXT.replace(b"noon", f"noon ({i})".encode())
        mail = encrypt(tokens, cert, "-aes-256-gcm" if i % 2 else "-aes128", text=body)
        (inbox / "new" / f"{i}.msg").write_bytes(
            b"Subject: message %d\r\nFrom: sender@example.org\r\n" % i + mail.read_bytes()
        )
        texts[f"message {i}"] = body
    (inbox / "cur" / "plain:2,S").write_bytes(b"Subject: not encrypted\r\n\r\nhello\r\n")
    outgoing = tokens.dir / "outgoing.eml"
    outgoing.write_bytes(b"From: demo@example.org\r\nSubject: reply\r\n\r\nThanks!\r\n")
    signed = tokens.dir / "outgoing-signed.eml"
    done = _example(
        tokens, inbox, out, "--sign", outgoing, "--signed-out", signed,
        "--sign-token", tokens.serial('a'), pins=4,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = {msg["Subject"]: msg for _, msg in mailbox.Maildir(out, create=False).iteritems()}
    assert set(got) == set(texts)
    for subject, body in texts.items():
        assert (
            got[subject]
            .get_payload()
            .encode()
            .replace(b"\n", b"\r\n")
            .endswith(body.split(b"\r\n\r\n", 1)[1])
        )
    check = run(
        "openssl", "cms", "-verify", "-in", signed, "-CAfile",
        tokens.dir / "cas" / "demo-ca.pem", cwd=tokens.dir,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr.decode()
    assert b"Thanks!" in check.stdout


def test_maildir_example_unplug_mid_batch(tokens: Tokens) -> None:
    inbox, out = _maildir(tokens.dir / "inbox2"), tokens.dir / "decrypted2"
    for i in range(5):
        mail = encrypt(tokens, "a-9d", "-aes256", text=TEXT + b"%d\r\n" % i)
        (inbox / "new" / f"{i}.msg").write_bytes(b"Subject: batch %d\r\n" % i + mail.read_bytes())
    seen = []

    def unplug_on_third(apdu: bytes) -> None:
        if len(apdu) > 1 and apdu[1] == GA:
            seen.append(apdu)
            if len(seen) == 3:
                tokens.reader_a.remove()

    tokens.reader_a.on_transmit.append(unplug_on_third)
    try:
        done = _example(tokens, inbox, out, pins=1)
    finally:
        tokens.reader_a.on_transmit.clear()
    assert done.returncode == 1
    written = {m["Subject"]: m for _, m in mailbox.Maildir(out, create=False).iteritems()}
    assert set(written) == {"batch 0", "batch 1"}
    for subject, msg in written.items():
        assert msg.get_payload().endswith(subject[-1] + "\n") or msg.get_payload().endswith(
            subject[-1] + "\r\n"
        )
    lines = done.stderr.splitlines()
    failed = [ln for ln in lines if "FAILED" in ln]
    assert len(failed) == 3, done.stderr
    assert "was removed while it was being used" in failed[0]
    assert all("insert the token that holds it" in ln for ln in failed[1:])


def _example(tokens: Tokens, *args: str | Path, pins: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKEND_SOCKET=str(tokens.daemon.socket), PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "maildir_decrypt.py"), *map(str, args),
         "--pin-fd", "0"],
        input=(PIN + "\n") * pins, capture_output=True, text=True, env=env, check=False,
        timeout=60,
    )  # fmt: skip
