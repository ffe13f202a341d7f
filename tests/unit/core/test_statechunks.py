"""A partition's state as changelog records of bounded size (issue 15, fault 6): one
record of it was ~465 KB at 1000 regions and crashed the worker over Kafka's 1 MiB
limit with a few windows unpublished."""
from __future__ import annotations

import orjson
import pytest

from aggregator.core.statechunks import (
    MAX_RECORD_BYTES,
    StateCorrupt,
    decode_state,
    encode_chunks,
    header_slot,
)
from aggregator.core.windows import WindowBook

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588


def as_recovered(records):
    """The table Faust's recovery builds from these records: keys and values JSON-decoded."""
    return {orjson.loads(k): orjson.loads(v) for k, v in records}


def big_state(regions: int, windows: int) -> bytes:
    """A book of ``regions`` regions with ``windows`` closed windows none of them published."""
    book = WindowBook(1000, 100, 60_000, 3_600_000, regions + 10)
    names = [f"region-{i:05d}" for i in range(regions)]
    for w in range(windows + 1):
        book.apply([(r, w * 1000 + 500, None) for r in names], (w + 1) * regions, w * 1000 + 500)
    assert len(book.outbox) == regions * windows  # every closed window is still to publish
    return orjson.dumps(book.to_dict())


def test_5000_regions_and_publishing_stalled_for_several_windows_stay_under_the_bound():
    state = big_state(5000, 6)
    assert len(state) > 3 * KAFKA_DEFAULT_MAX_MESSAGE_BYTES  # one record of it would be refused
    chunks, header = encode_chunks(7, state, 1)
    sizes = [len(k) + len(v) for k, v in [*chunks, header]]
    assert max(sizes) <= MAX_RECORD_BYTES < KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    assert len(chunks) > 1
    data = as_recovered([*chunks, header])
    got, slot = decode_state(7, data.get(7), data.get)
    assert slot == 1 and got == orjson.loads(state)
    book = WindowBook(1000, 100, 60_000, 3_600_000, 5010)
    book.load(got)
    assert len(book.outbox) == 5000 * 6


def test_worst_case_characters_stay_under_the_bound():
    # quotes double when escaped; non-ASCII takes up to 4 bytes: neither passes the bound
    for ch in ('"', "\\", "é", "\U0001f600"):
        state = orjson.dumps({"x": ch * 400_000})
        chunks, header = encode_chunks(0, state, 0)
        assert max(len(k) + len(v) for k, v in [*chunks, header]) <= MAX_RECORD_BYTES
        data = as_recovered([*chunks, header])
        assert decode_state(0, data.get(0), data.get)[0] == {"x": ch * 400_000}


def test_our_own_bytes_read_back_as_well_as_recovered_ones():
    state = orjson.dumps({"next_offset": 5})
    chunks, header = encode_chunks(3, state, 0)
    data = {orjson.loads(k): v for k, v in [*chunks, header]}  # values as bytes: what this process confirmed
    assert decode_state(3, data[3], data.get) == ({"next_offset": 5}, 0)
    assert header_slot(data[3]) == 0


def test_a_new_slot_leaves_the_state_its_header_names_intact():
    old = orjson.dumps({"next_offset": 1, "pad": "a" * 300_000})
    new = orjson.dumps({"next_offset": 2, "pad": "b" * 300_000})
    old_chunks, old_header = encode_chunks(0, old, 0)
    new_chunks, _ = encode_chunks(0, new, 1)
    # a crash after the new chunks but before the new header: the old state is whole
    data = as_recovered([*old_chunks, old_header, *new_chunks])
    assert decode_state(0, data.get(0), data.get)[0]["next_offset"] == 1


def test_missing_or_mismatched_chunks_are_refused_not_read_as_an_empty_state():
    state = orjson.dumps({"next_offset": 9, "pad": "x" * 300_000})
    chunks, header = encode_chunks(0, state, 0)
    data = as_recovered([*chunks[:-1], header])
    with pytest.raises(StateCorrupt, match="missing"):
        decode_state(0, data.get(0), data.get)
    other_chunks, _ = encode_chunks(0, orjson.dumps({"next_offset": 8, "pad": "y" * 300_000}), 0)
    data = as_recovered([*other_chunks, header])
    with pytest.raises(StateCorrupt, match="checksum"):
        decode_state(0, data.get(0), data.get)


def test_a_whole_state_of_the_earlier_format_is_still_read():
    earlier = {"v": 1, "next_offset": 42}
    assert decode_state(2, earlier, {}.get) == (earlier, None)
    assert decode_state(2, orjson.dumps(earlier), {}.get) == (earlier, None)
    assert decode_state(2, None, {}.get) is None
