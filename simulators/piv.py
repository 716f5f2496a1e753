"""A virtual PIV card: an APDU processor following NIST SP 800-73-4 (algorithm ids from
SP 800-78-4) closely enough that OpenSC's PIV driver, yubikit and tokend's own driver accept
it. It does real cryptography with `cryptography`, keeps PIN/PUK retry counters and can
persist its state to a JSON file.

Standard (SP 800-73-4) part: SELECT (any >= 5-byte prefix of the PIV AID), VERIFY (with data,
status-only, ``P1=FF`` reset), CHANGE REFERENCE DATA (PIN 80, PUK 81), RESET RETRY COUNTER,
GENERAL AUTHENTICATE (raw RSA, ECDSA with a DER signature, ECDH via tag 85, 9B
mutual/external authentication with 3DES or AES), GENERATE ASYMMETRIC KEY PAIR, GET DATA /
PUT DATA (certificates of 9A/9C/9D/9E and retired 82-95, Discovery, CHUID, CCC, Key History),
command chaining, 61xx + GET RESPONSE, extended length.

Vendor-specific part (YubiKey-compatible, *not* SP 800-73-4), marked ``YK_`` in `Ins`:
FD GET VERSION, F8 GET SERIAL, F7 GET METADATA, FE IMPORT ASYMMETRIC KEY, FF SET MANAGEMENT
KEY, FB RESET, FA SET PIN RETRIES, F6 MOVE / DELETE KEY. F9 (attestation) is not implemented.

Simulator-only choices (documented here because a real card would not tell):

- The card answers nothing but SELECT until the PIV applet is selected (6D00).
- CHUID carries a random GUID chosen at construction (the token's stable identity, like a
  serial number); the vendor RESET keeps that factory GUID and serial.
- Key History (5FC10C): the card keeps ``keysWithOnCardCerts`` equal to the number of retired
  slots holding both a key and its certificate; off-card count and URL are kept as written.
- A PIN-always key (9C by default) needs a VERIFY before *each* use: the use consumes it.
- The persisted state file holds PINs and private keys **unprotected** (PEM, no password); it
  is written with mode 0600 and is for tests and demos only.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

from tokend.iso7816 import SW, CommandApdu, Tlv, encode_tlv, parse_tlvs, sw_with_retries
from tokend.piv.codes import (
    DEFAULT_MANAGEMENT_KEY,
    EC_CURVES,
    KEY_SLOTS,
    MGMT_KEY_LENGTHS,
    PIN_PROTECTED_OBJECTS,
    PIV_AID,
    RETIRED_SLOTS,
    RSA_BITS,
    TAG_PUBLIC_KEY,
    WRITABLE_OBJECTS,
    Ins,
    KeyOrigin,
    KeyRef,
    PinPolicy,
    PivAlgorithm,
    PivObject,
    PivSlot,
    TouchPolicy,
)
from tokend.piv.commands import (
    algorithm_of,
    build_chuid,
    default_pin_policy,
    encode_public_key,
    mgmt_cipher,
)
from tokend.simulators.iso7816_card import CardIo, CardStatus, PersistentCard, sw_bytes

log = logging.getLogger(__name__)

#: Neutral T=1 ATR, historical bytes ``80 "tokend"`` (not a YubiKey ATR, so hosts treat the
#: card as generic PIV).
DEFAULT_ATR = bytes.fromhex("3B9713810180746F6B656E649B")
DEFAULT_PIN = b"123456"
DEFAULT_PUK = b"12345678"
DEFAULT_RETRIES = 3
#: Reported by the vendor GET VERSION (FD).
FIRMWARE_VERSION = (5, 7, 1)

#: Largest value of one data object (YubiKey-like limit).
MAX_OBJECT_SIZE = 3072
#: Largest command assembled from a chain.
MAX_CHAIN_SIZE = 16384

_STATE_FORMAT = "tokend-virtual-piv"
_STATE_VERSION = 1


PivAlg = PivAlgorithm  # the simulator's short name for the shared codes


_CardError = CardStatus


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class _SlotKey:
    private_key: PrivateKey
    alg: PivAlg
    pin_policy: PinPolicy  # effective policy, never DEFAULT
    touch_policy: TouchPolicy  # effective policy, never DEFAULT
    origin: KeyOrigin


@dataclass(slots=True)
class _Counter:
    """A PIN or PUK: padded 8-byte value, retry limit and tries left (persistent)."""

    value: bytes
    max_tries: int
    left: int

    @property
    def blocked(self) -> bool:
        return self.left == 0


def _pad_reference(value: bytes) -> bytes:
    return value.ljust(8, b"\xff")


def _valid_reference(value: bytes) -> bool:
    """8 bytes: 6-8 characters, right-padded with FF (SP 800-73-4 §2.4.3)."""
    stripped = value.rstrip(b"\xff")
    return len(value) == 8 and 6 <= len(stripped) <= 8 and b"\xff" not in stripped


_wrong_tries_sw = sw_with_retries


def _key_alg(key: PrivateKey) -> PivAlg:
    alg = algorithm_of(key)
    if alg is None:
        raise ValueError("unsupported key type or size")
    return alg


def _raw_rsa(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    """``block^d mod n`` (CRT). `cryptography` has no raw private-key operation; the host
    builds/strips the padding itself (SP 800-73-4 leaves padding to the host)."""
    size = (key.key_size + 7) // 8
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    c = int.from_bytes(block, "big")
    if len(block) != size or c >= n:
        raise _CardError(SW.SW_WRONG_DATA)
    p, q = numbers.p, numbers.q
    m1 = pow(c, numbers.dmp1, p)
    m2 = pow(c, numbers.dmq1, q)
    h = (numbers.iqmp * (m1 - m2)) % p
    return (m2 + h * q).to_bytes(size, "big")


def _single_tlv(data: bytes, tag: int) -> Tlv:
    try:
        tlvs = parse_tlvs(data)
    except ValueError:
        raise _CardError(SW.SW_WRONG_DATA) from None
    if len(tlvs) != 1 or tlvs[0].tag != tag:
        raise _CardError(SW.SW_WRONG_DATA)
    return tlvs[0]


def _tlv_dict(data: bytes) -> dict[int, bytes]:
    """Children by tag; duplicates are an error (a request must be unambiguous)."""
    try:
        tlvs = parse_tlvs(data)
    except ValueError:
        raise _CardError(SW.SW_WRONG_DATA) from None
    out: dict[int, bytes] = {}
    for tlv in tlvs:
        if tlv.tag in out:
            raise _CardError(SW.SW_WRONG_DATA)
        out[tlv.tag] = tlv.value
    return out


def _policies(fields: dict[int, bytes], slot: int) -> tuple[PinPolicy, TouchPolicy]:
    """Vendor tags AA (PIN policy) and AB (touch policy); biometric match is unsupported."""
    pin, touch = PinPolicy.DEFAULT, TouchPolicy.DEFAULT
    try:
        if 0xAA in fields:
            (raw,) = fields[0xAA]
            pin = PinPolicy(raw)
        if 0xAB in fields:
            (raw,) = fields[0xAB]
            touch = TouchPolicy(raw)
    except ValueError:
        raise _CardError(SW.SW_WRONG_DATA) from None
    if pin in (PinPolicy.MATCH_ONCE, PinPolicy.MATCH_ALWAYS):
        raise _CardError(SW.SW_WRONG_DATA)
    if pin == PinPolicy.DEFAULT:
        pin = default_pin_policy(slot)
    if touch == TouchPolicy.DEFAULT:
        touch = TouchPolicy.NEVER
    return pin, touch


class VirtualPivCard(PersistentCard):
    """A PIV card (SP 800-73-4 + YubiKey vendor extensions) behind `VirtualCard`.

    ``serial``/``guid``: factory identity (random unless given). ``state_file``: load the
    state from this file if it exists and save it there (0600) after every state change.
    All methods may be called from any thread.
    """

    CARD_NAME = "virtual PIV card"

    def __init__(
        self,
        *,
        serial: int | None = None,
        guid: bytes | None = None,
        state_file: str | os.PathLike[str] | None = None,
        atr: bytes = DEFAULT_ATR,
    ) -> None:
        self._init_card(atr, state_file)
        self._io = CardIo(max_chain=MAX_CHAIN_SIZE)
        self._serial = serial if serial is not None else 10_000_000 + secrets.randbelow(80_000_000)
        if guid is not None and len(guid) != 16:
            raise ValueError("GUID must be 16 bytes")
        self._guid = bytes(guid) if guid is not None else secrets.token_bytes(16)
        self._factory_reset()
        self._clear_volatile()
        self._dirty = False
        self._load_state()

    # --- PersistentCard hooks --------------------------------------------------------------

    def _drop_pending(self) -> None:
        self._io.drop_pending()

    def _state_changed(self) -> bool:
        return self._dirty

    def _state_saved(self) -> None:
        self._dirty = False

    # --- identity, persistence -------------------------------------------------------------

    @property
    def serial(self) -> int:
        """The vendor serial number (GET SERIAL)."""
        return self._serial

    def set_serial(self, serial: int) -> None:
        """Factory setting (not reachable over APDUs): the vendor serial number."""
        if not 0 <= serial <= 0xFFFFFFFF:
            raise ValueError("serial out of range")
        with self._lock:
            self._serial = serial
            self._dirty = True
            self._autosave()

    @property
    def guid(self) -> bytes:
        """The GUID in the current CHUID (the factory GUID unless the host rewrote CHUID)."""
        with self._lock:
            chuid = self._objects.get(PivObject.CHUID)
            if chuid:
                with contextlib.suppress(ValueError):
                    for tlv in parse_tlvs(chuid):
                        if tlv.tag == 0x34 and len(tlv.value) == 16:
                            return tlv.value
            return self._guid

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the persistent state as JSON (mode 0600). PINs and private keys are stored
        unprotected: this is a simulator file, not a key store."""
        with self._lock:
            self._write(Path(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        state_file: str | os.PathLike[str] | None = None,
        atr: bytes = DEFAULT_ATR,
    ) -> VirtualPivCard:
        """A card with the state saved by `save` (volatile state starts cleared)."""
        state = json.loads(Path(path).read_text())
        card = cls(atr=atr)
        card._restore(state)
        card._state_file = Path(state_file) if state_file is not None else None
        card._autosave()
        return card

    def _autosave(self) -> None:
        if self._state_file is not None:
            self._write(self._state_file)
        self._dirty = False

    def _write(self, path: Path) -> None:
        text = json.dumps(self._snapshot(), indent=1, sort_keys=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".piv-", dir=path.parent)  # created 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _snapshot(self) -> dict[str, Any]:
        def counter(c: _Counter) -> dict[str, Any]:
            return {"value": c.value.hex(), "max": c.max_tries, "left": c.left}

        keys = {}
        for slot, k in self._keys.items():
            pem = k.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            keys[f"{slot:02x}"] = {
                "alg": int(k.alg),
                "pin_policy": int(k.pin_policy),
                "touch_policy": int(k.touch_policy),
                "origin": int(k.origin),
                "private_key_pem": pem.decode(),
            }
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "warning": "unprotected simulator state: PINs and private keys in clear",
            "serial": self._serial,
            "guid": self._guid.hex(),
            "pin": counter(self._pin),
            "puk": counter(self._puk),
            "management_key": {
                "alg": int(self._mgmt_alg),
                "key": self._mgmt_key.hex(),
                "touch_policy": int(self._mgmt_touch),
            },
            "keys": keys,
            "objects": {f"{tag:x}": value.hex() for tag, value in self._objects.items()},
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError("not a virtual PIV card state file")

        def counter(d: dict[str, Any]) -> _Counter:
            return _Counter(bytes.fromhex(d["value"]), int(d["max"]), int(d["left"]))

        keys: dict[int, _SlotKey] = {}
        for slot_hex, k in state["keys"].items():
            private_key = serialization.load_pem_private_key(
                k["private_key_pem"].encode(), password=None
            )
            if not isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise ValueError("unsupported key type in state file")
            keys[int(slot_hex, 16)] = _SlotKey(
                private_key,
                PivAlg(k["alg"]),
                PinPolicy(k["pin_policy"]),
                TouchPolicy(k["touch_policy"]),
                KeyOrigin(k["origin"]),
            )
        with self._lock:
            self._serial = int(state["serial"])
            self._guid = bytes.fromhex(state["guid"])
            self._pin = counter(state["pin"])
            self._puk = counter(state["puk"])
            mgmt = state["management_key"]
            self._mgmt_alg = PivAlg(mgmt["alg"])
            self._mgmt_key = bytes.fromhex(mgmt["key"])
            self._mgmt_touch = TouchPolicy(mgmt["touch_policy"])
            self._keys = keys
            self._objects = {int(t, 16): bytes.fromhex(v) for t, v in state["objects"].items()}
            self._clear_volatile()

    # --- state -----------------------------------------------------------------------------

    def _factory_reset(self) -> None:
        """Persistent state as shipped: default PIN/PUK/management key, no keys, CHUID + CCC."""
        self._pin = _Counter(_pad_reference(DEFAULT_PIN), DEFAULT_RETRIES, DEFAULT_RETRIES)
        self._puk = _Counter(_pad_reference(DEFAULT_PUK), DEFAULT_RETRIES, DEFAULT_RETRIES)
        self._mgmt_alg = PivAlg.TDES
        self._mgmt_key = DEFAULT_MANAGEMENT_KEY
        self._mgmt_touch = TouchPolicy.NEVER
        self._keys: dict[int, _SlotKey] = {}
        self._objects: dict[int, bytes] = {
            PivObject.CHUID: build_chuid(self._guid),
            PivObject.CARD_CAPABILITY_CONTAINER: self._make_ccc(),
        }

    @staticmethod
    def _make_ccc() -> bytes:
        card_id = bytes.fromhex("A0000001 16 FF 02".replace(" ", "")) + secrets.token_bytes(14)
        parts = [encode_tlv(0xF0, card_id), encode_tlv(0xF1, b"\x21"), encode_tlv(0xF2, b"\x21")]
        parts += [encode_tlv(0xF3), encode_tlv(0xF4, b"\x00"), encode_tlv(0xF5, b"\x10")]
        parts += [encode_tlv(tag) for tag in (0xF6, 0xF7, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE)]
        return b"".join(parts)

    def _clear_volatile(self) -> None:
        self._selected = False
        self._pin_verified = False
        self._pin_always = False  # a fresh VERIFY, consumed by a PIN-always key
        self._mgmt_authenticated = False
        self._mgmt_pending: tuple[str, bytes] | None = None  # ("witness"|"challenge", value)
        self._io.clear()

    # --- dispatch --------------------------------------------------------------------------

    def _process(self, raw: bytes) -> bytes:
        try:
            cmd = CommandApdu.decode(raw)
        except ValueError:
            self._io.abort_chain()
            return sw_bytes(SW.SW_WRONG_LENGTH)
        body = raw[4:]
        extended = len(body) >= 3 and body[0] == 0
        if cmd.cla & ~0x10:
            return sw_bytes(SW.SW_CLA_NOT_SUPPORTED)
        return self._io.exchange(cmd, self._dispatch, extended=extended)

    def _dispatch(self, ins: int, p1: int, p2: int, data: bytes) -> bytes:
        if ins == Ins.SELECT:
            return self._select(p1, p2, data)
        if not self._selected:
            raise _CardError(SW.SW_INS_NOT_SUPPORTED)
        handlers: dict[int, Callable[[int, int, bytes], bytes]] = {
            Ins.VERIFY: self._verify,
            Ins.CHANGE_REFERENCE_DATA: self._change_reference_data,
            Ins.RESET_RETRY_COUNTER: self._reset_retry_counter,
            Ins.GENERAL_AUTHENTICATE: self._general_authenticate,
            Ins.GENERATE_ASYMMETRIC_KEY_PAIR: self._generate,
            Ins.GET_DATA: self._get_data,
            Ins.PUT_DATA: self._put_data,
            Ins.GET_VERSION: self._yk_get_version,
            Ins.GET_SERIAL: self._yk_get_serial,
            Ins.GET_METADATA: self._yk_get_metadata,
            Ins.IMPORT_KEY: self._yk_import_key,
            Ins.SET_MANAGEMENT_KEY: self._yk_set_management_key,
            Ins.RESET: self._yk_reset,
            Ins.SET_PIN_RETRIES: self._yk_set_pin_retries,
            Ins.MOVE_KEY: self._yk_move_key,
        }
        handler = handlers.get(ins)
        if handler is None:
            raise _CardError(SW.SW_INS_NOT_SUPPORTED)
        return handler(p1, p2, data)

    def _require_mgmt(self) -> None:
        if not self._mgmt_authenticated:
            raise _CardError(SW.SW_SECURITY_STATUS_NOT_SATISFIED)

    def _changed(self) -> None:
        self._dirty = True

    # --- SELECT ----------------------------------------------------------------------------

    def _select(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x04:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        if len(data) < 5 or not PIV_AID.startswith(data):
            self._clear_volatile()  # another (absent) application: PIV is deselected
            raise _CardError(SW.SW_FILE_NOT_FOUND)
        if not self._selected:
            self._clear_volatile()
            self._selected = True
        # Application Property Template: PIX + version, coexistent tag allocation authority.
        return encode_tlv(
            0x61,
            encode_tlv(0x4F, PIV_AID[5:]) + encode_tlv(0x79, encode_tlv(0x4F, PIV_AID[:5])),
        )

    # --- PIN / PUK -------------------------------------------------------------------------

    def _counter(self, ref: int) -> _Counter:
        if ref == KeyRef.PIN:
            return self._pin
        if ref == KeyRef.PUK:
            return self._puk
        raise _CardError(SW.SW_REFERENCE_NOT_FOUND)

    def _check(self, counter: _Counter, value: bytes) -> None:
        """Compare a PIN/PUK, counting the try; raises 6983 / 63Cx."""
        if counter.blocked:
            raise _CardError(SW.SW_AUTH_METHOD_BLOCKED)
        if hmac.compare_digest(counter.value, value):
            if counter.left != counter.max_tries:
                counter.left = counter.max_tries
                self._changed()
            return
        counter.left -= 1
        self._changed()
        if counter is self._pin:
            self._pin_verified = self._pin_always = False
        raise _CardError(_wrong_tries_sw(counter.left))

    def _verify(self, p1: int, p2: int, data: bytes) -> bytes:
        if p2 != KeyRef.PIN:  # global PIN 00 and OCC 96 are not offered (Discovery)
            raise _CardError(SW.SW_REFERENCE_NOT_FOUND)
        if p1 == 0xFF:
            if data:
                raise _CardError(SW.SW_WRONG_DATA)
            self._pin_verified = self._pin_always = False
            return b""
        if p1 != 0x00:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        if not data:  # status query
            if self._pin.blocked:
                raise _CardError(SW.SW_AUTH_METHOD_BLOCKED)
            if self._pin_verified:
                return b""
            raise _CardError(_wrong_tries_sw(self._pin.left))
        if len(data) != 8:
            raise _CardError(SW.SW_WRONG_DATA)
        self._check(self._pin, data)
        self._pin_verified = self._pin_always = True
        return b""

    def _change_reference_data(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x00:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        counter = self._counter(p2)
        if len(data) != 16:
            raise _CardError(SW.SW_WRONG_DATA)
        old, new = data[:8], data[8:]
        # The old value is checked (and a try counted) first: yubikit blocks a PUK by sending
        # an empty old and new value and expects 63Cx, not 6A80.
        self._check(counter, old)
        if not _valid_reference(new):
            raise _CardError(SW.SW_WRONG_DATA)
        counter.value = new
        counter.left = counter.max_tries
        self._changed()
        return b""

    def _reset_retry_counter(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x00:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        if p2 != KeyRef.PIN:
            raise _CardError(SW.SW_REFERENCE_NOT_FOUND)
        if len(data) != 16:
            raise _CardError(SW.SW_WRONG_DATA)
        puk, new_pin = data[:8], data[8:]
        self._check(self._puk, puk)  # first, as in CHANGE REFERENCE DATA
        if not _valid_reference(new_pin):
            raise _CardError(SW.SW_WRONG_DATA)
        self._pin.value = new_pin
        self._pin.left = self._pin.max_tries
        self._pin_verified = self._pin_always = False
        self._changed()
        return b""

    # --- GENERAL AUTHENTICATE --------------------------------------------------------------

    def _general_authenticate(self, p1: int, p2: int, data: bytes) -> bytes:
        fields = _tlv_dict(_single_tlv(data, 0x7C).value)
        if p2 == KeyRef.MANAGEMENT_KEY:
            return self._authenticate_management(p1, fields)
        if p2 not in KEY_SLOTS:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        slot_key = self._keys.get(p2)
        if slot_key is None:
            raise _CardError(SW.SW_REFERENCE_NOT_FOUND)
        if p1 != slot_key.alg:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        self._require_pin_for(slot_key)
        key = slot_key.private_key
        challenge, peer = fields.get(0x81), fields.get(0x85)
        if fields.get(0x82, b"") or (challenge is None) == (peer is None):
            raise _CardError(SW.SW_WRONG_DATA)
        if isinstance(key, rsa.RSAPrivateKey):
            if challenge is None:
                raise _CardError(SW.SW_WRONG_DATA)
            result = _raw_rsa(key, challenge)
        elif challenge is not None:
            result = self._ecdsa(key, challenge)
        else:
            assert peer is not None
            try:
                peer_key = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, peer)
                result = key.exchange(ec.ECDH(), peer_key)
            except ValueError:
                raise _CardError(SW.SW_WRONG_DATA) from None
        return encode_tlv(0x7C, encode_tlv(0x82, result))

    def _require_pin_for(self, slot_key: _SlotKey) -> None:
        if slot_key.pin_policy == PinPolicy.NEVER:
            return
        if not self._pin_verified:
            raise _CardError(SW.SW_SECURITY_STATUS_NOT_SATISFIED)
        if slot_key.pin_policy == PinPolicy.ALWAYS:
            if not self._pin_always:
                raise _CardError(SW.SW_SECURITY_STATUS_NOT_SATISFIED)
            self._pin_always = False  # consumed: the next use needs a new VERIFY

    @staticmethod
    def _ecdsa(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
        size = (key.curve.key_size + 7) // 8
        # The host sends the hash left-truncated/padded to the field size; be lenient.
        digest = digest[:size].rjust(size, b"\x00")
        algorithm = hashes.SHA256() if size == 32 else hashes.SHA384()
        return key.sign(digest, ec.ECDSA(utils.Prehashed(algorithm)))

    def _authenticate_management(self, alg: int, fields: dict[int, bytes]) -> bytes:
        """9B: mutual (witness 80, then 80+81) or external (challenge 81, then 82)."""
        if alg != self._mgmt_alg and not (
            {alg, self._mgmt_alg} <= {PivAlg.TDES, PivAlg.TDES_LEGACY}
        ):
            raise _CardError(SW.SW_INCORRECT_P1P2)
        cipher = mgmt_cipher(self._mgmt_alg, self._mgmt_key)
        block = 8 if self._mgmt_alg in (PivAlg.TDES, PivAlg.TDES_LEGACY) else 16
        pending, self._mgmt_pending = self._mgmt_pending, None
        witness, challenge, response = fields.get(0x80), fields.get(0x81), fields.get(0x82)

        def encrypt(value: bytes) -> bytes:
            enc = cipher.encryptor()
            return enc.update(value) + enc.finalize()

        def fail() -> _CardError:
            self._mgmt_authenticated = False
            return _CardError(SW.SW_SECURITY_STATUS_NOT_SATISFIED)

        if witness == b"" and not challenge and not response:  # mutual, step 1
            plain = secrets.token_bytes(block)
            self._mgmt_pending = ("witness", plain)
            return encode_tlv(0x7C, encode_tlv(0x80, encrypt(plain)))
        if challenge == b"" and witness is None and not response:  # external, step 1
            value = secrets.token_bytes(block)
            self._mgmt_pending = ("challenge", value)
            return encode_tlv(0x7C, encode_tlv(0x81, value))
        if witness and challenge and not response:  # mutual, step 2 (82 00 optional)
            if (
                pending is None
                or pending[0] != "witness"
                or not hmac.compare_digest(pending[1], witness)
            ):
                raise fail()
            if len(challenge) != block:
                raise fail()
            self._mgmt_authenticated = True
            return encode_tlv(0x7C, encode_tlv(0x82, encrypt(challenge)))
        if response and witness is None and challenge is None:  # external, step 2
            if (
                pending is None
                or pending[0] != "challenge"
                or not hmac.compare_digest(encrypt(pending[1]), response)
            ):
                raise fail()
            self._mgmt_authenticated = True
            return b""
        raise _CardError(SW.SW_WRONG_DATA)

    # --- keys ------------------------------------------------------------------------------

    def _key_slot(self, slot: int) -> int:
        if slot not in KEY_SLOTS:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        return slot

    def _store_key(
        self, slot: int, key: PrivateKey, fields: dict[int, bytes], origin: KeyOrigin
    ) -> None:
        pin, touch = _policies(fields, slot)
        self._keys[slot] = _SlotKey(key, _key_alg(key), pin, touch, origin)
        self._sync_key_history()
        self._changed()

    def _generate(self, p1: int, p2: int, data: bytes) -> bytes:
        if p1 != 0x00:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        slot = self._key_slot(p2)
        self._require_mgmt()
        fields = _tlv_dict(_single_tlv(data, 0xAC).value)
        alg_field = fields.get(0x80, b"")
        if len(alg_field) != 1:
            raise _CardError(SW.SW_WRONG_DATA)
        alg = alg_field[0]
        key: PrivateKey
        if alg in RSA_BITS:
            key = rsa.generate_private_key(65537, RSA_BITS[alg])
        elif alg in EC_CURVES:
            key = ec.generate_private_key(EC_CURVES[alg]())
        else:
            raise _CardError(SW.SW_WRONG_DATA)
        _policies(fields, slot)  # validate before storing
        self._store_key(slot, key, fields, KeyOrigin.GENERATED)
        return encode_tlv(TAG_PUBLIC_KEY, encode_public_key(key))

    # --- data objects ----------------------------------------------------------------------

    @staticmethod
    def _object_tag(data: bytes) -> tuple[int, bytes]:
        """Split ``5C L tag`` off the front; returns the tag and what follows."""
        if len(data) < 3 or data[0] != 0x5C or not 1 <= data[1] <= 3:
            raise _CardError(SW.SW_WRONG_DATA)
        end = 2 + data[1]
        if len(data) < end:
            raise _CardError(SW.SW_WRONG_DATA)
        return int.from_bytes(data[2:end], "big"), data[end:]

    def _get_data(self, p1: int, p2: int, data: bytes) -> bytes:
        if (p1, p2) != (0x3F, 0xFF):
            raise _CardError(SW.SW_INCORRECT_P1P2)
        tag, rest = self._object_tag(data)
        if rest:
            raise _CardError(SW.SW_WRONG_DATA)
        if tag == PivObject.DISCOVERY:
            # PIV AID; PIN usage policy: PIV PIN only, PIV PIN primary.
            return encode_tlv(
                0x7E, encode_tlv(0x4F, PIV_AID) + encode_tlv(0x5F2F, bytes((0x40, 0x00)))
            )
        if tag in PIN_PROTECTED_OBJECTS and not self._pin_verified:
            raise _CardError(SW.SW_SECURITY_STATUS_NOT_SATISFIED)
        value = self._objects.get(tag)
        if value is None:
            raise _CardError(SW.SW_FILE_NOT_FOUND)
        return encode_tlv(0x53, value)

    @staticmethod
    def _writable(tag: int) -> bool:
        return any(tag in r for r in WRITABLE_OBJECTS)

    def _put_data(self, p1: int, p2: int, data: bytes) -> bytes:
        if (p1, p2) != (0x3F, 0xFF):
            raise _CardError(SW.SW_INCORRECT_P1P2)
        self._require_mgmt()
        tag, rest = self._object_tag(data)
        if not self._writable(tag):
            raise _CardError(SW.SW_WRONG_DATA)
        value = _single_tlv(rest, 0x53).value
        if len(value) > MAX_OBJECT_SIZE:
            raise _CardError(SW.SW_NOT_ENOUGH_MEMORY)
        if value:
            self._objects[tag] = value
        else:  # 53 00 deletes the object
            self._objects.pop(tag, None)
        if tag == PivObject.KEY_HISTORY or PivObject.RETIRED1 <= tag <= PivObject.RETIRED20:
            self._sync_key_history()
        self._changed()
        return b""

    def _sync_key_history(self) -> None:
        """Keep keysWithOnCardCerts (C1) equal to the retired slots holding key + cert;
        keysWithOffCardCerts (C2) and the URL (F3) stay as the host wrote them."""
        on_card = sum(
            1 for s in RETIRED_SLOTS if s in self._keys and PivSlot(s).object_id in self._objects
        )
        existing = self._objects.get(PivObject.KEY_HISTORY)
        if existing is None and on_card == 0:
            return
        off_card, url = 0, None
        if existing:
            with contextlib.suppress(ValueError):
                for tlv in parse_tlvs(existing):
                    if tlv.tag == 0xC2 and len(tlv.value) == 1:
                        off_card = tlv.value[0]
                    elif tlv.tag == 0xF3:
                        url = tlv.value
        parts = [encode_tlv(0xC1, bytes((on_card,))), encode_tlv(0xC2, bytes((off_card,)))]
        if url is not None:
            parts.append(encode_tlv(0xF3, url))
        parts.append(encode_tlv(0xFE))
        self._objects[PivObject.KEY_HISTORY] = b"".join(parts)

    # --- vendor (YubiKey-compatible) extensions --------------------------------------------

    def _yk_get_version(self, p1: int, p2: int, data: bytes) -> bytes:
        """Vendor FD GET VERSION."""
        return bytes(FIRMWARE_VERSION)

    def _yk_get_serial(self, p1: int, p2: int, data: bytes) -> bytes:
        """Vendor F8 GET SERIAL."""
        return self._serial.to_bytes(4, "big")

    def _yk_get_metadata(self, p1: int, p2: int, data: bytes) -> bytes:
        """Vendor F7 GET METADATA: 01 alg, 02 policy, 03 origin, 04 public key, 05 is-default,
        06 retries (total, left)."""
        if p2 in (KeyRef.PIN, KeyRef.PUK):
            counter = self._counter(p2)
            default = _pad_reference(DEFAULT_PIN if p2 == KeyRef.PIN else DEFAULT_PUK)
            return (
                encode_tlv(0x01, b"\xff")
                + encode_tlv(0x05, bytes((int(counter.value == default),)))
                + encode_tlv(0x06, bytes((counter.max_tries, counter.left)))
            )
        if p2 == KeyRef.MANAGEMENT_KEY:
            is_default = (
                self._mgmt_alg in (PivAlg.TDES, PivAlg.TDES_LEGACY)
                and self._mgmt_key == DEFAULT_MANAGEMENT_KEY
            )
            return (
                encode_tlv(0x01, bytes((self._mgmt_alg,)))
                + encode_tlv(0x02, bytes((PinPolicy.NEVER, self._mgmt_touch)))
                + encode_tlv(0x05, bytes((int(is_default),)))
            )
        slot_key = self._keys.get(self._key_slot(p2))
        if slot_key is None:
            raise _CardError(SW.SW_REFERENCE_NOT_FOUND)
        return (
            encode_tlv(0x01, bytes((slot_key.alg,)))
            + encode_tlv(0x02, bytes((slot_key.pin_policy, slot_key.touch_policy)))
            + encode_tlv(0x03, bytes((slot_key.origin,)))
            + encode_tlv(0x04, encode_public_key(slot_key.private_key))
        )

    def _yk_import_key(self, p1: int, p2: int, data: bytes) -> bytes:
        """Vendor FE IMPORT ASYMMETRIC KEY: RSA ``01 p 02 q 03 dP 04 dQ 05 qInv``
        (e = 65537) or EC ``06 d``; optional AA / AB."""
        slot = self._key_slot(p2)
        self._require_mgmt()
        fields = _tlv_dict(data)
        key: PrivateKey
        if p1 in RSA_BITS:
            try:
                p, q, dmp1, dmq1, iqmp = (int.from_bytes(fields[t], "big") for t in range(1, 6))
            except KeyError:
                raise _CardError(SW.SW_WRONG_DATA) from None
            e = 65537
            if p < 3 or q < 3 or (p * q).bit_length() != RSA_BITS[p1]:
                raise _CardError(SW.SW_WRONG_DATA)
            try:
                d = rsa.rsa_recover_private_exponent(e, p, q)
                if (dmp1, dmq1, iqmp) != (d % (p - 1), d % (q - 1), pow(q, -1, p)):
                    raise ValueError("inconsistent CRT components")
                key = rsa.RSAPrivateNumbers(
                    p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, p * q)
                ).private_key()
            except ValueError:
                raise _CardError(SW.SW_WRONG_DATA) from None
        elif p1 in EC_CURVES:
            scalar = fields.get(0x06)
            curve = EC_CURVES[p1]()
            if scalar is None or len(scalar) != (curve.key_size + 7) // 8:
                raise _CardError(SW.SW_WRONG_DATA)
            try:
                key = ec.derive_private_key(int.from_bytes(scalar, "big"), curve)
            except ValueError:
                raise _CardError(SW.SW_WRONG_DATA) from None
        else:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        self._store_key(slot, key, fields, KeyOrigin.IMPORTED)
        return b""

    def _yk_set_management_key(self, p1: int, p2: int, data: bytes) -> bytes:
        """Vendor FF SET MANAGEMENT KEY: ``00 FF FF FF|FE  <alg> 9B <len> <key>``."""
        if p1 != 0xFF or p2 not in (0xFE, 0xFF):
            raise _CardError(SW.SW_INCORRECT_P1P2)
        self._require_mgmt()
        if not data:
            raise _CardError(SW.SW_WRONG_DATA)
        alg = data[0]
        key = _single_tlv(data[1:], KeyRef.MANAGEMENT_KEY).value
        if alg not in MGMT_KEY_LENGTHS or len(key) != MGMT_KEY_LENGTHS[alg]:
            raise _CardError(SW.SW_WRONG_DATA)
        self._mgmt_alg = PivAlg.TDES if alg == PivAlg.TDES_LEGACY else PivAlg(alg)
        self._mgmt_key = bytes(key)
        self._mgmt_touch = TouchPolicy.ALWAYS if p2 == 0xFE else TouchPolicy.NEVER
        self._changed()
        return b""

    def _yk_reset(self, p1: int, p2: int, data: bytes) -> bytes:
        """Vendor FB RESET: back to factory state, allowed only with PIN and PUK blocked."""
        if not (self._pin.blocked and self._puk.blocked):
            raise _CardError(SW.SW_CONDITIONS_NOT_SATISFIED)
        self._factory_reset()
        self._clear_volatile()
        self._selected = True
        self._changed()
        return b""

    def _yk_set_pin_retries(self, p1: int, p2: int, data: bytes) -> bytes:
        """Vendor FA SET PIN RETRIES (P1 PIN tries, P2 PUK tries); needs 9B and PIN; resets
        PIN and PUK to their defaults, as the YubiKey does."""
        self._require_mgmt()
        if not self._pin_verified:
            raise _CardError(SW.SW_SECURITY_STATUS_NOT_SATISFIED)
        if not (1 <= p1 <= 0xFF and 1 <= p2 <= 0xFF):
            raise _CardError(SW.SW_INCORRECT_P1P2)
        self._pin = _Counter(_pad_reference(DEFAULT_PIN), p1, p1)
        self._puk = _Counter(_pad_reference(DEFAULT_PUK), p2, p2)
        self._pin_verified = self._pin_always = False
        self._changed()
        return b""

    def _yk_move_key(self, p1: int, p2: int, data: bytes) -> bytes:
        """Vendor F6 MOVE KEY: ``00 F6 <to> <from>``; to = FF deletes the key in ``from``.
        The destination must be empty; certificates (data objects) are not moved."""
        self._require_mgmt()
        source = self._key_slot(p2)
        if source not in self._keys:
            raise _CardError(SW.SW_REFERENCE_NOT_FOUND)
        if p1 == 0xFF:
            del self._keys[source]
        else:
            target = self._key_slot(p1)
            if target == source or target in self._keys:
                raise _CardError(SW.SW_CONDITIONS_NOT_SATISFIED)
            self._keys[target] = self._keys.pop(source)
        self._sync_key_history()
        self._changed()
        return b""
