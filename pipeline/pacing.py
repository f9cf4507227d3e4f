"""Pacing sends to what WhatsApp accepts: a business number's throughput (about 80 messages
a second by default, inbound and outbound together) and a user's tolerance for bursts (too
many messages to one user in a short time fail with 131056).

:class:`Pacer` is a pure schedule: :meth:`Pacer.reserve` returns when a send may go and books
its slot, so the delivery task sleeps until then. Each process paces its own sends; several
delivering processes share a number's throughput only as far as each keeps below it.
"""

from __future__ import annotations

import attrs

#: recipients remembered before the ones whose gap has passed are forgotten
_PRUNE_AT = 10_000


@attrs.define
class Pacer:
    """Sends of one number at most ``per_s`` a second; to one recipient, ``gap_s`` apart."""

    per_s: float
    gap_s: float
    _number: dict[str, float] = attrs.field(factory=dict)
    _recipient: dict[tuple[str, str], float] = attrs.field(factory=dict)

    def reserve(self, number: str, recipient: str, now: float) -> float:
        """The earliest time from ``now`` at which this send may go; its slot is booked."""
        key = (number, recipient)
        at = max(now, self._number.get(number, now), self._recipient.get(key, now))
        self._number[number] = at + 1.0 / self.per_s
        if len(self._recipient) >= _PRUNE_AT:
            self._recipient = {k: t for k, t in self._recipient.items() if t > now}
        self._recipient[key] = at + self.gap_s
        return at
