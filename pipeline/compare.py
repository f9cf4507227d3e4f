"""What-if: replay the same logs under two configs and report the messages whose outcome
differs (action, reason, reply) -- how an operator tunes a threshold or a keyword list
before changing production.

Both replays run on event time against fresh databases, so the only differences
are the configs'. Lines are matched by (instance, message id, occurrence): a redelivered
id is compared with its own counterpart.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

import attrs

EXAMPLES = 10
Key = tuple[str, str, int]


def _keyed(lines: Iterable[str]) -> dict[Key, dict[str, Any]]:
    seen: Counter[tuple[str, str]] = Counter()
    out: dict[Key, dict[str, Any]] = {}
    for line in lines:
        record = json.loads(line)
        ident = (record.get("instance") or "", record.get("message_id") or "")
        if not ident[1]:  # invalid lines carry no id: the same in both runs by design
            continue
        seen[ident] += 1
        out[(*ident, seen[ident])] = record
    return out


def _view(record: dict[str, Any] | None) -> dict[str, Any]:
    if record is None:
        return {"action": "(missing)"}
    return {k: record.get(k) for k in ("action", "reason", "reply")}


@attrs.frozen
class Difference:
    instance: str
    message_id: str
    sender: str
    before: dict[str, Any]
    after: dict[str, Any]


@attrs.frozen
class Comparison:
    compared: int
    differences: tuple[Difference, ...]

    @property
    def transitions(self) -> Counter[tuple[str, str]]:
        return Counter((d.before["action"], d.after["action"]) for d in self.differences)


def compare_outcomes(a: str, b: str) -> Comparison:
    """Compare two outcomes files' contents (JSON lines)."""
    left, right = _keyed(a.splitlines()), _keyed(b.splitlines())
    diffs = []
    for key in sorted(set(left) | set(right)):
        before, after = _view(left.get(key)), _view(right.get(key))
        if before != after:
            record = left.get(key) or right.get(key) or {}
            diffs.append(Difference(key[0], key[1], record.get("sender") or "", before, after))
    return Comparison(len(set(left) | set(right)), tuple(diffs))


def render(comparison: Comparison, name_a: str, name_b: str) -> str:
    """The text the CLI prints."""
    diffs = comparison.differences
    lines = [f"compared {comparison.compared} messages: {len(diffs)} differ "
             f"({name_a} -> {name_b})"]
    for (before, after), n in comparison.transitions.most_common():
        lines.append(f"  {n:>5} x {before} -> {after}")
    if diffs:
        lines.append("examples:")
    for d in diffs[:EXAMPLES]:
        lines.append(f"  {d.instance}/{d.sender} {d.message_id}")
        for label, side in ((name_a, d.before), (name_b, d.after)):
            reply = (side.get("reply") or "")[:70]
            reason = side.get("reason") or ""
            lines.append(f"    {label}: {side['action']}"
                         + (f" ({reason})" if reason else "") + (f" {reply!r}" if reply else ""))
    return "\n".join(lines)

