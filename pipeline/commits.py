"""The turns' commits, grouped: the commits of conversations whose turns end while another
commit is being written go together in one statement (:meth:`Store.commit_claims`) -- one
round trip, one transaction and one WAL flush for many turns, the turns encoded as one JSON
parameter. Anything but an ordinary first commit (a lease taken over, a commit written
before) makes the batch write nothing, and its turns are committed one by one with the
single statement, which tells those cases apart -- so every turn gets exactly the answer it
would get alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
import trio

from pipeline.grouped import Grouped, each_or_alone
from stages.records import ClaimCommit, Committed


class BatchCommits(Protocol):
    async def commit_claim(self, commit: ClaimCommit) -> Committed: ...

    async def commit_claims(self, commits: Sequence[ClaimCommit]) -> list[Committed]: ...


@attrs.define(eq=False)
class SharedCommits:
    """:class:`stages.dispatch.Commits` with group commit (run :meth:`run` in a nursery,
    :meth:`close` when the dispatch stage has ended)."""

    store: BatchCommits
    writers: int = 2
    max_batch: int = 64
    on_batch: Callable[[int], None] = lambda size: None
    grouped: Grouped[ClaimCommit, Committed] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.grouped = Grouped(self._flush, writers=self.writers, max_batch=self.max_batch,
                               on_batch=self.on_batch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await self.grouped.run(task_status=task_status)

    def close(self) -> None:
        self.grouped.close()

    async def commit_claim(self, commit: ClaimCommit) -> Committed:
        return await self.grouped(commit)

    async def _flush(self, commits: list[ClaimCommit]) -> list[Committed | Exception]:
        return await each_or_alone(commits, self._write)

    async def _write(self, commits: Sequence[ClaimCommit]) -> list[Committed]:
        if len(commits) == 1:
            return [await self.store.commit_claim(commits[0])]
        return await self.store.commit_claims(commits)
