"""``pipeline replay --report FILE.html``: one self-contained page of charts about a replay.

Feeding it, with memory bounded however long the run:

* :class:`ReportCollector` -- :meth:`~ReportCollector.record` each outcome with the recorded
  time it was produced; :meth:`~ReportCollector.finish` then returns the frozen
  :class:`ReportData` (``collect.py``).
* :func:`render_report` -- ``ReportData`` → the HTML page (deterministic: same data, same
  bytes; ``page.py``), its charts from ``charts.py``, drawn with ``svg.py`` on the axes of
  ``axes.py``, numbers written by ``formatting.py``.
"""

from pipeline.report.charts import ACTION_COLOURS
from pipeline.report.collect import (
    InstanceCounts,
    ReasonCount,
    ReportCollector,
    ReportData,
    StageLatency,
    Timeline,
)
from pipeline.report.page import render_report

__all__ = ["ACTION_COLOURS", "InstanceCounts", "ReasonCount", "ReportCollector", "ReportData",
           "StageLatency", "Timeline", "render_report"]
