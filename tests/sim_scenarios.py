"""End-to-end and disconnect scenarios for a SIM token (the legacy IsoApplet on a UICC),
through the daemon's socket as a mail client would. test_sim_memory.py and test_sim_pcsc.py
run them with their own ``sim`` fixture (in-process reader; real pcscd + vpcd, T=0)."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import Encoding

from tests.helpers import OAEP_SHA256, SWAP_EVENT_WAIT, oaep_blob, pkcs1_blob
from tests.sim_fixtures import SIM_PIN
from tokend.client import Client
from tokend.errors import (
    DeviceRemovedError,
    KeyFunctionNotPermittedError,
    KeyHandleInvalidError,
    MechanismInvalidError,
    PinIncorrectError,
    PinLenRangeError,
    SessionHandleInvalidError,
    TokenNotPresentError,
    UserNotLoggedInError,
)
from tokend.model import Mechanism, PssParams
from tokend.pkcs11 import CKA, CKM
from tokend.protocol import unb64
from tokend.sim import commands as sim_commands
from tokend.sim.codes import PIN_FORMAT

SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _key_id(public_key) -> bytes:  # type: ignore[no-untyped-def]
    n = public_key.public_numbers().n
    return hashlib.sha1(n.to_bytes((n.bit_length() + 7) // 8, "big")).digest()


def _session(client: Client, slot: int) -> int:
    session = client.open_session(slot)
    client.login(session, SIM_PIN)
    return session


def _private(client: Client, session: int, public_key) -> int:  # type: ignore[no-untyped-def]
    handles = client.find_objects(
        session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: _key_id(public_key)}
    )
    assert len(handles) == 1
    return handles[0]


def _decrypt_ok(client: Client, session: int, demo) -> int:  # type: ignore[no-untyped-def]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    key = _private(client, session, demo.encryption_public_key)
    assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
    return key


# --- end to end ----------------------------------------------------------------------------


def test_lists_the_sim_by_iccid_with_its_certificates(sim) -> None:
    demo, slot = sim.extras["demo"], sim.extras["slot"]
    with Client(sim.socket) as client:
        info = client.token_info(slot)
        assert info["token_serial"] == demo.iccid  # not the PKCS#15 serial "0000"
        assert info["model"].startswith("IsoApplet")
        session = client.open_session(slot)
        certs = client.find_objects(session, {CKA.CKA_CLASS: "CKO_CERTIFICATE"})
        ders = {
            unb64(client.get_attributes(session, h, [CKA.CKA_VALUE])["CKA_VALUE"]) for h in certs
        }
        assert ders == {
            c.public_bytes(Encoding.DER)
            for c in (demo.encryption_cert, demo.signing_cert, demo.retired_cert)
        }
        assert client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []


def test_mechanisms_are_what_the_applet_can_do(sim) -> None:
    with Client(sim.socket) as client:
        mechanisms = set(
            client.call("C_GetMechanismList", {"slot_id": sim.extras["slot"]})["mechanism_list"]
        )
    assert "CKM_RSA_PKCS" in mechanisms and "CKM_SHA256_RSA_PKCS" in mechanisms
    for absent in ("CKM_RSA_PKCS_OAEP", "CKM_RSA_PKCS_PSS", "CKM_RSA_X_509", "CKM_ECDSA",
                   "CKM_ECDH1_DERIVE"):  # fmt: skip
        assert absent not in mechanisms


def test_decrypts_with_the_current_and_the_retired_key(sim) -> None:
    demo = sim.extras["demo"]
    with Client(sim.socket) as client:
        session = _session(client, sim.extras["slot"])
        _decrypt_ok(client, session, demo)
        blob, secret = pkcs1_blob(demo.retired_public_key)
        retired = _private(client, session, demo.retired_public_key)
        assert client.decrypt(session, retired, "CKM_RSA_PKCS", blob) == secret
        with pytest.raises(KeyFunctionNotPermittedError):
            client.sign(session, retired, "CKM_SHA256_RSA_PKCS", b"mail")


def test_oaep_and_pss_are_mechanism_invalid(sim) -> None:
    demo = sim.extras["demo"]
    blob, _ = oaep_blob(demo.encryption_public_key, hashes.SHA256())
    with Client(sim.socket) as client:
        session = _session(client, sim.extras["slot"])
        key = _private(client, session, demo.encryption_public_key)
        with pytest.raises(MechanismInvalidError):
            client.decrypt(session, key, OAEP_SHA256, blob)
        signer = _private(client, session, demo.signing_public_key)
        pss = Mechanism(CKM.CKM_RSA_PKCS_PSS, PssParams())
        with pytest.raises(MechanismInvalidError):
            client.sign(session, signer, pss, hashlib.sha256(b"x").digest())


def test_signs_with_the_key_generated_on_the_sim(sim) -> None:
    demo = sim.extras["demo"]
    with Client(sim.socket) as client:
        session = _session(client, sim.extras["slot"])
        key = _private(client, session, demo.signing_public_key)
        signature = client.sign(session, key, "CKM_SHA256_RSA_PKCS", b"a mail")
        demo.signing_public_key.verify(signature, b"a mail", padding.PKCS1v15(), hashes.SHA256())
        info = SHA256_DIGEST_INFO + hashlib.sha256(b"another").digest()
        raw = client.sign(session, key, "CKM_RSA_PKCS", info)  # the host built the DigestInfo
        demo.signing_public_key.verify(raw, b"another", padding.PKCS1v15(), hashes.SHA256())
        encryption = _private(client, session, demo.encryption_public_key)
        with pytest.raises(KeyFunctionNotPermittedError):
            client.sign(session, encryption, "CKM_SHA256_RSA_PKCS", b"a mail")


def test_wrong_pin_reports_tries_left(sim) -> None:
    with Client(sim.socket) as client:
        session = client.open_session(sim.extras["slot"])
        with pytest.raises(PinIncorrectError) as info:
            client.login(session, "9999")
        assert info.value.retries == 2
        client.login(session, SIM_PIN)
    assert sim.extras["card"].pin_tries_left == 3


def test_another_program_selecting_the_applet_loses_the_login(sim) -> None:
    demo, plug, card = (sim.extras[k] for k in ("demo", "plug", "card"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    verifies: list[bytes] = []
    plug.on_transmit.append(lambda apdu: verifies.append(apdu) if apdu[1] == 0x20 else None)
    with Client(sim.socket) as client:
        session = _session(client, sim.extras["slot"])
        key = _decrypt_ok(client, session, demo)
        before = len(verifies)
        plug.reselect_by_other_program(card)
        with pytest.raises(UserNotLoggedInError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert len(verifies) == before  # never a silent re-VERIFY
        client.login(session, SIM_PIN)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret


def test_card_reset_by_another_program_loses_the_login(sim) -> None:
    demo, plug = sim.extras["demo"], sim.extras["plug"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(sim.socket) as client:
        session = _session(client, sim.extras["slot"])
        key = _decrypt_ok(client, session, demo)
        plug.reset_by_other_program()
        with pytest.raises(UserNotLoggedInError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        client.login(session, SIM_PIN)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret


def test_last_logout_makes_the_applet_forget_the_pin(sim) -> None:
    card = sim.extras["card"]
    status = sim_commands.verify(None).encode()
    with Client(sim.socket) as a, Client(sim.socket) as b:
        sa, sb = _session(a, sim.extras["slot"]), _session(b, sim.extras["slot"])
        a.logout(sa)
        assert card.process(status)[-2:] == b"\x90\x00"  # B is still logged in
        b.logout(sb)
        assert card.process(status)[-2:] == b"\x63\xc3"


# --- disconnect ----------------------------------------------------------------------------


def test_pulling_the_sim_locks_at_once_and_reports_it(sim) -> None:
    demo, plug = sim.extras["demo"], sim.extras["plug"]
    blob, _ = pkcs1_blob(demo.encryption_public_key)
    with Client(sim.socket) as client, Client(sim.socket) as watcher:
        watcher.subscribe()
        session = _session(client, sim.extras["slot"])
        key = _decrypt_ok(client, session, demo)
        pulled = time.monotonic()
        plug.remove()
        event = watcher.next_event(timeout=2)
        latency = time.monotonic() - pulled
        assert event["event"] == "left" and event["serial"] == demo.iccid
        assert latency < 0.5, f"left event after {latency * 1000:.0f} ms"
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        with pytest.raises(TokenNotPresentError):
            client.open_session(sim.extras["slot"])


def test_reinserted_sim_is_a_new_instance_without_login(sim) -> None:
    demo, plug, card = (sim.extras[k] for k in ("demo", "plug", "card"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(sim.socket) as client:
        client.subscribe()
        session = _session(client, sim.extras["slot"])
        old_key = _decrypt_ok(client, session, demo)
        plug.remove()
        plug.insert(card)
        assert client.next_event(SWAP_EVENT_WAIT)["event"] == "left"
        arrived = client.next_event(SWAP_EVENT_WAIT)
        assert arrived["event"] == "arrived" and arrived["serial"] == demo.iccid
        fresh = client.open_session(sim.extras["slot"])
        with pytest.raises(KeyHandleInvalidError):
            client.decrypt(fresh, old_key, "CKM_RSA_PKCS", blob)
        assert client.find_objects(fresh, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY"}) == []
        client.login(fresh, SIM_PIN)
        key = _private(client, fresh, demo.encryption_public_key)
        assert client.decrypt(fresh, key, "CKM_RSA_PKCS", blob) == secret


def test_a_sim_with_another_iccid_is_a_new_token(sim) -> None:
    from tokend.simulators.sim import VirtualSim

    demo, plug, card = (sim.extras[k] for k in ("demo", "plug", "card"))
    # The same applet content (same keys) in another SIM: only the ICCID differs.
    other = VirtualSim(iccid="8949000000000000017")
    other.applet.restore(card.applet.snapshot())
    with Client(sim.socket) as client:
        client.subscribe()
        session = _session(client, sim.extras["slot"])
        _decrypt_ok(client, session, demo)
        plug.insert(other)  # a swap: insert() pulls the first card
        events = [client.next_event(SWAP_EVENT_WAIT), client.next_event(SWAP_EVENT_WAIT)]
        assert [e["event"] for e in events] == ["left", "arrived"]
        assert events[1]["serial"] == "8949000000000000017" != demo.iccid
        with pytest.raises(DeviceRemovedError):
            client.find_objects(session, {})
        fresh = client.open_session(sim.extras["slot"])
        assert client.call("C_GetSessionInfo", {"h_session": fresh})["info"]["state"] == (
            "CKS_RO_PUBLIC_SESSION"
        )


def test_removal_during_a_decryption_delivers_no_result(sim) -> None:
    demo, plug = sim.extras["demo"], sim.extras["plug"]
    blob, _ = pkcs1_blob(demo.encryption_public_key)
    pulled = threading.Event()

    def pull_on_pso(apdu: bytes) -> None:
        if apdu[1] == 0x2A and not pulled.is_set():  # PERFORM SECURITY OPERATION on its way
            pulled.set()
            plug.remove()

    with Client(sim.socket) as client:
        session = _session(client, sim.extras["slot"])
        key = _private(client, session, demo.encryption_public_key)
        plug.on_transmit.append(pull_on_pso)
        with pytest.raises(DeviceRemovedError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        assert pulled.is_set()
        with pytest.raises(SessionHandleInvalidError):
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)


def test_a_too_short_pin_never_reaches_the_card(sim) -> None:
    verifies: list[bytes] = []
    sim.extras["plug"].on_transmit.append(
        lambda apdu: verifies.append(apdu) if apdu[1] == 0x20 and len(apdu) > 5 else None
    )
    with Client(sim.socket) as client:
        session = client.open_session(sim.extras["slot"])
        with pytest.raises(PinLenRangeError):
            client.login(session, "123")
        client.login(session, SIM_PIN)
    # 1234 travelled 00-padded to 16 bytes (the AODF's storedLength and padChar).
    assert [apdu[5:] for apdu in verifies] == [bytes(PIN_FORMAT.block(b"1234"))]


def test_the_sims_own_pin1_is_never_touched(sim) -> None:
    """Another program selects the USIM on the basic channel (whose PIN1 is reference 01,
    like the PKI applet's PIN); wrong PINs typed into tokend must not count against it."""
    from tokend.simulators.sim import USIM_AID_PREFIX

    card, plug = sim.extras["card"], sim.extras["plug"]
    with Client(sim.socket) as client:
        session = client.open_session(sim.extras["slot"])
        client.login(session, SIM_PIN)
        client.logout(session)
        plug.select_by_other_program(card, USIM_AID_PREFIX)
        for expected in (2, 1):
            with pytest.raises(PinIncorrectError) as info:
                client.login(session, "9999")
            assert info.value.retries == expected
        client.login(session, SIM_PIN)
    assert card.usim_pin1_tries == 3 and card.pin_tries_left == 3


def test_oaep_mail_to_a_sim_says_what_the_sender_must_use(sim, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The applet strips PKCS#1 v1.5 padding itself and has no OAEP: `tokenctl
    smime-decrypt` names the token and tells what the sender must use, in one line."""
    import subprocess

    from tests.test_provisioning import ctl

    demo = sim.extras["demo"]
    recipient = tmp_path / "encryption.pem"
    recipient.write_bytes(demo.encryption_cert.public_bytes(Encoding.PEM))
    message, mail = tmp_path / "message.txt", tmp_path / "mail.p7m"
    message.write_text("Subject: oaep\n\nsent with RSA-OAEP key transport\n")
    subprocess.run(
        ["openssl", "cms", "-encrypt", "-aes256", "-recip", str(recipient),
         "-keyopt", "rsa_padding_mode:oaep", "-in", str(message), "-out", str(mail)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    ran = ctl(sim, "smime-decrypt", str(mail), "--pin-fd", "{fd}", secrets=(SIM_PIN,))
    lines = ran.err.strip().splitlines()
    assert ran.rc == 1 and len(lines) == 1, ran.err
    assert "cannot decrypt RSA-OAEP key transport" in lines[0]
    assert demo.iccid in lines[0]  # the token, by its identity
    assert "RSA PKCS#1 v1.5" in lines[0] and b"sent with" not in ran.out
