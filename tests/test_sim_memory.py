"""SIM end-to-end and disconnect scenarios over the in-process reader."""

from __future__ import annotations

import pytest

from tests.sim_fixtures import memory_sim  # noqa: F401 - fixture
from tests.sim_scenarios import *  # noqa: F403 - the scenarios are collected here


@pytest.fixture
def sim(memory_sim):  # type: ignore[no-untyped-def]  # noqa: F811
    return memory_sim
