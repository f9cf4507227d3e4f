"""The full-pipeline benchmark: the four context modes side by side, behind a latency proxy,
against the database's own limit (issue 7).

What it does, and why each part is there:

* **Server.** A throwaway embedded PostgreSQL (``pipeline.pgcluster``, *fsync off*: nothing
  here must survive, and the disk is not what is measured) in a temporary directory, removed
  at the end even on error or Ctrl-C. Each run gets a fresh database cloned from a migrated
  template, so every run starts from the same state and runs are comparable.
* **Latency.** Between the pipeline and PostgreSQL sits ``scripts/latency_proxy.py``,
  ``--delay-ms`` one way (default 1; 0 = no proxy, the Unix socket directly), so a round trip
  costs what it would against a database on another machine. By default the proxy runs as
  its own process: in this process it would take CPU and event-loop turns from the pipeline
  it measures (``--proxy loop`` runs it here anyway). ``rtt_ms`` is the measured median of
  ``SELECT 1`` through the same path.
* **Workload.** ``--conversations`` x ``--messages`` Cloud API bodies from ``--seed``: bursts
  (a sender's messages 100-500 ms apart fold into one turn), redeliveries (the same message
  id again, 1-20 s later), a share of escalation requests, and texts the rules responder
  answers or does not. ``received_at`` spreads the workload in time; the source pushes as
  fast as the pipeline accepts. The whole pipeline runs in this process: intake -> inbox ->
  claimer -> context -> ... -> dispatch (transport ``dry``).
* **Recorded time.** Turns are decided on ``received_at``, not on the wall clock (which is
  long past the workload's times): a finite run's default clock,
  :class:`pipeline.claims.Watermark`, is the newest ``received_at`` the inbox is complete up
  to (intake writes in arrival order), and past every deadline once the input has ended. A
  claim therefore forms exactly the turns the burst rule makes of the whole workload,
  whatever the timing, as the burst buffer did before the database owned the work.
* **Modes.** ``sequential``, ``parallel``, ``single``, ``batched``, ``claimed`` --
  interleaved, the order rotated on each of ``--repeat`` repetitions, medians reported.
* **Ceiling.** The SQL a turn needs in mode ``single`` with no stages around it: the inbox
  rows are written beforehand (untimed, as intake would), then the real
  :class:`pipeline.claims.Claimer` claims due conversations (``Store.claim``, one statement
  for as many conversations as are due and fit under ``max_active_conversations``) and
  ``--ceiling-tasks`` tasks take the claimed turns, each ``Store.load_context`` then
  ``Store.commit_claim`` (the fenced commit that closes the inbox rows and ends the lease).
  Each turn pays its share of a claim, a context load and a commit: the database's own limit
  on this machine, in messages/s, so each mode can be read as a fraction of it.
* **Round trips.** Every statement the store sends (claims, context loads, commits, intake
  writes, releases); ``claims / msg`` is the claims' share of them.
* **Claim to commit.** From the claim that took a conversation's turn (its statement
  returned) to the commit that ended it: the time a turn holds its conversation. (The
  conversation gate, whose wait this bench used to subtract from the context stage, is gone:
  the claim hands out one turn per conversation, so the context stage's time is the load.)
* **End to end.** ``e2e`` runs from the moment the message's turn could first be formed (the
  event that closed it -- by passing its deadline in recorded time, or filling it -- entered
  the pipeline; its own entry for a duplicate) to its outcome: the burst window itself is a
  wait by design and is left out. ``e2e_with_burst`` counts from the message's own entry.

Run (a couple of minutes on 2 cores)::

    cd /work/main && .venv/bin/python scripts/bench.py
    .venv/bin/python scripts/bench.py --delay-ms 0 --json /tmp/bench.json
    .venv/bin/python scripts/bench.py --conversations 2000 --modes single,batched --repeat 1
    .venv/bin/python scripts/bench.py --soak --modes single --repeat 1

Progress goes to stderr, the Markdown tables to stdout.

The modules, in the order a run uses them: ``settings`` (options, bounds, the pipeline's
config), ``workload`` (the messages), ``server`` (the database, fresh databases, the proxy
route), ``tracking`` (recorded time, turns, end-to-end timing), ``measure`` (round trips,
CPU, memory), ``modes`` and ``ceiling`` (one run of each kind), ``runs`` (all of them, the
medians and targets), ``report`` (what is printed), ``cli`` (the command line).
"""

from pipeline.bench.ceiling import plan_ceiling
from pipeline.bench.cli import main
from pipeline.bench.measure import ServerCpu, measure_rtt
from pipeline.bench.report import log, report
from pipeline.bench.runs import run_bench
from pipeline.bench.server import Route, Server, fresh_database, prepare_server, routed
from pipeline.bench.settings import (
    INSTANCE,
    MODES,
    PHONE_ID,
    RULES,
    BenchError,
    Settings,
    Workload,
    bench_config,
)
from pipeline.bench.workload import BenchEvent, generate

__all__ = [
    "INSTANCE", "MODES", "PHONE_ID", "RULES", "BenchError", "BenchEvent", "Route", "Server",
    "ServerCpu",
    "Settings", "Workload", "bench_config", "fresh_database", "generate", "log", "main",
    "measure_rtt", "plan_ceiling", "prepare_server", "report", "routed", "run_bench",
]
