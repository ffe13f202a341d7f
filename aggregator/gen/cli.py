"""``aggregator gen`` and ``aggregator audit``.

Both read the service's settings where they share a meaning: ``AGG_WINDOW_SECONDS``,
``AGG_LATE_AFTER_SECONDS``, ``AGG_INGEST_TOKEN`` and ``AGG_URL_KEEP_QUERY`` (gen),
``AGG_AGGREGATES``, ``AGG_TOP_URLS`` and ``AGG_UNIQUE_USERS_PRECISION`` (audit),
``AGG_WEB_HOST``/``AGG_WEB_PORT`` for the default ``--url``, and ``AGG_BROKER`` (with
the Kafka security settings) for a bare ``--kafka``, whose topic names carry
``AGG_TOPIC_PREFIX``; so a generator and an audit started in the service's environment
agree with it."""
from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import click

from aggregator import config
from aggregator.broker.embedded import BrokerError
from aggregator.broker.security import PLAINTEXT, KafkaSecurity
from aggregator.cli import (
    KAFKA_CLIENT_FIELDS,
    Failure,
    _config_option,
    _debug_option,
    load_settings,
    quiet_kafka_client,
    settings_options,
)
from aggregator.core.contract import SNAPSHOTS, Snapshot
from aggregator.core.sketches import SketchParams
from aggregator.gen.audit import (
    DELAY_TOLERANCE,
    EXACT_USERS,
    UNIQUE_USERS_TOLERANCE,
    URL_CAPACITY,
    audit,
    fetch_topic_snapshots,
    has_aggregates,
    missing_windows,
    of_this_run,
    over_counted,
    table,
)
from aggregator.gen.generator import generate

GEN_FIELDS = ("window_seconds", "late_after_seconds", "ingest_token", "url_keep_query", "dedup_seconds", "web_host",
              "web_port", *KAFKA_CLIENT_FIELDS, "topic_prefix")
AUDIT_FIELDS = ("aggregates", "top_urls", "unique_users_precision", "web_host", "web_port", *KAFKA_CLIENT_FIELDS,
                "topic_prefix")
USE_BROKER = "\0AGG_BROKER"  # --kafka given without a value
CONNECT_WAIT = 10.0  # seconds gen waits for the service to answer before it starts
URL_HELP = "service base URL  [default: http://AGG_WEB_HOST:AGG_WEB_PORT, i.e. http://127.0.0.1:8080]"
KAFKA_HELP = ("; without a value: AGG_BROKER. Kafka security from the AGG_KAFKA_* variables, the topic's name "
              "prefixed by AGG_TOPIC_PREFIX")


def default_url(settings: config.Settings) -> str:
    host = settings.web_host
    if host in ("0.0.0.0", "::", ""):  # a listen-everywhere address: reach it on loopback
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.web_port}"


MAX_SKEW = 10.0


def check_skew(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """--skew: a finite Zipf exponent, 0..MAX_SKEW (nan or inf made every weight nan or 0)."""
    if not (math.isfinite(value) and 0 <= value <= MAX_SKEW):
        raise click.BadParameter(f"{value!r} is not a number in 0..{MAX_SKEW:g}")
    return value


def check_urls(urls: str, option: str = "gen: --url") -> list[str]:
    """The comma-separated base URLs, each http(s)://host[:port][/path]; Failure naming the bad one."""
    out = []
    for raw in urls.split(","):
        u = raw.strip().rstrip("/")
        if not u:
            continue
        try:
            parts = urllib.parse.urlsplit(u)
            parts.port  # noqa: B018 - raises ValueError on a port that is not one
        except ValueError as exc:
            raise Failure(f"{option}: {u!r} is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Failure(f"{option}: {u!r} is not an http:// or https:// URL with a host "
                          "(e.g. http://127.0.0.1:8080)")
        out.append(u)
    if not out:
        raise Failure(f"{option}: no URL given")
    return out


def check_writable(path: str, option: str = "gen: --truth") -> None:
    """Failure unless ``path`` can be written (checked before anything is sent)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise Failure(f"{option}: {path} is a directory")
    if not parent.is_dir():
        raise Failure(f"{option}: cannot write {path}: no directory {parent}")
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise Failure(f"{option}: cannot write {path}: permission denied")


def wait_for_service(url: str, wait: float) -> None:
    """Until ``url``/healthz answers (any HTTP status), at most ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() >= deadline:
                reason = getattr(exc, "reason", exc)
                raise Failure(f"gen: nothing answered at {url} within {wait:g} s ({reason}): is the service "
                              "running there? (--url, or AGG_WEB_HOST / AGG_WEB_PORT)") from None
        time.sleep(0.25)


def kafka_bootstrap(value: str, settings: config.Settings) -> str:
    """``--kafka``'s bootstrap (host:port[,...]); '' when not given."""
    if not value:
        return ""
    if value == USE_BROKER:
        if not settings.broker:
            raise Failure("--kafka without a value needs AGG_BROKER (or give --kafka host:port)")
        return settings.bootstrap()
    try:
        config.parse_broker(value)
    except ValueError as exc:
        raise Failure(f"--kafka: {exc}") from None
    return ",".join(h.strip().split("://", 1)[-1] for h in value.split(","))


def _kafka_option(help_text: str) -> Any:
    return click.option("--kafka", default="", is_flag=False, flag_value=USE_BROKER, metavar="[BOOTSTRAP]",
                        help=help_text + KAFKA_HELP, show_default=False)


def register(group: click.Group) -> None:
    group.add_command(gen_command)
    group.add_command(audit_command)


CTX = {"show_default": True}


@click.command("gen", context_settings=CTX)
@click.option("--url", default=None, help=URL_HELP + "; several, comma-separated: requests go round-robin")
@click.option("--retry-fraction", type=click.FloatRange(0, 1), default=0.0,
              help="fraction of accepted bodies sent again with their Idempotency-Key (to another --url when "
                   "there are several), and of events repeating a recent event_id: the service must count each "
                   "once")
@click.option("--rate", type=click.FloatRange(min=0), default=200.0, help="target events/s (0: as fast as possible)")
@click.option("--count", type=click.IntRange(min=0), default=0, help="events to send (0: rate x duration)")
@click.option("--duration", type=click.FloatRange(min=0), default=60.0, help="seconds, when --count is not given")
@click.option("--regions", type=click.IntRange(min=1), default=8, help="number of regions")
@click.option("--skew", type=float, default=1.1, callback=check_skew,
              help=f"Zipf exponent of region popularity, 0..{MAX_SKEW:g}")
@click.option("--batch", type=click.IntRange(min=1), default=100, help="events per request")
@click.option("--concurrency", type=click.IntRange(min=1), default=4, help="requests in flight")
@click.option("--bad-fraction", type=click.FloatRange(0, 1), default=0.0, help="fraction of malformed records")
@click.option("--delayed-fraction", type=click.FloatRange(0, 1), default=0.0, help="fraction with an old client ts")
@settings_options(("late_after_seconds", "window_seconds", "ingest_token"), rename={"ingest_token": "--token"})
@click.option("--seed", type=int, default=1,
              help="random seed: the same seed gives the same stream of regions, users and URLs (event ids and "
                   "Idempotency-Keys also carry a random run id: a rerun is new events, not a retry)")
@click.option("--truth", default="", metavar="FILE",
              help="write ground truth JSON here: counts, and the exact unique users, URL counts and client-delay "
                   "quantiles of every (region, window)")
@_kafka_option("produce straight to topic clicks at this Kafka bootstrap (host:port) instead of HTTP")
@settings_options(("topic_prefix",))
@click.option("--hot-region", default="", help="a region that bursts (added if not among --regions)")
@click.option("--burst-multiplier", type=click.FloatRange(min=0), default=1000.0,
              help="hot region's traffic x this during the burst")
@click.option("--burst-start", type=click.FloatRange(min=0), default=0.0, help="seconds after start the burst begins")
@click.option("--burst-duration", type=click.FloatRange(min=0), default=0.0,
              help="burst length in seconds (0: no burst)")
@click.option("--clock-skew-ms", type=int, default=0, help="producer clock skew added to client ts")
@click.option("--progress-interval", type=click.FloatRange(min=0, min_open=True), default=5.0,
              help="seconds between progress lines")
@_config_option
@_debug_option
def gen_command(**kw: Any) -> int:
    """Send a synthetic click-stream over HTTP (or straight to Kafka), with exact ground truth."""
    settings = load_settings(kw, GEN_FIELDS)
    url = ",".join(check_urls(kw["url"] or default_url(settings)))
    kafka = kafka_bootstrap(kw["kafka"], settings)
    if kw["truth"]:
        check_writable(kw["truth"])  # not after every event has been sent
    count = kw["count"] or int(kw["rate"] * kw["duration"])
    if not kafka:
        for one in url.split(","):
            wait_for_service(one, CONNECT_WAIT)
    security = settings.kafka_security()
    failures: list[BaseException] = []

    async def quiet_generate() -> Any:
        # a request that gave up fails its task; report the first one in one line at the end
        # instead of asyncio's "Task exception was never retrieved" traceback for each
        def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if exc is None:
                loop.default_exception_handler(context)
            else:
                failures.append(exc)

        asyncio.get_running_loop().set_exception_handler(on_error)
        return await generate(
            url, kw["rate"], count, kw["regions"], kw["seed"], kw["batch"],
            settings.window_ms, skew=kw["skew"], bad_fraction=kw["bad_fraction"],
            delayed_fraction=kw["delayed_fraction"], late_after_ms=settings.late_after_ms,
            token=settings.ingest_token, concurrency=kw["concurrency"], progress_interval=kw["progress_interval"],
            kafka=kafka, hot_region=kw["hot_region"], burst_multiplier=kw["burst_multiplier"],
            burst_start=kw["burst_start"], burst_duration=kw["burst_duration"], clock_skew_ms=kw["clock_skew_ms"],
            security=security, retry_fraction=kw["retry_fraction"],
            # the aggregates' truth only when it is written: it holds the recent windows' users
            aggregates=bool(kw["truth"]), url_keep_query=settings.url_keep_query,
            reuse_within_ms=settings.dedup_ms // 2, topic=settings.topics.clicks)

    from aiokafka.errors import KafkaError

    try:
        with quiet_kafka_client():  # aiokafka's line per failed connection: the one below instead
            truth = asyncio.run(quiet_generate())
        if failures:
            raise failures[0]
    except BrokerError as exc:  # a refused Kafka login or TLS: one line
        raise Failure(f"gen: {exc}") from None
    except KafkaError as exc:  # before RuntimeError, its base: not an HTTP problem
        raise Failure(f"gen: producing to Kafka at {kafka} failed: {exc} (is a broker "
                      "running there? --kafka, or AGG_BROKER)") from None
    except aiohttp.ClientResponseError as exc:
        hint = ": is AGG_INGEST_TOKEN / --token right?" if exc.status in (401, 403) else ""
        raise Failure(f"gen: POST {url}/v1/events answered {exc.status} {exc.message}{hint}") from None
    except RuntimeError as exc:  # the generator gave up: nothing answered, or only 503s
        raise Failure(f"gen: {exc} (POST {url}/v1/events: is the service running there? --url)") from None
    if kw["truth"]:
        with open(kw["truth"], "w") as f:
            json.dump(truth.to_json(), f)
    return 0


@click.command("audit", context_settings=CTX)
@click.option("--truth", required=True, metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="the ground truth written by `aggregator gen --truth`")
@click.option("--spilled-regions", default="", metavar="R1,R2",
              help="regions over their rate limit: checked by the identity counted + late == accepted")
@click.option("--url", default=None, help=URL_HELP + " (/v1/snapshots)")
@_kafka_option("read every snapshot from topic click-snapshots at this Kafka bootstrap (host:port) instead of "
               "one service's /v1/snapshots (which lists the recent ones only)")
@settings_options(("topic_prefix",))
@click.option("--wait", type=click.FloatRange(min=0), default=0.0,
              help="seconds to wait for every window of the truth to be published (0: don't)")
@click.option("--no-aggregates", is_flag=True,
              help="the service runs with AGG_AGGREGATES off: check counts only, and that no snapshot carries "
                   "aggregates (without it, a truth with aggregates and snapshots without them fail)")
@_config_option
@_debug_option
def audit_command(**kw: Any) -> int:
    """Compare published snapshots with a generator's ground truth (exit 1 on a mismatch)."""
    no_aggregates = kw.pop("no_aggregates")
    settings = load_settings(kw, AUDIT_FIELDS)
    urls = check_urls(kw["url"] or default_url(settings), "audit: --url")
    if len(urls) > 1:
        raise Failure("audit: --url: one URL (each service lists its own recent snapshots; --kafka reads them all)")
    url = urls[0]
    kafka = kafka_bootstrap(kw["kafka"], settings)
    try:
        with open(kw["truth"]) as f:
            truth = json.load(f)
    except (OSError, ValueError) as exc:
        raise Failure(f"audit: cannot read the truth file {kw['truth']}: {exc}") from None
    return run_audit(truth, url, kafka, kw["spilled_regions"], kw["wait"], settings.kafka_security(),
                     top_n=settings.top_urls, users_bound=SketchParams(hll_p=settings.unique_users_precision).users_bound,
                     aggregates=settings.aggregates and not no_aggregates, topic=settings.topics.snapshots)


def fetch_snapshots(url: str) -> list[Snapshot]:
    """Every snapshot ``url`` holds, page by page from the oldest (docs/contract.md §3:
    ``since=0``, then ``after`` = ``next``)."""
    snaps: list[Snapshot] = []
    query = "?limit=2000&since=0"
    while True:
        with urllib.request.urlopen(url + "/v1/snapshots" + query, timeout=10) as resp:
            page = json.loads(resp.read())
        snaps += page["snapshots"]
        if not page.get("more"):  # (a service of before pages answered everything at once)
            return snaps
        query = "?limit=2000&after=" + urllib.parse.quote(page["next"])


def run_audit(truth: Any, url: str, kafka: str, spilled_regions: str, wait: float,
              security: KafkaSecurity = PLAINTEXT, top_n: int = 10, users_bound: float = UNIQUE_USERS_TOLERANCE,
              aggregates: bool = True, topic: str = SNAPSHOTS) -> int:
    """Audit the snapshots of ``url``, or with ``kafka`` those of its topic ``topic``."""
    def fetch() -> list[Snapshot]:
        if kafka:
            from aiokafka.errors import KafkaError
            try:
                with quiet_kafka_client():  # aiokafka's line per failed connection: the one below instead
                    return fetch_topic_snapshots(kafka, security, topic=topic)
            except BrokerError as exc:  # a refused login or TLS: one line
                raise Failure(f"audit: {exc}") from None
            except KafkaError as exc:
                raise Failure(f"audit: cannot read {topic} from Kafka at {kafka}: "
                              f"{exc} (is a broker running there? --kafka, or AGG_BROKER)") from None
        try:
            return fetch_snapshots(url)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Failure(f"audit: cannot fetch {url}/v1/snapshots: {reason} (is the service running there? --url)"
                          ) from None

    snaps = fetch()
    deadline = time.monotonic() + wait
    while missing_windows(truth, snaps) and time.monotonic() < deadline:
        time.sleep(0.5)
        snaps = fetch()
    spilled = frozenset(r.strip().lower() for r in spilled_regions.split(",") if r.strip())
    snaps = of_this_run(truth, snaps)  # not the snapshots of earlier runs the service still lists
    problems = audit(truth, snaps, spilled, top_n, users_bound, aggregates)
    print(table(truth, snaps))
    note = aggregates_note(truth, snaps, spilled, users_bound, aggregates)
    if note:
        print("\n" + note)
    dup = truth.get("duplicates") or {}
    if dup.get("retried_bodies") or dup.get("reused_ids"):
        print(f"\naudit: the generator sent {dup.get('retried_events', 0)} events again in "
              f"{dup.get('retried_bodies', 0)} retried bodies and {dup.get('reused_ids', 0)} events repeating an "
              f"event_id; double counts: {over_counted(truth, snaps)} (must be 0)")
        if not kafka:
            print(service_duplicates(url))
    if problems:
        print(f"\nAUDIT FAILED: {len(problems)} mismatches", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    print("\naudit: published snapshots match the ground truth exactly")
    return 0


def service_duplicates(url: str) -> str:
    """One line on what the service at ``url`` dropped as repeats, by source: its own
    ``clickstream_duplicate_events_total`` (that process's worker since it started, every
    run's), beside the generator's count, or why it is not shown."""
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    by_source: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url + "/metrics?name[]=clickstream_duplicate_events_total", timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "clickstream_duplicate_events_total":
                    source = sample.labels.get("source", "?")
                    by_source[source] = by_source.get(source, 0.0) + sample.value
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
        return f"audit: the service's duplicate count not shown: {url}/metrics: {getattr(exc, 'reason', exc)}"
    # none: no repeats yet, or no worker in that process (an ingest-only one counts none)
    each = ", ".join(f"{n:.0f} by {source}" for source, n in sorted(by_source.items())) or \
        "none: no repeats, or that process runs no worker"
    return (f"audit: the service at {url} dropped {sum(by_source.values()):.0f} events as repeats ({each}; "
            "clickstream_duplicate_events_total: this process's worker since it started, every run's)")


def aggregates_note(truth: Any, snaps: list[Snapshot], spilled: frozenset[str],
                    users_bound: float = UNIQUE_USERS_TOLERANCE, aggregates: bool = True) -> str:
    """One line on what the aggregates' audit covered ('' when the truth has none)."""
    if not aggregates:
        return "audit: aggregates off (--no-aggregates, AGG_AGGREGATES=false): counts only, and no snapshot may carry them"
    cells = truth.get("aggregates") or {}
    if not cells:
        return ""
    if not any(has_aggregates(s) for s in snaps):
        return ("audit: the truth has aggregates but no snapshot carries them (AGG_AGGREGATES off? then "
                "--no-aggregates): a mismatch")
    n = sum(len(per) for r, per in cells.items() if r not in spilled)
    exact = sum(1 for r, per in cells.items() if r not in spilled for c in per.values()
                if c["unique_users"] <= EXACT_USERS)
    skipped = len(truth.get("aggregates_incomplete") or [])
    return (f"audit: aggregates of {n} cells checked ({exact} with unique users <= {EXACT_USERS}: exact; "
            f"{n - exact} above: within {users_bound:.1%}; top URLs exact up to {URL_CAPACITY} distinct, else "
            f"within the Misra-Gries bound, in order; delay quantiles within {DELAY_TOLERANCE:.0%})"
            + (f"; {skipped} cells not checked (events answered after their cell was folded)" if skipped else ""))
