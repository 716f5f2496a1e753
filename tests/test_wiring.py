"""`tokend.wiring`: the one list of applets and transports that the daemon, the test
harness and the benchmarks share."""

from __future__ import annotations

import logging

import pytest

from tokend.cli.tokend_main import ServeConfig, build_registry
from tokend.simulators.memory import MemoryReader
from tokend.simulators.piv import VirtualPivCard
from tokend.simulators.sim import VirtualSim
from tokend.wiring import APPLETS, SIMULATORS, TRANSPORTS, make_watcher


def test_every_applet_is_asked_and_a_piv_card_is_recognised() -> None:
    reader = MemoryReader("wiring test")
    reader.insert(VirtualPivCard())
    tokens = [opener(reader.connect()) for opener in APPLETS]
    assert [t.identity.applet for t in tokens if t is not None] == ["PIV"]


def test_a_sim_is_recognised_by_the_sim_driver_only() -> None:
    reader = MemoryReader("wiring test")
    reader.insert(VirtualSim())  # blank: the applet answers, nothing is provisioned yet
    tokens = [opener(reader.connect()) for opener in APPLETS]
    assert [t.identity.applet for t in tokens if t is not None] == ["SIM-PKI"]


def test_transport_names_keep_their_meaning() -> None:
    assert "pcsc" in TRANSPORTS and "piv" in SIMULATORS
    assert make_watcher("none") is None and make_watcher("") is None
    with pytest.raises(ValueError, match=r"unknown transport 'nfc' \(known: pcsc"):
        make_watcher("nfc")
    assert "sim" in SIMULATORS
    with pytest.raises(ValueError, match="cannot simulate 'toaster'"):
        build_registry(ServeConfig(transports=[], simulate=["toaster"]))


def test_a_missing_transport_library_disables_only_that_transport(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(options: object) -> object:
        raise ImportError("No module named 'smartcard'")

    monkeypatch.setitem(TRANSPORTS, "pcsc", broken)
    with caplog.at_level(logging.WARNING):
        assert make_watcher("pcsc") is None
    assert "PC/SC disabled" in caplog.text and "pyscard" in caplog.text
