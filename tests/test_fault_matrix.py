"""Fault injection (docs/reliability.md, the fault matrix): the token is pulled at each APDU
of login, decrypt, sign, derive and import, on the in-process, USB, BLE and PC/SC
transports, for the PIV applet and the SIM PKI applet; a client (native or p11-kit) is
killed in the middle of an operation; a token is pulled under a p11-kit client; BlueZ is
killed mid-decryption; the daemon is killed and restarted. The vendor-module faults are in
tests/test_module_softhsm.py.

Every case expects what a user must be able to rely on: no wrong result (the operation
either returns the right answer or fails), no hang over 2 s, no PIN retry consumed that
the user did not cause, and the card's security state reset once no client is logged in.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from tests.conftest import wait_for_token
from tests.helpers import ID_9A, ID_9C, ID_9D, PIN, pkcs1_blob, private_key
from tests.sim_fixtures import SIM_PIN, memory_sim, pcsc_sim  # noqa: F401 - fixtures
from tests.usb_fixtures import usb_piv_daemon
from tokend.client import Client
from tokend.errors import TokendError
from tokend.model import Ecdh1DeriveParams, Mechanism
from tokend.pkcs11 import CKD, CKM
from tokend.protocol import b64
from tokend.sim import commands as sim_commands

HANG_LIMIT = 2.0

#: What the session layer answers when the token left during or before a call.
REMOVAL_ERRORS = (
    "DeviceRemovedError",
    "TokenNotPresentError",
    "SessionHandleInvalidError",
    "DeviceError",
)


def _card_says_verified(card) -> bool:  # type: ignore[no-untyped-def]
    # VERIFY without data asks for the PIN status: 9000 = verified (SP 800-73-4).
    return card.process(bytes.fromhex("0020008000"))[-2:] == b"\x90\x00"


def _pin_tries_left(card) -> int:  # type: ignore[no-untyped-def]
    return card._pin.left


# -- the operations, each with what it must return ----------------------------------------

Op = Callable[[Client, int, object], None]


def _login(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    client.login(session, PIN)


def _decrypt(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    key = private_key(client, session, ID_9D)
    assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret, "WRONG plaintext"


def _sign(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    digest = os.urandom(32)
    key = private_key(client, session, ID_9C)
    sig = client.sign(session, key, "CKM_ECDSA", digest, context_pin=PIN)
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    demo.signing_public_key.verify(  # raises on a wrong signature
        utils.encode_dss_signature(r, s), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256()))
    )


def _derive(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    key = private_key(client, session, ID_9A)
    mech = Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, point))
    expected = ephemeral.exchange(ec.ECDH(), demo.key_agreement_public_key)
    assert client.derive(session, key, mech) == expected, "WRONG shared secret"


_IMPORT_KEY = ec.generate_private_key(ec.SECP256R1())


def _import_params(session: int, key=_IMPORT_KEY, slot: str = "95") -> dict:  # type: ignore[no-untyped-def,type-arg]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fault matrix")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "h_session": session,
        "key_slot": slot,
        "private_key": b64(der),
        "certificate": b64(cert.public_bytes(serialization.Encoding.DER)),
    }


def _import(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    assert client.call("tokend_ImportKey", _import_params(session)) == {"key_slot": "95"}


OPS: dict[str, tuple[Op, bool]] = {  # op, whether it needs a logged-in session first
    "login": (_login, False),
    "decrypt": (_decrypt, True),
    "sign": (_sign, True),
    "derive": (_derive, True),
    "import": (_import, True),
}


# -- the transports ------------------------------------------------------------------------


@pytest.fixture(params=["memory", "usb", "ble", pytest.param("pcsc", marks=pytest.mark.pcsc)])
def piv(request, sock_path: Path) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    if request.param == "memory":
        yield request.getfixturevalue("memory_piv")
    elif request.param == "usb":
        yield from usb_piv_daemon(sock_path)
    elif request.param == "ble":
        yield request.getfixturevalue("ble_piv")
    else:
        yield request.getfixturevalue("pcsc_piv")


def _reinsert(piv) -> int:  # type: ignore[no-untyped-def]
    """Put the card back (a new token instance) and wait until the daemon has it."""
    piv.extras["plug"].insert(piv.extras["card"])
    with Client(piv.socket) as client:
        deadline = time.monotonic() + 20  # the harness's wait (a loaded machine), not a hang
        while not client.slot_list(token_present=True):
            assert time.monotonic() < deadline, "the token did not come back"
            time.sleep(0.02)
    return wait_for_token(piv)


@dataclass(frozen=True)
class Applet:
    """What the matrix needs to know of an applet: its PIN, its operations, and how to read
    the virtual card's PIN counter and security state without going through tokend."""

    pin: str
    ops: dict[str, tuple[Op, bool]]
    tries_left: Callable[[Any], int | None]
    verified: Callable[[Any], bool]


PIV = Applet(PIN, OPS, _pin_tries_left, _card_says_verified)


def _run_op(
    token, name: str, hook: Callable[[bytes], None] | None, applet: Applet = PIV
) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """Run ``name`` on a fresh session with ``hook`` on every APDU of the operation itself;
    'ok' or the error's class name, and when (monotonic) the call returned."""
    op, needs_login = applet.ops[name]
    plug, demo = token.extras["plug"], token.extras["demo"]
    with Client(token.socket, timeout=10) as client:
        slot = client.slot_list(token_present=True)[0]
        session = client.open_session(slot, rw=True)
        if needs_login:
            client.login(session, applet.pin)
        if hook is not None:
            plug.on_transmit.append(hook)
        start = time.monotonic()
        try:
            op(client, session, demo)
            outcome = "ok"
        except TokendError as exc:
            outcome = type(exc).__name__
        finally:
            end = time.monotonic()
            plug.on_transmit.clear()
    assert end - start < 60
    return outcome, end


FULL = bool(os.environ.get("TOKEND_FAULT_FULL"))


def _every(seen: list[bytes]) -> list[int]:
    return list(range(1, len(seen) + 1))


def _first_of_each_instruction_and_last(seen: list[bytes]) -> list[int]:
    """Where one pull costs a reconnection of a second or so (two vpcd polls through pcscd;
    the fake BlueZ's link loss, then bleak finding and connecting the key again), the normal
    suite pulls at the first APDU of each instruction and at the last. TOKEND_FAULT_FULL=1
    pulls at every one (docs/reliability.md records both runs)."""
    if FULL:
        return _every(seen)
    firsts = {apdu[1]: i for i, apdu in reversed(list(enumerate(seen, 1)))}
    return sorted({*firsts.values(), len(seen)})


PullPoints = Callable[[list[bytes]], list[int]]


def _pull_at_each_apdu(token, name: str, applet: Applet, points_of: PullPoints) -> None:  # type: ignore[no-untyped-def]
    """Pull the token as APDU k of ``name`` is on its way, for each k ``points_of`` picks
    from the operation's APDUs, and check the four expectations after each pull."""
    card, plug = token.extras["card"], token.extras["plug"]
    tries = applet.tries_left(card)
    seen: list[bytes] = []
    outcome, _ = _run_op(token, name, seen.append, applet)
    assert outcome == "ok", f"{name} does not work without a fault: {outcome}"
    assert seen, f"{name} sent no APDU"
    points = points_of(seen)
    slowest = 0.0
    for k in points:
        count, pulled_at = 0, 0.0

        def pull_at_k(apdu: bytes, k: int = k) -> None:
            nonlocal count, pulled_at
            count += 1
            if count == k:
                pulled_at = time.monotonic()
                plug.remove()

        outcome, end = _run_op(token, name, pull_at_k, applet)
        elapsed = end - pulled_at  # from the pull to the caller's answer: the hang bound
        slowest = max(slowest, elapsed)
        where = f"{name}, token pulled at APDU {k}/{len(seen)} (INS {seen[k - 1][1]:02X})"
        print(f"  {where}: {outcome} after {elapsed:.2f} s")
        assert outcome in REMOVAL_ERRORS, f"{where}: {outcome}"  # never 'ok' nor another error
        assert elapsed < HANG_LIMIT, f"{where}: took {elapsed:.2f} s"
        assert applet.tries_left(card) == tries, f"{where}: a PIN try was consumed"
        _reinsert(token)
        assert not applet.verified(card), f"{where}: the card is still verified"
    # The figures docs/reliability.md's matrix reports (pytest -s shows them).
    print(
        f"{plug.kind} {name}: {len(seen)} APDUs, pulled at {len(points)}, "
        f"slowest answer after a pull {slowest * 1000:.0f} ms"
    )
    assert _run_op(token, name, None, applet)[0] == "ok"  # and the token works again


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OPS))
def test_token_pulled_at_each_apdu(piv, name: str) -> None:  # type: ignore[no-untyped-def]
    slow = piv.extras["plug"].kind in ("pcsc", "ble")
    _pull_at_each_apdu(piv, name, PIV, _first_of_each_instruction_and_last if slow else _every)


# -- the SIM PKI applet (IsoApplet): RSA-2048 PKCS#1 v1.5 only, so no derive ---------------


def _sim_says_verified(card) -> bool:  # type: ignore[no-untyped-def]
    # VERIFY without data: 9000 = verified, 63Cx = not (x tries left); it consumes no try.
    return card.process(sim_commands.verify(None).encode())[-2:] == b"\x90\x00"


def _sim_login(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    client.login(session, SIM_PIN)


def _sim_private(client: Client, session: int, public_key) -> int:  # type: ignore[no-untyped-def]
    return private_key(client, session, _sim_key_id(public_key))


def _sim_decrypt(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    key = _sim_private(client, session, demo.encryption_public_key)
    assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret, "WRONG plaintext"


def _sim_sign(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    mail = os.urandom(64)
    key = _sim_private(client, session, demo.signing_public_key)
    signature = client.sign(session, key, "CKM_SHA256_RSA_PKCS", mail)
    demo.signing_public_key.verify(signature, mail, padding.PKCS1v15(), hashes.SHA256())


@functools.cache
def _sim_import_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _sim_import(client: Client, session: int, demo) -> None:  # type: ignore[no-untyped-def]
    # Key reference 0f (a retired-key place the demo leaves empty); a key there is replaced,
    # so every run (and a run cut short by a pull) imports into the same place.
    params = _import_params(session, _sim_import_key(), "0f")
    assert client.call("tokend_ImportKey", params) == {"key_slot": "0f"}


SIM = Applet(
    SIM_PIN,
    {
        "login": (_sim_login, False),
        "decrypt": (_sim_decrypt, True),
        "sign": (_sim_sign, True),
        "import": (_sim_import, True),
    },
    lambda card: card.pin_tries_left,
    _sim_says_verified,
)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIM.ops))
def test_sim_pulled_at_each_apdu(memory_sim, name: str) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    _pull_at_each_apdu(memory_sim, name, SIM, _every if name != "import" else _sim_import_points)


#: What changes the SIM: PUT DATA (the key), DELETE FILE, CREATE FILE, UPDATE BINARY.
_SIM_WRITES = {0xDB, 0xE4, 0xE0, 0xD6}


def _sim_import_points(seen: list[bytes]) -> list[int]:
    """Importing into a SIM is 96 APDUs, and a pull there costs the SIM read again: the
    normal suite pulls at every APDU that changes the card (where a pull leaves a half-made
    key entry behind), and at the first of each other instruction and the last (re-reading
    the PKCS#15 directories). TOKEND_FAULT_FULL=1 pulls at every one."""
    writes = [i for i, apdu in enumerate(seen, 1) if apdu[1] in _SIM_WRITES]
    return sorted({*writes, *_first_of_each_instruction_and_last(seen)})


#: The instruction that carries each SIM operation: VERIFY, PERFORM SECURITY OPERATION (the
#: first of a chained decipher), PUT DATA (the key's first part).
_SIM_OPERATION_INS = {"login": 0x20, "decrypt": 0x2A, "sign": 0x2A, "import": 0xDB}


@pytest.mark.slow
@pytest.mark.pcsc
def test_sim_pulled_through_pcscd(pcsc_sim) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The SIM behind pcscd + vpcd (T=0). A pull costs about 3 s here (two vpcd polls, then
    the SIM read again through T=0), so the normal suite pulls once per operation, as the
    instruction carrying it is on its way; TOKEND_FAULT_FULL=1 pulls at every APDU."""
    for name, ins in _SIM_OPERATION_INS.items():

        def the_operation(seen: list[bytes], ins: int = ins) -> list[int]:
            if FULL:
                return _every(seen)
            return [next(i for i, apdu in enumerate(seen, 1) if apdu[1] == ins)]

        _pull_at_each_apdu(pcsc_sim, name, SIM, the_operation)


# -- a client killed in the middle of an operation -------------------------------------------

_CLIENT = textwrap.dedent(
    """
    import sys
    from tokend.client import Client
    from tests.helpers import private_key
    socket, pin, key_id, blob = sys.argv[1:]
    with Client(socket) as c:
        slot = c.slot_list(token_present=True)[0]
        s = c.open_session(slot)
        c.login(s, pin)
        key = private_key(c, s, bytes.fromhex(key_id))
        print("ready", flush=True)
        sys.stdin.readline()
        c.decrypt(s, key, "CKM_RSA_PKCS", bytes.fromhex(blob))
        print("finished", flush=True)
    """
)


def _sim_key_id(public_key) -> bytes:  # type: ignore[no-untyped-def]
    n = public_key.public_numbers().n
    return hashlib.sha1(n.to_bytes((n.bit_length() + 7) // 8, "big")).digest()


@pytest.mark.parametrize("transport", ["memory", "usb", "ble", "sim"])
def test_client_killed_mid_operation(transport: str, request, sock_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A client SIGKILLed while its decryption is at the card (the command on its way): the
    card's security state is reset once the daemon has noticed (it was the only client
    logged in), no PIN try is used, and everyone else is served."""
    gen = None
    if transport == "usb":
        gen = usb_piv_daemon(sock_path)
        token = next(gen)
    else:
        token = request.getfixturevalue(f"{transport}_piv" if transport != "sim" else "memory_sim")
    applet = SIM if transport == "sim" else PIV
    try:
        card, plug, demo = token.extras["card"], token.extras["plug"], token.extras["demo"]
        key_id = _sim_key_id(demo.encryption_public_key) if applet is SIM else ID_9D
        operation_ins = 0x2A if applet is SIM else 0x87  # PSO DECIPHER; GENERAL AUTHENTICATE
        tries = applet.tries_left(card)
        blob, secret = pkcs1_blob(demo.encryption_public_key)
        root = Path(__file__).resolve().parent.parent
        args = [str(token.socket), applet.pin, key_id.hex(), blob.hex()]
        child = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, *args],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        assert applet.verified(card)
        killed = threading.Event()

        def kill_on_the_operation(apdu: bytes) -> None:
            if apdu[1] == operation_ins and not killed.is_set():
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                killed.set()

        plug.on_transmit.append(kill_on_the_operation)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert killed.wait(5), "the decryption never reached the card"
        plug.on_transmit.clear()
        # The killed client was the only one logged in: the daemon resets the card's
        # security state once it has noticed the connection is gone.
        deadline = time.monotonic() + HANG_LIMIT
        while applet.verified(card):
            assert time.monotonic() < deadline, "the card stayed verified after the client died"
            time.sleep(0.02)
        assert applet.tries_left(card) == tries
        with Client(token.socket) as other:  # the daemon serves everyone else
            slot = other.slot_list(token_present=True)[0]
            session = other.open_session(slot)
            other.login(session, applet.pin)
            key = private_key(other, session, key_id)
            assert other.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
    finally:
        if gen is not None:
            gen.close()


# -- BLE: BlueZ itself dies while a decryption is at the key ----------------------------------


def test_bluez_killed_while_a_decryption_is_at_the_key(ble_piv) -> None:  # type: ignore[no-untyped-def]
    """bluetoothd dies (its bus name goes, no Device1 signal) as GENERAL AUTHENTICATE is on
    its way: the caller is told the token left within 2 s, no PIN try is used, and after
    BlueZ returns the key is a new instance whose card is not verified."""
    card, plug, demo, fake = (ble_piv.extras[k] for k in ("card", "plug", "demo", "fake"))
    tries = _pin_tries_left(card)
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    killed_at = 0.0

    def kill_bluez(apdu: bytes) -> None:
        nonlocal killed_at
        if apdu[1] == 0x87 and not killed_at:
            killed_at = time.monotonic()
            fake.kill_bluez()

    with Client(ble_piv.socket) as client:
        session = client.open_session(ble_piv.extras["slot"])
        client.login(session, PIN)
        key = private_key(client, session, ID_9D)
        plug.on_transmit.append(kill_bluez)
        with pytest.raises(TokendError) as caught:
            client.decrypt(session, key, "CKM_RSA_PKCS", blob)
        answered = time.monotonic()
        plug.on_transmit.clear()
    assert killed_at, "the decryption never reached the key"
    assert type(caught.value).__name__ in REMOVAL_ERRORS, repr(caught.value)
    assert answered - killed_at < HANG_LIMIT
    assert _pin_tries_left(card) == tries
    fake.start_bluez()
    wait_for_token(ble_piv)
    assert not _card_says_verified(card)
    with Client(ble_piv.socket) as client:
        session = client.open_session(client.slot_list(token_present=True)[0])
        client.login(session, PIN)
        key = private_key(client, session, ID_9D)
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret


# -- p11-kit clients (Debian's p11-kit-client.so through python-pkcs11) -------------------------


@pytest.fixture
def p11kit_piv(sock_path: Path) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    """The daemon with its p11-kit front end and the demo card in the in-process reader."""
    from tests.conftest import MemoryPlug
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard
    from tokend.testing import start_thread_daemon

    card = VirtualPivCard()
    demo = provision_demo(card, key_agreement=True)
    reader = MemoryReader("Memory Reader 0")
    plug = MemoryPlug(reader)
    plug.insert(card)
    running = start_thread_daemon(sock_path, [MemoryWatcher(reader)], p11kit=True)
    try:
        slot = wait_for_token(running)
        running.extras.update(card=card, demo=demo, plug=plug, slot=slot)
        yield running
    finally:
        running.stop()


def _p11kit_consumer(running) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    """tests/p11kit_consumer.py ``hold``: logged in through p11-kit-client.so, ready."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["P11_KIT_SERVER_ADDRESS"] = f"unix:path={running.p11kit_socket}"
    env["PYTHONPATH"] = str(root)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.p11kit_consumer", "hold"],
        cwd=root,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        raise AssertionError(f"p11-kit consumer did not start: {line!r} {child.stderr.read()}")  # type: ignore[union-attr]
    return child


def test_p11kit_client_killed_while_its_decryption_is_at_the_card(p11kit_piv) -> None:  # type: ignore[no-untyped-def]
    card, plug, demo = (p11kit_piv.extras[k] for k in ("card", "plug", "demo"))
    tries = _pin_tries_left(card)
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    child = _p11kit_consumer(p11kit_piv)
    try:
        assert _card_says_verified(card)
        killed = threading.Event()

        def kill_on_general_authenticate(apdu: bytes) -> None:
            if apdu[1] == 0x87 and not killed.is_set():
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                killed.set()

        plug.on_transmit.append(kill_on_general_authenticate)
        child.stdin.write(blob.hex() + "\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        assert killed.wait(5), "the decryption never reached the card"
        plug.on_transmit.clear()
        deadline = time.monotonic() + HANG_LIMIT
        while _card_says_verified(card):
            assert time.monotonic() < deadline, "the card stayed verified after the client died"
            time.sleep(0.02)
        assert _pin_tries_left(card) == tries
        with Client(p11kit_piv.socket) as other:
            session = other.open_session(p11kit_piv.extras["slot"])
            other.login(session, PIN)
            key = private_key(other, session, ID_9D)
            assert other.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def test_token_pulled_under_a_p11kit_client_mid_decryption(p11kit_piv) -> None:  # type: ignore[no-untyped-def]
    card, plug, demo = (p11kit_piv.extras[k] for k in ("card", "plug", "demo"))
    tries = _pin_tries_left(card)
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    child = _p11kit_consumer(p11kit_piv)
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(blob.hex() + "\n")  # without a fault: the plaintext
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ok " + secret.hex()
        pulled_at = 0.0

        def pull_on_general_authenticate(apdu: bytes) -> None:
            nonlocal pulled_at
            if apdu[1] == 0x87 and not pulled_at:
                pulled_at = time.monotonic()
                plug.remove()

        plug.on_transmit.append(pull_on_general_authenticate)
        child.stdin.write(blob.hex() + "\n")
        child.stdin.flush()
        answer = child.stdout.readline().strip()
        answered = time.monotonic()
        plug.on_transmit.clear()
        assert pulled_at, "the decryption never reached the card"
        print("p11-kit client, token pulled mid-decryption:", answer)
        assert answer in ("error DeviceRemoved", "error SessionHandleInvalid"), answer
        assert answered - pulled_at < HANG_LIMIT, f"answered {answered - pulled_at:.2f} s after"
        assert _pin_tries_left(card) == tries
        _reinsert(p11kit_piv)
        assert not _card_says_verified(card)
        child.stdin.write(blob.hex() + "\n")  # the old session stays dead on the new token
        child.stdin.flush()
        assert child.stdout.readline().strip() == "error SessionHandleInvalid"
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


# -- the daemon killed and restarted ----------------------------------------------------------


@pytest.mark.pcsc
def test_daemon_killed_mid_operation_and_restarted(vpcd, sock_path: Path) -> None:  # type: ignore[no-untyped-def]
    """PC/SC: the card outlives the daemon. Killing tokend (SIGKILL) while it decrypts must
    leave no verified card behind for the next program, and a restarted daemon serves."""
    from tests.conftest import HookedCard
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.pcscd import wait_present
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    demo = provision_demo(card, key_agreement=True)
    hooks: list[Callable[[bytes], None]] = []
    vpcd.plug(HookedCard(card, hooks), wait=False)
    wait_present(vpcd.reader(0))
    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--socket", str(sock_path)]
    args += ["--allow-virtual-readers"]

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            args, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "tokend serve exited"
            assert time.monotonic() < deadline, "tokend did not list the card"
            try:
                with Client(sock_path, timeout=2) as c:
                    if c.slot_list(token_present=True):
                        return proc
            except OSError:
                pass
            time.sleep(0.05)

    daemon = start()
    tries = _pin_tries_left(card)
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    killed = threading.Event()

    def kill_daemon(apdu: bytes) -> None:
        if apdu[1] == 0x87 and not killed.is_set():
            killed.set()
            daemon.kill()

    try:
        with Client(sock_path, timeout=5) as client:
            slot = client.slot_list(token_present=True)[0]
            session = client.open_session(slot)
            client.login(session, PIN)
            key = private_key(client, session, ID_9D)
            hooks.append(kill_daemon)
            start_t = time.monotonic()
            with pytest.raises((OSError, TokendError, EOFError, ValueError)) as caught:
                client.decrypt(session, key, "CKM_RSA_PKCS", blob)
            print("daemon killed mid-decrypt; the client got", repr(caught.value))
            assert time.monotonic() - start_t < HANG_LIMIT
        hooks.clear()
        assert killed.is_set()
        daemon.wait(5)
        assert _pin_tries_left(card) == tries
        # The daemon died holding a verified card: pcscd resets a card whose last handle
        # goes away without SCardDisconnect, so nothing is left for the next program.
        deadline = time.monotonic() + HANG_LIMIT
        while _card_says_verified(card):
            assert time.monotonic() < deadline, "the card stayed verified after tokend died"
            time.sleep(0.05)
        daemon = start()
        with Client(sock_path) as client:
            slot = client.slot_list(token_present=True)[0]
            session = client.open_session(slot)
            client.login(session, PIN)
            key = private_key(client, session, ID_9D)
            assert client.decrypt(session, key, "CKM_RSA_PKCS", blob) == secret
        assert _pin_tries_left(card) == tries
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait(10)


def test_sessions_that_died_with_the_token_hold_no_place(memory_piv) -> None:  # type: ignore[no-untyped-def]
    """Found by the soak: a client whose 64 sessions (the per-connection cap) died with
    the token could open none on the token's return (CKR_SESSION_COUNT), and each dead
    session kept the retired token instance alive."""
    from tokend.limits import DEFAULT_LIMITS

    with Client(memory_piv.socket) as client:
        dead = [client.open_session(0) for _ in range(DEFAULT_LIMITS.max_sessions_per_application)]
        memory_piv.extras["plug"].remove()
        _reinsert(memory_piv)
        session = client.open_session(0)  # a place was freed for it
        client.login(session, PIN)
        _decrypt(client, session, memory_piv.extras["demo"])
        with pytest.raises(TokendError):  # the dead ones are gone, not revived
            client.call("C_GetSessionInfo", {"h_session": dead[0]})
