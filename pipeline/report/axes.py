"""Where the charts put their ticks, and what the ticks say: rounded linear axes, log axes for
latencies, and time axes in recorded clock time (or time since the start when it is unknown)."""

from __future__ import annotations

import datetime as dt
import math

from pipeline.report.collect import Timeline
from pipeline.report.formatting import duration

# tick spacings (s) of a time axis, the first that gives few enough ticks is used
_TIME_STEPS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60,
                 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800,
                 604800)


def _nice_step(span: float, ticks: int, integer: bool = False) -> float:
    raw = span / max(ticks, 1)
    if raw <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10) if integer and power < 10 else (1, 2, 2.5, 5, 10):
        if raw <= m * power:
            return m * power
    return 10 * power


def linear_ticks(top: float, ticks: int = 5,
                 integer: bool = False) -> tuple[float, list[float]]:
    """A rounded axis maximum >= ``top`` and the ticks from 0 to it (whole numbers for
    counts)."""
    if top <= 0:
        return 1.0, [0.0, 1.0]
    step = _nice_step(top, ticks, integer)
    if (integer or top >= 1) and step < 1:
        step = 1.0
    end = math.ceil(top / step - 1e-9) * step
    count = round(end / step)
    return end, [i * step for i in range(count + 1)]


class LogScale:
    """A log axis over whole decades from below ``low`` to above ``high``, drawn from ``x0``
    to ``x1``; calling it gives a value's position."""

    def __init__(self, low: float, high: float, x0: float, x1: float) -> None:
        self.lo = math.floor(math.log10(max(low, 1e-6)))
        self.hi = max(math.ceil(math.log10(max(high, 1e-6))), self.lo + 1)
        self.x0, self.x1 = x0, x1

    def __call__(self, v: float) -> float:
        lv = math.log10(max(v, 10.0 ** self.lo))
        return self.x0 + (lv - self.lo) / (self.hi - self.lo) * (self.x1 - self.x0)

    def ticks(self) -> list[tuple[float, bool]]:
        """(value, major) pairs: decades, and 2 and 5 when there are few decades."""
        out: list[tuple[float, bool]] = []
        minors = (2, 5) if self.hi - self.lo <= 3 else ()
        for d in range(self.lo, self.hi + 1):
            out.append((10.0 ** d, True))
            if d < self.hi:
                out += [(m * 10.0 ** d, False) for m in minors]
        return out


def time_ticks(data: Timeline, total_s: float, px: float) -> tuple[list[tuple[float, str]], str]:
    """Ticks ``(offset_s, label)`` along ``[0, total_s]`` and the axis title."""
    max_ticks = max(2, int(px / 90))
    step = next((s for s in _TIME_STEPS_S if total_s / s <= max_ticks), _TIME_STEPS_S[-1])
    if data.started_at is not None:
        return _clock_ticks(data.started_at.astimezone(dt.UTC), total_s, step)
    ticks: list[tuple[float, str]] = []
    k = 0
    while (at := k * step) <= total_s + 1e-9:
        if step >= 60:
            h, m = divmod(round(at / 60), 60)
            label = f"{h}:{m:02d}"
        elif step >= 1:
            m, sec = divmod(round(at), 60)
            label = f"{m}:{sec:02d}"
        else:
            label = f"{at:.3g}"
        ticks.append((at, label))
        k += 1
    unit = "h:mm" if step >= 60 else "m:ss" if step >= 1 else "s"
    return ticks, f"time since the start of the replay ({unit})"


def _clock_ticks(started: dt.datetime, total_s: float,
                 step: float) -> tuple[list[tuple[float, str]], str]:
    """Ticks at round recorded (UTC) times, every ``step`` seconds, and the axis title."""
    ticks: list[tuple[float, str]] = []
    t0 = started.timestamp()
    first = math.ceil(t0 / step - 1e-9) * step
    k = 0
    while (at := first + k * step) <= t0 + total_s + 1e-9:
        when = dt.datetime.fromtimestamp(at, dt.UTC)
        if step >= 86400:
            label = when.strftime("%b %d")
        elif step >= 60:
            label = when.strftime("%H:%M")
        elif step >= 1:
            label = when.strftime("%H:%M:%S")
        else:
            label = when.strftime("%S.") + f"{when.microsecond // 1000:03d}"
        ticks.append((at - t0, label))
        k += 1
    end = started + dt.timedelta(seconds=total_s)
    days = started.strftime("%Y-%m-%d")
    if end.date() != started.date():
        days += " – " + end.strftime("%Y-%m-%d")
    return ticks, f"recorded time (UTC, {days})"


def when(data: Timeline, offset: float) -> str:
    """The time ``offset`` seconds into the timeline, as a tooltip says it."""
    if data.started_at is not None:
        t = data.started_at.astimezone(dt.UTC) + dt.timedelta(seconds=offset)
        return t.strftime("%H:%M:%S") if data.bucket_s >= 1 else t.strftime("%H:%M:%S.%f")[:-3]
    return f"+{duration(offset)}" if offset else "+0 s"
