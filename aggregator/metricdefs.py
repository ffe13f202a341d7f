"""What the metrics of aggregator/metrics.py are made of that is no metric: the buckets of
its histograms, the label values it allows, and the package version it exports."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DIST_NAME = "clickstream-aggregator"
# Seconds after window end + grace: the snapshot-delay buckets sit at grace + each of these, so
# the quantiles near the grace are read off buckets a few tenths of a second wide.
DELAY_OFFSETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
# clickstream_snapshot_overdue_seconds: the same offsets, independent of the grace, so the
# freshness SLO (docs/runbooks.md) can name a bucket (le="5") whatever AGG_GRACE_SECONDS is.
OVERDUE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STATUS_CLASSES = ("2xx", "4xx", "5xx")
SWEEP_SECONDS = 60.0  # how often region labels are checked for idleness
# a snapshot's client_delay_ms key -> the quantile label of clickstream_window_client_delay_seconds
DELAY_QUANTILES = {"p50": "0.5", "p90": "0.9", "p99": "0.99"}


def package_version() -> str:
    """The installed version of this package (``unknown`` when run from a bare checkout)."""
    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return "unknown"


def snapshot_delay_buckets(grace_seconds: float, window_seconds: float) -> tuple[float, ...]:
    """Buckets of ``clickstream_snapshot_delay_seconds``: a window is published about grace +
    a second after its end, so the buckets are dense just above the grace, with a few
    below it (a window can close early when the clock runs ahead) and one at grace + one window."""
    below = [grace_seconds * f for f in (0.25, 0.5, 0.75, 0.9)]
    above = [grace_seconds + d for d in DELAY_OFFSETS] + [grace_seconds + window_seconds]
    return tuple(sorted({round(b, 3) for b in below + above if b > 0}))


def status_class(status: int) -> str:
    """``200`` -> ``2xx``: the ``code`` label of the HTTP metrics (five values at most)."""
    return f"{min(max(status // 100, 1), 5)}xx"
