"""A mode Service whose work is one background task (connect, probe, follow a topic):
started with the service, cancelled and awaited first thing when it stops, so nothing
it does overlaps what the subclass's ``on_stop`` tears down."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import mode


class BackgroundService(mode.Service):
    mundane_level = "debug"  # mode's "Starting..."/"Stopping..." lines

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._background: asyncio.Task[None] | None = None

    def background(self) -> Coroutine[Any, Any, None]:
        """The work, as a coroutine that runs until cancelled (or returns when done)."""
        raise NotImplementedError

    async def on_start(self) -> None:
        self._background = asyncio.get_running_loop().create_task(self.background())

    async def on_stop(self) -> None:
        task, self._background = self._background, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
