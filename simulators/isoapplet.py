"""The legacy IsoApplet (API 00.06) as a virtual applet, the PKI half of the virtual SIM
(`tokend.simulators.sim` is the UICC it runs on): a file system with the FCP stored
verbatim and the ACL bytes of tag 86 checked; PIN (reference 01, 4-16 bytes, 3 tries) and
PUK (02, exactly 16 bytes, 5 tries); the lifecycle (new → PUK set → operational); RSA-2048
(and P-256 / P-384) key generation into key references 0-15; private-key import by PUT
DATA when the applet is built with it (``import_allowed``; the real default build refuses
with 6900); MSE SET + PSO sign / decipher (PKCS #1 v1.5, the card pads and unpads);
command chaining (CLA 10, only for PSO, GENERATE and PUT DATA, at most 660 bytes); its own
``61xx`` paging for answers over 256 bytes (PIN required, exact Le; any other command
meanwhile → 6900). SELECT of the applet forgets the PIN, the security environment, chains
and the current file.

It keeps its own chaining and paging rather than the shared `CardIo`: the legacy applet
refuses a changed chain header with 6900 and gates its GET RESPONSE behind the PIN.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokend.iso7816 import SW, CommandApdu, encode_tlv, parse_tlvs
from tokend.iso7816.status import sw_with_retries
from tokend.sim.codes import (
    APPLET_MF,
    APPLET_VERSION,
    KEY_REFERENCES,
    MAX_CHAIN,
    MAX_DIGEST_INFO,
    PIN_MAX,
    PIN_MIN,
    PIN_TRIES,
    PUK_LENGTH,
    PUK_TRIES,
    TAG_PRIVATE_KEY_TEMPLATE,
    TAG_PUBLIC_KEY_TEMPLATE,
    Acl,
    AclValue,
    Alg,
    Fdb,
    Ins,
    Lifecycle,
    PinRef,
    Pso,
    SeTemplate,
)

__all__ = ["CURVES", "FEATURES", "IsoApplet"]

#: Feature byte of the SELECT answer: SecureRandom (02) and ECC (04); never 01 (extended).
FEATURES = 0x06
MAX_CHILDREN = 30


class _CardError(Exception):
    """Ends a command with a status word (control flow inside the card)."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


# --- EC curves the applet knows (the host sends the domain parameters) ----------------------


@dataclass(frozen=True)
class _Curve:
    curve: ec.EllipticCurve
    p: int
    n: int

    @property
    def size(self) -> int:
        return (self.p.bit_length() + 7) // 8

    def params(self) -> dict[int, bytes]:
        """Tags 81 p, 82 a, 83 b, 84 G, 85 n, 87 cofactor, as OpenSC sends them."""
        size = self.size
        g = ec.derive_private_key(1, self.curve).public_key().public_numbers()
        a = self.p - 3
        b = (g.y * g.y - g.x**3 - a * g.x) % self.p
        return {
            0x81: self.p.to_bytes(size, "big"),
            0x82: a.to_bytes(size, "big"),
            0x83: b.to_bytes(size, "big"),
            0x84: b"\x04" + g.x.to_bytes(size, "big") + g.y.to_bytes(size, "big"),
            0x85: self.n.to_bytes(size, "big"),
            0x87: b"\x00\x01",
        }


CURVES = (
    _Curve(
        ec.SECP256R1(),
        2**256 - 2**224 + 2**192 + 2**96 - 1,
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    ),
    _Curve(
        ec.SECP384R1(),
        2**384 - 2**128 - 2**96 + 2**32 - 1,
        int(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
            "581A0DB248B0A77AECEC196ACCC52973",
            16,
        ),
    ),
)


def _curve_for(fields: dict[int, bytes]) -> _Curve:
    for curve in CURVES:
        params = curve.params()
        if all(fields.get(tag) == value for tag, value in params.items()):
            return curve
    raise _CardError(SW.SW_WRONG_DATA)


# --- RSA without a library padding (the card pads and unpads itself) -----------------------


def _rsa_private(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    """``block^d mod n`` with the CRT; `cryptography` offers no raw private operation."""
    size = (key.key_size + 7) // 8
    numbers = key.private_numbers()
    c = int.from_bytes(block, "big")
    if len(block) != size or c >= numbers.public_numbers.n:
        raise _CardError(SW.SW_WRONG_DATA)
    p, q = numbers.p, numbers.q
    m1, m2 = pow(c, numbers.dmp1, p), pow(c, numbers.dmq1, q)
    h = (numbers.iqmp * (m1 - m2)) % p
    return (m2 + h * q).to_bytes(size, "big")


def _unpad_type2(block: bytes) -> bytes:
    """PKCS #1 v1.5 encryption padding: 00 02 PS(≥ 8 non-zero) 00 M."""
    if len(block) < 11 or block[0] != 0x00 or block[1] != 0x02:
        raise _CardError(SW.SW_WRONG_DATA)
    end = block.find(b"\x00", 2)
    if end < 10:
        raise _CardError(SW.SW_WRONG_DATA)
    return block[end + 1 :]


def _pad_type1(data: bytes, size: int) -> bytes:
    return b"\x00\x01" + b"\xff" * (size - len(data) - 3) + b"\x00" + data


# --- the applet's file system -------------------------------------------------------------


@dataclass(eq=False)
class _File:
    fid: int
    fcp: bytes
    is_df: bool
    acl: bytes | None  # the tag 86 value (starts FF), None = everything allowed
    size: int = 0
    data: bytearray = field(default_factory=bytearray)
    children: list[_File] = field(default_factory=list)
    parent: _File | None = None

    def walk(self) -> list[_File]:
        out = [self]
        for child in self.children:
            out += child.walk()
        return out

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fid": f"{self.fid:04X}", "fcp": self.fcp.hex()}
        if self.is_df:
            out["children"] = [c.snapshot() for c in self.children]
        else:
            out["data"] = bytes(self.data).hex()
        return out


def _parse_fcp(fcp: bytes) -> _File:
    """Build a file from the FCP of CREATE FILE (tags 81 size, 82 FDB, 83 FID, 86 ACL)."""
    try:
        outer = parse_tlvs(fcp)
        if len(outer) != 1 or outer[0].tag not in (0x62, 0x6F):
            raise ValueError("not an FCP")
        tags: dict[int, bytes] = {}
        for tlv in outer[0].children():
            tags.setdefault(tlv.tag, tlv.value)
    except ValueError:
        raise _CardError(SW.SW_WRONG_DATA) from None
    fdb, fid, size, acl = tags.get(0x82), tags.get(0x83), tags.get(0x81), tags.get(0x86)
    if fdb is None or len(fdb) < 1 or fid is None or len(fid) != 2:
        raise _CardError(SW.SW_WRONG_DATA)
    if acl is not None and (len(acl) != 8 or acl[0] != 0xFF):
        raise _CardError(SW.SW_WRONG_DATA)
    number = int.from_bytes(fid, "big")
    if number in (0x3F00, 0x3FFF, 0xFFFF):
        raise _CardError(SW.SW_WRONG_DATA)
    if fdb[0] == Fdb.DF:
        return _File(number, bytes(fcp), True, acl)
    if fdb[0] == Fdb.TRANSPARENT_EF:
        if size is None or not 1 <= len(size) <= 2:
            raise _CardError(SW.SW_WRONG_DATA)
        length = int.from_bytes(size, "big")
        if length == 0:
            raise _CardError(SW.SW_WRONG_DATA)
        return _File(number, bytes(fcp), False, acl, length, bytearray(length))
    raise _CardError(SW.SW_FUNC_NOT_SUPPORTED)  # record files: not in this build


def _mf() -> _File:
    return _File(APPLET_MF, bytes.fromhex("6F0782013883023F00"), True, None)


def _restore_file(d: dict[str, Any], parent: _File | None) -> _File:
    fcp = bytes.fromhex(d["fcp"])
    if parent is None:
        node = _mf()
    else:
        node = _parse_fcp(fcp)
        node.parent = parent
    if node.is_df:
        node.children = [_restore_file(c, node) for c in d.get("children", [])]
    else:
        node.data = bytearray(bytes.fromhex(d["data"]))
        if len(node.data) != node.size:
            raise ValueError("state file: EF content does not match its size")
    return node


@dataclass(slots=True)
class _Counter:
    value: bytes  # 16 bytes, 00-padded
    tries_left: int
    max_tries: int


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class IsoApplet:
    """The PKI applet's persistent and volatile state and its commands."""

    def __init__(self, *, import_allowed: bool) -> None:
        self.import_allowed = import_allowed
        self.lifecycle = Lifecycle.NEW
        self.pin: _Counter | None = None
        self.puk: _Counter | None = None
        self.keys: dict[int, PrivateKey] = {}
        self.mf = _mf()
        self.dirty = False
        self.deselect()

    # --- volatile state ------------------------------------------------------------------

    def deselect(self) -> None:
        self.pin_verified = False
        self.files_authenticated = False
        self.current: _File = self.mf
        self.se: tuple[int, int, int] | None = None  # (template, alg, key reference)
        self.chain: tuple[int, int, int] | None = None
        self.chain_data = bytearray()
        self.pending = b""  # the rest of an answer over 256 bytes

    def select(self) -> bytes:
        self.deselect()
        # Before a PIN exists, files count as authenticated (pkcs15-init needs to build them).
        self.files_authenticated = self.lifecycle != Lifecycle.OPERATIONAL
        return bytes((*APPLET_VERSION, FEATURES))

    # --- persistence ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        def counter(c: _Counter | None) -> dict[str, Any] | None:
            return None if c is None else {"value": c.value.hex(), "left": c.tries_left}

        keys = {}
        for ref, key in self.keys.items():
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            keys[str(ref)] = pem.decode()
        return {
            "lifecycle": int(self.lifecycle),
            "import_allowed": self.import_allowed,
            "pin": counter(self.pin),
            "puk": counter(self.puk),
            "keys": keys,
            "files": self.mf.snapshot(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        def counter(d: dict[str, Any] | None, max_tries: int) -> _Counter | None:
            if d is None:
                return None
            return _Counter(bytes.fromhex(d["value"]), int(d["left"]), max_tries)

        keys: dict[int, PrivateKey] = {}
        for ref, pem in state["keys"].items():
            key = serialization.load_pem_private_key(pem.encode(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise ValueError("state file: unsupported key type")
            keys[int(ref)] = key
        self.lifecycle = Lifecycle(state["lifecycle"])
        self.import_allowed = bool(state["import_allowed"])
        self.pin = counter(state["pin"], PIN_TRIES)
        self.puk = counter(state["puk"], PUK_TRIES)
        self.keys = keys
        self.mf = _restore_file(state["files"], None)
        self.deselect()

    # --- dispatch ---------------------------------------------------------------------------

    def process(self, cmd: CommandApdu) -> tuple[bytes, int]:
        """(data, SW) for one command; answers over 256 bytes are paged with 61xx."""
        try:
            if cmd.cla & 0x0C:
                raise _CardError(SW.SW_SECURE_MESSAGING_NOT_SUPPORTED)
            if self.pending:
                if cmd.ins != Ins.GET_RESPONSE or cmd.cla & 0x10:
                    raise _CardError(SW.SW_COMMAND_NOT_ALLOWED)
                return self._get_response(cmd)
            data = self._assemble(cmd)
            if data is None:
                return b"", SW.SW_OK  # a chain block
            answer = self._dispatch(cmd, data)
        except _CardError as err:
            return b"", err.sw
        if len(answer) > 256:
            self.pending = answer[256:]
            return answer[:256], 0x6100 | (min(len(self.pending), 256) & 0xFF)
        return answer, SW.SW_OK

    def _assemble(self, cmd: CommandApdu) -> bytes | None:
        header = (cmd.ins, cmd.p1, cmd.p2)
        chainable = cmd.ins in (
            Ins.PERFORM_SECURITY_OPERATION,
            Ins.GENERATE_ASYMMETRIC_KEY_PAIR,
            Ins.PUT_DATA,
        )
        if cmd.cla & 0x10:
            if not chainable:
                raise _CardError(SW.SW_COMMAND_CHAINING_NOT_SUPPORTED)
            if self.chain is not None and self.chain != header:
                self.chain, self.chain_data = None, bytearray()
                raise _CardError(SW.SW_COMMAND_NOT_ALLOWED)
            if len(self.chain_data) + len(cmd.data) > MAX_CHAIN:
                self.chain, self.chain_data = None, bytearray()
                raise _CardError(SW.SW_WRONG_LENGTH)
            self.chain = header
            self.chain_data += cmd.data
            return None
        if self.chain is not None:
            if self.chain != header:
                self.chain, self.chain_data = None, bytearray()
                raise _CardError(SW.SW_COMMAND_NOT_ALLOWED)
            data = bytes(self.chain_data) + cmd.data
            self.chain, self.chain_data = None, bytearray()
            if len(data) > MAX_CHAIN:
                raise _CardError(SW.SW_WRONG_LENGTH)
            return data
        return cmd.data

    def _dispatch(self, cmd: CommandApdu, data: bytes) -> bytes:
        handlers = {
            Ins.SELECT: self._select,
            Ins.READ_BINARY: self._read_binary,
            Ins.UPDATE_BINARY: self._update_binary,
            Ins.CREATE_FILE: self._create_file,
            Ins.DELETE_FILE: self._delete_file,
            Ins.VERIFY: self._verify,
            Ins.CHANGE_REFERENCE_DATA: self._change_reference_data,
            Ins.RESET_RETRY_COUNTER: self._reset_retry_counter,
            Ins.MANAGE_SECURITY_ENVIRONMENT: self._mse,
            Ins.GENERATE_ASYMMETRIC_KEY_PAIR: self._generate,
            Ins.PUT_DATA: self._put_data,
            Ins.PERFORM_SECURITY_OPERATION: self._pso,
            Ins.GET_CHALLENGE: self._get_challenge,
            Ins.GET_RESPONSE: self._get_response_empty,
        }
        handler = handlers.get(cmd.ins)  # type: ignore[call-overload]
        if handler is None:
            raise _CardError(SW.SW_INS_NOT_SUPPORTED)
        return handler(cmd, data)

    def _changed(self) -> None:
        self.dirty = True

    def _require_pin(self) -> None:
        if not self.pin_verified:
            raise _CardError(SW.SW_SECURITY_STATUS_NOT_SATISFIED)

    # --- GET RESPONSE (the applet's own paging) -------------------------------------------

    def _get_response(self, cmd: CommandApdu) -> tuple[bytes, int]:
        if cmd.p1 or cmd.p2:
            return b"", SW.SW_INCORRECT_P1P2
        if not self.pin_verified:
            return b"", SW.SW_SECURITY_STATUS_NOT_SATISFIED
        chunk = min(len(self.pending), 256)
        le = 256 if cmd.le is None else cmd.le
        if le != chunk:
            return b"", 0x6C00 | (chunk & 0xFF)
        out, self.pending = self.pending[:chunk], self.pending[chunk:]
        if self.pending:
            return out, 0x6100 | (min(len(self.pending), 256) & 0xFF)
        return out, SW.SW_OK

    def _get_response_empty(self, cmd: CommandApdu, data: bytes) -> bytes:
        raise _CardError(SW.SW_CONDITIONS_NOT_SATISFIED)  # nothing to fetch

    # --- files ----------------------------------------------------------------------------

    def _current_df(self) -> _File:
        return self.current if self.current.is_df else (self.current.parent or self.mf)

    def _check_acl(self, node: _File, index: int) -> None:
        if node.acl is None:
            return
        value = node.acl[index]
        if value == AclValue.ALWAYS:
            return
        if value == AclValue.AUTHENTICATED and self.files_authenticated:
            return
        raise _CardError(SW.SW_SECURITY_STATUS_NOT_SATISFIED)

    def _find(self, fid: int) -> _File:
        for node in self.mf.walk():
            if node.fid == fid:
                return node
        raise _CardError(SW.SW_FILE_NOT_FOUND)

    @staticmethod
    def _child(df: _File, fid: int, want_df: bool | None = None) -> _File:
        for child in df.children:
            if child.fid == fid and (want_df is None or child.is_df == want_df):
                return child
        raise _CardError(SW.SW_FILE_NOT_FOUND)

    def _walk_path(self, start: _File, path: bytes) -> _File:
        if len(path) % 2 or not path:
            raise _CardError(SW.SW_WRONG_LENGTH)
        node = start
        for i in range(0, len(path), 2):
            fid = int.from_bytes(path[i : i + 2], "big")
            if i == 0 and fid == APPLET_MF and start is self.mf:
                continue  # tolerate a path that names the MF itself
            if not node.is_df:
                raise _CardError(SW.SW_FILE_NOT_FOUND)
            node = self._child(node, fid)
        return node

    def _select(self, cmd: CommandApdu, data: bytes) -> bytes:
        if cmd.p2 not in (0x00, 0x04, 0x0C):
            raise _CardError(SW.SW_INCORRECT_P1P2)
        p1 = cmd.p1
        if p1 == 0x00:
            if not data or data == b"\x3f\x00":
                node = self.mf
            elif len(data) != 2:
                raise _CardError(SW.SW_WRONG_LENGTH)
            else:
                node = self._find(int.from_bytes(data, "big"))
        elif p1 in (0x01, 0x02):
            if len(data) != 2:
                raise _CardError(SW.SW_WRONG_LENGTH)
            node = self._child(self._current_df(), int.from_bytes(data, "big"), p1 == 0x01)
        elif p1 == 0x03:
            node = self._current_df().parent or self.mf
        elif p1 == 0x04:
            raise _CardError(SW.SW_FILE_NOT_FOUND)  # no DF carries a name (tag 84)
        elif p1 == 0x08:
            node = self._walk_path(self.mf, data)
        elif p1 == 0x09:
            node = self._walk_path(self._current_df(), data)
        else:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        self.current = node
        return b"" if cmd.p2 == 0x0C else node.fcp

    def _current_ef(self, p1: int, p2: int) -> tuple[_File, int]:
        """The EF and offset of READ/UPDATE BINARY (offset form or SFI form)."""
        if p1 & 0x80:
            if p1 & 0x60:
                raise _CardError(SW.SW_INCORRECT_P1P2)
            sfi = p1 & 0x1F
            node = next(
                (c for c in self._current_df().children if not c.is_df and c.fid & 0x1F == sfi),
                None,
            )
            if node is None:
                raise _CardError(SW.SW_FILE_NOT_FOUND)
            self.current = node
            return node, p2
        if self.current.is_df:
            raise _CardError(SW.SW_COMMAND_NOT_ALLOWED_NO_EF)
        return self.current, (p1 << 8) | p2

    def _read_binary(self, cmd: CommandApdu, data: bytes) -> bytes:
        node, offset = self._current_ef(cmd.p1, cmd.p2)
        self._check_acl(node, Acl.READ)
        if offset >= node.size:
            raise _CardError(SW.SW_WRONG_P1P2)
        le = 256 if cmd.le is None else cmd.le
        return bytes(node.data[offset : offset + min(le, node.size - offset)])

    def _update_binary(self, cmd: CommandApdu, data: bytes) -> bytes:
        node, offset = self._current_ef(cmd.p1, cmd.p2)
        self._check_acl(node, Acl.UPDATE)
        if not data:
            raise _CardError(SW.SW_WRONG_LENGTH)
        if offset + len(data) > node.size:
            raise _CardError(SW.SW_WRONG_P1P2)
        node.data[offset : offset + len(data)] = data
        self._changed()
        return b""

    def _create_file(self, cmd: CommandApdu, data: bytes) -> bytes:
        if cmd.p1 or cmd.p2:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        node = _parse_fcp(data)
        parent = self._current_df()
        self._check_acl(parent, Acl.CREATE_DF if node.is_df else Acl.CREATE_EF)
        if any(f.fid == node.fid for f in self.mf.walk()):
            raise _CardError(SW.SW_WRONG_DATA)  # FIDs are unique in the whole tree
        if len(parent.children) >= MAX_CHILDREN:
            raise _CardError(SW.SW_NOT_ENOUGH_MEMORY)
        node.parent = parent
        parent.children.append(node)
        self.current = node
        self._changed()
        return b""

    def _delete_file(self, cmd: CommandApdu, data: bytes) -> bytes:
        if cmd.p1 or cmd.p2:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        if len(data) != 2:
            raise _CardError(SW.SW_WRONG_LENGTH)
        fid = int.from_bytes(data, "big")
        if fid == APPLET_MF:
            raise _CardError(SW.SW_COMMAND_NOT_ALLOWED_NO_EF)
        node = self._find(fid)
        self._check_acl(node, Acl.DELETE_SELF)
        assert node.parent is not None
        if self.current in node.walk():
            self.current = node.parent
        node.parent.children.remove(node)
        self._changed()
        return b""

    # --- PIN, PUK, lifecycle ---------------------------------------------------------------

    def _fail(self, counter: _Counter) -> _CardError:
        counter.tries_left = max(0, counter.tries_left - 1)
        self._changed()
        return _CardError(sw_with_retries(counter.tries_left))

    def _verify(self, cmd: CommandApdu, data: bytes) -> bytes:
        if cmd.p1 != 0x00 or cmd.p2 != PinRef.PIN:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        if self.pin is None:
            if not data:
                return b""  # nothing to verify yet
            raise _CardError(SW.SW_CONDITIONS_NOT_SATISFIED)
        if not data:
            if self.pin_verified:
                return b""
            raise _CardError(sw_with_retries(self.pin.tries_left))
        if len(data) < PIN_MIN or len(data) > PIN_MAX:
            raise _CardError(SW.SW_WRONG_LENGTH)
        self.pin_verified = self.files_authenticated = False
        if self.pin.tries_left == 0:
            raise _CardError(sw_with_retries(0))
        if not hmac.compare_digest(data.ljust(PIN_MAX, b"\x00"), self.pin.value):
            raise self._fail(self.pin)
        if self.pin.tries_left != self.pin.max_tries:
            self.pin.tries_left = self.pin.max_tries
            self._changed()
        self.pin_verified = self.files_authenticated = True
        return b""

    @staticmethod
    def _new_pin(value: bytes) -> bytes:
        stripped = value.rstrip(b"\x00")
        if not PIN_MIN <= len(stripped) <= PIN_MAX or b"\x00" in stripped:
            raise _CardError(SW.SW_WRONG_LENGTH)
        return stripped.ljust(PIN_MAX, b"\x00")

    def _change_reference_data(self, cmd: CommandApdu, data: bytes) -> bytes:
        if self.lifecycle != Lifecycle.OPERATIONAL:
            if cmd.p1 != 0x01:
                raise _CardError(SW.SW_CONDITIONS_NOT_SATISFIED)
            if cmd.p2 == PinRef.PUK and self.lifecycle == Lifecycle.NEW:
                if len(data) != PUK_LENGTH:
                    raise _CardError(SW.SW_WRONG_LENGTH)
                self.puk = _Counter(bytes(data), PUK_TRIES, PUK_TRIES)
                self.lifecycle = Lifecycle.PUK_SET
            elif cmd.p2 == PinRef.PIN:
                if not PIN_MIN <= len(data) <= PIN_MAX:
                    raise _CardError(SW.SW_WRONG_LENGTH)
                self.pin = _Counter(self._new_pin(data), PIN_TRIES, PIN_TRIES)
                self.lifecycle = Lifecycle.OPERATIONAL
            else:
                raise _CardError(SW.SW_INCORRECT_P1P2)
            self._changed()
            return b""
        if cmd.p1 != 0x00 or cmd.p2 != PinRef.PIN:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        if len(data) != 2 * PIN_MAX:
            raise _CardError(SW.SW_WRONG_LENGTH)
        assert self.pin is not None
        self.pin_verified = False
        if self.pin.tries_left == 0:
            raise _CardError(sw_with_retries(0))
        if not hmac.compare_digest(data[:PIN_MAX], self.pin.value):
            self.files_authenticated = False
            raise self._fail(self.pin)
        self.pin = _Counter(self._new_pin(data[PIN_MAX:]), PIN_TRIES, PIN_TRIES)
        self._changed()
        return b""

    def _reset_retry_counter(self, cmd: CommandApdu, data: bytes) -> bytes:
        if self.lifecycle != Lifecycle.OPERATIONAL:
            raise _CardError(SW.SW_COMMAND_NOT_ALLOWED_NO_EF)
        if cmd.p1 != 0x00 or cmd.p2 != PinRef.PIN:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        if not PUK_LENGTH + PIN_MIN <= len(data) <= PUK_LENGTH + PIN_MAX:
            raise _CardError(SW.SW_WRONG_LENGTH)
        if self.puk is None or self.puk.tries_left == 0:
            raise _CardError(sw_with_retries(0))
        if not hmac.compare_digest(data[:PUK_LENGTH], self.puk.value):
            raise self._fail(self.puk)
        new_pin = self._new_pin(data[PUK_LENGTH:])
        self.puk.tries_left = self.puk.max_tries
        self.pin = _Counter(new_pin, PIN_TRIES, PIN_TRIES)
        self.pin_verified = False
        self._changed()
        return b""

    # --- keys -----------------------------------------------------------------------------

    def _mse(self, cmd: CommandApdu, data: bytes) -> bytes:
        if cmd.p1 != 0x41 or cmd.p2 not in tuple(SeTemplate):
            raise _CardError(SW.SW_FUNC_NOT_SUPPORTED)
        self._require_pin()
        self.se = None
        alg = ref = None
        try:
            tlvs = parse_tlvs(data)
        except ValueError:
            raise _CardError(SW.SW_WRONG_DATA) from None
        for tlv in tlvs:
            if tlv.tag == 0x80 and len(tlv.value) == 1:
                alg = tlv.value[0]
            elif tlv.tag == 0x84 and len(tlv.value) == 1:
                ref = tlv.value[0]
            elif tlv.tag == 0x81:
                continue  # the key's path, sent by OpenSC: tolerated, not used
            else:
                raise _CardError(SW.SW_WRONG_DATA)
        if alg is None or ref is None or ref not in KEY_REFERENCES:
            raise _CardError(SW.SW_WRONG_DATA)
        template = SeTemplate(cmd.p2)
        allowed = {
            SeTemplate.GENERATE: (Alg.GEN_RSA_2048, Alg.GEN_EC),
            SeTemplate.SIGN: (Alg.RSA_PKCS1, Alg.ECDSA_SHA1),
            SeTemplate.DECIPHER: (Alg.RSA_PKCS1,),
        }[template]
        if alg not in allowed:
            raise _CardError(SW.SW_FUNC_NOT_SUPPORTED)
        if template != SeTemplate.GENERATE:
            key = self.keys.get(ref)
            if key is None:
                raise _CardError(SW.SW_UNKNOWN)
            is_rsa = isinstance(key, rsa.RSAPrivateKey)
            if is_rsa != (alg == Alg.RSA_PKCS1):
                raise _CardError(SW.SW_WRONG_DATA)
        self.se = (template, alg, ref)
        return b""

    def _se(self, template: SeTemplate) -> tuple[int, int]:
        if self.se is None or self.se[0] != template:
            raise _CardError(SW.SW_CONDITIONS_NOT_SATISFIED)
        return self.se[1], self.se[2]

    @staticmethod
    def _rsa_public(key: rsa.RSAPrivateKey) -> bytes:
        numbers = key.public_key().public_numbers()
        return encode_tlv(
            TAG_PUBLIC_KEY_TEMPLATE,
            encode_tlv(0x81, numbers.n.to_bytes(256, "big"))
            + encode_tlv(0x82, numbers.e.to_bytes(3, "big")),
        )

    def _generate(self, cmd: CommandApdu, data: bytes) -> bytes:
        self._require_pin()
        alg, ref = self._se(SeTemplate.GENERATE)
        if alg == Alg.GEN_RSA_2048:
            if (cmd.p1, cmd.p2) != (0x42, 0x00):
                raise _CardError(SW.SW_INCORRECT_P1P2)
            key = rsa.generate_private_key(65537, 2048)
            self.keys[ref] = key
            self._changed()
            return self._rsa_public(key)
        if (cmd.p1, cmd.p2) != (0x00, 0x00):
            raise _CardError(SW.SW_INCORRECT_P1P2)
        try:
            fields = {t.tag: t.value for t in parse_tlvs(data)}
        except ValueError:
            raise _CardError(SW.SW_WRONG_DATA) from None
        curve = _curve_for(fields)
        ec_key = ec.generate_private_key(curve.curve)
        self.keys[ref] = ec_key
        self._changed()
        point = ec_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        params = curve.params()
        body = b"".join(encode_tlv(t, params[t]) for t in (0x81, 0x82, 0x83, 0x84, 0x85))
        template = body + encode_tlv(0x86, point) + encode_tlv(0x87, params[0x87])
        return encode_tlv(TAG_PUBLIC_KEY_TEMPLATE, template)

    def _put_data(self, cmd: CommandApdu, data: bytes) -> bytes:
        if not self.import_allowed:
            raise _CardError(SW.SW_COMMAND_NOT_ALLOWED)
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            raise _CardError(SW.SW_INCORRECT_P1P2)
        self._require_pin()
        alg, ref = self._se(SeTemplate.GENERATE)
        try:
            (outer,) = parse_tlvs(data)
            fields = {t.tag: t.value for t in outer.children()}
        except ValueError:
            raise _CardError(SW.SW_WRONG_DATA) from None
        key: PrivateKey
        if alg == Alg.GEN_RSA_2048 and outer.tag == TAG_PRIVATE_KEY_TEMPLATE:
            try:
                p, q, iqmp, dmp1, dmq1 = (
                    int.from_bytes(fields[t], "big") for t in (0x92, 0x93, 0x94, 0x95, 0x96)
                )
                e = 65537
                d = rsa.rsa_recover_private_exponent(e, p, q)
                if (p * q).bit_length() != 2048 or (dmp1, dmq1, iqmp) != (
                    d % (p - 1),
                    d % (q - 1),
                    pow(q, -1, p),
                ):
                    raise ValueError("inconsistent RSA components")
                key = rsa.RSAPrivateNumbers(
                    p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, p * q)
                ).private_key()
            except (KeyError, ValueError, ZeroDivisionError):
                raise _CardError(SW.SW_WRONG_DATA) from None
        elif alg == Alg.GEN_EC and outer.tag == 0xE0:
            curve = _curve_for(fields)
            scalar = fields.get(0x88, b"")
            try:
                key = ec.derive_private_key(int.from_bytes(scalar, "big"), curve.curve)
            except ValueError:
                raise _CardError(SW.SW_WRONG_DATA) from None
        else:
            raise _CardError(SW.SW_WRONG_DATA)
        self.keys[ref] = key
        self._changed()
        return b""

    def _pso(self, cmd: CommandApdu, data: bytes) -> bytes:
        self._require_pin()
        if (cmd.p1 << 8) | cmd.p2 == Pso.COMPUTE_DIGITAL_SIGNATURE:
            alg, ref = self._se(SeTemplate.SIGN)
            key = self.keys.get(ref)
            if alg == Alg.RSA_PKCS1 and isinstance(key, rsa.RSAPrivateKey):
                if cmd.le is not None and cmd.le < 256:
                    raise _CardError(SW.SW_CORRECT_LENGTH)
                if not data or len(data) > MAX_DIGEST_INFO:
                    raise _CardError(SW.SW_WRONG_LENGTH)
                return _rsa_private(key, _pad_type1(data, 256))
            if alg == Alg.ECDSA_SHA1 and isinstance(key, ec.EllipticCurvePrivateKey):
                return key.sign(data, ec.ECDSA(hashes.SHA1()))  # noqa: S303 (the applet's)
            raise _CardError(SW.SW_UNKNOWN)
        if (cmd.p1 << 8) | cmd.p2 == Pso.DECIPHER:
            _alg, ref = self._se(SeTemplate.DECIPHER)
            key = self.keys.get(ref)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise _CardError(SW.SW_UNKNOWN)
            if len(data) != 257:
                raise _CardError(SW.SW_WRONG_LENGTH)
            if data[0] != 0x00:
                raise _CardError(SW.SW_WRONG_DATA)
            return _unpad_type2(_rsa_private(key, data[1:]))
        raise _CardError(SW.SW_INCORRECT_P1P2)

    def _get_challenge(self, cmd: CommandApdu, data: bytes) -> bytes:
        if cmd.p1 or cmd.p2:
            raise _CardError(SW.SW_INCORRECT_P1P2)
        return secrets.token_bytes(256 if cmd.le is None else cmd.le)
