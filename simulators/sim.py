"""A virtual SIM: a UICC with a T=0-only ATR and its ICCID, carrying a PKI applet that
behaves like the legacy IsoApplet (API 00.06), the one Debian 12's OpenSC 0.23 drives.

Two layers, as on a real Java Card SIM:

- **The UICC** (`VirtualSim`): the ATR (T=0 only), its own file system (MF 3F00, EF ICCID
  2FE2), SELECT by AID on the basic channel (the PKI applet; `6A82` for every other AID,
  so other drivers' probes fail) and the T=0 rules of ISO 7816-3: a case-4 answer is
  announced with ``61xx`` and fetched with GET RESPONSE of exactly that length, a wrong Le
  gets ``6Cxx``. Logical channels 1-3 (MANAGE CHANNEL) reach the UICC's files only.
- **The applet** (`tokend.simulators.isoapplet.IsoApplet`): the legacy IsoApplet's file
  system, ACLs, PIN/PUK, lifecycle, keys, MSE/PSO, chaining and paging.
- **A USIM** stand-in: SELECT of the USIM AID deselects the PKI applet and answers VERIFY
  / CHANGE / UNBLOCK of PIN1 (reference 01, like the applet's PIN), counting tries — so
  tests can prove tokend never reaches the SIM's own PIN.

Volatile state is dropped on power off/on and reset. ``state_file`` persists the rest as
JSON (mode 0600) — PIN, PUK and private keys **unprotected**: for tests and demos only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

from tokend.drivers.base import CardProtocol
from tokend.iso7816 import SW, CommandApdu, encode_tlv
from tokend.iso7816.status import sw_with_retries
from tokend.sim.codes import (
    EF_ICCID,
    ISOAPPLET_AID,
    UICC_MF,
    Ins,
    encode_iccid,
    luhn_digit,
)
from tokend.simulators.iso7816_card import PersistentCard
from tokend.simulators.isoapplet import CURVES, IsoApplet

__all__ = ["CURVES", "DEFAULT_ATR", "USIM_AID_PREFIX", "VirtualSim", "random_iccid"]

log = logging.getLogger(__name__)

#: T=0 only: TA1 96, TD1 00 (T=0, nothing follows, so no TCK); historical bytes
#: ``80 "tokendSIM"``. pcscd negotiates T=0, as with a real SIM in a reader.
DEFAULT_ATR = bytes.fromhex("3B9A960080746F6B656E6453494D")
#: The USIM application (ETSI TS 101 220 RID A0000000 87, app code 1002) and its PIN1,
#: the SIM's own PIN: tokend must never send it anything.
USIM_AID_PREFIX = bytes.fromhex("A0000000871002")
USIM_PIN1 = b"0000" + b"\xff" * 4
#: MANAGE CHANNEL (ISO 7816-4 §11.1.2).
MANAGE_CHANNEL = 0x70

_STATE_FORMAT = "tokend-virtual-sim"
_STATE_VERSION = 1


# --- the UICC --------------------------------------------------------------------------


def random_iccid() -> str:
    """19 digits: 89 (telecom), 49 (a country code), 14 random digits, the Luhn digit."""
    body = "8949" + "".join(str(secrets.randbelow(10)) for _ in range(14))
    return body + luhn_digit(body)


def _uicc_fcp(fid: int, *, df: bool, size: int = 0) -> bytes:
    """A TS 102 221 FCP: descriptor, FID, lifecycle (operational, activated), size."""
    if df:
        body = encode_tlv(0x82, b"\x78\x21") + encode_tlv(0x83, fid.to_bytes(2, "big"))
    else:
        body = (
            encode_tlv(0x82, b"\x41\x21")
            + encode_tlv(0x83, fid.to_bytes(2, "big"))
            + encode_tlv(0x80, size.to_bytes(2, "big"))
        )
    return encode_tlv(0x62, body + encode_tlv(0x8A, b"\x05"))


class VirtualSim(PersistentCard):
    """A UICC with the PKI applet behind `VirtualCard`. All methods may be called from any
    thread. ``iccid``: the card's ICCID digits (random unless given). ``import_allowed``:
    the applet build accepts PUT DATA key import (the real default build does not).
    ``state_file``: load from it if it exists, save to it (0600) after each change."""

    CARD_NAME = "virtual SIM"

    def __init__(
        self,
        *,
        iccid: str | None = None,
        state_file: str | os.PathLike[str] | None = None,
        import_allowed: bool = True,
        atr: bytes = DEFAULT_ATR,
    ) -> None:
        self._init_card(atr, state_file)
        self._iccid = iccid if iccid is not None else random_iccid()
        encode_iccid(self._iccid)  # validate
        self.applet = IsoApplet(import_allowed=import_allowed)
        #: tries left on the USIM's PIN1 (volatile in this simulator)
        self.usim_pin1_tries = 3
        self._clear_volatile()
        self._load_state()

    @property
    def protocol(self) -> CardProtocol:
        """T=0, as the ATR says: the in-process reader then behaves like pcscd's."""
        return CardProtocol.T0

    # --- PersistentCard hooks --------------------------------------------------------------

    def _drop_pending(self) -> None:
        self._os_pending = None

    def _state_changed(self) -> bool:
        return self.applet.dirty

    def _state_saved(self) -> None:
        self.applet.dirty = False

    # --- identity, persistence -------------------------------------------------------------

    @property
    def iccid(self) -> str:
        return self._iccid

    def set_iccid(self, iccid: str) -> None:
        """Factory setting (not reachable over APDUs): another SIM, same applet content."""
        encode_iccid(iccid)
        with self._lock:
            self._iccid = iccid
            self._autosave()

    @property
    def pin_tries_left(self) -> int | None:
        with self._lock:
            return None if self.applet.pin is None else self.applet.pin.tries_left

    def save(self, path: str | os.PathLike[str]) -> None:
        with self._lock:
            self._write(Path(path))

    def _autosave(self) -> None:
        if self._state_file is not None:
            self._write(self._state_file)

    def _write(self, path: Path) -> None:
        state = {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "warning": "unprotected simulator state: PIN, PUK and private keys in clear",
            "iccid": self._iccid,
            "applet": self.applet.snapshot(),
        }
        text = json.dumps(state, indent=1, sort_keys=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sim-", dir=path.parent)  # created 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError("not a virtual SIM state file")
        encode_iccid(state["iccid"])
        with self._lock:
            self._iccid = str(state["iccid"])
            self.applet.restore(state["applet"])
            self._clear_volatile()

    # --- the UICC's own commands and the T=0 rules -----------------------------------------

    def _clear_volatile(self) -> None:
        self._applet_selected = False
        self._usim_selected = False
        #: the UICC's current file per open channel (0 = the basic channel, always open)
        self._uicc_current: dict[int, int] = {0: UICC_MF}
        self._os_pending: tuple[bytes, int] | None = None  # T=0: a case-4 answer held back
        self.applet.deselect()

    def _process(self, raw: bytes) -> bytes:
        try:
            cmd = CommandApdu.decode(raw)
        except ValueError:
            return SW.SW_WRONG_LENGTH.to_bytes(2, "big")
        if len(raw) > 4 + 1 + 255 + 1:  # T=0 has no extended length
            return SW.SW_WRONG_LENGTH.to_bytes(2, "big")
        if cmd.cla & 0x80 or cmd.cla == 0xFF:
            return SW.SW_CLA_NOT_SUPPORTED.to_bytes(2, "big")
        channel = cmd.cla & 0x03
        if cmd.cla & 0x40 or (channel and channel not in self._uicc_current):
            return SW.SW_LOGICAL_CHANNEL_NOT_SUPPORTED.to_bytes(2, "big")
        if cmd.cla & 0x0C:
            return SW.SW_SECURE_MESSAGING_NOT_SUPPORTED.to_bytes(2, "big")
        # GET RESPONSE for an answer the T=0 layer held back (ISO 7816-3 case 4).
        if cmd.ins == Ins.GET_RESPONSE and self._os_pending is not None and not cmd.cla & 0x10:
            data, sw = self._os_pending
            le = 256 if cmd.le is None else cmd.le
            if le != len(data):
                return (0x6C00 | (len(data) & 0xFF)).to_bytes(2, "big")
            self._os_pending = None
            return data + sw.to_bytes(2, "big")
        self._os_pending = None
        if cmd.ins == MANAGE_CHANNEL and not cmd.cla & 0x10:
            data, sw = self._manage_channel(cmd)
        elif channel:
            # Logical channels reach the UICC's own files (the ICCID); the PKI applet is
            # not multi-selectable and lives on the basic channel, as OpenSC uses it.
            if cmd.ins == Ins.SELECT and cmd.p1 == 0x04:
                data, sw = b"", SW.SW_FILE_NOT_FOUND
            else:
                data, sw = self._uicc_command(cmd, channel)
        elif cmd.ins == Ins.SELECT and cmd.p1 == 0x04 and not cmd.cla & 0x10:
            data, sw = self._select_aid(cmd)
        elif self._applet_selected:
            data, sw = self.applet.process(cmd)
        elif self._usim_selected:
            data, sw = self._usim_command(cmd)
        else:
            data, sw = self._uicc_command(cmd, 0)
        return self._t0(cmd, data, sw)

    def _manage_channel(self, cmd: CommandApdu) -> tuple[bytes, int]:
        """MANAGE CHANNEL on the basic channel: open (P1 00, the card picks 1-3) or close
        (P1 80, P2 = the channel)."""
        if cmd.cla & 0x03:
            return b"", SW.SW_FUNC_NOT_SUPPORTED
        if cmd.p1 == 0x00 and cmd.p2 == 0x00:
            free = [n for n in (1, 2, 3) if n not in self._uicc_current]
            if not free:
                return b"", SW.SW_FUNC_NOT_SUPPORTED
            self._uicc_current[free[0]] = UICC_MF
            return bytes((free[0],)), SW.SW_OK
        if cmd.p1 == 0x80 and cmd.p2 in (1, 2, 3) and cmd.p2 in self._uicc_current:
            del self._uicc_current[cmd.p2]
            return b"", SW.SW_OK
        return b"", SW.SW_INCORRECT_P1P2

    def _t0(self, cmd: CommandApdu, data: bytes, sw: int) -> bytes:
        """How the answer crosses a T=0 link."""
        if not data:
            return sw.to_bytes(2, "big")
        if cmd.data or cmd.le is None:
            # Case 3/4 (or case 1): the card cannot send data with the command's own TPDU;
            # it announces it and the host fetches it with GET RESPONSE.
            self._os_pending = (data, sw)
            return (0x6100 | (len(data) & 0xFF)).to_bytes(2, "big")
        if len(data) < cmd.le and sw == SW.SW_OK:
            return (0x6C00 | (len(data) & 0xFF)).to_bytes(2, "big")  # wrong Le: resend
        return data + sw.to_bytes(2, "big")

    def _select_aid(self, cmd: CommandApdu) -> tuple[bytes, int]:
        aid = cmd.data
        if cmd.p2 not in (0x00, 0x04, 0x0C):
            return b"", SW.SW_INCORRECT_P1P2
        if 5 <= len(aid) <= len(ISOAPPLET_AID) and ISOAPPLET_AID.startswith(aid):
            self._applet_selected, self._usim_selected = True, False
            answer = self.applet.select()
            return (b"" if cmd.p2 == 0x0C else answer), SW.SW_OK
        if len(aid) >= len(USIM_AID_PREFIX) and aid.startswith(USIM_AID_PREFIX):
            # Another program (a phone stack, a modem tool) selects the USIM: the PKI
            # applet is deselected and loses its verified PIN.
            self.applet.deselect()
            self._applet_selected, self._usim_selected = False, True
            return b"", SW.SW_OK
        # Not ours: the selected applet (if any) stays selected and keeps its state.
        return b"", SW.SW_FILE_NOT_FOUND

    def _usim_command(self, cmd: CommandApdu) -> tuple[bytes, int]:
        """The USIM's PIN1 (reference 01, like the PKI applet's PIN): VERIFY, CHANGE and
        UNBLOCK count its tries. It is here so tests can prove tokend never reaches it."""
        if cmd.ins not in (Ins.VERIFY, Ins.CHANGE_REFERENCE_DATA, Ins.RESET_RETRY_COUNTER):
            return b"", SW.SW_INS_NOT_SUPPORTED
        if cmd.p2 != 0x01:
            return b"", SW.SW_REFERENCE_NOT_FOUND
        if not cmd.data:
            return b"", sw_with_retries(self.usim_pin1_tries)
        if self.usim_pin1_tries == 0:
            return b"", SW.SW_AUTH_METHOD_BLOCKED
        if cmd.ins == Ins.VERIFY and cmd.data == USIM_PIN1:
            self.usim_pin1_tries = 3
            return b"", SW.SW_OK
        self.usim_pin1_tries -= 1
        return b"", sw_with_retries(self.usim_pin1_tries)

    def _uicc_command(self, cmd: CommandApdu, channel: int) -> tuple[bytes, int]:
        """What the UICC itself answers while no applet is selected: its MF and EF ICCID."""
        if cmd.cla & 0x10:
            return b"", SW.SW_COMMAND_CHAINING_NOT_SUPPORTED
        if cmd.ins == Ins.SELECT:
            if cmd.p2 not in (0x04, 0x0C) and cmd.p2 != 0x00:
                return b"", SW.SW_INCORRECT_P1P2
            data = cmd.data
            if cmd.p1 == 0x08 and data[:2] == b"\x3f\x00":
                data = data[2:]
            if cmd.p1 not in (0x00, 0x08):
                return b"", SW.SW_FILE_NOT_FOUND
            if data in (b"", b"\x3f\x00") and cmd.p1 == 0x00:
                fid = UICC_MF
            elif data == EF_ICCID.to_bytes(2, "big"):
                fid = EF_ICCID
            else:
                return b"", SW.SW_FILE_NOT_FOUND
            self._uicc_current[channel] = fid
            if cmd.p2 == 0x0C:
                return b"", SW.SW_OK
            if fid == UICC_MF:
                return _uicc_fcp(UICC_MF, df=True), SW.SW_OK
            return _uicc_fcp(EF_ICCID, df=False, size=10), SW.SW_OK
        if cmd.ins == Ins.READ_BINARY:
            if self._uicc_current[channel] != EF_ICCID:
                return b"", SW.SW_COMMAND_NOT_ALLOWED_NO_EF
            offset = ((cmd.p1 & 0x7F) << 8) | cmd.p2
            content = encode_iccid(self._iccid)
            if cmd.p1 & 0x80 or offset >= len(content):
                return b"", SW.SW_WRONG_P1P2
            le = 256 if cmd.le is None else cmd.le
            return content[offset : offset + le], SW.SW_OK
        return b"", SW.SW_INS_NOT_SUPPORTED
