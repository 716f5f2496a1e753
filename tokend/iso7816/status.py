"""ISO 7816-4 status words: the one vocabulary (`SW`) that drivers and virtual cards both
use, and the one mapping from a status word to a tokend error (`error_for_sw`). An applet
driver adds nothing here unless its card gives a code a meaning ISO does not."""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol

from tokend.errors import (
    ArgumentsBadError,
    CardNotVerifiedError,
    DataInvalidError,
    DataLenRangeError,
    DeviceError,
    DeviceMemoryError,
    FunctionFailedError,
    FunctionNotSupportedError,
    FunctionRejectedError,
    KeyHandleInvalidError,
    PinIncorrectError,
    PinLockedError,
    TokendError,
)

__all__ = [
    "SW",
    "NotFoundError",
    "check_sw",
    "error_for_sw",
    "retries_in",
    "sw_with_retries",
]


class SW(IntEnum):
    """Status words (ISO 7816-4 §5.6; the meanings PIV and PKCS#15 applets give them)."""

    SW_OK = 0x9000
    SW_BYTES_REMAINING = 0x6100  # SW2 = bytes still available (GET RESPONSE)
    SW_WARNING_STATE_UNCHANGED = 0x6200
    SW_VERIFY_FAILED = 0x63C0  # SW2 low nibble = tries left
    SW_WRONG_LENGTH = 0x6700
    SW_LOGICAL_CHANNEL_NOT_SUPPORTED = 0x6881
    SW_SECURE_MESSAGING_NOT_SUPPORTED = 0x6882
    SW_LAST_COMMAND_EXPECTED = 0x6883
    SW_COMMAND_CHAINING_NOT_SUPPORTED = 0x6884
    SW_COMMAND_NOT_ALLOWED = 0x6900
    SW_FILE_INVALID = 0x6981  # "command incompatible with file structure"
    SW_SECURITY_STATUS_NOT_SATISFIED = 0x6982
    SW_AUTH_METHOD_BLOCKED = 0x6983
    SW_CONDITIONS_NOT_SATISFIED = 0x6985
    SW_COMMAND_NOT_ALLOWED_NO_EF = 0x6986
    SW_WRONG_DATA = 0x6A80
    SW_FUNC_NOT_SUPPORTED = 0x6A81
    SW_FILE_NOT_FOUND = 0x6A82
    SW_NOT_ENOUGH_MEMORY = 0x6A84
    SW_INCORRECT_P1P2 = 0x6A86
    SW_REFERENCE_NOT_FOUND = 0x6A88
    SW_WRONG_P1P2 = 0x6B00
    SW_CORRECT_LENGTH = 0x6C00  # SW2 = the Le the card wants (resend)
    SW_INS_NOT_SUPPORTED = 0x6D00
    SW_CLA_NOT_SUPPORTED = 0x6E00
    SW_UNKNOWN = 0x6F00


class NotFoundError(FunctionFailedError):  # type: ignore[misc,valid-type]
    """6A82: the data object, file or key does not exist on the card."""


_SW_ERRORS: dict[int, tuple[type[TokendError], str]] = {
    SW.SW_AUTH_METHOD_BLOCKED: (PinLockedError, "PIN or PUK blocked"),
    SW.SW_SECURITY_STATUS_NOT_SATISFIED: (CardNotVerifiedError, "security status not satisfied"),
    SW.SW_FILE_NOT_FOUND: (NotFoundError, "data object or key not found"),
    SW.SW_WRONG_DATA: (DataInvalidError, "card rejected the data"),
    SW.SW_INCORRECT_P1P2: (ArgumentsBadError, "card rejected P1/P2 (unknown slot or algorithm)"),
    SW.SW_REFERENCE_NOT_FOUND: (KeyHandleInvalidError, "reference data not found"),
    SW.SW_NOT_ENOUGH_MEMORY: (DeviceMemoryError, "not enough memory on the card"),
    SW.SW_WRONG_LENGTH: (DataLenRangeError, "card rejected the length"),
    SW.SW_CONDITIONS_NOT_SATISFIED: (FunctionRejectedError, "conditions of use not satisfied"),
    SW.SW_INS_NOT_SUPPORTED: (FunctionNotSupportedError, "instruction not supported by this card"),
    SW.SW_CLA_NOT_SUPPORTED: (FunctionNotSupportedError, "class not supported by this card"),
    SW.SW_FUNC_NOT_SUPPORTED: (FunctionNotSupportedError, "function not supported by this card"),
}


def retries_in(sw: int) -> int | None:
    """Tries left in a 63Cx (or the older 630x, x > 0) status word, else None."""
    if sw & 0xFFF0 == SW.SW_VERIFY_FAILED or (sw & 0xFFF0 == 0x6300 and sw != 0x6300):
        return sw & 0x0F
    return None


def sw_with_retries(left: int) -> int:
    """The 63Cx a card answers to a wrong PIN with ``left`` tries left (x caps at 15)."""
    return SW.SW_VERIFY_FAILED | min(left, 0x0F)


def error_for_sw(sw: int, *, wrong_data: type[TokendError] = DataInvalidError) -> TokendError:
    """The error for a status word other than 9000. ``wrong_data`` replaces the class used
    for 6A80 where the caller knows better (e.g. a rejected ciphertext)."""
    err: TokendError
    retries = retries_in(sw)
    if retries is not None:
        err = PinIncorrectError(retries=retries)
    elif sw == SW.SW_WRONG_DATA:
        err = wrong_data(f"card rejected the data (SW {sw:04X})")
    elif sw in _SW_ERRORS:
        klass, text = _SW_ERRORS[sw]
        err = klass(f"{text} (SW {sw:04X})")
    else:
        err = DeviceError(f"card answered SW {sw:04X}")
    err.sw = sw  # type: ignore[attr-defined]  # kept for diagnostics
    return err


class _Answer(Protocol):
    @property
    def sw(self) -> int: ...

    @property
    def data(self) -> bytes: ...


def check_sw(rapdu: _Answer, *, wrong_data: type[TokendError] = DataInvalidError) -> bytes:
    """The data of a 9000 answer; any other status word raises its mapped error."""
    if rapdu.sw != SW.SW_OK:
        raise error_for_sw(rapdu.sw, wrong_data=wrong_data)
    return rapdu.data
