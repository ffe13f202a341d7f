"""A gauge whose values are quantiles, exposed as a Prometheus summary.

``clickstream_window_client_delay_seconds{region,quantile}`` holds the last closed
window's client-delay quantiles: set and removed like a gauge's series, but a ``quantile``
label belongs to a summary in the exposition formats (promtool's lint refuses it on a
gauge).  prometheus_client's ``Summary`` computes no quantiles, so this collector exposes
the values it is given with type summary: quantile samples only, no ``_sum`` or ``_count``
(the window's sketch keeps neither).  Same name, labels and values as the gauge it replaces.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric


class _Child:
    __slots__ = ("values", "key")

    def __init__(self, values: dict[tuple[str, ...], float], key: tuple[str, ...]) -> None:
        self.values, self.key = values, key

    def set(self, value: float) -> None:
        self.values[self.key] = float(value)


class QuantileGauge:
    """``labels(...).set(v)`` and ``remove(...)`` as on a ``Gauge`` (KeyError for a series
    never set); collected as a summary."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        if "quantile" not in labelnames:
            raise ValueError("a QuantileGauge needs a quantile label")
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        return _Child(self._values, tuple(str(v) for v in values))

    def remove(self, *values: str) -> None:
        del self._values[tuple(str(v) for v in values)]

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "summary")]

    def collect(self) -> Iterator[Metric]:
        m = Metric(self.name, self.documentation, "summary")
        for key, value in list(self._values.items()):
            m.add_sample(self.name, dict(zip(self.labelnames, key, strict=True)), value)
        yield m
