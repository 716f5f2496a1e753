"""ISO/IEC 7816-4 codecs (APDU, TLV), status words and their error mapping, PIN formats and
the APDU channel (chaining, 61xx, 6Cxx, T=0, logical channels). Pure: no I/O of its own."""

from tokend.iso7816.apdu import ApduError, CommandApdu, ResponseApdu
from tokend.iso7816.channel import ApduChannel, Transmit
from tokend.iso7816.pin import PinEncoding, PinFormat
from tokend.iso7816.status import (
    SW,
    NotFoundError,
    check_sw,
    error_for_sw,
    retries_in,
    sw_with_retries,
)
from tokend.iso7816.tlv import Tlv, encode_tlv, find_tlv, parse_tlvs

__all__ = [
    "SW",
    "ApduChannel",
    "ApduError",
    "CommandApdu",
    "NotFoundError",
    "PinEncoding",
    "PinFormat",
    "ResponseApdu",
    "Tlv",
    "Transmit",
    "check_sw",
    "encode_tlv",
    "error_for_sw",
    "find_tlv",
    "parse_tlvs",
    "retries_in",
    "sw_with_retries",
]
