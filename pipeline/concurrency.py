"""Structured-concurrency versions of the source documents' promise helpers.

=========================================  =============================================
source document (TypeScript)               here
=========================================  =============================================
executeSafeParallel (allSettled+defaults)  :func:`settle` -- per-operation default on
                                           failure or timeout, with a record of why (the
                                           ``parallel`` and ``sequential`` context modes)
executeWithRetry                           :func:`retry` -- exponential backoff, jitter,
                                           attempt and deadline budget, declared errors only
withTimeout / measureTime                  ``timeout`` arguments, :func:`timed`
=========================================  =============================================

The source documents' ``executeParallel``, ``executeWithConcurrencyLimit`` and
``executeBatchedParallel`` have no counterpart: a nursery is the first, the keyed stages'
``max_active`` bound the second (:mod:`pipeline.runtime`), and the claim and the ``batched``
context mode batch in one statement what they batched in many.

Every task lives in a nursery owned by the caller's ``await``; nothing outlives the call.
Only ``Exception`` subclasses are caught, never ``Cancelled``/``KeyboardInterrupt``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import attrs
import trio
from loguru import logger

from pipeline.metrics import Metrics

T = TypeVar("T")
R = TypeVar("R")
Op = Callable[[], Awaitable[T]]


@contextmanager
def timed(metrics: Metrics | None, name: str) -> Iterator[None]:
    """Record the duration of the block (success or not) as operation ``name``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if metrics is not None:
            metrics.operation(name).record((time.perf_counter() - start) * 1000)


async def _run_named(name: str, op: Op[T], timeout: float | None, metrics: Metrics | None,
                     into: dict[str, Any]) -> None:
    with timed(metrics, name):
        if timeout is None:
            into[name] = await op()
        else:
            with trio.fail_after(timeout):
                into[name] = await op()


@attrs.frozen
class Failure:
    """Why an operation of :func:`settle` fell back to its default."""

    name: str
    reason: str  # "timeout after 0.5 s" or "ValueError: ..."
    error: BaseException | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Settled(Generic[T]):
    values: dict[str, T]
    failures: tuple[Failure, ...] = ()


async def settle(ops: Mapping[str, Op[Any]], defaults: Mapping[str, Any], *,
                 timeouts: Mapping[str, float] | None = None,
                 catch: tuple[type[Exception], ...] = (Exception,),
                 metrics: Metrics | None = None) -> Settled[Any]:
    """Run the named operations together; one that fails (an error in ``catch``) or times
    out gets its default and a :class:`Failure` record, and the others go on."""
    missing = set(ops) - set(defaults)
    if missing:
        raise ValueError(f"no default for {sorted(missing)}")
    values: dict[str, Any] = {}
    failures: dict[str, Failure] = {}

    async def guarded(name: str, op: Op[Any]) -> None:
        limit = (timeouts or {}).get(name)
        try:
            await _run_named(name, op, limit, metrics, values)
        except trio.TooSlowError:
            failures[name] = Failure(name, f"timeout after {limit} s", trio.TooSlowError())
        except catch as exc:
            failures[name] = Failure(name, f"{type(exc).__name__}: {exc}", exc)

    async with trio.open_nursery() as nursery:
        for name, op in ops.items():
            nursery.start_soon(guarded, name, op, name=name)
    merged = {name: values[name] if name in values else defaults[name] for name in ops}
    return Settled(merged, tuple(failures[n] for n in ops if n in failures))


@attrs.frozen
class Backoff:
    """Retry policy: ``attempts`` tries, pauses growing ``factor``-fold from ``initial_s`` up
    to ``max_s`` with full jitter, and no retry that would start after ``deadline_s``."""

    attempts: int = 5
    initial_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0
    deadline_s: float | None = None
    jitter: bool = True

    def pause(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.max_s, self.initial_s * self.factor ** (attempt - 1))
        return rng.uniform(0, ceiling) if self.jitter else ceiling


def _retryable(exc: Exception, retry_on: tuple[type[Exception], ...]) -> Exception | None:
    """``exc`` itself if it is one of ``retry_on``; for an ExceptionGroup (errors from a
    nursery) whose leaves all are, its first leaf; else ``None``."""
    if isinstance(exc, retry_on):
        return exc
    if isinstance(exc, ExceptionGroup):
        matched, rest = exc.split(retry_on)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            assert isinstance(leaf, Exception)
            return leaf
    return None


async def retry(op: Op[T], *, retry_on: tuple[type[Exception], ...], policy: Backoff,
                rng: random.Random | None = None,
                on_retry: Callable[[int, Exception, float], None] | None = None) -> T:
    """Run ``op``; on an error in ``retry_on`` wait and try again within the budget.

    An ``ExceptionGroup`` whose leaves are all in ``retry_on`` counts as retryable: an
    operation that fans out in a nursery reports a brief outage that way (``on_retry`` is
    told its first leaf). Other errors, mixed groups, and the last retryable error propagate
    unchanged.
    """
    started = trio.current_time()
    for attempt in range(1, policy.attempts + 1):
        try:
            return await op()
        except Exception as exc:
            cause = _retryable(exc, retry_on)
            if cause is None:
                raise
            rng = rng or random.Random()  # only once something failed: the hot path stays lean
            pause = policy.pause(attempt, rng)
            late = (policy.deadline_s is not None
                    and trio.current_time() + pause - started > policy.deadline_s)
            if attempt == policy.attempts or late:
                raise
            if on_retry is not None:
                on_retry(attempt, cause, pause)
            await trio.sleep(pause)
    raise AssertionError("unreachable: the loop returns or raises")


async def with_retry(op: Op[T], policy: Backoff | None, what: str) -> T:
    """``op()`` retried under ``policy`` while the database is unavailable (no policy: once).

    The stages use it so that an outage makes turns wait and resume instead of failing.
    """
    from pipeline.db import DatabaseUnavailable  # here: the toolkit itself needs no database

    if policy is None:
        return await op()

    def note(attempt: int, exc: Exception, pause: float) -> None:
        logger.bind(stage=what).warning("{}: database unavailable ({}), retry {} in {:.1f} s",
                                        what, exc, attempt, pause)

    return await retry(op, retry_on=(DatabaseUnavailable,), policy=policy, on_retry=note)
