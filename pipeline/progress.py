"""A one-line progress display for replays on a terminal: done/total, rate, ETA.

Driven by the source as it hands events over, rate-limited on the real clock, so it needs
no task and no timer of its own (a timer would be a deadline for the virtual clock).
Nothing is printed when the stream is not a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import attrs


def count_lines(paths: Sequence[Path]) -> int:
    """Non-empty lines in the logs: the number of events to expect."""
    total = 0
    for path in paths:
        with open(path, "rb") as file:
            total += sum(1 for line in file if line.strip())
    return total


@attrs.define
class Progress:
    total: int
    out: TextIO
    every_s: float = 0.2
    _start: float = attrs.field(factory=time.monotonic)
    _shown: float = 0.0
    done: int = 0

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._shown >= self.every_s:
            self._shown = now
            self.out.write("\r" + self.line(now) + "\x1b[K")
            self.out.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        share = self.done / self.total if self.total else 1.0
        return (f"replaying {self.done:,}/{self.total:,} events ({share:.0%}) "
                f"{rate:,.0f}/s, about {left:,.0f} s left")

    def close(self) -> None:
        self.out.write("\r\x1b[K")
        self.out.flush()
