"""Which instances exist, cached: the first check of every turn costs no round trip.

The ``[[instances]]`` of the config are seeded into the ``instances`` table at start (so
operators and other processes see them); this cache reads the rows back and refreshes them
every ``context.instance_cache_ttl_s`` in the background, and the context loader asks it
only whether a turn's instance is known (the settings a turn needs, such as the webhook
URL, are read by the context statement itself). A failed refresh keeps the last good copy
and is logged: a list that is a little old beats a turn that fails.
"""

from __future__ import annotations

import attrs
import trio
from loguru import logger

from pipeline.db import DatabaseError
from pipeline.store import InstanceRow, Store


@attrs.define
class InstanceCache:
    store: Store
    ttl_s: float
    refreshes: int = 0
    _rows: dict[str, InstanceRow] = attrs.field(factory=dict, init=False)
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)

    def get(self, name: str) -> InstanceRow | None:
        return self._rows.get(name)

    async def refresh(self) -> None:
        self._rows = {row.name: row for row in await self.store.load_instances()}
        self.refreshes += 1

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load now (failing loudly: nothing works without instances), then refresh every
        ``ttl_s`` until :meth:`close`."""
        await self.refresh()
        task_status.started()
        with self._scope:
            while True:
                await trio.sleep(self.ttl_s)
                try:
                    await self.refresh()
                except DatabaseError as exc:
                    logger.bind(stage="context").warning(
                        "instance settings not refreshed, keeping the last copy: {}", exc)

    def close(self) -> None:
        self._scope.cancel()
