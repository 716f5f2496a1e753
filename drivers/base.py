"""The transport seams. A transport is a dumb byte pipe with presence; a watcher reports
readers and cards arriving and leaving. Simulators implement the same protocols."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable


class CardProtocol(Enum):
    """The transmission protocol negotiated with the card (ISO 7816-3), as the transport
    reports it. T=0 cards take no extended-length APDUs and want case-4 commands without
    Le (the answer comes through 61xx + GET RESPONSE)."""

    T0 = "T=0"
    T1 = "T=1"
    #: contactless / USB / BLE framings that carry whole APDUs (no T=0 restrictions)
    DIRECT = "direct"


class ReaderEventKind(Enum):
    ARRIVED = "arrived"  # a card (token) is now present in the reader
    LEFT = "left"  # the card is gone, or the reader itself went away


@dataclass(frozen=True, slots=True)
class ReaderEvent:
    kind: ReaderEventKind
    reader: str  # transport-unique reader name: stable slot identity
    atr: bytes = b""


@runtime_checkable
class Transport(Protocol):
    """A connection to the card in one reader. Blocking; called off the event loop.

    ``transmit`` raises `tokend.errors.TransportError` when the card is gone or the link
    failed, and `tokend.errors.CardResetError` when another program reset the card (the
    transport recovers the connection first, so the next transmit works). It never parses
    status words.
    """

    reader: str
    #: True when extended-length APDUs can pass (USB/PC-SC v2); False → command chaining.
    #: Always False on T=0.
    extended: bool
    #: The protocol negotiated with the card (re-read after a reconnect).
    protocol: CardProtocol

    def atr(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes: ...

    def transaction(self) -> AbstractContextManager[None]:
        """Exclusive section: no other program's APDU comes between ours. Re-entrant."""
        ...

    def close(self) -> None: ...


class TokenRefused(Exception):
    """A transport's verdict that the token opened on it must not be used (e.g. a BLE key
    whose token identity differs from the one trusted at that address). Not retried."""


@runtime_checkable
class IdentityCheck(Protocol):
    """Optional on a transport: called with the token's identity serial once the applet is
    open; raises `TokenRefused` to keep the token out."""

    def accept_identity(self, serial: str) -> None: ...


@runtime_checkable
class Watcher(Protocol):
    """Reports presence for one transport family and opens transports to present cards.

    Optional attributes the registry looks for (a vendor PKCS#11 module's watcher has them):
    ``open_token(transport) -> Token | None``, its own applet opener, used instead of the
    registry's applet list; ``probe_timeout`` (seconds) bounding that opener;
    ``reports_returns = True`` when the watcher itself reports a token again (ARRIVED)
    after the registry retired its instance on a failure, so the registry does not re-probe.
    """

    name: str

    def events(self) -> AsyncIterator[ReaderEvent]:
        """Current state first (ARRIVED for every present card), then changes, until closed."""
        ...

    async def connect(self, reader: str) -> Transport: ...

    async def aclose(self) -> None: ...
