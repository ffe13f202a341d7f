"""The aggregates of a partition's open windows, as exactly-once state.

Pure: standard library, orjson and core.sketches.  One ``WindowAggregates`` per window
book (AGG_AGGREGATES on): a ``CellAggregates`` per (window, region) for the events counted
in that window, and the log of what went into them.

A cell is a few KiB to ~46 KiB, and every active region's cell changes between two
checkpoints, so writing the cells themselves each checkpoint would cost megabytes a
tick.  What a checkpoint writes instead is the cells' *input* since the last one -- per
batch and cell, the user hashes that changed it, url hashes, client delays and the URL
texts the cell read -- as changelog records keyed by window and sequence number, named in
the partition's state by ``Prepared.to_json()``.  After a crash the cells are rebuilt by
adding the logged batches again in the same order, which gives byte-identical cells
(core.sketches is deterministic), so a re-published snapshot is identical.  When a
window closes its cells become the snapshot's fields (in the book's outbox, which is
state) and its records are deleted after the state that no longer names them is durable.

Per event, ``WindowBook.apply`` only appends the event's ``Agg`` (an ingest record's agg
header as it came, the decoder's ``Parts``) and delay code to its cell's ``Staged``; ``flush``
(at 5,000 to 20,000 staged events, see FLUSH_MIN; at the checkpoint; before a window closes)
reads a cell's in bulk and adds them with ``CellAggregates.add_batch``.  A URL's text is
logged only when the cell took it (``add_batch`` returns those), which is exactly what
replaying the batch needs.  Once a window's logged input outgrows its cells, the cells
themselves are logged as its base (``_compact``), so a window's records stay bounded.
"""
from __future__ import annotations

import sys
from array import array
from binascii import Error as BinasciiError
from binascii import unhexlify
from collections import Counter
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import orjson

from aggregator.core.contract import USER_HASH_DIGITS, Agg, AggParts, parse_agg_header, parse_hash64, parse_hashes64
from aggregator.core.events import REGION_MAX_CHARS
from aggregator.core.recordlog import RECORD_BYTES, Prepared, RecordLog
from aggregator.core.sketches import MAX_URL_CHARS, CellAggregates, Parts, SketchParams, count_parts
from aggregator.core.sketches.delays import code_buckets, delay_code
from aggregator.core.sketches.delays import geometry as delay_geometry

EMPTY_RESULT: dict[str, Any] = {"unique_users": 0, "top_urls": [], "client_delay_ms": None}

# ``_size``'s estimate of a logged batch's JSON bytes: a fixed part, the region's and each
# URL text's characters escaped at worst (6 bytes each), and per user hash, URL (hash and
# count), delay bucket and URL text
_ENTRY_BYTES, _CHAR_BYTES, _USER_BYTES, _URL_BYTES, _BUCKET_BYTES, _TEXT_BYTES = 100, 6, 22, 30, 20, 26
# events of a cell added (and logged) at once: as many as keep a logged batch under
# RECORD_BYTES whatever its users and URLs (``_size`` at its worst: a user and a URL an
# event, every delay bucket, and a text of MAX_URL_CHARS for each URL that got a counter,
# at most url_capacity), and at most CHUNK_MAX.  Larger batches cost less per event (one
# Misra-Gries merge and purge per batch): at the default 128 URL counters a batch is 4000
# events, 15-20 % less flush time than 1000 a batch
CHUNK_MAX = 4000


def chunk_events(params: SketchParams) -> int:
    fixed = (_ENTRY_BYTES + REGION_MAX_CHARS * _CHAR_BYTES
             + _BUCKET_BYTES * delay_geometry(params.delay_accuracy).n_buckets)
    room = RECORD_BYTES - fixed
    per_event = _USER_BYTES + _URL_BYTES
    text = _TEXT_BYTES + MAX_URL_CHARS * _CHAR_BYTES
    c = (room - params.url_capacity * text) // per_event
    if c < params.url_capacity:  # every event may bring a new URL's text
        c = room // (per_event + text)
    return max(1, min(CHUNK_MAX, c))


# staged events of a partition added before the checkpoint asks: at FLUSH_MIN once their cells
# get FLUSH_CELL_EVENTS each on average (sooner costs less while they are in the CPU's caches:
# docs/performance.md), else at FLUSH_EVENTS (a cell's batch costs a merge and a logged entry)
FLUSH_MIN, FLUSH_EVENTS, FLUSH_CELL_EVENTS = 5_000, 20_000, 300
_MAX64 = (1 << 64) - 1
# an agg header whose user hash has its USER_HASH_DIGITS: its comma, the hash, the rest
_D = USER_HASH_DIGITS
_AT_16, _USER_16, _TAIL_16 = itemgetter(slice(_D, _D + 1)), itemgetter(slice(_D)), itemgetter(slice(_D + 1, None))
_SWAP = sys.byteorder == "little"  # the hex digits are big-endian
_NONE = type(None)
assert array("Q").itemsize * 2 == _D  # a 64-bit hash: 16 hex digits, 8 bytes
TAILS_MAX = 50_000
# tails longer than this are not kept in ``tails`` (ingest's are at most a 16-digit url hash,
# a comma and MAX_URL_CHARS; a forged header's may be anything): as UrlCache's max_chars
TAIL_MAX_BYTES = 16 + 1 + 256
# a window's input logged beyond this (and beyond twice its cells) is replaced by its cells
COMPACT_BYTES = 4_000_000
_GEN_BUCKETS = 10**14  # buckets at or above: window start * 1000 + generation (below: a window start)


def window_of(bucket: int) -> int:
    """The window start of a bucket of aggregates records."""
    return bucket // 1000 if bucket >= _GEN_BUCKETS else bucket

# A logged batch of one cell: (window start, region, user hashes, url hashes, their events,
# [[url hash, text], ...] of the URLs that got a counter, delay buckets, their events,
# events with a delay <= 0)
Entry = tuple[int, str, list[int], list[int], list[int], list[list[Any]], list[int], list[int], int]
# A logged base: a cell as it was, whole (bucket, region, CellAggregates.to_json(), its size)
Base = tuple[int, str, dict[str, Any], int]


class Staged:
    """What ``WindowBook.apply`` stages per cell: the events' ``Agg``s, their client delays'
    codes (``delay_code``: the geometry table's objects, not new integers) and ``run``: its
    events not in the book's counts yet (``apply`` adds them at the end of a run)."""
    __slots__ = ("aggs", "codes", "run")

    def __init__(self) -> None:
        self.aggs: list[Agg | None] = []
        self.codes: list[Any] = []
        self.run = 0


def _users_16(aggs: list[bytes]) -> list[int] | None:
    """The user hashes of agg headers that all start with 16 hex digits and a comma (what
    ingest writes), in one ``unhexlify``; None for any other batch (AttributeError or
    TypeError when not all are bytes)."""
    if b"".join(map(_AT_16, aggs)) != b"," * len(aggs):
        return None
    try:
        raw = array("Q", unhexlify(b"".join(map(_USER_16, aggs))))
    except BinasciiError:  # a user part that is not 16 hex digits (e.g. ",<15-digit url hash>,")
        return None
    if _SWAP:
        raw.byteswap()
    return raw.tolist()


def _base_size(region: str, value: dict[str, Any]) -> int:
    """JSON bytes of a logged base (a region's cell, ``_compact``) in its record, at most."""
    return 40 + len(region) * 6 + len(orjson.dumps(value))


def _check_region(region: Any) -> None:
    if type(region) is not str or not 0 < len(region) <= REGION_MAX_CHARS:
        raise ValueError("a malformed region in aggregates records")


class WindowAggregates(RecordLog):
    TAG = "g"

    def __init__(self, params: SketchParams | None = None, top_n: int = 10) -> None:
        super().__init__()  # pending: the entries logged since the last durable state
        self.params = params or SketchParams()
        self.top_n = top_n
        self.chunk = chunk_events(self.params)
        self.geo = delay_geometry(self.params.delay_accuracy)
        # ``delay_code`` by delay 0..TABLE_MS-1, objects ``WindowBook.apply`` stages as they are
        self.delay_codes: list[Any] = self.geo.ztable
        self.cells: dict[int, dict[str, CellAggregates]] = {}  # window start -> region -> cell
        # window start -> region -> what a batch adds to the cell, not added yet (``flush``)
        self.stage: dict[int, dict[str, Staged]] = {}
        self.malformed = 0  # agg headers that could not be read (their events add no user, no URL)
        self.n_staged = 0  # events staged (``WindowBook.apply`` adds, ``flush`` resets)
        # the ``<url hash>,<url>`` part of agg headers -> (url hash or -1: none, url), of at most
        # TAIL_MAX_BYTES; cleared when full
        self.tails: dict[bytes, tuple[int, bytes]] = {}
        # per open window: the bucket its records go to now (the window start, or after a
        # compaction ``_compact`` its start * 1000 + generation), the input bytes logged since
        # its last base, and the size of that base
        self.bucket_of: dict[int, int] = {}
        self.input_bytes: dict[int, int] = {}
        self.base_bytes: dict[int, int] = {}

    # ------------------------------------------------------------------ per batch
    def staged_window(self, ws: int) -> dict[str, Staged]:
        """Window ``ws``'s staged cells by region (``WindowBook.apply`` holds it while it
        counts into that window, and adds a ``Staged`` for a region new to it)."""
        per_window = self.stage.get(ws)
        if per_window is None:
            per_window = self.stage[ws] = {}
        return per_window

    def add(self, ws: int, region: str, agg: Agg | None, delay: int | None) -> None:
        """One event counted in window ``ws`` of ``region`` (added at the next ``flush``)."""
        staged = self.staged_window(ws).setdefault(region, Staged())
        staged.aggs.append(agg)
        if delay is not None:
            staged.codes.append(delay_code(self.delay_codes, delay))

    def flush_due(self) -> bool:
        """Whether ``WindowBook.apply`` adds what is staged now (see FLUSH_MIN)."""
        n = self.n_staged
        return n >= FLUSH_MIN and (n >= FLUSH_EVENTS or n >= FLUSH_CELL_EVENTS * sum(map(len, self.stage.values())))

    def flush(self) -> None:
        """Add what is staged to the cells, a cell at a time (``CellAggregates.add_batch``),
        and log each batch: its user hashes, URL counts, delay buckets and the URL texts
        the cell took."""
        staged = list(self.stage.items())
        self.stage.clear()  # the same dict: ``WindowBook.apply`` holds it through a batch
        self.n_staged = 0
        for ws, per_window in staged:
            cells = self.cells.get(ws)
            if cells is None:
                cells = self.cells[ws] = {}
            for region, cell_staged in per_window.items():
                aggs, delays = cell_staged.aggs, cell_staged.codes
                cell = cells.get(region)
                if cell is None:
                    cell = cells[region] = CellAggregates(self.params)
                chunk = self.chunk
                if len(aggs) <= chunk and len(delays) <= chunk:
                    self._add(ws, region, cell, aggs, delays)
                    continue
                for i in range(0, max(len(aggs), len(delays)), chunk):
                    self._add(ws, region, cell, aggs[i:i + chunk], delays[i:i + chunk])

    def _add(self, ws: int, region: str, cell: CellAggregates, aggs: list[Agg | None], delays: list[int]) -> None:
        users, urls, texts = self._columns(aggs)
        buckets, dz = code_buckets(delays, self.geo)
        if not (users or urls or buckets or dz):
            return
        read, users = cell.add_batch(users, urls, texts, buckets, dz)  # users: those that changed the cell
        entry = (self.bucket_of.get(ws, ws), region, users, list(urls), list(urls.values()), read, list(buckets),
                 list(buckets.values()), dz)
        self.pending.append(entry)
        self.input_bytes[ws] = self.input_bytes.get(ws, 0) + self._size(entry)

    def _columns(self, aggs: list[Agg | None]) -> tuple[list[int], dict[int, int], dict[int, bytes | str]]:
        """(user hashes in order, url hash -> events, url hash -> its text) of the events' ``Agg``s:
        agg headers (``<user hash>,<url hash>,<url>``, hex) in bulk -- users in one ``unhexlify`` when
        each has its 16 digits, the rest per distinct URL --, Parts and tuples too, a mix one by one."""
        if aggs and type(aggs[0]) is Parts:  # the decoder's, of records produced straight to Kafka
            try:  # with no pass over the types first: another kind among them raises
                return count_parts(aggs)  # type: ignore[arg-type]
            except (TypeError, AttributeError):  # what it counted is never read (its entries' gen)
                pass
        types = set(map(type, aggs))  # C-level, not a generator step an event
        if _NONE in types:
            aggs = [a for a in aggs if a is not None]
            if not aggs:
                return [], {}, {}
            types.discard(_NONE)
        if Parts in types or tuple in types:
            if len(types) == 1:
                return count_parts(aggs) if Parts in types else self._columns_parts(aggs)  # type: ignore[arg-type]
            return self._columns_each(aggs)
        try:
            users = _users_16(aggs)  # type: ignore[arg-type]
            if users is not None:
                tail_counts = Counter(map(_TAIL_16, aggs))  # type: ignore[arg-type]
            else:
                parts = [a.partition(b",") for a in aggs]  # type: ignore[union-attr]  # else AttributeError
                users = parse_hashes64([u for u, _, _ in parts if u])
                tail_counts = Counter([t for _, _, t in parts])
            urls: dict[int, int] = {}
            texts: dict[int, bytes | str] = {}
            tails = self.tails
            for tail, n in tail_counts.items():
                known = tails.get(tail)
                if known is None:
                    h, sep, url = tail.partition(b",")
                    if not sep:
                        raise ValueError("<user hash>,<url hash>,<url> expected")
                    url_h = parse_hash64(h) if h else -1
                    if (url_h >= 0) != bool(url):
                        raise ValueError("a url hash without its url")
                    known = (url_h, url)
                    if len(tail) <= TAIL_MAX_BYTES:
                        if len(tails) >= TAILS_MAX:
                            tails.clear()
                        tails[tail] = known
                url_h, url = known
                if url_h >= 0:
                    urls[url_h] = urls.get(url_h, 0) + n
                    if url_h not in texts:
                        texts[url_h] = url
            return users, urls, texts
        except (AttributeError, TypeError, ValueError):  # not all bytes, or one not as ingest writes it
            return self._columns_each(aggs)

    @staticmethod
    def _columns_parts(aggs: list[AggParts]) -> tuple[list[int], dict[int, int], dict[int, bytes | str]]:
        """``_columns`` of parsed parts (forwarded records'), in one loop (docs/performance.md)."""
        users: list[int] = []
        urls: dict[int, int] = {}
        texts: dict[int, bytes | str] = {}
        for user, url_h, url in aggs:
            if user is not None:
                users.append(user)
            if url_h is not None:
                n = urls.get(url_h)
                if n is None:
                    urls[url_h] = 1
                    texts[url_h] = url or ""  # each URL's first
                else:
                    urls[url_h] = n + 1
        return users, urls, texts

    def _columns_each(self, aggs: list[Agg | None]) -> tuple[list[int], dict[int, int], dict[int, bytes | str]]:
        users: list[int] = []
        urls: dict[int, int] = {}
        texts: dict[int, bytes | str] = {}
        for a in aggs:
            if a is None:
                continue
            try:
                user, url_h, url = parse_agg_header(a) if isinstance(a, bytes) else a.as_tuple() if isinstance(a, Parts) else a
            except ValueError:
                self.malformed += 1
                continue
            if (user is not None and not 0 <= user <= _MAX64) or (url_h is not None and not 0 <= url_h <= _MAX64):
                self.malformed += 1
                continue
            if user is not None:
                users.append(user)
            if url_h is not None:
                urls[url_h] = urls.get(url_h, 0) + 1
                if url_h not in texts:
                    texts[url_h] = url or ""
        return users, urls, texts

    # ------------------------------------------------------------------ closing
    def result(self, ws: int, region: str) -> dict[str, Any]:
        """The snapshot fields of a cell (of a window closing now)."""
        if self.stage:
            self.flush()
        cell = self.cells.get(ws, {}).get(region)
        return dict(EMPTY_RESULT) if cell is None else cell.result(self.top_n)

    def close(self, ws: int) -> None:
        """Window ``ws`` is closed (its results are in snapshots): forget its cells."""
        if ws in self.stage:
            self.flush()  # else a later flush would bring the closed window's cells back
        self.cells.pop(ws, None)
        self.bucket_of.pop(ws, None)
        self.input_bytes.pop(ws, None)
        self.base_bytes.pop(ws, None)

    # ------------------------------------------------------------------ changelog
    def take_records(self, partition: int) -> tuple[list[tuple[str, dict[str, Any]]], Prepared]:
        """``RecordLog.take_records``, after moving the windows closed since (their results are
        in snapshots) out of the index and their pending entries out of the log."""
        if self.stage:
            self.flush()
        open_windows = self.cells
        for b in [b for b in self.written if window_of(b) not in open_windows]:
            self.expiring.append((b, self.written.pop(b)))
        if any(window_of(e[0]) not in open_windows for e in self.pending):
            self.pending = [e for e in self.pending if window_of(e[0]) in open_windows]
        for ws in list(open_windows):
            if self.input_bytes.get(ws, 0) > max(COMPACT_BYTES, 2 * self.base_bytes.get(ws, 0)):
                self._compact(ws)
        return super().take_records(partition)

    def _compact(self, ws: int) -> None:
        """Window ``ws``'s input logged since it opened (or since its last base) has outgrown
        its cells: log the cells themselves as the base of a new bucket of the window, drop
        the input entries not written yet (the cells hold them), and let the bucket before
        expire once a state naming the new one is durable.  So a window's records are at most
        its cells plus about twice their size of input, however many events it gets."""
        old = self.bucket_of.get(ws, ws)
        gen = old % 1000 + 1 if old >= _GEN_BUCKETS else 1
        if gen >= 1000 or ws * 1000 < _GEN_BUCKETS:  # a start before 1973: its buckets would read as starts
            return
        new = ws * 1000 + gen
        bases: list[Base] = []  # first: should a cell not serialise, the log is left as it was
        for region, cell in sorted(self.cells[ws].items()):
            value = cell.to_json()
            bases.append((new, region, value, _base_size(region, value)))
        self.pending = [e for e in self.pending if e[0] != old]
        if old in self.written:
            self.expiring.append((old, self.written.pop(old)))
        self.pending.extend(bases)
        total = sum(b[3] for b in bases)
        self.bucket_of[ws] = new
        self.base_bytes[ws] = total
        self.input_bytes[ws] = 0

    def _sizes(self, items: Sequence[Entry | Base]) -> list[int]:
        return list(map(self._size, items))  # a checkpoint writes a few entries a cell, not one an event

    def _size(self, e: Entry | Base) -> int:
        if len(e) == 4:
            return e[3]
        return (_ENTRY_BYTES + len(e[1]) * _CHAR_BYTES + _USER_BYTES * len(e[2]) + _URL_BYTES * len(e[3])
                + _BUCKET_BYTES * len(e[6]) + sum(_TEXT_BYTES + len(t) * _CHAR_BYTES for _, t in e[5]))

    def _value(self, entries: Sequence[Entry | Base]) -> dict[str, Any]:
        """``{"c": [[region, user hashes, url hashes, their events, [[url hash, text], ...],
        delay buckets, their events, delays <= 0], ...]}``: the logged batches in order."""
        bases = [[e[1], e[2]] for e in entries if len(e) == 4]
        batches = [list(e[1:]) for e in entries if len(e) != 4]
        return {"b": bases, "c": batches} if bases else {"c": batches}

    def load(self, partition: int, index: Any, record: Callable[[str], Any], open_windows: set[int]) -> None:
        """Rebuild the cells of ``open_windows`` from a state's ``index`` and the stored records
        (``record(key)`` -> its JSON value; a missing one raises ValueError)."""
        if not index:
            return
        for b_text, n in sorted(index.items(), key=lambda kv: int(kv[0])):
            b = int(b_text)
            ws = window_of(b)
            if ws not in open_windows:  # closed in the state: its records go
                self.expiring.append((b, int(n)))
                continue
            for seq in range(int(n)):
                value = record(self.record_key(partition, b, seq))
                if not isinstance(value, dict):
                    raise ValueError(f"partition {partition}: aggregates record {b}/{seq} is missing")
                try:
                    self._replay(ws, value, seq == 0)
                except (KeyError, TypeError, IndexError, AttributeError, OverflowError) as exc:
                    raise ValueError(f"partition {partition}: aggregates record {b}/{seq} is malformed: {exc}") from exc
            self.written[b] = int(n)
            self.bucket_of[ws] = b
        self.pending = []  # the replay re-logged what is written already

    def _replay(self, ws: int, value: dict[str, Any], first: bool = True) -> None:
        """Add a logged record of window ``ws`` to its cells, and its size to the window's
        ``input_bytes`` (a base: ``base_bytes``, input from 0), as when it was logged: so a
        restart does not allow another COMPACT_BYTES before the window is compacted."""
        per_window = self.cells.setdefault(ws, {})
        if "b" in value and (first or ws not in self.base_bytes):  # a base may take several records
            self.input_bytes[ws] = self.base_bytes[ws] = 0
        for region, base in value.get("b", ()):
            _check_region(region)
            per_window[region] = CellAggregates.from_json(base)
            self.base_bytes[ws] += _base_size(region, base)
        if "c" not in value:  # the earlier format: one entry per event
            self.input_bytes[ws] = self.input_bytes.get(ws, 0) + len(orjson.dumps(value))
            texts = value.get("t", {})
            for i, (region, user, url_h, delay) in enumerate(zip(value["r"], value["u"], value["h"], value["d"],
                                                                 strict=True)):
                _check_region(region)
                text = texts.get(str(i))
                if not (all(x is None or (type(x) is int and 0 <= x <= _MAX64) for x in (user, url_h))
                        and (delay is None or type(delay) is int) and (text is None or type(text) is str)):
                    raise ValueError("a malformed aggregates entry")
                cell = per_window.get(region)
                if cell is None:
                    cell = per_window[region] = CellAggregates(self.params)
                cell.add(user, url_h, text, delay)
            return
        size = self.input_bytes.get(ws, 0)
        for entry in value["c"]:
            region, users, url_hs, url_ns, texts, bucket_ids, bucket_ns, dz = entry
            _check_region(region)
            cell = per_window.get(region)
            if cell is None:
                cell = per_window[region] = CellAggregates(self.params)
            cell.check_batch(users, url_hs, url_ns, texts, bucket_ids, bucket_ns, dz)
            cell.add_batch(users, dict(zip(url_hs, url_ns, strict=True)), dict(texts),
                           dict(zip(bucket_ids, bucket_ns, strict=True)), dz)
            size += self._size((ws, *entry))
        self.input_bytes[ws] = size
