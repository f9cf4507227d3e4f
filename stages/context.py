"""Context: the conversation and everything a decision needs, loaded five ways (the
loading itself is :mod:`pipeline.context`; here the stage and the rules, without I/O).

Dependencies stay ordered -- instance (from a cache, :mod:`pipeline.instances`) →
conversation → the user's messages stored only after the duplicate check (done upstream) --
and the independent loads (history, webhook config,
escalation state, recent AI interactions) run as ``context.mode`` says:

``sequential``  one query after another: the source documents' "before", kept as baseline
``parallel``    the loads fanned out over pooled connections: what the source documents did
``single``      one statement for the whole context: one round trip per turn
``batched``     turns ready together across conversations share one statement: fewer than
                one round trip per turn under load (``batch_size``, ``batch_delay_ms``)
``claimed``     loaded by the claim's own statement (:mod:`pipeline.claims`): no round trip

Every load has a timeout and a policy (``[context.loads.<name>]``): ``required`` fails the
turn (its conversation is given back and the turn redone after a pause); ``default`` goes on
with a safe default and records which load degraded and why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import attrs

from stages.records import Turn, TurnContext

#: what a load that may degrade falls back to
DEFAULTS: dict[str, Any] = {"history": "", "webhook": "", "escalation": False,
                            "interactions": ()}

Policy = Literal["required", "default"]


class Contexts(Protocol):
    """Where a turn's context comes from (``pipeline.context.ContextLoader``)."""

    async def load(self, turn: Turn) -> TurnContext: ...


def required_failure(failures: Sequence[tuple[str, str]],
                     policies: Mapping[str, Policy]) -> tuple[str, str] | None:
    """The first failed load whose policy is ``required`` (its name, and why the turn
    fails), or None: the others degrade to :data:`DEFAULTS`."""
    for name, reason in failures:
        if policies[name] == "required":
            return name, f"required load {name} failed: {reason}"
    return None


def context_of(conversation_id: int, values: Mapping[str, Any],
               degraded: tuple[tuple[str, str], ...]) -> TurnContext:
    """The context from the loaded (or defaulted) values; ``degraded``: which loads fell
    back to their default, and why."""
    return TurnContext(
        conversation_id=conversation_id, history=values["history"],
        webhook_url=values["webhook"], escalated=values["escalation"],
        recent_fallbacks=values["interactions"], degraded=degraded)


@attrs.define
class LoadContext:
    """The stage: load the turn's context (the loader retries with backoff while the
    database is unavailable). No other turn of the conversation is in flight anywhere: the
    claim (:mod:`pipeline.claims`) hands out one at a time and the previous one committed."""

    loader: Contexts

    async def __call__(self, turn: Turn) -> list[Turn]:
        return [attrs.evolve(turn, context=await self.loader.load(turn))]
