"""The dedup ids ingest writes into its header (IngestHandler._ids): the same bytes as
core.dedup.id_field of the events' DedupIds, and parsed back by the worker to the same ids."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from aggregator.core.contract import OTHER_REGION
from aggregator.core.dedup import DedupStore
from aggregator.core.dedupid import event_key, id_field, parse_id_field, request_key
from aggregator.ingest.body import Event, decode_slices, validate_records
from aggregator.ingest.handler import IngestHandler
from aggregator.metrics import Metrics
from aggregator.worker.decoder import RecordDecoder
from tools.records import fetched

KEY = request_key("retry-me-42")


def test_a_keyed_request_gives_each_event_its_key_and_index():
    events = [Event("eu"), Event("us"), Event("eu")]
    got = IngestHandler._ids(events, KEY, [0, 3, 7])
    assert got == [id_field((KEY, 0)), id_field((KEY, 3)), id_field((KEY, 7))]
    assert [parse_id_field(f, e.region) for f, e in zip(got, events, strict=True)] == [(KEY, 0), (KEY, 3), (KEY, 7)]


def test_an_event_id_wins_over_the_key_and_events_without_either_have_none():
    events = [Event("eu", event_id="a"), Event("us"), Event("ap", event_id="ü-2")]
    assert IngestHandler._ids(events, KEY, [0, 1, 2]) == [
        id_field(event_key("eu", "a")), id_field((KEY, 1)), id_field(event_key("ap", "ü-2"))]
    assert IngestHandler._ids(events, None, None) == [id_field(event_key("eu", "a")), None,
                                                      id_field(event_key("ap", "ü-2"))]
    assert parse_id_field(id_field(event_key("ap", "ü-2")), "ap") == event_key("ap", "ü-2")


def test_no_key_and_no_event_id_is_no_ids():
    assert IngestHandler._ids([Event("eu"), Event("us")], None, None) is None


class _Batcher:
    """What ``IngestHandler._submit`` uses of the producer's batcher: records kept as
    fetched specs (key, value, headers), every one acknowledged."""

    def __init__(self) -> None:
        self.out: list[tuple[bytes, bytes, list]] = []

    def has_metadata(self) -> bool:
        return True

    def progress(self, partitions: object) -> int:
        return 0

    def partition_of(self, region: str) -> int:
        return 0

    def forget(self, regions: object) -> None:
        pass

    def submit(self, by_region: dict, ts: int) -> set:
        self.out += [(region.encode(), value, headers) for region, recs in by_region.items()
                     for value, headers in recs]
        return set()


class _Producer:
    def __init__(self) -> None:
        self.batcher = _Batcher()


@pytest.mark.parametrize("eid", ["x", ""])
def test_the_same_event_id_in_two_regions_over_the_cap_is_counted_twice(eid: str) -> None:
    """Ingest's cap puts both regions under ``__other__``, each id keeping its own region
    (contract §3); an empty ``event_id`` too, which the worker once failed to read from
    the header (``r<region>\\n``) and took from the value instead: ``__other__\\n`` for both,
    the second dropped as a repeat."""
    producer = _Producer()
    h = IngestHandler(producer, Metrics(5.0, 60.0), "", 1 << 20, 1)  # type: ignore[arg-type]
    body = orjson.dumps([{"region": "eu"}, {"region": "zz1", "event_id": eid}, {"region": "zz2", "event_id": eid}])
    items = [x for s in decode_slices(body, "application/json") for x in s]
    good, _, _ = validate_records(items)
    its = 1_700_000_000_000
    asyncio.run(h._submit(good, its, {}, set(), None, h._ids(good, None, None)))
    out = RecordDecoder().decode(fetched(producer.batcher.out), its, 0, False, None, its + 5_000)
    assert out.rejected == {}
    assert out.ids == [None, event_key("zz1", eid), event_key("zz2", eid)]
    kept, _, dups, _ = DedupStore(600_000).filter(out.events, out.ids)
    assert [e[0] for e in kept] == ["eu", OTHER_REGION, OTHER_REGION] and dups == {}
