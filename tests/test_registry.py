"""Slot registry behaviour that no transport test reaches directly."""

from __future__ import annotations

import asyncio

from tokend.drivers.base import Transport
from tokend.drivers.piv import PivToken
from tokend.errors import TransportError
from tokend.registry import SlotRegistry
from tokend.simulators.demo import provision_demo
from tokend.simulators.memory import MemoryReader, MemoryWatcher
from tokend.simulators.piv import VirtualPivCard


class FlakyWatcher(MemoryWatcher):
    """Like a PC/SC reader whose card is still powering up: the first connects fail."""

    def __init__(self, reader: MemoryReader, failures: int) -> None:
        super().__init__(reader)
        self.failures = failures

    async def connect(self, reader: str) -> Transport:
        if self.failures:
            self.failures -= 1
            raise TransportError("SCARD_E_NOT_TRANSACTED")
        return await super().connect(reader)


async def _registry(watcher: MemoryWatcher) -> SlotRegistry:
    registry = SlotRegistry([PivToken.open])
    registry.add_watcher(watcher)
    await registry.start()
    for _ in range(100):  # let the watcher deliver the arrival
        await registry.wait_settled()
        if registry.slots() and not registry._probes:
            break
        await asyncio.sleep(0.01)
    return registry


async def test_a_token_that_is_not_ready_at_once_is_probed_again() -> None:
    card = VirtualPivCard()
    provision_demo(card)
    reader = MemoryReader()
    reader.insert(card)
    registry = await _registry(FlakyWatcher(reader, failures=2))
    try:
        (slot,) = registry.slots()
        assert slot.token_present
        assert slot.instance is not None and slot.instance.generation == 1
    finally:
        await registry.stop()


async def test_a_token_that_never_answers_leaves_the_slot_empty() -> None:
    card = VirtualPivCard()
    reader = MemoryReader()
    reader.insert(card)
    registry = await _registry(FlakyWatcher(reader, failures=99))
    try:
        (slot,) = registry.slots()
        assert not slot.token_present
    finally:
        await registry.stop()


async def test_slot_ids_are_stable_across_removal() -> None:
    card = VirtualPivCard()
    provision_demo(card)
    reader = MemoryReader()
    reader.insert(card)
    registry = await _registry(MemoryWatcher(reader))
    try:
        (slot,) = registry.slots()
        reader.remove()
        reader.insert(card)
        for _ in range(100):
            await asyncio.sleep(0.01)
            await registry.wait_settled()
            if slot.token_present:
                break
        assert [s.slot_id for s in registry.slots()] == [slot.slot_id]
        assert slot.instance is not None and slot.instance.generation > 1
    finally:
        await registry.stop()
