"""One home partition per region, whatever partition a record arrived on.  Pure.

The HTTP ingest keys records by region and lets the producer pick the partition:
Kafka's default partitioner, murmur2 of the key modulo the partition count.  So a
region's *home* is ``murmur2(region) % N`` (N = partitions of ``clicks``), and a
region's records are all in its home as long as everything is produced that way.
Other producers may spread a region over partitions (keyless records, librdkafka's
CRC32 partitioner, partitions added later).  A record that arrives away from its
region's home is *foreign*: it is not counted where it arrives but forwarded to
``clicks-repartition`` at partition home(region), and counted by the home's book
(docs/contract.md §1).

Exactly once across crashes: the source's state (whose next offset covers the
forwarded records) is written only once the forwards are acknowledged, so a crash
before that re-reads the same records of the source and forwards the same ones again,
in the same order.  The home keeps, per source partition, the highest source offset it
has applied (``Watermarks``, part of its book's state) and drops a forwarded record at
or below it: the repeat of a prefix already applied.

A source partition whose log starts over (core.sourcelog: its topic created again, the
broker back empty) counts offsets from 0 again.  So the source's book keeps a *log epoch*,
one more each time its log is found to have started over (written with its state, so a
crash before that finds the same restart again and forwards under the same epoch), and
every forwarded record carries it.  The home's mark is (epoch, offset): a record of a
higher epoch starts the source's mark again, one of a lower epoch is a stale repeat of a
log that is gone.  A source that never started over has epoch 0, written as before.

Here: murmur2 and ``home``, the encoding of a forwarded record, the split of a
decoded batch into home and foreign events (the decoder inlines the same rule in its
loop), and the watermark filter.
"""
from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence

from aggregator.core.contract import (
    AGG_HEADER,
    INGEST_HEADER,
    SOURCE_HEADER,
    Agg,
    Event,
    Header,
    agg_bytes,
    ingest_header_value,
)
from aggregator.core.dedupid import DedupId, id_field

# A foreign event: (region, ingest_ts, client_ts or None, its offset in the source partition,
# its dedup id (core.dedup) or None, what it adds to aggregates (core.aggstate) or None)
Foreign = tuple[str, int, "int | None", int, "DedupId | None", "Agg | None"]
# A forwarded event as the home reads it: (source partition, its log epoch, source offset, the event)
Forwarded = tuple[int, int, int, Event]

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as an unsigned 32-bit int."""
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    end4 = length - length % 4
    for i in range(0, end4, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = length % 4
    if extra >= 3:
        h ^= data[end4 + 2] << 16
    if extra >= 2:
        h ^= data[end4 + 1] << 8
    if extra >= 1:
        h ^= data[end4]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def home(region: str, partitions: int) -> int:
    """The partition of ``clicks`` that Kafka's default partitioner gives key = ``region``
    (its normalised spelling, UTF-8): where the HTTP ingest writes it, and where it is counted."""
    return (murmur2(region.encode()) & 0x7FFFFFFF) % partitions


def split(events: Sequence[Event], offsets: Sequence[int], partition: int, partitions: int,
          homes: MutableMapping[str, int] | None = None) -> tuple[list[Event], list[Foreign]]:
    """-> (the events whose home is ``partition``, the foreign ones with their offsets).
    ``homes`` caches home by region."""
    homes = {} if homes is None else homes
    here: list[Event] = []
    away: list[Foreign] = []
    for (region, its, cts), offset in zip(events, offsets, strict=True):
        h = homes.get(region)
        if h is None:
            h = homes[region] = home(region, partitions)
        if h == partition:
            here.append((region, its, cts))
        else:
            away.append((region, its, cts, offset, None, None))
    return here, away


def source_header(partition: int, offset: int, epoch: int = 0) -> bytes:
    """``<partition>,<offset>``, and ``,<epoch>`` once the source's log has started over."""
    if epoch:
        return b"%d,%d,%d" % (partition, offset, epoch)
    return b"%d,%d" % (partition, offset)


def parse_source_header(value: bytes) -> tuple[int, int, int]:
    """-> (source partition, source offset, its log epoch: 0 when absent); ValueError when it
    is not what a worker writes."""
    p, sep, rest = value.partition(b",")
    if not sep:
        raise ValueError("not <partition>,<offset>[,<epoch>]")
    o, sep, e = rest.partition(b",")
    return int(p), int(o), int(e) if sep else 0


def overtaken(sent: Sequence[tuple[int, int]], acknowledged: Sequence[bool]) -> list[int]:
    """Of forwards ``sent`` in order as (home, source partition), with whether the broker
    acknowledged each: the indices of those not acknowledged while a later one of the same
    source to the same home was.  The home's mark for that source is past them (``Watermarks``),
    so it would drop them as repeats however often they are sent again: lost, unless the broker
    stored them after all (a request that timed out)."""
    failed: dict[tuple[int, int], list[int]] = {}
    lost: list[int] = []
    for i, (lane, ok) in enumerate(zip(sent, acknowledged, strict=True)):
        if not ok:
            failed.setdefault(lane, []).append(i)
        elif lane in failed:
            lost += failed.pop(lane)
    return sorted(lost)


def forward_record(partition: int, f: Foreign, epoch: int = 0) -> tuple[bytes, bytes, list[Header]]:
    """-> (key, value, headers) of the ``clicks-repartition`` record forwarding foreign event
    ``f`` read from ``partition`` of ``clicks`` (whose log epoch is ``epoch``): key = region,
    the ingest header (ingest time, client time), the source header, and the compact event as
    value (for people reading the topic)."""
    region, its, cts, offset, did, agg = f
    ingest = ingest_header_value(its, cts, None if did is None else id_field(did, region))
    if cts is None:
        value = b'{"region":"%s","ingest_ts":%d}' % (region.encode(), its)
    else:
        value = b'{"region":"%s","ingest_ts":%d,"ts":%d}' % (region.encode(), its, cts)
    headers = [(INGEST_HEADER, ingest), (SOURCE_HEADER, source_header(partition, offset, epoch))]
    if agg is not None:
        headers.append((AGG_HEADER, agg_bytes(agg)))
    return region.encode(), value, headers


class Watermarks:
    """Per source partition, the highest source offset a home has applied from
    ``clicks-repartition`` and the log epoch it belongs to; part of the home's book state
    (``applied``: source -> offset, ``epochs``: source -> epoch, 0s left out)."""

    __slots__ = ("applied", "epochs")

    def __init__(self, applied: MutableMapping[int, int] | None = None,
                 epochs: MutableMapping[int, int] | None = None) -> None:
        self.applied: MutableMapping[int, int] = {} if applied is None else applied
        self.epochs: MutableMapping[int, int] = {} if epochs is None else epochs

    def fresh(self, source: int, offset: int, epoch: int = 0) -> bool:
        """True (and noted) when (``epoch``, ``offset``) of ``source`` is past what was
        applied; False for a repeat (a source re-forwarding after a crash repeats its records
        in order) or a record of an older epoch (a log that has started over since)."""
        known = self.epochs.get(source, 0)
        if epoch != known:
            if epoch < known:
                return False
            self.epochs[source] = epoch  # the source's log started over: its offsets start again
            self.applied.pop(source, None)
        if offset <= self.applied.get(source, -1):
            return False
        self.applied[source] = offset
        return True

    def take(self, forwarded: Iterable[Forwarded]) -> list[Event]:
        """The events of ``forwarded`` not applied before, in order."""
        fresh = self.fresh
        return [e for source, epoch, offset, e in forwarded if fresh(source, offset, epoch)]
