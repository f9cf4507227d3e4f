"""What the benchmark prints: progress on stderr, the Markdown tables of the result at the
end."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from pipeline.bench.settings import STAGES


def log(message: str) -> None:
    """One line of progress, on stderr: stdout is for the report."""
    print(message, file=sys.stderr, flush=True)


def progress_line(rep: int, repeat: int, cell: str, r: dict[str, Any]) -> str:
    line = (f"[{rep + 1}/{repeat}] {cell:<10} {r['messages']:>7} msgs in {r['elapsed_s']:6.2f} s"
            f" = {r['msgs_per_s']:8,.0f} msgs/s")
    if cell != "ceiling":
        line += (f", context p50 {r['context_p50_ms']:6.2f} ms, e2e p99 {r['e2e_p99_ms']:7.1f} ms"
                 f", errors {r['errors']}")
    return line


def report(result: dict[str, Any]) -> str:
    """The Markdown printed at the end: a header, the modes, the stages, the targets."""
    return "\n\n".join([_header(result), _modes_table(result), _stages_table(result),
                        _load_lines(result), _targets_lines(result)]) + "\n"


def _load_lines(result: dict[str, Any]) -> str:
    s, modes = result["settings"], result["modes"]
    busy = ", ".join(f"{mode} {m['peak_active_conversations']}" for mode, m in modes.items())
    growth = ", ".join(f"{mode} {m['rss_growth_mb']:+.1f} MB" for mode, m in modes.items())
    return (f"conversations open at once (by received_at): {s['conversations_open_at_once']}; "
            f"busy in the context stage at once (peak): {busy}\n"
            f"RSS from a fifth of the run to its end: {growth}")


def _header(result: dict[str, Any]) -> str:
    s, c = result["settings"], result["ceiling"]
    proxy = (f"latency proxy {s['delay_ms']:g} ms each way ({s['proxy']})" if s["delay_ms"]
             else "no proxy (Unix socket)")
    first = next(iter(result["modes"].values()))
    return "\n".join([
        f"**{s['conversations']} conversations x {s['messages']} messages** (seed {s['seed']}, "
        f"{first['messages']} events incl. redeliveries; bursts {s['burst_share']:.0%}, "
        f"redeliveries {s['redelivery_share']:.0%}, escalations {s['escalation_share']:.0%})"
        + (" -- soak" if s["soak"] else ""),
        f"server: throwaway embedded PostgreSQL, fsync off (durable=False) | {proxy} | "
        f"rtt (SELECT 1, median) {result['rtt_ms']:.2f} ms | pool {s['pool_size']} | "
        f"max active conversations {s['max_active_conversations']} | medians of "
        f"{s['repeat']} interleaved repetitions | {result['machine']['cpus']} cpus, load "
        "average at start " + " ".join(f"{x:.2f}" for x in
                                       result["machine"]["load_average_at_start"]),
        f"ceiling ({c['messages']} messages: claim + load_context + commit_claim per turn, "
        f"{s['ceiling_tasks']} tasks, no pipeline): {c['msgs_per_s']:,.0f} msgs/s "
        f"({c['turns_per_s']:,.0f} turns/s; {c['round_trips_per_msg']:.2f} round trips/msg, "
        f"claims {c['claims'] / c['messages']:.2f}/msg; claim to commit p50 / p99 "
        f"{c['claim_to_commit_p50_ms']:.1f} / {c['claim_to_commit_p99_ms']:.1f} ms); "
        f"CPU ms/msg client / proxy / server {_cpu(c)}",
    ])


def _cpu(figures: dict[str, Any]) -> str:
    cpu = figures["cpu_ms_per_msg"]
    return " / ".join(f"{cpu.get(k, 0.0):.2f}" for k in ("pipeline", "proxy", "server"))


def _modes_table(result: dict[str, Any]) -> str:
    rows = ["| mode | msgs/s | of ceiling | e2e p50 ms | e2e p99 ms "
            "| context p50 ms | context p50 / rtt | claim to commit p50 / p99 ms "
            "| round trips / msg (claims) | peak conns / pool | peak RSS MB | errors "
            "| CPU ms/msg pipeline / proxy / server |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for mode, m in result["modes"].items():
        rows.append(
            f"| {mode} | {m['msgs_per_s']:,.0f} | {m['ceiling_fraction']:.0%} "
            f"| {m['e2e_p50_ms']:.1f} | {m['e2e_p99_ms']:.1f} "
            f"| {m['context_p50_ms']:.2f} | {m['context_p50_rtt']:.2f} "
            f"| {m['claim_to_commit_p50_ms']:.1f} / {m['claim_to_commit_p99_ms']:.1f} "
            f"| {m['round_trips_per_msg']:.2f} ({m['claims_per_msg']:.2f}) "
            f"| {m['peak_connections']} / {m['pool_size']} | {m['peak_rss_mb']:.0f} "
            f"| {m['errors']} | {_cpu(m)} |")
    return "\n".join(rows)


def _stages_table(result: dict[str, Any]) -> str:
    rows = ["per stage, p50 / p95 / p99 ms:", "",
            "| mode | " + " | ".join(STAGES) + " |", "|---|" + "--:|" * len(STAGES)]
    for mode, m in result["modes"].items():
        cells = [" / ".join(f"{m['stages'][s][p]:.2f}" for p in ("p50_ms", "p95_ms", "p99_ms"))
                 if s in m["stages"] else "-" for s in STAGES]
        rows.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _targets_lines(result: dict[str, Any]) -> str:
    t, lines = result["targets"], []
    for mode in ("single", "batched"):
        if f"{mode}_context_p50_over_rtt" in t:
            lines.append(f"- {mode}: context p50 = {t[f'{mode}_context_p50_over_rtt']:.2f} x rtt "
                         "(target <= 1.3 at --delay-ms 1)")
    for other in ("sequential", "parallel"):
        if f"best_over_{other}" in t:
            lines.append(f"- best mode ({t['best_mode']}) = {t[f'best_over_{other}']:.1f} x "
                         f"{other} in msgs/s")
    lines.append(f"- best mode reaches {t['best_ceiling_fraction']:.0%} of the ceiling "
                 "(target >= 50 % at --delay-ms 0)")
    actions = Counter(next(iter(result["modes"].values()))["actions"])
    lines.append(f"- errors {t['errors']}; peak connections within the pool: "
                 f"{'yes' if t['peak_connections_within_pool'] else 'NO'}; outcomes: "
                 + ", ".join(f"{a} {n}" for a, n in sorted(actions.items())))
    return "\n".join(lines)
