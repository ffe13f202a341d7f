"""Top URLs of one cell: Misra-Gries counters over URL hashes, with their texts (pure).

At most ``SketchParams.url_capacity`` counters.  While a cell has at most that many
distinct URLs nothing is dropped and the counts are exact.  One more distinct URL
*purges*: the median count ``d`` is taken off every counter, counters that reach 0 go, and
``d`` is added to ``offset``.  A URL's true count is then within ``[counter, counter +
offset]``; the reported count is ``counter + offset``.
"""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, cast

from aggregator.core.sketches.params import SketchParams, pack, unpack
from aggregator.core.sketches.urls import MAX_URL_CHARS, percent_encode


def _text(url: str | bytes | None) -> str:
    """A URL's text as a cell keeps it.  Bytes as they came in a header: ingest writes the
    normalised text (printable ASCII, no character JSON escapes); anything else (a forged
    header) is percent-encoded and cut to ``MAX_URL_CHARS`` too, so it is one JSON byte a
    character and cannot grow a cell past its stated bound (cell.max_serialised_bytes)."""
    if isinstance(url, bytes):
        text = url[:MAX_URL_CHARS].decode(errors="replace")
        return text if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text \
            else percent_encode(text)[:MAX_URL_CHARS]
    return url or ""


class TopUrls:
    """Misra-Gries counters of one cell's URLs (hash -> counter, hash -> text)."""

    __slots__ = ("_urls", "_texts", "offset", "_url_cap")

    def __init__(self, p: SketchParams) -> None:
        self._urls: dict[int, int] = {}
        self._texts: dict[int, str] = {}
        self.offset = 0                          # total taken off every counter
        self._url_cap = p.url_capacity

    def __contains__(self, url_h: int) -> bool:
        return url_h in self._urls

    def add(self, url_h: int, url: str | bytes | None) -> None:
        """One event's URL (the per-event path: the text is read only for a new URL)."""
        urls = self._urls
        c = urls.get(url_h)
        if c is None:
            urls[url_h] = 1
            self._texts[url_h] = _text(url)
            if len(urls) > self._url_cap:
                self._purge()
        else:
            urls[url_h] = c + 1

    def add_counts(self, urls: Mapping[int, int], texts: Mapping[int, str | bytes]) -> list[list[Any]]:
        """A batch's counts (url hash -> events; ``texts`` holds at least the URLs new to
        the cell), Misra-Gries merged: every count added, then purged back to capacity.
        -> ``[[url hash, text], ...]`` of the URLs that got a counter."""
        counts, known, cap = self._urls, self._texts, self._url_cap
        new = [h for h in urls if h not in counts]
        get = counts.get
        for h, c in urls.items():
            counts[h] = get(h, 0) + c
        purged = len(counts) > cap
        while len(counts) > cap:
            self._purge()
        read: list[list[Any]] = []
        for h in new:
            if h in counts:  # a text is read only for a new URL that keeps its counter
                known[h] = text = _text(texts.get(h))
                read.append([h, text])
        if purged:
            self._compact()
        return read

    def add_many(self, url_hs: Sequence[int | None], urls: Sequence[str | bytes | None]) -> None:
        """``add`` over parallel sequences (None: an event without a URL), the same state."""
        if not url_hs:
            return
        if len(url_hs) != len(urls):
            raise ValueError("url_hs and urls differ in length")
        counts, texts, cap = self._urls, self._texts, self._url_cap
        batch = cast("Counter[int]", Counter(url_hs))
        batch.pop(None, None)  # type: ignore[call-overload]
        new = batch.keys() - counts.keys() if len(counts) + len(batch) > cap else batch.keys()
        if len(counts) + len(new) <= cap:
            # no purge would happen one by one either: count the batch in bulk
            if new:
                first = dict(zip(reversed(url_hs), reversed(urls), strict=True))  # each hash's first text
                for key in new:
                    if key in counts:
                        continue
                    text = first[key]
                    texts[key] = _text(text)
            get = counts.get
            for key, n in batch.items():
                counts[key] = get(key, 0) + n
            return
        get = counts.get
        for h, url in zip(url_hs, urls, strict=True):
            if h is None:
                continue
            c = get(h)
            if c is None:
                counts[h] = 1
                texts[h] = _text(url)
                if len(counts) > cap:
                    self._purge()
            else:
                counts[h] = c + 1

    def _purge(self) -> None:
        """Misra-Gries, a batch at a time: take the median count off every counter."""
        counts = self._urls
        d = sorted(counts.values())[len(counts) // 2]
        texts = self._texts
        for h, c in list(counts.items()):
            if c <= d:
                del counts[h]
                texts.pop(h, None)  # a URL new in the batch being added has no text yet
            else:
                counts[h] = c - d
        self.offset += d

    def _compact(self) -> None:
        """The counters and texts in dicts of their size, after a purge of counters that a batch
        or a merge grew past the capacity at once (``add`` and ``add_many`` purge at one over
        it): a dict keeps the table it grew to, some 36 KiB in a busy cell.  The order of
        their items is kept (nothing reads it, but the same state is the same)."""
        self._urls = dict(self._urls)
        self._texts = dict(self._texts)

    def merge(self, other: TopUrls) -> None:
        counts, texts = self._urls, self._texts
        for h, c in other._urls.items():
            counts[h] = counts.get(h, 0) + c
            if h not in texts:
                texts[h] = other._texts[h]
        self.offset += other.offset
        if len(counts) > self._url_cap:
            while len(counts) > self._url_cap:
                self._purge()
            self._compact()

    def top(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` most frequent URLs, most frequent first; ties by URL text, then hash."""
        off, texts = self.offset, self._texts
        ranked = heapq.nsmallest(n, self._urls.items(), key=lambda hc: (-hc[1], texts[hc[0]], hc[0]))
        return [{"url": texts[h], "count": c + off} for h, c in ranked]

    def write(self, out: dict[str, Any]) -> None:
        """Into a cell's state: ``"t"`` (hashes in order, their counters and texts), ``"o"``."""
        if self._urls:
            hashes = sorted(self._urls)
            counts, texts = self._urls, self._texts
            out["t"] = [pack(hashes), [counts[h] for h in hashes], [texts[h] for h in hashes]]
        if self.offset:
            out["o"] = self.offset

    def read(self, obj: Any) -> None:
        """From a cell's state, into a new (empty) instance (ValueError and others: bad)."""
        if "t" in obj:
            packed, counts, texts = obj["t"]
            hashes = unpack(packed)
            if not len(hashes) == len(counts) == len(texts) <= self._url_cap:
                raise ValueError("bad url counters")
            if not all(type(c) is int and c > 0 for c in counts) or \
                    not all(type(t) is str and len(t) <= MAX_URL_CHARS for t in texts):
                raise ValueError("bad url counter")
            self._urls = dict(zip(hashes, counts, strict=True))
            self._texts = dict(zip(hashes, texts, strict=True))
        offset = obj.get("o", 0)
        if type(offset) is not int or offset < 0:
            raise ValueError("bad offset")
        self.offset = offset
