import logging
import os
import struct
import zlib

import pytest

from aggregator.spill import SpillStore, encode_record, read_segment
from aggregator.spill.segment import MAX_RECORD_BYTES, encode_records
from aggregator.spill.store import escape_region, unescape_region


def payloads(n, prefix="ev"):
    return [f"{prefix}-{i}".encode() for i in range(n)]


def seg_files(store, region):
    d = store.region_dir(region)
    return sorted(f for f in os.listdir(d) if f.endswith(".seg"))


def drain_all(store, region, batch=7):
    out = []
    while True:
        b = store.read_batch(region, batch)
        if not b:
            return out
        out.extend(b)
        store.ack(region, len(b))


# ------------------------------------------------------------------ segment


def test_encode_record_format():
    rec = encode_record(b"hello")
    assert rec[:4] == struct.pack(">I", 5)
    assert rec[4:8] == struct.pack(">I", zlib.crc32(b"hello"))
    assert rec[8:] == b"hello"
    assert encode_records([b"a", b"", b"bc"]) == encode_record(b"a") + encode_record(b"") + encode_record(b"bc")


def test_read_segment_clean_torn_and_corrupt(tmp_path):
    p = tmp_path / "x.seg"
    recs = [b"one", b"two", b"three"]
    data = encode_records(recs)
    p.write_bytes(data)
    assert read_segment(p) == (recs, len(data), 0, False)

    # torn header / torn payload
    p.write_bytes(data + b"\x00\x00\x00")
    assert read_segment(p) == (recs, len(data), 0, True)
    p.write_bytes(data + encode_record(b"four")[:-1])
    assert read_segment(p) == (recs, len(data), 0, True)

    # absurd length -> torn tail
    p.write_bytes(data + struct.pack(">II", MAX_RECORD_BYTES + 1, 0) + b"x" * 20)
    assert read_segment(p) == (recs, len(data), 0, True)

    # corrupt middle payload byte -> skipped, rest recovered
    bad = bytearray(data)
    off = len(encode_record(b"one")) + 8  # first payload byte of "two"
    bad[off] ^= 0xFF
    p.write_bytes(bytes(bad))
    assert read_segment(p) == ([b"one", b"three"], len(data), 1, False)


# -------------------------------------------------------------------- store


def test_round_trip_order_and_ack(tmp_path):
    s = SpillStore(tmp_path, max_bytes=10**9)
    s.append("eu", payloads(5))
    s.append("eu", payloads(5, "b"))
    s.append("us", [b"u1"])
    assert s.backlog("eu") == 10 and s.backlog("us") == 1
    assert s.regions() == ["eu", "us"]
    # read does not remove
    assert s.read_batch("eu", 3) == payloads(3)
    assert s.read_batch("eu", 3) == payloads(3)
    assert s.read_batch("eu", 100) == payloads(5) + payloads(5, "b")
    s.ack("eu", 4)
    assert s.backlog("eu") == 6
    assert s.read_batch("eu", 2) == [b"ev-4", b"b-0"]
    assert drain_all(s, "eu") == [b"ev-4"] + payloads(5, "b")
    assert s.backlog("eu") == 0 and s.bytes("eu") == 0
    assert s.read_batch("eu", 10) == []
    assert s.read_batch("nope", 10) == []
    assert s.backlog("nope") == 0
    with pytest.raises(ValueError):
        s.ack("us", 2)
    assert s.read_batch("us", 10) == [b"u1"]
    s.close()


def test_ack_without_read_and_interleaved_appends(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0, segment_bytes=64)
    s.append("r", payloads(10))
    s.ack("r", 3)
    assert s.read_batch("r", 2) == [b"ev-3", b"ev-4"]
    s.append("r", [b"late"])
    assert s.read_batch("r", 100) == payloads(10)[3:] + [b"late"]
    s.ack("r", 7)
    assert s.read_batch("r", 100) == [b"late"]
    s.append("r", [b"later"])
    assert drain_all(s, "r", batch=1) == [b"late", b"later"]


def test_segments_roll_and_drained_ones_are_deleted(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0, segment_bytes=100)
    for i in range(10):
        s.append("eu", [b"x" * 40, b"y" * 40])  # 96 bytes per call -> one segment per call
    files = seg_files(s, "eu")
    assert len(files) == 10
    assert files[0] == "000000000001.seg"
    assert all(len(f) == len("000000000001.seg") for f in files)
    total = s.bytes("eu")
    assert total == 10 * 96 == s.total_bytes()
    s.ack("eu", 5)  # 2.5 segments
    assert seg_files(s, "eu") == files[2:]
    assert s.bytes("eu") == total - 5 * 48
    s.ack("eu", 15)
    assert seg_files(s, "eu") == []
    assert s.bytes("eu") == 0
    # sequence numbers keep increasing after everything was drained
    s.append("eu", [b"z"])
    assert seg_files(s, "eu") == ["000000000011.seg"]
    s.close()
    s2 = SpillStore(tmp_path, max_bytes=0, segment_bytes=100)
    assert s2.read_batch("eu", 10) == [b"z"]


def test_restart_recovers_backlog_and_cursor(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0, segment_bytes=200)
    for i in range(20):
        s.append("eu", payloads(5, f"b{i}"))
    s.append("us", [b"u"])
    s.ack("eu", 37)
    expect = s.read_batch("eu", 1000)
    assert len(expect) == 63
    bytes_before = s.bytes("eu")
    s.close()

    s2 = SpillStore(tmp_path, max_bytes=0, segment_bytes=200)
    assert s2.regions() == ["eu", "us"]
    assert s2.backlog("eu") == 63 and s2.backlog("us") == 1
    assert s2.bytes("eu") == bytes_before
    assert s2.read_batch("eu", 1000) == expect
    s2.ack("eu", 3)
    # appends after restart go after the old records
    s2.append("eu", [b"new"])
    s2.close()  # no explicit close needed for durability, but tidy

    s3 = SpillStore(tmp_path, max_bytes=0, segment_bytes=200)
    assert drain_all(s3, "eu") == expect[3:] + [b"new"]
    assert s3.corrupt_records.get("eu", 0) == 0


def test_restart_without_close_is_durable(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0)
    s.append("eu", payloads(3))
    s.ack("eu", 1)
    # simulate a crash: no close(); a new store reads the same directory
    s2 = SpillStore(tmp_path, max_bytes=0)
    assert s2.read_batch("eu", 10) == payloads(3)[1:]


def test_torn_last_record_truncated(tmp_path, caplog):
    s = SpillStore(tmp_path, max_bytes=0)
    s.append("eu", payloads(4))
    s.close()
    seg = os.path.join(s.region_dir("eu"), seg_files(s, "eu")[-1])
    good = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(encode_record(b"half-written-record")[:-5])
    with caplog.at_level(logging.WARNING, logger="aggregator.spill"):
        s2 = SpillStore(tmp_path, max_bytes=0)
    assert "torn tail" in caplog.text
    assert os.path.getsize(seg) == good
    assert s2.backlog("eu") == 4
    assert s2.torn_tails["eu"] == 1
    s2.append("eu", [b"after"])
    assert drain_all(s2, "eu") == payloads(4) + [b"after"]


def test_torn_header_only_segment_is_removed(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0)
    s.append("eu", [b"a"])
    s.ack("eu", 1)
    d = s.region_dir("eu")
    with open(os.path.join(d, "000000000005.seg"), "wb") as f:
        f.write(b"\x00\x00")
    s2 = SpillStore(tmp_path, max_bytes=0)
    assert s2.backlog("eu") == 0
    assert seg_files(s2, "eu") == []


def test_corrupt_middle_record_quarantined_rest_recovered(tmp_path, caplog):
    s = SpillStore(tmp_path, max_bytes=0)
    recs = payloads(10)
    s.append("eu", recs)
    s.close()
    seg = os.path.join(s.region_dir("eu"), seg_files(s, "eu")[0])
    data = bytearray(open(seg, "rb").read())
    off = sum(len(encode_record(r)) for r in recs[:5]) + 8 + 1  # a payload byte of record 5
    data[off] ^= 0x01
    open(seg, "wb").write(bytes(data))

    with caplog.at_level(logging.WARNING, logger="aggregator.spill"):
        s2 = SpillStore(tmp_path, max_bytes=0)
    assert "corrupt" in caplog.text and "quarantined" in caplog.text
    assert s2.corrupt_records["eu"] == 1
    assert s2.backlog("eu") == 9
    assert s2.read_batch("eu", 100) == recs[:5] + recs[6:]
    qdir = os.path.join(str(tmp_path), "quarantine")
    qfiles = os.listdir(qdir)
    assert len(qfiles) == 1
    raw = open(os.path.join(qdir, qfiles[0]), "rb").read()
    assert len(raw) == len(encode_record(recs[5]))
    assert raw[8:] != recs[5] and raw[:4] == struct.pack(">I", len(recs[5]))
    s2.close()
    # the segment was rewritten: a further restart sees no corruption
    s3 = SpillStore(tmp_path, max_bytes=0)
    assert s3.corrupt_records["eu"] == 0
    assert drain_all(s3, "eu") == recs[:5] + recs[6:]


def test_corruption_in_drained_part_is_ignored(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0)
    recs = payloads(6)
    s.append("eu", recs)
    s.ack("eu", 3)
    s.close()
    seg = os.path.join(s.region_dir("eu"), seg_files(s, "eu")[0])
    data = bytearray(open(seg, "rb").read())
    data[9] ^= 0xFF  # inside record 0, already drained
    open(seg, "wb").write(bytes(data))
    s2 = SpillStore(tmp_path, max_bytes=0)
    assert s2.corrupt_records["eu"] == 0
    assert s2.read_batch("eu", 10) == recs[3:]


def test_corruption_found_while_draining(tmp_path, caplog):
    s = SpillStore(tmp_path, max_bytes=0)
    recs = payloads(6)
    s.append("eu", recs)
    seg = os.path.join(s.region_dir("eu"), seg_files(s, "eu")[0])
    with open(seg, "r+b") as f:
        off = sum(len(encode_record(r)) for r in recs[:2]) + 8
        f.seek(off)
        f.write(b"X")
    with caplog.at_level(logging.WARNING, logger="aggregator.spill"):
        got = drain_all(s, "eu", batch=2)
    assert got == recs[:2] + recs[3:]
    assert s.corrupt_records["eu"] == 1
    assert s.backlog("eu") == 0


@pytest.mark.parametrize(
    "region", ["../etc", "a/b", "ü", ".", "..", "", "/abs", "a\\b", "..%2f", "A", "x" * 300, "nul\x00"]
)
def test_region_names_never_escape_root(tmp_path, region):
    root = tmp_path / "spill"
    s = SpillStore(root, max_bytes=0)
    s.append(region, [b"p1", b"p2"])
    s.ack(region, 1)
    d = s.region_dir(region)
    assert os.path.dirname(d) == os.path.join(str(root), "regions")
    assert os.path.basename(d) not in (".", "..", "")
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        for n in dirnames + filenames:
            p = os.path.realpath(os.path.join(dirpath, n))
            if p == real_root:
                continue
            assert os.path.commonpath([p, real_root]) == real_root, p
    assert sorted(os.listdir(tmp_path)) == ["spill"]
    s.close()
    s2 = SpillStore(root, max_bytes=0)
    assert s2.regions() == [region]
    assert s2.read_batch(region, 10) == [b"p2"]


def test_escape_round_trip_and_distinct():
    names = ["eu", "EU", "e.u", "e%2eu", "ü", "../etc", "a/b", ".", "..", "us-east_1"]
    escaped = [escape_region(n) for n in names]
    assert len(set(escaped)) == len(names)
    for n, e in zip(names, escaped, strict=False):
        assert e.startswith("r-")
        assert set(e[2:]) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-%")
        assert unescape_region(e) == n
    assert escape_region("eu") == "r-eu"
    assert escape_region("x" * 300).startswith("h-")


def test_truncate_after(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0, segment_bytes=60)
    for i in range(6):
        s.append("eu", payloads(3, f"b{i}"))
    everything = s.read_batch("eu", 100)
    s.ack("eu", 2)
    s.truncate_after("eu", 5)
    assert s.backlog("eu") == 5
    assert s.read_batch("eu", 100) == everything[2:7]
    s.append("eu", [b"tail"])
    assert s.read_batch("eu", 100) == everything[2:7] + [b"tail"]
    s.truncate_after("eu", 100)  # no-op
    assert s.backlog("eu") == 6
    s.close()
    s2 = SpillStore(tmp_path, max_bytes=0, segment_bytes=60)
    assert s2.read_batch("eu", 100) == everything[2:7] + [b"tail"]
    s2.truncate_after("eu", 0)
    assert s2.backlog("eu") == 0 and s2.bytes("eu") == 0
    assert seg_files(s2, "eu") == []
    s2.append("eu", [b"fresh"])
    s2.close()
    s3 = SpillStore(tmp_path, max_bytes=0, segment_bytes=60)
    assert drain_all(s3, "eu") == [b"fresh"]


def test_full_and_byte_accounting(tmp_path):
    rec = b"x" * 92  # 100 bytes encoded
    s = SpillStore(tmp_path, max_bytes=500)
    assert not s.full()
    s.append("a", [rec] * 2)
    s.append("b", [rec] * 2)
    assert s.bytes("a") == 200 and s.total_bytes() == 400
    assert not s.full()
    s.append("b", [rec])
    assert s.full()
    s.ack("b", 1)
    assert not s.full()
    assert SpillStore(tmp_path / "other", max_bytes=0).full() is False


def test_one_fsync_per_append_batch(tmp_path, monkeypatch):
    s = SpillStore(tmp_path, max_bytes=0)
    s.append("eu", [b"warm"])  # creates directory and first segment
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    s.append("eu", payloads(500))
    assert len(calls) == 1
    s.close()


def test_fsync_false_does_not_fsync(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    s = SpillStore(tmp_path, max_bytes=0, fsync=False)
    s.append("eu", payloads(10))
    s.ack("eu", 10)
    assert calls == []
    s.close()


def test_cursor_file_written_atomically(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0)
    s.append("eu", payloads(3))
    s.ack("eu", 1)
    files = os.listdir(s.region_dir("eu"))
    assert "cursor" in files
    assert not [f for f in files if f.endswith(".tmp")]
    # a stale tmp file from a crash mid-write is ignored and cleaned up
    open(os.path.join(s.region_dir("eu"), "cursor.tmp"), "w").write("garbage")
    s2 = SpillStore(tmp_path, max_bytes=0)
    assert s2.read_batch("eu", 10) == payloads(3)[1:]
    assert "cursor.tmp" not in os.listdir(s.region_dir("eu"))


def test_appends_after_a_torn_segment_whose_cut_failed_are_read(tmp_path, monkeypatch, caplog):
    """A segment found damaged while draining is cut where its good records end; when that
    cut fails the bytes stay, and the next append (O_APPEND) would land after them while
    memory says the segment ends at the cut: the next records go to a new segment."""
    s = SpillStore(tmp_path, max_bytes=0)
    recs = payloads(6)
    s.append("eu", recs)
    seg = os.path.join(s.region_dir("eu"), seg_files(s, "eu")[0])
    with open(seg, "r+b") as f:  # the 4th record's length: past any record
        f.seek(sum(len(encode_record(r)) for r in recs[:3]))
        f.write(struct.pack(">I", MAX_RECORD_BYTES + 1))

    def refuse(path, size):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "truncate", refuse)
    with caplog.at_level(logging.ERROR, logger="aggregator.spill"):
        assert s.read_batch("eu", 10) == recs[:3]
    assert "cutting" in caplog.text
    monkeypatch.undo()
    s.append("eu", [b"new-0", b"new-1"])
    assert s.read_batch("eu", 10) == recs[:3] + [b"new-0", b"new-1"]
    s.close()
    again = SpillStore(tmp_path, max_bytes=0)  # and so a restart finds them
    assert drain_all(again, "eu") == recs[:3] + [b"new-0", b"new-1"]
    again.close()


def test_taken_records_keep_no_payload_and_are_acknowledged_by_position(tmp_path):
    s = SpillStore(tmp_path, max_bytes=0, segment_bytes=64)
    s.append("eu", payloads(5))
    s.append("eu", payloads(5, "b"))
    assert s.peek("eu", 3) == payloads(3)
    s.take("eu", 3)
    assert s.peek("eu", 2) == [b"ev-3", b"ev-4"]  # after the taken ones
    s.take("eu", 4)
    assert s.taken("eu") == 7 and len(s._regions["eu"].cache) == 0
    assert s.read_batch("eu", 2) == payloads(2)  # still the oldest not acknowledged
    s.ack("eu", 2)  # part of the first take: its position is read again
    assert s.taken("eu") == 5 and s.read_batch("eu", 1) == [b"ev-2"]
    s.ack("eu", 5)
    assert s.taken("eu") == 0 and s.backlog("eu") == 3
    assert s.peek("eu", 10) == [b"b-2", b"b-3", b"b-4"]
    s.close()
