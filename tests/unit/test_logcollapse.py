"""Repeated library log lines are collapsed (aggregator/logcollapse.py): while the broker
is away aiokafka logged ~100 ERROR lines a second; now the first of each is shown, then
at most one per interval saying how many were left out."""
from __future__ import annotations

import io
import json
import logging

import pytest

from aggregator import logs
from aggregator.logcollapse import INTERVAL_S, RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_the_first_line_passes_then_repeats_are_left_out_until_the_interval():
    clock = Clock()
    f = RepeatFilter(interval_s=10, clock=clock)
    assert f.filter(record("aiokafka", "Unable connect to node with id %s: %s", 1, "refused"))
    for i in range(99):
        clock.now += 0.01
        assert not f.filter(record("aiokafka", "Unable connect to node with id %s: %s", 1, f"refused {i}"))
    clock.now = 1010.0
    r = record("aiokafka", "Unable connect to node with id %s: %s", 1, "refused again")
    assert f.filter(r)
    assert r.getMessage() == ("Unable connect to node with id 1: refused again "
                              "[the same error 99 more times in the last 10 s, not shown]")
    assert r.suppressed == 99
    # and the count starts again
    clock.now += 1
    assert not f.filter(record("aiokafka", "Unable connect to node with id %s: %s", 1, "x"))
    clock.now += 10
    r = record("aiokafka", "Unable connect to node with id %s: %s", 1, "y")
    assert f.filter(r) and r.suppressed == 1 and "1 more time in the last 11 s" in r.getMessage()


def test_a_line_after_a_quiet_interval_is_shown_as_it_is():
    clock = Clock()
    f = RepeatFilter(interval_s=10, clock=clock)
    assert f.filter(record("aiokafka", "Unable to update metadata from %s", [1]))
    clock.now += 30
    r = record("aiokafka", "Unable to update metadata from %s", [1])
    assert f.filter(r) and r.getMessage() == "Unable to update metadata from [1]"
    assert not hasattr(r, "suppressed")


def test_logger_level_and_template_each_count_apart():
    f = RepeatFilter(interval_s=10, clock=Clock())
    assert f.filter(record("aiokafka", "Unable connect to node with id %s: %s", 1, "a"))
    assert f.filter(record("aiokafka", "Unable to update metadata from %s", [1]))
    assert f.filter(record("aiokafka.consumer.fetcher", "Unable to update metadata from %s", [1]))
    assert f.filter(record("aiokafka", "Unable to update metadata from %s", [1], level=logging.WARNING))
    assert not f.filter(record("aiokafka", "Unable to update metadata from %s", [2]))


@pytest.mark.parametrize("name", ["aggregator.broker", "aggregator.worker", "aiokafkaesque", "root", "faustish"])
def test_other_loggers_are_never_touched(name):
    f = RepeatFilter(interval_s=10, clock=Clock())
    assert all(f.filter(record(name, "broker unreachable at %s", "127.0.0.1:9092")) for _ in range(1000))


@pytest.mark.parametrize("name", ["aiokafka", "aiokafka.consumer.group_coordinator", "faust.tables.recovery", "mode"])
def test_the_libraries_and_their_children_are_collapsed(name):
    f = RepeatFilter(interval_s=10, clock=Clock())
    assert f.filter(record(name, "same %s", 1))
    assert not f.filter(record(name, "same %s", 2))


def test_templates_remembered_are_bounded():
    clock = Clock()
    f = RepeatFilter(interval_s=10, clock=clock, max_keys=50)
    for i in range(1000):
        clock.now += 0.001
        assert f.filter(record("faust", f"pre-formatted line {i}"))
        assert len(f.seen) <= 50


def test_a_message_that_cannot_be_formatted_is_left_to_the_handler():
    clock = Clock()
    f = RepeatFilter(interval_s=10, clock=clock)
    assert f.filter(record("mode", "two %s %s", 1))
    assert not f.filter(record("mode", "two %s %s", 1))
    clock.now += 10
    r = record("mode", "two %s %s", 1)
    assert f.filter(r)  # never raises into the caller
    assert "two %s %s" in r.getMessage() and r.suppressed == 1


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_setup_logging_collapses_aiokafka_and_keeps_our_lines(monkeypatch, fmt):
    monkeypatch.setenv("AGG_LOG_FORMAT", fmt)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    root = logging.getLogger()
    before = root.handlers[:], root.level
    try:
        logs.setup_logging("INFO")
        for i in range(500):
            logging.getLogger("aiokafka").error("Unable connect to node with id %s: %s", 1, f"refused {i}")
            logging.getLogger("aiokafka.consumer.fetcher").error("Failed fetch messages from %s: %s", 1, "x")
        for _ in range(3):
            logging.getLogger("aggregator.broker").error("broker unreachable at %s", "127.0.0.1:1")
        f = next(x for x in root.handlers[0].filters if isinstance(x, RepeatFilter))
        for entry in f.seen.values():
            entry[0] -= INTERVAL_S  # the interval has passed
        logging.getLogger("aiokafka").error("Unable connect to node with id %s: %s", 1, "last")
    finally:
        root.handlers[:], _ = before[0], root.setLevel(before[1])
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 + 3 + 1, lines
    assert sum("broker unreachable" in line for line in lines) == 3
    assert "[the same error 499 more times in the last 10 s, not shown]" in lines[-1]
    if fmt == "json":
        last = json.loads(lines[-1])
        assert last["suppressed"] == 499 and last["logger"] == "aiokafka"
