"""How the report writes numbers, durations and labels: short, rounded for reading, escaped."""

from __future__ import annotations

import html

# (below this many seconds, unit in seconds, name) for the width of a time bucket
_BUCKET_UNITS = ((60, 1, "s"), (3600, 60, "min"), (86400, 3600, "h"))


def escape(text: object) -> str:
    """``text`` safe inside HTML and SVG, attribute values included."""
    return html.escape(str(text), quote=True)


def clip(text: str, chars: int) -> str:
    """``text`` cut to ``chars`` characters, an ellipsis saying so."""
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "…"


def text_px(text: str, size: float = 12, bold: bool = False) -> float:
    """A generous estimate of a label's width (DejaVu/Helvetica-like fonts)."""
    return len(text) * size * (0.68 if bold else 0.62)


def num(n: float) -> str:
    """A count or axis value: whole numbers grouped, small fractions to one decimal."""
    return f"{n:,.0f}" if abs(n) >= 100 or float(n).is_integer() else f"{n:,.1f}"


def latency(ms: float) -> str:
    """A latency of ``ms`` milliseconds, three significant digits or so, in s, ms or µs."""
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 0.1:
        return f"{ms:.2f} ms"
    if ms <= 0:
        return "0 ms"
    return f"{ms * 1000:.0f} µs"


def tick_ms(ms: float) -> str:
    """An axis label for a round number of milliseconds: 10 µs, 0.5 ms, 20 ms, 1 s."""
    if ms <= 0:
        return "0"
    for unit, size in (("s", 1000.0), ("ms", 1.0), ("µs", 0.001)):
        if ms >= size * 0.999:
            return f"{ms / size:.4g} {unit}"
    return f"{ms * 1000:.3g} µs"


def duration(s: float) -> str:
    """A run's length in its two largest units: 180 ms, 4.2 s, 3 min 20 s, 1 h, 2 d 5 h."""
    if s < 0.001:
        return "0 s"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m} min {sec} s" if sec else f"{m} min"
    if s < 2 * 86400:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(round(s / 3600), 24)
    return f"{d} d {h} h" if h else f"{d} d"


def rate(n: float, s: float) -> str:
    """``n`` over ``s`` seconds, per second or, when slower than that, per minute."""
    if s <= 0:
        return "–"
    per_s = n / s
    if per_s >= 1:
        return f"{per_s:,.0f}/s" if per_s >= 100 else f"{per_s:,.1f}/s"
    return f"{per_s * 60:,.1f}/min"


def bucket_label(seconds: float) -> str:
    """The width of a time bucket, in one round unit: 500 ms, 5 s, 15 min, 2 h, 1 d."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    size, unit = next(((size, unit) for below, size, unit in _BUCKET_UNITS if seconds < below),
                      (86400, "d"))
    return f"{seconds / size:g} {unit}"
