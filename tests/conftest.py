"""Shared fixtures. The daemon under test runs in its own thread and event loop, exactly
as the installed daemon would, and tests talk to it through its socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tokend.drivers.base import Watcher
from tokend.testing import ThreadDaemon, start_thread_daemon

# The daemon-in-a-thread harness is shipped for mail clients' CI too (tokend.testing).
RunningDaemon = ThreadDaemon


def start_daemon(socket: Path, watchers: list[Watcher]) -> RunningDaemon:
    return start_thread_daemon(socket, watchers)


def stop_daemon(running: RunningDaemon) -> None:
    running.stop()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    # Unix socket paths are limited to 108 bytes; tmp_path can be long.
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="tokend-"))
    return d / "tokend.sock"


class HookedCard:
    """A `VirtualCard` wrapper that runs test hooks before each command reaches the card
    (e.g. to pull the card while a GENERAL AUTHENTICATE is on its way), and hooks that see
    each command with the card's answer after the card has processed it (e.g. to pull the
    card once it has answered, before the daemon hands the answer on)."""

    def __init__(self, card, hooks: list, after: list | None = None) -> None:  # type: ignore[no-untyped-def]
        self.card = card
        self._hooks = hooks
        self._after = after if after is not None else []
        #: set when a hook pulled the card: the command on its way never reaches it
        self.pulled = False

    @property
    def atr(self) -> bytes:
        return self.card.atr

    def power_on(self) -> None:
        self.card.power_on()

    def power_off(self) -> None:
        self.card.power_off()

    def reset(self) -> None:
        self.card.reset()

    def process(self, apdu: bytes) -> bytes:
        for hook in list(self._hooks):
            hook(apdu)
        if self.pulled:  # the card left the reader before this command reached it
            return b"\x6f\x00"
        rapdu = self.card.process(apdu)
        for hook in list(self._after):
            hook(bytes(apdu), rapdu)
        return rapdu


class MemoryPlug:
    """Plug/unplug a card in the in-process reader."""

    kind = "memory"

    def __init__(self, reader) -> None:  # type: ignore[no-untyped-def]
        self.reader = reader
        self.on_transmit: list = []
        self.after_answer: list = []

    def insert(self, card) -> None:  # type: ignore[no-untyped-def]
        self.hooked = HookedCard(card, self.on_transmit, self.after_answer)
        self.reader.insert(self.hooked)

    def remove(self) -> None:
        if getattr(self, "hooked", None) is not None:
            self.hooked.pulled = True
        self.reader.remove()

    def reset_by_other_program(self) -> None:
        self.reader.reset_by_other_program()


class VpcdPlug:
    """Plug/unplug a card in vpcd reader 0 behind the real pcscd."""

    kind = "pcsc"

    def __init__(self, harness) -> None:  # type: ignore[no-untyped-def]
        self.harness = harness
        self.on_transmit: list = []
        self.after_answer: list = []
        self.connection = None

    def insert(self, card) -> None:  # type: ignore[no-untyped-def]
        self.remove()
        self.hooked = HookedCard(card, self.on_transmit, self.after_answer)
        self.connection = self.harness.plug(self.hooked, wait=False)

    def remove(self) -> None:
        if getattr(self, "hooked", None) is not None:
            self.hooked.pulled = True
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.unplug()

    def reset_by_other_program(self) -> None:
        """What another PC/SC client does: connect, then disconnect resetting the card."""
        from smartcard import scard

        rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        assert rv == scard.SCARD_S_SUCCESS
        try:
            rv, handle, _ = scard.SCardConnect(
                ctx,
                self.harness.reader(0),
                scard.SCARD_SHARE_SHARED,
                scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
            )
            assert rv == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(rv)
            assert scard.SCardDisconnect(handle, scard.SCARD_RESET_CARD) == 0
        finally:
            scard.SCardReleaseContext(ctx)


def wait_for_token(running: RunningDaemon, timeout: float = 10.0) -> int:
    """The slot id of the first token present, once the daemon has it: subscribe, look,
    then wait for the arrival event (no polling)."""
    import time

    from tokend.client import Client

    deadline = time.monotonic() + timeout
    with Client(running.socket) as client:
        client.subscribe()
        while True:
            slots = client.slot_list(token_present=True)
            if slots:
                return slots[0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the daemon did not see the token")
            try:
                client.next_event(timeout=remaining)
            except TimeoutError:
                raise TimeoutError("the daemon did not see the token") from None


def _piv_daemon(kind: str, request, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    """The daemon with a demo virtual PIV card, in the in-process reader or behind real
    pcscd + vpcd. ``extras``: card, demo, plug (insert/remove/reset), slot."""
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    demo = provision_demo(card, key_agreement=True)
    if kind == "memory":
        reader = MemoryReader("Memory Reader 0")
        plug: MemoryPlug | VpcdPlug = MemoryPlug(reader)
        plug.insert(card)
        watcher = MemoryWatcher(reader)
        running = start_daemon(sock_path, [watcher])
        # What a watcher reports, independent of the card (tests of swaps and late answers).
        running.extras.update(watcher=watcher, reader=reader)
    else:
        from tokend.drivers.pcsc import PcscWatcher

        harness = request.getfixturevalue("vpcd")
        plug = VpcdPlug(harness)
        plug.insert(card)
        from tokend.simulators.pcscd import wait_present

        wait_present(harness.reader(0))
        running = start_daemon(sock_path, [PcscWatcher(allow_virtual_readers=True)])
    try:
        slot = wait_for_token(running)
        running.extras.update(card=card, demo=demo, plug=plug, slot=slot)
        yield running
    finally:
        stop_daemon(running)
        if isinstance(plug, VpcdPlug):
            plug.remove()


@pytest.fixture
def memory_piv(request, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    yield from _piv_daemon("memory", request, sock_path)


@pytest.fixture
def pcsc_piv(request, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    yield from _piv_daemon("pcsc", request, sock_path)


from tests.ble_fixtures import ble_bus, ble_piv, bluetoothctl_shim, fake_bluez  # noqa: E402, F401
from tests.pcsc_fixtures import (  # noqa: E402, F401
    discard_private_pcscd,
    in_ci,
    pcscd_service,
    prepare_private_pcscd,
    private_pcscd_session,
    vpcd,
)


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    prepare_private_pcscd()


def pytest_collection_modifyitems(config, items) -> None:  # type: ignore[no-untyped-def]
    """pcscd-restart tests run where they stop only a pcscd of their own: in the child pytest
    of tests/test_pcscd_private.py when a private pcscd can run here (then that runner, not
    they, belongs to this session), else in this session (on a pcscd it started)."""
    from tokend.simulators.pcscd import private_pcscd_unavailable_reason

    if private_pcscd_session():
        drop = "pcscd_restart_runner"
    elif any(item.get_closest_marker("pcscd_restart") for item in items):
        drop = (
            "pcscd_restart"
            if private_pcscd_unavailable_reason() is None
            else ("pcscd_restart_runner")
        )
    else:
        return
    deselected = [item for item in items if item.get_closest_marker(drop)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker(drop)]


def pytest_unconfigure(config) -> None:  # type: ignore[no-untyped-def]
    discard_private_pcscd()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    """Under CI nothing skips silently: a skip is reported as a failure with its reason."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (CI=true), where every test must run: {reason}"
