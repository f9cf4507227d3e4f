"""``pipeline run``'s source: first the inbox rows a previous run left pending, then the
webhook server until shutdown.

Pending rows are handed over before the server starts, so a conversation's older messages
are always ahead of its new ones.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import partial

import trio
from loguru import logger

from pipeline.config import Config
from pipeline.db import open_pool
from pipeline.engine import Inlets, Source, instance_directory
from pipeline.metrics import Metrics
from pipeline.recorded_log import LogRecorder
from pipeline.records import Stored
from pipeline.store import Store
from pipeline.webhook import WebhookApp, serve
from stages.intake import Accepted, LiveIntake

PAGE = 500
ACK_CONNECTIONS = 2


async def recover_pending(store: Store, inlets: Inlets) -> int:
    """Hand every pending inbox row to the pipeline, oldest first; return how many."""
    cursor: tuple[dt.datetime, int] | None = None
    count = 0
    while not inlets.stopping.is_set():
        page = await store.pending(cursor, PAGE)
        for _, message in page:
            await inlets.stored.send(Stored(message, redelivered=False))
            count += 1
        if len(page) < PAGE:
            break
        cursor = page[-1][0]
    if count:
        logger.bind(stage="recovery").info("handed over {} messages left pending", count)
    return count


def live_source(cfg: Config, store: Store, metrics: Metrics,
                ready: Callable[[str], None] = lambda url: None) -> Source:
    """The source of ``pipeline run``; ``ready`` gets the server's URL once it listens."""

    async def source(inlets: Inlets) -> None:
        await recover_pending(store, inlets)
        if not cfg.webhook.enabled:
            logger.info("[webhook] enabled = false: no live source, waiting for a signal")
            await inlets.stopping.wait()
            return
        recorder = LogRecorder(cfg.webhook.record_dir) if cfg.webhook.record_dir else None
        if not cfg.webhook.app_secret:
            logger.warning("[webhook] app_secret is empty: Cloud API signatures are not checked")
        try:
            # the acknowledgements get connections of their own, so that they never queue
            # behind the turns' work (the pipeline then uses pool_size + ACK_CONNECTIONS)
            async with open_pool(store.pool.conninfo, ACK_CONNECTIONS,
                                 connect_timeout_s=cfg.database.connect_timeout_s) as acks, \
                    trio.open_nursery() as nursery:
                intake = LiveIntake(Store(acks, cfg.database.query_timeout_s),
                                    instance_directory(cfg))
                app = WebhookApp(cfg.webhook, intake, partial(_handover, inlets),
                                 metrics.stage("webhook"), recorder)
                url = await nursery.start(partial(
                    serve, app, cfg.webhook.host, cfg.webhook.port,
                    grace_s=cfg.pipeline.shutdown_grace_s, stopping=inlets.stopping))
                ready(url)
        finally:
            if recorder is not None:
                recorder.close()

    return source


async def _handover(inlets: Inlets, accepted: Accepted) -> None:
    for stored in accepted.stored:
        await inlets.stored.send(stored)
    for outcome in accepted.finished:
        await inlets.done.send(outcome)
