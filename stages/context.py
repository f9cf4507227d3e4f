"""Context: the conversation and everything a decision needs, in one round trip.

The conversation is found or created, the independent loads (history, webhook config,
escalation state, recent AI interactions) run and the turn's messages are stored -- all in
one statement (:meth:`pipeline.store.Store.load_context`). The other ``context.mode`` s of the
source documents (sequential, parallel, batched) are not built yet.
"""

from __future__ import annotations

import attrs

from pipeline.gate import ConversationGate
from pipeline.records import Turn
from pipeline.store import Store


@attrs.define
class LoadContext:
    store: Store
    gate: ConversationGate
    history_chars: int
    recent_interactions: int

    async def __call__(self, turn: Turn) -> list[Turn]:
        await self.gate.enter(turn.key)  # left by dispatch, or by whoever drops the turn
        ctx = await self.store.load_context(turn, self.history_chars, self.recent_interactions)
        return [attrs.evolve(turn, context=ctx)]
