"""``pipeline run``'s source: the webhook server until shutdown.

A webhook only writes the inbox (before it answers 200) and wakes this process's claimer;
the work is taken from the database by whichever process claims it, so nothing is handed
over in memory and nothing needs recovering at start: rows left pending by a process that
died are claimed again once their lease has expired.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import partial
from typing import Any

import trio
from loguru import logger

from pipeline.config import Config
from pipeline.console.app import Console
from pipeline.console.queries import ConsoleStore
from pipeline.db import Pool, open_pool
from pipeline.engine import Inlets, Source
from pipeline.intake import LiveIntake, SharedWrites
from pipeline.metrics import Metrics
from pipeline.prometheus import Exporter, problems
from pipeline.recorded_log import LogRecorder, RecordDirError
from pipeline.rules import burst_rules, instance_directory, phone_rule
from pipeline.store import Store
from pipeline.webhook import WebhookApp, serve
from stages.intake import Accepted, redelivered
from stages.outcomes import OutcomeSink

ACK_CONNECTIONS = 2


def live_source(cfg: Config, store: Store, metrics: Metrics,
                ready: Callable[[str], None] = lambda url: None, *,
                serve_webhooks: bool = True, sink: OutcomeSink | None = None) -> Source:
    """The source of ``pipeline run``; ``ready`` gets the server's URL once it listens."""

    async def source(inlets: Inlets) -> None:
        if not (cfg.webhook.enabled and serve_webhooks):
            logger.info("no webhook server in this process ([webhook] enabled = false or "
                        "the webhook role is off): waiting for a signal")
            ready("")
            await inlets.stopping.wait()
            return
        recorder = LogRecorder(cfg.webhook.record_dir) if cfg.webhook.record_dir else None
        if recorder is not None:
            try:
                recorder.check()
            except RecordDirError as exc:  # messages are never held up by the recording
                logger.warning("{}: webhooks are served, but their bodies are not recorded "
                               "until it is fixed", exc)
        if not cfg.webhook.app_secret:
            logger.warning("[webhook] app_secret is empty: Cloud API signatures are not checked")
        try:
            # the acknowledgements get connections of their own, so that they never queue
            # behind the turns' work (the pipeline then uses pool_size + ACK_CONNECTIONS)
            async with open_pool(store.pool.conninfo, ACK_CONNECTIONS,
                                 connect_timeout_s=cfg.database.connect_timeout_s) as acks, \
                    trio.open_nursery() as nursery:
                acks_store = Store(acks, cfg.database.query_timeout_s)
                first_due, phone = burst_rules(cfg).first_due, phone_rule(cfg)
                # concurrent requests' bodies share statements and commits (group commit)
                shared = SharedWrites(acks_store, first_due, phone, writers=ACK_CONNECTIONS,
                                      on_batch=metrics.tally("inbox write batches"))
                await nursery.start(shared.run)
                intake = LiveIntake(acks_store, instance_directory(cfg), shared)
                exporter = Exporter(metrics, sink or OutcomeSink(), acks_store.figures,
                                    store.pool.stats)
                readiness = partial(problems, acks_store.ping, acks_store.applied_migrations,
                                    inlets.stopping.is_set)
                app = WebhookApp(cfg.webhook, intake,
                                 partial(_handover, inlets, first_due),
                                 metrics.stage("webhook"), recorder, exporter=exporter,
                                 readiness=readiness, console=console(cfg, store.pool, inlets))
                url = await nursery.start(partial(
                    _serve_then_close, shared, app, cfg.webhook.host, cfg.webhook.port,
                    grace_s=cfg.pipeline.shutdown_grace_s, stopping=inlets.stopping))
                ready(url)
        finally:
            if recorder is not None:
                recorder.close()

    return source


async def _serve_then_close(shared: SharedWrites, *args: Any,
                            task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
                            **kwargs: Any) -> None:
    """The webhook server; once its last request is answered, the shared writes end."""
    try:
        await serve(*args, task_status=task_status, **kwargs)
    finally:
        shared.close()


def console(cfg: Config, pool: Pool, inlets: Inlets) -> Console | None:
    """The agents' console on the webhook server, when ``[console] token`` is set."""
    if not cfg.console.token:
        return None
    if cfg.console.allow_remote:
        logger.warning("[console] allow_remote = true: the console answers any client; "
                       "serve it behind TLS")
    return Console(cfg.console, ConsoleStore(pool, cfg.database.query_timeout_s),
                   {i.name: i for i in cfg.instances}, cfg.dispatch, queued=inlets.queued)


async def _handover(inlets: Inlets, first_due: dt.timedelta, accepted: Accepted) -> None:
    """What a webhook accepted: new rows wake the claimer; what ended at intake (receipts,
    invalid parts, redelivered ids) goes to the outcomes."""
    new = [s.message.received_at for s in accepted.stored if not s.redelivered]
    if new:
        inlets.stored(min(new) + first_due)
    for stored in accepted.stored:
        if stored.redelivered:
            await inlets.done.send(redelivered(stored))
    for outcome in accepted.finished:
        await inlets.done.send(outcome)
