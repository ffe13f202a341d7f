"""The dedup ids ingest writes into its header (IngestHandler._ids): the same bytes as
core.dedup.id_field of the events' DedupIds, and parsed back by the worker to the same ids."""
from __future__ import annotations

from aggregator.core.dedup import event_key, id_field, parse_id_field, request_key
from aggregator.ingest.body import Event
from aggregator.ingest.handler import IngestHandler

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
