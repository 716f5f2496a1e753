"""OpenSC as the outside judge of the virtual SIM: a blank SIM on vpcd, personalised by
OpenSC 0.23's pkcs15-init alone (its isoApplet driver and profile), then used through
OpenSC's PKCS#11 module — and the files it wrote parsed by tokend's PKCS#15 code."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from tests.conftest import start_daemon, stop_daemon, wait_for_token
from tokend import pkcs15
from tokend.client import Client
from tokend.drivers.pcsc import PcscWatcher
from tokend.iso7816 import ApduChannel
from tokend.pkcs11 import CKA
from tokend.protocol import unb64
from tokend.sim import codes as sc
from tokend.sim import commands as cmd
from tokend.simulators.pcscd import list_readers
from tokend.simulators.sim import VirtualSim

pytestmark = [pytest.mark.pcsc, pytest.mark.slow]

OPENSC_PKCS11 = Path("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")
SO_PIN = "123456"
SO_PUK = "0123456789abcdef"  # exactly 16: the applet's PUK length

if shutil.which("pkcs15-init") is None or not OPENSC_PKCS11.exists():
    pytest.skip("OpenSC (Debian package opensc) is not installed", allow_module_level=True)


def run(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def reader_index(name: str) -> str:
    readers = list_readers() or []
    return str(readers.index(name))


def certificate_for(public_pem: bytes, name: str) -> bytes:
    public_key = serialization.load_pem_public_key(public_pem)
    assert isinstance(public_key, rsa.RSAPublicKey)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def read_file(channel: ApduChannel, path: bytes) -> bytes:
    size = cmd.fcp_size(channel.send(cmd.select_path(path, fcp=True)).check()) or 0
    out = b""
    while len(out) < size:
        out += channel.send(cmd.read_binary(len(out), min(256, size - len(out)))).check()
    return out


def test_blank_sim_personalised_by_opensc_alone(vpcd, tmp_path) -> None:
    card = VirtualSim(state_file=tmp_path / "sim.json")  # --provision none: a blank applet
    vpcd.plug(card, reader=1)
    reader = reader_index(vpcd.reader(1))

    assert "IsoApplet" in run("opensc-tool", "--reader", reader, "--name")
    run(
        "pkcs15-init", "--reader", reader, "--create-pkcs15",
        "--so-pin", SO_PIN, "--so-puk", SO_PUK,
    )  # fmt: skip
    run(
        "pkcs15-init", "--reader", reader, "--generate-key", "rsa/2048",
        "--key-usage", "sign,decrypt", "--auth-id", "FF", "--pin", SO_PIN,
        "--id", "01", "--label", "mail key",
    )  # fmt: skip
    public_pem = tmp_path / "pub.pem"
    run("pkcs15-tool", "--reader", reader, "--read-public-key", "01", "-o", str(public_pem))
    cert_pem = tmp_path / "alice.pem"
    cert_pem.write_bytes(certificate_for(public_pem.read_bytes(), "Alice"))
    run(
        "pkcs15-init", "--reader", reader, "--store-certificate", str(cert_pem),
        "--id", "01", "--pin", SO_PIN, "--label", "Alice",
    )  # fmt: skip

    listing = run("pkcs15-tool", "--reader", reader, "--list-keys", "--list-certificates")
    assert "Private RSA Key [Alice]" in listing and "X.509 Certificate [Alice]" in listing

    # OpenSC's PKCS#11 module decrypts with the key the card generated.
    public_key = serialization.load_pem_public_key(public_pem.read_bytes())
    assert isinstance(public_key, rsa.RSAPublicKey)
    secret = b"a 32-byte content-encryption key"
    (tmp_path / "enc.bin").write_bytes(public_key.encrypt(secret, padding.PKCS1v15()))
    run(
        "pkcs11-tool", "--module", str(OPENSC_PKCS11), "--slot-index", reader,
        "--login", "--pin", SO_PIN, "--decrypt", "-m", "RSA-PKCS", "--id", "01",
        "-i", str(tmp_path / "enc.bin"), "-o", str(tmp_path / "dec.bin"),
    )  # fmt: skip
    assert (tmp_path / "dec.bin").read_bytes() == secret

    # tokend lists what OpenSC made and decrypts with the key OpenSC had the card generate.
    sock = Path(tempfile.mkdtemp(prefix="tokend-")) / "tokend.sock"
    running = start_daemon(sock, [PcscWatcher(allow_virtual_readers=True)])
    try:
        slot = wait_for_token(running)
        with Client(sock) as client:
            assert client.token_info(slot)["token_serial"] == card.iccid
            session = client.open_session(slot)
            client.login(session, SO_PIN)  # pkcs15-init's "SO PIN" is the applet's PIN
            (key,) = client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: b"\x01"}
            )
            attrs = client.get_attributes(session, key, [CKA.CKA_LABEL, CKA.CKA_LOCAL])
            assert attrs["CKA_LABEL"] == "Alice" and attrs["CKA_LOCAL"] is True
            blob = public_key.encrypt(secret, padding.PKCS1v15())
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
            (cert,) = client.find_objects(session, {CKA.CKA_CLASS: "CKO_CERTIFICATE"})
            value = client.get_attributes(session, cert, [CKA.CKA_VALUE])["CKA_VALUE"]
            assert x509.load_der_x509_certificate(unb64(value)).public_key() == public_key
    finally:
        stop_daemon(running)
    vpcd.unplug_all()

    # What OpenSC wrote, read back through tokend's own PKCS#15 parsers.
    card.reset()
    channel = ApduChannel(card.process, extended=False)
    channel.send(cmd.select_aid()).check()
    (app,) = pkcs15.parse_dir(read_file(channel, b"\x2f\x00"))
    odf = {e.kind: e.path for e in pkcs15.parse_odf(read_file(channel, app.path + b"\x50\x31"))}
    (key,) = pkcs15.parse_prkdf(read_file(channel, odf[pkcs15.OdfKind.PRIVATE_KEYS]))
    assert (key.id, key.key_reference, key.label) == (b"\x01", 0, "Alice")
    (pin,) = pkcs15.parse_aodf(read_file(channel, odf[pkcs15.OdfKind.AUTH_OBJECTS]))
    assert (pin.reference, pin.auth_id) == (sc.PinRef.PIN, b"\xff")
    (cert,) = pkcs15.parse_cdf(read_file(channel, odf[pkcs15.OdfKind.CERTIFICATES]))
    der = read_file(channel, cert.path or b"")
    assert x509.load_der_x509_certificate(der).public_key() == public_key
    # The state file kept what OpenSC did: the same SIM comes back personalised.
    again = VirtualSim(state_file=tmp_path / "sim.json")
    assert again.iccid == card.iccid and again.pin_tries_left == 3
