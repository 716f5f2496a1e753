"""End-to-end scenarios over real pcscd + vpcd + pyscard."""

from __future__ import annotations

import pytest

from tests.e2e_scenarios import *  # noqa: F403 - the scenarios are collected here

pytestmark = pytest.mark.pcsc


@pytest.fixture
def piv(pcsc_piv):  # type: ignore[no-untyped-def]
    return pcsc_piv
