"""The PIV driver: pure parts (padding, TLV building, status words), then the driver
against the virtual PIV card through a minimal in-memory transport."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import nullcontext

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.x509.oid import NameOID

from tokend.drivers.piv import (
    PinPolicy,
    PivAlgorithm,
    PivNotFoundError,
    PivObject,
    PivSlot,
    PivToken,
    certificate_object,
    dyn_auth,
    error_for_sw,
    get_data_command,
    key_history_object,
    pad_pin,
)
from tokend.errors import (
    CardNotVerifiedError,
    CardResetError,
    DataLenRangeError,
    DeviceError,
    EncryptedDataInvalidError,
    EncryptedDataLenRangeError,
    FunctionRejectedError,
    KeyFunctionNotPermittedError,
    KeyHandleInvalidError,
    KeyTypeInconsistentError,
    MechanismInvalidError,
    MechanismParamInvalidError,
    PinIncorrectError,
    PinInvalidError,
    PinLenRangeError,
    PinLockedError,
    TransportError,
    UserNotLoggedInError,
)
from tokend.mechanisms import oaep_unpad, pkcs1v15_sign_pad, pkcs1v15_unpad, pss_encode
from tokend.model import (
    Ecdh1DeriveParams,
    Mechanism,
    OaepParams,
    PssParams,
    Token,
)
from tokend.pkcs11 import CKA, CKC, CKD, CKG, CKK, CKM, CKO
from tokend.simulators.demo import DemoMaterial, provision_demo
from tokend.simulators.piv import DEFAULT_MANAGEMENT_KEY, VirtualPivCard

PIN = bytearray(b"123456")
PUK = bytearray(b"12345678")


# --- a minimal transport: the card in memory ------------------------------------------------


class CardTransport:
    """transmit = card.process; ``reset_before_next`` makes the next transmit behave like a
    PC/SC connection that notices another program reset the card."""

    reader = "memory 0"

    def __init__(self, card: VirtualPivCard, *, extended: bool = True) -> None:
        self.card = card
        self.extended = extended
        self.reset_before_next = False
        self.fail_with: Exception | None = None
        self.apdus: list[bytes] = []
        self.closed = False

    def atr(self) -> bytes:
        return self.card.atr

    def transmit(self, apdu: bytes) -> bytes:
        if self.fail_with is not None:
            raise self.fail_with
        if self.reset_before_next:
            self.reset_before_next = False
            self.card.reset()
            raise CardResetError("card reset by another program")
        self.apdus.append(bytes(apdu))
        return self.card.process(apdu)

    def transaction(self) -> nullcontext[None]:
        return nullcontext()

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def demo() -> Iterator[tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken]]:
    card = VirtualPivCard()
    material = provision_demo(card)
    transport = CardTransport(card)
    token = PivToken.open(transport)
    assert token is not None
    yield card, material, transport, token


@pytest.fixture
def token(demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken]) -> PivToken:
    return demo[3]


@pytest.fixture
def material(demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken]) -> DemoMaterial:
    return demo[1]


def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])


def _cert_for(public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, cn: str) -> x509.Certificate:
    ca_key, ca_name = _ca()
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _obj(token: PivToken, key: str) -> dict[CKA, object]:
    for obj in token.objects():
        if str(obj.key) == key:
            return dict(obj.attributes)
    raise AssertionError(f"no object {key}")


# --- pure parts ----------------------------------------------------------------------------


def _raw_private(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    n = key.private_numbers().public_numbers.n
    k = (key.key_size + 7) // 8
    return pow(int.from_bytes(block, "big"), key.private_numbers().d, n).to_bytes(k, "big")


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def test_pkcs1v15_unpad_recovers_what_cryptography_encrypted(rsa_key: rsa.RSAPrivateKey) -> None:
    ct = rsa_key.public_key().encrypt(b"session key 1234", padding.PKCS1v15())
    assert pkcs1v15_unpad(_raw_private(rsa_key, ct), 256) == b"session key 1234"


@pytest.mark.parametrize(
    "block",
    [
        b"\x01\x02" + b"\x11" * 20 + b"\x00" + b"m" * 233,  # first byte not 00
        b"\x00\x01" + b"\x11" * 20 + b"\x00" + b"m" * 233,  # block type 1, not 2
        b"\x00\x02" + b"\x11" * 254,  # no separator
        b"\x00\x02" + b"\x11" * 7 + b"\x00" + b"m" * 246,  # padding string too short
        b"\x00\x02" + b"\x00" + b"m" * 253,  # empty padding string
    ],
)
def test_pkcs1v15_unpad_has_one_error_for_every_failure(block: bytes) -> None:
    assert len(block) == 256
    with pytest.raises(EncryptedDataInvalidError) as info:
        pkcs1v15_unpad(block, 256)
    assert str(info.value) == str(EncryptedDataInvalidError())


def test_pkcs1v15_unpad_accepts_empty_message_and_minimum_padding() -> None:
    assert pkcs1v15_unpad(b"\x00\x02" + b"\x01" * 253 + b"\x00", 256) == b""
    assert pkcs1v15_unpad(b"\x00\x02" + b"\x01" * 8 + b"\x00" + b"x" * 245, 256) == b"x" * 245


@pytest.mark.parametrize(
    ("algo", "name", "label"),
    [
        (hashes.SHA1(), "sha1", None),
        (hashes.SHA256(), "sha256", b"label"),
        (hashes.SHA384(), "sha384", None),
        (hashes.SHA512(), "sha512", b""),
    ],
)
def test_oaep_unpad_recovers_what_cryptography_encrypted(
    rsa_key: rsa.RSAPrivateKey, algo: hashes.HashAlgorithm, name: str, label: bytes | None
) -> None:
    pad = padding.OAEP(mgf=padding.MGF1(algo), algorithm=algo, label=label)
    ct = rsa_key.public_key().encrypt(b"\x00cek\xff" * 4, pad)
    em = _raw_private(rsa_key, ct)
    assert oaep_unpad(em, 256, name, name, label or b"") == b"\x00cek\xff" * 4
    with pytest.raises(EncryptedDataInvalidError):
        oaep_unpad(em, 256, name, name, b"other label")


def test_oaep_unpad_rejects_pkcs1v15_block(rsa_key: rsa.RSAPrivateKey) -> None:
    ct = rsa_key.public_key().encrypt(b"secret", padding.PKCS1v15())
    with pytest.raises(EncryptedDataInvalidError):
        oaep_unpad(_raw_private(rsa_key, ct), 256, "sha1", "sha1", b"")


def test_pss_and_pkcs1_blocks_verify_with_cryptography(rsa_key: rsa.RSAPrivateKey) -> None:
    digest = os.urandom(32)
    block = pss_encode(digest, 2048, "sha256", "sha256", 32)
    rsa_key.public_key().verify(
        _raw_private(rsa_key, block),
        digest,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
        utils.Prehashed(hashes.SHA256()),
    )
    with pytest.raises(DataLenRangeError):
        pkcs1v15_sign_pad(b"x" * 246, 256)


@pytest.mark.parametrize(
    ("sw", "klass", "retries"),
    [
        (0x63C2, PinIncorrectError, 2),
        (0x63C0, PinIncorrectError, 0),
        (0x6301, PinIncorrectError, 1),
        (0x6983, PinLockedError, None),
        (0x6982, CardNotVerifiedError, None),
        (0x6A82, PivNotFoundError, None),
        (0x6985, FunctionRejectedError, None),
        (0x6F00, DeviceError, None),
    ],
)
def test_status_words_map_to_errors(sw: int, klass: type, retries: int | None) -> None:
    err = error_for_sw(sw)
    assert type(err) is klass
    assert err.sw == sw  # type: ignore[attr-defined]
    if retries is not None:
        assert err.retries == retries  # type: ignore[attr-defined]


def test_tlv_builders_match_sp800_73_layouts() -> None:
    assert get_data_command(PivObject.CERT_AUTHENTICATION).encode() == bytes.fromhex(
        "00CB3FFF055C035FC10500"
    )
    assert get_data_command(PivObject.DISCOVERY).encode() == bytes.fromhex("00CB3FFF035C017E00")
    assert key_history_object(1, 0) == bytes.fromhex("C10101C20100FE00")
    assert certificate_object(b"\x30\x00") == bytes.fromhex("70023000710100FE00")
    assert dyn_auth((0x82, b""), (0x81, b"\x01\x02")) == bytes.fromhex("7C06820081020102")
    assert PivSlot.RETIRED20.object_id == PivObject.RETIRED20
    assert PivSlot.RETIRED1.cka_id == b"\x05" and PivSlot.CARD_AUTH.cka_id == b"\x04"


def test_pin_block_validation() -> None:
    assert pad_pin(b"123456") == bytearray(b"123456\xff\xff")
    with pytest.raises(PinLenRangeError):
        pad_pin(b"12345")
    with pytest.raises(PinLenRangeError):
        pad_pin(b"123456789")
    with pytest.raises(PinInvalidError):
        pad_pin(b"12345a")


# --- against the virtual card: discovery and objects ----------------------------------------


def test_open_reads_identity_and_objects(
    demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken],
) -> None:
    card, material, _, token = demo
    assert isinstance(token, Token)
    assert token.identity.applet == "PIV"
    assert token.identity.serial == card.guid.hex()
    assert token.identity.atr == card.atr
    assert token.info.label == f"PIV #{card.guid.hex()[:8]}"
    assert len(token.info.serial_number) <= 16
    keys = {str(o.key) for o in token.objects()}
    for slot in ("9c", "9d", "82"):
        assert {f"cert:{slot}", f"priv:{slot}", f"pub:{slot}"} <= keys
    assert not any(k.endswith(":9a") or k.endswith(":9e") for k in keys)
    assert token.version == (5, 7, 1)

    cert = _obj(token, "cert:9d")
    assert cert[CKA.CKA_CLASS] == CKO.CKO_CERTIFICATE
    assert cert[CKA.CKA_CERTIFICATE_TYPE] == CKC.CKC_X_509
    assert cert[CKA.CKA_VALUE] == _der(material.encryption_cert)
    assert cert[CKA.CKA_SUBJECT] == material.encryption_cert.subject.public_bytes()
    assert cert[CKA.CKA_ISSUER] == material.encryption_cert.issuer.public_bytes()
    serial = material.encryption_cert.serial_number
    body = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER INTEGER content
    assert cert[CKA.CKA_SERIAL_NUMBER] == bytes((0x02, len(body))) + body
    assert cert[CKA.CKA_ID] == b"\x03"
    assert cert[CKA.CKA_LABEL] == "PIV Key Management (9D)"

    priv = _obj(token, "priv:9d")
    assert priv[CKA.CKA_KEY_TYPE] == CKK.CKK_RSA
    numbers = material.encryption_public_key.public_numbers()
    assert int.from_bytes(priv[CKA.CKA_MODULUS], "big") == numbers.n  # type: ignore[arg-type]
    assert priv[CKA.CKA_PUBLIC_EXPONENT] == b"\x01\x00\x01"
    assert priv[CKA.CKA_MODULUS_BITS] == 2048
    assert (priv[CKA.CKA_DECRYPT], priv[CKA.CKA_UNWRAP], priv[CKA.CKA_SIGN]) == (True, True, False)
    assert (priv[CKA.CKA_SENSITIVE], priv[CKA.CKA_EXTRACTABLE]) == (True, False)
    assert (priv[CKA.CKA_PRIVATE], priv[CKA.CKA_TOKEN]) == (True, True)
    assert priv[CKA.CKA_ALWAYS_AUTHENTICATE] is False
    assert priv[CKA.CKA_SUBJECT] == cert[CKA.CKA_SUBJECT]
    pub = _obj(token, "pub:9d")
    assert (pub[CKA.CKA_CLASS], pub[CKA.CKA_ENCRYPT], pub[CKA.CKA_VERIFY]) == (
        CKO.CKO_PUBLIC_KEY,
        True,
        False,
    )

    sig = _obj(token, "priv:9c")
    assert sig[CKA.CKA_KEY_TYPE] == CKK.CKK_EC
    assert sig[CKA.CKA_EC_PARAMS] == bytes.fromhex("06082A8648CE3D030107")  # prime256v1
    point = material.signing_public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert sig[CKA.CKA_EC_POINT] == b"\x04\x41" + point
    assert (sig[CKA.CKA_SIGN], sig[CKA.CKA_DERIVE], sig[CKA.CKA_ALWAYS_AUTHENTICATE]) == (
        True,
        False,
        True,
    )
    assert _obj(token, "pub:9c")[CKA.CKA_VERIFY] is True

    retired = _obj(token, "priv:82")
    assert retired[CKA.CKA_LABEL] == "Retired Key 1 (82)"
    assert retired[CKA.CKA_ID] == b"\x05"
    assert (retired[CKA.CKA_DECRYPT], retired[CKA.CKA_SIGN]) == (True, False)


def test_open_returns_none_for_a_card_without_piv() -> None:
    class NoPiv(CardTransport):
        def transmit(self, apdu: bytes) -> bytes:
            return b"\x6a\x82"

    assert PivToken.open(NoPiv(VirtualPivCard())) is None


def test_mechanisms_cover_what_mail_needs(token: PivToken) -> None:
    mechs = {m.mechanism: m for m in token.mechanisms()}
    for needed in (
        CKM.CKM_RSA_PKCS,
        CKM.CKM_RSA_PKCS_OAEP,
        CKM.CKM_RSA_X_509,
        CKM.CKM_SHA256_RSA_PKCS,
        CKM.CKM_RSA_PKCS_PSS,
        CKM.CKM_ECDSA,
        CKM.CKM_ECDSA_SHA256,
        CKM.CKM_ECDH1_DERIVE,
    ):
        assert needed in mechs
    assert mechs[CKM.CKM_RSA_PKCS].max_key_size >= 2048
    assert (mechs[CKM.CKM_ECDSA].min_key_size, mechs[CKM.CKM_ECDSA].max_key_size) == (256, 384)


# --- decryption -----------------------------------------------------------------------------


def test_rsa_pkcs1_decrypt_with_the_demo_9d_key(token: PivToken, material: DemoMaterial) -> None:
    ct = material.encryption_public_key.encrypt(b"content-encryption-key!!", padding.PKCS1v15())
    with pytest.raises(UserNotLoggedInError):
        token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), ct)
    token.login(bytearray(PIN))
    assert token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), ct) == b"content-encryption-key!!"


@pytest.mark.parametrize(
    ("algo", "ckm", "ckg", "label"),
    [
        (hashes.SHA1(), CKM.CKM_SHA_1, CKG.CKG_MGF1_SHA1, b""),
        (hashes.SHA256(), CKM.CKM_SHA256, CKG.CKG_MGF1_SHA256, b""),
        (hashes.SHA256(), CKM.CKM_SHA256, CKG.CKG_MGF1_SHA256, b"a label"),
    ],
)
def test_rsa_oaep_decrypt(
    token: PivToken,
    material: DemoMaterial,
    algo: hashes.HashAlgorithm,
    ckm: CKM,
    ckg: CKG,
    label: bytes,
) -> None:
    pad = padding.OAEP(mgf=padding.MGF1(algo), algorithm=algo, label=label or None)
    ct = material.encryption_public_key.encrypt(b"k" * 32, pad)
    token.login(bytearray(PIN))
    mech = Mechanism(CKM.CKM_RSA_PKCS_OAEP, OaepParams(ckm, ckg, label))
    assert token.decrypt("priv:9d", mech, ct) == b"k" * 32
    wrong = Mechanism(CKM.CKM_RSA_PKCS_OAEP, OaepParams(ckm, ckg, b"not the label"))
    with pytest.raises(EncryptedDataInvalidError):
        token.decrypt("priv:9d", wrong, ct)


def test_decrypt_errors(token: PivToken, material: DemoMaterial) -> None:
    token.login(bytearray(PIN))
    garbage = b"\x00" + os.urandom(255)
    with pytest.raises(EncryptedDataInvalidError):  # raw result is no type-2 block
        token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), garbage)
    assert len(token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_X_509), garbage)) == 256
    with pytest.raises(EncryptedDataLenRangeError):
        token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), b"\x01" * 255)
    with pytest.raises(EncryptedDataInvalidError):  # not below the modulus
        token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_X_509), b"\xff" * 256)
    with pytest.raises(MechanismInvalidError):
        token.decrypt("priv:9d", Mechanism(CKM.CKM_ECDSA), garbage)
    with pytest.raises(MechanismParamInvalidError):
        token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS_OAEP), garbage)
    with pytest.raises(KeyTypeInconsistentError):
        token.decrypt("priv:9c", Mechanism(CKM.CKM_RSA_PKCS), garbage)
    with pytest.raises(KeyFunctionNotPermittedError):
        token.decrypt("pub:9d", Mechanism(CKM.CKM_RSA_PKCS), garbage)
    with pytest.raises(KeyHandleInvalidError):
        token.decrypt("priv:9a", Mechanism(CKM.CKM_RSA_PKCS), garbage)


def test_retired_key_decrypts_old_mail_and_never_signs(
    token: PivToken, material: DemoMaterial
) -> None:
    ct = material.retired_public_key.encrypt(b"old mail key", padding.PKCS1v15())
    token.login(bytearray(PIN))
    assert token.decrypt("priv:82", Mechanism(CKM.CKM_RSA_PKCS), ct) == b"old mail key"
    with pytest.raises(KeyFunctionNotPermittedError):
        token.sign("priv:82", Mechanism(CKM.CKM_SHA256_RSA_PKCS), b"mail")
    with pytest.raises(KeyFunctionNotPermittedError):
        token.sign("priv:9d", Mechanism(CKM.CKM_SHA256_RSA_PKCS), b"mail")


def test_decrypt_over_short_apdus_with_chaining(
    demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken],
) -> None:
    card, material, _, _ = demo
    transport = CardTransport(card, extended=False)
    token = PivToken.open(transport)
    assert token is not None
    assert {o.key for o in token.objects()} == {o.key for o in demo[3].objects()}
    token.login(bytearray(PIN))
    ct = material.encryption_public_key.encrypt(b"via chaining", padding.PKCS1v15())
    assert token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), ct) == b"via chaining"
    assert any(apdu[0] == 0x10 and apdu[1] == 0x87 for apdu in transport.apdus)


# --- signatures and the context-specific PIN -------------------------------------------------


def test_ecdsa_on_9c_needs_the_pin_with_each_signature(
    token: PivToken, material: DemoMaterial
) -> None:
    digest = os.urandom(32)
    token.login(bytearray(PIN))
    with pytest.raises(UserNotLoggedInError):
        token.sign("priv:9c", Mechanism(CKM.CKM_ECDSA), digest)
    for _ in range(2):  # the card consumes the VERIFY; each signature brings its own
        sig = token.sign("priv:9c", Mechanism(CKM.CKM_ECDSA), digest, context_pin=bytearray(PIN))
        assert len(sig) == 64
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        )
        material.signing_public_key.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    sig = token.sign(
        "priv:9c", Mechanism(CKM.CKM_ECDSA_SHA256), b"a mail body", context_pin=bytearray(PIN)
    )
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    )
    material.signing_public_key.verify(der, b"a mail body", ec.ECDSA(hashes.SHA256()))


def test_ecdsa_longer_hash_is_truncated_to_the_field(
    demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken],
) -> None:
    _, material, transport, token = demo
    digest = os.urandom(64)  # SHA-512 on P-256: leftmost 256 bits count
    sig = token.sign("priv:9c", Mechanism(CKM.CKM_ECDSA), digest, context_pin=bytearray(PIN))
    # the card sees exactly the field-sized prefix (the simulator would also truncate)
    general_authenticate = [a for a in transport.apdus if a[1] == 0x87 and a[3] == 0x9C]
    assert bytes.fromhex("8120") + digest[:32] in general_authenticate[-1]
    der = utils.encode_dss_signature(
        int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    )
    material.signing_public_key.verify(der, digest[:32], ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_wrong_context_pin_counts_down(token: PivToken) -> None:
    with pytest.raises(PinIncorrectError) as info:
        token.sign(
            "priv:9c", Mechanism(CKM.CKM_ECDSA), b"\x01" * 32, context_pin=bytearray(b"654321")
        )
    assert info.value.retries == 2
    assert token.pin_status().pin_retries == 2
    with pytest.raises(KeyTypeInconsistentError):
        token.sign("priv:9c", Mechanism(CKM.CKM_SHA256_RSA_PKCS), b"x", context_pin=PIN)


# --- PIN handling ---------------------------------------------------------------------------


def test_wrong_pin_retries_lock_and_unblock(token: PivToken) -> None:
    assert token.pin_status().pin_retries == 3
    assert token.pin_status().puk_retries == 3
    for left in (2, 1, 0):
        with pytest.raises(PinIncorrectError) as info:
            token.login(bytearray(b"000000"))
        assert info.value.retries == left
    with pytest.raises(PinLockedError):
        token.login(bytearray(PIN))
    assert token.pin_status().pin_retries == 0
    with pytest.raises(PinIncorrectError) as puk_info:
        token.unblock_pin(bytearray(b"87654321"), bytearray(b"111111"))
    assert puk_info.value.retries == 2
    token.unblock_pin(bytearray(PUK), bytearray(b"111111"))
    with pytest.raises(PinIncorrectError):
        token.login(bytearray(PIN))
    token.login(bytearray(b"111111"))
    token.change_pin(bytearray(b"111111"), bytearray(b"12345678"))
    token.login(bytearray(b"12345678"))
    assert token.pin_status().pin_retries == 3


def test_pin_format_is_checked_before_the_card_sees_it(
    demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken],
) -> None:
    _, _, transport, token = demo
    sent = len(transport.apdus)
    with pytest.raises(PinLenRangeError):
        token.login(bytearray(b"123"))
    with pytest.raises(PinInvalidError):
        token.login(bytearray(b"12345x"))
    assert len(transport.apdus) == sent
    assert token.pin_status().pin_retries == 3


def test_pin_is_not_kept_in_the_token(token: PivToken) -> None:
    pin = bytearray(b"123456")
    token.login(pin)
    assert pin == bytearray(b"123456")  # the caller owns (and wipes) its buffer
    assert b"123456" not in repr(vars(token)).encode()


def test_logout_clears_the_card_login(token: PivToken, material: DemoMaterial) -> None:
    ct = material.encryption_public_key.encrypt(b"x", padding.PKCS1v15())
    token.login(bytearray(PIN))
    token.logout()
    with pytest.raises(UserNotLoggedInError):
        token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), ct)


# --- transport errors and card resets --------------------------------------------------------


def test_card_reset_is_reported_then_the_applet_is_reselected(
    demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken],
) -> None:
    _, material, transport, token = demo
    ct = material.encryption_public_key.encrypt(b"x", padding.PKCS1v15())
    token.login(bytearray(PIN))
    transport.reset_before_next = True
    with pytest.raises(CardResetError):
        token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), ct)
    # next use re-selects PIV; the login did not survive the reset
    with pytest.raises(UserNotLoggedInError):
        token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), ct)
    token.login(bytearray(PIN))
    assert token.decrypt("priv:9d", Mechanism(CKM.CKM_RSA_PKCS), ct) == b"x"


def test_transport_errors_propagate_unchanged(
    demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken],
) -> None:
    _, _, transport, token = demo
    gone = TransportError("card removed")
    transport.fail_with = gone
    with pytest.raises(TransportError) as info:
        token.login(bytearray(PIN))
    assert info.value is gone
    token.close()
    assert transport.closed


def test_another_card_after_reset_counts_as_disconnect(
    demo: tuple[VirtualPivCard, DemoMaterial, CardTransport, PivToken],
) -> None:
    _, _, transport, token = demo
    transport.card = VirtualPivCard()  # a different GUID behind the same connection
    transport.reset_before_next = True
    with pytest.raises(CardResetError):
        token.pin_status()
    with pytest.raises(TransportError):
        token.pin_status()


# --- provisioning ---------------------------------------------------------------------------


def test_management_key_authentication(token: PivToken) -> None:
    with pytest.raises(PinIncorrectError):
        token.authenticate_management_key(bytes(24))
    token.authenticate_management_key(DEFAULT_MANAGEMENT_KEY)
    new_key = os.urandom(32)
    token.set_management_key(new_key, PivAlgorithm.AES_256)
    token.authenticate_management_key(new_key)
    with pytest.raises(PinIncorrectError):
        token.authenticate_management_key(os.urandom(32))


def test_generation_needs_management_key(token: PivToken) -> None:
    with pytest.raises(UserNotLoggedInError):
        token.generate_key(PivSlot.AUTHENTICATION, PivAlgorithm.ECC_P256)


def test_ecdh_with_a_generated_p256_key(token: PivToken) -> None:
    token.authenticate_management_key(DEFAULT_MANAGEMENT_KEY)
    public = token.generate_key(PivSlot.RETIRED2, PivAlgorithm.ECC_P256)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert _obj(token, "priv:83")[CKA.CKA_DERIVE] is True
    peer = ec.generate_private_key(ec.SECP256R1())
    expected = peer.exchange(ec.ECDH(), public)
    raw = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    token.login(bytearray(PIN))
    null = Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, raw))
    assert token.derive("priv:83", null) == expected
    wrapped = Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, b"\x04\x41" + raw))
    assert token.derive("priv:83", wrapped) == expected
    kdf = Mechanism(
        CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_SHA256_KDF, raw, b"shared info")
    )
    local = X963KDF(hashes.SHA256(), 32, b"shared info").derive(expected)
    assert token.derive("priv:83", kdf) == local
    with pytest.raises(MechanismParamInvalidError):  # a point of another curve
        other = (
            ec.generate_private_key(ec.SECP384R1())
            .public_key()
            .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        )
        token.derive(
            "priv:83", Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, other))
        )
    with pytest.raises(KeyTypeInconsistentError):
        token.derive("priv:9d", null)
    with pytest.raises(KeyFunctionNotPermittedError):
        token.derive("priv:9c", null)
    with pytest.raises(KeyFunctionNotPermittedError):
        token.sign("priv:83", Mechanism(CKM.CKM_ECDSA), b"\x00" * 32)


def test_rsa_signatures_with_an_imported_9a_key(
    token: PivToken, rsa_key: rsa.RSAPrivateKey
) -> None:
    token.authenticate_management_key(DEFAULT_MANAGEMENT_KEY)
    token.import_key(PivSlot.AUTHENTICATION, rsa_key, pin_policy=PinPolicy.ONCE)
    token.put_certificate(PivSlot.AUTHENTICATION, _der(_cert_for(rsa_key.public_key(), "auth")))
    public = rsa_key.public_key()
    assert _obj(token, "priv:9a")[CKA.CKA_SIGN] is True
    assert _obj(token, "priv:9a")[CKA.CKA_DECRYPT] is True
    token.login(bytearray(PIN))

    sig = token.sign("priv:9a", Mechanism(CKM.CKM_SHA256_RSA_PKCS), b"mail")
    public.verify(sig, b"mail", padding.PKCS1v15(), hashes.SHA256())
    sig = token.sign("priv:9a", Mechanism(CKM.CKM_SHA384_RSA_PKCS), b"mail")
    public.verify(sig, b"mail", padding.PKCS1v15(), hashes.SHA384())
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"mail")
    h = digest.finalize()
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + h
    sig = token.sign("priv:9a", Mechanism(CKM.CKM_RSA_PKCS), digest_info)
    public.verify(sig, h, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    pss = PssParams(CKM.CKM_SHA256, CKG.CKG_MGF1_SHA256, 32)
    sig = token.sign("priv:9a", Mechanism(CKM.CKM_RSA_PKCS_PSS, pss), h)
    public.verify(
        sig, h, padding.PSS(padding.MGF1(hashes.SHA256()), 32), utils.Prehashed(hashes.SHA256())
    )
    sig = token.sign("priv:9a", Mechanism(CKM.CKM_SHA256_RSA_PKCS_PSS, pss), b"mail")
    public.verify(sig, b"mail", padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    with pytest.raises(DataLenRangeError):
        token.sign("priv:9a", Mechanism(CKM.CKM_RSA_PKCS_PSS, pss), h + b"x")
    with pytest.raises(KeyTypeInconsistentError):
        token.sign("priv:9a", Mechanism(CKM.CKM_ECDSA), h)


def test_provisioning_round_trip_on_a_fresh_card(rsa_key: rsa.RSAPrivateKey) -> None:
    card = VirtualPivCard()
    transport = CardTransport(card)
    token = PivToken.open(transport)
    assert token is not None
    assert token.objects() == ()
    token.authenticate_management_key(DEFAULT_MANAGEMENT_KEY)

    # signing key generated on the token, with its certificate
    signing = token.generate_key(PivSlot.SIGNATURE, PivAlgorithm.ECC_P256)
    assert isinstance(signing, ec.EllipticCurvePublicKey)
    assert {"priv:9c", "pub:9c"} <= {str(o.key) for o in token.objects()}
    assert _obj(token, "priv:9c")[CKA.CKA_LOCAL] is True
    signing_cert = _cert_for(signing, "signing")
    token.put_certificate(PivSlot.SIGNATURE, _der(signing_cert))
    assert _obj(token, "cert:9c")[CKA.CKA_VALUE] == _der(signing_cert)

    # encryption key imported, then retired to 82 when renewed
    token.import_key(PivSlot.KEY_MANAGEMENT, rsa_key)
    enc_cert = _cert_for(rsa_key.public_key(), "encryption")
    token.put_certificate(PivSlot.KEY_MANAGEMENT, _der(enc_cert))
    assert _obj(token, "priv:9d")[CKA.CKA_LOCAL] is False
    token.move_key(PivSlot.KEY_MANAGEMENT, PivSlot.RETIRED1)
    keys = {str(o.key) for o in token.objects()}
    assert {"cert:82", "priv:82", "pub:82"} <= keys
    assert not any(k.endswith(":9d") for k in keys)
    assert _obj(token, "cert:82")[CKA.CKA_VALUE] == _der(enc_cert)

    status = token.status()
    assert {s.slot: s.role for s in status.slots} == {"9c": "signature", "82": "retired"}
    by_slot = {s.slot: s for s in status.slots}
    assert by_slot["9c"].algorithm == "p256" and by_slot["9c"].origin == "generated"
    assert by_slot["82"].algorithm == "rsa2048" and by_slot["82"].origin == "imported"
    assert by_slot["82"].certificate == _der(enc_cert)
    assert status.pin.pin_retries == 3

    # a new instance (reinsertion) sees the same, retired slot found via Key History
    again = PivToken.open(CardTransport(card))
    assert again is not None
    assert [o.key for o in again.objects()] == [o.key for o in token.objects()]
    again.login(bytearray(PIN))
    ct = rsa_key.public_key().encrypt(b"old", padding.PKCS1v15())
    assert again.decrypt("priv:82", Mechanism(CKM.CKM_RSA_PKCS), ct) == b"old"
    history = card.process(get_data_command(PivObject.KEY_HISTORY).encode())
    assert history[-2:] == b"\x90\x00" and b"\xc1\x01\x01" in history

    # deleting the retired key removes it and its certificate
    token.move_key(PivSlot.RETIRED1, 0xFF)
    assert not any(o.key.ref == 0x82 for o in token.objects())
    token.delete_certificate(PivSlot.SIGNATURE)
    assert "cert:9c" not in {str(o.key) for o in token.objects()}
    assert "priv:9c" in {str(o.key) for o in token.objects()}


def test_change_puk_and_reset(token: PivToken) -> None:
    token.change_puk(bytearray(PUK), bytearray(b"87654321"))
    with pytest.raises(PinIncorrectError):
        token.change_puk(bytearray(PUK), bytearray(b"11111111"))
    token.reset()
    assert token.objects() == ()
    token.login(bytearray(PIN))  # defaults are back
    token.authenticate_management_key(DEFAULT_MANAGEMENT_KEY)
    assert token.pin_status().puk_retries == 3
