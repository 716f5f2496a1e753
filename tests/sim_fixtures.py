"""Fixtures for the SIM tier: the daemon with a demo-provisioned virtual SIM in the in-process
reader, or on vpcd reader 1 behind real pcscd (reader 0 stays free for a PIV card)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HookedCard, RunningDaemon, start_daemon, stop_daemon, wait_for_token
from tokend.sim import commands as sim_commands


class SimHookedCard(HookedCard):
    """`HookedCard` that keeps the SIM's protocol (T=0) visible to the in-process reader."""

    @property
    def protocol(self):  # type: ignore[no-untyped-def]
        return self.card.protocol


SIM_PIN = "1234"
SIM_PUK = "1234567812345678"
SIM_READER = 1


class SimMemoryPlug:
    kind = "memory"

    def __init__(self, reader) -> None:  # type: ignore[no-untyped-def]
        self.reader = reader
        self.on_transmit: list = []

    def insert(self, card) -> None:  # type: ignore[no-untyped-def]
        self.hooked = SimHookedCard(card, self.on_transmit)
        self.reader.insert(self.hooked)

    def remove(self) -> None:
        if getattr(self, "hooked", None) is not None:
            self.hooked.pulled = True  # a command on its way when pulled never reaches it
        self.reader.remove()

    def reset_by_other_program(self) -> None:
        self.reader.reset_by_other_program()

    def reselect_by_other_program(self, card) -> None:  # type: ignore[no-untyped-def]
        """Another program's SELECT of the applet (no reset): the applet forgets the PIN."""
        self.select_by_other_program(card, None)

    def select_by_other_program(self, card, aid: bytes | None) -> None:  # type: ignore[no-untyped-def]
        """Another program's SELECT (of the PKI applet, or ``aid``) on the basic channel."""
        apdu = sim_commands.select_aid(*(() if aid is None else (aid,))).encode()
        assert card.process(apdu)[-2:] in (b"\x90\x00", b"\x61\x03")


class SimVpcdPlug:
    kind = "pcsc"

    def __init__(self, harness, reader: int = SIM_READER) -> None:  # type: ignore[no-untyped-def]
        self.harness = harness
        self.index = reader
        self.on_transmit: list = []
        self.connection = None

    def insert(self, card) -> None:  # type: ignore[no-untyped-def]
        self.remove()
        self.hooked = SimHookedCard(card, self.on_transmit)
        self.connection = self.harness.plug(self.hooked, reader=self.index, wait=False)

    def remove(self) -> None:
        if getattr(self, "hooked", None) is not None:
            self.hooked.pulled = True  # a command on its way when pulled never reaches it
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.unplug()

    def _other_program(self, apdu: bytes | None, disposition: int) -> None:
        from smartcard import scard

        rv, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        assert rv == scard.SCARD_S_SUCCESS
        try:
            rv, handle, protocol = scard.SCardConnect(
                ctx,
                self.harness.reader(self.index),
                scard.SCARD_SHARE_SHARED,
                scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1,
            )
            assert rv == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(rv)
            assert protocol == scard.SCARD_PROTOCOL_T0  # the virtual SIM is T=0 only
            if apdu is not None:
                rv, answer = scard.SCardTransmit(handle, protocol, list(apdu))
                assert rv == scard.SCARD_S_SUCCESS and bytes(answer[-2:]) in (
                    b"\x90\x00",
                    b"\x61\x03",
                )
            assert scard.SCardDisconnect(handle, disposition) == 0
        finally:
            scard.SCardReleaseContext(ctx)

    def reset_by_other_program(self) -> None:
        from smartcard import scard

        self._other_program(None, scard.SCARD_RESET_CARD)

    def reselect_by_other_program(self, card) -> None:  # type: ignore[no-untyped-def]
        self.select_by_other_program(card, None)

    def select_by_other_program(self, card, aid: bytes | None) -> None:  # type: ignore[no-untyped-def]
        from smartcard import scard

        apdu = sim_commands.select_aid(*(() if aid is None else (aid,))).encode()
        self._other_program(apdu, scard.SCARD_LEAVE_CARD)


def sim_daemon(
    kind: str, request, sock_path: Path, *, iccid: str | None = None
) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    """The daemon with a demo virtual SIM. ``extras``: card, demo, plug, slot."""
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.sim import VirtualSim
    from tokend.simulators.sim_demo import provision_sim_demo

    card = VirtualSim(iccid=iccid)
    demo = provision_sim_demo(card)
    if kind == "memory":
        reader = MemoryReader("Memory Reader 0")
        plug: SimMemoryPlug | SimVpcdPlug = SimMemoryPlug(reader)
        plug.insert(card)
        running = start_daemon(sock_path, [MemoryWatcher(reader)])
    else:
        from tokend.drivers.pcsc import PcscWatcher
        from tokend.simulators.pcscd import wait_present

        harness = request.getfixturevalue("vpcd")
        plug = SimVpcdPlug(harness)
        plug.insert(card)
        wait_present(harness.reader(SIM_READER))
        running = start_daemon(sock_path, [PcscWatcher(allow_virtual_readers=True)])
    try:
        slot = wait_for_token(running)
        running.extras.update(card=card, demo=demo, plug=plug, slot=slot)
        yield running
    finally:
        stop_daemon(running)
        if isinstance(plug, SimVpcdPlug):
            plug.remove()


@pytest.fixture
def memory_sim(request, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    yield from sim_daemon("memory", request, sock_path)


@pytest.fixture
def pcsc_sim(request, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    yield from sim_daemon("pcsc", request, sock_path)
