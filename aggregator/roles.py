"""The composition root: which parts one ``aggregator run`` process runs, wired once.

=========  ===============================================  ==============================
role       parts                                            readiness (``/readyz``)
=========  ===============================================  ==============================
all        ingest producer + handler, worker, HTTP routes    worker ready
ingest     ingest producer + handler, HTTP routes            broker knows ``clicks``
worker     worker, HTTP routes (POST /v1/events: 503)        worker ready
=========  ===============================================  ==============================

Every part with a lifecycle is a ``mode.Service`` handed to one ``mode.Worker`` (Faust's,
for the roles with a worker), which starts them in order, stops them in reverse order on
SIGTERM/SIGINT and exits: the ingest producer first (so it is there to flush last), then
the HTTP server (so it answers ``/healthz`` while the worker recovers, and finishes the
requests in flight before the producer flushes), then the Faust app.  A stop that has not
ended ``stopbound.STOP_BOUND_S`` after the signal (the broker is gone) ends there, and one
that did not leave the consumer group says so: one line, status ``stopbound.EXIT_UNCLEAN_STOP``.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import mode

from aggregator import stopbound, tracing
from aggregator.background import BackgroundService
from aggregator.broker.probe import BrokerProbe
from aggregator.config import Settings
from aggregator.core.contract import Snapshot
from aggregator.core.snapshots import SnapshotStore
from aggregator.ingest.budget import InflightBudget
from aggregator.ingest.handler import IngestHandler
from aggregator.ingest.producer import IngestProducer
from aggregator.metrics import Metrics
from aggregator.web.server import Handler, HttpServer, NoSnapshots, Routes, SnapshotSource

log = logging.getLogger("aggregator")


def run(settings: Settings, print_snapshots: bool = False, notes: dict[str, str] | None = None,
        external_broker: bool = True, announce: Callable[[int], None] | None = None) -> None:
    """Run the role of ``settings`` until a signal stops it (raises SystemExit); ``notes`` are
    shown in every ``/readyz`` answer (e.g. that the embedded broker keeps nothing).
    ``external_broker``: False when ``settings.broker`` is the embedded broker this process
    started (cli.cmd_run sets it to that broker's address); ``announce`` is called with the
    HTTP port once it is bound."""
    try:
        tracing.setup_from_env()  # off unless OTEL_TRACES_EXPORTER names an exporter (docs/tracing.md)
    except tracing.TracingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    metrics = Metrics(settings.grace_seconds, settings.window_seconds, settings.region_idle_seconds)
    probe = BrokerProbe(settings.bootstrap(), metrics.broker_reachable)
    services: list[mode.Service] = [probe]
    post: Handler | None = None
    producer: IngestProducer | None = None
    if settings.role in ("all", "ingest"):
        # idempotent on Kafka; the embedded broker (Tansu) does not grant producer ids
        producer = IngestProducer(settings.bootstrap(), settings.kafka_security().aiokafka_kwargs(),
                                  idempotent=external_broker, linger_s=settings.linger_s(not external_broker),
                                  on_idempotence=metrics.ingest_idempotent, topic=settings.topics.clicks)
        post = IngestHandler(producer, metrics, settings.ingest_token, settings.max_body_bytes, settings.max_regions,
                             region_idle_ms=settings.idle_ms,
                             budget=InflightBudget(settings.ingest_max_inflight_bytes),
                             body_timeout_s=settings.http_body_timeout_seconds, dedup=settings.dedup_ms > 0,
                             aggregates=settings.aggregates, url_keep_query=settings.url_keep_query)
        services.append(producer)
    options: dict[str, Any] = {"loglevel": settings.log_level.lower(), "quiet": True, "redirect_stdouts": False,
                               "override_logging": False}
    if settings.role == "ingest":
        assert producer is not None
        ingest = producer
        services.append(_http(settings, metrics, NoSnapshots(), probe,
                              lambda: ingest.refused or (None if ingest.ready else "connecting to the broker"), post,
                              notes,
                              announce=announce))
        services.append(HeapFreezer(lambda: ingest.ready))
        mw = mode.Worker(*services, **options)
        stopbound.install(mw, settings.role, lambda: probe.reachable)
        mw.execute_from_commandline()
        return
    # the ingest role runs without loading Faust; aggregator.worker drops Faust's own variables
    # from the environment before it loads Faust (worker/__init__.py)
    from aggregator.worker.faust_app import FaustWorker
    from aggregator.worker.history import SnapshotHistory
    from aggregator.worker.service import WorkerService

    store = SnapshotStore()
    sinks = [store.add, print_snapshot_table] if print_snapshots else [store.add]
    worker = WorkerService(settings, metrics, sinks)
    services.append(SnapshotHistory(settings.bootstrap(), store, settings.kafka_security(),
                                    topic=settings.topics.snapshots))
    refused = (lambda: producer.refused) if producer is not None else (lambda: None)
    services.append(_http(settings, metrics, store, probe, lambda: refused() or worker.not_ready(), post, notes,
                          worker.not_alive, announce))
    services.append(HeapFreezer(worker.ready))
    fw = FaustWorker(worker.app, *services, **options)
    fw.spinner = None  # a terminal spinner would print escape codes into our log lines
    stopbound.install(fw, settings.role, lambda: probe.reachable, worker.kafka.not_left)
    fw.execute_from_commandline()


class HeapFreezer(BackgroundService):
    """Once the role is first ready, move every object alive then (imports, the parts, Faust
    and aiokafka set up: ~150k objects in the worker, ~70k in ingest, nearly all living as
    long as the process) out of the garbage collector's reach, with ``gc.freeze``.  A full
    collection walks every tracked object; these were most of them.  Garbage cycles left
    from start-up, if any, stay frozen with them: a bounded amount, once (process.GC_THRESHOLDS
    has the rest of the GC tuning)."""

    POLL_S = 0.5

    def __init__(self, ready: Callable[[], bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ready = ready
        self.frozen = 0  # objects frozen (0: not yet)

    async def background(self) -> None:
        while not self.ready():  # noqa: ASYNC110 - a predicate over several parts; no event to await
            await asyncio.sleep(self.POLL_S)
        gc.freeze()  # no gc.collect() first: a full collection here was a ~130 ms pause as counting begins
        self.frozen = gc.get_freeze_count()
        log.info("startup heap frozen: %d objects left out of garbage collection", self.frozen)


def _http(settings: Settings, metrics: Metrics, snapshots: SnapshotSource, probe: BrokerProbe,
          not_ready: Callable[[], str | None], post: Handler | None, notes: dict[str, str] | None,
          not_alive: Callable[[], str | None] | None = None,
          announce: Callable[[int], None] | None = None) -> HttpServer:
    def why() -> str | None:
        return "broker unreachable" if not probe.reachable else not_ready()

    return HttpServer(Routes(metrics, snapshots, why, post, notes, not_alive), settings.web_host, settings.web_port,
                      settings.max_body_bytes, max_connections=settings.http_max_connections,
                      header_timeout=settings.http_header_timeout_seconds, on_listening=announce)


def print_snapshot_table(snaps: Sequence[Snapshot]) -> None:
    """A readable per-region table for each closed window (``make run``)."""
    print(snapshot_table(snaps), flush=True)


TOP_PAGE_CHARS = 36  # a longer top page is cut, with "..." at its end


def snapshot_table(snaps: Sequence[Snapshot]) -> str:
    """The per-region table of each window of ``snaps``: count and late; with aggregates
    (AGG_AGGREGATES), also the unique users and the most visited page with its visits."""
    by_window: dict[int, list[Snapshot]] = {}
    for s in snaps:
        by_window.setdefault(s["window_start"], []).append(s)
    out = []
    for ws, rows in sorted(by_window.items()):
        start = time.strftime("%H:%M:%S", time.gmtime(ws / 1000))
        end = time.strftime("%H:%M:%S", time.gmtime(rows[0]["window_end"] / 1000))
        aggs = any("unique_users" in r for r in rows)
        head = f"  {'region':<24}{'count':>10}{'late':>8}"
        if aggs:
            head += f"{'users':>9}  {'top page':<{TOP_PAGE_CHARS}}{'visits':>8}"
        lines = [f"\nwindow {start}-{end} UTC", head]
        for r in sorted(rows, key=lambda r: r["region"]):
            line = f"  {r['region']:<24}{r['count']:>10}{r['late']:>8}"
            if aggs:
                top = r.get("top_urls") or []
                page, visits = (str(top[0]["url"]), str(top[0]["count"])) if top else ("-", "-")
                if len(page) > TOP_PAGE_CHARS - 1:
                    page = page[:TOP_PAGE_CHARS - 4] + "..."
                line += f"{r.get('unique_users', '-'):>9}  {page:<{TOP_PAGE_CHARS}}{visits:>8}"
            lines.append(line.rstrip())
        lines.append(f"  {'total':<24}{sum(r['count'] for r in rows):>10}{sum(r['late'] for r in rows):>8}")
        out.append("\n".join(lines))
    return "\n".join(out)
