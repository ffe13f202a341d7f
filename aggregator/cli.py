"""Commands: ``aggregator run | broker | gen | audit`` (CONTRACT §7)."""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
import time

from aggregator import config
from aggregator.broker import BrokerError, EmbeddedBroker, ensure_topics


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("AGG_LOG_FORMAT", "json") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "faust", "mode", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def print_snapshot_table(snaps: list[dict]) -> None:
    """A readable per-region table for each closed window (``make run``)."""
    by_window: dict[int, list[dict]] = {}
    for s in snaps:
        by_window.setdefault(s["window_start"], []).append(s)
    for ws, rows in sorted(by_window.items()):
        start = time.strftime("%H:%M:%S", time.gmtime(ws / 1000))
        end = time.strftime("%H:%M:%S", time.gmtime(rows[0]["window_end"] / 1000))
        lines = [f"\nwindow {start}-{end} UTC", f"  {'region':<24}{'count':>10}{'late':>8}"]
        for r in sorted(rows, key=lambda r: r["region"]):
            lines.append(f"  {r['region']:<24}{r['count']:>10}{r['late']:>8}")
        lines.append(f"  {'total':<24}{sum(r['count'] for r in rows):>10}{sum(r['late'] for r in rows):>8}")
        print("\n".join(lines), flush=True)


def start_embedded_broker(settings: config.Settings) -> EmbeddedBroker | None:
    """The embedded broker on AGG_BROKER_PORT, or None after a clear error."""
    try:
        return EmbeddedBroker(settings.broker_port).start()
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_broker(settings: config.Settings, args: argparse.Namespace) -> int:
    broker = start_embedded_broker(settings)
    if broker is None:
        return 2
    print(f"embedded broker on {broker.url} (Ctrl-C to stop)", flush=True)
    stop = {"flag": False}

    def _stop(*_a: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["flag"] and broker.exited() is None:
            time.sleep(0.2)
    finally:
        broker.stop()
    return 0


def cmd_run(settings: config.Settings, args: argparse.Namespace) -> int:
    broker = None
    if settings.role != "all" and not settings.broker:
        print(f"error: --role {settings.role} needs AGG_BROKER: the embedded broker of one `aggregator run` "
              "is not shared; start one with `aggregator broker`, or use a Kafka cluster", file=sys.stderr)
        return 2
    tune_gc()
    if not settings.broker:
        broker = start_embedded_broker(settings)
        if broker is None:
            return 2
        settings.broker = broker.url
        print(f"embedded broker on {broker.url}", flush=True)
    try:
        try:
            asyncio.run(ensure_topics(settings.bootstrap(), settings.partitions))
        except BrokerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if settings.role == "ingest":
            from aggregator.ingest import service as ingest_service
            print(f"aggregator (ingest): HTTP on http://{settings.web_host}:{settings.web_port} "
                  f"(POST /v1/events, GET /metrics, /healthz, /readyz)", flush=True)
            asyncio.run(ingest_service.serve(settings))
            return 0
        os.makedirs(settings.data_dir, exist_ok=True)
        import faust

        from aggregator.worker.app import Worker
        on_snaps = print_snapshot_table if args.print_snapshots else None
        worker = Worker(settings, on_snapshots=on_snaps)
        routes = "GET /metrics, /v1/snapshots, /healthz, /readyz"
        print(f"aggregator{' (worker)' if settings.role == 'worker' else ''}: HTTP on "
              f"http://{settings.web_host}:{settings.web_port} "
              f"({routes if settings.role == 'worker' else 'POST /v1/events, ' + routes})", flush=True)
        fw = faust.Worker(worker.app, loglevel=settings.log_level.lower(), quiet=True,
                          redirect_stdouts=False, override_logging=False)
        fw.spinner = None  # a terminal spinner would print escape codes into our log lines
        fw.execute_from_commandline()
        return 0
    finally:
        if broker:
            broker.stop()


# CPython collects its youngest generation every 700 net container allocations, the
# middle one every 10 of those, and the whole heap once enough has been promoted.  The
# worker keeps each fetched batch (up to hundreds of thousands of records and event
# tuples) alive while it counts it: with the default thresholds every batch was
# promoted into the oldest generation, and collections that walk the whole heap (Faust,
# aiokafka, aiohttp) ran every second batch or so, about a third of the worker's CPU.
# Here the middle generation is collected every million allocations, so a batch is
# dead before it could be promoted; youngest-generation pauses stay a few ms.  Measured
# (gc.callbacks, 1M-event backlog): 0.3 s of collection per million events, against
# 0.4-0.7 s with (10000, 10, 10) and more than a third of all CPU with the default.
# Every role gets them; the ingest role's share of this was not measured on its own.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aggregator", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the service (embedded broker unless --broker)")
    config.add_arguments(p_run)
    p_run.add_argument("--print-snapshots", action="store_true",
                       help="print each closed window as a per-region table")
    p_broker = sub.add_parser("broker", help="run the embedded broker alone")
    config.add_arguments(p_broker)
    from aggregator.gen import cli as gen_cli
    gen_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.cmd in ("gen", "audit"):
        return gen_cli.run(args)
    settings = config.load(args)
    setup_logging(settings.log_level)
    if args.cmd == "broker":
        return cmd_broker(settings, args)
    return cmd_run(settings, args)


if __name__ == "__main__":
    sys.exit(main())
