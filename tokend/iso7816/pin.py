"""PIN formats (ISO 7816-4 VERIFY data). One description —
length, padding, encoding — that PIV PINs (SP 800-73-4 §2.4.3: 6-8 ASCII digits, FF-padded
to 8) and PKCS#15 PINs (`PinAttributes`: minLength, maxLength, storedLength, padChar,
pinType) both map onto, so a new applet states its format instead of writing a padder.
The caller wipes PIN blocks with `tokend.wipe.wipe`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tokend.errors import PinInvalidError, PinLenRangeError

__all__ = ["PinEncoding", "PinFormat"]


class PinEncoding(Enum):
    """PKCS#15 PinType values tokend supports."""

    ASCII_NUMERIC = "ascii-numeric"  # digits only
    UTF8 = "utf8"  # any bytes the user types


@dataclass(frozen=True, slots=True)
class PinFormat:
    """How a PIN travels in VERIFY. ``stored_length`` None: sent unpadded."""

    min_length: int
    max_length: int
    stored_length: int | None
    pad_char: int = 0xFF
    encoding: PinEncoding = PinEncoding.ASCII_NUMERIC
    label: str = "PIN"

    def block(self, pin: bytes | bytearray, *, encoding: PinEncoding | None = None) -> bytearray:
        """The VERIFY data for ``pin``. The caller wipes the result. ``encoding`` overrides
        this format's (PIV PUKs are the PIN's format without the digits rule)."""
        if not self.min_length <= len(pin) <= self.max_length:
            raise PinLenRangeError(
                f"{self.label} must be {self.min_length} to {self.max_length} characters"
            )
        if (encoding or self.encoding) is PinEncoding.ASCII_NUMERIC and not all(
            0x30 <= b <= 0x39 for b in pin
        ):
            raise PinInvalidError(f"{self.label} must be digits")
        size = self.stored_length if self.stored_length is not None else len(pin)
        block = bytearray(bytes((self.pad_char,)) * size)
        block[: len(pin)] = pin
        return block

    @classmethod
    def from_pkcs15(
        cls,
        *,
        min_length: int,
        max_length: int,
        stored_length: int | None,
        pad_char: int,
        pin_type: str,
        needs_padding: bool,
    ) -> PinFormat:
        """From PKCS#15 PinAttributes (pinType as asn1crypto names it)."""
        encoding = PinEncoding.ASCII_NUMERIC if pin_type == "ascii_numeric" else PinEncoding.UTF8
        return cls(
            min_length=min_length,
            max_length=max_length,
            stored_length=stored_length if needs_padding else None,
            pad_char=pad_char,
            encoding=encoding,
        )
