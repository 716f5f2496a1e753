"""The selected-applet base every applet driver stands on: SELECT by AID, re-SELECT after a
card reset, the exclusive section (a PC/SC transaction), the identity check after a
re-select, and close. A new applet (PIV, a SIM's PKI applet) writes only its commands.

Rank 1 (a driver): it does I/O only through the `Transport` it is given, via the one
`tokend.iso7816.ApduChannel` (chaining, 61xx, 6Cxx, T=0, logical channels live there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import ClassVar, Self

from tokend.drivers.base import CardProtocol, Transport
from tokend.errors import CardResetError, DeviceRemovedError, TransportError
from tokend.iso7816 import ApduChannel, CommandApdu, ResponseApdu

__all__ = ["SELECT", "SelectedApplet"]

#: SELECT (ISO 7816-4 §11.2.2); P1 04 = by DF name (AID).
SELECT = 0xA4


class SelectedApplet:
    """One applet on one card instance (one insertion).

    Subclasses set `AID` and `APPLET_NAME`, implement `_read_card` (everything public,
    read once at open) and, when the card has a stable identity, `_identity_marker` and
    `_read_identity_marker` (PIV: the CHUID GUID). They send commands with `_send` inside
    `with self._session():`.
    """

    AID: ClassVar[bytes] = b""
    APPLET_NAME: ClassVar[str] = "applet"
    #: logical channel the applet is selected on (0-19; OMAPI/AT+CGLA hosts use 1-19)
    CHANNEL: ClassVar[int] = 0

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        protocol = getattr(transport, "protocol", CardProtocol.T1)
        self._channel = ApduChannel(
            self._transmit,
            extended=transport.extended,
            t0=protocol is CardProtocol.T0,
            channel=self.CHANNEL,
        )
        self._selected = False
        self._closed = False

    # -- opening --

    @classmethod
    def open(cls, transport: Transport) -> Self | None:
        """SELECT the applet and read everything public; None if the card has no such
        applet (the registry then asks the next applet in `tokend.wiring.APPLETS`)."""
        token = cls(transport)
        with transport.transaction():
            if not token._select():
                return None
            token._read_card()
        return token

    def _read_card(self) -> None:
        raise NotImplementedError

    # -- the subclass's identity (a re-selected card must be the same card) --

    def _identity_marker(self) -> bytes | None:
        """What identified the card at open; None: nothing to compare."""
        return None

    def _read_identity_marker(self) -> bytes | None:
        """Read the marker from the card now (inside the section, applet selected)."""
        return None

    # -- I/O plumbing --

    def _transmit(self, apdu: bytes) -> bytes:
        try:
            return self._transport.transmit(apdu)
        except (CardResetError, TransportError):
            self._selected = False  # the card lost its selected application
            raise

    def _send(self, apdu: CommandApdu) -> ResponseApdu:
        return self._channel.send(apdu)

    def _select_command(self) -> CommandApdu:
        return CommandApdu(0, SELECT, 0x04, 0x00, self.AID, le=0)

    def _select(self) -> bool:
        rapdu = self._send(self._select_command())
        self._selected = rapdu.ok
        return rapdu.ok

    @contextmanager
    def _session(self) -> Iterator[None]:
        """Exclusive section with the applet selected (re-selected after a card reset)."""
        if self._closed:
            raise DeviceRemovedError("token closed")
        with ExitStack() as stack:
            try:
                stack.enter_context(self._transport.transaction())
            except CardResetError:
                self._selected = False  # PC/SC may report the reset when the section starts
                raise
            if not self._selected:
                if not self._select():
                    raise TransportError(f"{self.APPLET_NAME} applet no longer answers SELECT")
                expected = self._identity_marker()
                if expected is not None and self._read_identity_marker() != expected:
                    # another card behind the same connection: counts as a disconnect
                    raise TransportError("card identity changed")
            yield

    def exclusive(self) -> AbstractContextManager[None]:
        return self._transport.transaction()

    def close(self) -> None:
        """Close the token and its transport (the token owns the transport once opened)."""
        if not self._closed:
            self._closed = True
            self._transport.close()
