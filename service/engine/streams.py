"""The asyncio side of a request: its outputs, buffered for the reader that streams them out."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from tokenwire.service.engine.requests import Delta, Failure, Finished, Output


class RequestStream:
    """The asyncio side of one request: a bounded buffer of outputs, iterated by the servicer.

    Lives on the event loop; the step thread only reaches it through `call_soon_threadsafe`.
    Deltas that pile up past the bound are merged into the last queued delta (a slow reader gets
    fewer, larger chunks; memory stays bounded by the generation itself)."""

    def __init__(self, request_id: str, bound: int) -> None:
        self.request_id = request_id
        self._bound = bound
        self._items: deque[Output] = deque()
        self._wakeup = asyncio.Event()
        self.result: asyncio.Future[Finished | Failure] = asyncio.get_running_loop().create_future()

    def push(self, item: Output) -> None:
        last = self._items[-1] if self._items else None
        if isinstance(item, Delta) and isinstance(last, Delta) and len(self._items) >= self._bound:
            last.merge(item)
        else:
            self._items.append(item)
        if isinstance(item, Finished | Failure) and not self.result.done():
            self.result.set_result(item)
        self._wakeup.set()

    @property
    def done(self) -> bool:
        return self.result.done()

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Output]:
        while True:
            while not self._items:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self._items.popleft()
            yield item
            if isinstance(item, Finished | Failure):
                return
