"""End-to-end scenarios over virtual USB CCID tokens of three shapes: extended APDUs in
large messages, short APDUs (the ISO 7816 channel chains commands and pages answers), and
extended APDUs in 64-byte messages (XfrBlock chaining both ways)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningDaemon
from tests.e2e_scenarios import *  # noqa: F403 - the scenarios are collected here
from tests.usb_fixtures import usb_piv_daemon


@pytest.fixture(params=["extended", "short", "small"])
def piv(request, sock_path: Path) -> Iterator[RunningDaemon]:  # type: ignore[no-untyped-def]
    yield from usb_piv_daemon(sock_path, request.param)
