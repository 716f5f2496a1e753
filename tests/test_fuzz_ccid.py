"""Bad answers from a CCID reader — truncated, wrong length, wrong sequence number, error
status, endless time extensions, random corruption — end as a clean CKR_DEVICE_ERROR in
bounded time, and the next command works again (the driver aborts and resynchronises)."""

from __future__ import annotations

import random
import time

import pytest
import usb.core

from tests.helpers import ID_9D, logged_in_session, pkcs1_blob, private_key
from tests.usb_fixtures import usb_piv_daemon
from tokend import ccid
from tokend.client import Client
from tokend.drivers.usb_ccid import (
    MAX_STALE_ANSWERS,
    CcidDevice,
    UsbCcidTransport,
    find_ccid_interface,
)
from tokend.errors import DeviceError, TransportError
from tokend.pkcs11 import CKR
from tokend.simulators.piv import VirtualPivCard
from tokend.simulators.usb_ccid import PROFILES, SimulatedUsbBus, VirtualCcidToken

SELECT_PIV = bytes.fromhex("00A4040009A0000003080000100000")
#: Short limits so a misbehaving reader costs the test little; production uses seconds.
READ_TIMEOUT, MAX_OPERATION = 0.2, 1.0


def open_transport(profile: str = "extended"):  # type: ignore[no-untyped-def]
    bus = SimulatedUsbBus(udev_delay=None)
    token = VirtualCcidToken(VirtualPivCard(), PROFILES[profile])
    bus.plug(token)
    dev = next(iter(usb.core.find(find_all=True, backend=bus)))
    interface = find_ccid_interface(dev)
    assert interface is not None
    device = CcidDevice(
        dev, interface, "fuzz", read_timeout=READ_TIMEOUT, max_operation_time=MAX_OPERATION
    )
    device.claim()
    return token, UsbCcidTransport(device)


def works(transport: UsbCcidTransport) -> None:
    assert transport.transmit(SELECT_PIV)[-2:] == b"\x90\x00"


def bounded_device_error(transport: UsbCcidTransport, apdu: bytes = SELECT_PIV) -> DeviceError:
    start = time.monotonic()
    with pytest.raises(DeviceError) as caught:
        transport.transmit(apdu)
    assert time.monotonic() - start < MAX_OPERATION + 2 * READ_TIMEOUT + 1.0
    assert caught.value.ckr == CKR.CKR_DEVICE_ERROR
    assert not isinstance(caught.value, TransportError)
    return caught.value


def _set_length(frame: bytes, length: int) -> bytes:
    return frame[:1] + length.to_bytes(4, "little") + frame[5:]


def _with(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + bytes([value]) + frame[offset + 1 :]


FAULTS = {
    "empty read": lambda cmd, frames: [b""],
    "header cut short": lambda cmd, frames: [frames[0][:7]],
    "data cut short": lambda cmd, frames: [frames[0][:-1]],
    "length too long": lambda cmd, frames: [_set_length(frames[0], len(frames[0]))],
    "length too short": lambda cmd, frames: [_set_length(frames[0], 0)],
    "length beyond the reader maximum": lambda cmd, frames: [_set_length(frames[0], 1 << 30)],
    "wrong message type": lambda cmd, frames: [_with(frames[0], 0, 0x81)],
    "wrong slot": lambda cmd, frames: [_with(frames[0], 5, 1)],
    "reserved command status": lambda cmd, frames: [_with(frames[0], 7, 0xC0)],
    "error status (hardware error)": lambda cmd, frames: [
        ccid.data_block(cmd.seq, b"", command=ccid.CommandStatus.FAILED, error=0xFB).encode()
    ],
    "error status (parity)": lambda cmd, frames: [
        ccid.data_block(cmd.seq, b"", command=ccid.CommandStatus.FAILED, error=0xFD).encode()
    ],
    "error status (slot busy)": lambda cmd, frames: [
        ccid.data_block(cmd.seq, b"", command=ccid.CommandStatus.FAILED, error=0xE0).encode()
    ],
    "wrong sequence numbers only": lambda cmd, frames: [_with(frames[0], 6, (cmd.seq + 1) & 0xFF)],
    "endless wrong sequence numbers": lambda cmd, frames: [
        _with(frames[0], 6, (cmd.seq + 1 + i) & 0xFF) for i in range(MAX_STALE_ANSWERS + 1)
    ],
    "bad chain parameter": lambda cmd, frames: [_with(frames[0], 9, 0x07)],
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_malformed_answer_is_a_clean_device_error(fault: str) -> None:
    token, transport = open_transport()
    works(transport)
    token.inject(FAULTS[fault])
    bounded_device_error(transport)
    works(transport)  # resynchronised: the next command gets its own answer


def test_time_extension_loop_is_aborted() -> None:
    token, transport = open_transport()
    token.stall()
    error = bounded_device_error(transport)
    assert "more time" in str(error)
    assert token.aborts == 1  # the class ABORT request went out, with the bulk Abort
    works(transport)


def test_time_extensions_and_stale_answers_are_absorbed() -> None:
    token, transport = open_transport()
    token.time_extensions = 3
    works(transport)

    def stale_first(cmd, frames):  # type: ignore[no-untyped-def]
        old = ccid.data_block((cmd.seq - 1) & 0xFF, b"\x6a\x82").encode()
        return [old, *frames]

    token.time_extensions = 0
    token.inject(stale_first)
    works(transport)


@pytest.mark.parametrize("profile", ["extended", "short", "small"])
def test_random_corruption_never_hangs_or_escapes(profile: str) -> None:
    rng = random.Random(1300 + len(profile))
    token, transport = open_transport(profile)
    read_size = transport._device.interface.read_size
    outcomes = {"answer": 0, "device error": 0}

    def corrupt(cmd, frames):  # type: ignore[no-untyped-def]
        out = []
        for frame in frames:
            frame = bytearray(frame)
            for _ in range(rng.randint(1, 4)):
                how = rng.randrange(4)
                if how == 0 and frame:
                    frame[rng.randrange(len(frame))] = rng.randrange(256)
                elif how == 1:
                    del frame[rng.randrange(len(frame) + 1) :]
                elif how == 2:
                    frame += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
                else:
                    frame[:10] = bytes(rng.randrange(256) for _ in range(10))
            out.append(bytes(frame[:read_size]))  # longer is a USB overflow, not CCID
        return out

    for _ in range(150):
        token.inject(corrupt)
        start = time.monotonic()
        try:
            transport.transmit(SELECT_PIV)
            outcomes["answer"] += 1  # the corruption hit bytes CCID cannot check
        except DeviceError as exc:
            assert not isinstance(exc, TransportError), exc
            outcomes["device error"] += 1
        assert time.monotonic() - start < MAX_OPERATION + 2 * READ_TIMEOUT + 1.0
        works(transport)
    assert outcomes["device error"] > 100, outcomes


def test_through_the_daemon_a_bad_answer_is_ckr_device_error(sock_path) -> None:
    """What a mail client sees: CKR_DEVICE_ERROR for the one call; the token stays."""
    for running in usb_piv_daemon(sock_path):
        demo, plug, slot = (running.extras[k] for k in ("demo", "plug", "slot"))
        blob, secret = pkcs1_blob(demo.encryption_public_key)
        with Client(running.socket) as client:
            session = logged_in_session(client, slot)
            key = private_key(client, session, ID_9D)
            plug.token.inject(FAULTS["data cut short"])
            with pytest.raises(DeviceError) as caught:
                client.decrypt(session, key, "CKM_RSA_PKCS", blob)
            assert caught.value.ckr == CKR.CKR_DEVICE_ERROR
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
