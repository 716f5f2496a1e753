"""Disconnect-rule scenarios over the in-process reader."""

from __future__ import annotations

import pytest

from tests.disconnect_scenarios import *  # noqa: F403 - the scenarios are collected here


@pytest.fixture
def piv(memory_piv):  # type: ignore[no-untyped-def]
    return memory_piv
