"""Where a big JSON array is cut (ingest/cuts.py), JSON nested too deeply for the parsers,
and a slice that ``decode_slices`` has handed out not held by it (docs/contract.md §3)."""
from __future__ import annotations

import gc
import tracemalloc

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aggregator.ingest.body import SLICE_BYTES, BodyError, decode_body, decode_slices, validate_records
from aggregator.ingest.cuts import NEXT_OBJECT, next_cut, outside
from tests.unit.ingest.test_body import JSON, NDJSON, PROPS
from tests.unit.ingest.test_bounds import same_as_whole

# ------------------------------------------------------------------ a slice handed out

LISTS = b"[" + b",".join([b"[]"] * 2000) + b"]"  # parsed: some 17 times its size
JUNK = b'"props":' + LISTS


@pytest.mark.parametrize("body, ct", [
    (b"[" + b",".join([b'{"region":"eu",' + JUNK + b"}"] * 20) + b"]", JSON),  # parsed whole
    (b'{"region":"eu",' + b",".join(b'"p%d":' % i + LISTS for i in range(20)) + b"}", JSON),  # one object
    (b"\n".join([b'{"region":"eu",' + JUNK + b"}"] * 20), NDJSON),             # lines at once
    (b"\n".join([b'{"region":"eu",' + JUNK + b"}"] * 20) + b"\n{bad", NDJSON),  # line by line
], ids=["array", "object", "ndjson", "ndjson-bad-line"])
def test_a_slice_handed_out_is_not_held_while_the_handler_waits(body: bytes, ct: str) -> None:
    """The handler drops a slice (``del items``) before it waits for the broker (seconds
    when it is slow): the slices must not hold it meanwhile (they held 12-17 times the
    body: a list iterator until its next ``next``, a generator in a local)."""
    assert len(body) <= SLICE_BYTES  # one slice
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        slices = decode_slices(body, ct)
        items = next(slices)
        assert len(items) >= 1 and tracemalloc.get_traced_memory()[0] - base > 5 * len(body)
        del items
        held = tracemalloc.get_traced_memory()[0] - base
        assert list(slices) == []
    finally:
        tracemalloc.stop()
    assert held < len(body) // 4


# ------------------------------------------------------------------ cuts inside strings


def test_cuts_inside_strings_cost_no_probes() -> None:
    """A URL that carries a JSON filter list: 15 ``},{`` in each event's strings used up the
    probes (a re-parse of a part each) and the whole body was refused."""
    url = "https://shop.example/list?filters=" + orjson.dumps([{"k": f"c{i}", "v": i} for i in range(16)]).decode()
    for ev in ({"region": "eu", "user_id": "u1", "url": url},
               {"region": "eu", "url": url, "p": [{"a": url}, {"b": url}]}):  # nested objects too
        body = orjson.dumps([ev] * 2000)
        assert len(body) > 3 * SLICE_BYTES
        parts = list(decode_slices(body, JSON))
        assert len(parts) > 2 and sum(len(validate_records(p)[0]) for p in parts) == 2000


def string_state(body: bytes, a: int, s: int) -> int:
    """``outside`` byte by byte: what it must give."""
    i, inside = a, False
    while i < s:
        c = body[i]
        if inside and c == 0x5C:
            i += 2
            continue
        if c == 0x22:
            inside = not inside
        i += 1
    if not inside:
        return s
    while i < len(body):
        c = body[i]
        if c == 0x5C:
            i += 2
            continue
        if c == 0x22:
            return i + 1
        i += 1
    return len(body)


def cut_by_bytes(body: bytes, p: int, limit: int) -> int | None:
    """``next_cut`` byte by byte: the start of the first ``},{`` outside strings."""
    i = p
    while i <= limit:
        j = string_state(body, p, i)
        if j != i:
            i = j
            continue
        m = NEXT_OBJECT.match(body, i, limit + 1)
        if m is not None:
            return i
        i += 1
    return None


texts = st.text(alphabet='\\"},{ a\n', max_size=30) | st.sampled_from(["\\" * 20 + '"},{', '"' * 9 + "\\" * 9])
values = st.recursive(texts | st.integers(0, 99), lambda v: st.lists(v, max_size=3) | st.dictionaries(texts, v, max_size=3),
                      max_leaves=8)


@given(items=st.lists(st.dictionaries(texts, values, max_size=4), min_size=1, max_size=8), data=st.data())
@PROPS
def test_string_state_and_cuts_are_those_byte_by_byte(items: list, data: st.DataObject) -> None:
    body = orjson.dumps(items)
    s = data.draw(st.integers(2, len(body)))
    assert outside(body, 1, s) == string_state(body, 1, s)
    p = string_state(body, 1, s)
    limit = data.draw(st.integers(p, len(body)))
    m = next_cut(body, p, limit)
    assert (None if m is None else m.start()) == cut_by_bytes(body, p, limit)


@given(rs=st.lists(st.fixed_dictionaries({"region": st.sampled_from(["eu", "us"])}, optional={
    "url": texts, "nested": st.lists(st.dictionaries(texts, texts, max_size=2), max_size=3)}), max_size=30),
    slice_bytes=st.integers(1, 200))
@PROPS
def test_bodies_with_escapes_are_cut_as_they_parse_whole(rs: list, slice_bytes: int) -> None:
    same_as_whole(orjson.dumps(rs), JSON, slice_bytes)


# ------------------------------------------------------------------ nested too deeply

EV = b'{"region":"eu","p":[{"a":1},{"b":2}]}'  # a "},{" in a nested array: the first cut fails


def deep(depth: int) -> bytes:
    return b'{"region":"eu","x":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("body", [
    b"[" * (1 << 20),                                                           # not an array, over 512 KiB
    b'{"a":' + b"[" * 600_000,
    b"[" + deep(1100) + b"," + b",".join([EV] * 20_000) + b"]",                 # past orjson's 1024
    b"[" + b",".join([EV] * 9000) + b"," + deep(1100) + b"," + b",".join([EV] * 9000) + b"]",
], ids=["brackets", "object", "deep-first", "deep-later"])
def test_json_nested_too_deeply_is_a_400_that_says_so(body: bytes) -> None:
    """msgspec raises RecursionError, not DecodeError, past some 1000 levels: it escaped as
    a 500 with a traceback.  Nothing of such a body is produced."""
    with pytest.raises(BodyError) as ei:
        decode_slices(body, JSON)
    # orjson's "depth limit exceeded", or msgspec's depth where it alone reads the body
    assert ei.value.status == 400
    assert "too deeply" in ei.value.message or "not valid JSON: depth limit exceeded" in ei.value.message


def test_nesting_the_parsers_take_is_taken_in_a_big_body_as_in_a_small_one() -> None:
    """1000 levels: more than msgspec's skipping parse takes, less than orjson's limit;
    accepted as a small body with it is (orjson decides the probe msgspec cannot make)."""
    assert validate_records(decode_body(b"[" + deep(1000) + b"]", JSON))[0]
    for body in (b"[" + deep(1000) + b"," + b",".join([EV] * 20_000) + b"]",
                 b"[" + b",".join([EV] * 9000) + b"," + deep(1000) + b"," + b",".join([EV] * 9000) + b"]"):
        assert sum(len(validate_records(p)[0]) for p in decode_slices(body, JSON)) == body.count(b'"region"')
    # and too deep for orjson: a 400 in a small body too
    with pytest.raises(BodyError) as ei:
        decode_body(b"[" + deep(1100) + b"]", JSON)
    assert "depth limit exceeded" in ei.value.message


def test_an_ndjson_line_nested_too_deeply_is_rejected_alone() -> None:
    body = b"\n".join([EV, deep(1100), EV])
    good, errors, reasons = validate_records([i for p in decode_slices(body, NDJSON) for i in p])
    assert len(good) == 2 and [e["index"] for e in errors] == [1] and reasons == {"bad_json": 1}
