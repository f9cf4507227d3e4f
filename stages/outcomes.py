"""Outcomes: one JSON line per inbound message, and the counts the summary prints."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, TextIO

import attrs
import trio

from pipeline.records import Outcome

_EXAMPLES = 10


@attrs.define
class OutcomeSink:
    """Writes the outcomes file (if any) and keeps the counts for the summary."""

    out: TextIO | None = None
    actions: Counter[str] = attrs.field(factory=Counter)
    per_instance: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    escalations: Counter[str] = attrs.field(factory=Counter)
    invalid: list[str] = attrs.field(factory=list)
    total: int = 0
    lines: list[Any] = attrs.field(factory=list)  # for tests that parse what was written

    def record(self, outcome: Outcome) -> None:
        self.total += 1
        self.actions[outcome.action] += 1
        if outcome.instance:
            self.per_instance[(outcome.instance, outcome.action)] += 1
        if outcome.action == "escalated" and outcome.reason:
            self.escalations[outcome.reason] += 1
        if outcome.action == "invalid" and len(self.invalid) < _EXAMPLES:
            self.invalid.append(f"{outcome.origin}: {outcome.reason}")
        if self.out is not None:
            self.out.write(json.dumps(outcome.as_json(), ensure_ascii=False) + "\n")


async def collect_outcomes(
    recv: trio.MemoryReceiveChannel[Outcome], sink: OutcomeSink,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The last stage: drain every outcome into ``sink`` until all producers have closed."""
    with recv:
        task_status.started()
        async for outcome in recv:
            sink.record(outcome)
