"""End-to-end scenarios over BLE: the daemon's BLE driver on real bleak, a real
dbus-daemon, the fake BlueZ and the virtual BLE key carrying the demo PIV card."""

from __future__ import annotations

import pytest

from tests.e2e_scenarios import *  # noqa: F403 - the scenarios are collected here


@pytest.fixture
def piv(ble_piv):  # type: ignore[no-untyped-def]
    return ble_piv
