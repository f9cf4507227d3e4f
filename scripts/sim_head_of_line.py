#!/usr/bin/env python3
"""Head-of-line simulation: does one slow conversation delay everyone else?

The whole pipeline (real stages, real PostgreSQL, the claimer) on the virtual clock, fed
like a live process: one user writes every ``--slow-every`` seconds to a responder that
takes ``--slow-answer`` seconds (a dead model); ``--others`` users write every 10 s
(staggered) to a responder answering in 0.5 s. Printed per minute: how long the other
users waited for their outcome (from the message's arrival), and what happened to the slow
user's messages. Before the database owned the work this grew from 0.05 s to ~108 s
within a minute (issue 11); the slow user's backlog now waits in the inbox.

    .venv/bin/python scripts/sim_head_of_line.py            # 5 virtual minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.claims import WorkClock
from pipeline.config import Config, parse_config
from pipeline.engine import Inlets, Pipeline
from pipeline.store import Store
from pipeline.vclock import VirtualClock
from stages.outcomes import OutcomeSink
from stages.records import Outcome, RawEvent, Reply, Turn

BASE = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
PHONE_ID = "1122334455667"
SLOW = "5599900000000"


def body(sender: str, message_id: str, text: str, at: dt.datetime) -> dict[str, Any]:
    message = {"from": sender, "id": message_id, "timestamp": str(int(at.timestamp())),
               "type": "text", "text": {"body": text}}
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550000000", "phone_number_id": PHONE_ID},
             "contacts": [{"profile": {"name": sender}, "wa_id": sender}],
             "messages": [message]}
    return {"object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}]}


@attrs.frozen
class Plan:
    minutes: float = 5.0
    others: int = 50
    slow_every_s: float = 2.0
    slow_answer_s: float = 30.0
    other_answer_s: float = 0.5

    def events(self) -> list[tuple[float, str, str]]:
        """(offset s, sender, message id), in time order."""
        end = self.minutes * 60
        out: list[tuple[float, str, str]] = []
        t, n = 0.0, 0
        while t < end:
            out.append((t, SLOW, f"wamid.slow.{n}"))
            t, n = t + self.slow_every_s, n + 1
        for k in range(self.others):
            t, n = (k * 10.0) / self.others, 0
            while t < end:
                out.append((t, f"55119{k:08d}", f"wamid.o{k}.{n}"))
                t, n = t + 10.0, n + 1
        return sorted(out)


@attrs.define
class TimedResponder:
    plan: Plan
    calls: Counter[str] = attrs.Factory(Counter)

    async def answer(self, turn: Turn, history: str) -> Reply:
        slow = turn.sender == SLOW
        self.calls["slow" if slow else "other"] += 1
        await trio.sleep(self.plan.slow_answer_s if slow else self.plan.other_answer_s)
        return Reply("An answer.", 0.9, False, "sim")


def config(max_active: int) -> Config:
    return parse_config({
        "pipeline": {"max_active_conversations": max_active, "channel_capacity": 4},
        "instances": [{"name": "demo", "phone_number_id": PHONE_ID}],
    }, "sim")


@attrs.frozen
class Result:
    waits: dict[int, list[float]]  # minute → the other users' waits (s)
    slow: Counter[str]
    other_outcomes: int
    other_messages: int
    calls: Counter[str]


async def simulate(store: Store, plan: Plan, max_active: int = 8) -> Result:
    """Run ``plan`` through the pipeline on ``store``; needs a VirtualClock."""
    events = plan.events()
    sent_at: dict[str, float] = {}
    t0 = trio.current_time()
    waits: dict[int, list[float]] = {}
    slow: Counter[str] = Counter()
    others = 0

    def observe(outcome: Outcome, at: float) -> None:
        nonlocal others
        if outcome.sender == SLOW:
            slow[outcome.action] += 1
            return
        sent = sent_at[outcome.message_id or ""]
        others += 1
        waits.setdefault(int(sent // 60), []).append(at - t0 - sent)

    sink = OutcomeSink(observers=[observe])
    responder = TimedResponder(plan)

    async def source(inlets: Inlets) -> None:
        for offset, sender, message_id in events:
            await trio.sleep_until(t0 + offset)
            at = BASE + dt.timedelta(seconds=offset)
            sent_at[message_id] = offset
            await inlets.raw.send(RawEvent(at, "cloud-api", body(sender, message_id,
                                                                  f"hello {message_id}", at)))

    def at(when: dt.datetime) -> float:
        return t0 + (when - BASE).total_seconds()

    def now() -> dt.datetime:
        return BASE + dt.timedelta(seconds=trio.current_time() - t0)

    pipeline = Pipeline(config(max_active), store, sink, clock=WorkClock(now, at),
                        responders={"demo": responder})
    await pipeline.run(source)
    return Result(waits, slow, others, sum(1 for e in events if e[1] != SLOW), responder.calls)


def table(result: Result) -> str:
    lines = ["minute  other users' wait: p50 s   p95 s   max s   (n)"]
    for minute, waits in sorted(result.waits.items()):
        q = statistics.quantiles(waits, n=20) if len(waits) > 1 else waits * 19
        lines.append(f"{minute:6d}  {statistics.median(waits):24.2f} {q[18]:7.2f} "
                     f"{max(waits):7.2f}   ({len(waits)})")
    lines.append(f"other users: {result.other_outcomes} outcomes for {result.other_messages} "
                 f"messages; slow user: {dict(sorted(result.slow.items()))}; responder calls: "
                 f"{dict(result.calls)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--others", type=int, default=50)
    parser.add_argument("--slow-every", type=float, default=2.0)
    parser.add_argument("--slow-answer", type=float, default=30.0)
    args = parser.parse_args()
    plan = Plan(args.minutes, args.others, args.slow_every, args.slow_answer)

    from pipeline.config import load_config
    from pipeline.database import open_store

    async def run() -> None:
        async with open_store(load_config(None).database, dbname="sim_head_of_line",
                              fresh=True, keep=False) as store:
            result = await simulate(store, plan)
        print(f"one user every {plan.slow_every_s:g} s to a responder taking "
              f"{plan.slow_answer_s:g} s; {plan.others} others every 10 s (answer "
              f"{plan.other_answer_s:g} s); {plan.minutes:g} virtual minutes")
        print(table(result))

    trio.run(run, clock=VirtualClock())


if __name__ == "__main__":
    main()
