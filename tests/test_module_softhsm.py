"""Vendor PKCS#11 modules end to end, with SoftHSM2 as the module: the fixture makes a
private token directory and SOFTHSM2_CONF, creates the token with softhsm2-util and puts
the mail keys on it through the module (imported RSA encryption key, P-256 keys generated
on the token). The daemon loads the real libsofthsm2.so through python-pkcs11; tests talk
to it through its socket, with the client library and with `tokenctl`, and check the
results with `cryptography` and `openssl`."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import MemoryPlug, RunningDaemon, start_daemon, stop_daemon
from tests.helpers import OAEP_SHA1, OAEP_SHA256, oaep_blob, pkcs1_blob
from tests.test_provisioning import ctl, ok, openssl
from tokend.client import AsyncClient, Client
from tokend.drivers.pkcs11_module import POLL_INTERVAL_S
from tokend.errors import (
    ArgumentsBadError,
    DeviceError,
    DeviceRemovedError,
    FunctionFailedError,
    KeyHandleInvalidError,
    PinIncorrectError,
    SessionHandleInvalidError,
    TokendError,
    TokenNotPresentError,
    UserNotLoggedInError,
)
from tokend.model import Ecdh1DeriveParams, Mechanism, PssParams
from tokend.pkcs11 import CKA, CKD, CKG, CKM
from tokend.protocol import unb64
from tokend.simulators.softhsm import (
    ENCRYPTION_ID,
    KEY_AGREEMENT_ID,
    SIGNING_ID,
    SOFTHSM_MODULE,
    SoftHsm,
    SoftHsmMaterial,
    provision_mail,
    unavailable_reason,
)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

LABEL = "mail"


def _short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tokend-hsm-"))


@pytest.fixture
def softhsm(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SoftHsm, SoftHsmMaterial]]:
    work = _short_dir()
    hsm = SoftHsm.create(work)
    monkeypatch.setenv("SOFTHSM2_CONF", str(hsm.conf))
    hsm.init_token(LABEL)
    material = provision_mail(LABEL)
    try:
        yield hsm, material
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _watcher(**kw: object):  # type: ignore[no-untyped-def]
    from tokend.drivers.pkcs11_module import ModuleConfig, ModuleWatcher

    return ModuleWatcher(ModuleConfig(SOFTHSM_MODULE, "softhsm", **kw))  # type: ignore[arg-type]


def wait_slots(daemon: RunningDaemon, count: int, timeout: float = 10.0) -> list[int]:
    """The present slots, once there are ``count`` of them (the module watcher reports its
    tokens after its first poll, not at start)."""
    deadline = time.monotonic() + timeout
    with Client(daemon.socket) as client:
        while True:
            slots = client.slot_list(token_present=True)
            if len(slots) >= count:
                return slots
            assert time.monotonic() < deadline, f"only {slots} present"
            time.sleep(0.02)  # nothing to wait on from outside the daemon


def module_slot(client: Client) -> int:
    for slot in client.slot_list(token_present=True):
        if client.slot_info(slot)["slot_description"].startswith("softhsm slot 0x"):
            return slot
    raise AssertionError("no module slot")


@pytest.fixture
def module_daemon(softhsm, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    hsm, material = softhsm
    running = start_daemon(sock_path, [_watcher()])
    try:
        wait_slots(running, 1)
        running.extras.update(hsm=hsm, material=material)
        yield running
    finally:
        stop_daemon(running)


@pytest.fixture
def mixed_daemon(softhsm, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    """A virtual PIV token (in-process reader) and the SoftHSM2 token side by side."""
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard

    hsm, material = softhsm
    card = VirtualPivCard()
    demo = provision_demo(card, key_agreement=True)
    reader = MemoryReader("Memory Reader 0")
    MemoryPlug(reader).insert(card)
    running = start_daemon(sock_path, [MemoryWatcher(reader), _watcher()])
    try:
        wait_slots(running, 2)
        running.extras.update(hsm=hsm, material=material, demo=demo)
        yield running
    finally:
        stop_daemon(running)


def _login(client: Client, slot: int, pin: str) -> int:
    session = client.open_session(slot)
    client.login(session, pin)
    return session


def _key(client: Client, session: int, key_id: bytes) -> int:
    found = client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: key_id})
    assert len(found) == 1
    return found[0]


# --- what a mail client does ---------------------------------------------------------------


def test_module_token_shows_its_certificates_and_hides_keys_until_login(module_daemon) -> None:
    material: SoftHsmMaterial = module_daemon.extras["material"]
    with Client(module_daemon.socket) as client:
        slot = module_slot(client)
        info = client.token_info(slot)
        assert info["label"] == LABEL and info["token_serial"] == material.serial
        assert client.slot_info(slot)["slot_description"] == f"softhsm slot {material.slot_id:#x}"
        session = client.open_session(slot)
        certs = client.find_objects(session, {CKA.CKA_CLASS: "CKO_CERTIFICATE"})
        ders = {
            unb64(client.get_attributes(session, h, [CKA.CKA_VALUE])["CKA_VALUE"]) for h in certs
        }
        for cert in (material.encryption_cert, material.signing_cert, material.key_agreement_cert):
            assert cert.public_bytes(Encoding.DER) in ders
        assert client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []
        client.login(session, material.pin)
        assert len(client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"})) == 3
        key = _key(client, session, ENCRYPTION_ID)
        attrs = client.get_attributes(
            session, key, [CKA.CKA_KEY_TYPE, CKA.CKA_DECRYPT, CKA.CKA_SIGN, CKA.CKA_SENSITIVE]
        )
        assert attrs == {
            "CKA_KEY_TYPE": "CKK_RSA",
            "CKA_DECRYPT": True,
            "CKA_SIGN": False,
            "CKA_SENSITIVE": True,
        }
        mechanisms = set(client.call("C_GetMechanismList", {"slot_id": slot})["mechanism_list"])
        assert {"CKM_RSA_PKCS", "CKM_RSA_PKCS_OAEP", "CKM_ECDSA", "CKM_ECDH1_DERIVE"} <= mechanisms


@pytest.mark.parametrize(
    ("mechanism", "algorithm"),
    [("CKM_RSA_PKCS", None), (OAEP_SHA1, hashes.SHA1())],
    ids=["pkcs1", "oaep-sha1"],
)
def test_decrypts_key_transport(module_daemon, mechanism, algorithm) -> None:
    material: SoftHsmMaterial = module_daemon.extras["material"]
    public = material.encryption_cert.public_key()
    blob, secret = pkcs1_blob(public) if algorithm is None else oaep_blob(public, algorithm)
    with Client(module_daemon.socket) as client:
        session = _login(client, module_slot(client), material.pin)
        key = _key(client, session, ENCRYPTION_ID)
        assert client.decrypt(session, key, mechanism, blob) == secret


def test_what_the_module_refuses_is_refused_with_its_code(module_daemon) -> None:
    """SoftHSM2 2.6.1 does OAEP with SHA-1 only: its CKR_ARGUMENTS_BAD for SHA-256 is passed
    through as it is, not papered over."""
    material: SoftHsmMaterial = module_daemon.extras["material"]
    blob, _secret = oaep_blob(material.encryption_cert.public_key(), hashes.SHA256())
    with Client(module_daemon.socket) as client:
        session = _login(client, module_slot(client), material.pin)
        key = _key(client, session, ENCRYPTION_ID)
        with pytest.raises(ArgumentsBadError):
            client.decrypt(session, key, OAEP_SHA256, blob)


def test_signs_ecdsa_and_the_signature_verifies(module_daemon) -> None:
    material: SoftHsmMaterial = module_daemon.extras["material"]
    public = material.signing_cert.public_key()
    message = b"a mail body"
    with Client(module_daemon.socket) as client:
        session = _login(client, module_slot(client), material.pin)
        key = _key(client, session, SIGNING_ID)
        for raw, hashed in (
            (client.sign(session, key, "CKM_ECDSA_SHA256", message), message),
            (client.sign(session, key, "CKM_ECDSA", hashlib.sha256(message).digest()), message),
        ):
            r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            public.verify(utils.encode_dss_signature(r, s), hashed, ec.ECDSA(hashes.SHA256()))
        # The encryption key may not sign: the module's own attribute, passed through.
        with pytest.raises(Exception) as refused:
            client.sign(session, _key(client, session, ENCRYPTION_ID), "CKM_SHA256_RSA_PKCS", b"x")
        assert refused.value.ckr_name == "CKR_KEY_FUNCTION_NOT_PERMITTED"  # type: ignore[attr-defined]


def test_ecdh_derive_matches_local_agreement(module_daemon) -> None:
    material: SoftHsmMaterial = module_daemon.extras["material"]
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    expected = ephemeral.exchange(ec.ECDH(), material.key_agreement_cert.public_key())
    with Client(module_daemon.socket) as client:
        session = _login(client, module_slot(client), material.pin)
        key = _key(client, session, KEY_AGREEMENT_ID)
        mech = Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, point))
        assert client.derive(session, key, mech) == expected


_DIRECT = """
import sys, pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
lib = pkcs11.lib(sys.argv[1])
with lib.get_token(token_label=sys.argv[2]).open(user_pin=sys.argv[3]) as s:
    key = next(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: b"\\x01"}))
    try:
        key.decrypt(bytes.fromhex(sys.argv[4]), mechanism=Mechanism.RSA_PKCS)
        print("ok")
    except pkcs11.PKCS11Error as exc:
        print(type(exc).__name__)
"""


def _direct_answer(hsm: SoftHsm, pin: str, data: bytes) -> str:
    """What the module says to the same call made in a process of its own (python-pkcs11)."""
    done = subprocess.run(
        [sys.executable, "-c", _DIRECT, str(SOFTHSM_MODULE), LABEL, pin, data.hex()],
        env=hsm.env(), capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return done.stdout.strip()


def test_module_errors_keep_their_ckr(module_daemon) -> None:
    """The module's own refusals cross the socket with the module's own CKR: the same call
    made directly (another process, python-pkcs11) fails with the same code."""
    from pkcs11 import exceptions as p11x

    from tokend.drivers.pkcs11_module import ckr_of

    material: SoftHsmMaterial = module_daemon.extras["material"]
    hsm: SoftHsm = module_daemon.extras["hsm"]
    with Client(module_daemon.socket) as client:
        session = _login(client, module_slot(client), material.pin)
        key = _key(client, session, ENCRYPTION_ID)
        for data in (b"\x01" * 17, b"\x01" * 256):
            with pytest.raises(TokendError) as ours:
                client.decrypt(session, key, "CKM_RSA_PKCS", data)
            theirs = _direct_answer(hsm, material.pin, data)
            assert ours.value.ckr == ckr_of(getattr(p11x, theirs)()), (ours.value, theirs)
        # and the session works on afterwards
        blob, secret = pkcs1_blob(material.encryption_cert.public_key())
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret


async def test_parallel_decrypts_from_many_clients(module_daemon) -> None:
    """Eight clients at once on one module token (several module sessions in parallel)."""
    import asyncio

    material: SoftHsmMaterial = module_daemon.extras["material"]
    blob, secret = pkcs1_blob(material.encryption_cert.public_key())
    with Client(module_daemon.socket) as probe:
        slot = module_slot(probe)

    async def one() -> list[bytes]:
        async with await AsyncClient.connect(module_daemon.socket) as client:
            session = await client.open_session(slot)
            await client.login(session, material.pin)
            (key,) = await client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: ENCRYPTION_ID}
            )
            return [await client.decrypt(session, key, "CKM_RSA_PKCS", blob) for _ in range(10)]

    results = await asyncio.gather(*(one() for _ in range(8)))
    assert all(r == secret for batch in results for r in batch)
    instance = module_daemon.run(_instance(module_daemon))
    assert instance.token.workers > 1  # SoftHSM2 takes OS locking: parallel calls allowed


async def _instance(daemon: RunningDaemon):  # type: ignore[no-untyped-def]
    registry = daemon.daemon.engine.registry
    for slot in registry.slots():
        if slot.token_present and slot.reader.startswith("softhsm"):
            return slot.instance
    raise AssertionError("no module token")


# --- per-client login on the module's per-process login --------------------------------------


def test_client_b_never_rides_client_a_login(module_daemon, caplog) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    material: SoftHsmMaterial = module_daemon.extras["material"]
    blob, secret = pkcs1_blob(material.encryption_cert.public_key())
    with Client(module_daemon.socket) as a, Client(module_daemon.socket) as b:
        slot = module_slot(a)
        sa = _login(a, slot, material.pin)
        key_a = _key(a, sa, ENCRYPTION_ID)
        assert a.decrypt(sa, key_a, "CKM_RSA_PKCS", blob) == secret
        # B: same token, no login. The module is logged in (per process), B is not.
        sb = b.open_session(slot)
        assert b.find_objects(sb, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []
        with pytest.raises((KeyHandleInvalidError, UserNotLoggedInError)):
            b.decrypt(sb, key_a, "CKM_RSA_PKCS", blob)
        # B's wrong PIN reaches the module: refused, and (as a failed VERIFY on a card) it
        # ends the module's login, so A is told to log in again rather than served on.
        with pytest.raises(PinIncorrectError):
            b.login(sb, "999999")
        with pytest.raises(UserNotLoggedInError):
            a.decrypt(sa, key_a, "CKM_RSA_PKCS", blob)
        a.login(sa, material.pin)  # A, logged out by B's mistake, may log in again at once
        # B, whose wrong PIN logged A out, is held back for a moment (docs/threat-model.md)
        with pytest.raises(FunctionFailedError) as held:  # the client: CKR_FUNCTION_FAILED
            b.login(sb, material.pin)
        time.sleep(held.value.retry_after + 0.05)  # the daemon's own figure, not a guess
        b.login(sb, material.pin)
        key_b = _key(b, sb, ENCRYPTION_ID)
        assert a.decrypt(sa, key_a, "CKM_RSA_PKCS", blob) == secret
        # A logs out: B keeps its own login; the module stays logged in for B.
        a.logout(sa)
        with pytest.raises(UserNotLoggedInError):
            a.decrypt(sa, key_a, "CKM_RSA_PKCS", blob)
        assert b.decrypt(sb, key_b, "CKM_RSA_PKCS", blob) == secret
        assert module_daemon.run(_module_sees_private_keys(module_daemon))
        # B, the last one, logs out: the module itself is logged out.
        b.logout(sb)
        assert not module_daemon.run(_module_sees_private_keys(module_daemon))
        with pytest.raises(UserNotLoggedInError):
            b.decrypt(sb, key_b, "CKM_RSA_PKCS", blob)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert material.pin not in logged and "999999" not in logged  # PINs never logged


async def _module_sees_private_keys(daemon: RunningDaemon) -> bool:
    """Asked of the module itself, on a session of its own: is the process logged in?"""
    import pkcs11

    instance = await _instance(daemon)

    def ask() -> bool:
        session = instance.token._control
        template = {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
        with instance.token.exclusive():  # not in the middle of the driver's C_Logout
            return bool(list(session.get_objects(template)))

    return await instance.run(ask)


def test_client_leaving_is_its_last_logout(module_daemon) -> None:
    material: SoftHsmMaterial = module_daemon.extras["material"]
    with Client(module_daemon.socket) as a:
        _login(a, module_slot(a), material.pin)
        assert module_daemon.run(_module_sees_private_keys(module_daemon))
    deadline = time.monotonic() + 5
    while module_daemon.run(_module_sees_private_keys(module_daemon)):
        assert time.monotonic() < deadline, "the module stayed logged in after the client left"
        time.sleep(0.02)


# --- removal by the module's own means: the disconnect rule ------------------------------------


def test_deleted_token_is_a_disconnect(module_daemon) -> None:
    material: SoftHsmMaterial = module_daemon.extras["material"]
    hsm: SoftHsm = module_daemon.extras["hsm"]
    blob, secret = pkcs1_blob(material.encryption_cert.public_key())
    with Client(module_daemon.socket) as client, Client(module_daemon.socket) as watcher:
        watcher.subscribe()
        slot = module_slot(client)
        session = _login(client, slot, material.pin)
        key = _key(client, session, ENCRYPTION_ID)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
        started = time.monotonic()
        hsm.delete_token(LABEL)
        event = watcher.next_event(timeout=5)
        took = time.monotonic() - started
        assert event["event"] == "left" and event["slot_id"] == slot
        # one poll interval (0.5 s) after softhsm2-util is done; generous for a busy machine
        assert took < 0.5 + 2.5
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert slot in client.slot_list(token_present=False)  # the slot stays
        assert slot not in client.slot_list(token_present=True)


def test_reinitialised_token_is_a_new_instance_without_logins(module_daemon) -> None:
    material: SoftHsmMaterial = module_daemon.extras["material"]
    hsm: SoftHsm = module_daemon.extras["hsm"]
    blob, _secret = pkcs1_blob(material.encryption_cert.public_key())
    with Client(module_daemon.socket) as client, Client(module_daemon.socket) as watcher:
        watcher.subscribe()
        slot = module_slot(client)
        generation = client.token_info(slot)["generation"]
        session = _login(client, slot, material.pin)
        key = _key(client, session, ENCRYPTION_ID)
        hsm.reinit_token(material.slot_id, LABEL, "112233")
        events = [watcher.next_event(timeout=5), watcher.next_event(timeout=5)]
        assert [e["event"] for e in events] == ["left", "arrived"]
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert client.token_info(slot)["generation"] > generation
        fresh = client.open_session(slot)
        state = client.call("C_GetSessionInfo", {"h_session": fresh})["info"]["state"]
        assert state == "CKS_RO_PUBLIC_SESSION"  # no login came back with the token
        with pytest.raises((KeyHandleInvalidError, UserNotLoggedInError)):
            client.decrypt(fresh, key, "CKM_RSA_PKCS", blob)
        assert client.find_objects(fresh, {}) == []  # everything went with the old token


# --- a module token and a PIV token side by side: the same mail tests ----------------------------


def test_tokenctl_lists_piv_and_module_tokens_side_by_side(mixed_daemon) -> None:
    material: SoftHsmMaterial = mixed_daemon.extras["material"]
    demo = mixed_daemon.extras["demo"]
    out = ok(ctl(mixed_daemon, "list")).out.decode()
    lines = out.strip().splitlines()
    assert len(lines) == 2, out
    assert any("Memory Reader 0" in line and demo.guid.hex() in line for line in lines), out
    assert any(
        f"softhsm slot {material.slot_id:#x}" in line and material.serial in line for line in lines
    ), out


@dataclass(frozen=True)
class MailToken:
    """What the mail tests need of one token: how tokenctl selects it, its PIN, the
    certificates mail is encrypted to, the CA, and how many PINs a signature takes."""

    selector: str
    pin: str
    rsa_cert: object
    ec_cert: object
    ca_cert: object
    sign_pins: int


def _mail_token(daemon: RunningDaemon, kind: str) -> MailToken:
    if kind == "piv":
        demo = daemon.extras["demo"]
        # 9C is PIN-always: the PIN once for the login, once with the signature
        return MailToken(
            demo.guid.hex(), "123456", demo.encryption_cert, demo.authentication_cert,
            demo.ca_cert, 2,
        )  # fmt: skip
    material: SoftHsmMaterial = daemon.extras["material"]
    return MailToken(
        material.serial, material.pin, material.encryption_cert, material.key_agreement_cert,
        material.ca_cert, 1,
    )  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
@pytest.mark.parametrize("kind", ["piv", "softhsm"])
def test_mail_decrypt_and_sign_on_each_token(mixed_daemon, kind: str, tmp_path: Path) -> None:
    """The same mail tests on the PIV token and on the module token: `tokenctl smime
    decrypt` opens what `openssl cms -encrypt` made for the token's certificates (RSA
    PKCS#1 v1.5, RSA-OAEP, ECDH P-256), and what `tokenctl smime sign` signs verifies with
    `openssl cms -verify` against the CA."""
    token = _mail_token(mixed_daemon, kind)
    pem = serialization.Encoding.PEM
    (tmp_path / "rsa.pem").write_bytes(token.rsa_cert.public_bytes(pem))  # type: ignore[attr-defined]
    (tmp_path / "ec.pem").write_bytes(token.ec_cert.public_bytes(pem))  # type: ignore[attr-defined]
    (tmp_path / "ca.pem").write_bytes(token.ca_cert.public_bytes(pem))  # type: ignore[attr-defined]
    text = b"Content-Type: text/plain\r\n\r\nsecret mail for the token\r\n"
    (tmp_path / "mail.txt").write_bytes(text)
    # PKCS#1 v1.5 (what Debian 12's NSS sends), RSA-OAEP (SHA-1: SoftHSM2 2.6.1's only), and
    # ECDH to the P-256 key-agreement certificate (openssl's defaults).
    for recipient, extra in (
        ("rsa.pem", []),
        ("rsa.pem", ["-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha1"]),
        ("ec.pem", []),
    ):
        openssl(
            "cms", "-encrypt", "-binary", "-aes256", "-in", "mail.txt", "-out", "mail.p7m",
            "-recip", recipient, *extra, cwd=tmp_path,
        )  # fmt: skip
        ran = ok(
            ctl(
                mixed_daemon, "smime", "decrypt", str(tmp_path / "mail.p7m"), "--token",
                token.selector, "--pin-fd", "{fd}", secrets=(token.pin,),
            )
        )  # fmt: skip
        assert b"secret mail for the token" in ran.out, (recipient, extra)
    (tmp_path / "out.eml").write_bytes(
        b"From: demo@example.org\nTo: friend@example.org\nSubject: signed\n"
        b"Content-Type: text/plain; charset=us-ascii\n\nSee you at noon.\n"
    )
    ran = ok(
        ctl(
            mixed_daemon, "smime", "sign", str(tmp_path / "out.eml"), "--token", token.selector,
            "--out", str(tmp_path / "signed.eml"), "--pin-fd", "{fd}",
            secrets=(token.pin,) * token.sign_pins,
        )
    )  # fmt: skip
    done = subprocess.run(
        ["openssl", "cms", "-verify", "-in", "signed.eml", "-CAfile", "ca.pem", "-purpose",
         "smimesign"],
        cwd=tmp_path, capture_output=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert b"Verification successful" in done.stderr
    assert b"See you at noon." in done.stdout


# --- modules that cannot be used ---------------------------------------------------------------


def test_bad_modules_are_one_log_line_each_and_the_daemon_serves_the_rest(
    sock_path: Path, tmp_path: Path
) -> None:
    not_pkcs11 = next(
        p
        for p in (
            Path("/usr/lib/x86_64-linux-gnu/libz.so.1"),
            Path("/lib/x86_64-linux-gnu/libz.so.1"),
        )
        if p.exists()
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(tmp_path / "missing.conf")}  # C_Initialize fails
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc",
            "--simulate", "piv", "--socket", str(sock_path), "--export-dir", str(tmp_path),
            "--module", str(tmp_path / "libnowhere.so"),
            "--module", str(not_pkcs11),
            "--module", str(SOFTHSM_MODULE),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock_path.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "tokend did not start"
            time.sleep(0.02)
        time.sleep(1.0)  # the module watchers report after start-up
        with Client(sock_path) as client:
            assert client.slot_list(token_present=True) == [0]
            session = client.open_session(0)
            client.login(session, "123456")
            demo_cert = tmp_path / "encryption.pem"
            from cryptography import x509

            public = x509.load_pem_x509_certificate(demo_cert.read_bytes()).public_key()
            blob, secret = pkcs1_blob(public)
            key = client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: b"\x03"}
            )[0]
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 3, out
    assert "libnowhere.so does not exist" in errors[0] or any(
        "libnowhere.so does not exist" in e for e in errors
    )
    assert any("is not a PKCS#11 module" in e for e in errors), errors
    assert any("C_Initialize failed" in e for e in errors), errors
    assert "Traceback" not in out


def test_serve_loads_modules_from_the_configuration(
    softhsm, sock_path: Path, tmp_path: Path
) -> None:
    _hsm, material = softhsm
    config = tmp_path / "tokend.toml"
    config.write_text(f'modules = [{{path = "{SOFTHSM_MODULE}", label = "vendor"}}]\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc",
         "--config", str(config), "--socket", str(sock_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        with_token: list[int] = []
        while not with_token:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "no module token"
            if sock_path.exists():
                with Client(sock_path) as client:
                    with_token = client.slot_list(token_present=True)
            time.sleep(0.05)
        with Client(sock_path) as client:
            assert client.slot_info(with_token[0])["slot_description"] == (
                f"vendor slot {material.slot_id:#x}"
            )
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert material.pin not in out


def test_rsa_pkcs_signature_by_an_rsa_signing_key(module_daemon) -> None:
    """CKM_SHA256_RSA_PKCS and PSS pass through for an RSA key that may sign (generated on
    the token here, through the module)."""
    material: SoftHsmMaterial = module_daemon.extras["material"]
    module_daemon.run(_generate_rsa_signing_key(module_daemon, material.pin))
    with Client(module_daemon.socket) as client:
        slot = module_slot(client)
        session = _login(client, slot, material.pin)
        key = _key(client, session, b"\x09")
        pub = client.find_objects(session, {CKA.CKA_CLASS: "CKO_PUBLIC_KEY", CKA.CKA_ID: b"\x09"})
        attrs = client.get_attributes(session, pub[0], [CKA.CKA_MODULUS, CKA.CKA_PUBLIC_EXPONENT])
        from cryptography.hazmat.primitives.asymmetric import rsa

        public = rsa.RSAPublicNumbers(
            int.from_bytes(unb64(attrs["CKA_PUBLIC_EXPONENT"]), "big"),
            int.from_bytes(unb64(attrs["CKA_MODULUS"]), "big"),
        ).public_key()
        sig = client.sign(session, key, "CKM_SHA256_RSA_PKCS", b"mail")
        public.verify(sig, b"mail", padding.PKCS1v15(), hashes.SHA256())
        pss = Mechanism(CKM.CKM_RSA_PKCS_PSS, PssParams(CKM.CKM_SHA256, CKG.CKG_MGF1_SHA256, 32))
        sig = client.sign(session, key, pss, hashlib.sha256(b"mail").digest())
        public.verify(
            sig,
            hashlib.sha256(b"mail").digest(),
            padding.PSS(padding.MGF1(hashes.SHA256()), 32),
            utils.Prehashed(hashes.SHA256()),
        )


async def _generate_rsa_signing_key(daemon: RunningDaemon, pin: str) -> None:
    """Provision through the daemon's own loaded module (another program would need its own
    module instance): an RSA key generated on the token; the token re-arrives afterwards
    (its objects changed), as it would for any provisioning behind tokend's back."""
    import asyncio

    import pkcs11

    instance = await _instance(daemon)
    token = instance.token._pkcs11_token

    def generate() -> None:
        with token.open(rw=True) as session:
            pin_bytes = bytearray(pin.encode())
            instance.token._library.login(session.handle, pin_bytes)
            try:
                for attempt in range(3):
                    # SoftHSM2 sometimes answers CKR_GENERAL_ERROR when it writes a new
                    # object while the watcher reads the token's files: set-up, retried.
                    try:
                        session.generate_keypair(
                            pkcs11.KeyType.RSA, 2048, store=True, id=b"\x09",
                            label="rsa-sign",
                            capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY,
                        )  # fmt: skip
                        break
                    except pkcs11.GeneralError:
                        if attempt == 2:
                            raise
            finally:
                instance.token._library.logout(session.handle)

    await asyncio.to_thread(generate)
    registry = daemon.daemon.engine.registry
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    latest, since = instance, loop.time()
    # The watcher's polls see the new objects, possibly in two steps (private key, then
    # public key): wait until the token has re-arrived and stayed the same instance for
    # two poll intervals, so the test's login is not lost to a later re-arrival.
    while loop.time() < deadline:
        slot = registry.slot(instance.slot_id)
        current = slot.instance if slot.token_present else None
        if current is not latest:
            latest, since = current, loop.time()
        elif latest is not None and latest is not instance and loop.time() - since > 1.2:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the re-provisioned token did not re-arrive and settle")


# --- a module that stops answering -------------------------------------------------------------

_LOCKER = """
import fcntl, sys, time
from pathlib import Path
held = []
for path in sorted(Path(sys.argv[1]).rglob("*")):
    if path.is_file():
        f = open(path, "r+b")
        fcntl.lockf(f, fcntl.LOCK_EX)
        held.append(f)
print("locked", flush=True)
sys.stdin.read()
"""


def test_hanging_module_times_out_and_the_daemon_serves_the_rest(
    softhsm, sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds SoftHSM2's token files locked: every call into the module
    blocks (for real, in fcntl). The call times out, the token counts as removed, the PIV
    token next to it keeps working, and once the module answers again its token comes back
    as a new instance without any login."""
    import logging

    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard

    hsm, material = softhsm
    card = VirtualPivCard()
    demo = provision_demo(card)
    reader = MemoryReader("Memory Reader 0")
    MemoryPlug(reader).insert(card)
    caplog.set_level(logging.INFO, logger="tokend")
    running = start_daemon(
        sock_path, [MemoryWatcher(reader), _watcher(call_timeout=1.0, poll_interval=0.2)]
    )
    locker = None
    try:
        wait_slots(running, 2)
        blob, secret = pkcs1_blob(material.encryption_cert.public_key())
        piv_blob, piv_secret = pkcs1_blob(demo.encryption_public_key)
        with Client(sock_path) as client:
            slot = module_slot(client)
            session = _login(client, slot, material.pin)
            key = _key(client, session, ENCRYPTION_ID)
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
            locker = subprocess.Popen(
                [sys.executable, "-c", _LOCKER, str(hsm.tokendir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
            started = time.monotonic()
            with pytest.raises(DeviceRemovedError):
                client.decrypt(session, key, "CKM_RSA_PKCS", blob)
            assert time.monotonic() - started < 1.0 + 4.0  # the 1 s timeout, generously
            # The PIV token is served meanwhile, on the same connection.
            piv = next(s for s in client.slot_list(token_present=True) if s != slot)
            piv_session = _login(client, piv, "123456")
            piv_key = _key(client, piv_session, b"\x03")
            assert client.decrypt(piv_session, piv_key, "CKM_RSA_PKCS", piv_blob) == piv_secret
            deadline = time.monotonic() + 5
            while slot in client.slot_list(token_present=True):
                assert time.monotonic() < deadline, "the hung module's token stayed present"
                time.sleep(0.05)
            # The module answers again: its token is back, as a new instance, logged out.
            locker.stdin.close()  # type: ignore[union-attr]
            locker.wait(10)
            deadline = time.monotonic() + 10
            while slot not in client.slot_list(token_present=True):
                assert time.monotonic() < deadline, "the module's token did not come back"
                time.sleep(0.05)
            with pytest.raises(SessionHandleInvalidError):
                client.decrypt(session, key, "CKM_RSA_PKCS", blob)
            fresh = client.open_session(slot)
            assert client.find_objects(fresh, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []
            client.login(fresh, material.pin)
            key = _key(client, fresh, ENCRYPTION_ID)
            assert client.decrypt(fresh, key, "CKM_RSA_PKCS", blob) == secret
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
            locker.wait()
        stop_daemon(running)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("did not return within 1 s" in m for m in messages), messages


# --- faults (docs/reliability.md, the fault matrix) ------------------------------------------

#: What a client may be told when the module's token went away under its call: the removal
#: as tokend reports it, or the dead session afterwards.
_REMOVAL = (DeviceRemovedError, SessionHandleInvalidError, TokenNotPresentError, DeviceError)


_PROBE_OTHER_PROCESS = """
import sys, pkcs11
lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=sys.argv[2])
with token.open() as session:
    print(len(list(session.get_objects({pkcs11.Attribute.PRIVATE: False}))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["deleted", "reinitialised"])
def test_token_gone_during_an_operation_storm(
    softhsm, sock_path: Path, tmp_path: Path, fault: str
) -> None:
    """Six clients decrypt and sign in a loop, each on its own connection, against
    `tokend serve` (four module workers, the default); softhsm2-util (another process, as an
    admin would) deletes or re-initialises the token under them. Every answer given is
    right, every client's loop ends with a removal error within 2 s of the fault (a call
    SoftHSM2 hangs meanwhile is ended by the module call timeout, 1.5 s here), and the
    token that comes back (re-initialised) is a new instance nobody is logged in to.

    Two SoftHSM2 2.6.1 failures are recorded as expected failures (docs/reliability.md,
    Findings), after the checks above: it may crash the daemon (SIGSEGV in the module during
    the change; upstream softhsm/SoftHSMv2#688), which is why the daemon runs in a process
    of its own here, and it may keep a token re-initialised under load unusable inside the
    daemon (CKR_GENERAL_ERROR) while every other process sees it."""
    hsm, material = softhsm
    config = tmp_path / "tokend.toml"
    # A module call that does not return within 1.5 s counts as the token gone (SoftHSM2 can
    # hang a call while its token is deleted under it): the bound the clients are held to.
    config.write_text(
        f'modules = [{{path = "{SOFTHSM_MODULE}", label = "softhsm", timeout = 1.5}}]\n'
    )
    log = (tmp_path / "tokend.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc", "--no-p11kit",
         "--config", str(config), "--socket", str(sock_path)],
        cwd=Path(__file__).resolve().parent.parent, env=hsm.env(),
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert daemon.poll() is None, "tokend serve exited"
            assert time.monotonic() < deadline, "tokend did not list the module token"
            if sock_path.exists():
                with Client(sock_path) as client:
                    if client.slot_list(token_present=True):
                        break
            time.sleep(0.05)
        _storm(sock_path, daemon, hsm, material, fault)
    except BaseException:
        print("tokend's log:\n" + (tmp_path / "tokend.log").read_text()[-4000:])
        raise
    finally:
        log.close()
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _storm(  # the clients' side of test_token_gone_during_an_operation_storm
    socket: Path,
    daemon: subprocess.Popen[bytes],
    hsm: SoftHsm,
    material: SoftHsmMaterial,
    fault: str,
) -> None:
    import contextlib
    import threading

    encryption = material.encryption_cert.public_key()
    signing = material.signing_cert.public_key()
    with Client(socket) as probe:
        slot = module_slot(probe)
    go, faulted = threading.Event(), threading.Event()
    wrong: list[str] = []
    ended: dict[int, tuple[str, float]] = {}
    done = [0] * 6

    def storm(n: int) -> None:
        with Client(socket, timeout=10) as client:
            try:
                session = _login(client, slot, material.pin)
                key = _key(client, session, ENCRYPTION_ID)
                signer = _key(client, session, SIGNING_ID)
                go.wait()
                while True:
                    blob, secret = pkcs1_blob(encryption)
                    if client.decrypt(session, key, "CKM_RSA_PKCS", blob) != secret:
                        wrong.append(f"client {n}: wrong plaintext")
                    digest = os.urandom(32)
                    raw = client.sign(session, signer, "CKM_ECDSA", digest)
                    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
                    try:
                        signing.verify(
                            utils.encode_dss_signature(r, s),
                            digest,
                            ec.ECDSA(utils.Prehashed(hashes.SHA256())),
                        )
                    except Exception:
                        wrong.append(f"client {n}: a signature that does not verify")
                    done[n] += 1
                    if not faulted.is_set() and done[n] > 2000:
                        wrong.append(f"client {n}: the fault never came")
                        return
            except TokendError as exc:
                ended[n] = (type(exc).__name__, time.monotonic())
                if not isinstance(exc, _REMOVAL):
                    wrong.append(f"client {n}: {type(exc).__name__}: {exc}")
            except OSError as exc:  # ConnectionError included: the daemon died
                ended[n] = ("connection lost", time.monotonic())
                if faulted.is_set():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        daemon.wait(5)
                        return  # the daemon died: judged below, with its exit status
                wrong.append(f"client {n}: {exc!r}")

    threads = [threading.Thread(target=storm, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    go.set()
    deadline = time.monotonic() + 20
    while not all(n >= 3 for n in done):  # the storm is on: every client is operating
        assert time.monotonic() < deadline and not wrong, (done, wrong)
        time.sleep(0.01)
    faulted.set()
    if fault == "deleted":
        hsm.delete_token(LABEL)
    else:
        hsm.reinit_token(material.slot_id, LABEL, material.pin)
    faulted_at = time.monotonic()  # softhsm2-util is done (clients may be told during it)
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a client hangs"
    assert not wrong, wrong
    assert sorted(ended) == list(range(6)), f"clients that never saw the fault: {ended}"
    if daemon.poll() is not None:
        assert daemon.returncode == -signal.SIGSEGV, f"tokend exited {daemon.returncode}"
        pytest.xfail("SoftHSM2 crashed the daemon (SIGSEGV) while its token changed")
    latest = max(t for _, t in ended.values()) - faulted_at
    assert latest < 2.0, f"the last client was told {latest:.2f} s after"
    print(
        f"module token {fault} under 6 clients: {sum(done)} decrypt+sign rounds before, "
        f"errors {sorted({e for e, _ in ended.values()})}, last told {latest * 1000:.0f} ms "
        "after softhsm2-util returned"
    )
    with Client(socket) as client:
        if fault == "deleted":  # (a token half deleted may show for one poll: no logins)
            deadline = time.monotonic() + POLL_INTERVAL_S + 2.0
            while slot in client.slot_list(token_present=True):
                assert time.monotonic() < deadline, "the deleted token is still listed"
                time.sleep(0.02)
            return
        deadline = time.monotonic() + 5
        while slot not in client.slot_list(token_present=True):
            if time.monotonic() > deadline:
                # The new token is there for every other process, but SoftHSM2 inside the
                # daemon answers CKR_GENERAL_ERROR for it from now on (its cached token
                # failed its integrity check mid-change): absent is all tokend can show
                # without reloading the module. Nothing wrong was answered.
                other = subprocess.run(
                    [sys.executable, "-c", _PROBE_OTHER_PROCESS, str(SOFTHSM_MODULE), LABEL],
                    env=hsm.env(), capture_output=True, text=True, timeout=60, check=True,
                )  # fmt: skip
                assert other.stdout.strip() == "0"  # re-initialised: present, empty
                pytest.xfail("SoftHSM2 keeps its re-initialised token unusable in the daemon")
            time.sleep(0.05)
        fresh = client.open_session(slot)
        state = client.call("C_GetSessionInfo", {"h_session": fresh})["info"]["state"]
        assert state == "CKS_RO_PUBLIC_SESSION"
        client.login(fresh, material.pin)
        assert client.find_objects(fresh, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []


_KILLED_CLIENT = """
import sys, time
from tokend.client import Client
from tokend.pkcs11 import CKA
from tokend.protocol import b64, encode_request
socket, slot, pin, blob = sys.argv[1], int(sys.argv[2]), sys.argv[3], bytes.fromhex(sys.argv[4])
with Client(socket) as c:
    s = c.open_session(slot)
    c.login(s, pin)
    (key,) = c.find_objects(s, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: b"\\x01"})
    # Forty decryptions sent at once, none answered yet: the client dies with them in flight.
    requests = []
    for i in range(40):
        init = {"h_session": s, "p_mechanism": "CKM_RSA_PKCS", "h_key": key}
        requests.append(encode_request(1000 + 2 * i, "C_DecryptInit", init))
        data = {"h_session": s, "p_encrypted_data": b64(blob)}
        requests.append(encode_request(1001 + 2 * i, "C_Decrypt", data))
    c._sock.sendall(b"".join(requests))
    print("sent", flush=True)
    time.sleep(60)
"""


def test_client_killed_with_operations_in_flight_leaves_the_module_logged_out(
    module_daemon,
) -> None:
    """The only logged-in client is SIGKILLed with forty decryptions sent and unanswered: the
    module (asked on tokend's own session) is logged out within 2 s, and the next client
    must log in itself."""
    material: SoftHsmMaterial = module_daemon.extras["material"]
    blob, secret = pkcs1_blob(material.encryption_cert.public_key())
    with Client(module_daemon.socket) as probe:
        slot = module_slot(probe)
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CLIENT, str(module_daemon.socket), str(slot),
         material.pin, blob.hex()],
        cwd=root, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "sent"
        assert module_daemon.run(_module_sees_private_keys(module_daemon))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        killed = time.monotonic()
        while module_daemon.run(_module_sees_private_keys(module_daemon)):
            assert time.monotonic() - killed < 2.0, "the module stayed logged in"
            time.sleep(0.02)
        with Client(module_daemon.socket) as other:
            session = other.open_session(slot)
            assert other.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []
            other.login(session, material.pin)
            key = _key(other, session, ENCRYPTION_ID)
            assert other.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
