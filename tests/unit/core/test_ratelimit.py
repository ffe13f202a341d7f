import math

import pytest

from aggregator.core.ratelimit import RateLimits, TokenBucket, parse_rate_limits


def test_bucket_starts_full_and_caps_at_burst():
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert b.take(3, 0.0) == 3
    assert b.take(3, 0.0) == 2  # only 5 in the bucket
    assert b.take(1, 0.0) == 0
    # a long pause refills only up to burst
    assert b.take(100, 1000.0) == 5


def test_bucket_refills_at_rate():
    b = TokenBucket(rate=100, burst=100, now=10.0)
    assert b.take(100, 10.0) == 100
    assert b.take(100, 10.1) == 10  # 0.1 s * 100/s
    assert b.take(100, 10.1) == 0
    assert b.take(100, 10.35) == 25
    # fractional tokens carry over
    b2 = TokenBucket(rate=1, burst=1, now=0.0)
    assert b2.take(1, 0.0) == 1
    assert b2.take(1, 0.5) == 0
    assert b2.take(1, 1.0) == 1


def test_bucket_exact_rate_over_many_steps():
    b = TokenBucket(rate=1000, burst=1000, now=0.0)
    b.take(1000, 0.0)
    granted = sum(b.take(10_000, i * 0.001) for i in range(1, 1001))
    assert granted == 1000


def test_bucket_clock_going_backwards_is_harmless():
    b = TokenBucket(rate=10, burst=10, now=5.0)
    assert b.take(10, 5.0) == 10
    assert b.take(10, 4.0) == 0
    assert b.take(10, 5.5) == 5


def test_bucket_unlimited():
    for rate in (0, -1):
        b = TokenBucket(rate=rate, burst=0, now=0.0)
        assert b.unlimited
        assert b.take(10**9, 0.0) == 10**9
        assert b.take(5, 0.0) == 5
        assert b.seconds_until(10**6, 0.0) == 0.0


def test_bucket_zero_and_negative_take():
    b = TokenBucket(rate=10, burst=10, now=0.0)
    assert b.take(0, 0.0) == 0
    assert b.take(-3, 0.0) == 0
    assert b.available(0.0) == 10


def test_seconds_until():
    b = TokenBucket(rate=10, burst=20, now=0.0)
    assert b.seconds_until(5, 0.0) == 0.0
    b.take(20, 0.0)
    assert math.isclose(b.seconds_until(5, 0.0), 0.5)
    assert math.isclose(b.seconds_until(1000, 0.0), 2.0)  # capped at burst


def test_parse_rate_limits_ok():
    assert parse_rate_limits("eu=5000,us-east=20000") == {"eu": 5000.0, "us-east": 20000.0}
    assert parse_rate_limits(" EU = 1.5 , ,ap=0,") == {"eu": 1.5, "ap": 0.0}
    assert parse_rate_limits("") == {}
    assert parse_rate_limits(None) == {}


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("eu", "region=rate"),
        ("=5", "empty region"),
        ("eu=fast", "not a number"),
        ("eu=", "not a number"),
        ("eu=inf", "finite"),
        ("eu=nan", "finite"),
        ("eu=1,eu=2", "more than once"),
    ],
)
def test_parse_rate_limits_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_rate_limits(bad)


def test_rate_limits_lazy_buckets_and_defaults():
    rl = RateLimits(default_rate=100, per_region="eu=5000,us-east=0")
    assert rl.buckets() == {}
    eu = rl.bucket_for("eu", 0.0)
    assert rl.bucket_for("eu", 5.0) is eu
    assert eu.rate == 5000 and eu.burst == 5000
    other = rl.bucket_for("ap", 0.0)
    assert other.rate == 100
    assert rl.take("ap", 1000, 0.0) == 100
    assert rl.take("us-east", 10**6, 0.0) == 10**6  # 0 = unlimited
    assert set(rl.buckets()) == {"eu", "ap", "us-east"}


def test_rate_limits_default_unlimited_and_dict():
    rl = RateLimits(per_region={"EU": 2})
    assert rl.take("x", 10**6, 0.0) == 10**6
    assert rl.take("eu", 10, 0.0) == 2
    rl2 = RateLimits(default_rate=0.5)
    assert rl2.take("x", 5, 0.0) == 1  # burst is at least 1 token


def test_rate_limits_bad_default():
    with pytest.raises(ValueError):
        RateLimits(default_rate="lots")
    with pytest.raises(ValueError):
        RateLimits(default_rate=10, per_region="eu")


def test_buckets_that_have_refilled_are_dropped_and_no_decision_changes():
    # issue 15, fault 11: a bucket per region ever limited would grow without bound
    limits = RateLimits(default_rate=10.0)
    kept = RateLimits(default_rate=10.0)
    for i in range(50):
        for lim in (limits, kept):
            lim.take(f"r{i}", 5, 0.0)
    limits.take("hot", 10, 0.0)
    kept.take("hot", 10, 0.0)
    assert limits.forget_full(0.4) == 0  # none has refilled yet (0.5 s to get 5 back)
    assert limits.forget_full(0.6) == 50  # all but the hot one (1 s to refill 10)
    assert set(limits.buckets()) == {"hot"}
    for region in ("r3", "hot"):  # what is granted next is what the untouched limiter grants
        assert limits.take(region, 10, 0.7) == kept.take(region, 10, 0.7)


def test_a_drain_takes_the_rate_since_its_last_drain_not_one_burst():
    """Drains come once per AGG_STATE_FLUSH_SECONDS (up to 60 s): one burst (1 s) a tick
    would drain at rate / flush seconds."""
    limits = RateLimits(0, "hot=1000")
    assert limits.take_drain("hot", 10_000, 0.0) == 1000  # the first: one burst
    assert limits.take_drain("hot", 10_000, 5.0) == 5000  # 5 s later: 5 s of the rate
    assert limits.forget_full(64.0) == 0  # filling past its burst for the next drain: kept
    assert limits.take_drain("hot", 100_000, 65.0) == 60_000
    # what is left after a drain is at most a burst, for the events that follow
    assert limits.take_drain("hot", 10, 200.0) == 10
    assert limits.take("hot", 10_000, 200.0) == 1000
    # never more than DRAIN_SPAN_MAX of the rate at once
    assert limits.take_drain("hot", 10**9, 10_000.0) == 120_000
    assert RateLimits(0, "").take_drain("x", 7, 1.0) == 7  # unlimited


def test_a_drain_takes_at_most_so_many_a_second_unless_the_rate_is_higher():
    limits = RateLimits(0, "")  # a limit lifted while a backlog remains
    assert limits.take_drain("hot", 10**9, 0.0, 50_000) == 50_000  # one second's
    assert limits.take_drain("hot", 10**9, 0.5, 50_000) == 50_000  # drains 0.5 s apart: still a second's
    assert limits.take_drain("hot", 10**9, 4.5, 50_000) == 200_000
    fast = RateLimits(0, "hot=200000")  # a rate above it: the rate (a drain keeps up)
    assert fast.take_drain("hot", 10**9, 0.0, 50_000) == 200_000
    assert fast.take_drain("hot", 10**9, 0.5, 50_000) == 100_000
