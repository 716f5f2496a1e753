"""The asyncio client: concurrent calls on one connection, errors as classes, events."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import ID_9D, PIN, pkcs1_blob
from tokend.client import AsyncClient
from tokend.errors import NoEventError, PinIncorrectError
from tokend.pkcs11 import CKA


async def test_async_client_decrypts_and_hears_the_removal(memory_piv) -> None:
    demo, plug = memory_piv.extras["demo"], memory_piv.extras["plug"]
    blobs = [pkcs1_blob(demo.encryption_public_key) for _ in range(4)]
    async with await AsyncClient.connect(memory_piv.socket) as client:
        await client.subscribe()
        session = await client.open_session(0)
        with pytest.raises(PinIncorrectError) as wrong:
            await client.login(session, "111111")
        assert wrong.value.retries == 2
        await client.login(session, PIN)
        (key,) = await client.find_objects(
            session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: ID_9D}
        )
        # Several decryptions in flight on one connection, each on its own session.
        sessions = [await client.open_session(0) for _ in blobs]
        results = await asyncio.gather(
            *(
                client.decrypt(s, key, "CKM_RSA_PKCS", blob)
                for s, (blob, _) in zip(sessions, blobs, strict=True)
            )
        )
        assert results == [secret for _, secret in blobs]
        with pytest.raises(NoEventError):
            await client.wait_for_slot_event(dont_block=True)
        await asyncio.to_thread(plug.remove)
        event = await client.next_event(timeout=2)
        assert event["event"] == "left"
        assert await client.wait_for_slot_event() == 0
