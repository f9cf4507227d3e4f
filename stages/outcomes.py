"""Outcomes: one JSON line per inbound message, and the counts the summary prints.

A live run writes each line as it is produced (an operator tails the file). A replay writes
them in a canonical order, so that the same log and config give a byte-identical file
whatever the machine's speed or Trio's scheduling: by the recorded time of the message (of
the event, for one that ended at intake; a bad line takes the time of the line before it),
then instance, sender, place in the log (file, line) and message id. A conversation's
lines are therefore in the order its messages were received. The lines are held until the
end of the run; past :data:`SPILL_LINES` they are sorted into temporary files and merged.
"""

from __future__ import annotations

import datetime as dt
import heapq
import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, TextIO

import attrs
import trio

from stages.records import Outcome

_EXAMPLES = 10
_ORIGIN = re.compile(r"^(.*):(\d+)$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
#: lines held in memory before a sorted run of them goes to a temporary file
SPILL_LINES = 100_000

SortKey = tuple[int, str, str, str, int, str, str]


def canonical_key(outcome: Outcome, line: str = "") -> SortKey:
    """Where a line goes in a replay's outcomes file."""
    match = _ORIGIN.match(outcome.origin)
    place = (match.group(1), int(match.group(2))) if match else (outcome.origin, 0)
    at = -1 if outcome.at is None else (outcome.at - _EPOCH) // _MICROSECOND
    return (at, outcome.instance or "", outcome.sender or "", *place, outcome.message_id or "",
            line)


@attrs.define
class OutcomeSink:
    """Writes the outcomes file (if any) and keeps the counts for the summary."""

    out: TextIO | None = None
    actions: Counter[str] = attrs.field(factory=Counter)
    per_instance: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    escalations: Counter[str] = attrs.field(factory=Counter)
    #: status webhooks by (instance, status): a reply WhatsApp refused shows as "failed"
    receipts: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    invalid: list[str] = attrs.field(factory=list)  # the first few, as "file:line: reason"
    total: int = 0
    #: a live run: every line is written and flushed at once (an operator tails the file)
    live: bool = False
    #: called with each outcome and the Trio time it was produced (e.g. the HTML report)
    observers: list[Callable[[Outcome, float], None]] = attrs.field(factory=list)
    _pending: list[SortKey] = attrs.field(factory=list)
    _runs: list[IO[str]] = attrs.field(factory=list)

    def record(self, outcome: Outcome, at: float | None = None) -> None:
        """Count ``outcome`` and write or queue its line."""
        self.total += 1
        self.actions[outcome.action] += 1
        if outcome.instance:
            self.per_instance[(outcome.instance, outcome.action)] += 1
        if outcome.action == "escalated" and outcome.reason:
            self.escalations[outcome.reason] += 1
        if outcome.receipt:
            self.receipts[(outcome.instance or "", outcome.receipt)] += 1
        if outcome.action == "invalid" and len(self.invalid) < _EXAMPLES:
            self.invalid.append(f"{outcome.origin}: {outcome.reason}")
        if self.out is None:
            return
        line = json.dumps(outcome.as_json(), ensure_ascii=False)
        if self.live:
            self.out.write(line + "\n")
            self.out.flush()
            return
        self._pending.append(canonical_key(outcome, line))
        if len(self._pending) >= SPILL_LINES:
            self._spill()

    def _spill(self) -> None:
        run = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 (read at flush)
        for key in sorted(self._pending):
            run.write(json.dumps(key, ensure_ascii=False) + "\n")
        run.seek(0)
        self._runs.append(run)
        self._pending.clear()

    def flush(self) -> None:
        """Write every queued line, in canonical order (the end of a replay)."""
        if self.out is None:
            return
        runs: list[Iterator[SortKey]] = [iter(sorted(self._pending))]
        runs += [(tuple(json.loads(text)) for text in run) for run in self._runs]  # type: ignore[misc]
        for key in heapq.merge(*runs):
            self.out.write(key[-1] + "\n")
        for run in self._runs:
            run.close()
        self._pending.clear()
        self._runs.clear()


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
