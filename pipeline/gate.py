"""One turn per conversation between the context load and the commit.

Each stage keeps the order of a conversation's turns, but stages overlap: without a gate the
next turn could load its context while the previous one is still being answered, and so miss
that turn's escalation or fallback answer. The context stage enters the gate for the turn's
conversation; dispatch leaves it after the commit, and every stage that drops a turn leaves
it too, so a failed turn never blocks its conversation. Waiting here only holds up later
turns of the same conversation; nothing downstream ever waits on the gate, so it cannot
deadlock.
"""

from __future__ import annotations

from collections.abc import Hashable

import trio


class ConversationGate:
    def __init__(self) -> None:
        self._busy: dict[Hashable, trio.Event] = {}

    def __len__(self) -> int:
        return len(self._busy)

    async def enter(self, key: Hashable) -> None:
        """Wait until no earlier turn of ``key`` is between context and commit; take its place."""
        while (busy := self._busy.get(key)) is not None:
            await busy.wait()
        self._busy[key] = trio.Event()
        await trio.lowlevel.checkpoint_if_cancelled()

    def leave(self, key: Hashable) -> None:
        """Let the next turn of ``key`` in (a no-op when the gate is not held)."""
        busy = self._busy.pop(key, None)
        if busy is not None:
            busy.set()
