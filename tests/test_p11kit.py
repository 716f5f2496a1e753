"""The p11-kit RPC front end, end to end through Debian's unmodified p11-kit-client.so
(package p11-kit-modules, 0.24.1 on Debian 12) and the programs that load it: python-pkcs11,
pkcs11-tool, NSS (modutil, certutil, cmsutil), OpenSSL's pkcs11 engine and GnuTLS p11tool.
The daemon serves the demo virtual PIV card: the acceptance checks run both on the
in-process reader and behind real pcscd + vpcd (fixture `p11_card`). Raw-socket tests cover
what no consumer here sends on its own. The SIM, BLE and pinentry runs are in
tests/test_p11kit_tokens.py."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.conftest import MemoryPlug, VpcdPlug, wait_for_token
from tests.test_simulate_stack import tokend_stack  # noqa: F401  (fixture)
from tokend.p11kit.codec import (
    HANDSHAKE,
    Call,
    RequestWriter,
    Writer,
)
from tokend.piv.codes import DEFAULT_MANAGEMENT_KEY, PivSlot
from tokend.pkcs11 import CKA, CKO, CKR
from tokend.simulators.demo import DEMO_NAME, _Provisioner, provision_demo
from tokend.simulators.memory import MemoryReader, MemoryWatcher
from tokend.simulators.piv import VirtualPivCard
from tokend.testing import ThreadDaemon, start_thread_daemon

CLIENT = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
ROOT = Path(__file__).resolve().parent.parent
PIN = "123456"

pytestmark = pytest.mark.skipif(
    not CLIENT.exists(), reason="p11-kit-client.so missing (Debian package p11-kit-modules)"
)


# --- fixtures -----------------------------------------------------------------------------


def _rsa_signer_card(export: Path) -> tuple[VirtualPivCard, x509.Certificate]:
    """The demo card plus an RSA-2048 signing key in 9E (the demo's RSA keys only decrypt)."""
    card = VirtualPivCard()
    provision_demo(card, export, key_agreement=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEMO_NAME + " RSA signer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
        .sign(key, hashes.SHA256())
    )
    apdu = _Provisioner(card)
    apdu.select()
    apdu.authenticate(DEFAULT_MANAGEMENT_KEY)
    apdu.import_rsa(PivSlot.CARD_AUTH, key)
    apdu.put_certificate(PivSlot.CARD_AUTH, cert)
    return card, cert


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tk-p11-"))  # short: Unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _start(kind: str, request, sockdir: Path) -> Iterator[ThreadDaemon]:  # type: ignore[no-untyped-def]
    export = sockdir / "export"
    card, rsa_cert = _rsa_signer_card(export)
    if kind == "memory":
        reader = MemoryReader("Memory Reader 0")
        plug: MemoryPlug | VpcdPlug = MemoryPlug(reader)
        plug.insert(card)
        running = start_thread_daemon(sockdir / "tokend.sock", [MemoryWatcher(reader)], p11kit=True)
    else:
        from tokend.drivers.pcsc import PcscWatcher
        from tokend.simulators.pcscd import wait_present

        harness = request.getfixturevalue("vpcd")
        plug = VpcdPlug(harness)
        plug.insert(card)
        wait_present(harness.reader(0))
        running = start_thread_daemon(
            sockdir / "tokend.sock", [PcscWatcher(allow_virtual_readers=True)], p11kit=True
        )
    try:
        slot = wait_for_token(running)
        running.extras.update(card=card, plug=plug, slot=slot, export=export, rsa_cert=rsa_cert)
        yield running
    finally:
        running.stop()
        if isinstance(plug, VpcdPlug):
            plug.remove()


@pytest.fixture
def p11(request, sockdir: Path) -> Iterator[ThreadDaemon]:  # type: ignore[no-untyped-def]
    yield from _start("memory", request, sockdir)


@pytest.fixture
def p11_pcsc(request, sockdir: Path) -> Iterator[ThreadDaemon]:  # type: ignore[no-untyped-def]
    yield from _start("pcsc", request, sockdir)


@pytest.fixture(params=["memory", pytest.param("pcsc", marks=pytest.mark.pcsc)])
def p11_card(request, sockdir: Path) -> Iterator[ThreadDaemon]:  # type: ignore[no-untyped-def]
    """The acceptance checks run twice: on the in-process reader, and as the issue asks,
    with the virtual PIV card behind the real pcscd + vpcd (pyscard, the PC/SC driver)."""
    yield from _start(request.param, request, sockdir)


def client_env(running: ThreadDaemon, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["P11_KIT_SERVER_ADDRESS"] = f"unix:path={running.p11kit_socket}"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)


def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


# --- consumers --------------------------------------------------------------------------


def test_python_pkcs11_lists_logs_in_decrypts_and_signs(p11: ThreadDaemon, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    res = run([sys.executable, "-m", "tests.p11kit_consumer", "basic"], client_env(p11))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["manufacturer"] == "tokend"
    assert out["slots"] == 1
    assert out["label"].startswith("PIV #")
    assert out["decrypt_v15"] == "key transport v1.5"
    assert out["decrypt_oaep_sha1"] == "oaep sha1"
    assert out["decrypt_oaep_sha256"] == "oaep sha256"
    assert out["sign_rsa"] == 256
    assert out["sign_ecdsa"] == 64
    # Nothing secret in the daemon's log, even at DEBUG: no PIN, no plaintext.
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "tokend.p11kit" in {r.name.rsplit(".", 1)[0] for r in caplog.records}
    for secret in (PIN, PIN.encode().hex(), "key transport", "oaep sha"):
        assert secret not in text


@pytest.mark.pcsc
def test_python_pkcs11_over_pcscd_and_vpcd(p11_pcsc: ThreadDaemon) -> None:
    res = run([sys.executable, "-m", "tests.p11kit_consumer", "basic"], client_env(p11_pcsc))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["decrypt_v15"] == "key transport v1.5"
    assert out["decrypt_oaep_sha256"] == "oaep sha256"
    assert out["sign_rsa"] == 256 and out["sign_ecdsa"] == 64


def test_pkcs11_tool_test_has_no_errors_and_lists_objects(p11_card: ThreadDaemon) -> None:
    env = client_env(p11_card)
    base = ["pkcs11-tool", "--module", str(CLIENT)]
    res = run([*base, "--login", "--pin", PIN, "--test"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No errors" in res.stdout
    assert "RSA-PKCS-OAEP" in res.stdout  # the decryption tests ran, through OAEP too
    res = run([*base, "--login", "--pin", PIN, "--list-objects"], env)
    assert res.returncode == 0, res.stderr
    for label in ("PIV Key Management (9D)", "PIV Digital Signature (9C)", "Retired Key 1 (82)"):
        assert f"label:      {label}" in res.stdout
    assert "Private Key Object; RSA" in res.stdout
    res = run([*base, "--list-mechanisms"], env)
    # The 0.24.1 client cannot carry ECDH: it must not be offered.
    assert "RSA-PKCS-OAEP" in res.stdout and "ECDH" not in res.stdout


def _nss_db(p11: ThreadDaemon, work: Path) -> tuple[Path, dict[str, str]]:
    env = client_env(p11)
    db = work / "nssdb"
    db.mkdir()
    assert run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"], env).returncode == 0
    res = run(
        ["modutil", "-dbdir", f"sql:{db}", "-add", "tokend", "-libfile", str(CLIENT), "-force"],
        env,
        input="\n",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return db, env


def test_nss_cmsutil_decrypts_openssl_mail_and_signs_for_openssl(
    p11_card: ThreadDaemon, sockdir: Path
) -> None:
    work = sockdir / "nss"
    work.mkdir()
    db, env = _nss_db(p11_card, work)
    res = run(["certutil", "-L", "-d", f"sql:{db}", "-h", "all"], env, stdin=subprocess.DEVNULL)
    nick = next(
        line.split("  ")[0].strip()
        for line in res.stdout.splitlines()
        if "PIV Digital Signature (9C)" in line
    )
    enc_pem, ca_pem = work / "enc.pem", work / "ca.pem"
    enc_pem.write_bytes(_pem(p11_card, "encryption.pem"))
    ca_pem.write_bytes(_pem(p11_card, "ca.pem"))
    msg = work / "msg.txt"
    msg.write_text("Subject: test\n\nthe body of a secret mail\n")

    # Decrypt what OpenSSL encrypted for the token's encryption certificate.
    enc = work / "enc.der"
    res = run(
        [
            "openssl",
            "smime",
            "-encrypt",
            "-aes256",
            "-in",
            str(msg),
            "-outform",
            "DER",
            "-out",
            str(enc),
            str(enc_pem),
        ],
        env,
    )
    assert res.returncode == 0, res.stderr
    res = run(["cmsutil", "-D", "-d", f"sql:{db}", "-i", str(enc), "-p", PIN], env)
    assert res.returncode == 0, res.stderr
    assert "the body of a secret mail" in res.stdout

    # Sign with the token (9C: P-256, PIN-always) and let OpenSSL verify it.
    ca_trust = ["certutil", "-A", "-d", f"sql:{db}", "-n", "demo-ca", "-t", "C,C,C"]
    assert run([*ca_trust, "-i", str(ca_pem)], env).returncode == 0
    signed = work / "signed.der"
    res = run(
        [
            "cmsutil",
            "-S",
            "-d",
            f"sql:{db}",
            "-N",
            nick,
            "-i",
            str(msg),
            "-o",
            str(signed),
            "-p",
            PIN,
            "-H",
            "SHA256",
            "-u",
            "5",
        ],
        env,
    )
    assert res.returncode == 0, res.stderr
    res = run(
        [
            "openssl",
            "smime",
            "-verify",
            "-inform",
            "DER",
            "-in",
            str(signed),
            "-CAfile",
            str(ca_pem),
            "-purpose",
            "any",
            "-out",
            "/dev/null",
        ],
        env,
    )
    assert res.returncode == 0, res.stderr
    assert "Verification successful" in res.stderr


def _pem(running: ThreadDaemon, name: str) -> bytes:
    """A certificate of the demo card (as `provision_demo` exported it), or the 9E one."""
    if name == "rsa-signer.pem":
        return running.extras["rsa_cert"].public_bytes(serialization.Encoding.PEM)
    return (running.extras["export"] / name).read_bytes()


def test_openssl_engine_signs_and_decrypts_with_pkcs11_uris(
    p11_card: ThreadDaemon, sockdir: Path
) -> None:
    engine = Path("/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so")
    if not engine.exists():
        pytest.skip("libengine-pkcs11-openssl missing")
    work = sockdir / "openssl"
    work.mkdir()
    conf = work / "openssl.cnf"
    conf.write_text(
        "openssl_conf = openssl_init\n[openssl_init]\nengines = engine_section\n"
        "[engine_section]\npkcs11 = pkcs11_section\n[pkcs11_section]\n"
        f"engine_id = pkcs11\ndynamic_path = {engine}\nMODULE_PATH = {CLIENT}\ninit = 0\n"
    )
    env = client_env(p11_card, OPENSSL_CONF=str(conf))
    enc_pem = work / "enc.pem"
    enc_pem.write_bytes(_pem(p11_card, "encryption.pem"))
    pub = work / "enc.pub"
    pub.write_bytes(
        x509.load_pem_x509_certificate(enc_pem.read_bytes())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (work / "cek").write_bytes(b"content-encryption-key-32-bytes!")
    res = run(
        [
            "openssl",
            "pkeyutl",
            "-encrypt",
            "-pubin",
            "-inkey",
            str(pub),
            "-in",
            str(work / "cek"),
            "-out",
            str(work / "ct"),
        ],
        env,
    )
    assert res.returncode == 0, res.stderr
    uri = f"pkcs11:object=PIV%20Key%20Management%20(9D);type=private;pin-value={PIN}"
    res = subprocess.run(
        [
            "openssl",
            "pkeyutl",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-inkey",
            uri,
            "-decrypt",
            "-in",
            str(work / "ct"),
        ],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"content-encryption-key-32-bytes!"

    # Sign a SHA-256 digest with the RSA key in 9E; OpenSSL verifies with the certificate.
    (work / "data").write_bytes(b"to be signed")
    digest = work / "digest"
    digest.write_bytes(__import__("hashlib").sha256(b"to be signed").digest())
    uri = f"pkcs11:object=PIV%20Card%20Authentication%20(9E);type=private;pin-value={PIN}"
    res = run(
        [
            "openssl",
            "pkeyutl",
            "-engine",
            "pkcs11",
            "-keyform",
            "engine",
            "-inkey",
            uri,
            "-sign",
            "-pkeyopt",
            "digest:sha256",
            "-in",
            str(digest),
            "-out",
            str(work / "sig"),
        ],
        env,
    )
    assert res.returncode == 0, res.stderr
    sig_cert = p11_card.extras["rsa_cert"]
    from cryptography.hazmat.primitives.asymmetric import padding

    sig_cert.public_key().verify(  # type: ignore[union-attr,call-arg]
        (work / "sig").read_bytes(), b"to be signed", padding.PKCS1v15(), hashes.SHA256()
    )


def test_p11tool_lists_the_certificates(p11_card: ThreadDaemon) -> None:
    res = run(["p11tool", "--provider", str(CLIENT), "--list-all-certs"], client_env(p11_card))
    assert res.returncode == 0, res.stderr
    for label in ("PIV Key Management (9D)", "PIV Digital Signature (9C)", "Retired Key 1 (82)"):
        assert f"Label: {label}" in res.stdout
    assert res.stdout.count("Type: X.509 Certificate") == 5


# --- the traps ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["memory", pytest.param("pcsc", marks=pytest.mark.pcsc)])
def test_unplug_while_a_consumer_holds_a_session_then_relogin(request, transport: str) -> None:  # type: ignore[no-untyped-def]
    p11: ThreadDaemon = request.getfixturevalue("p11" if transport == "memory" else "p11_pcsc")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.p11kit_consumer", "unplug"],
        env=client_env(p11),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def ask(cmd: str) -> str:
        proc.stdin.write(cmd + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        return proc.stdout.readline().strip()  # type: ignore[union-attr]

    try:
        assert proc.stdout.readline().strip() == "ready"
        assert ask("decrypt") == "ok still here"
        plug = p11.extras["plug"]
        plug.remove()
        wait_until(lambda: ask("slots") == "slots 0")  # the daemon saw it (pcscd polls)
        # The session's next call fails with a PKCS#11 error; the process lives on.
        assert ask("decrypt") == "error DeviceRemoved"
        assert ask("decrypt") == "error SessionHandleInvalid"
        plug.insert(p11.extras["card"])
        wait_until(lambda: ask("slots") == "slots 1")
        # Nothing comes back by itself: a new session and a new login are needed.
        assert ask("decrypt") == "error SessionHandleInvalid"
        assert ask("relogin") == "ok relogin"
        assert ask("decrypt") == "ok still here"
        ask("quit")
        assert proc.wait(30) == 0, proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("attempt", range(3))
def test_finalize_while_another_thread_waits_for_a_slot_event(
    p11: ThreadDaemon, attempt: int
) -> None:
    """NSS's SECMOD_CancelWait: C_Finalize while a thread blocks in C_WaitForSlotEvent.
    The 0.24.1 client aborts the process unless the wait is answered first."""
    res = run([sys.executable, "-m", "tests.p11kit_waiter", "finalize"], client_env(p11))
    assert res.returncode == 0, f"client died ({res.returncode}): {res.stderr}"
    lines = res.stdout.splitlines()
    assert lines[0] == "initialize 0x0"
    assert "finalize 0x0" in lines
    assert lines[-1] == f"wait {CKR.CKR_CRYPTOKI_NOT_INITIALIZED:#x}"


def test_blocking_wait_for_slot_event_reports_an_unplug(p11: ThreadDaemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.p11kit_waiter", "event"],
        env=client_env(p11),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "initialize 0x0"
        assert proc.stdout.readline().strip() == "waiting"
        p11.extras["plug"].remove()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"wait 0x0 slot {p11.extras['slot']}" in out
        assert "finalize 0x0" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- raw protocol -----------------------------------------------------------------------


class Raw:
    """A hand-driven p11-kit RPC client (what p11-kit-client.so does, frame by frame)."""

    def __init__(self, path: Path, version: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.sock.sendall(bytes((version,)))
        self.version = self._exact(1)[0]
        self.code = 0x10

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def send(self, body: bytes, code: int | None = None, options: bytes = b"client") -> int:
        if code is None:
            self.code += 1
            code = self.code
        self.sock.sendall(struct.pack(">III", code, len(options), len(body)) + options + body)
        return code

    def recv(self) -> tuple[int, bytes]:
        code, opt_len, body_len = struct.unpack(">III", self._exact(12))
        self._exact(opt_len)
        return code, self._exact(body_len)

    def call(self, body: bytes) -> bytes:
        code = self.send(body)
        got, answer = self.recv()
        assert got == code
        return answer

    def close(self) -> None:
        self.sock.close()


def req(call: Call, sig: str) -> RequestWriter:
    return RequestWriter(call, sig)


def error_of(answer: bytes) -> int | None:
    """The CK_RV of an error frame, None for a normal answer."""
    if answer[:4] == b"\0\0\0\0":
        return int(struct.unpack(">Q", answer[9:17])[0])
    return None


def initialize(raw: Raw) -> None:
    body = req(Call.C_Initialize, "ayyay").in_bytes(HANDSHAKE).byte(1).in_bytes(b"\0").done()
    assert raw.call(body) == Writer(Call.C_Initialize, "").done()


def test_unknown_calls_are_not_supported_and_the_connection_lives(p11: ThreadDaemon) -> None:
    raw = Raw(p11.p11kit_socket)
    try:
        assert raw.version == 0
        initialize(raw)
        # C_LoginUser (66, PKCS#11 3.0), C_CreateObject, an id no version has.
        for call_id in (66, 20, 999):
            body = struct.pack(">II", call_id, 1) + b"u" + bytes(8)
            assert error_of(raw.call(body)) == CKR.CKR_FUNCTION_NOT_SUPPORTED
        info = raw.call(req(Call.C_GetInfo, "").done())
        assert error_of(info) is None and b"tokend" in info
    finally:
        raw.close()


def test_newer_clients_are_answered_version_0(p11: ThreadDaemon) -> None:
    for offered in (1, 2):
        raw = Raw(p11.p11kit_socket, version=offered)
        try:
            assert raw.version == 0
            initialize(raw)
            slots = raw.call(req(Call.C_GetSlotList, "yfu").byte(1).capacity(8).done())
            assert slots.endswith(b"\x01" + struct.pack(">IQ", 1, p11.extras["slot"]))
        finally:
            raw.close()


def _open_logged_in(raw: Raw, slot: int) -> int:
    ans = raw.call(req(Call.C_OpenSession, "uu").ulong(slot).ulong(4).done())
    session = int(struct.unpack(">Q", ans[-8:])[0])
    body = req(Call.C_Login, "uuay").ulong(session).ulong(1).in_bytes(PIN.encode()).done()
    assert error_of(raw.call(body)) is None
    return session


def _find(raw: Raw, session: int, template: list[tuple[int, object]]) -> list[int]:
    body = req(Call.C_FindObjectsInit, "uaA").ulong(session).template(template).done()
    assert error_of(raw.call(body)) is None
    ans = raw.call(req(Call.C_FindObjects, "ufu").ulong(session).capacity(16).done())
    # call id, signature "au", flag 01, count, handles
    n = struct.unpack(">I", ans[11:15])[0]
    handles = list(struct.unpack(f">{n}Q", ans[15 : 15 + 8 * n]))
    raw.call(req(Call.C_FindObjectsFinal, "u").ulong(session).done())
    return handles


def test_size_query_keeps_the_operation_and_costs_no_card_operation(p11: ThreadDaemon) -> None:
    raw = Raw(p11.p11kit_socket)
    try:
        initialize(raw)
        session = _open_logged_in(raw, p11.extras["slot"])
        template = [(CKA.CKA_CLASS, CKO.CKO_PRIVATE_KEY), (CKA.CKA_ID, b"\x03")]
        (key,) = _find(raw, session, template)
        pub = x509.load_pem_x509_certificate(_pem(p11, "encryption.pem")).public_key()
        from cryptography.hazmat.primitives.asymmetric import padding

        ct = pub.encrypt(b"sized", padding.PKCS1v15())  # type: ignore[union-attr]
        init = req(Call.C_DecryptInit, "uMu").ulong(session).mechanism(1).ulong(key).done()
        assert error_of(raw.call(init)) is None
        commands = []
        p11.extras["plug"].on_transmit.append(commands.append)
        # Size query (NULL buffer): the key's modulus length, nothing sent to the card.
        ans = raw.call(req(Call.C_Decrypt, "uayfy").ulong(session).in_bytes(ct).capacity(0).done())
        assert ans.endswith(b"\x00" + struct.pack(">I", 256))
        assert commands == []
        # Too small for the result: BUFFER_TOO_SMALL on the client side, result kept.
        ans = raw.call(req(Call.C_Decrypt, "uayfy").ulong(session).in_bytes(ct).capacity(2).done())
        assert ans.endswith(b"\x00" + struct.pack(">I", 5))
        sent = len(commands)
        assert sent > 0
        ans = raw.call(req(Call.C_Decrypt, "uayfy").ulong(session).in_bytes(ct).capacity(5).done())
        assert ans.endswith(b"\x01" + struct.pack(">I", 5) + b"sized")
        assert len(commands) == sent  # served from the kept result: one card operation
        # The operation is over now.
        ans = raw.call(req(Call.C_Decrypt, "uayfy").ulong(session).in_bytes(ct).capacity(5).done())
        assert error_of(ans) == CKR.CKR_OPERATION_NOT_INITIALIZED
    finally:
        raw.close()


def test_get_attribute_value_sizes_and_errors_in_band(p11: ThreadDaemon) -> None:
    raw = Raw(p11.p11kit_socket)
    try:
        initialize(raw)
        ans = raw.call(req(Call.C_OpenSession, "uu").ulong(p11.extras["slot"]).ulong(4).done())
        session = int(struct.unpack(">Q", ans[-8:])[0])
        (cert,) = _find(raw, session, [(CKA.CKA_CLASS, CKO.CKO_CERTIFICATE), (CKA.CKA_ID, b"\x03")])
        body = (
            req(Call.C_GetAttributeValue, "uufA")
            .ulong(session)
            .ulong(cert)
            # (CLASS, 8), (LABEL, size query), (MODULUS: not on a certificate), (ID, 1)
            .raw(struct.pack(">I", 4) + struct.pack(">II", 0, 8) + struct.pack(">II", 3, 0))
            .raw(struct.pack(">II", 0x120, 256) + struct.pack(">II", 0x102, 1))
            .done()
        )
        ans = raw.call(body)
        label = b"PIV Key Management (9D)"
        expected = (
            Writer(Call.C_GetAttributeValue, "aAu").done()
            + struct.pack(">I", 4)
            + struct.pack(">IBIQ", 0, 1, 8, CKO.CKO_CERTIFICATE)
            + struct.pack(">IBII", 3, 1, len(label), 0xFFFFFFFF)
            + struct.pack(">IB", 0x120, 0)
            + struct.pack(">IBII", 0x102, 1, 1, 1)
            + b"\x03"
            + struct.pack(">Q", CKR.CKR_ATTRIBUTE_TYPE_INVALID)
        )
        assert ans == expected
        # GetSessionInfo answers from the daemon's own state: no command reaches the card,
        # and with the card gone it still answers (the removal, then an invalid handle).
        commands: list[bytes] = []
        p11.extras["plug"].on_transmit.append(commands.append)
        for _ in range(3):
            ans = raw.call(req(Call.C_GetSessionInfo, "u").ulong(session).done())
            assert ans.endswith(struct.pack(">QQQQ", p11.extras["slot"], 0, 4, 0))  # RO public
        assert commands == []
        p11.extras["plug"].remove()
        p11.settle()
        ans = raw.call(req(Call.C_GetSessionInfo, "u").ulong(session).done())
        assert error_of(ans) == CKR.CKR_DEVICE_REMOVED
        ans = raw.call(req(Call.C_GetSessionInfo, "u").ulong(session).done())
        assert error_of(ans) == CKR.CKR_SESSION_HANDLE_INVALID
        assert error_of(raw.call(req(Call.C_GetInfo, "").done())) is None
    finally:
        raw.close()


def test_answers_follow_completion_not_request_order(p11: ThreadDaemon) -> None:
    """Client threads share one socket: a blocked wait must not hold up other answers,
    and C_Finalize answers the pending wait first."""
    raw = Raw(p11.p11kit_socket)
    try:
        initialize(raw)
        wait_code = raw.send(req(Call.C_WaitForSlotEvent, "u").ulong(0).done())
        info_code = raw.send(req(Call.C_GetInfo, "").done())
        code, ans = raw.recv()
        assert code == info_code and b"tokend" in ans
        fin_code = raw.send(req(Call.C_Finalize, "").done())
        code, ans = raw.recv()
        assert code == wait_code and error_of(ans) == CKR.CKR_CRYPTOKI_NOT_INITIALIZED
        code, ans = raw.recv()
        assert code == fin_code and error_of(ans) is None
    finally:
        raw.close()


def test_socket_is_private_and_can_be_turned_off(sockdir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for extra, expect in (([], True), (["--no-p11kit"], False)):
        sock = sockdir / f"t{len(extra)}" / "tokend.sock"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tokend.cli.tokend_main",
                "serve",
                "--no-pcsc",
                "--simulate",
                "piv",
                "--socket",
                str(sock),
                *extra,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert "listening" in proc.stdout.readline()
            p11sock = sock.parent / "pkcs11.sock"
            assert p11sock.exists() is expect
            if expect:
                assert (p11sock.stat().st_mode & 0o777) == 0o600
                assert (sock.parent.stat().st_mode & 0o777) == 0o700
                res = run(
                    ["pkcs11-tool", "--module", str(CLIENT), "--list-slots"],
                    dict(env, P11_KIT_SERVER_ADDRESS=f"unix:path={p11sock}"),
                )
                assert "Simulated PIV 0" in res.stdout
        finally:
            proc.terminate()
            proc.wait(30)
        assert not (sock.parent / "pkcs11.sock").exists()


def test_other_uids_are_refused() -> None:
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to connect as another uid")
    # A directory uid 65534 can reach (the socket's own 0700 directory is opened up below,
    # so only tokend's peer check stands between that uid and the socket).
    base = next((d for d in ("/dev/shm", "/tmp") if os.stat(d).st_mode & 0o001), None)
    if base is None:
        pytest.skip("no world-traversable directory for the socket")
    sockdir = Path(tempfile.mkdtemp(prefix="tk-uid-", dir=base))
    reader = MemoryReader("Memory Reader 0")
    reader.insert(_rsa_signer_card(sockdir / "export")[0])
    running = start_thread_daemon(sockdir / "tokend.sock", [MemoryWatcher(reader)], p11kit=True)
    try:
        os.chmod(sockdir, 0o711)
        os.chmod(running.p11kit_socket, 0o666)
        probe = (
            "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
            "try:\n time.sleep(0.2)\n s.sendall(b'\\0')\n d=s.recv(1)\nexcept OSError:\n d=b''\n"
            "print('answered' if d else 'closed')"
        )
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        res = run([*cmd, "-c", probe, str(running.p11kit_socket)], dict(os.environ))
        assert res.stdout.strip() == "closed", res.stdout + res.stderr  # no version byte back
        # The same probe as our own uid is answered: the refusal was the uid check.
        res = run([sys.executable, "-c", probe, str(running.p11kit_socket)], dict(os.environ))
        assert res.stdout.strip() == "answered"
    finally:
        running.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_a_kept_result_dies_with_the_token(p11: ThreadDaemon) -> None:
    """A decryption that did not fit the caller's buffer is kept for the follow-up call;
    if the token leaves in between, the plaintext is wiped and never handed out."""
    raw = Raw(p11.p11kit_socket)
    try:
        initialize(raw)
        session = _open_logged_in(raw, p11.extras["slot"])
        (key,) = _find(raw, session, [(CKA.CKA_CLASS, CKO.CKO_PRIVATE_KEY), (CKA.CKA_ID, b"\x03")])
        pub = x509.load_pem_x509_certificate(_pem(p11, "encryption.pem")).public_key()
        from cryptography.hazmat.primitives.asymmetric import padding

        ct = pub.encrypt(b"kept secret", padding.PKCS1v15())  # type: ignore[union-attr]
        init = req(Call.C_DecryptInit, "uMu").ulong(session).mechanism(1).ulong(key).done()
        assert error_of(raw.call(init)) is None
        ans = raw.call(req(Call.C_Decrypt, "uayfy").ulong(session).in_bytes(ct).capacity(3).done())
        assert ans.endswith(b"\x00" + struct.pack(">I", 11))
        (front_end,) = p11.daemon.front_ends
        kept = [k for conn in front_end._live for k in conn._kept.values()]  # type: ignore[attr-defined]
        assert len(kept) == 1 and bytes(kept[0].result) == b"kept secret"
        p11.extras["plug"].remove()
        p11.settle()
        assert bytes(kept[0].result) == bytes(11)  # wiped when the token left
        ans = raw.call(
            req(Call.C_Decrypt, "uayfy").ulong(session).in_bytes(ct).capacity(256).done()
        )
        assert error_of(ans) == CKR.CKR_DEVICE_REMOVED
    finally:
        raw.close()


def test_module_file_puts_tokend_in_p11kits_module_list() -> None:
    """As an ordinary user (p11-kit skips user module files for root): that user's tokend,
    `tokenctl p11kit-module --install`, then GnuTLS (p11tool, which reads p11-kit's module
    list) lists the token's certificates with no module named."""
    if os.getuid() != 0 or not shutil.which("setpriv") or not shutil.which("p11tool"):
        pytest.skip("needs root (to act as another user: p11-kit skips user modules for root)")
    base = next((d for d in ("/dev/shm", "/tmp") if os.stat(d).st_mode & 0o001), None)
    if base is None:
        pytest.skip("no world-traversable directory for the user's files")
    work = Path(tempfile.mkdtemp(prefix="tk-mod-", dir=base))
    os.chmod(work, 0o755)
    home, run_dir = work / "home", work / "run"
    for d in (home, run_dir):
        d.mkdir(mode=0o700)
        os.chown(d, 65534, 65534)
    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    sock = run_dir / "tokend" / "tokend.sock"
    daemon = subprocess.Popen(
        [
            *as_user,
            sys.executable,
            "-m",
            "tokend.cli.tokend_main",
            "serve",
            "--no-pcsc",
            "--simulate",
            "piv",
            "--socket",
            str(sock),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert daemon.stdout is not None
        assert "listening" in daemon.stdout.readline()
        res = run(
            [
                *as_user,
                sys.executable,
                "-m",
                "tokend.cli.tokenctl",
                "--socket",
                str(sock),
                "p11kit-module",
                "--install",
            ],
            env,
        )
        assert res.returncode == 0, res.stderr
        module = home / ".config" / "pkcs11" / "modules" / "tokend.module"
        assert f"remote: unix:path={sock.parent / 'pkcs11.sock'}\n" in module.read_text()
        res = run([*as_user, "p11tool", "--list-all-certs", "pkcs11:model=PIV"], env)
        assert res.returncode == 0, res.stderr
        assert "Label: PIV Key Management (9D)" in res.stdout
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def test_blocking_waits_are_capped_per_connection(p11: ThreadDaemon) -> None:
    from tokend.limits import DEFAULT_LIMITS

    MAX_PENDING_WAITS = DEFAULT_LIMITS.max_pending_waits
    raw = Raw(p11.p11kit_socket)
    try:
        initialize(raw)
        waits = [
            raw.send(req(Call.C_WaitForSlotEvent, "u").ulong(0).done())
            for _ in range(MAX_PENDING_WAITS + 1)
        ]
        code, ans = raw.recv()  # only the one over the cap answers now
        assert code == waits[-1] and error_of(ans) == CKR.CKR_FUNCTION_FAILED
        assert b"tokend" in raw.call(req(Call.C_GetInfo, "").done())  # still served
        p11.extras["plug"].remove()  # one event: the first waiter gets it
        code, ans = raw.recv()
        assert code == waits[0] and ans.endswith(struct.pack(">Q", p11.extras["slot"]))
    finally:
        raw.close()


def _login_raw(raw: Raw, slot: int) -> int:
    initialize(raw)
    return _open_logged_in(raw, slot)


def test_newer_client_generations_derive_and_sign(p11: ThreadDaemon) -> None:
    """What Debian 13 (0.25.5, offers 1) and Fedora (0.25.6+, offers 2) send: ECDH through
    C_DeriveKey (format A parameters) and a format-B mechanism (nothing after the type)."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ec, utils

    auth = x509.load_pem_x509_certificate(_pem(p11, "authentication.pem")).public_key()
    assert isinstance(auth, ec.EllipticCurvePublicKey)

    raw = Raw(p11.p11kit_socket, version=1)
    try:
        session = _login_raw(raw, p11.extras["slot"])
        mechs = raw.call(
            req(Call.C_GetMechanismList, "ufu").ulong(p11.extras["slot"]).capacity(64).done()
        )
        n = struct.unpack(">I", mechs[11:15])[0]
        assert 0x1050 in struct.unpack(f">{n}Q", mechs[15 : 15 + 8 * n])  # ECDH1_DERIVE offered
        (key,) = _find(raw, session, [(CKA.CKA_CLASS, CKO.CKO_PRIVATE_KEY), (CKA.CKA_ID, b"\x01")])
        peer = ec.generate_private_key(ec.SECP256R1())
        point = peer.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        mech = (
            struct.pack(">IQ", 0x1050, 1)  # ECDH1_DERIVE, CKD_NULL
            + struct.pack(">I", 0xFFFFFFFF)  # no shared data
            + struct.pack(">I", len(point))
            + point
        )
        template = [(CKA.CKA_CLASS, 4), (CKA.CKA_KEY_TYPE, 0x10), (CKA.CKA_VALUE_LEN, 32)]
        body = req(Call.C_DeriveKey, "uMuaA").ulong(session).raw(mech).ulong(key).template(template)
        ans = raw.call(body.done())
        assert error_of(ans) is None, hex(error_of(ans) or 0)
        derived = int(struct.unpack(">Q", ans[-8:])[0])
        get = req(Call.C_GetAttributeValue, "uufA").ulong(session).ulong(derived)
        ans = raw.call(get.raw(struct.pack(">III", 1, CKA.CKA_VALUE, 64)).done())
        value = ans[-8 - 32 : -8]
        assert value == peer.exchange(ec.ECDH(), auth)
    finally:
        raw.close()

    raw = Raw(p11.p11kit_socket, version=2)
    try:
        session = _login_raw(raw, p11.extras["slot"])
        (key,) = _find(raw, session, [(CKA.CKA_CLASS, CKO.CKO_PRIVATE_KEY), (CKA.CKA_ID, b"\x01")])
        init = req(Call.C_SignInit, "uMu").ulong(session).raw(struct.pack(">I", 0x1041)).ulong(key)
        assert error_of(raw.call(init.done())) is None
        digest = hashlib.sha256(b"format B").digest()
        ans = raw.call(
            req(Call.C_Sign, "uayfy").ulong(session).in_bytes(digest).capacity(64).done()
        )
        sig = ans[-64:]
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        )
        auth.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    finally:
        raw.close()


def test_a_p11kit_client_never_rides_another_applications_login(p11: ThreadDaemon) -> None:
    """Login is per application across both front ends: a native client logged in does
    not let a p11-kit client (not logged in) use the card, even with the right handle."""
    import hashlib

    from tokend.client import Client

    with Client(p11.socket) as native:
        s = native.open_session(p11.extras["slot"])
        native.login(s, PIN)
        (key,) = native.find_objects(s, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: b"\x01"})
        raw = Raw(p11.p11kit_socket)
        try:
            initialize(raw)
            ans = raw.call(req(Call.C_OpenSession, "uu").ulong(p11.extras["slot"]).ulong(4).done())
            session = int(struct.unpack(">Q", ans[-8:])[0])
            # Private objects stay hidden from it ...
            found = _find(raw, session, [(CKA.CKA_CLASS, CKO.CKO_PRIVATE_KEY)])
            assert found == []
            # ... and the native client's key handle is refused.
            init = req(Call.C_SignInit, "uMu").ulong(session).mechanism(0x1041).ulong(key)
            assert error_of(raw.call(init.done())) in (
                CKR.CKR_USER_NOT_LOGGED_IN,
                CKR.CKR_KEY_HANDLE_INVALID,
            )
            digest = hashlib.sha256(b"x").digest()
            ans = raw.call(
                req(Call.C_Sign, "uayfy").ulong(session).in_bytes(digest).capacity(64).done()
            )
            assert error_of(ans) == CKR.CKR_OPERATION_NOT_INITIALIZED
        finally:
            raw.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="no systemd tools")
def test_socket_activation_on_the_first_p11kit_connection(sockdir: Path) -> None:
    """With tokend.socket's two sockets (fd names tokend, pkcs11), the first PKCS#11 program
    starts the daemon, and is answered: no "no connection" module for a late daemon."""
    run_dir = sockdir / "tokend"
    run_dir.mkdir(mode=0o700)
    native, pkcs11_sock = run_dir / "tokend.sock", run_dir / "pkcs11.sock"
    tokend = [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc"]
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(native),
            "-l",
            str(pkcs11_sock),
            "--fdname=tokend:pkcs11",
            "-E",
            "PYTHONPATH",
            "--",
            *tokend,
            "--simulate",
            "piv",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        assert "Listening on" in proc.stdout.readline()
        assert "Listening on" in proc.stdout.readline()
        env = dict(os.environ, P11_KIT_SERVER_ADDRESS=f"unix:path={pkcs11_sock}")
        res = run(["pkcs11-tool", "--module", str(CLIENT), "--list-slots"], env)
        assert res.returncode == 0, res.stderr
        assert "Simulated PIV 0" in res.stdout  # the daemon started and answered
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "p11-kit RPC listening on" in out and "(socket activation)" in out


def test_login_without_a_pin_is_the_protected_path_only(p11: ThreadDaemon) -> None:
    """A NULL PIN (as 0.24.1 and as 0.25+ encode it) reaches the engine as "no PIN": with no
    protected authentication path configured that is CKR_ARGUMENTS_BAD, and no retry
    counter is touched."""
    for offered, null_pin in ((0, b"\x00" + bytes(4)), (1, b"\x01" + b"\xff" * 4)):
        raw = Raw(p11.p11kit_socket, version=offered)
        try:
            initialize(raw)
            slot = p11.extras["slot"]
            ans = raw.call(req(Call.C_OpenSession, "uu").ulong(slot).ulong(4).done())
            session = int(struct.unpack(">Q", ans[-8:])[0])
            login = req(Call.C_Login, "uuay").ulong(session).ulong(1).raw(null_pin)
            assert error_of(raw.call(login.done())) == CKR.CKR_ARGUMENTS_BAD
            info = raw.call(req(Call.C_GetTokenInfo, "u").ulong(slot).done())
            # ... flags, 10 counters, 2 versions, utcTime (length + 16): flags from the end
            flags = struct.unpack(">Q", info[-(8 + 8 * 10 + 4 + 4 + 16) :][:8])[0]
            assert flags & 0x4  # CKF_LOGIN_REQUIRED: the right field
            assert not flags & 0x100  # no CKF_PROTECTED_AUTHENTICATION_PATH advertised
        finally:
            raw.close()
    assert _login_raw(Raw(p11.p11kit_socket), p11.extras["slot"])  # the PIN still works


@pytest.mark.pcsc
def test_simulate_stack_exports_what_pkcs11_programs_need(vpcd, tokend_stack) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """`tokend simulate --piv` prints the p11-kit module and server address: with just those
    two, an unmodified PKCS#11 program sees the virtual token."""
    _proc, env = tokend_stack
    res = run(
        ["pkcs11-tool", "--module", env["TOKEND_PKCS11_MODULE"], "--list-token-slots"],
        dict(os.environ, P11_KIT_SERVER_ADDRESS=env["P11_KIT_SERVER_ADDRESS"]),
    )
    assert res.returncode == 0, res.stderr
    assert "token label        : PIV #" in res.stdout


def test_a_direct_usb_token_through_p11kit_client(sockdir: Path) -> None:
    """The front end is transport-agnostic: the virtual USB CCID token (pyusb, no pcscd)
    passes pkcs11-tool's self-test through p11-kit-client.so as the PC/SC one does."""
    pytest.importorskip("usb")
    sock = sockdir / "usb" / "tokend.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokend.cli.tokend_main",
            "serve",
            "--no-pcsc",
            "--simulate",
            "usb",
            "--socket",
            str(sock),
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()
        env = dict(os.environ, P11_KIT_SERVER_ADDRESS=f"unix:path={sock.parent / 'pkcs11.sock'}")
        base = ["pkcs11-tool", "--module", str(CLIENT)]
        res = run([*base, "--list-slots"], env)
        assert "Virtual CCID token" in res.stdout, res.stdout + res.stderr
        res = run([*base, "--login", "--pin", PIN, "--test"], env)
        assert res.returncode == 0 and "No errors" in res.stdout, res.stdout + res.stderr
    finally:
        proc.terminate()
        proc.wait(30)
