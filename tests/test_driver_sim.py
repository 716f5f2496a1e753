"""The SIM driver (tokend.drivers.sim) against the virtual SIM in the in-process reader:
identity, what it trusts from the PKCS#15 metadata, and malformed or truncated answers —
which end in a tokend error (CKR_DEVICE_ERROR / CKR_FUNCTION_FAILED …), never another
exception."""

from __future__ import annotations

import logging
import random

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tokend import pkcs15
from tokend.drivers.sim import SimToken
from tokend.errors import DeviceError, TokendError, TransportError
from tokend.iso7816 import ApduChannel
from tokend.model import Mechanism, ObjectKey, ObjectKind
from tokend.pkcs11 import CKA, CKM
from tokend.sim import commands as cmd
from tokend.sim.codes import PIN_FORMAT
from tokend.simulators.memory import MemoryReader
from tokend.simulators.sim import VirtualSim
from tokend.simulators.sim_demo import ENCRYPTION_REF, SIGNING_REF, provision_sim_demo

PIN = bytearray(b"1234")
PRIV = ObjectKind.PRIVATE_KEY


def _open(card) -> tuple[SimToken, MemoryReader]:  # type: ignore[no-untyped-def]
    reader = MemoryReader("sim test")
    reader.insert(card)
    token = SimToken.open(reader.connect())
    assert token is not None
    return token, reader


def _card_channel(card: VirtualSim) -> ApduChannel:
    channel = ApduChannel(card.process, extended=False, t0=True)
    channel.send(cmd.select_aid()).check()
    channel.send(cmd.verify(bytes(PIN_FORMAT.block(b"1234")))).check()
    return channel


def _rewrite(card: VirtualSim, path: bytes, content: bytes) -> None:
    """What anyone holding the PIN (or, for ODF and TokenInfo, anyone at all) can do."""
    channel = _card_channel(card)
    channel.send(cmd.select_path(path, fcp=False)).check()
    for command in cmd.update_binary(0, content):
        channel.send(command).check()
    card.reset()


@pytest.fixture(scope="module")
def demo_state() -> dict:
    card = VirtualSim(iccid="8949000000000000108")
    provision_sim_demo(card)
    return {"applet": card.applet.snapshot(), "iccid": card.iccid}


def _demo_card(state: dict) -> VirtualSim:
    card = VirtualSim(iccid=state["iccid"])
    card.applet.restore(state["applet"])
    return card


def test_identity_is_the_iccid_and_a_blank_sim_is_a_token() -> None:
    token, _ = _open(VirtualSim(iccid="8949000000000000017"))
    assert token.identity.applet == "SIM-PKI"
    assert token.identity.serial == "8949000000000000017"
    assert token.objects() == ()  # nothing personalised yet: still a token to provision
    assert token.info.min_pin_len == 4 and token.info.max_pin_len == 16


def test_iccid_read_on_a_logical_channel_when_the_applet_is_left_selected(demo_state) -> None:
    card = _demo_card(demo_state)
    reader = MemoryReader("sim test")
    reader.insert(card)
    # Another program left the applet selected on the basic channel (no reset since).
    card.process(cmd.select_aid().encode())
    token = SimToken.open(reader.connect())
    assert token is not None and token.identity.serial == demo_state["iccid"]


def test_not_a_sim_and_not_the_legacy_applet() -> None:
    from tokend.simulators.piv import VirtualPivCard

    reader = MemoryReader("sim test")
    reader.insert(VirtualPivCard())
    assert SimToken.open(reader.connect()) is None


def test_a_certificate_is_shown_only_for_its_own_key(demo_state) -> None:
    card = _demo_card(demo_state)
    # Point the encryption key's certificate file at another key's certificate.
    channel = _card_channel(card)
    other = rsa.generate_private_key(65537, 2048)
    from tokend.simulators.sim_demo import _host_material, _user_cert

    host = _host_material()
    import datetime as dt

    foreign = _user_cert(
        host.ca_key,
        host.ca_cert,
        other.public_key(),
        not_before=dt.datetime.now(dt.UTC),
        months=1,
        encryption=True,
    ).public_bytes(serialization.Encoding.DER)
    channel.send(cmd.delete_file(0x3400 + ENCRYPTION_REF)).check()
    channel.send(cmd.select_path(pkcs15.PKCS15_DF, fcp=False)).check()
    fcp = cmd.fcp(0x3400, fdb=cmd.Fdb.TRANSPARENT_EF, size=len(foreign), acl=None)
    channel.send(cmd.create_file(fcp)).check()
    for command in cmd.update_binary(0, foreign):
        channel.send(command).check()
    card.reset()
    token, _ = _open(card)
    keys = {obj.key for obj in token.objects()}
    assert ObjectKey(ObjectKind.CERTIFICATE, ENCRYPTION_REF) not in keys
    assert ObjectKey(PRIV, ENCRYPTION_REF) in keys  # the key itself is still there
    assert ObjectKey(ObjectKind.CERTIFICATE, SIGNING_REF) in keys


def test_a_signature_that_does_not_match_the_public_key_file_is_refused(demo_state) -> None:
    card = _demo_card(demo_state)
    channel = _card_channel(card)
    # Replace the signing key's public-key file (EF 3301) with another RSA public key.
    fake = rsa.generate_private_key(65537, 2048).public_key()
    der = fake.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    channel.send(cmd.delete_file(0x3300 + SIGNING_REF)).check()
    channel.send(cmd.select_path(pkcs15.PKCS15_DF, fcp=False)).check()
    fcp = cmd.fcp(0x3300 + SIGNING_REF, fdb=cmd.Fdb.TRANSPARENT_EF, size=len(der), acl=None)
    channel.send(cmd.create_file(fcp)).check()
    for command in cmd.update_binary(0, der):
        channel.send(command).check()
    card.reset()
    token, _ = _open(card)
    token.login(bytearray(PIN))
    with pytest.raises(DeviceError, match="does not match"):
        token.sign(ObjectKey(PRIV, SIGNING_REF), Mechanism(CKM.CKM_SHA256_RSA_PKCS), b"mail")


def test_malformed_directory_files_are_skipped_not_fatal(demo_state, caplog) -> None:
    card = _demo_card(demo_state)
    _rewrite(card, pkcs15.PKCS15_DF + b"\x44\x02", b"\x30\x82\xff\xff\x01")  # PrKDF
    with caplog.at_level(logging.WARNING):
        token, _ = _open(card)
    assert "PrKDF" in caplog.text
    assert not [o for o in token.objects() if o.key.kind is PRIV]
    # The certificates are still listed (as lone certificates), the token is usable.
    assert [o for o in token.objects() if o.key.kind is ObjectKind.CERTIFICATE]


def test_a_different_sim_behind_the_same_connection_is_a_disconnect(demo_state) -> None:
    card = _demo_card(demo_state)
    token, reader = _open(card)
    token.login(bytearray(PIN))
    card.set_iccid("8949000000000000991")  # another SIM, same applet content
    reader.reset_by_other_program()
    with pytest.raises(TokendError):  # the reset itself: the login is lost
        token.pin_status()
    with pytest.raises(TransportError, match="identity"):
        token.pin_status()


class _Mangler:
    """Mutates the card's answers (truncates, flips bytes, swaps status words)."""

    def __init__(self, card: VirtualSim, seed: int, rate: float) -> None:
        self.card = card
        self.rng = random.Random(seed)
        self.rate = rate
        self.armed = False

    atr = property(lambda self: self.card.atr)
    protocol = property(lambda self: self.card.protocol)

    def power_on(self) -> None:
        self.card.power_on()

    def power_off(self) -> None:
        self.card.power_off()

    def reset(self) -> None:
        self.card.reset()

    def process(self, apdu: bytes) -> bytes:
        answer = self.card.process(apdu)
        if not self.armed or self.rng.random() > self.rate:
            return answer
        choice = self.rng.randrange(5)
        if choice == 0:
            return answer[: self.rng.randrange(len(answer) + 1)]
        if choice == 1 and len(answer) > 2:
            i = self.rng.randrange(len(answer) - 2)
            return answer[:i] + bytes((self.rng.randrange(256),)) + answer[i + 1 :]
        if choice == 2:
            return self.rng.choice(
                [b"\x61\x10", b"\x6c\x05", b"\x6a\x80", b"\x90\x00", b"\x6f\x00"]
            )
        if choice == 3:
            return answer + bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(20)))
        return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(40)))


@pytest.mark.parametrize("seed", range(40))
def test_mangled_answers_end_in_tokend_errors_only(demo_state, seed) -> None:
    card = _Mangler(_demo_card(demo_state), seed, rate=0.15)
    reader = MemoryReader("sim test")
    reader.insert(card)  # type: ignore[arg-type]
    card.armed = True
    outcomes = []
    for _ in range(6):
        try:
            token = SimToken.open(reader.connect())
            if token is None:
                outcomes.append("not recognised")
                continue
            token.login(bytearray(PIN))
            pairs = token.key_pairs()
            pair = pairs.get(ENCRYPTION_REF)
            if pair is not None and isinstance(pair.public_key, rsa.RSAPublicKey):
                blob = pair.public_key.encrypt(b"k" * 32, padding.PKCS1v15())
                token.decrypt(ObjectKey(PRIV, ENCRYPTION_REF), Mechanism(CKM.CKM_RSA_PKCS), blob)
            if SIGNING_REF in pairs and pairs[SIGNING_REF].can_sign:
                token.sign(ObjectKey(PRIV, SIGNING_REF), Mechanism(CKM.CKM_SHA256_RSA_PKCS), b"m")
            token.pin_status()
            token.logout()
            outcomes.append("ok")
        except TokendError as exc:
            outcomes.append(type(exc).__name__)
        card.card.reset()
    assert outcomes  # every round ended in a result or a tokend error, nothing else


def test_objects_carry_the_pkcs15_ids_and_labels(demo_state) -> None:
    token, _ = _open(_demo_card(demo_state))
    labels = {o.key.ref: o.attributes[CKA.CKA_LABEL] for o in token.objects() if o.key.kind is PRIV}
    assert labels == {0: "Encryption key", 1: "Signing key", 2: "Retired encryption key 1"}
    mechanisms = {m.mechanism for m in token.mechanisms()}
    assert CKM.CKM_RSA_PKCS in mechanisms and CKM.CKM_RSA_PKCS_OAEP not in mechanisms
