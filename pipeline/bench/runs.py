"""The whole benchmark: every cell of every repetition, interleaved, and the medians and
targets they come to (the JSON report)."""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any

import attrs

from pipeline.bench.ceiling import plan_ceiling, run_ceiling
from pipeline.bench.measure import measure_rtt
from pipeline.bench.modes import run_mode
from pipeline.bench.report import log, progress_line
from pipeline.bench.server import Server, routed
from pipeline.bench.settings import Settings
from pipeline.bench.workload import generate, open_at_once, workload_events


async def run_bench(settings: Settings, server: Server) -> dict[str, Any]:
    """Every cell of every repetition, interleaved; returns the JSON report."""
    load_at_start = os.getloadavg()
    events, total = workload_events(settings)
    plan = plan_ceiling(settings, generate(settings.workload))
    open_convs = open_at_once(generate(settings.run_workload))
    log(f"workload: {total} events, {settings.run_workload.conversations} conversations "
        f"({open_convs} open at once), ceiling plan: {plan.turns} turns")
    cells = [*settings.modes, "ceiling"]
    runs: dict[str, list[dict[str, Any]]] = {cell: [] for cell in cells}
    rtts: list[float] = []
    async with routed(settings, server) as route:
        for rep in range(settings.repeat):
            rtts.append(await measure_rtt(route))
            log(f"[{rep + 1}/{settings.repeat}] rtt (SELECT 1, median) {rtts[-1]:.2f} ms")
            for cell in cells[rep % len(cells):] + cells[:rep % len(cells)]:
                if cell == "ceiling":
                    result = await run_ceiling(settings, route, plan, rep)
                else:
                    result = await run_mode(settings, route, cell, rep, events, total)
                runs[cell].append(result)
                log(progress_line(rep, settings.repeat, cell, result))
    result = summarize(settings, rtts, runs, load_at_start)
    result["settings"]["conversations_open_at_once"] = open_convs
    return result


def _median(values: list[Any]) -> Any:
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    if all(isinstance(v, dict) for v in values) and values:
        return {k: _median([v[k] for v in values]) for k in values[0]
                if all(k in v for v in values)}
    return values[0]  # lists, None, strings: the first repetition's


def summarize(settings: Settings, rtts: list[float], runs: dict[str, list[dict[str, Any]]],
              load_at_start: tuple[float, ...] = ()) -> dict[str, Any]:
    """Medians over the repetitions, in the JSON shape of issue 7 (plus extras)."""
    ceiling = _median(runs.pop("ceiling"))
    rtt = statistics.median(rtts)
    modes = {}
    for mode, results in runs.items():
        figures = _median(results)
        figures["errors"] = max(r["errors"] for r in results)  # the worst, not the median
        figures["msgs_per_s_runs"] = [round(r["msgs_per_s"], 1) for r in results]
        figures["ceiling_fraction"] = figures["msgs_per_s"] / ceiling["msgs_per_s"]
        figures["context_p50_rtt"] = figures["context_p50_ms"] / rtt
        modes[mode] = figures
    w = settings.run_workload
    return {
        "delay_ms": float(settings.delay_ms), "rtt_ms": rtt,
        "ceiling_msgs_per_s": ceiling["msgs_per_s"], "modes": modes,
        "ceiling": ceiling, "rtt_ms_runs": rtts, "targets": targets(modes, ceiling, rtt),
        "settings": {**attrs.asdict(w), "delay_ms": settings.delay_ms,
                     "repeat": settings.repeat, "pool_size": settings.pool_size,
                     "max_active_conversations": settings.active,
                     "channel_capacity": settings.channel_capacity,
                     "ceiling_tasks": settings.ceiling_tasks, "proxy": settings.proxy,
                     "soak": settings.soak},
        "server": {"kind": "embedded", "durable": False, "fsync": "off"},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_at_start": load_at_start},
    }


def targets(modes: dict[str, Any], ceiling: dict[str, Any], rtt: float) -> dict[str, Any]:
    """The issue's targets, as numbers (judged for the modes that ran)."""
    out: dict[str, Any] = {}
    for mode in ("single", "batched"):
        if mode in modes:
            out[f"{mode}_context_p50_over_rtt"] = modes[mode]["context_p50_ms"] / rtt
    best = max(modes, key=lambda m: modes[m]["msgs_per_s"])
    out["best_mode"] = best
    for other in ("sequential", "parallel"):
        if other in modes:
            out[f"best_over_{other}"] = modes[best]["msgs_per_s"] / modes[other]["msgs_per_s"]
    out["best_ceiling_fraction"] = modes[best]["msgs_per_s"] / ceiling["msgs_per_s"]
    out["errors"] = sum(m["errors"] for m in modes.values())
    out["peak_connections_within_pool"] = all(
        m["peak_connections"] <= m["pool_size"] for m in modes.values())
    return out
