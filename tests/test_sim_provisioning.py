"""Provisioning a SIM through the daemon with `tokenctl`, the same commands as for PIV where
they apply — and acceptance (b): what tokenctl wrote is what OpenSC lists and decrypts with
(pkcs15-tool, pkcs11-tool over opensc-pkcs11.so), over real pcscd + vpcd."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tests.conftest import RunningDaemon, start_daemon, stop_daemon, wait_for_token
from tests.sim_fixtures import memory_sim  # noqa: F401 - fixture
from tests.test_provisioning import ctl, ok
from tokend.client import Client
from tokend.pkcs11 import CKA
from tokend.simulators.sim import VirtualSim
from tokend.simulators.sim_demo import Personaliser

PIN, PUK = "1234", "1234567812345678"
OPENSC_PKCS11 = Path("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")


def initialised_sim(**kwargs) -> VirtualSim:  # type: ignore[no-untyped-def]
    """PUK + PIN set and the PKCS#15 skeleton (what `pkcs15-init --create-pkcs15` does)."""
    from tokend.iso7816 import ApduChannel

    card = VirtualSim(**kwargs)
    channel = ApduChannel(card.process, extended=False, t0=True)
    Personaliser(lambda c: channel.send(c).check()).create_pkcs15(PIN.encode(), PUK.encode())
    card.reset()
    return card


def _ca() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SIM test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(ca, public_key, cn: str) -> x509.Certificate:  # type: ignore[no-untyped-def]
    ca_key, ca_cert = ca
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )


def _provision_with_tokenctl(daemon: RunningDaemon, tmp_path: Path, serial: str) -> dict:
    """import-p12 into 'encrypt', keys generate 'sign' + cert import: what a user does."""
    ca = _ca()
    enc_key = rsa.generate_private_key(65537, 2048)
    enc_cert = _issue(ca, enc_key.public_key(), "Ann (encryption)")
    p12 = tmp_path / "enc.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"ann", enc_key, enc_cert, None, serialization.BestAvailableEncryption(b"secret")
        )
    )
    ok(ctl(daemon, "import-p12", str(p12), "--slot", "encrypt", "--token", serial,
           "--pin-fd", "{fd}", "--password-fd", "{fd}", secrets=("secret", PIN)))  # fmt: skip
    public_pem = tmp_path / "sign.pub.pem"
    ok(ctl(daemon, "keys", "generate", "--slot", "sign", "--alg", "rsa2048", "--token", serial,
           "--public-out", str(public_pem), "--pin-fd", "{fd}", secrets=(PIN,)))  # fmt: skip
    sign_public = serialization.load_pem_public_key(public_pem.read_bytes())
    assert isinstance(sign_public, rsa.RSAPublicKey)
    sign_cert = _issue(ca, sign_public, "Ann (signature)")
    cert_pem = tmp_path / "sign.pem"
    cert_pem.write_bytes(sign_cert.public_bytes(serialization.Encoding.PEM))
    ok(ctl(daemon, "cert", "import", str(cert_pem), "--slot", "sign", "--token", serial,
           "--pin-fd", "{fd}", secrets=(PIN,)))  # fmt: skip
    return {"enc_key": enc_key, "enc_cert": enc_cert, "sign_cert": sign_cert}


@pytest.fixture
def memory_blank_sim(sock_path: Path) -> Iterator[RunningDaemon]:
    from tokend.simulators.memory import MemoryReader, MemoryWatcher

    card = initialised_sim(iccid="8949000000000000025")
    reader = MemoryReader("Memory Reader 0")
    reader.insert(card)
    running = start_daemon(sock_path, [MemoryWatcher(reader)])
    try:
        running.extras.update(card=card, slot=wait_for_token(running))
        yield running
    finally:
        stop_daemon(running)


def test_tokenctl_provisions_a_sim(memory_blank_sim, tmp_path) -> None:
    daemon = memory_blank_sim
    serial = "8949000000000000025"
    made = _provision_with_tokenctl(daemon, tmp_path, serial)
    status = json.loads(ok(ctl(daemon, "status", serial, "--json")).out)["status"]
    by_slot = {s["slot"]: s for s in status["slots"]}
    assert by_slot["00"]["origin"] == "imported" and by_slot["01"]["origin"] == "generated"
    assert by_slot["00"]["certificate"] is not None and by_slot["01"]["certificate"] is not None

    # The imported key decrypts, the generated key signs (tokenctl's own commands).
    secret = b"content-encryption key 32 bytes!"
    blob = tmp_path / "blob.bin"
    blob.write_bytes(made["enc_cert"].public_key().encrypt(secret, padding.PKCS1v15()))
    out = ok(ctl(daemon, "decrypt", "--token", serial, "--key", "encryption key",
                 "--in", str(blob), "--pin-fd", "{fd}", secrets=(PIN,))).out  # fmt: skip
    assert out == secret

    # A certificate request signed on the SIM, verifiable with openssl.
    request = tmp_path / "sign.csr"
    ok(ctl(daemon, "csr", "--slot", "sign", "--subject", "CN=Ann Example", "--token", serial,
           "--out", str(request), "--pin-fd", "{fd}", secrets=(PIN,)))  # fmt: skip
    verified = subprocess.run(
        ["openssl", "req", "-verify", "-noout", "-in", str(request)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr
    assert "CN" in subprocess.run(
        ["openssl", "req", "-noout", "-subject", "-in", str(request)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip

    # What a SIM cannot do is a clear error, not a silent success.
    ran = ctl(daemon, "puk", "change", "--token", serial, "--puk-fd", "{fd}",
              secrets=(PUK, "8765432187654321"))  # fmt: skip
    assert ran.rc == 1 and "PUK is set once" in ran.err
    ran = ctl(daemon, "keys", "generate", "--slot", "9c", "--alg", "rsa2048", "--token", serial,
              "--pin-fd", "{fd}", secrets=(PIN,))  # fmt: skip
    assert ran.rc != 0 and "encrypt (00), sign (01)" in ran.err
    ran = ctl(daemon, "keys", "generate", "--slot", "sign", "--alg", "p256", "--token", serial,
              "--pin-fd", "{fd}", secrets=(PIN,))  # fmt: skip
    assert ran.rc != 0


def test_pin_change_and_unblock_with_the_puk(memory_blank_sim) -> None:
    daemon, serial = memory_blank_sim, "8949000000000000025"
    ok(ctl(daemon, "pin", "change", "--token", serial, "--pin-fd", "{fd}",
           secrets=(PIN, "24680")))  # fmt: skip
    for _ in range(3):
        with Client(daemon.socket) as client:
            session = client.open_session(daemon.extras["slot"])
            with pytest.raises(Exception, match="PIN"):
                client.login(session, "0000")
    ok(ctl(daemon, "pin", "unblock", "--token", serial, "--puk-fd", "{fd}",
           secrets=(PUK, "13579")))  # fmt: skip
    with Client(daemon.socket) as client:
        session = client.open_session(daemon.extras["slot"])
        client.login(session, "13579")
    assert daemon.extras["card"].pin_tries_left == 3


def test_import_refused_by_an_applet_built_without_it(sock_path, tmp_path) -> None:
    from tokend.simulators.memory import MemoryReader, MemoryWatcher

    card = initialised_sim(iccid="8949000000000000033", import_allowed=False)
    reader = MemoryReader("Memory Reader 0")
    reader.insert(card)
    running = start_daemon(sock_path, [MemoryWatcher(reader)])
    try:
        wait_for_token(running)
        key = rsa.generate_private_key(65537, 2048)
        cert = _issue(_ca(), key.public_key(), "Ann")
        p12 = tmp_path / "enc.p12"
        p12.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"ann", key, cert, None, serialization.NoEncryption()
            )
        )
        ran = ctl(running, "import-p12", str(p12), "--slot", "encrypt", "--pin-fd", "{fd}",
                  "--password-fd", "{fd}", secrets=("", PIN))  # fmt: skip
        assert ran.rc == 1 and "built without key import" in ran.err
    finally:
        stop_daemon(running)


@pytest.mark.pcsc
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pkcs15-tool") is None, reason="OpenSC not installed")
def test_opensc_lists_and_decrypts_what_tokenctl_provisioned(vpcd, sock_path, tmp_path) -> None:
    from tokend.drivers.pcsc import PcscWatcher
    from tokend.simulators.pcscd import list_readers, wait_present

    card = initialised_sim(iccid="8949000000000000041")
    vpcd.plug(card, reader=1)
    wait_present(vpcd.reader(1))
    running = start_daemon(sock_path, [PcscWatcher(allow_virtual_readers=True)])
    try:
        wait_for_token(running)
        made = _provision_with_tokenctl(running, tmp_path, "8949000000000000041")
        with Client(running.socket) as client:
            session = client.open_session(wait_for_token(running))
            client.login(session, PIN)
            (key,) = client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_LABEL: "Encryption key"}
            )
            key_id = client.get_attributes(session, key, [CKA.CKA_ID])["CKA_ID"]
    finally:
        stop_daemon(running)
    reader = str((list_readers() or []).index(vpcd.reader(1)))
    listing = subprocess.run(
        ["pkcs15-tool", "--reader", reader, "--list-keys", "--list-certificates"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    for kind in ("Private RSA Key", "X.509 Certificate"):
        for label in ("Encryption key", "Signing key"):
            assert f"{kind} [{label}]" in listing
    secret = b"0123456789abcdef0123456789abcdef"
    (tmp_path / "enc.bin").write_bytes(
        made["enc_cert"].public_key().encrypt(secret, padding.PKCS1v15())
    )
    from tokend.protocol import unb64

    subprocess.run(
        ["pkcs11-tool", "--module", str(OPENSC_PKCS11), "--slot-index", reader, "--login",
         "--pin", PIN, "--decrypt", "-m", "RSA-PKCS", "--id", unb64(key_id).hex(),
         "-i", str(tmp_path / "enc.bin"), "-o", str(tmp_path / "dec.bin")],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    assert (tmp_path / "dec.bin").read_bytes() == secret


def test_retired_keys_listed_and_pruned_renewal_refused(memory_sim, tmp_path) -> None:  # noqa: F811
    daemon = memory_sim
    demo, card = daemon.extras["demo"], daemon.extras["card"]
    retired_before = card.applet.keys[2].private_numbers()
    listing = ok(ctl(daemon, "retired", "list"))
    assert listing.out.decode().startswith("02  ") and "1 of 14 retired slots used" in listing.err

    # Renewal needs a key moved between references: the applet cannot, tokenctl says so.
    key = rsa.generate_private_key(65537, 2048)
    cert = _issue(_ca(), key.public_key(), "Ann 2029")
    p12 = tmp_path / "new.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(b"ann", key, cert, None, serialization.NoEncryption())
    )
    ran = ctl(daemon, "renew-encryption", str(p12), "--pin-fd", "{fd}", "--password-fd", "{fd}",
              secrets=("", PIN))  # fmt: skip
    assert ran.rc == 1 and "cannot move a key" in ran.err
    assert card.applet.keys[0].public_key() == demo.encryption_public_key  # untouched

    ok(ctl(daemon, "retired", "prune", "--before", "2999-01-01", "--yes", "--pin-fd", "{fd}",
           secrets=(PIN,)))  # fmt: skip
    status = json.loads(ok(ctl(daemon, "status", "--json")).out)["status"]
    assert [s["slot"] for s in status["slots"]] == ["00", "01"]
    # The applet has no delete: the old key material was overwritten, not just unlisted.
    assert card.applet.keys[2].private_numbers() != retired_before


def test_tokend_serve_simulate_sim(sock_path, tmp_path) -> None:
    """`tokend serve --simulate sim`: the demo SIM in-process, its certificates exported;
    mail encrypted to the exported certificate decrypts through the socket."""
    import signal
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc", "--simulate",
         "sim", "--socket", str(sock_path), "--export-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists():  # a new process: nothing to wait on but the file
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "tokend did not start"
            time.sleep(0.02)
        cert = x509.load_pem_x509_certificate((tmp_path / "encryption.pem").read_bytes())
        public = cert.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        blob = public.encrypt(b"k" * 32, padding.PKCS1v15())
        with Client(sock_path) as client:
            while not client.slot_list(token_present=True):  # the SIM may still be probed
                assert time.monotonic() < deadline, "tokend did not list the SIM"
                time.sleep(0.02)
            (slot,) = client.slot_list(token_present=True)
            assert client.token_info(slot)["applet"] == "SIM-PKI"
            session = client.open_session(slot)
            client.login(session, PIN)
            (key,) = client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_LABEL: "Encryption key"}
            )
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == b"k" * 32
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert PUK not in out  # demo secrets never logged (the 4-digit PIN could match an ICCID)
