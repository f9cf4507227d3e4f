"""The store as the stages see it: the calls of their small protocols, each retried with
backoff while the database is unavailable (``[database] unavailable_retry_s``),
so that a stage never knows about connections, errors of the database or retries."""

from __future__ import annotations

import attrs

from pipeline.concurrency import Backoff, with_retry
from stages.context import Contexts
from stages.dispatch import Commits
from stages.records import ClaimCommit, Committed, Turn, TurnContext


@attrs.frozen
class RetriedCommits:
    """:class:`stages.dispatch.Commits` over the store (or another ``Commits``)."""

    store: Commits
    retry: Backoff | None

    async def commit_claim(self, commit: ClaimCommit) -> Committed:
        return await with_retry(lambda: self.store.commit_claim(commit), self.retry, "dispatch")


@attrs.frozen
class RetriedContexts:
    """:class:`stages.context.Contexts`, retried (a required load's failure is final)."""

    loader: Contexts
    retry: Backoff | None

    async def load(self, turn: Turn) -> TurnContext:
        return await with_retry(lambda: self.loader.load(turn), self.retry, "context")
