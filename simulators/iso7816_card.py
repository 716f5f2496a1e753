"""The card side of ISO 7816-4 transmission, for every virtual card (PIV, a SIM's PKI
applet): command-chaining reassembly (CLA bit 10) and paging long answers with 61xx + GET
RESPONSE, optionally with the exact-Le rule (6Cxx) that T=0 cards such as IsoApplet use.
A virtual card decodes the APDU, checks its CLA, then hands the command to `CardIo.exchange`
with its own dispatcher; it never sees chain blocks or GET RESPONSE."""

from __future__ import annotations

from collections.abc import Callable

from tokend.iso7816 import SW, CommandApdu

__all__ = ["GET_RESPONSE", "CardIo", "CardStatus"]

#: GET RESPONSE (ISO 7816-4 §7.6.1).
GET_RESPONSE = 0xC0
#: CLA bit of every block of a chain but the last (ISO 7816-4 §5.1.1).
CHAINING_BIT = 0x10


class CardStatus(Exception):
    """Ends a command with a status word (internal control flow, never leaves the card)."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


def sw_bytes(sw: int) -> bytes:
    return int(sw).to_bytes(2, "big")


class CardIo:
    """Chaining and response paging for one card (volatile: `clear` on reset/power).

    ``max_chain``: largest command assembled from a chain (larger → 6A84).
    ``unchainable``: instructions that may not be chained (→ 6884).
    ``exact_le``: GET RESPONSE must ask for exactly min(remaining, 256) bytes, else 6Cxx.
    ``busy_sw``: what another command gets while an answer is pending; None discards it.
    """

    def __init__(
        self,
        *,
        max_chain: int = 16384,
        unchainable: frozenset[int] = frozenset({0xA4, GET_RESPONSE}),
        exact_le: bool = False,
        busy_sw: int | None = None,
    ) -> None:
        self.max_chain = max_chain
        self.unchainable = unchainable
        self.exact_le = exact_le
        self.busy_sw = busy_sw
        self.clear()

    def clear(self) -> None:
        self._chain_header: tuple[int, int, int] | None = None
        self._chain_data = bytearray()
        self._pending = b""

    def abort_chain(self) -> None:
        self._chain_header, self._chain_data = None, bytearray()

    def drop_pending(self) -> None:
        self._pending = b""

    def exchange(
        self,
        cmd: CommandApdu,
        dispatch: Callable[[int, int, int, bytes], bytes],
        *,
        extended: bool = False,
    ) -> bytes:
        """One command in (already decoded), one response APDU out. ``dispatch(ins, p1, p2,
        data)`` sees whole commands and returns the answer data or raises CardStatus."""
        if cmd.ins == GET_RESPONSE and not cmd.cla & CHAINING_BIT:
            return self._get_response(cmd)
        if self._pending and self.busy_sw is not None:
            return sw_bytes(self.busy_sw)
        self._pending = b""  # any other command discards what GET RESPONSE had
        header = (cmd.ins, cmd.p1, cmd.p2)
        if cmd.cla & CHAINING_BIT:
            if cmd.ins in self.unchainable:
                return sw_bytes(SW.SW_COMMAND_CHAINING_NOT_SUPPORTED)
            if self._chain_header != header:  # a different header aborts the old chain
                self._chain_header, self._chain_data = header, bytearray()
            self._chain_data += cmd.data
            if len(self._chain_data) > self.max_chain:
                self.abort_chain()
                return sw_bytes(SW.SW_NOT_ENOUGH_MEMORY)
            return sw_bytes(SW.SW_OK)
        data = cmd.data
        if self._chain_header is not None:
            if self._chain_header == header:
                data = bytes(self._chain_data) + data
            self.abort_chain()
        try:
            result = dispatch(cmd.ins, cmd.p1, cmd.p2, data)
        except CardStatus as err:
            return sw_bytes(err.sw)
        return self.respond(result, extended=extended)

    def respond(self, data: bytes, *, extended: bool = False) -> bytes:
        """Up to 256 bytes now (Le is not used for sizing), the rest behind 61xx."""
        if extended or len(data) <= 256:
            return data + sw_bytes(SW.SW_OK)
        self._pending = data[256:]
        return data[:256] + bytes((0x61, min(len(self._pending), 256) & 0xFF))

    def _get_response(self, cmd: CommandApdu) -> bytes:
        if cmd.p1 or cmd.p2:
            return sw_bytes(SW.SW_INCORRECT_P1P2)
        if not self._pending:
            return sw_bytes(SW.SW_CONDITIONS_NOT_SATISFIED)
        wanted = min(len(self._pending), 256)
        if self.exact_le and (cmd.le or 256) != wanted:
            return bytes((0x6C, wanted & 0xFF))
        size = min(cmd.le or 256, 256)
        chunk, self._pending = self._pending[:size], self._pending[size:]
        rest = len(self._pending)
        if rest:
            return chunk + bytes((0x61, min(rest, 256) & 0xFF))
        return chunk + sw_bytes(SW.SW_OK)
