"""``aggregator gen`` and ``aggregator audit``."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request

from aggregator import config
from aggregator.core.contract import Snapshot
from aggregator.gen.audit import audit, fetch_topic_snapshots, missing_windows, table
from aggregator.gen.generator import generate


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser("gen", help="send a synthetic click-stream over HTTP")
    g.add_argument("--url", default="http://127.0.0.1:8080", help="service base URL")
    g.add_argument("--rate", type=float, default=200.0, help="target events/s (0: as fast as possible)")
    g.add_argument("--count", type=int, default=0, help="events to send (default: rate x duration)")
    g.add_argument("--duration", type=float, default=60.0, help="seconds, when --count is not given")
    g.add_argument("--regions", type=int, default=8)
    g.add_argument("--skew", type=float, default=1.1, help="Zipf exponent of region popularity")
    g.add_argument("--batch", type=int, default=100, help="events per request")
    g.add_argument("--concurrency", type=int, default=4)
    g.add_argument("--bad-fraction", type=float, default=0.0, help="fraction of malformed records")
    g.add_argument("--delayed-fraction", type=float, default=0.0, help="fraction with an old client ts")
    g.add_argument("--late-after-seconds", type=float, default=300.0)
    g.add_argument("--window-seconds", type=float, default=60.0)
    g.add_argument("--token", default="", help="bearer token (AGG_INGEST_TOKEN)")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--truth", default="", help="write ground truth JSON here")
    g.add_argument("--kafka", default="", metavar="BOOTSTRAP",
                   help="produce straight to topic clicks at this Kafka bootstrap (host:port) instead of HTTP")
    g.add_argument("--hot-region", default="", help="a region that bursts (added if not among --regions)")
    g.add_argument("--burst-multiplier", type=float, default=1000.0, help="hot region's traffic x this during the burst")
    g.add_argument("--burst-start", type=float, default=0.0, help="seconds after start the burst begins")
    g.add_argument("--burst-duration", type=float, default=0.0, help="burst length in seconds (0: no burst)")
    g.add_argument("--clock-skew-ms", type=int, default=0, help="producer clock skew added to client ts")
    g.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    a = sub.add_parser("audit", help="compare published snapshots with ground truth")
    a.add_argument("--truth", required=True)
    a.add_argument("--spilled-regions", default="", metavar="R1,R2",
                   help="regions over their rate limit: checked by the identity counted + late == accepted")
    a.add_argument("--url", default="http://127.0.0.1:8080", help="service base URL (/v1/snapshots)")
    a.add_argument("--kafka", default="", metavar="BOOTSTRAP",
                   help="read every snapshot from topic click-snapshots at this Kafka bootstrap (host:port) "
                        "instead of one service's /v1/snapshots: with several workers each lists only its own")
    a.add_argument("--wait", type=float, default=0.0,
                   help="seconds to wait for every window of the truth to be published (default: don't)")


def fetch_snapshots(url: str) -> list[Snapshot]:
    with urllib.request.urlopen(url + "/v1/snapshots", timeout=10) as resp:
        return json.loads(resp.read())["snapshots"]


def run(args: argparse.Namespace) -> int:
    if args.cmd == "gen":
        count = args.count or int(args.rate * args.duration)
        truth = asyncio.run(generate(
            args.url, args.rate, count, args.regions, args.seed, args.batch,
            int(args.window_seconds * 1000), skew=args.skew, bad_fraction=args.bad_fraction,
            delayed_fraction=args.delayed_fraction, late_after_ms=int(args.late_after_seconds * 1000),
            token=args.token, concurrency=args.concurrency, progress_interval=args.progress_interval,
            kafka=args.kafka, hot_region=args.hot_region, burst_multiplier=args.burst_multiplier,
            burst_start=args.burst_start, burst_duration=args.burst_duration, clock_skew_ms=args.clock_skew_ms,
            security=config.load().kafka_security()))
        if args.truth:
            with open(args.truth, "w") as f:
                json.dump(truth.to_json(), f)
        return 0
    with open(args.truth) as f:
        truth = json.load(f)
    def fetch() -> list[Snapshot]:
        return fetch_topic_snapshots(args.kafka, config.load().kafka_security()) if args.kafka else fetch_snapshots(args.url)

    snaps = fetch()
    deadline = time.monotonic() + args.wait
    while missing_windows(truth, snaps) and time.monotonic() < deadline:
        time.sleep(0.5)
        snaps = fetch()
    spilled = frozenset(r.strip().lower() for r in args.spilled_regions.split(",") if r.strip())
    problems = audit(truth, snaps, spilled)
    print(table(truth, snaps))
    if problems:
        print(f"\nAUDIT FAILED: {len(problems)} mismatches", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    print("\naudit: published snapshots match the ground truth exactly")
    return 0
