"""The one place where APDU-level transport quirks live: command chaining, GET RESPONSE
(61xx), wrong-Le retry (6Cxx), extended length, T=0's case-4 rule and logical channels.
Applets sit on top and never see them."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tokend.errors import DeviceError
from tokend.iso7816.apdu import CommandApdu, ResponseApdu

log = logging.getLogger(__name__)

#: A byte pipe: one command APDU in, one response APDU (data + SW1 SW2) out.
Transmit = Callable[[bytes], bytes]

#: Instructions whose data is secret (VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER,
#: PUT DATA, vendor key import / set management key): never logged.
SECRET_INS = frozenset({0x20, 0x24, 0x2C, 0xDB, 0xFE, 0xFF, 0x87, 0x2A, 0x86})

MAX_GET_RESPONSE_ROUNDS = 256
GET_RESPONSE = 0xC0
CHAINING_BIT = 0x10


def channel_cla(channel: int) -> int:
    """The CLA bits of logical channel 0-19 (ISO 7816-4 §5.4.1): 0-3 in b2-b1 of the
    first interindustry form, 4-19 as 0x40 + (channel - 4) in the further form."""
    if 0 <= channel <= 3:
        return channel
    if 4 <= channel <= 19:
        return 0x40 | (channel - 4)
    raise ValueError(f"logical channel {channel} out of range 0-19")


def get_response_cla(cla: int) -> int:
    """CLA for GET RESPONSE after a command sent with ``cla``: the same logical channel,
    without the chaining and secure-messaging bits."""
    if cla & 0x40:  # further interindustry form: b4-b1 = channel - 4
        return 0x40 | (cla & 0x0F)
    return cla & 0x03


class ApduChannel:
    """Sends CommandApdus over ``transmit`` and returns complete ResponseApdus.

    ``extended``: use extended-length APDUs when a command needs them (USB tokens); else
    split long data with command chaining (T=0 cards, SIMs, NFC).
    ``t0``: the card speaks T=0: case-4 commands go without Le and their answer comes
    through 61xx + GET RESPONSE (ISO 7816-3 §12.2.4); never extended.
    ``channel``: the logical channel (0-19) put into every CLA, GET RESPONSE included.
    """

    def __init__(
        self,
        transmit: Transmit,
        *,
        extended: bool = True,
        cla_bits: int = 0,
        t0: bool = False,
        channel: int = 0,
    ) -> None:
        self._transmit = transmit
        self.t0 = t0
        self.extended = extended and not t0
        self.cla_bits = cla_bits | channel_cla(channel)

    def _raw(self, apdu: bytes, ins: int) -> ResponseApdu:
        if log.isEnabledFor(logging.DEBUG):
            shown = apdu[:5].hex() + (
                "…" if ins in SECRET_INS and len(apdu) > 5 else apdu[5:].hex()
            )
            log.debug("> %s", shown)
        try:
            rapdu = ResponseApdu.decode(self._transmit(apdu))
        except ValueError as exc:  # a response without a status word is a broken device
            raise DeviceError(f"malformed response to INS {ins:02X}: {exc}") from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("< %d bytes, SW %04X", len(rapdu.data), rapdu.sw)
        return rapdu

    def send(self, apdu: CommandApdu) -> ResponseApdu:
        """Send one logical command; the result's SW is final (never 61xx)."""
        cla = apdu.cla | self.cla_bits
        if apdu.needs_extended and self.extended:
            first = self._send_one(
                CommandApdu(cla, apdu.ins, apdu.p1, apdu.p2, apdu.data, apdu.le), extended=True
            )
        else:
            data = apdu.data
            chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
            le = None if apdu.le is None else min(apdu.le, 256)
            if self.t0 and chunks[-1]:
                le = None  # T=0 case 4: the card answers 61xx, GET RESPONSE fetches the data
            for chunk in chunks[:-1]:
                part = CommandApdu(cla | CHAINING_BIT, apdu.ins, apdu.p1, apdu.p2, chunk)
                rapdu = self._raw(part.encode(extended=False), apdu.ins)
                if not rapdu.ok:
                    return rapdu
            last = CommandApdu(cla, apdu.ins, apdu.p1, apdu.p2, chunks[-1], le)
            first = self._send_one(last, extended=False)
        return first

    def _send_one(self, apdu: CommandApdu, *, extended: bool) -> ResponseApdu:
        rapdu = self._raw(apdu.encode(extended=extended), apdu.ins)
        if rapdu.sw1 == 0x6C:  # wrong Le: resend the same command with the right one
            retry = CommandApdu(apdu.cla, apdu.ins, apdu.p1, apdu.p2, apdu.data, rapdu.sw2 or 256)
            rapdu = self._raw(retry.encode(extended=extended and retry.needs_extended), apdu.ins)
        data = bytearray(rapdu.data)
        rounds = 0
        cla = get_response_cla(apdu.cla)
        while rapdu.sw1 == 0x61:
            rounds += 1
            if rounds > MAX_GET_RESPONSE_ROUNDS:
                raise DeviceError("card keeps answering 61xx")
            get_response = CommandApdu(cla, GET_RESPONSE, 0, 0, le=rapdu.sw2 or 256)
            rapdu = self._raw(get_response.encode(extended=False), GET_RESPONSE)
            if rapdu.sw1 == 0x6C:
                get_response = CommandApdu(cla, GET_RESPONSE, 0, 0, le=rapdu.sw2 or 256)
                rapdu = self._raw(get_response.encode(extended=False), GET_RESPONSE)
            data += rapdu.data
        return ResponseApdu(bytes(data), rapdu.sw)
