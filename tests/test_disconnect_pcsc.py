"""Disconnect-rule scenarios over real pcscd + vpcd + pyscard."""

from __future__ import annotations

import pytest

from tests.disconnect_scenarios import *  # noqa: F403 - the scenarios are collected here

pytestmark = pytest.mark.pcsc


@pytest.fixture
def piv(pcsc_piv):  # type: ignore[no-untyped-def]
    return pcsc_piv
