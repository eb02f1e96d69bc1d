"""Server pieces that need no model: admission control and error-field naming."""
from __future__ import annotations

import asyncio

from lmserve.server.errors import _loc_to_param
from lmserve.server.admission import Admission


def test_admission_runs_queues_refuses_and_hands_slots_over_in_order():
    async def run():
        adm = Admission(max_running=2, max_queued=2)
        assert await adm.acquire() and await adm.acquire() and adm.num_running == 2
        order = []

        async def waiter(name):
            assert await adm.acquire()
            order.append(name)

        w1 = asyncio.ensure_future(waiter("w1"))
        await asyncio.sleep(0)
        w2 = asyncio.ensure_future(waiter("w2"))
        await asyncio.sleep(0)
        assert adm.num_queued == 2
        assert not await adm.acquire()          # full: refused at once
        adm.release()
        await asyncio.sleep(0)
        assert order == ["w1"] and adm.num_running == 2 and adm.num_queued == 1
        # a cancelled waiter leaves the queue; its slot goes to nobody
        w2.cancel()
        await asyncio.gather(w2, return_exceptions=True)
        assert adm.num_queued == 0
        adm.release()
        adm.release()
        assert adm.num_running == 0
        await w1

    asyncio.run(run())


def test_admission_slot_handed_to_a_cancelled_waiter_is_passed_on():
    async def run():
        adm = Admission(max_running=1, max_queued=2)
        assert await adm.acquire()
        first = asyncio.ensure_future(adm.acquire())
        second = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0)
        adm.release()              # hands the slot to `first` ...
        first.cancel()             # ... which is cancelled before it runs: the slot must reach `second`
        await asyncio.gather(first, return_exceptions=True)
        assert await second and adm.num_running == 1 and adm.num_queued == 0

    asyncio.run(run())


def test_validation_locations_become_openai_params():
    assert _loc_to_param(("body", "messages", 0, "content")) == "messages[0].content"
    assert _loc_to_param(("body", "temperature")) == "temperature"
    assert _loc_to_param(("query", "level")) == "level"
    assert _loc_to_param(("body",)) is None
