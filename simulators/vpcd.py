"""A project-owned client for vsmartcard's vpcd reader driver: it puts any `VirtualCard`
into a pcscd reader. vpcd listens (one TCP port per reader slot); connecting inserts the
card, closing the socket removes it.

Wire format (both directions): 2-byte big-endian length, then the payload. A 1-byte payload
from vpcd is a control code (00 power off, 01 power on, 02 reset, 04 get ATR — only the ATR is
answered); any other payload is a command APDU, answered with the response APDU.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from enum import IntEnum
from types import TracebackType

from tokend.simulators.base import VirtualCard

log = logging.getLogger(__name__)

#: vpcd's default base port (Debian's /etc/reader.conf.d/vpcd: DEVICENAME /dev/null:0x8C7B).
VPCD_BASE_PORT = 0x8C7B
#: FRIENDLYNAME of the default vpcd entry; pcscd appends " 00 00" / " 00 01" per slot.
VPCD_FRIENDLY_NAME = "Virtual PCD"
#: Readers per vpcd entry (vpcd's compile-time VPCDSLOTS); slot n uses base port + n.
VPCD_SLOTS = 2


class VpcdControl(IntEnum):
    """The 1-byte control payloads vpcd sends (vsmartcard's vpcd.h names)."""

    VPCD_CTRL_OFF = 0x00
    VPCD_CTRL_ON = 0x01
    VPCD_CTRL_RESET = 0x02
    VPCD_CTRL_ATR = 0x04


def vpcd_port(reader: int, base_port: int = VPCD_BASE_PORT) -> int:
    """TCP port of vpcd reader slot ``reader`` (0 → 35963, 1 → 35964)."""
    return base_port + reader


def vpcd_reader_name(reader: int, friendly_name: str = VPCD_FRIENDLY_NAME) -> str:
    """pcscd's name for vpcd slot ``reader`` of the entry with ``friendly_name``."""
    return f"{friendly_name} 00 {reader:02X}"


def _recv_exact(sock: socket.socket, length: int) -> bytes | None:
    """Exactly ``length`` bytes, or None at EOF (short reads do happen on TCP)."""
    buf = bytearray()
    while len(buf) < length:
        chunk = sock.recv(length - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class VpcdCardConnection:
    """Serves ``card`` to pcscd's vpcd driver from a background thread.

    ``plug()`` connects (the card is inserted once pcscd's next presence poll accepts, about
    0.3 s); ``unplug()`` closes the socket (the card is removed). Usable as a context manager
    (plug on enter, unplug on exit). Exceptions raised by the card answer ``6F 00``.
    """

    def __init__(
        self,
        card: VirtualCard,
        port: int = VPCD_BASE_PORT,
        host: str = "127.0.0.1",
        *,
        reader: int | None = None,
    ) -> None:
        self.card = card
        self.host = host
        self.port = vpcd_port(reader) if reader is not None else port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        #: APDUs answered since plug (tests use it to see that a command reached the card).
        self.apdu_count = 0

    @property
    def is_plugged(self) -> bool:
        thread = self._thread
        return self._sock is not None and thread is not None and thread.is_alive()

    def plug(self) -> None:
        with self._lock:
            if self.is_plugged:
                return
            self._close_socket()
            sock = socket.create_connection((self.host, self.port), timeout=5.0)
            sock.settimeout(None)
            # One frame = one write; without NODELAY, Nagle delays the second small write.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._thread = threading.Thread(
                target=self._serve, args=(sock,), name=f"vpcd-card:{self.port}", daemon=True
            )
            self._thread.start()

    def unplug(self) -> None:
        with self._lock:
            self._close_socket()
            thread, self._thread = self._thread, None
            # A card pulled from a reader loses power, and with it its security state (PIN
            # verified, selected applet). vpcd sends no power-off for a closed socket, so do
            # it here (found by the fault matrix: a replugged card was still PIN-verified).
            self.card.power_off()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            # shutdown wakes the serving thread's recv; close alone may not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> VpcdCardConnection:
        self.plug()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unplug()

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                header = _recv_exact(sock, 2)
                if header is None:
                    return
                (length,) = struct.unpack(">H", header)
                payload = _recv_exact(sock, length)
                if payload is None:
                    return
                reply = self._handle(payload)
                if reply is not None:
                    sock.sendall(struct.pack(">H", len(reply)) + reply)
        except OSError:
            return  # unplugged, or vpcd closed the slot: either way the card is out
        finally:
            log.debug("vpcd card on port %d disconnected", self.port)

    def _handle(self, payload: bytes) -> bytes | None:
        if len(payload) == 1:
            code = payload[0]
            if code == VpcdControl.VPCD_CTRL_ATR:
                return bytes(self.card.atr)
            if code == VpcdControl.VPCD_CTRL_ON:
                self.card.power_on()
            elif code == VpcdControl.VPCD_CTRL_OFF:
                self.card.power_off()
            elif code == VpcdControl.VPCD_CTRL_RESET:
                self.card.reset()
            else:
                log.warning("unknown vpcd control byte %02X", code)
            return None
        self.apdu_count += 1
        try:
            rapdu = self.card.process(payload)
        except Exception:
            # Never log the APDU itself: it may carry a PIN.
            log.exception("virtual card raised while processing an APDU")
            return b"\x6f\x00"
        if len(rapdu) > 0xFFFF:
            return b"\x6f\x00"
        return bytes(rapdu)
