"""Acceptance: a virtual PIV card on vpcd reader 0 and a virtual SIM on reader 1 at the same
time, behind real pcscd. `tokenctl list` shows both; mail encrypted with `openssl cms
-encrypt` (PKCS#1 v1.5, the OpenSSL default) to each token's encryption certificate
decrypts through the daemon; signatures made with each token verify with `openssl`; pulling
the SIM stops its sessions at once while the PIV token keeps working without one failure."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding

from tests.conftest import RunningDaemon, start_daemon, stop_daemon, wait_for_token
from tests.helpers import ID_9D, PIN, pkcs1_blob, private_key
from tests.test_provisioning import ctl, ok
from tokend.client import Client
from tokend.errors import DeviceRemovedError, SessionHandleInvalidError
from tokend.pkcs11 import CKA

pytestmark = [pytest.mark.pcsc, pytest.mark.slow]

SIM_PIN = "1234"


@pytest.fixture
def two_tokens(vpcd, sock_path: Path) -> Iterator[RunningDaemon]:
    from tokend.drivers.pcsc import PcscWatcher
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.pcscd import wait_present
    from tokend.simulators.piv import VirtualPivCard
    from tokend.simulators.sim import VirtualSim
    from tokend.simulators.sim_demo import provision_sim_demo

    piv, sim = VirtualPivCard(), VirtualSim()
    piv_demo, sim_demo = provision_demo(piv), provision_sim_demo(sim)
    vpcd.plug(piv, reader=0)
    sim_connection = vpcd.plug(sim, reader=1)
    wait_present(vpcd.reader(0))
    running = start_daemon(sock_path, [PcscWatcher(allow_virtual_readers=True)])
    try:
        wait_for_token(running)
        deadline = time.monotonic() + 10
        with Client(running.socket) as client:
            while len(client.slot_list(token_present=True)) < 2:
                assert time.monotonic() < deadline, "the daemon did not see both tokens"
                time.sleep(0.05)
            slots = {client.token_info(s)["token_serial"]: s for s in client.slot_list(True)}
        running.extras.update(
            piv_demo=piv_demo,
            sim_demo=sim_demo,
            piv_slot=slots[piv_demo.guid.hex()],
            sim_slot=slots[sim_demo.iccid],
            sim_connection=sim_connection,
        )
        yield running
    finally:
        stop_daemon(running)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def test_both_tokens_decrypt_mail_and_sign(two_tokens, tmp_path) -> None:
    d = two_tokens.extras
    listing = ok(ctl(two_tokens, "list")).out.decode()
    assert d["piv_demo"].guid.hex() in listing and d["sim_demo"].iccid in listing

    message = tmp_path / "message.txt"
    message.write_text("Subject: hello\n\nthe same mail to both tokens\n")
    for name, demo, serial, pin in (
        ("piv", d["piv_demo"], d["piv_demo"].guid.hex(), PIN),
        ("sim", d["sim_demo"], d["sim_demo"].iccid, SIM_PIN),
    ):
        recipient = tmp_path / f"{name}-encryption.pem"
        recipient.write_bytes(demo.encryption_cert.public_bytes(serialization.Encoding.PEM))
        mail = tmp_path / f"{name}.p7m"
        _openssl("cms", "-encrypt", "-aes256", "-recip", str(recipient), "-in", str(message),
                 "-out", str(mail))  # fmt: skip
        ran = ok(ctl(two_tokens, "smime-decrypt", str(mail), "--token", serial,
                     "--pin-fd", "{fd}", secrets=(pin,)))  # fmt: skip
        assert b"the same mail to both tokens" in ran.out

    # Signatures: the SIM's RSA signing key (generated on the SIM), the PIV's P-256 key.
    data = tmp_path / "data.bin"
    data.write_bytes(b"signed by a hardware key")
    for name, demo, serial, pin, key, extra in (
        ("sim", d["sim_demo"], d["sim_demo"].iccid, SIM_PIN, "Signing key", ()),
        ("piv", d["piv_demo"], d["piv_demo"].guid.hex(), PIN, "9c", ("--der",)),
    ):
        signature = tmp_path / f"{name}.sig"
        mechanism = "sha256-rsa-pkcs" if name == "sim" else "ecdsa-sha256"
        ok(ctl(two_tokens, "sign", "--token", serial, "--key", key, "--mechanism", mechanism,
               "--in", str(data), "--out", str(signature), "--pin-fd", "{fd}", *extra,
               secrets=(pin, pin)))  # fmt: skip
        public = tmp_path / f"{name}-signing.pem"
        public.write_bytes(
            demo.signing_cert.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        _openssl("dgst", "-sha256", "-verify", str(public), "-signature", str(signature),
                 str(data))  # fmt: skip


def test_pulling_the_sim_leaves_the_piv_token_working(two_tokens) -> None:
    d = two_tokens.extras
    sim_blob, _ = pkcs1_blob(d["sim_demo"].encryption_public_key)
    failures: list[BaseException] = []
    done = threading.Event()
    calls = 0

    def piv_mail_client() -> None:
        nonlocal calls
        with Client(two_tokens.socket) as client:
            session = client.open_session(d["piv_slot"])
            client.login(session, PIN)
            key = private_key(client, session, ID_9D)
            while not done.is_set():
                blob, secret = pkcs1_blob(d["piv_demo"].encryption_public_key)
                try:
                    assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
                    calls += 1
                except BaseException as exc:
                    failures.append(exc)
                    return

    with Client(two_tokens.socket) as sim_client, Client(two_tokens.socket) as watcher:
        watcher.subscribe()
        session = sim_client.open_session(d["sim_slot"])
        sim_client.login(session, SIM_PIN)
        (key,) = sim_client.find_objects(
            session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_LABEL: "Encryption key"}
        )
        thread = threading.Thread(target=piv_mail_client)
        thread.start()
        time.sleep(0.3)
        pulled = time.monotonic()
        d["sim_connection"].unplug()
        event = watcher.next_event(timeout=2)
        latency = time.monotonic() - pulled
        with pytest.raises(DeviceRemovedError):
            sim_client.decrypt(session, key, "CKM_RSA_PKCS", sim_blob)
        with pytest.raises(SessionHandleInvalidError):
            sim_client.decrypt(session, key, "CKM_RSA_PKCS", sim_blob)
        time.sleep(0.3)
        done.set()
        thread.join(timeout=10)
    assert event["event"] == "left" and event["slot_id"] == d["sim_slot"]
    assert event["serial"] == d["sim_demo"].iccid
    assert latency < 0.5, f"left event {latency * 1000:.0f} ms after the pull"
    assert failures == [] and calls > 0
    print(f"SIM left event after {latency * 1000:.0f} ms; {calls} PIV decryptions, 0 failed")


def test_simulate_stack_with_piv_and_sim(vpcd) -> None:
    """`tokend simulate --piv --sim`: both tokens on vpcd readers 0 and 1 behind a private
    daemon; the SIM decrypts mail to its exported certificate; `unplug sim0` pulls it."""
    import sys

    from cryptography import x509

    from tests.test_simulate_stack import control

    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "--piv", "--sim"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        env: dict[str, str] = {}
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("export "):
                name, _, value = line[len("export ") :].strip().partition("=")
                env[name] = value
            if line.strip() == "READY":
                break
        assert env["TOKEND_DEMO_SIM_PIN"] == SIM_PIN
        cert = Path(env["TOKEND_DEMO_DIR"], "sim", "encryption.pem").read_bytes()
        public = x509.load_pem_x509_certificate(cert).public_key()
        blob = public.encrypt(b"content key", padding.PKCS1v15())  # type: ignore[union-attr]
        with Client(env["TOKEND_SOCKET"]) as client:
            slots = client.slot_list(token_present=True)
            applets = {client.token_info(s)["applet"]: s for s in slots}
            assert set(applets) == {"PIV", "SIM-PKI"}
            session = client.open_session(applets["SIM-PKI"])
            client.login(session, SIM_PIN)
            (key,) = client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_LABEL: "Encryption key"}
            )
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == b"content key"
            client.subscribe()
            assert control(proc, "unplug sim0") == "ok unplug sim0"
            event = client.next_event(timeout=5)
            assert event["event"] == "left" and event["slot_id"] == applets["SIM-PKI"]
            assert client.slot_list(token_present=True) == [applets["PIV"]]
        listing = control(proc, "list")
        assert "piv0 piv plugged" in listing and "sim0 sim unplugged" in listing
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(30)
