"""One (region, window) cell's aggregates: unique users, top URLs, client delays (pure).

A :class:`CellAggregates` composes the three sketches (``users``, ``topurls``, ``delays``)
and gives them one state value, one merge and one result.
"""
from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aggregator.core.sketches.delays import DelaySketch, geometry
from aggregator.core.sketches.params import SketchParams
from aggregator.core.sketches.topurls import TopUrls
from aggregator.core.sketches.urls import MAX_URL_CHARS
from aggregator.core.sketches.users import UniqueUsers


class CellAggregates:
    """Unique users, top URLs and client-delay quantiles of one (region, window) cell.

    ``add`` is the per-event path: pass the user's :func:`user_hash`, the URL's
    :func:`url_hash` with its normalised text, and the client delay in ms, each None when
    the event has none.  The URL text is read only when the URL becomes a candidate, so
    the caller may pass text it already holds (a ``str``, or ``bytes`` of ASCII as it came
    in a Kafka header) at no cost for the other events.
    """

    __slots__ = ("params", "users", "urls", "delays")

    def __init__(self, params: SketchParams | None = None) -> None:
        self.params = p = params or SketchParams()
        self.users = UniqueUsers(p)
        self.urls = TopUrls(p)
        self.delays = DelaySketch(p)

    @property
    def offset(self) -> int:
        """Misra-Gries: the total taken off every URL counter (0 while exact)."""
        return self.urls.offset

    # -- adding events --------------------------------------------------------------------

    def add(self, user: int | None, url_h: int | None, url: str | bytes | None, delay_ms: int | None) -> None:
        """Count one event (each part None when the event has none)."""
        if user is not None:
            self.users.add(user)
        if url_h is not None:
            self.urls.add(url_h, url)
        if delay_ms is not None:
            self.delays.add(delay_ms)

    def add_batch(self, users: list[int], urls: Mapping[int, int], texts: Mapping[int, str | bytes],
                  buckets: Mapping[int, int], dz: int = 0) -> tuple[list[list[Any]], list[int]]:
        """A batch of events at once, as ``WindowAggregates`` stages them: ``users`` their
        user hashes (in order), ``urls`` url hash -> events, ``texts`` the texts of (at
        least) the URLs new to the cell, ``buckets`` delay bucket (``delay_buckets``) ->
        events, ``dz`` events with a delay <= 0.  -> (``[[url hash, text], ...]`` of the
        URLs that got a counter, the user hashes that changed the cell's users
        (``UniqueUsers.add_logged``)): what a replay of the batch needs of ``texts`` and
        ``users``.

        The state after it depends on the cell and the batch only (deterministic, so a
        logged batch replays into the same cell), not on how events are cut into batches
        for the exact parts; the URL counters are Misra-Gries merged a batch at a time
        (every count added, then purged back to capacity), the error bound unchanged."""
        changed = self.users.add_logged(users) if users else []
        read = self.urls.add_counts(urls, texts) if urls else []
        if buckets or dz:
            self.delays.add_counts(buckets, dz)
        return read, changed

    def check_batch(self, users: Any, url_hs: Any, url_ns: Any, texts: Any, bucket_ids: Any, bucket_ns: Any,
                    dz: Any) -> None:
        """ValueError unless these are ``add_batch``'s parts as a logged batch holds them (lists
        of ints: hashes of 64 bits, URL counts > 0, delay buckets of this accuracy and counts
        >= 0; ``[[url hash, text of at most MAX_URL_CHARS], ...]``).  Recovery checks every
        logged batch, so the lists go through C-level ``array`` conversions."""
        try:
            if not all(type(x) is list for x in (users, url_hs, url_ns, texts, bucket_ids, bucket_ns)):
                raise TypeError("lists expected")
            array("Q", users)
            ns, ids = array("Q", url_ns), array("Q", bucket_ids)
            if len(array("Q", url_hs)) != len(ns) or len(ids) != len(array("Q", bucket_ns)):
                raise ValueError("hashes and counts differ in length")
            for h, text in texts:
                if type(h) is not int or not 0 <= h < 1 << 64 or type(text) is not str or len(text) > MAX_URL_CHARS:
                    raise ValueError("bad url text")
        except (TypeError, OverflowError) as exc:
            raise ValueError(f"bad logged batch: {exc}") from exc
        if (ns and min(ns) < 1) or (ids and max(ids) >= self.delays.n_buckets) or type(dz) is not int or dz < 0:
            raise ValueError("bad logged batch: a count or delay bucket out of range")

    def holds_url(self, url_h: int) -> bool:
        """Whether the URL has a counter now (``add`` reads a URL's text only when not)."""
        return url_h in self.urls

    def add_many(self, users: Iterable[int | None], url_hs: Sequence[int | None],
                 urls: Sequence[str | bytes | None], delays: Iterable[int | None]) -> None:
        """``add`` over parallel sequences (one event per index; ``url_hs`` and ``urls``
        of the same length, the others may be shorter or empty): the same state as the
        calls one by one, whatever the batch boundaries.

        Faster than ``add`` where the order does not matter: the exact user set and the
        delay buckets are order-free, and so are the URL counters of a batch that adds
        no more distinct URLs than there is room for (no purge in between), so those take
        C-level bulk paths; the rest is one loop with the look-ups done once."""
        self.users.add_many(users)
        self.urls.add_many(url_hs, urls)
        self.delays.add_many(delays)

    def merge(self, other: CellAggregates) -> None:
        """Add ``other``'s events to this cell (``other`` is left as it is)."""
        if other.params != self.params:
            raise ValueError(f"cannot merge sketches of different parameters: {self.params} and {other.params}")
        self.users.merge(other.users)
        self.urls.merge(other.urls)
        self.delays.merge(other.delays)

    # -- answers --------------------------------------------------------------------------

    def unique_users(self) -> int:
        return self.users.count()

    def top_urls(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` most frequent URLs, most frequent first; ties by URL text, then hash."""
        return self.urls.top(n)

    def delay_quantiles(self, qs: Sequence[float]) -> list[float] | None:
        """The delays (ms) at quantiles ``qs`` (each 0..1); None: no delays."""
        return self.delays.quantiles(qs)

    def delay_quantile(self, q: float) -> float | None:
        """The delay (ms) at quantile ``q``; None: no delays."""
        vs = self.delays.quantiles((q,))
        return None if vs is None else vs[0]

    def client_delay_ms(self) -> dict[str, float] | None:
        """``{"p50", "p90", "p99"}`` in ms, to 0.1 ms; None: no event carried a delay."""
        vs = self.delays.quantiles((0.5, 0.9, 0.99))
        if vs is None:
            return None
        return {"p50": round(vs[0], 1), "p90": round(vs[1], 1), "p99": round(vs[2], 1)}

    def result(self, top_n: int = 10) -> dict[str, Any]:
        """The cell's aggregates as they go into its snapshot."""
        return {"unique_users": self.unique_users(), "top_urls": self.top_urls(top_n),
                "client_delay_ms": self.client_delay_ms()}

    @property
    def exact(self) -> bool:
        """True while every aggregate is exact (delays: within their bucket only)."""
        return self.users.exact and self.urls.offset == 0

    # -- state ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The state as a JSON-compatible value; the same state gives the same value.

        ``{"p": params, "ux": base64 of the sorted exact user hashes | "uh": base64 of the
        HyperLogLog registers, "t": [base64 of the URL hashes in order, [their counters],
        [their texts]], "o": offset, "d": [zero count, first bucket, its count, ... up to
        the last non-empty bucket]}``, parts with nothing in them left out.  Hashes are
        8 bytes each, big-endian."""
        out: dict[str, Any] = {"p": self.params.key()}
        self.users.write(out)
        self.urls.write(out)
        self.delays.write(out)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CellAggregates:
        """A cell from a ``to_json()`` value (ValueError: not one)."""
        try:
            hll_p, exact_users, url_capacity, accuracy = obj["p"]
            cell = cls(SketchParams(int(hll_p), int(exact_users), int(url_capacity), float(accuracy)))
            cell.users.read(obj)
            cell.urls.read(obj)
            cell.delays.read(obj)
        except (KeyError, TypeError, IndexError, OverflowError, ValueError) as exc:
            raise ValueError(f"not a CellAggregates state: {exc}") from exc
        return cell


def max_serialised_bytes(params: SketchParams | None = None) -> int:
    """An upper bound of ``len(orjson.dumps(cell.to_json()))`` for any cell of ``params``."""
    p = params or SketchParams()
    params_part = len(f'"p":[{p.hll_p},{p.exact_users},{p.url_capacity},{p.delay_accuracy}]') + 2
    users = 7 + 4 * math.ceil(max(8 * p.exact_users, 1 << p.hll_p) / 3) + 31  # ,"hip":<float, 24 chars at most>
    # "t":["<base64 of 8 bytes a URL>",[<counter up to 10 digits>,...],["<text>",...]],"o":<offset>
    urls = 6 + 4 * math.ceil(8 * p.url_capacity / 3) + 3 + p.url_capacity * (11 + MAX_URL_CHARS + 3) + 4 + 5 + 10
    # "d":[zero,first,counts...]: each count up to 10 digits (array "I") and a comma
    delays = 7 + 11 + 11 + 11 * geometry(p.delay_accuracy).n_buckets
    return params_part + users + urls + delays
