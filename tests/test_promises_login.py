"""Per-application login promises (docs/disconnect.md §3-§5, design §7) that an audit
(issue 16) could break unnoticed: the context-specific login of a PIN-always key, VERIFY
and the operation inside one real exclusive section, and the card's own 6982.

What reached the card is recorded at the card (the hooks of tests/conftest.py), over the
in-process reader and over real pcscd + vpcd."""

from __future__ import annotations

import contextlib
import threading

import pytest
from cryptography.hazmat.primitives import serialization

from tests.helpers import ID_9A, ID_9C, ID_9D, PIN, logged_in_session, pkcs1_blob, private_key
from tests.test_promises_disconnect import STATUS_QUERY, pin_status
from tokend.client import Client
from tokend.errors import PinIncorrectError, TokendError, UserNotLoggedInError
from tokend.pkcs11 import CKR
from tokend.protocol import b64, unb64

VERIFY, GENERAL_AUTHENTICATE, GET_RESPONSE = 0x20, 0x87, 0xC0
RESET = bytes.fromhex("0020FF8000")


@pytest.fixture(params=["memory", "usb", pytest.param("pcsc", marks=pytest.mark.pcsc)])
def piv(request):  # type: ignore[no-untyped-def]
    if request.param == "usb":
        from tests.usb_fixtures import usb_piv_daemon

        yield from usb_piv_daemon(request.getfixturevalue("sock_path"))
        return
    yield request.getfixturevalue(f"{request.param}_piv")


def _is_pin_verify(apdu: bytes) -> bool:
    return apdu[1] == VERIFY and apdu[2] == 0x00 and len(apdu) > 5


def _state(client: Client, session: int) -> str:
    return str(client.call("C_GetSessionInfo", {"h_session": session})["info"]["state"])


def _pin_always_decryption_key(client: Client, session: int):  # type: ignore[no-untyped-def]
    """A PIN-always RSA key generated in 9D; returns (handle, public key)."""
    generated = client.call(
        "tokend_GenerateKeyPair",
        {"h_session": session, "key_slot": "9d", "algorithm": "rsa2048", "pin_policy": "always"},
    )
    public = serialization.load_der_public_key(unb64(generated["public_key"]))
    return private_key(client, session, ID_9D), public


class CardLog:
    """Every command the card answered, in order, with its status word."""

    def __init__(self, plug) -> None:  # type: ignore[no-untyped-def]
        self.entries: list[tuple[bytes, bytes]] = []
        self._lock = threading.Lock()
        plug.after_answer.append(self._record)

    def _record(self, apdu: bytes, rapdu: bytes) -> None:
        with self._lock:
            self.entries.append((bytes(apdu), bytes(rapdu[-2:])))

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def commands(self) -> list[bytes]:
        with self._lock:
            entries = list(self.entries)
        verifies = [sw for apdu, sw in entries if _is_pin_verify(apdu)]
        assert verifies and verifies[0] == b"\x90\x00", "no successful VERIFY in C_Decrypt"
        return [apdu for apdu, _ in entries]


def _decrypt_with_context_pin(client: Client, session: int, key: int, blob: bytes, log: CardLog):  # type: ignore[no-untyped-def]
    """C_DecryptInit, C_Login(CKU_CONTEXT_SPECIFIC), C_Decrypt; the log holds what the card
    saw during C_Decrypt alone (the login's own VERIFY is not the one that counts)."""
    mech = {"mechanism": "CKM_RSA_PKCS"}
    client.call("C_DecryptInit", {"h_session": session, "p_mechanism": mech, "h_key": key})
    client.call(
        "C_Login", {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": PIN}
    )
    log.clear()
    answer = client.call("C_Decrypt", {"h_session": session, "p_encrypted_data": b64(blob)})
    return unb64(answer["data"])


def _assert_verify_then_operation(commands: list[bytes]) -> None:
    """VERIFY(PIN), then the operation's GENERAL AUTHENTICATE (chained, with GET RESPONSE)
    and nothing else: no other command came between them."""
    assert _is_pin_verify(commands[0])
    rest = commands[1:]
    assert rest, "no operation after the VERIFY"
    assert rest[0][1] == GENERAL_AUTHENTICATE, f"{rest[0][:4].hex()} came between"
    assert all(apdu[1] in (GENERAL_AUTHENTICATE, GET_RESPONSE) for apdu in rest), [
        apdu[:4].hex() for apdu in rest
    ]


# --- 3. PIN-always decryption: VERIFY immediately followed by the operation ------------------


def test_pin_always_decryption_sends_verify_then_the_operation(piv) -> None:
    plug, slot = piv.extras["plug"], piv.extras["slot"]
    with Client(piv.socket) as client:
        session = client.open_session(slot, rw=True)
        client.login(session, PIN)
        key, public = _pin_always_decryption_key(client, session)
        blob, secret = pkcs1_blob(public)
        log = CardLog(plug)
        assert _decrypt_with_context_pin(client, session, key, blob, log) == secret
        _assert_verify_then_operation(log.commands())


@pytest.mark.pcsc
def test_verify_and_operation_share_one_pcsc_transaction(pcsc_piv, vpcd) -> None:
    """Another PC/SC program sends commands to the card all the time; none of them may land
    between the VERIFY and the GENERAL AUTHENTICATE of a PIN-always decryption. Only the
    real transaction (SCardBeginTransaction in pcscd) can keep them out."""
    from smartcard import scard

    plug, slot = pcsc_piv.extras["plug"], pcsc_piv.extras["slot"]
    stop = threading.Event()
    other_program_sent = threading.Event()
    failures: list[str] = []

    def other_program() -> None:
        rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if rv != scard.SCARD_S_SUCCESS:
            failures.append(scard.SCardGetErrorMessage(rv))
            return
        try:
            rv, handle, _protocol = scard.SCardConnect(
                ctx, vpcd.reader(0), scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T1
            )
            if rv != scard.SCARD_S_SUCCESS:
                failures.append(scard.SCardGetErrorMessage(rv))
                return
            pci = scard.SCARD_PCI_T1
            while not stop.is_set():
                rv, _ = scard.SCardTransmit(handle, pci, list(STATUS_QUERY))
                if rv == scard.SCARD_S_SUCCESS:
                    other_program_sent.set()
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
        finally:
            scard.SCardReleaseContext(ctx)

    with Client(pcsc_piv.socket) as client:
        session = client.open_session(slot, rw=True)
        client.login(session, PIN)
        key, public = _pin_always_decryption_key(client, session)
        blob, secret = pkcs1_blob(public)
        log = CardLog(plug)
        others_answered: list[bytes] = []
        plug.after_answer.append(
            lambda apdu, rapdu: others_answered.append(apdu) if apdu == STATUS_QUERY else None
        )
        flood = threading.Thread(target=other_program, daemon=True)
        flood.start()
        try:
            assert other_program_sent.wait(10), f"the other program never got through {failures}"
            served_before = len(others_answered)
            for _ in range(5):
                assert _decrypt_with_context_pin(client, session, key, blob, log) == secret
                commands = log.commands()
                # The other program's commands may come before the VERIFY, never after it.
                first_verify = next(i for i, a in enumerate(commands) if _is_pin_verify(a))
                _assert_verify_then_operation(commands[first_verify:])
            # The other program was served between our transactions all along.
            assert len(others_answered) > served_before, "the other program was shut out"
        finally:
            stop.set()
            flood.join(10)


# --- 4. context-specific login, the card's own 6982 --------------------------------------------


def test_wrong_context_pin_is_refused_at_the_login_and_counts_one_try(piv) -> None:
    card, slot = piv.extras["card"], piv.extras["slot"]
    with Client(piv.socket) as client:
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9C)  # the demo's PIN-always signing key
        mech = {"mechanism": "CKM_ECDSA"}
        client.call("C_SignInit", {"h_session": session, "p_mechanism": mech, "h_key": key})
        with pytest.raises(PinIncorrectError) as wrong:
            client.call(
                "C_Login",
                {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": "000000"},
            )
        assert wrong.value.retries == 2
        assert pin_status(card) == b"\x63\xc2"  # the card counted exactly one try
        # A wrong VERIFY unverifies the card: the login is reported lost (docs/disconnect.md
        # §3); log in again. The operation waits for a right context PIN, which resets the
        # counter.
        assert _state(client, session) == "CKS_RO_PUBLIC_SESSION"
        client.login(session, PIN)
        client.call(
            "C_Login", {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": PIN}
        )
        signature = client.call("C_Sign", {"h_session": session, "p_data": b64(b"\x11" * 32)})
        assert len(unb64(signature["signature"])) == 64
        card.process(RESET)
        assert pin_status(card) == b"\x63\xc3"


def test_the_cards_own_6982_loses_every_login_on_the_token(piv) -> None:
    """Another program (or the card itself) dropped the verification behind tokend's back,
    with no reset for the transport to report: the card answers 6982 to an operation, and
    every application's login on that token is then reported lost."""
    card, demo, slot = (piv.extras[k] for k in ("card", "demo", "slot"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(piv.socket) as a, Client(piv.socket) as b:
        sa, sb = logged_in_session(a, slot), logged_in_session(b, slot)
        key, b_key = private_key(a, sa, ID_9D), private_key(b, sb, ID_9D)
        card.process(RESET)  # the card forgets the PIN; tokend is not told
        with pytest.raises(TokendError) as refused:
            a.decrypt(sa, key, "CKM_RSA_PKCS", blob)
        assert refused.value.ckr == CKR.CKR_USER_NOT_LOGGED_IN
        assert _state(a, sa) == "CKS_RO_PUBLIC_SESSION"
        assert _state(b, sb) == "CKS_RO_PUBLIC_SESSION"  # B's login is lost too
        with pytest.raises(UserNotLoggedInError):
            b.decrypt(sb, b_key, "CKM_RSA_PKCS", blob)
        b.login(sb, PIN)  # the sessions survive; a new login works
        assert b.decrypt(sb, b_key, "CKM_RSA_PKCS", blob) == secret


def test_tokends_own_refusal_loses_no_login(memory_piv) -> None:
    """The counterpart: a refusal that comes from tokend (B never logged in) leaves A's login
    and the card as they are."""
    card, demo, slot = (memory_piv.extras[k] for k in ("card", "demo", "slot"))
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as a, Client(memory_piv.socket) as b:
        sa = logged_in_session(a, slot)
        key = private_key(a, sa, ID_9D)
        sb = b.open_session(slot)
        with pytest.raises(TokendError):  # A's handle: not B's (answers as missing)
            b.decrypt(sb, key, "CKM_RSA_PKCS", blob)
        assert _state(a, sa) == "CKS_RO_USER_FUNCTIONS"
        assert pin_status(card) == b"\x90\x00"
        assert a.decrypt(sa, key, "CKM_RSA_PKCS", blob) == secret


def test_a_login_lost_between_init_and_operation_is_not_covered_by_the_card(memory_piv) -> None:
    """A starts a decryption and a signature, then logs out; B keeps the card verified. The
    card would answer A — tokend must not let it (CVE-2023-40660 class): its own login table
    is checked when the operation runs, not only at its Init."""
    card, demo, slot = (memory_piv.extras[k] for k in ("card", "demo", "slot"))
    blob, _ = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as a, Client(memory_piv.socket) as b:
        sa, sa2 = logged_in_session(a, slot), a.open_session(slot)
        logged_in_session(b, slot)
        key = private_key(a, sa, ID_9D)
        sign_key = private_key(a, sa, ID_9A)
        a.call(
            "C_DecryptInit",
            {"h_session": sa, "p_mechanism": {"mechanism": "CKM_RSA_PKCS"}, "h_key": key},
        )
        a.call(
            "C_SignInit",
            {"h_session": sa2, "p_mechanism": {"mechanism": "CKM_ECDSA"}, "h_key": sign_key},
        )
        a.logout(sa)
        assert pin_status(card) == b"\x90\x00"  # B's login keeps the card verified
        with pytest.raises(UserNotLoggedInError):
            a.call("C_Decrypt", {"h_session": sa, "p_encrypted_data": b64(blob)})
        with pytest.raises(UserNotLoggedInError):
            a.call("C_Sign", {"h_session": sa2, "p_data": b64(b"\x11" * 32)})


def test_context_login_needs_an_operation_on_a_pin_always_key(memory_piv) -> None:
    from tokend.errors import OperationNotInitializedError

    slot = memory_piv.extras["slot"]
    with Client(memory_piv.socket) as client:
        session = logged_in_session(client, slot)
        key = private_key(client, session, ID_9D)  # PIN once, not PIN-always
        context = {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": PIN}
        with pytest.raises(OperationNotInitializedError):
            client.call("C_Login", context)  # no operation at all
        client.call(
            "C_DecryptInit",
            {"h_session": session, "p_mechanism": {"mechanism": "CKM_RSA_PKCS"}, "h_key": key},
        )
        with pytest.raises(OperationNotInitializedError):
            client.call("C_Login", context)  # an operation, but not on a PIN-always key


class TransactionLog:
    """A transport to a card in memory whose exclusive section is recorded, so a driver
    test sees which commands shared one section (not a `nullcontext`)."""

    extended = True

    def __init__(self, card) -> None:  # type: ignore[no-untyped-def]
        self.card = card
        self.events: list[str | bytes] = []
        self._depth = 0

    def atr(self) -> bytes:
        return self.card.atr

    def transmit(self, apdu: bytes) -> bytes:
        self.events.append(bytes(apdu))
        return self.card.process(bytes(apdu))

    @contextlib.contextmanager
    def transaction(self):  # type: ignore[no-untyped-def]
        self._depth += 1
        if self._depth == 1:
            self.events.append("begin")
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.events.append("end")

    def close(self) -> None:
        pass


def test_the_driver_runs_verify_and_the_operation_in_one_exclusive_section() -> None:
    """The driver itself, below the daemon: a PIN-always signature with its context PIN is
    one exclusive section holding VERIFY and GENERAL AUTHENTICATE, and nothing else."""
    from tokend.drivers.piv import PivToken
    from tokend.model import Mechanism, ObjectKey
    from tokend.pkcs11 import CKM
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    provision_demo(card)
    transport = TransactionLog(card)
    token = PivToken.open(transport)
    assert token is not None
    token.login(bytearray(PIN.encode()))
    key = ObjectKey.parse("priv:9c")  # the demo's PIN-always signing key
    assert key in {o.key for o in token.objects()}
    transport.events.clear()
    token.sign(key, Mechanism(CKM.CKM_ECDSA), b"\x11" * 32, context_pin=bytearray(PIN.encode()))
    events = transport.events
    assert events[0] == "begin" and events[-1] == "end", events
    inside = events[1:-1]
    assert "begin" not in inside and "end" not in inside  # one section, not two
    assert isinstance(inside[0], bytes) and _is_pin_verify(inside[0])
    assert all(
        isinstance(a, bytes) and a[1] in (GENERAL_AUTHENTICATE, GET_RESPONSE) for a in inside[1:]
    )
