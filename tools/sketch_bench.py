"""Per-event cost of the sketch layer (aggregator/core/sketches/), one loop, one core.

    python -m tools.sketch_bench                 # CellAggregates.add and add_many, 1M events
    python -m tools.sketch_bench --events 200000 --runs 3
    python -m tools.sketch_bench --compare       # hand-written sketches vs Apache DataSketches
                                                 # (needs `pip install datasketches`)

The events are synthetic and made before timing: a 64-bit user hash from 50,000 users
(``--users``), a URL (hash and text) from 2,000 (``--urls``) with Zipf-like frequencies, a client delay of 20 ms to
a few seconds (1 % negative), each part present on every event.  A cost is the median
of ``--runs`` runs, in µs per event, with the bare loop over the same tuples beside it.
"""
from __future__ import annotations

import argparse
import base64
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from aggregator.core.sketches import CellAggregates, SketchParams, hash64, hll_estimate

Event = tuple[int, int, str, int]


def synthetic(n: int, seed: int = 1, n_users: int = 50_000, n_urls: int = 2_000) -> list[Event]:
    rng = random.Random(seed)
    users = [rng.getrandbits(64) for _ in range(n_users)]
    urls = [f"https://shop.example.com/p/{i}" for i in range(n_urls)]
    hashes = [hash64(u) for u in urls]
    weights = [1 / (i + 1) for i in range(len(urls))]
    picks = rng.choices(range(len(urls)), weights, k=n)
    out = []
    for k in range(n):
        i = picks[k]
        delay = -rng.randrange(1, 50) if rng.random() < 0.01 else int(rng.lognormvariate(5, 1.2)) + 20
        out.append((users[rng.randrange(len(users))], hashes[i], urls[i], delay))
    return out


def timed(fn: Callable[[], Any], runs: int) -> float:
    """Median CPU time of ``fn`` in seconds over ``runs`` runs (the CPU time of this
    process: steadier than wall time on a machine shared with other work)."""
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def per_event(events: Sequence[Event], runs: int) -> None:
    n = len(events)

    def bare() -> None:
        for _u, _h, _t, _d in events:
            pass

    def add() -> None:
        cell = CellAggregates()
        f = cell.add
        for u, h, t, d in events:
            f(u, h, t, d)

    cols = [list(c) for c in zip(*events, strict=True)]

    def add_many() -> None:
        CellAggregates().add_many(*cols)

    def add_many_1k() -> None:  # batches of 1000, as a worker's per-partition batches would be
        cell = CellAggregates()
        for i in range(0, n, 1000):
            cell.add_many(cols[0][i:i + 1000], cols[1][i:i + 1000], cols[2][i:i + 1000], cols[3][i:i + 1000])

    base = timed(bare, runs)
    print(f"{n} events, {len({e[0] for e in events})} distinct users, {len({e[1] for e in events})} distinct URLs, "
          f"median of {runs} runs, Python {sys.version.split()[0]}")
    print(f"  bare loop over the tuples            {base / n * 1e6:6.3f} µs/event")
    for name, fn in (("CellAggregates.add (all four parts)", add), ("add_many, one batch of all", add_many),
                     ("add_many, batches of 1000", add_many_1k)):
        t = timed(fn, runs)
        print(f"  {name:<36} {t / n * 1e6:6.3f} µs/event  ({(t - base) / n * 1e6:.3f} over the bare loop)")
    cell = CellAggregates()
    cell.add_many(*cols)
    state = orjson.dumps(cell.to_json())
    t_ser = timed(lambda: orjson.dumps(cell.to_json()), runs)
    t_de = timed(lambda: CellAggregates.from_json(orjson.loads(state)), runs)
    t_res = timed(lambda: cell.result(10), runs)
    print(f"  state of this cell: {len(state)} bytes; to_json+dumps {t_ser * 1e3:.2f} ms, "
          f"loads+from_json {t_de * 1e3:.2f} ms, result() {t_res * 1e3:.2f} ms")


def compare(runs: int) -> None:
    try:
        import datasketches as ds  # optional, only for this comparison
    except ImportError:
        sys.exit("--compare needs the datasketches package: pip install datasketches")
    rng = random.Random(7)
    n = 200_000
    hs = [rng.getrandbits(64) for _ in range(n)]
    p = SketchParams()

    print(f"unique users, HyperLogLog at lg_k={p.hll_p}, {n} distinct users, median of {runs} runs:")

    def mine() -> CellAggregates:
        cell = CellAggregates(p)
        f = cell.add
        for h in hs:
            f(h, None, None, None)
        return cell

    def mine_many() -> CellAggregates:
        cell = CellAggregates(p)
        cell.add_many(hs, (), (), ())
        return cell

    def theirs(kind: Any) -> Callable[[], Any]:
        def run() -> Any:
            sk = ds.hll_sketch(p.hll_p, kind)
            f = sk.update
            for h in hs:
                f(h)
            return sk
        return run

    for name, fn in (("hand-written, CellAggregates.add", mine), ("hand-written, add_many", mine_many),
                     ("datasketches hll_sketch HLL_8 .update", theirs(ds.HLL_8)),
                     ("datasketches hll_sketch HLL_4 .update", theirs(ds.HLL_4))):
        print(f"  {name:<40} {timed(fn, runs) / n * 1e6:6.3f} µs/update")

    a = mine()
    b2 = CellAggregates(p)
    b2.add_many([rng.getrandbits(64) for _ in range(n)], (), (), ())
    t_m = timed(lambda: CellAggregates.from_json(a.to_json()).merge(b2), runs)
    sa, sb = theirs(ds.HLL_8)(), theirs(ds.HLL_8)()

    def ds_merge() -> Any:
        u = ds.hll_union(p.hll_p)
        u.update(sa)
        u.update(sb)
        return u.get_result(ds.HLL_8)

    t_d = timed(ds_merge, runs)
    print(f"  merge of two: hand-written {t_m * 1e3:.2f} ms (copy through to_json/from_json included), "
          f"datasketches hll_union {t_d * 1e3:.2f} ms")
    size_mine = len(orjson.dumps(a.to_json()["uh"]))
    sizes = {k: len(theirs(v)().serialize_compact()) for k, v in (("HLL_8", ds.HLL_8), ("HLL_6", ds.HLL_6), ("HLL_4", ds.HLL_4))}
    print(f"  serialised (as JSON text): hand-written {size_mine} bytes; datasketches compact "
          + ", ".join(f"{k} {v} raw / {4 * ((v + 2) // 3)} base64" for k, v in sizes.items()))

    print("  accuracy, relative error |estimate - n| / n over 20 seeds (mean, max):")
    for size in (1_000, 10_000, 100_000, 1_000_000):
        seeds = 20 if size <= 100_000 else 4
        errs_m, errs_e, errs_d = [], [], []
        for seed in range(seeds):
            r = random.Random(1000 + seed)
            users = [r.getrandbits(64) for _ in range(size)]
            cell = CellAggregates(p)
            cell.add_many(users, (), (), ())
            errs_m.append(abs(cell.unique_users() - size) / size)
            regs = base64.b64decode(cell.to_json()["uh"])
            errs_e.append(abs(hll_estimate(regs, p.hll_p) - size) / size)
            sk = ds.hll_sketch(p.hll_p, ds.HLL_8)
            for u in users:
                sk.update(u)
            errs_d.append(abs(sk.get_estimate() - size) / size)
        print(f"    n={size:>9,}  hand-written HIP {statistics.mean(errs_m):6.2%} {max(errs_m):6.2%}, "
              f"after a merge (Ertl) {statistics.mean(errs_e):6.2%} {max(errs_e):6.2%}   "
              f"datasketches {statistics.mean(errs_d):6.2%} {max(errs_d):6.2%}   ({seeds} seeds)")
    assert hll_estimate(bytes(1 << p.hll_p), p.hll_p) == 0

    events = synthetic(n)
    print(f"top URLs, {n} events over 2,000 Zipf-like URLs:")

    def mg() -> CellAggregates:
        cell = CellAggregates(p)
        f = cell.add
        for _u, h, t, _d in events:
            f(None, h, t, None)
        return cell

    def fi() -> Any:
        sk = ds.frequent_strings_sketch(7)  # 2**7 = 128 counters, as url_capacity
        f = sk.update
        for _u, _h, t, _d in events:
            f(t)
        return sk

    print(f"  hand-written Misra-Gries (128 counters)   {timed(mg, runs) / n * 1e6:6.3f} µs/update")
    print(f"  datasketches frequent_strings_sketch(7)  {timed(fi, runs) / n * 1e6:6.3f} µs/update")
    truth: dict[str, int] = {}
    for _u, _h, t, _d in events:
        truth[t] = truth.get(t, 0) + 1
    top = sorted(truth.items(), key=lambda kv: -kv[1])[:3]
    mine_top = mg().top_urls(3)
    their_top = fi().get_frequent_items(ds.frequent_items_error_type.NO_FALSE_POSITIVES)[:3]
    print(f"  true top 3:   {top}")
    print(f"  hand-written: {[(e['url'], e['count']) for e in mine_top]}")
    print(f"  datasketches: {[(i[0], i[1]) for i in their_top]}  (item, estimate)")
    print(f"  serialised: hand-written {len(orjson.dumps(mg().to_json()['t']))} bytes JSON; "
          f"datasketches {len(fi().serialize())} bytes raw")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.sketch_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--users", type=int, default=50_000, help="distinct users the events are drawn from")
    ap.add_argument("--urls", type=int, default=2_000, help="distinct URLs the events are drawn from (Zipf-like)")
    ap.add_argument("--compare", action="store_true", help="hand-written sketches vs the datasketches package")
    args = ap.parse_args(argv)
    if args.compare:
        compare(args.runs)
    else:
        per_event(synthetic(args.events, n_users=args.users, n_urls=args.urls), args.runs)


if __name__ == "__main__":
    main()
