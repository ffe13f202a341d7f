"""Commands: ``aggregator run | broker | gen | audit`` (docs/contract.md §7)."""
from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import time

from aggregator import config, roles
from aggregator.broker import BrokerError, EmbeddedBroker, ensure_topics, partition_counts
from aggregator.broker.embedded import MEMORY_ONLY
from aggregator.core.contract import APP_ID, CLICKS, STATE_CHANGELOG
from aggregator.dirlock import DirInUse, DirLock, lock_dirs
from aggregator.logs import setup_logging

HELD_LOCKS: list[DirLock] = []  # the local state directories this process owns
ROUTES = {
    "all": "POST /v1/events, GET /metrics, /v1/snapshots, /healthz, /readyz",
    "ingest": "POST /v1/events, GET /metrics, /healthz, /readyz",
    "worker": "GET /metrics, /v1/snapshots, /healthz, /readyz",
}


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
    if not settings.broker and settings.kafka_security().protocol != "PLAINTEXT":
        print("error: AGG_KAFKA_SECURITY_PROTOCOL needs AGG_BROKER: the embedded broker speaks PLAINTEXT only",
              file=sys.stderr)
        return 2
    tune_gc()
    if settings.role != "ingest":  # the ingest role keeps nothing on disk
        try:
            HELD_LOCKS.extend(lock_dirs(settings.data_dir, settings.spill_path))  # until the process exits
        except (DirInUse, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not settings.broker:
        broker = start_embedded_broker(settings)
        if broker is None:
            return 2
        settings.broker = broker.url
        print(f"embedded broker on {broker.url}\nnote: {MEMORY_ONLY}", flush=True)
    try:
        try:
            asyncio.run(ensure_topics(settings.bootstrap(), settings.partitions, security=settings.kafka_security(),
                                      replication_factor=settings.topic_replication_factor,
                                      min_insync_replicas=settings.topic_min_insync_replicas))
            problem = check_partitions(settings)
        except BrokerError as exc:
            problem = str(exc)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        print(f"aggregator{'' if settings.role == 'all' else f' ({settings.role})'}: HTTP on "
              f"http://{settings.web_host}:{settings.web_port} ({ROUTES[settings.role]})", flush=True)
        roles.run(settings, print_snapshots=args.print_snapshots,  # exits by SystemExit
                  notes={"broker": MEMORY_ONLY} if broker else None)
        return 0
    finally:
        if broker:
            broker.stop()


def check_partitions(settings: config.Settings) -> str | None:
    """Adopt the partition count ``clicks`` really has (it may have been created by someone
    else, or grown); refuse (a message) when the window state's changelog has another count:
    its records are keyed by partition of ``clicks``."""
    counts = asyncio.run(partition_counts(settings.bootstrap(), [CLICKS, STATE_CHANGELOG],
                                          security=settings.kafka_security()))
    clicks = counts.get(CLICKS)
    if clicks is None:
        return f"topic {CLICKS} has no partitions on {settings.bootstrap()}"
    if clicks != settings.partitions:
        print(f"note: {CLICKS} has {clicks} partitions (AGG_PARTITIONS is {settings.partitions}): using {clicks}",
              flush=True)
        settings.partitions = clicks
    changelog = counts.get(STATE_CHANGELOG)
    if settings.role != "ingest" and changelog is not None and changelog != clicks:
        return (f"{STATE_CHANGELOG} has {changelog} partitions but {CLICKS} has {clicks}: the window state is "
                f"kept per partition of {CLICKS}, so the two must match; give {CLICKS} back {changelog} "
                "partitions, or start from new state (delete the changelog topic and the consumer group "
                f"{APP_ID}) after every window has been published")
    return None


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
