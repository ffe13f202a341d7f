"""roles.HeapFreezer: the objects alive when the role is first ready leave the collector's
generations (gc.freeze), once, and not before it is ready."""
from __future__ import annotations

import asyncio
import gc

from aggregator.roles import HeapFreezer


def test_the_heap_is_frozen_once_the_role_is_ready_and_not_before():
    ready = [False]

    async def scenario() -> tuple[int, int, int]:
        freezer = HeapFreezer(lambda: ready[0])
        freezer.POLL_S = 0.01
        task = asyncio.get_running_loop().create_task(freezer.background())
        await asyncio.sleep(0.05)
        before = gc.get_freeze_count()
        ready[0] = True
        await asyncio.wait_for(task, 5)
        return before, freezer.frozen, gc.get_freeze_count()

    gc.unfreeze()
    try:
        before, frozen, after = asyncio.run(scenario())
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
    assert before == 0  # not ready: nothing frozen
    assert frozen > 10_000 and after > 10_000  # the imports alone are tens of thousands of objects
