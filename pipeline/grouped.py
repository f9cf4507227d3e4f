"""Group commit: the calls that arrive while earlier ones are being written go together in
the next write -- one statement and one commit for all of them -- and each caller gets its
own result back. Used for live intake's writes (:mod:`pipeline.intake`) and for the turns'
commits (:mod:`pipeline.commits`).

At low load a call leaves at once: ``writers`` writes may be under way and nobody waits for
a batch to fill, so a lone call costs no latency; under load the batches grow by
themselves to what arrived during one write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import attrs
import trio

from pipeline.db import DatabaseUnavailable

T = TypeVar("T")
R = TypeVar("R")

#: what a batch's write returns for each of its items, in order: a result or the error the
#: item's caller raises
Flush = Callable[[list[T]], Awaitable[list["R | Exception"]]]


@attrs.define(eq=False)
class _Job(Generic[T, R]):
    item: T
    done: trio.Event = attrs.Factory(trio.Event)
    outcome: R | Exception | None = None
    finished: bool = False


@attrs.define(eq=False)
class Grouped(Generic[T, R]):
    """Callers' items written in groups by ``writers`` tasks (:meth:`run`, in a nursery,
    until :meth:`close`). A caller cancelled while it waits does not stop its batch: its
    item may be written without anybody told, as when a connection drops after a commit --
    every use makes that safe (redelivery is deduplicated; a commit is fenced and
    idempotent). A batch that never finishes (the writer cancelled) fails its callers with
    :class:`DatabaseUnavailable`."""

    flush: Flush[T, R]
    writers: int = 2
    max_batch: int = 100
    #: told each batch's size as it leaves (the metrics count batches)
    on_batch: Callable[[int], None] = lambda size: None
    _send: trio.MemorySendChannel[_Job[T, R]] = attrs.field(init=False)
    _recv: trio.MemoryReceiveChannel[_Job[T, R]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[_Job[T, R]](self.max_batch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """The writers, until :meth:`close` (whatever is queued by then is written)."""
        async with self._recv, trio.open_nursery() as nursery:
            for _ in range(self.writers):
                nursery.start_soon(self._writer, self._recv.clone())
            task_status.started()

    def close(self) -> None:
        """No more items: the writers finish the queued ones and end."""
        self._send.close()

    async def __call__(self, item: T) -> R:
        """Write ``item`` with whatever else is waiting; its result, or its error raised."""
        job = _Job[T, R](item)
        await self._send.send(job)
        await job.done.wait()
        if isinstance(job.outcome, Exception):
            raise job.outcome
        return job.outcome  # type: ignore[return-value]  # set with finished

    async def _writer(self, jobs: trio.MemoryReceiveChannel[_Job[T, R]]) -> None:
        async with jobs:
            async for first in jobs:
                batch = [first]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(jobs.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                self.on_batch(len(batch))
                try:
                    try:
                        outcomes = await self.flush([job.item for job in batch])
                    except Exception as exc:  # the whole batch failed: as its callers would
                        outcomes = [exc] * len(batch)
                    for job, outcome in zip(batch, outcomes, strict=True):
                        job.outcome, job.finished = outcome, True
                finally:  # cancelled too: nobody waits forever for a batch that is gone
                    for job in batch:
                        if not job.finished:
                            job.outcome = DatabaseUnavailable("the write did not finish")
                        job.done.set()


async def each_or_alone(items: Sequence[T],
                        write: Callable[[Sequence[T]], Awaitable[Sequence[R]]]
                        ) -> list[R | Exception]:
    """``write`` all items in one statement; when the statement fails for anything but an
    unavailable database (the data refused, a conflict, a bug in building it), write them
    one by one, so that only the item at fault gets the error -- as if each had been written
    alone. An unavailable database fails them all (each caller retries or answers 503)."""
    try:
        return list(await write(items))
    except DatabaseUnavailable as exc:
        return [exc] * len(items)
    except Exception as exc:
        if len(items) == 1:
            return [exc]
    alone: list[R | Exception] = []
    for item in items:
        alone += await each_or_alone([item], write)
    return alone
