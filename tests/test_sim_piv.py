"""The virtual PIV card, driven with raw APDUs through the real ISO 7816 channel."""

from __future__ import annotations

import datetime as dt
import functools
import os
import random
import secrets
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tokend.iso7816 import ApduChannel, CommandApdu, ResponseApdu, encode_tlv, find_tlv
from tokend.simulators.base import VirtualCard
from tokend.simulators.demo import provision_demo
from tokend.simulators.piv import (
    DEFAULT_ATR,
    DEFAULT_MANAGEMENT_KEY,
    PIV_AID,
    VirtualPivCard,
)

APT = bytes.fromhex("61114F0600001000010079074F05A000000308")
DISCOVERY = bytes.fromhex("7E124F0BA0000003080000100001005F2F024000")


@functools.cache
def rsa_key(index: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def pin_block(pin: bytes) -> bytes:
    return pin.ljust(8, b"\xff")


class Host:
    """A minimal PIV client over ApduChannel — what a driver would send."""

    def __init__(self, card: VirtualPivCard, *, extended: bool = True) -> None:
        self.card = card
        self.sent: list[bytes] = []
        self.channel = ApduChannel(self._transmit, extended=extended)

    def _transmit(self, apdu: bytes) -> bytes:
        self.sent.append(apdu)
        return self.card.process(apdu)

    def send(
        self, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None, cla: int = 0
    ) -> ResponseApdu:
        return self.channel.send(CommandApdu(cla, ins, p1, p2, data, le))

    def ok(self, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
        rapdu = self.send(ins, p1, p2, data, le)
        assert rapdu.sw == 0x9000, f"SW {rapdu.sw:04X}"
        return rapdu.data

    def select(self) -> bytes:
        return self.ok(0xA4, 0x04, 0x00, PIV_AID, 0)

    def verify(self, pin: bytes | None = b"123456") -> int:
        return self.send(0x20, 0x00, 0x80, pin_block(pin) if pin is not None else b"").sw

    def mgmt_auth(self, key: bytes = DEFAULT_MANAGEMENT_KEY, alg: int = 0x03) -> int:
        """Mutual authentication (yubikit style); returns the final SW."""
        block = 8 if alg in (0x00, 0x03) else 16
        cipher = Cipher(
            TripleDES(key) if block == 8 else algorithms.AES(key),
            modes.ECB(),
        )
        first = self.send(0x87, alg, 0x9B, encode_tlv(0x7C, encode_tlv(0x80)))
        if first.sw != 0x9000:
            return first.sw
        dec = cipher.decryptor()
        witness = dec.update(find_tlv(find_tlv(first.data, 0x7C), 0x80)) + dec.finalize()
        challenge = secrets.token_bytes(block)
        second = self.send(
            0x87,
            alg,
            0x9B,
            encode_tlv(0x7C, encode_tlv(0x80, witness) + encode_tlv(0x81, challenge)),
        )
        if second.sw == 0x9000:
            enc = cipher.encryptor()
            assert (
                find_tlv(find_tlv(second.data, 0x7C), 0x82)
                == enc.update(challenge) + enc.finalize()
            )
        return second.sw

    def general_authenticate(self, alg: int, slot: int, tag: int, value: bytes) -> ResponseApdu:
        data = encode_tlv(0x7C, encode_tlv(0x82) + encode_tlv(tag, value))
        return self.send(0x87, alg, slot, data, 0)

    def result(self, rapdu: ResponseApdu) -> bytes:
        assert rapdu.sw == 0x9000, f"SW {rapdu.sw:04X}"
        return find_tlv(find_tlv(rapdu.data, 0x7C), 0x82)

    def generate(self, slot: int, alg: int, extra: bytes = b"") -> bytes:
        return self.ok(
            0x47, 0x00, slot, encode_tlv(0xAC, encode_tlv(0x80, bytes((alg,))) + extra), 0
        )

    def import_rsa(self, slot: int, key: rsa.RSAPrivateKey) -> int:
        n = key.private_numbers()
        parts = (n.p, n.q, n.dmp1, n.dmq1, n.iqmp)
        data = b"".join(encode_tlv(i, v.to_bytes(128, "big")) for i, v in enumerate(parts, 1))
        return self.send(0xFE, 0x07, slot, data).sw

    def get_data(self, tag: bytes) -> ResponseApdu:
        return self.send(0xCB, 0x3F, 0xFF, encode_tlv(0x5C, tag), 0)

    def put_data(self, tag: bytes, value: bytes) -> int:
        return self.send(0xDB, 0x3F, 0xFF, encode_tlv(0x5C, tag) + encode_tlv(0x53, value)).sw

    def metadata(self, ref: int) -> dict[int, bytes]:
        from tokend.iso7816 import parse_tlvs

        return {t.tag: t.value for t in parse_tlvs(self.ok(0xF7, 0x00, ref))}


@pytest.fixture
def card() -> VirtualPivCard:
    return VirtualPivCard()


@pytest.fixture
def host(card: VirtualPivCard) -> Host:
    h = Host(card)
    h.select()
    return h


def ec_point(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def p256_from_generate(reply: bytes) -> ec.EllipticCurvePublicKey:
    point = find_tlv(find_tlv(reply, 0x7F49), 0x86)
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


# --- basics ------------------------------------------------------------------------------


def test_card_is_a_virtual_card_with_neutral_t1_atr(card: VirtualPivCard) -> None:
    assert isinstance(card, VirtualCard)
    assert card.atr == DEFAULT_ATR == bytes.fromhex("3B9713810180746F6B656E649B")


@pytest.mark.parametrize("aid_len", [5, 9, 11])
def test_select_accepts_aid_prefixes_and_answers_the_apt(
    card: VirtualPivCard, aid_len: int
) -> None:
    h = Host(card)
    assert h.send(0xCB, 0x3F, 0xFF, bytes.fromhex("5C017E"), 0).sw == 0x6D00  # nothing selected
    assert h.ok(0xA4, 0x04, 0x00, PIV_AID[:aid_len], 0) == APT
    assert h.get_data(b"\x7e").data == DISCOVERY


def test_selecting_another_application_deselects_piv(host: Host) -> None:
    assert host.verify() == 0x9000
    assert host.send(0xA4, 0x04, 0x00, bytes.fromhex("D2760001240103040000"), 0).sw == 0x6A82
    assert host.send(0x20, 0x00, 0x80).sw == 0x6D00
    host.select()
    assert host.verify(None) == 0x63C3  # verification was lost with the deselection


def test_vendor_version_and_serial(card: VirtualPivCard, host: Host) -> None:
    assert host.ok(0xFD, 0, 0) == bytes((5, 7, 1))
    assert int.from_bytes(host.ok(0xF8, 0, 0), "big") == card.serial
    other = VirtualPivCard()
    assert other.serial != card.serial and other.guid != card.guid
    chuid = find_tlv(host.get_data(bytes.fromhex("5FC102")).data, 0x53)
    assert find_tlv(chuid, 0x34) == card.guid
    assert host.get_data(bytes.fromhex("5FC107")).sw == 0x9000  # CCC present


# --- PIN / PUK ---------------------------------------------------------------------------


def test_verify_counts_wrong_pins_and_all_four_forms(host: Host) -> None:
    assert host.verify(None) == 0x63C3  # status: not verified, 3 tries
    assert host.verify(b"654321") == 0x63C2
    assert host.verify(None) == 0x63C2
    assert host.verify() == 0x9000
    assert host.verify(None) == 0x9000  # status: verified
    assert host.metadata(0x80)[0x06] == bytes((3, 3))  # right PIN restored the counter
    assert host.send(0x20, 0xFF, 0x80).sw == 0x9000  # reset security status
    assert host.verify(None) == 0x63C3
    assert host.send(0x20, 0x00, 0x80, b"123456").sw == 0x6A80  # unpadded: no try counted
    assert host.verify(None) == 0x63C3


def test_pin_blocks_and_puk_unblocks(host: Host) -> None:
    assert [host.verify(b"000000") for _ in range(3)] == [0x63C2, 0x63C1, 0x63C0]
    assert host.verify() == 0x6983  # blocked: even the right PIN fails
    assert host.verify(None) == 0x6983
    data = pin_block(b"99999999") + pin_block(b"246810")
    assert host.send(0x2C, 0x00, 0x80, data).sw == 0x63C2  # wrong PUK costs a PUK try
    data = pin_block(b"12345678") + pin_block(b"246810")
    assert host.send(0x2C, 0x00, 0x80, data).sw == 0x9000
    assert host.verify() == 0x63C2
    assert host.verify(b"246810") == 0x9000
    assert host.metadata(0x81)[0x06] == bytes((3, 3))
    assert host.metadata(0x80)[0x05] == b"\x00"  # no longer the default PIN


def test_change_pin_and_puk(host: Host) -> None:
    assert host.metadata(0x80)[0x05] == b"\x01"
    change = pin_block(b"111111") + pin_block(b"87654321")
    assert host.send(0x24, 0x00, 0x80, change).sw == 0x63C2
    assert host.send(0x24, 0x00, 0x80, pin_block(b"123456") + pin_block(b"12")).sw == 0x6A80
    assert host.send(0x24, 0x00, 0x80, pin_block(b"123456") + pin_block(b"87654321")).sw == 0x9000
    assert host.verify(b"123456") == 0x63C2
    assert host.verify(b"87654321") == 0x9000
    assert host.send(0x24, 0x00, 0x81, pin_block(b"12345678") + pin_block(b"11223344")).sw == 0x9000
    data = pin_block(b"12345678") + pin_block(b"654321")
    assert host.send(0x2C, 0x00, 0x80, data).sw == 0x63C2  # the old PUK is gone


# --- GENERAL AUTHENTICATE ----------------------------------------------------------------


def test_rsa_raw_decrypt_matches_a_host_encryption(host: Host) -> None:
    key = rsa_key()
    assert host.import_rsa(0x9D, key) == 0x6982  # needs the management key
    assert host.mgmt_auth() == 0x9000
    assert host.import_rsa(0x9D, key) == 0x9000
    message = b"a content-encryption key"
    ciphertext = key.public_key().encrypt(message, padding.PKCS1v15())
    assert host.general_authenticate(0x07, 0x9D, 0x81, ciphertext).sw == 0x6982  # no PIN yet
    assert host.verify() == 0x9000
    assert host.general_authenticate(0x11, 0x9D, 0x81, ciphertext).sw == 0x6A86  # wrong alg
    block = host.result(host.general_authenticate(0x07, 0x9D, 0x81, ciphertext))
    assert len(block) == 256 and block[:2] == b"\x00\x02"
    assert block[block.index(b"\x00", 2) + 1 :] == message
    # PIN "once": a second decryption needs no new VERIFY.
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    block = host.result(
        host.general_authenticate(0x07, 0x9D, 0x81, key.public_key().encrypt(message, oaep))
    )
    assert len(block) == 256 and block[0] == 0
    assert host.general_authenticate(0x07, 0x9D, 0x81, b"\x01" * 255).sw == 0x6A80  # wrong size


@pytest.mark.parametrize(
    ("alg", "curve", "hash_alg"),
    [(0x11, ec.SECP256R1(), hashes.SHA256()), (0x14, ec.SECP384R1(), hashes.SHA384())],
)
def test_ecdsa_signature_verifies(
    host: Host, alg: int, curve: ec.EllipticCurve, hash_alg: hashes.HashAlgorithm
) -> None:
    assert host.mgmt_auth() == 0x9000
    point = find_tlv(find_tlv(host.generate(0x9A, alg), 0x7F49), 0x86)
    public = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    assert host.verify() == 0x9000
    for message in (b"first", b"second"):  # 9A is PIN-once
        digest = hashes.Hash(hash_alg)
        digest.update(message)
        der = host.result(host.general_authenticate(alg, 0x9A, 0x81, digest.finalize()))
        public.verify(der, message, ec.ECDSA(hash_alg))  # DER SEQUENCE{r, s}


def test_ecdh_equals_local_ecdh(host: Host) -> None:
    assert host.mgmt_auth() == 0x9000
    card_public = p256_from_generate(host.generate(0x9D, 0x11))
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    assert host.verify() == 0x9000
    # The peer point in 85, the empty 82 after it: any tag order is accepted.
    data = encode_tlv(0x7C, encode_tlv(0x85, ec_point(ephemeral.public_key())) + encode_tlv(0x82))
    reply = host.send(0x87, 0x11, 0x9D, data, 0)
    shared = host.result(reply)
    assert shared == ephemeral.exchange(ec.ECDH(), card_public)
    bad_point = b"\x04" + b"\x01" * 64
    assert host.general_authenticate(0x11, 0x9D, 0x85, bad_point).sw == 0x6A80


def test_pin_always_is_consumed_by_each_9c_use(host: Host) -> None:
    assert host.mgmt_auth() == 0x9000
    public = p256_from_generate(host.generate(0x9C, 0x11))
    digest = b"\x42" * 32
    assert host.general_authenticate(0x11, 0x9C, 0x81, digest).sw == 0x6982
    assert host.verify() == 0x9000
    der = host.result(host.general_authenticate(0x11, 0x9C, 0x81, digest))
    public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    assert host.general_authenticate(0x11, 0x9C, 0x81, digest).sw == 0x6982  # consumed
    assert host.verify(None) == 0x9000  # still verified for PIN-once keys
    assert host.verify() == 0x9000
    assert host.result(host.general_authenticate(0x11, 0x9C, 0x81, digest))
    assert host.metadata(0x9C)[0x02] == bytes((3, 1))  # PIN always, touch never


def test_card_authentication_key_needs_no_pin_and_policy_tags_apply(host: Host) -> None:
    assert host.mgmt_auth() == 0x9000
    host.generate(0x9E, 0x11)
    assert host.result(host.general_authenticate(0x11, 0x9E, 0x81, b"\x01" * 32))
    host.generate(0x9C, 0x11, encode_tlv(0xAA, b"\x02") + encode_tlv(0xAB, b"\x03"))
    assert host.metadata(0x9C)[0x02] == bytes((2, 3))
    assert host.verify() == 0x9000
    for _ in range(2):  # PIN policy "once" requested for 9C: no VERIFY per signature
        assert host.result(host.general_authenticate(0x11, 0x9C, 0x81, b"\x01" * 32))
    reply = host.send(
        0x47, 0x00, 0x9A, encode_tlv(0xAC, encode_tlv(0x80, b"\x11") + b"\xaa\x01\x04")
    )
    assert reply.sw == 0x6A80  # biometric match policies are not offered


def test_empty_slot_and_unknown_key_reference(host: Host) -> None:
    assert host.verify() == 0x9000
    assert host.general_authenticate(0x07, 0x9A, 0x81, b"\x00" * 256).sw == 0x6A88
    assert host.general_authenticate(0x07, 0x42, 0x81, b"\x00" * 256).sw == 0x6A86
    assert host.send(0xF7, 0x00, 0x9A).sw == 0x6A88


# --- management key ------------------------------------------------------------------------


def test_external_authentication_opensc_style(host: Host) -> None:
    reply = host.ok(0x87, 0x03, 0x9B, encode_tlv(0x7C, encode_tlv(0x81)), 0)
    challenge = find_tlv(find_tlv(reply, 0x7C), 0x81)
    enc = Cipher(TripleDES(DEFAULT_MANAGEMENT_KEY), modes.ECB()).encryptor()
    response = enc.update(challenge) + enc.finalize()
    assert host.put_data(bytes.fromhex("5FFF00"), b"x") == 0x6982
    assert host.send(0x87, 0x03, 0x9B, encode_tlv(0x7C, encode_tlv(0x82, response))).sw == 0x9000
    assert host.put_data(bytes.fromhex("5FFF00"), b"x") == 0x9000
    # A replayed response without a fresh challenge fails and drops the authentication.
    assert host.send(0x87, 0x03, 0x9B, encode_tlv(0x7C, encode_tlv(0x82, response))).sw == 0x6982
    assert host.put_data(bytes.fromhex("5FFF00"), b"y") == 0x6982


def test_wrong_management_key_fails(host: Host) -> None:
    assert host.mgmt_auth(bytes(range(24))) == 0x6982
    assert host.send(0x47, 0x00, 0x9A, encode_tlv(0xAC, encode_tlv(0x80, b"\x11"))).sw == 0x6982


@pytest.mark.parametrize(("alg", "length"), [(0x08, 16), (0x0A, 24), (0x0C, 32)])
def test_set_aes_management_key(host: Host, alg: int, length: int) -> None:
    new_key = secrets.token_bytes(length)
    data = bytes((alg,)) + encode_tlv(0x9B, new_key)
    assert host.send(0xFF, 0xFF, 0xFF, data).sw == 0x6982
    assert host.mgmt_auth() == 0x9000
    assert host.metadata(0x9B)[0x05] == b"\x01"
    assert host.send(0xFF, 0xFF, 0xFF, data).sw == 0x9000
    assert host.metadata(0x9B)[0x01] == bytes((alg,))
    assert host.metadata(0x9B)[0x05] == b"\x00"
    host.card.reset()
    host.select()
    assert host.mgmt_auth() == 0x6A86  # 3DES no longer matches the key's algorithm
    assert host.mgmt_auth(new_key, alg) == 0x9000


# --- objects, generate, chaining -------------------------------------------------------------


def _self_signed(key: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "card key")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_generate_rsa_put_certificate_and_read_back(host: Host) -> None:
    assert host.send(0x47, 0x00, 0x9A, encode_tlv(0xAC, encode_tlv(0x80, b"\x07")), 0).sw == 0x6982
    assert host.mgmt_auth() == 0x9000
    reply = host.generate(0x9A, 0x07)
    template = find_tlv(reply, 0x7F49)
    modulus = find_tlv(template, 0x81)
    assert len(modulus) == 256 and find_tlv(template, 0x82) == b"\x01\x00\x01"
    card_public = rsa.RSAPublicNumbers(65537, int.from_bytes(modulus, "big")).public_key()
    assert host.metadata(0x9A)[0x03] == b"\x01"  # generated
    assert host.get_data(bytes.fromhex("5FC105")).sw == 0x6A82
    signer = ec.generate_private_key(ec.SECP256R1())
    issuer_cert = _self_signed(signer, signer.public_key())  # any DER will do
    value = encode_tlv(0x70, issuer_cert) + encode_tlv(0x71, b"\x00") + encode_tlv(0xFE)
    assert host.put_data(bytes.fromhex("5FC105"), value) == 0x9000
    read = find_tlv(host.get_data(bytes.fromhex("5FC105")).data, 0x53)
    assert find_tlv(read, 0x70) == issuer_cert
    # The generated key really signs (raw RSA over a host-built PKCS#1 v1.5 block).
    assert host.verify() == 0x9000
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"hello")
    info = bytes.fromhex("3031300d060960864801650304020105000420") + digest.finalize()
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info
    sig = host.result(host.general_authenticate(0x07, 0x9A, 0x81, block))
    card_public.verify(sig, b"hello", padding.PKCS1v15(), hashes.SHA256())
    assert host.put_data(bytes.fromhex("5FC105"), b"") == 0x9000  # 53 00 deletes
    assert host.get_data(bytes.fromhex("5FC105")).sw == 0x6A82
    assert host.put_data(b"\x7e", b"\x01") == 0x6A80  # Discovery is not writable


def test_command_chaining_and_get_response_for_short_apdus(card: VirtualPivCard) -> None:
    key = rsa_key()
    admin = Host(card)
    admin.select()
    assert admin.mgmt_auth() == 0x9000
    assert admin.import_rsa(0x9C, key) == 0x9000
    short = Host(card, extended=False)
    assert short.verify() == 0x9000
    short.sent.clear()
    block = b"\x00\x01" + b"\xff" * 200 + b"\x00" + secrets.token_bytes(53)
    sig = short.result(short.general_authenticate(0x07, 0x9C, 0x81, block))
    n = key.private_numbers()
    assert int.from_bytes(sig, "big") == pow(int.from_bytes(block, "big"), n.d, n.public_numbers.n)
    # 266 bytes of data: one chained piece (CLA 10) and a last one; 264 bytes back: 256 + 61 08.
    assert [a[0] for a in short.sent] == [0x10, 0x00, 0x00]
    assert short.sent[2][:5] == bytes.fromhex("00C0000008")
    # Extended APDUs carry the whole command and the whole response at once.
    admin.verify()
    admin.sent.clear()
    assert admin.result(admin.general_authenticate(0x07, 0x9C, 0x81, block)) == sig
    assert len(admin.sent) == 1


def test_chain_is_aborted_by_another_command_and_get_response_discarded(host: Host) -> None:
    card = host.card
    assert card.process(bytes.fromhex("10DB3FFF02") + b"5C") == b"\x90\x00"
    # A different command in between aborts the chain; it is processed on its own.
    assert card.process(bytes.fromhex("00FD000000"))[-2:] == b"\x90\x00"
    assert card.process(bytes.fromhex("00DB3FFF03035FFF")) == bytes.fromhex("6982")
    assert host.mgmt_auth() == 0x9000
    assert host.put_data(bytes.fromhex("5FFF00"), bytes(1000)) == 0x9000
    first = card.process(bytes.fromhex("00CB3FFF055C035FFF0000"))
    assert first[-2:] == b"\x61\x00" and len(first) == 258
    card.process(bytes.fromhex("00FD000000"))
    assert card.process(bytes.fromhex("00C0000000")) == bytes.fromhex("6985")


def test_reset_and_power_cycle_clear_pin_and_management_state(host: Host) -> None:
    card = host.card
    assert host.verify() == 0x9000 and host.mgmt_auth() == 0x9000
    for drop in (card.reset, lambda: (card.power_off(), card.power_on())):
        drop()
        assert host.send(0x20, 0x00, 0x80).sw == 0x6D00  # must select again
        host.select()
        assert host.verify(None) == 0x63C3
        assert host.put_data(bytes.fromhex("5FFF00"), b"x") == 0x6982
        assert host.verify() == 0x9000 and host.mgmt_auth() == 0x9000


# --- vendor: reset, move, import, retries ---------------------------------------------------


def test_vendor_reset_only_when_pin_and_puk_blocked(host: Host) -> None:
    card = host.card
    guid = card.guid
    assert host.mgmt_auth() == 0x9000
    host.generate(0x9A, 0x11)
    assert host.send(0xFB, 0, 0).sw == 0x6985
    for _ in range(3):
        host.verify(b"000000")
    assert host.send(0xFB, 0, 0).sw == 0x6985  # PUK still usable
    # yubikit blocks the PUK with empty (all-FF) PUK and PIN: each try must count.
    tries = [host.send(0x2C, 0x00, 0x80, b"\xff" * 16).sw for _ in range(4)]
    assert tries == [0x63C2, 0x63C1, 0x63C0, 0x6983]
    assert host.send(0xFB, 0, 0).sw == 0x9000
    assert host.verify() == 0x9000
    assert host.send(0xF7, 0x00, 0x9A).sw == 0x6A88  # keys gone
    assert host.metadata(0x9B)[0x05] == b"\x01"
    assert card.guid == guid  # the factory identity stays


def test_set_pin_retries(host: Host) -> None:
    assert host.send(0xFA, 5, 6).sw == 0x6982
    assert host.mgmt_auth() == 0x9000 and host.verify() == 0x9000
    host.send(0x24, 0x00, 0x80, pin_block(b"123456") + pin_block(b"777777"))
    assert host.verify(b"777777") == 0x9000
    assert host.send(0xFA, 5, 6).sw == 0x9000
    assert host.verify(None) == 0x63C5
    assert host.metadata(0x81)[0x06] == bytes((6, 6))
    assert host.verify() == 0x9000  # back to the default PIN


def test_move_key_to_retired_slot_and_key_history(card: VirtualPivCard) -> None:
    demo = provision_demo(card)
    host = Host(card)
    host.select()
    history = find_tlv(host.get_data(bytes.fromhex("5FC10C")).data, 0x53)
    assert history == bytes.fromhex("C10101C20100FE00")
    old_9d = host.metadata(0x9D)
    assert host.send(0xF6, 0x83, 0x9D).sw == 0x6982
    assert host.mgmt_auth() == 0x9000
    assert host.send(0xF6, 0x82, 0x9D).sw == 0x6985  # destination occupied
    assert host.ok(0xF6, 0x83, 0x9D) == b""
    assert host.send(0xF7, 0x00, 0x9D).sw == 0x6A88
    assert host.metadata(0x83) == old_9d
    cert = demo.encryption_cert.public_bytes(serialization.Encoding.DER)
    value = encode_tlv(0x70, cert) + encode_tlv(0x71, b"\x00") + encode_tlv(0xFE)
    assert host.put_data(bytes.fromhex("5FC10E"), value) == 0x9000
    history = find_tlv(host.get_data(bytes.fromhex("5FC10C")).data, 0x53)
    assert find_tlv(history, 0xC1) == b"\x02"
    message = b"old mail key"
    ciphertext = demo.encryption_public_key.encrypt(message, padding.PKCS1v15())
    assert host.verify() == 0x9000
    assert host.result(host.general_authenticate(0x07, 0x83, 0x81, ciphertext)).endswith(message)
    assert host.ok(0xF6, 0xFF, 0x82) == b""  # delete
    history = find_tlv(host.get_data(bytes.fromhex("5FC10C")).data, 0x53)
    assert find_tlv(history, 0xC1) == b"\x01"


def test_import_ec_key_and_metadata(host: Host) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    scalar = key.private_numbers().private_value.to_bytes(48, "big")
    assert host.mgmt_auth() == 0x9000
    data = encode_tlv(0x06, scalar) + encode_tlv(0xAA, b"\x01")
    assert host.send(0xFE, 0x14, 0x9A, data).sw == 0x9000
    meta = host.metadata(0x9A)
    assert meta[0x01] == b"\x14" and meta[0x02] == bytes((1, 1)) and meta[0x03] == b"\x02"
    assert find_tlv(meta[0x04], 0x86) == ec_point(key.public_key())
    der = host.result(host.general_authenticate(0x14, 0x9A, 0x81, b"\x07" * 48))  # PIN never
    key.public_key().verify(der, b"\x07" * 48, ec.ECDSA(utils.Prehashed(hashes.SHA384())))
    assert host.send(0xFE, 0x11, 0x9A, data).sw == 0x6A80  # scalar size ≠ P-256
    n = rsa_key().private_numbers()
    bad = b"".join(
        encode_tlv(i, v.to_bytes(128, "big"))
        for i, v in enumerate((n.p, n.q, n.dmp1, n.dmq1, n.iqmp ^ 1), 1)
    )
    assert host.send(0xFE, 0x07, 0x9A, bad).sw == 0x6A80  # inconsistent CRT values


# --- persistence -----------------------------------------------------------------------------


def test_persistence_round_trip(tmp_path: Path, card: VirtualPivCard) -> None:
    demo = provision_demo(card)
    host = Host(card)
    host.select()
    host.send(0x24, 0x00, 0x80, pin_block(b"123456") + pin_block(b"135790"))
    host.verify(b"000000")
    path = tmp_path / "card.json"
    card.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = VirtualPivCard.load(path)
    assert (loaded.serial, loaded.guid) == (card.serial, card.guid)
    again = Host(loaded)
    again.select()
    assert again.verify(None) == 0x63C2  # counters survive, verification does not
    assert again.verify(b"135790") == 0x9000
    ciphertext = demo.encryption_public_key.encrypt(b"persisted", padding.PKCS1v15())
    assert again.result(again.general_authenticate(0x07, 0x9D, 0x81, ciphertext)).endswith(
        b"persisted"
    )
    assert again.metadata(0x9C) == host.metadata(0x9C)
    assert (
        again.get_data(bytes.fromhex("5FC10A")).data == host.get_data(bytes.fromhex("5FC10A")).data
    )


def test_state_file_saves_after_every_change(tmp_path: Path) -> None:
    path = tmp_path / "state" / "piv.json"
    card = VirtualPivCard(state_file=path)
    assert path.exists() and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    host = Host(card)
    host.select()
    assert host.verify(b"000000") == 0x63C2
    assert host.mgmt_auth() == 0x9000
    host.generate(0x9E, 0x11)
    reopened = VirtualPivCard(state_file=path)  # as after a simulator restart
    assert reopened.guid == card.guid
    again = Host(reopened)
    again.select()
    assert again.verify(None) == 0x63C2
    assert again.metadata(0x9E) == host.metadata(0x9E)


# --- demo provisioning ---------------------------------------------------------------------


def _months(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 30.44


def test_provision_demo(tmp_path: Path, card: VirtualPivCard) -> None:
    demo = provision_demo(card, tmp_path / "demo", key_agreement=True)
    host = Host(card)
    host.select()
    assert host.verify(None) == 0x63C3  # left logged out, default PIN
    assert host.put_data(bytes.fromhex("5FFF00"), b"x") == 0x6982  # no admin auth left over
    enc = demo.encryption_cert
    assert enc.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Demo User"
    san = enc.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["demo@example.org"]
    assert enc.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    eku = enc.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in eku
    assert 38.5 < _months(enc) < 39.5 and 12.5 < _months(demo.signing_cert) < 13.5
    assert demo.retired_cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    for cert in (enc, demo.signing_cert, demo.retired_cert):
        demo.ca_cert.public_key().verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
    # The certificates on the card are the returned ones, and match the keys in the slots.
    for slot, tag, cert in (
        (0x9D, "5FC10B", enc),
        (0x9C, "5FC10A", demo.signing_cert),
        (0x82, "5FC10D", demo.retired_cert),
        (0x9A, "5FC105", demo.authentication_cert),
    ):
        stored = find_tlv(find_tlv(host.get_data(bytes.fromhex(tag)).data, 0x53), 0x70)
        assert stored == cert.public_bytes(serialization.Encoding.DER)
        public = cert.public_key()
        inner = host.metadata(slot)[0x04]
        if isinstance(public, rsa.RSAPublicKey):
            assert int.from_bytes(find_tlv(inner, 0x81), "big") == public.public_numbers().n
        else:
            assert find_tlv(inner, 0x86) == ec_point(public)
    assert host.metadata(0x9D)[0x03] == b"\x02" and host.metadata(0x9C)[0x03] == b"\x01"
    assert host.verify() == 0x9000
    digest = b"\x5a" * 32
    der = host.result(host.general_authenticate(0x11, 0x9C, 0x81, digest))
    demo.signing_public_key.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    reply = host.general_authenticate(0x11, 0x9A, 0x85, ec_point(ephemeral.public_key()))
    shared = host.result(reply)
    assert shared == ephemeral.exchange(ec.ECDH(), demo.key_agreement_public_key)
    ciphertext = demo.retired_public_key.encrypt(b"2019 mail", padding.PKCS1v15())
    assert host.result(host.general_authenticate(0x07, 0x82, 0x81, ciphertext)).endswith(
        b"2019 mail"
    )
    files = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert files == [
        "README.txt",
        "authentication.pem",
        "ca.pem",
        "encryption.pem",
        "retired-82.pem",
        "signing.pem",
    ]
    assert (
        x509.load_pem_x509_certificate((tmp_path / "demo" / "encryption.pem").read_bytes()) == enc
    )
    assert "openssl cms -encrypt" in (tmp_path / "demo" / "README.txt").read_text()


def test_provision_demo_identity(card: VirtualPivCard) -> None:
    first = provision_demo(card)
    second = provision_demo(VirtualPivCard())
    assert first.guid != second.guid and first.serial != second.serial
    assert first.encryption_cert == second.encryption_cert  # cached per process
    fixed_a = provision_demo(VirtualPivCard(), serial=4242)
    fixed_b = provision_demo(VirtualPivCard(), serial=4242)
    assert fixed_a.serial == 4242 and fixed_a.guid == fixed_b.guid


# --- robustness ------------------------------------------------------------------------------


def test_malformed_apdus_get_status_words_never_exceptions(host: Host) -> None:
    card = host.card
    assert card.process(b"") == bytes.fromhex("6700")
    assert card.process(bytes.fromhex("00CB3FFF0A5C03")) == bytes.fromhex("6700")
    assert card.process(bytes.fromhex("80FD0000")) == bytes.fromhex("6E00")
    assert card.process(bytes.fromhex("0012000000")) == bytes.fromhex("6D00")
    assert card.process(bytes.fromhex("0087079A037C0581")) == bytes.fromhex("6A80")
    rng = random.Random(1)
    interesting = [0x20, 0x24, 0x2C, 0x47, 0x87, 0xA4, 0xC0, 0xCB, 0xDB, 0xF6, 0xF7, 0xFE, 0xFF]
    host.verify()
    host.mgmt_auth()
    for _ in range(2000):
        body = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40)))
        header = bytes((rng.choice((0x00, 0x10)), rng.choice(interesting), *rng.randbytes(2)))
        rapdu = card.process(header + body)
        assert len(rapdu) >= 2
        assert rapdu[-2:] != b"\x6f\x00", (header + body).hex()
