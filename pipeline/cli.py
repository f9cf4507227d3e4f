"""The command line: ``pipeline run|replay|check-config|db``.

Exit codes: 0 done, 1 failure at run time, 2 bad usage or bad config.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import trio
from loguru import logger

from pipeline.config import Config, ConfigError, dsn_problem, load_config, redacted
from pipeline.database import DEFAULT_DBNAME, cluster_for, open_store
from pipeline.db import DatabaseError
from pipeline.logs import dsn_password, setup_logging
from pipeline.pgcluster import ClusterError
from pipeline.progress import Progress, count_lines
from pipeline.report import ReportCollector, render_report
from pipeline.shutdown import Shutdown, watch_signals

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def sample_log() -> Path:
    """The small sample log bundled with the package (107 events; the tests use it)."""
    return Path(str(resources.files("pipeline") / "data" / "sample.jsonl"))


def bundled_day() -> Path:
    """A realistic business day of two instances (3,492 events; ``scripts/gen_day.py``),
    replayed when no LOG is given."""
    return Path(str(resources.files("pipeline") / "data" / "day.jsonl"))


def _parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    top.add_argument("--log-format", choices=("console", "json"), help="override [logging] format")
    top.add_argument("--log-level", help="override [logging] level")
    sub = top.add_subparsers(dest="command", required=True)
    cfg = argparse.ArgumentParser(add_help=False)
    cfg.add_argument("--config", "-c", type=Path, help="TOML config (default: embedded default)")
    run = sub.add_parser("run", parents=[cfg], help="run the configured sources until a signal")
    run.add_argument("--out", type=Path, help="write one outcome line per message here")
    run.add_argument("--roles", help="comma-separated: webhook, turns, delivery (default: "
                     "[pipeline] roles, all three); run several processes on one database "
                     "with any mix of them")
    run.add_argument("--port", type=int, help="override [webhook] port (0: any free port)")
    run.set_defaults(func=_cmd_run)
    rp = sub.add_parser("replay", parents=[cfg], help="replay recorded message logs")
    rp.add_argument("logs", nargs="*", type=Path,
                    help="JSONL logs (default: the bundled day, pipeline/data/day.jsonl)")
    rp.add_argument("--out", type=Path, help="write one outcome line per message here")
    rp.add_argument("--clock", default="event",
                    help="event (default: decisions on recorded time, as fast as the pipeline "
                    "goes, the same outcomes in every run), real (the recorded pace) or Nx "
                    "(N times the recorded pace, e.g. 10x)")
    rp.add_argument("--reorder-window", type=float, metavar="SECONDS",
                    help="put lines out of time order by up to this much back in place "
                    "(default: [replay] reorder_window_s, 600)")
    rp.add_argument("--send", action="store_true",
                    help="send replies and events to the configured targets (default: the "
                    "dry transport, whatever the config says: a replay never messages "
                    "customers unless asked)")
    rp.add_argument("--keep-db", action="store_true", help="keep the fresh replay database")
    rp.add_argument("--db", metavar="DSN", help="replay into this database instead of a fresh "
                    "one in the embedded cluster (used as it is: nothing is dropped)")
    rp.add_argument("--report", type=Path, help="write a self-contained HTML report here")
    rp.add_argument("--compare", type=Path, metavar="OTHER.toml",
                    help="replay again under OTHER.toml and report the outcomes that differ")
    rp.set_defaults(func=_cmd_replay)
    cc = sub.add_parser("check-config", help="validate a config file and explain every problem")
    cc.add_argument("file", type=Path)
    cc.set_defaults(func=_cmd_check_config)
    esc = sub.add_parser("escalations", parents=[cfg],
                         help="conversations handed to a human: list them, resolve one")
    esc.add_argument("action", choices=("list", "resolve"))
    esc.add_argument("id", nargs="?", type=int, help="the escalation to resolve")
    esc.add_argument("--instance", help="list only this instance's")
    esc.add_argument("--by", default="cli", help="who resolved it (recorded)")
    esc.set_defaults(func=_cmd_escalations)
    dl = sub.add_parser("deadletters", parents=[cfg],
                        help="what could not be understood or delivered: list, show, send "
                        "again, put aside")
    dl.add_argument("action", choices=("list", "show", "retry", "discard"))
    dl.add_argument("id", nargs="?", type=int, help="the dead letter (see list)")
    dl.add_argument("--all", action="store_true", help="list retried and discarded ones too")
    dl.add_argument("--by", default="cli", help="who retried or discarded it (recorded)")
    dl.set_defaults(func=_cmd_deadletters)
    sub.add_parser("bench", add_help=False,
                   help="the full-pipeline benchmark (scripts/bench.py; --help for its options)")
    db = sub.add_parser("db", parents=[cfg], help="the embedded database")
    db.add_argument("action", choices=("start", "stop", "status", "migrate", "url"))
    db.set_defaults(func=_cmd_db)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # scripts/bench.py parses its own options
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return int(args.func(args, None))
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    if getattr(args, "db", None) and (reason := dsn_problem(args.db)):
        print(f"pipeline {args.command}: --db is not a valid connection string: {reason}",
              file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(cfg, args)
    try:
        return int(args.func(args, cfg))
    except NotImplementedError as exc:
        logger.error("{}", exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BaseException as exc:  # errors from inside nurseries come in (nested) groups
        errors = _user_errors(exc)
        if errors is None:
            raise
        return _report(errors)


#: errors that are the user's to fix, shown as their one-line message (no traceback)
USER_ERRORS = (ConfigError, ClusterError, DatabaseError)


def _user_errors(exc: BaseException) -> list[BaseException] | None:
    """The leaves of ``exc`` (a group, however nested, or one error) when every one of them
    is a :data:`USER_ERRORS`; None when any is not: that is a bug, with its traceback."""
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[BaseException] = []
        for inner in exc.exceptions:
            found = _user_errors(inner)
            if found is None:
                return None
            leaves += [e for e in found if e not in leaves]
        return leaves
    return [exc] if isinstance(exc, USER_ERRORS) else None


def _report(errors: Sequence[BaseException]) -> int:
    """One line per error (a bad config may list several); exit 2 when all are config."""
    for exc in errors:
        if isinstance(exc, ConfigError):
            print(exc, file=sys.stderr)
        else:
            logger.error("{}", " ".join(str(exc).split()))
    return EXIT_USAGE if all(isinstance(e, ConfigError) for e in errors) else EXIT_FAILED


def _bench(argv: list[str]) -> int:
    """``pipeline bench``: :mod:`pipeline.bench`, imported only here (it needs psutil, of the
    test extra)."""
    from pipeline.bench import main as bench_main

    return bench_main(argv)


def _setup_logging(cfg: Config, args: argparse.Namespace) -> None:
    secrets = [cfg.webhook.app_secret, cfg.webhook.verify_token, cfg.webhook.evolution_apikey,
               cfg.webhook.resolve_token, cfg.dispatch.api_key, dsn_password(cfg.database.dsn),
               *(r.api_key for r in cfg.responders.values()),
               *(i.webhook_secret for i in cfg.instances)]
    setup_logging((args.log_level or cfg.logging.level).upper(),
                  args.log_format or cfg.logging.format, secrets)


def _cmd_check_config(args: argparse.Namespace, _cfg: Any) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: ok ({len(cfg.instances)} instances, context mode {cfg.context.mode})")
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.replay import parse_clock, replay, summary

    try:
        clock = parse_clock(args.clock)
    except ValueError as exc:
        print(f"pipeline replay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.db:
        cfg = attrs.evolve(cfg, database=attrs.evolve(cfg.database, dsn=args.db))
    if args.reorder_window is not None:
        if not args.reorder_window > 0:
            print(f"pipeline replay: --reorder-window must be a number of seconds > 0, not "
                  f"{args.reorder_window:g}", file=sys.stderr)
            return EXIT_USAGE
        cfg = attrs.evolve(cfg, replay=attrs.evolve(cfg.replay,
                                                     reorder_window_s=args.reorder_window))
    _send_notice(args, cfg)
    logs = args.logs or [bundled_day()]
    missing = [str(p) for p in logs if not p.is_file()]
    if missing:
        print(f"pipeline replay: no such log file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    if args.compare is not None:
        if args.send:
            print("pipeline replay: --send cannot be combined with --compare (every reply "
                  "would be sent once per config)", file=sys.stderr)
            return EXIT_USAGE
        return _compare(args, cfg, logs)
    if not args.logs:
        logger.info("no log given: replaying the bundled day {}", logs[0])
    shutdown = Shutdown(cfg.pipeline.shutdown_grace_s)
    collector = ReportCollector() if args.report else None
    progress = Progress(count_lines(logs), sys.stderr) if sys.stderr.isatty() else None

    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_signals, shutdown)
            with shutdown.scope:
                result = await replay(cfg, logs, out=out, keep_db=args.keep_db, clock=clock,
                                      report=collector, progress=progress,
                                      on_pipeline=lambda p: shutdown.on_stop(p.stop_sources),
                                      send=args.send)
            nursery.cancel_scope.cancel()
        return None if shutdown.expired else result

    with ExitStack() as stack:
        out = stack.enter_context(open(args.out, "w")) if args.out else None
        try:
            result = trio.run(main)
        finally:
            if progress is not None:
                progress.close()
    if result is None:
        logger.error("shutdown grace expired: unfinished turns were cancelled")
        return EXIT_FAILED
    print(summary(result, kept=args.keep_db))
    if collector is not None:
        _write_report(args, collector, result, logs)
    if cfg.metrics.summary:
        from pipeline.metrics import summary_table
        print(summary_table(result.metrics, result.elapsed_s))
    if shutdown.requests:
        print("stopped early by a signal: the rest of the log was not replayed")
    return EXIT_OK


def _send_notice(args: argparse.Namespace, cfg: Config) -> None:
    """Say where this replay sends (``--send``) or that it does not."""
    from pipeline.replay import send_targets

    targets = send_targets(cfg)
    if targets and args.send:
        logger.warning("--send: this replay sends to the configured targets, as live: {}",
                       "; ".join(targets))
    elif targets:
        logger.info("replaying with the dry transport: nothing is sent to {} (--send to "
                    "send)", "; ".join(targets))


def _compare(args: argparse.Namespace, cfg: Config, logs: Sequence[Path]) -> int:
    from pipeline.compare import compare_outcomes, render
    from pipeline.replay import replay

    try:
        other = load_config(args.compare)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    if args.reorder_window is not None:  # the option applies to both replays
        other = attrs.evolve(other, replay=cfg.replay)
    _send_notice(args, other)

    async def both() -> tuple[str, str]:
        texts = []
        for config in (cfg, other):
            out = io.StringIO()
            await replay(config, logs, out=out, send=args.send)
            texts.append(out.getvalue())
        return texts[0], texts[1]

    a, b = trio.run(both)
    name_a = str(args.config) if args.config else "default"
    print(render(compare_outcomes(a, b), name_a, str(args.compare)))
    if args.out:
        args.out.write_text(b)
    return EXIT_OK


def _write_report(args: argparse.Namespace, collector: ReportCollector, result: Any,
                  logs: Sequence[Path]) -> None:
    data = collector.finish(
        result.metrics, result.sink, events=result.events, real_s=result.elapsed_s,
        round_trips=result.round_trips, virtual_s=result.virtual_s,
        sources=[str(p) for p in logs], clock=args.clock,
        generated=f"pipeline replay · {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    args.report.write_text(render_report(data), encoding="utf-8")
    print(f"report: {args.report}")


def _run_roles(args: argparse.Namespace, cfg: Config) -> Config | str:
    """The config with ``--roles`` and ``--port`` applied, or what is wrong with them."""
    pipeline_cfg, webhook = cfg.pipeline, cfg.webhook
    if args.roles is not None:
        roles = tuple(r.strip() for r in args.roles.split(",") if r.strip())
        bad = [r for r in roles if r not in ("webhook", "turns", "delivery")]
        if bad or not roles:
            return (f"--roles must name webhook, turns and/or delivery, not "
                    f"{args.roles!r}")
        pipeline_cfg = attrs.evolve(pipeline_cfg, roles=roles)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            return f"--port must be 0..65535, not {args.port}"
        webhook = attrs.evolve(webhook, port=args.port)
    if not pipeline_cfg.roles:
        return "[pipeline] roles is empty: name at least one of webhook, turns, delivery"
    return attrs.evolve(cfg, pipeline=pipeline_cfg, webhook=webhook)


def _cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.engine import Pipeline
    from pipeline.live import live_source
    from pipeline.metrics import Metrics, summary_table
    from stages.outcomes import OutcomeSink

    chosen = _run_roles(args, cfg)
    if isinstance(chosen, str):
        print(f"pipeline run: {chosen}", file=sys.stderr)
        return EXIT_USAGE
    cfg = chosen
    roles = frozenset(cfg.pipeline.roles)
    shutdown = Shutdown(cfg.pipeline.shutdown_grace_s)
    metrics = Metrics()

    def ready(url: str) -> None:
        print(f"listening on {url}" if url else f"ready ({', '.join(sorted(roles))})",
              flush=True)

    async def main(sink: OutcomeSink) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch_signals, shutdown)
            with shutdown.scope:
                async with open_store(cfg.database) as store:
                    pipeline = Pipeline(cfg, store, sink, metrics,
                                        poll_s=cfg.pipeline.poll_interval_ms / 1000,
                                        finite=False, roles=roles)
                    shutdown.on_stop(pipeline.stop_sources)
                    await pipeline.run(live_source(cfg, store, metrics, ready,
                                                   serve_webhooks="webhook" in roles,
                                                   sink=sink))
            nursery.cancel_scope.cancel()

    with ExitStack() as stack:
        sink = OutcomeSink(stack.enter_context(open(args.out, "a")) if args.out else None,
                           live=True)
        trio.run(main, sink)
    print("actions: " + ", ".join(f"{a}={n}" for a, n in sorted(sink.actions.items())))
    if cfg.metrics.summary:
        print(summary_table(metrics, 0))
    if shutdown.expired:  # nothing is lost: another process, or the next start, redoes them
        logger.warning("shutdown grace expired: unfinished turns were cancelled; their "
                       "conversations stay pending in the database and are redone by the "
                       "next process that claims them")
    return EXIT_OK


def _cmd_escalations(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "resolve" and args.id is None:
        print("pipeline escalations resolve: give the id of the escalation (see list)",
              file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        async with open_store(cfg.database) as store:
            if args.action == "list":
                rows = await store.open_escalations(args.instance)
                for e in rows:
                    print(f"{e.id}\t{e.instance}\t{e.sender}\t{e.created_at:%Y-%m-%d %H:%M}"
                          f"\t{e.reason}")
                print(f"{len(rows)} open", file=sys.stderr)
                return EXIT_OK
            if await store.resolve_escalation(args.id, args.by):
                print(f"resolved {args.id}: the assistant answers this conversation again")
                return EXIT_OK
            print(f"no open escalation {args.id}", file=sys.stderr)
            return EXIT_FAILED

    return int(trio.run(main))


def _cmd_deadletters(args: argparse.Namespace, cfg: Config) -> int:
    from pipeline.deadletters import MEANING, DeadLetters

    if args.action != "list" and args.id is None:
        print(f"pipeline deadletters {args.action}: give the id of the dead letter (see list)",
              file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        async with open_store(cfg.database) as store:
            letters = DeadLetters(store.pool, cfg.database.query_timeout_s)
            if args.action == "list":
                rows = await letters.list(every=args.all)
                for d in rows:
                    print(f"{d.id}\t{d.stage}\t{d.status}\t{d.instance or '-'}\t"
                          f"{d.created_at:%Y-%m-%d %H:%M}\t{d.key or d.origin or '-'}\t"
                          f"{d.reason}")
                print(f"{len(rows)} {'in all' if args.all else 'open'}", file=sys.stderr)
                return EXIT_OK
            if args.action == "show":
                letter = await letters.show(args.id)
                if letter is None:
                    print(f"no dead letter {args.id}", file=sys.stderr)
                    return EXIT_FAILED
                print(json.dumps(letter.whole(), indent=2, ensure_ascii=False, default=str))
                return EXIT_OK
            act = letters.retry if args.action == "retry" else letters.discard
            verdict = await act(args.id, args.by)
            ok = verdict in ("retried", "discarded")
            print(f"dead letter {args.id}: {MEANING[verdict]}",
                  file=sys.stdout if ok else sys.stderr)
            return EXIT_OK if ok else EXIT_FAILED

    return int(trio.run(main))


def _cmd_db(args: argparse.Namespace, cfg: Config) -> int:
    if args.action == "migrate" or cfg.database.dsn:
        return _db_online(args.action, cfg)
    cluster = cluster_for(cfg.database)
    if args.action == "start":  # on purpose: it stays up when pipeline processes leave
        print("started" if cluster.keep_running() else "already running", cluster.data_dir)
    elif args.action == "stop":  # unless a pipeline process uses it (ClusterError)
        print("stopped" if cluster.stop_unused() else "not running", cluster.data_dir)
    elif args.action == "status":
        status = cluster.status()
        print(status, cluster.data_dir)
        return EXIT_OK if status == "running" else 3
    else:
        print(cluster.url(DEFAULT_DBNAME))
    return EXIT_OK


def _db_online(action: str, cfg: Config) -> int:
    if action in ("start", "stop"):
        print(f"pipeline db {action}: database.dsn is set, so there is no embedded cluster to "
              f"{action}", file=sys.stderr)
        return EXIT_USAGE
    if action == "url":
        print(redacted(cfg)["database"]["dsn"])
        return EXIT_OK

    async def check() -> None:
        async with open_store(cfg.database) as store:
            await store.ping()

    trio.run(check)
    print("migrated" if action == "migrate" else "reachable")
    return EXIT_OK
