"""What one benchmark run is: the workload's shape, the bounds, and the pipeline config
they make (checked before anything starts, so a bad option costs nothing)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import attrs

from pipeline.config import Config, parse_config

MODES = ("sequential", "parallel", "single", "batched", "claimed")
INSTANCE, PHONE_ID = "bench", "15550001111"
STAGES = ("intake", "context", "escalation", "respond", "dispatch")
#: past every deadline of the workload: the recorded time once all of it is in the inbox
AFTER_ALL = dt.timedelta(days=1)
RULES = [
    {"match": "price", "reply": "Our prices are at https://example.com/prices."},
    {"match": "opening hours", "reply": "We are open Monday to Friday, 9:00 to 18:00."},
    {"match": "deliver", "reply": "We deliver within 5 km, every day until 22:00."},
]


class BenchError(Exception):
    """The benchmark cannot run as asked; the message says why."""


def _share(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise BenchError(f"--{attribute.name.replace('_', '-')} must be within 0..1, "
                         f"not {value!r}")


def _at_least_one(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise BenchError(f"--{attribute.name.replace('_', '-')} must be >= 1, not {value!r}")


@attrs.frozen
class Workload:
    """What is pushed through the pipeline: the same for every mode and repetition."""

    conversations: int = attrs.field(default=200, validator=_at_least_one)
    messages: int = attrs.field(default=5, validator=_at_least_one)
    seed: int = 7
    burst_share: float = attrs.field(default=0.3, validator=_share)
    redelivery_share: float = attrs.field(default=0.05, validator=_share)
    escalation_share: float = attrs.field(default=0.03, validator=_share)
    spread_s: float = 5.0  # conversations start within this many seconds of each other


def _modes(value: Iterable[str]) -> tuple[str, ...]:
    modes = tuple(value)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise BenchError(f"--modes must be a comma-separated list of {', '.join(MODES)}, "
                         f"not {','.join(modes)!r}")
    return modes


@attrs.frozen
class Settings:
    """One benchmark run. ``max_active = 0`` lets every conversation be active at once."""

    workload: Workload = attrs.Factory(Workload)
    delay_ms: float = 1.0
    repeat: int = attrs.field(default=3, validator=_at_least_one)
    modes: tuple[str, ...] = attrs.field(default=MODES, converter=_modes)
    pool_size: int = attrs.field(default=10, validator=_at_least_one)
    max_active: int = 0
    channel_capacity: int = attrs.field(default=16, validator=_at_least_one)
    ceiling_tasks: int = attrs.field(default=40, validator=_at_least_one)
    proxy: str = attrs.field(default="process",
                             validator=attrs.validators.in_(("process", "loop")))
    soak: bool = False

    @property
    def active(self) -> int:
        return self.max_active or self.workload.conversations

    @property
    def run_workload(self) -> Workload:
        """The pipeline's workload: ``--soak`` makes every conversation 10x longer."""
        w = self.workload
        return attrs.evolve(w, messages=w.messages * 10) if self.soak else w


def bench_config(settings: Settings, mode: str) -> Config:
    """The pipeline's config for one run: the defaults, plus the bench's bounds and rules."""
    return parse_config({
        "pipeline": {"max_active_conversations": settings.active,
                     "channel_capacity": settings.channel_capacity},
        "database": {"pool_size": settings.pool_size},
        "context": {"mode": mode},
        "metrics": {"summary": False},
        "dispatch": {"transport": "dry"},
        "responders": {"rules": {"kind": "rules", "rules": RULES}},
        "instances": [{"name": INSTANCE, "phone_number_id": PHONE_ID}],
    }, "scripts/bench.py")
