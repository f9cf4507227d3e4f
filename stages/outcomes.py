"""Outcomes: one JSON line per inbound message, and the counts the summary prints.

Canonical order, so that a virtual-clock replay writes a byte-identical file every time:
lines are written in the (virtual) time at which they were produced; lines produced at the
same instant are ordered by instance, sender, then their place in the log (file, line) and
message id. Trio varies the order in which ready tasks run, but under the virtual clock
everything that happens at one instant happens before time moves on, so this order does not
depend on scheduling. A conversation's lines keep the order the pipeline processed them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

import attrs
import trio

from pipeline.records import Outcome

_EXAMPLES = 10
_ORIGIN = re.compile(r"^(.*):(\d+)$")

SortKey = tuple[str, str, str, int, str]


def canonical_key(outcome: Outcome) -> SortKey:
    """Where a line goes among the lines of the same instant."""
    match = _ORIGIN.match(outcome.origin)
    place = (match.group(1), int(match.group(2))) if match else (outcome.origin, 0)
    return (outcome.instance or "", outcome.sender or "", *place, outcome.message_id or "")


@attrs.define
class OutcomeSink:
    """Writes the outcomes file (if any) and keeps the counts for the summary."""

    out: TextIO | None = None
    actions: Counter[str] = attrs.field(factory=Counter)
    per_instance: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    escalations: Counter[str] = attrs.field(factory=Counter)
    invalid: list[str] = attrs.field(factory=list)  # the first few, as "file:line: reason"
    total: int = 0
    lines: list[Any] = attrs.field(factory=list)  # for tests that parse what was written
    t0: float = 0.0
    #: a live run: every line is written and flushed at once (an operator tails the file)
    live: bool = False
    #: called with each outcome and the Trio time it was produced (e.g. the HTML report)
    observers: list[Callable[[Outcome, float], None]] = attrs.field(factory=list)
    _instant: float | None = None
    _pending: list[tuple[SortKey, str]] = attrs.field(factory=list)

    def record(self, outcome: Outcome, at: float | None = None) -> None:
        """Count ``outcome`` and queue its line; ``at`` defaults to Trio's clock now."""
        self.total += 1
        self.actions[outcome.action] += 1
        if outcome.instance:
            self.per_instance[(outcome.instance, outcome.action)] += 1
        if outcome.action == "escalated" and outcome.reason:
            self.escalations[outcome.reason] += 1
        if outcome.action == "invalid" and len(self.invalid) < _EXAMPLES:
            self.invalid.append(f"{outcome.origin}: {outcome.reason}")
        if self.out is None:
            return
        now = trio.current_time() if at is None else at
        if self._instant is not None and now != self._instant:
            self.flush()
        self._instant = now
        line = json.dumps(outcome.as_json(), ensure_ascii=False)
        self._pending.append((canonical_key(outcome), line))
        if self.live:
            self.flush()
            self.out.flush()

    def flush(self) -> None:
        """Write the lines of the current instant, in canonical order."""
        if self.out is not None:
            for _, line in sorted(self._pending):
                self.out.write(line + "\n")
        self._pending.clear()


async def collect_outcomes(
    recv: trio.MemoryReceiveChannel[Outcome], sink: OutcomeSink,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The last stage: drain every outcome into ``sink`` until all producers have closed."""
    with recv:
        task_status.started()
        async for outcome in recv:
            sink.record(outcome)
            for observe in sink.observers:
                observe(outcome, trio.current_time())
        sink.flush()
