"""The sketch layer (aggregator/core/sketches/): state round trips, merge, replay after a
checkpoint, and the stated bounds against exact counts on seeded data."""
import base64
import math
import os
import random
import subprocess
import sys
import urllib.parse
from collections import Counter
from functools import partial
from pathlib import Path

import orjson
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.core.aggstate import WindowAggregates
from aggregator.core.sketches import (
    MAX_DELAY_MS,
    MAX_URL_CHARS,
    CellAggregates,
    SketchParams,
    UrlCache,
    delay_buckets,
    hash64,
    hll_estimate,
    max_serialised_bytes,
    normalise_url,
    url_hash,
    url_parts,
    user_hash,
)
from aggregator.core.sketches.delays import code_buckets, delay_code
from aggregator.core.sketches.urls import percent_encode
from aggregator.core.sketches.users import UniqueUsers

ROOT = Path(__file__).resolve().parents[3]
P = SketchParams()


def stream(n, n_users, n_urls, seed, zipf=1.0, none_rate=0.0):
    """n events (user hash, url hash, url text, delay ms) of n_users users and n_urls URLs
    with Zipf-like URL frequencies; each part None with probability none_rate."""
    rng = random.Random(seed)
    users = [rng.getrandbits(64) for _ in range(n_users)]
    texts = [f"https://ex.com/page/{i}" for i in range(n_urls)]
    hashes = [url_hash(t) for t in texts]
    picks = rng.choices(range(n_urls), [1 / (i + 1) ** zipf for i in range(n_urls)], k=n)
    out = []
    for k in range(n):
        i = picks[k]
        delay = int(rng.lognormvariate(6, 1.5)) - 30
        ev = [users[rng.randrange(n_users)], hashes[i], texts[i], delay]
        if none_rate:
            if rng.random() < none_rate:
                ev[0] = None
            if rng.random() < none_rate:
                ev[1] = ev[2] = None
            if rng.random() < none_rate:
                ev[3] = None
        out.append(tuple(ev))
    return out


def feed(cell, events, batch=None):
    """add() one by one (batch None) or add_many() in batches of ``batch``."""
    if batch is None:
        for e in events:
            cell.add(*e)
    else:
        for i in range(0, len(events), batch):
            part = events[i:i + batch]
            cell.add_many([e[0] for e in part], [e[1] for e in part], [e[2] for e in part], [e[3] for e in part])
    return cell


def state_bytes(cell):
    return orjson.dumps(cell.to_json())


def restored(cell):
    return CellAggregates.from_json(orjson.loads(state_bytes(cell)))


# Small: every aggregate exact.  Big: users in HyperLogLog mode and URLs purged.
SMALL = dict(n=2_000, n_users=150, n_urls=60)
BIG = dict(n=30_000, n_users=5_000, n_urls=3_000)


# --- URLs and hashes ---------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "want"), [
    ("/home", "/home"),
    ("  /Home?x=1#top ", "/Home"),
    ("HTTPS://User:pw@Example.COM:443/A/b?q#f", "https://example.com/A/b"),
    ("http://Example.com", "http://example.com/"),
    ("http://example.com:8080/x", "http://example.com:8080/x"),
    ("https://example.com:80/x", "https://example.com:80/x"),  # 80 is not https's default
    ("/caf\u00e9 menu", "/caf%C3%A9%20menu"),
    ('/a"b\\c', "/a%22b%5Cc"),
    ("/already%20encoded", "/already%20encoded"),
    ("/a%2fb%c3%a9", "/a%2Fb%C3%A9"),  # escapes' hex upper-cased (RFC 3986 6.2.2.1)
    ("https://B\u00fccher.DE/x", "https://b%C3%BCcher.de/x"),
    ("https://b%c3%bccher.de/x", "https://b%C3%BCcher.de/x"),  # the same page, escaped by its sender
    ("https://\u212a.example/a", "https://%E2%84%AA.example/a"),  # KELVIN SIGN: no Unicode folding onto k
    ("https://M\u00dcNCHEN.de/", "https://m%C3%BCnchen.de/"),  # one host with https://münchen.de/
    ("https://\u0130stanbul.example/", "https://%C4%B0stanbul.example/"),  # İ: its lower case is i and a dot
    ("%zz/%4", "%zz/%4"),  # not escapes: left alone
    ("", None),
    ("   ", None),
    ("?only=query", None),
])
def test_normalise_url(raw, want):
    assert normalise_url(raw) == want


def test_normalise_url_is_its_own_fixed_point():
    rng = random.Random(5)
    alphabet = ["a", "B", "/", "?", "#", "%", "%c3", "%A9", "\u00e9", "\u212a", "\U0001F600", " ", ":", "@", "."]
    for _ in range(5000):
        raw = rng.choice(["https://", "HTTP://", ""]) + "".join(rng.choice(alphabet) for _ in range(rng.randrange(90)))
        for keep in (False, True):
            once = normalise_url(raw, keep)
            assert once is None or normalise_url(once, keep) == once, raw


def test_the_url_cache_answers_as_normalise_url_and_stays_bounded():
    cache = UrlCache(partial(url_parts, keep_query=True), max_entries=3, max_chars=50)
    for raw in ["https://EX.com/a?q=1#f", "  ", "/b", "/b", "/" + "y" * 5000]:
        text = normalise_url(raw, keep_query=True)
        assert cache.parts(raw) == ((None, None) if text is None else (url_hash(text), text))
    assert set(cache.known) == {"https://EX.com/a?q=1#f", "  ", "/b"}  # not the 5001 characters
    cache.parts("/c")  # a fourth: emptied first
    assert list(cache.known) == ["/c"]
    assert UrlCache(url_parts).parts("https://EX.com/a?q=1") == (url_hash("https://ex.com/a"), "https://ex.com/a")


def test_normalise_url_keeps_the_query_when_asked_and_cuts_long_urls():
    assert normalise_url("https://ex.com/s?q=1#frag", keep_query=True) == "https://ex.com/s?q=1"
    assert normalise_url("https://EX.com?q=1", keep_query=True) == "https://ex.com/?q=1"
    assert normalise_url("https://EX.com?q=1") == "https://ex.com/"
    cut = normalise_url("/" + "x" * (MAX_URL_CHARS - 2) + "\u00e9")  # the escape would straddle the cut
    assert cut == "/" + "x" * (MAX_URL_CHARS - 2)
    long = normalise_url("/" + "x" * 5000)
    assert long is not None and len(long) == MAX_URL_CHARS
    for tail in ("\u00e9", "\u2603", "\U0001F600"):  # the cut falls within one character's escapes
        for pad in range(MAX_URL_CHARS - 12, MAX_URL_CHARS):
            text = normalise_url("/" + "a" * pad + tail * 3)
            assert text is not None and len(text) <= MAX_URL_CHARS
            assert urllib.parse.unquote(text, errors="strict")  # whole UTF-8 characters only
            assert text.startswith("/" + "a" * pad) and (len(text) - 1 - pad) % len(percent_encode(tail)) == 0
    huge = "/" + "\u00e9" * 400_000  # from Kafka, a URL of any length: the same as its first characters'
    assert normalise_url(huge) == normalise_url(huge[:MAX_URL_CHARS + 1])
    # one byte per character in JSON: printable ASCII, nothing JSON escapes
    text = normalise_url("/\u2603\u0000\t\"\\" + "\U0001F600")
    assert text is not None and text.isascii() and text.isprintable()
    assert len(orjson.dumps(text)) == len(text) + 2


def test_hashes_are_xxh3_and_the_same_in_every_process():
    assert hash64("u1") == xxhash.xxh3_64_intdigest(b"u1")
    assert user_hash("u1") == hash64("u1") and url_hash("/a") == hash64("/a")
    assert 0 <= hash64("x") < 2**64 and hash64("x") != hash64("y")
    code = ("from aggregator.core.sketches import hash64; import sys; sys.stdout.write(str(hash64('u1')))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
        assert int(out) == hash64("u1")


# --- empty and exact cells ---------------------------------------------------------------

def test_an_empty_cell():
    cell = CellAggregates()
    cell.add(None, None, None, None)
    assert cell.result() == {"unique_users": 0, "top_urls": [], "client_delay_ms": None}
    assert cell.to_json() == {"p": P.key()}
    assert restored(cell).result() == cell.result()


def test_exact_while_small():
    events = stream(**SMALL, seed=1, none_rate=0.1)
    cell = feed(CellAggregates(), events)
    assert cell.exact
    res = cell.result(top_n=20)
    assert res["unique_users"] == len({e[0] for e in events if e[0] is not None})
    truth = Counter(e[2] for e in events if e[2] is not None)
    want = sorted(truth.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert [(u["url"], u["count"]) for u in res["top_urls"]] == want


def test_top_urls_ties_break_by_url_text():
    cell = CellAggregates()
    for text in ["/b", "/a", "/c", "/a", "/b"]:
        cell.add(None, url_hash(text), text, None)
    assert cell.top_urls(3) == [{"url": "/a", "count": 2}, {"url": "/b", "count": 2}, {"url": "/c", "count": 1}]


def test_url_text_as_bytes_is_stored_as_text():
    cell = CellAggregates()
    cell.add(None, url_hash("/a"), b"/a", None)
    cell.add_many([], [url_hash("/b")], [b"/b"], [])
    assert cell.top_urls(5) == [{"url": "/a", "count": 1}, {"url": "/b", "count": 1}]


def test_url_text_of_a_forged_header_keeps_the_stated_bound():
    """Found by a review: header bytes were decoded with undecodable bytes replaced (U+FFFD,
    3 bytes in JSON each), so 128 URLs of 200 bytes 0xff made a cell of 78,844 bytes against
    the stated 46,178.  A text that is not what ingest writes is percent-encoded and cut."""
    cell = CellAggregates()
    for i in range(P.url_capacity):
        cell.add(None, i, bytes([i]) + b"\xff" * (MAX_URL_CHARS - 1), None)
    assert len(state_bytes(cell)) <= max_serialised_bytes()
    cell = CellAggregates()
    cell.add(None, 1, b'/a"b\\c\x00d \xc3\xbc', None)
    assert cell.top_urls(1) == [{"url": "/a%22b%5Cc%00d%20%C3%BC", "count": 1}]
    cell.add(None, 2, b"/ok/%C3%BC", None)  # as ingest writes it: kept as it is
    assert cell.top_urls(2)[1] == {"url": "/ok/%C3%BC", "count": 1}


# --- state: round trip, determinism, replay ------------------------------------------------

@pytest.mark.parametrize("shape", [SMALL, BIG], ids=["exact", "sketch"])
def test_round_trip_gives_the_same_result_and_the_same_bytes(shape):
    cell = feed(CellAggregates(), stream(**shape, seed=2, none_rate=0.05))
    back = restored(cell)
    assert back.result(20) == cell.result(20)
    assert state_bytes(back) == state_bytes(cell)
    assert state_bytes(restored(back)) == state_bytes(cell)


def test_state_bytes_do_not_depend_on_the_process():
    code = ("import orjson, sys; from tests.unit.core.test_sketches import BIG, stream, feed; "
            "from aggregator.core.sketches import CellAggregates; "
            "sys.stdout.buffer.write(orjson.dumps(feed(CellAggregates(), stream(**BIG, seed=3)).to_json()))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=ROOT, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("0", "7")}
    assert outs == {state_bytes(feed(CellAggregates(), stream(**BIG, seed=3)))}


@pytest.mark.parametrize("shape", [SMALL, BIG], ids=["exact", "sketch"])
@pytest.mark.parametrize("checkpoint", [0.1, 0.5, 0.9])
def test_restore_then_replay_the_rest_equals_one_uninterrupted_run(shape, checkpoint):
    """The worker restores a cell from its last checkpoint and re-applies the events after
    it (in other batches than the first time): the state ends as if it never stopped."""
    events = stream(**shape, seed=4, none_rate=0.05)
    whole = feed(CellAggregates(), events)
    k = int(len(events) * checkpoint)
    first = feed(CellAggregates(), events[:k], batch=500)
    resumed = feed(CellAggregates.from_json(orjson.loads(state_bytes(first))), events[k:], batch=333)
    assert state_bytes(resumed) == state_bytes(whole)
    assert resumed.result(20) == whole.result(20)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 400), min_size=1, max_size=12),
       n_urls=st.sampled_from([5, 100, 400]), n_users=st.sampled_from([50, 300, 2000]))
def test_add_many_equals_add_one_by_one_whatever_the_batches(seed, sizes, n_urls, n_users):
    events = stream(sum(sizes), n_users, n_urls, seed, none_rate=0.1)
    one = feed(CellAggregates(), events)
    many = CellAggregates()
    i = 0
    for size in sizes:
        feed(many, events[i:i + size], batch=size)
        i += size
    assert state_bytes(many) == state_bytes(one)


# --- merge ---------------------------------------------------------------------------------

def split(events, parts, seed):
    rng = random.Random(seed)
    out = [[] for _ in range(parts)]
    for e in events:
        out[rng.randrange(parts)].append(e)
    return out


def test_merge_is_exact_while_exact():
    events = stream(**SMALL, seed=5, none_rate=0.05)
    whole = feed(CellAggregates(), events)
    merged = CellAggregates()
    for part in split(events, 3, seed=5):
        merged.merge(feed(CellAggregates(), part))
    assert merged.exact
    assert state_bytes(merged) == state_bytes(whole)


def test_merge_of_parts_is_the_whole_within_the_bounds():
    events = stream(**BIG, seed=6)
    whole = feed(CellAggregates(), events)
    parts = [feed(CellAggregates(), part) for part in split(events, 4, seed=6)]
    merged = CellAggregates()
    for part in parts:
        merged.merge(part)
    # HyperLogLog registers merge without loss (the estimate is Ertl's then, not HIP's);
    # delay buckets add up exactly
    assert merged.to_json()["uh"] == whole.to_json()["uh"]
    assert "hip" in whole.to_json() and "hip" not in merged.to_json()
    true = len({e[0] for e in events})
    assert abs(merged.unique_users() - true) <= 0.05 * true
    assert merged.client_delay_ms() == whole.client_delay_ms()
    truth = Counter(e[2] for e in events)
    assert_top_urls_within_bounds(merged, truth, n=3)
    assert [u["url"] for u in merged.top_urls(3)] == [u["url"] for u in whole.top_urls(3)]


def test_merge_mixes_modes_and_leaves_the_other_alone():
    small_events, big_events = stream(**SMALL, seed=7), stream(**BIG, seed=8)
    small = feed(CellAggregates(), small_events)
    big = feed(CellAggregates(), big_events)
    before = state_bytes(small)
    big_first = restored(big)
    big_first.merge(small)
    small_first = restored(small)
    small_first.merge(big)
    assert state_bytes(small) == before
    assert big_first.unique_users() == small_first.unique_users()
    assert big_first.client_delay_ms() == small_first.client_delay_ms()
    true = len({e[0] for e in small_events + big_events})
    assert abs(big_first.unique_users() - true) <= 0.05 * true


def test_merge_refuses_other_parameters():
    with pytest.raises(ValueError, match="different parameters"):
        CellAggregates().merge(CellAggregates(SketchParams(hll_p=11)))


# --- bounds against exact counts --------------------------------------------------------------

@pytest.mark.parametrize("n", [100, 256, 257, 1_000, 10_000, 100_000])
def test_unique_users_within_5_percent(n):
    rng = random.Random(n)
    users = [hash64(f"user-{rng.getrandbits(40)}-{i}") for i in range(n)]
    cell = CellAggregates()
    cell.add_many(users + users[: n // 2], [], [], [])  # repeats do not count
    got = cell.unique_users()
    if n <= P.exact_users:
        assert got == n and cell.exact
    else:
        assert not cell.exact
        assert abs(got - n) <= 0.05 * n, (got, n)


@pytest.mark.parametrize("merged", [False, True], ids=["hip", "ertl"])
def test_hll_estimates_are_unbiased_over_seeds(merged):
    """Over 20 seeds: mean relative error near 0 and each within 5 %, for the HIP estimate
    of one stream and for Ertl's (no bias tables), used after a merge of two HyperLogLogs."""
    for n in (400, 3_000, 30_000):
        errs = []
        for seed in range(20):
            rng = random.Random(seed * 1_000_003 + n)
            users = [rng.getrandbits(64) for _ in range(n)]
            cell = CellAggregates()
            if merged:
                cell.add_many(users[: n * 3 // 4], [], [], [])
                other = CellAggregates()
                other.add_many(users[n // 4:], [], [], [])  # both over exact_users
                cell.merge(other)
                assert "hip" not in cell.to_json()
            else:
                cell.add_many(users, [], [], [])
                assert "hip" in cell.to_json()
            errs.append(cell.unique_users() / n - 1)
        assert max(abs(e) for e in errs) <= 0.05, errs
        assert abs(sum(errs) / len(errs)) < 0.01, errs
    assert hll_estimate(bytes(4096), 12) == 0


def test_hip_survives_a_merge_with_an_exact_cell_either_way():
    rng = random.Random(11)
    big = [rng.getrandbits(64) for _ in range(5_000)]
    small = [rng.getrandbits(64) for _ in range(100)] + big[:50]
    a = CellAggregates()
    a.add_many(big, [], [], [])
    b = CellAggregates()
    b.add_many(small, [], [], [])
    ab, ba = restored(a), restored(b)
    ab.merge(b)
    ba.merge(a)
    assert "hip" in ab.to_json() and "hip" in ba.to_json()
    assert ab.to_json()["uh"] == ba.to_json()["uh"]
    for cell in (ab, ba):
        assert abs(cell.unique_users() - 5_100) <= 0.05 * 5_100


@pytest.mark.parametrize("path", ["add_batch", "add", "merge"])
def test_a_hash_ranked_past_rmax_raises_its_register_once(path):
    """A hash below 2**hll_p ranks past rmax; it was compared with the register before it
    was clamped, so each sighting raised HIP again and drifted _kxq (994 users read as
    1579 after one more user seen in 500 batches)."""
    cell = CellAggregates()
    cell.add_batch([user_hash(f"u{i}") for i in range(1000)], {}, {}, {})
    before = cell.unique_users()
    for _ in range(500):
        if path == "add_batch":
            cell.add_batch([5], {}, {}, {})
        elif path == "add":
            cell.add(5, None, None, None)
        else:
            one = CellAggregates()
            one.add(5, None, None, None)
            cell.merge(one)
    kxq = cell.users._kxq
    cell.users._set_kxq()
    assert kxq == cell.users._kxq
    assert before < cell.unique_users() <= before + 2
    assert restored(cell).to_json() == cell.to_json()


def reference_registers(hashes, p):
    """HyperLogLog registers by the documented rule (docs/analytics.md), apart from
    aggregator/core/sketches/users.py: the hash's low ``p`` bits pick the register, the
    rank is the leading zeros of the other 64 - p bits + 1 (all zero: 64 - p + 1), and a
    register holds the largest rank it was given."""
    regs = bytearray(1 << p)
    for h in hashes:
        rest = h >> p
        rank = (64 - p) - rest.bit_length() + 1
        regs[h & ((1 << p) - 1)] = max(regs[h & ((1 << p) - 1)], rank)
    return bytes(regs)


def test_hyperloglog_states_of_ordinary_hashes_follow_the_documented_rule():
    """Clamping the rank before the comparison changed nothing for hashes of 2**hll_p and
    more: batched and one by one, the state is the same bytes after every batch; its exact
    set, then its registers, are what the documented rule gives for the users seen; the
    estimate is within the stated bound."""
    rng = random.Random(5)
    batched, one_by_one = CellAggregates(), CellAggregates()
    seen: set[int] = set()
    for _ in range(40):
        ids = [f"u{rng.randrange(5000)}" for _ in range(rng.randrange(1, 400))]
        users = [user_hash(u) for u in ids]
        batched.add_batch(users, {}, {}, {})
        for u in users:
            one_by_one.add(u, None, None, None)
        assert state_bytes(batched) == state_bytes(one_by_one)
        seen.update(xxhash.xxh3_64_intdigest(u.encode()) for u in ids)  # the documented user hash
        state = batched.to_json()
        if len(seen) <= P.exact_users:
            assert state["ux"] == pack(seen)
        else:
            assert base64.b64decode(state["uh"]) == reference_registers(seen, P.hll_p)
    assert len(seen) > P.exact_users  # the registers were checked
    assert abs(batched.unique_users() - len(seen)) <= P.users_bound * len(seen)
    assert restored(batched).to_json() == batched.to_json()


def assert_top_urls_within_bounds(cell, truth, n):
    """Every reported count c: c - offset <= true <= c, and the leading counts within 5 %."""
    for row in cell.top_urls(n):
        true = truth[row["url"]]
        assert row["count"] - cell.offset <= true <= row["count"], (row, true, cell.offset)
        assert abs(row["count"] - true) <= 0.05 * true, (row, true)


@pytest.mark.parametrize("zipf", [0.8, 1.0, 1.2])
def test_top_3_urls_in_order_on_a_zipf_stream(zipf):
    events = stream(50_000, 1_000, 5_000, seed=9, zipf=zipf)
    cell = CellAggregates()
    feed(cell, events, batch=1000)
    assert cell.offset > 0  # far more distinct URLs than counters: the sketch is at work
    truth = Counter(e[2] for e in events)
    assert [u["url"] for u in cell.top_urls(3)] == [url for url, _ in truth.most_common(3)]
    assert_top_urls_within_bounds(cell, truth, n=3)
    assert cell.offset <= 2 * len(events) / (P.url_capacity + 1)
    # each URL's true count lies within its stated interval, also beyond the top 3
    for row in cell.top_urls(P.url_capacity):
        assert row["count"] - cell.offset <= truth[row["url"]] <= row["count"]


def test_top_urls_are_capped_at_the_capacity():
    cell = CellAggregates()
    for i in range(10 * P.url_capacity):
        cell.add(None, url_hash(f"/{i}"), f"/{i}", None)
        assert len(cell.top_urls(10_000)) <= P.url_capacity


def test_url_counters_shrink_back_after_a_purge():
    # a batch of many new URLs grows the counters' dict past the capacity before the purge;
    # a dict does not shrink, so the purged counters are copied into one of their size
    from aggregator.core.sketches.params import SketchParams
    from aggregator.core.sketches.topurls import TopUrls

    def fresh_size(t: TopUrls) -> int:
        return sys.getsizeof(dict(t._urls))

    batch = {url_hash(f"/{i}"): 1000 - i for i in range(1000)}
    t = TopUrls(SketchParams())
    t.add_counts(batch, {h: f"/{h}" for h in batch})
    assert t.offset > 0 and SketchParams().url_capacity // 2 < len(t._urls) <= SketchParams().url_capacity
    assert sys.getsizeof(t._urls) == fresh_size(t) < sys.getsizeof(batch) / 4
    t2 = TopUrls(SketchParams())
    t2.add_counts({url_hash(f"/x{i}"): 2000 - i for i in range(1000)}, {})
    t.merge(t2)  # two full cells: 256 counters before the purge
    assert sys.getsizeof(t._urls) == fresh_size(t) < 36_000


def true_quantile(values, q):
    s = sorted(max(v, 0) for v in values)
    return s[int(q * (len(s) - 1))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_delay_quantiles_within_the_relative_accuracy(seed):
    rng = random.Random(seed)
    delays = [int(rng.lognormvariate(7, 2)) for _ in range(50_000)] + [rng.randrange(20_000, 90_000_000) for _ in range(500)]
    cell = CellAggregates()
    cell.add_many([], [], [], delays)
    res = cell.client_delay_ms()
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        want = true_quantile(delays, q)
        assert abs(res[name] - want) <= P.delay_accuracy * want + 0.05, (name, res[name], want)
    for q in (0.0, 0.01, 0.25, 0.75, 0.999, 1.0):
        want = true_quantile(delays, q)
        assert abs(cell.delay_quantile(q) - want) <= P.delay_accuracy * want, (q, want)


def test_small_delays_are_exact_and_negative_ones_count_as_zero():
    cell = CellAggregates()
    for d in [-500, -1, 0, 1, 2, 3, 5, 8, 13]:
        cell.add(None, None, None, d)
    assert [cell.delay_quantile(q) for q in (0, 0.25, 0.5, 0.75, 1)] == [0, 0, 2, 5, 13]
    huge = CellAggregates()
    huge.add(None, None, None, 10**15)  # clamped to MAX_DELAY_MS
    assert abs(huge.delay_quantile(0.5) - MAX_DELAY_MS) <= P.delay_accuracy * MAX_DELAY_MS


def test_delay_quantiles_are_floats_also_for_one_integer_buckets():
    """A bucket of one integer (delays up to 58 ms) answered its int bound: the snapshot
    JSON mixed 5 and 148.2 (contract §4: numbers in ms to 0.1 ms)."""
    cell = CellAggregates()
    for d in (5, 5, 7, 3000, -2):
        cell.add(None, None, None, d)
    assert all(type(v) is float for v in cell.delay_quantiles([0, 0.25, 0.5, 0.75, 1]))
    assert orjson.dumps(cell.client_delay_ms()) == b'{"p50":5.0,"p90":7.0,"p99":7.0}'
    geo = cell.delays._geo
    assert all(type(geo.value(i)) is float for i in range(geo.n_buckets))


@pytest.mark.parametrize("delays", [
    [0, 1, 2, 0, 16_383, 5, 0],            # zeros within the table: the bulk path
    [3, -1, 0, 7, 16_384, 2**40, 0, -90],  # negatives and values past the table: one by one
    [0, 0, 0],
    [16_383, 1, 1],
])
def test_delay_buckets_in_bulk_equal_the_per_event_path(delays):
    bulk = CellAggregates()
    buckets, dz = delay_buckets(delays, P)
    assert dz == sum(1 for d in delays if d <= 0)
    assert sum(buckets.values()) + dz == len(delays)
    bulk.add_batch([], {}, {}, buckets, dz)
    one = CellAggregates()
    for d in delays:
        one.add(None, None, None, d)
    assert orjson.dumps(bulk.to_json()) == orjson.dumps(one.to_json())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-5, 40), st.integers(-2**40, 2**40), st.integers(16_380, 16_390)),
                max_size=600))
def test_staged_delay_codes_count_as_the_delays(delays):
    """What ``WindowBook.apply`` stages (``delay_code``) counts, on either path of
    ``code_buckets`` (a ``Counter`` for few codes, a list of every bucket for many), to the
    delays' buckets one by one (``DelayGeometry.bucket``) and their count <= 0."""
    aggs = WindowAggregates(P)
    codes = [delay_code(aggs.delay_codes, d) for d in delays]
    buckets = Counter(aggs.geo.bucket(d) for d in delays if d > 0)
    dz = sum(1 for d in delays if d <= 0)
    assert code_buckets(codes, aggs.geo) == (dict(buckets), dz)
    if codes:
        times = aggs.geo.n_buckets // len(codes) + 1  # enough codes for the list path
        assert code_buckets(codes * times, aggs.geo) == ({k: v * times for k, v in buckets.items()}, dz * times)


# --- size -------------------------------------------------------------------------------------

def pack(hashes):
    return base64.b64encode(b"".join(h.to_bytes(8, "big") for h in sorted(hashes))).decode()


def test_state_format():
    """The documented layout (docs/analytics.md), on a small exact cell."""
    cell = CellAggregates()
    cell.add(2, url_hash("/b"), "/b", 5)
    cell.add(1, url_hash("/a"), "/a", -3)
    cell.add(1, url_hash("/a"), "/a", None)
    first = sorted([url_hash("/a"), url_hash("/b")])
    counts = {url_hash("/a"): 2, url_hash("/b"): 1}
    texts = {url_hash("/a"): "/a", url_hash("/b"): "/b"}
    # bucket i holds (gamma**(i-1), gamma**i], gamma = (1 + a) / (1 - a) (docs/analytics.md)
    gamma = (1 + P.delay_accuracy) / (1 - P.delay_accuracy)
    five = next(i for i in range(1, 1000) if gamma ** (i - 1) < 5 <= gamma ** i)
    assert cell.to_json() == {"p": [12, 256, 128, 0.01], "ux": pack([1, 2]),
                              "t": [pack(first), [counts[h] for h in first], [texts[h] for h in first]],
                              "d": [1, five, 1]}
    assert cell.delay_quantiles([0, 1]) == [0.0, 5]


def test_serialised_size_stays_under_the_stated_bound():
    bound = max_serialised_bytes()
    assert bound < 50_000
    # a real busy cell
    assert len(state_bytes(feed(CellAggregates(), stream(**BIG, seed=10)))) < 12_000
    # the worst case: every part at its largest
    n_buckets = CellAggregates().delays.n_buckets
    big = 2**32 - 1
    worst = {
        "p": P.key(),
        "uh": base64.b64encode(bytes([65 - P.hll_p]) * (1 << P.hll_p)).decode(),
        "hip": 1.2345678901234567e18,  # the longest float text
        "t": [pack([2**64 - 1 - i for i in range(P.url_capacity)]), [big] * P.url_capacity,
              ["x" * MAX_URL_CHARS] * P.url_capacity],
        "o": big,
        "d": [big, 0, *[big] * n_buckets],
    }
    cell = CellAggregates.from_json(worst)
    size = len(state_bytes(cell))
    assert size <= bound, (size, bound)
    assert size > 0.9 * bound  # the bound is not loose either
    exact_worst = CellAggregates.from_json({"p": P.key(), "ux": pack([2**64 - 1 - i for i in range(P.exact_users)])})
    assert exact_worst.unique_users() == P.exact_users
    assert len(orjson.dumps(exact_worst.to_json()["ux"])) <= len(worst["uh"]) + 2
    assert math.isfinite(cell.delay_quantile(0.5))


@pytest.mark.parametrize("bad", [
    {}, {"p": [12, 256]}, {"p": [3, 256, 128, 0.01]}, {"p": P.key(), "uh": "AAAA"},
    {"p": P.key(), "ux": "not base64!"}, {"p": P.key(), "ux": "AAAA"}, {"p": P.key(), "t": [["zz", 1, "/a"]]},
    {"p": P.key(), "t": ["AAAAAAAAAAA=", [0], ["/a"]]}, {"p": P.key(), "t": ["AAAAAAAAAAA=", [1], [5]]},
    {"p": P.key(), "t": ["AAAAAAAAAAA=", [1, 2], ["/a"]]}, {"p": P.key(), "t": ["AAAAAAAAAAA=", [True], ["/a"]]},
    {"p": P.key(), "d": [0, 5000, 1]}, {"p": P.key(), "d": [-1]}, {"p": P.key(), "o": -3},
    # half-accepted before: a negative or float first bucket, an offset that is not an int,
    # a text longer than a cell keeps, counts that are not ints >= 0, a HIP that is text
    {"p": P.key(), "d": [0, -2, 7]}, {"p": P.key(), "d": [0, 4.7, 7]}, {"p": P.key(), "d": [0.5]},
    {"p": P.key(), "d": [0, 3, -1]}, {"p": P.key(), "d": [0, 3, 1.5]}, {"p": P.key(), "d": [0, 1075, 1, 1]},
    {"p": P.key(), "d": "AAAA"}, {"p": P.key(), "o": "12"}, {"p": P.key(), "o": 3.9},
    {"p": P.key(), "t": ["AAAAAAAAAAA=", [1], ["x" * (MAX_URL_CHARS + 1)]]},
    {"p": P.key(), "uh": base64.b64encode(bytes(4096)).decode(), "hip": "5000"},
])
def test_from_json_refuses_what_is_not_a_state(bad):
    with pytest.raises(ValueError, match="not a CellAggregates state"):
        CellAggregates.from_json(bad)


def test_parameters_are_checked():
    for kw in (dict(hll_p=3), dict(exact_users=99), dict(url_capacity=10), dict(delay_accuracy=0.5)):
        with pytest.raises(ValueError, match="must be within"):
            SketchParams(**kw)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([(300, 50), (3000, 400), (20_000, 1500)]))
def test_the_users_a_batch_logs_replay_to_the_same_cell(seed, shape):
    """``add_batch`` answers the user hashes that changed the cell (new to its exact set,
    then raising a register, across the switch too): a cell fed only those, batch by batch,
    has the same bytes as one fed every hash; what is left out of the log are the repeats."""
    pool, batch = shape
    rng = random.Random(seed)
    users_pool = [user_hash(f"u{i}") for i in range(pool)] + [5, rng.randrange(1 << 12)]  # ranks past rmax
    full, replayed = CellAggregates(), CellAggregates()
    logged_total = fed = 0
    for _ in range(12):
        users = [rng.choice(users_pool) for _ in range(rng.randrange(1, batch))]
        _, logged = full.add_batch(users, {}, {}, {})
        assert set(logged) <= set(users) and len(logged) == len(set(logged))
        replayed.add_batch(logged, {}, {}, {})
        assert state_bytes(replayed) == state_bytes(full)
        logged_total += len(logged)
        fed += len(users)
    assert logged_total <= len(set(users_pool))  # each hash changes a cell at most once...
    if fed > 3 * pool:
        assert logged_total < fed  # ... so repeats are not logged


def test_repeats_within_a_batch_leave_the_state_of_the_batch_without_them():
    """``add_batch`` takes repeats out only while the users are exact; a HyperLogLog adds them
    as they come.  Either way a batch with repeats leaves the bytes of the same batch with
    each user once (in the order first seen), so logged batches of either kind replay alike."""
    rng = random.Random(11)
    with_repeats, without = CellAggregates(), CellAggregates()
    for _ in range(30):
        users = [user_hash(f"u{rng.randrange(3000)}") for _ in range(rng.randrange(1, 900))]
        with_repeats.add_batch(users, {}, {}, {})
        without.add_batch(list(dict.fromkeys(users)), {}, {}, {})
        assert state_bytes(with_repeats) == state_bytes(without)
    assert not with_repeats.users.exact  # the HyperLogLog's path was taken too


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, (1 << 64) - 1), min_size=101, max_size=140, unique=True), st.sampled_from([4, 10, 14]))
def test_the_switch_to_a_hyperloglog_sums_kxq_from_the_users_registers(users, p):
    """``_to_hll`` takes _kxq from the registers its exact users set, not from a count of
    every register per rank; it must be the full count's value (HIP's next steps use it),
    also for hashes that rank past rmax and users that share a register."""
    u = UniqueUsers(SketchParams(hll_p=p, exact_users=100))
    u.add_many([*users, *users[:5], 3, 1 << 63])
    assert not u.exact
    kxq = u._kxq
    u._set_kxq()
    assert kxq == u._kxq
