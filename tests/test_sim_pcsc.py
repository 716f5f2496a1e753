"""SIM end-to-end and disconnect scenarios over real pcscd + vpcd + pyscard (T=0, reader 1)."""

from __future__ import annotations

import pytest

from tests.sim_fixtures import pcsc_sim  # noqa: F401 - fixture
from tests.sim_scenarios import *  # noqa: F403 - the scenarios are collected here

pytestmark = pytest.mark.pcsc


@pytest.fixture
def sim(pcsc_sim):  # type: ignore[no-untyped-def]  # noqa: F811
    return pcsc_sim
