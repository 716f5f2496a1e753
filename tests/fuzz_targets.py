"""One fuzz target per parser: ``target(data: bytes) -> None``.

A target feeds ``data`` to the parser the way the product does and lets only the parser's
documented error escape as a *clean* outcome (it catches it); anything else — another
exception type, a hang, a wrong round trip — propagates and is a finding. The property
tests (tests/test_fuzz_properties.py) run every target under hypothesis in the normal
suite; `make fuzz` (tools/fuzz.py) runs each one coverage-guided under atheris, or under
hypothesis with a long budget when atheris is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

from tokend import ccid
from tokend.errors import TokendError
from tokend.iso7816 import tlv
from tokend.iso7816.apdu import CommandApdu, ResponseApdu
from tokend.iso7816.status import error_for_sw
from tokend.pinentry import PinentryProtocolError, escape, unescape_into
from tokend.piv.codes import PivAlgorithm
from tokend.piv.commands import parse_public_key
from tokend.piv.objects import certificate_der, parse_metadata
from tokend.protocol import (
    Params,
    ProtocolError,
    decode_attribute_types,
    decode_mechanism,
    decode_request,
    decode_template,
)


def jsonrpc(data: bytes) -> None:
    """A request line as the daemon reads it, then the value decoders its methods use on
    the params (template, mechanism, typed params)."""
    try:
        request = decode_request(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, int)
        return
    params = Params(request.params)
    for key, value in request.params.items():
        for decode in (decode_template, decode_mechanism, decode_attribute_types):
            with contextlib.suppress(TokendError):
                decode(value)
        for accessor in (params.int, params.bool, params.bytes, params.str):
            with contextlib.suppress(TokendError):
                accessor(key)


def tlv_parse(data: bytes) -> None:
    """BER-TLV (ISO 7816 / PIV): parse, and what parses re-encodes to what was read."""
    try:
        tlvs = tlv.parse_tlvs(data)
    except ValueError:
        return
    for item in tlvs:
        again, _end = tlv.read_tlv(tlv.encode_tlv(item.tag, item.value))
        assert again == item, (again, item)
        if item.constructed:
            with contextlib.suppress(ValueError):
                item.children()
    with contextlib.suppress(ValueError):
        tlv.find_tlv(data, 0x53)


def apdu_command(data: bytes) -> None:
    """Command APDUs (what the virtual cards parse): every decoded APDU encodes back to the
    same bytes, except the two spellings of Le=256/65536."""
    try:
        apdu = CommandApdu.decode(data)
    except ValueError:
        return
    extended = len(data) > 4 and (len(data) == 7 or (data[4] == 0 and len(data) > 5))
    assert CommandApdu.decode(apdu.encode(extended=extended)) == apdu


def apdu_response(data: bytes) -> None:
    """Response APDUs and the one SW→error mapping: any status word maps to an error that
    carries a CKR."""
    try:
        rapdu = ResponseApdu.decode(data)
    except ValueError:
        assert len(data) < 2
        return
    assert rapdu.encode() == data
    if not rapdu.ok:
        err = error_for_sw(rapdu.sw)
        assert isinstance(err, TokendError) and isinstance(err.ckr, int)


def piv_objects(data: bytes) -> None:
    """What a PIV card returns for data objects, GET METADATA and public keys."""
    with contextlib.suppress(ValueError):
        certificate_der(data)
    try:
        tags = {t.tag: t.value for t in tlv.parse_tlvs(data)}
    except ValueError:
        tags = None
    if tags is not None:
        with contextlib.suppress(ValueError):
            parse_metadata(tags)
    for alg in (PivAlgorithm.RSA_2048, PivAlgorithm.ECC_P256, PivAlgorithm.ECC_P384):
        with contextlib.suppress(ValueError):
            parse_public_key(alg, data)


def ccid_messages(data: bytes) -> None:
    """CCID bulk messages, the class descriptor and NotifySlotChange (USB transport)."""
    try:
        msg = ccid.CcidMessage.decode(data, max_length=271)
    except ccid.CcidMessageError:
        pass
    else:
        assert msg.encode() == data
        _ = (msg.icc_status, msg.command_status, msg.chain, msg.error)
    with contextlib.suppress(ValueError):
        desc = ccid.CcidDescriptor.decode(data)
        _ = (desc.level, desc.extended, desc.unsupported_reason)
        with contextlib.suppress(ValueError):
            _ = desc.power_select
    with contextlib.suppress(ccid.CcidMessageError):
        ccid.parse_notify_slot_change(data, slot=data[0] % 8 if data else 0)


def ble_framing(data: bytes) -> None:
    """BLE GATT fragments from a key (CTAP-BLE framing): ``data`` is cut into fragments at
    the lengths its first byte gives and fed to one Reassembler; a whole frame cut again
    and reassembled gives the same frame."""
    from tokend.ble_framing import MAX_FRAGMENT, MIN_FRAGMENT, FramingError, Reassembler, fragments

    if not data:
        return
    size = MIN_FRAGMENT + data[0] % (MAX_FRAGMENT - MIN_FRAGMENT + 1)
    body = data[1:]
    reassembler = Reassembler()
    for i in range(0, len(body), size):
        try:
            frame = reassembler.feed(body[i : i + size])
        except FramingError as exc:
            assert isinstance(exc.code, int)
            reassembler.reset()
            continue
        if frame is not None:
            again = Reassembler()
            out = [again.feed(f) for f in fragments(frame.cmd, frame.data, size)]
            assert out[-1] == frame and all(o is None for o in out[:-1])


def p11kit_rpc(data: bytes) -> None:
    """p11-kit RPC request frames as the front end reads them: the 12-byte header, then a
    body read with the decoder's primitives in an order the input's last bytes choose (so
    every reader meets every kind of garbage)."""
    from tokend.p11kit.codec import Generation, ParseError, Reader, parse_header

    with contextlib.suppress(ParseError):
        parse_header(data[:12])
    order, body = data[-6:], data[:-6]
    for generation in Generation:
        try:
            reader = Reader(bytearray(body), generation)
        except ParseError:
            return
        reads = (
            reader.byte,
            reader.ulong,
            reader.byte_array,
            reader.secret,
            reader.out_capacity,
            reader.ulong_capacity,
            reader.attributes,
            reader.requested_attributes,
            reader.mechanism,
        )
        try:
            for choice in order:
                reads[choice % len(reads)]()
            reader.finish()
        except (ParseError, TokendError):
            continue


def pkcs15(data: bytes) -> None:
    """PKCS#15 files a SIM's PKI applet returns (EF.DIR, ODF, TokenInfo, AODF, PrKDF,
    PuKDF, CDF): only Pkcs15FormatError (a CKR_DEVICE_ERROR) may come out."""
    from tokend import pkcs15 as p15

    for parse in (
        p15.parse_dir,
        p15.parse_odf,
        p15.parse_tokeninfo,
        p15.parse_aodf,
        p15.parse_prkdf,
        p15.parse_pukdf,
        p15.parse_cdf,
        lambda raw: list(p15.split_elements(raw)),
    ):
        with contextlib.suppress(TokendError):
            parse(data)


def smime_input(data: bytes) -> None:
    """A message handed to `tokend smime decrypt/verify`: DER, PEM or MIME. Only the
    library's own error (SmimeError, which the CLI prints) may come out."""
    from tokend.smime.envelope import recipients
    from tokend.smime.errors import SmimeError
    from tokend.smime.message import unwrap
    from tokend.smime.verifying import verify

    try:
        found = unwrap(data)
    except SmimeError:
        return
    if found.info["content_type"].native in ("enveloped_data", "authenticated_enveloped_data"):
        with contextlib.suppress(SmimeError):
            recipients(found.info["content"])
    with contextlib.suppress(SmimeError):
        verify(data, [])


#: Test-only keys, certificates and messages made with OpenSSL (tests/vectors/smime-fuzz/
#: README.md says how): the seeds of the S/MIME targets and the keys of `smime_decrypt`.
SMIME_VECTORS = Path(__file__).resolve().parent / "vectors" / "smime-fuzz"


class _SoftwareKeyring:
    """`tokend.smime`'s keyring seam with the token's part done in software with the
    vectors' keys, so the fuzzer reaches what runs after it: recipient matching, the X9.63
    KDF, AES key unwrap, content decryption and the GCM tag check (all product code)."""

    def __init__(self) -> None:
        from asn1crypto import x509 as ax509
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

        from tokend.smime.keys import TokenCert, TokenRef

        token = TokenRef(0, "fuzz", "fuzz vectors", 1)
        self._keys = {}
        self._certs = []
        for i, name in enumerate(("rsa", "ec")):
            pem = (SMIME_VECTORS / f"{name}.pem").read_bytes()
            der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
            cert = TokenCert(token, bytes([i + 1]), name, ax509.Certificate.load(der))
            self._certs.append(cert)
            key_pem = (SMIME_VECTORS / f"{name}.key").read_bytes()
            self._keys[cert.key_id] = load_pem_private_key(key_pem, None)

    def certificates(self, *, refresh: bool = False) -> list:  # type: ignore[type-arg]
        return list(self._certs)

    def unwrap(self, cert, mechanism, encrypted_key: bytes) -> bytearray:  # type: ignore[no-untyped-def]
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        from tokend.errors import (
            EncryptedDataInvalidError,
            MechanismInvalidError,
            MechanismParamInvalidError,
        )
        from tokend.pkcs11 import CKG, CKM

        hash_of = {CKM.CKM_SHA_1: hashes.SHA1,
                   CKM.CKM_SHA256: hashes.SHA256, CKM.CKM_SHA384: hashes.SHA384,
                   CKM.CKM_SHA512: hashes.SHA512}  # fmt: skip
        mgf_of = {CKG.CKG_MGF1_SHA1: hashes.SHA1,
                  CKG.CKG_MGF1_SHA256: hashes.SHA256, CKG.CKG_MGF1_SHA384: hashes.SHA384,
                  CKG.CKG_MGF1_SHA512: hashes.SHA512}  # fmt: skip
        if mechanism.mechanism == CKM.CKM_RSA_PKCS:
            pad = padding.PKCS1v15()
        elif mechanism.mechanism == CKM.CKM_RSA_PKCS_OAEP:
            p = mechanism.params
            if p.hash_alg not in hash_of or p.mgf not in mgf_of:
                raise MechanismParamInvalidError()
            pad = padding.OAEP(
                padding.MGF1(mgf_of[p.mgf]()), hash_of[p.hash_alg](), p.source_data or None
            )
        else:
            raise MechanismInvalidError()
        try:
            return bytearray(self._keys[cert.key_id].decrypt(encrypted_key, pad))
        except ValueError:  # what a token answers to a bad padding or length
            raise EncryptedDataInvalidError() from None

    def agree(self, cert, peer_point: bytes) -> bytearray:  # type: ignore[no-untyped-def]
        from cryptography.hazmat.primitives.asymmetric import ec

        from tokend.errors import MechanismParamInvalidError

        key = self._keys[cert.key_id]
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, peer_point)
        except ValueError:  # a point not on the curve: the token refuses the parameter
            raise MechanismParamInvalidError() from None
        return bytearray(key.exchange(ec.ECDH(), peer))


@cache
def _software_keyring() -> _SoftwareKeyring:
    return _SoftwareKeyring()


def smime_decrypt(data: bytes) -> None:
    """A message handed to `tokenctl smime-decrypt`, decrypted all the way when it is for
    one of the vectors' keys: only SmimeError (what the CLI prints) or a TokendError (the
    token's answer) may come out, and a GCM message whose tag fails never yields content."""
    from tokend.smime.envelope import decrypt
    from tokend.smime.errors import SmimeError

    with contextlib.suppress(SmimeError, TokendError):
        decrypt(_software_keyring(), data)  # type: ignore[arg-type]


def pinentry_data(data: bytes) -> None:
    """Assuan data lines from pinentry (the PIN comes back percent-escaped)."""
    try:
        out = unescape_into(data)
    except PinentryProtocolError:
        return
    text = bytes(out).decode("latin-1")
    assert unescape_into(escape(text).encode("latin-1")) == out


def config_file(data: bytes) -> None:
    """tokend.toml as `tokend serve --config` reads it: only a located ConfigError."""
    from tokend.config import ConfigError, ServeConfig

    fd, name = tempfile.mkstemp(suffix=".toml")
    try:
        os.write(fd, data)
        os.close(fd)
        with contextlib.suppress(ConfigError):
            ServeConfig.load(Path(name))
    finally:
        os.unlink(name)


# -- the PIV driver reading a card that answers garbage ---------------------------------


@cache
def _demo_card():  # type: ignore[no-untyped-def]
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    provision_demo(card, serial=1818)
    return card


class _CorruptingCard:
    """A real provisioned virtual PIV card whose ``index``-th answer is replaced."""

    def __init__(self, card, index: int, answer: bytes) -> None:  # type: ignore[no-untyped-def]
        self.card, self.index, self.answer, self.count = card, index, answer, 0

    @property
    def atr(self) -> bytes:
        return self.card.atr

    def power_on(self) -> None:
        self.card.power_on()

    def power_off(self) -> None:
        self.card.power_off()

    def reset(self) -> None:
        self.card.reset()

    def process(self, apdu: bytes) -> bytes:
        self.count += 1
        real = self.card.process(apdu)
        return self.answer if self.count == self.index else real


def _open_piv(card) -> None:  # type: ignore[no-untyped-def]
    """What the daemon does with a new card: open it, list its objects, read its PIN state."""
    from tokend.drivers.piv import PivToken
    from tokend.simulators.memory import MemoryReader

    reader = MemoryReader("Fuzz Reader")
    reader.insert(card)
    transport = reader.connect()
    try:
        token = PivToken.open(transport)
        if token is not None:
            _ = token.objects(), token.identity, token.info
            with contextlib.suppress(TokendError):
                token.pin_status()
    finally:
        transport.close()


@cache
def _piv_open_apdus() -> int:
    """How many APDUs opening the unchanged demo card takes."""
    card = _CorruptingCard(_demo_card(), 0, b"")
    _open_piv(card)
    return card.count


def piv_driver(data: bytes) -> None:
    """The PIV driver opening a card (SELECT, version, serial, CHUID, every certificate
    and metadata) and reading its PIN state, when one answer is replaced by ``data[1:]``:
    it opens, declines the card, or raises a TokendError; never anything else."""
    if not data:
        return
    # data[0] picks which answer to replace, among those the driver really asks for (an
    # index past the last one would run the card unchanged and waste the input).
    index = 1 + data[0] % _piv_open_apdus()
    with contextlib.suppress(TokendError):
        _open_piv(_CorruptingCard(_demo_card(), index, bytes(data[1:])))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "jsonrpc": jsonrpc,
    "tlv": tlv_parse,
    "apdu_command": apdu_command,
    "apdu_response": apdu_response,
    "piv_objects": piv_objects,
    "piv_driver": piv_driver,
    "ccid": ccid_messages,
    "ble": ble_framing,
    "p11kit": p11kit_rpc,
    "pkcs15": pkcs15,
    "smime": smime_input,
    "smime_decrypt": smime_decrypt,
    "pinentry": pinentry_data,
    "config": config_file,
}


def _smime_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SMIME_VECTORS.iterdir()) if p.suffix in (".der", ".eml")]


#: Seeds: one valid input per target, so mutation starts from the interesting shapes.
SEEDS: dict[str, list[bytes]] = {
    "jsonrpc": [
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "C_DecryptInit",
                "params": {
                    "h_session": 1,
                    "p_mechanism": {
                        "mechanism": "CKM_RSA_PKCS_OAEP",
                        "parameter": {"hash_alg": "CKM_SHA256", "mgf": "CKG_MGF1_SHA256"},
                    },
                    "p_template": {"CKA_CLASS": "CKO_PRIVATE_KEY", "CKA_ID": "Aw=="},
                },
            }
        ).encode()
    ],
    "tlv": [bytes.fromhex("7c0a8200810500112233445f7f4903810100")],
    "apdu_command": [
        bytes.fromhex("00a4040009a00000030800001000"),
        bytes.fromhex("0087079d000003"),
    ],
    "apdu_response": [bytes.fromhex("6a82"), bytes.fromhex("0102039000")],
    "piv_objects": [bytes.fromhex("7003300102710100fe00"), bytes.fromhex("01011102020103010206")],
    "piv_driver": [b"\x01\x6a\x82", b"\x05\x53\x03\x70\x01\x00\x90\x00"],
    "ccid": [ccid.xfr_block(1, b"\x00\xa4\x04\x00").encode(), ccid.notify_slot_change(True)],
    "ble": [b"\x00\x83\x00\x05\x00\xa4\x04\x00\x00"],
    "p11kit": [bytes.fromhex("0000000b000000027575") + bytes(16) + bytes([1, 1, 0, 0, 0, 0])],
    "pkcs15": [bytes.fromhex("a00a300804065f504b43533135")],
    "smime": [
        b"-----BEGIN PKCS7-----\nMAA=\n-----END PKCS7-----\n",
        *_smime_seeds(),
    ],
    "smime_decrypt": _smime_seeds(),
    "pinentry": [b"D 12%253456"],
    "config": [b'log_level = "info"\n[[policy]]\nprogram = "/usr/bin/x"\n'],
}
