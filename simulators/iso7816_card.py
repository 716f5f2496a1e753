"""The card side of ISO 7816-4 transmission, for every virtual card (PIV, a SIM's PKI
applet): command-chaining reassembly (CLA bit 10) and paging long answers with 61xx + GET
RESPONSE, optionally with the exact-Le rule (6Cxx) that T=0 cards such as IsoApplet use.
A virtual card decodes the APDU, checks its CLA, then hands the command to `CardIo.exchange`
with its own dispatcher; it never sees chain blocks or GET RESPONSE."""

from __future__ import annotations

import json
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from tokend.iso7816 import SW, CommandApdu

__all__ = ["GET_RESPONSE", "CardIo", "CardStatus", "PersistentCard"]

log = logging.getLogger(__name__)

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


class PersistentCard(ABC):
    """What every virtual card does around its applet: power and reset clear the volatile
    state, `process` never raises (an internal error answers 6F00, like a card's OS), and
    state a command changed is saved to the card's file afterwards.

    A card calls `_init_card` first in its constructor and `_load_state` once its factory
    state is built; it provides the hooks below.
    """

    #: How log lines name the card.
    CARD_NAME: ClassVar[str] = "virtual card"

    _lock: threading.RLock
    _atr: bytes
    _state_file: Path | None

    def _init_card(self, atr: bytes, state_file: str | os.PathLike[str] | None) -> None:
        self._lock = threading.RLock()
        self._atr = bytes(atr)
        self._state_file = Path(state_file) if state_file is not None else None

    def _load_state(self) -> None:
        """Restore from the state file, or create it with the factory state."""
        if self._state_file is None:
            return
        if self._state_file.exists():
            self._restore(json.loads(self._state_file.read_text()))
        else:
            self._write(self._state_file)

    # --- VirtualCard ---------------------------------------------------------------------

    @property
    def atr(self) -> bytes:
        return self._atr

    def power_on(self) -> None:
        with self._lock:
            self._clear_volatile()

    def power_off(self) -> None:
        with self._lock:
            self._clear_volatile()

    def reset(self) -> None:
        with self._lock:
            self._clear_volatile()

    def process(self, apdu: bytes) -> bytes:
        """One command APDU in, one response APDU out; never raises (internal errors 6F00)."""
        with self._lock:
            try:
                response = self._process(bytes(apdu))
            except Exception as exc:  # the card must answer, whatever went wrong inside
                log.error("%s: internal error (%s)", self.CARD_NAME, type(exc).__name__)
                self._drop_pending()
                response = sw_bytes(SW.SW_UNKNOWN)
            if self._state_changed() and self._state_file is not None:
                try:
                    self._write(self._state_file)
                except OSError as exc:
                    log.error("%s: cannot save state: %s", self.CARD_NAME, exc)
            self._state_saved()
            return response

    # --- hooks -----------------------------------------------------------------------------

    @abstractmethod
    def _process(self, apdu: bytes) -> bytes:
        """The card's command dispatch: one command APDU, its response APDU."""

    @abstractmethod
    def _clear_volatile(self) -> None:
        """Forget what a card forgets when it loses power: selection, verified PINs."""

    @abstractmethod
    def _drop_pending(self) -> None:
        """Forget a half-sent answer after an internal error."""

    @abstractmethod
    def _state_changed(self) -> bool:
        """Whether the last command changed what the state file holds."""

    @abstractmethod
    def _state_saved(self) -> None:
        """The changes are saved (or there is no file): start tracking afresh."""

    @abstractmethod
    def _restore(self, state: dict[str, Any]) -> None:
        """Load the persistent state from the file's JSON."""

    @abstractmethod
    def _write(self, path: Path) -> None:
        """Save the persistent state to ``path`` (0600)."""
