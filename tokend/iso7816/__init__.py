"""ISO/IEC 7816-4 codecs and the APDU channel. Pure: no I/O of its own."""

from tokend.iso7816.apdu import SW, ApduError, CommandApdu, ResponseApdu
from tokend.iso7816.channel import ApduChannel, Transmit
from tokend.iso7816.tlv import Tlv, encode_tlv, find_tlv, parse_tlvs

__all__ = [
    "SW",
    "ApduChannel",
    "ApduError",
    "CommandApdu",
    "ResponseApdu",
    "Tlv",
    "Transmit",
    "encode_tlv",
    "find_tlv",
    "parse_tlvs",
]
