"""Ingest memory follows its configuration, not the traffic, and slow clients are cut off
(docs/contract.md §3, "Limits"): a real ``aggregator run --role ingest`` process, its RSS
read from ``/proc``, a worker process counting what it acknowledged.

The budget, the slices and the region cap without a broker: tests/unit/ingest/."""
from __future__ import annotations

import fcntl
import gzip
import select
import socket
import struct
import termios
import threading
import time
from urllib.parse import urlsplit

import orjson
import pytest

from tests.conftest import http, wait_for
from tests.integration.conftest import BROKER_INDEPENDENT

pytestmark = [BROKER_INDEPENDENT]

MiB = 1 << 20
RSS_BOUND_MB = 300
NDJSON = {"Content-Type": "application/x-ndjson"}


def vm(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS of ``pid``, MB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) // 1024
    return out


def tiny_events(region: str, size: int) -> tuple[bytes, int]:
    """An NDJSON body of ``size`` bytes at most of the smallest events (the worst case:
    the most events per byte), and how many."""
    line = b'{"region":"%s"}\n' % region.encode()
    n = size // len(line)
    return line * n, n


def connect(url: str) -> socket.socket:
    u = urlsplit(url)
    return socket.create_connection((u.hostname, u.port), timeout=10)


def unacked(s: socket.socket) -> int:
    """Bytes sent on ``s`` that the peer's kernel has not acknowledged yet (Linux SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def post_async(url: str, body: bytes, headers: dict, out: list) -> threading.Thread:
    def run() -> None:
        t = time.perf_counter()
        status, hdrs, raw = http("POST", url + "/v1/events", body, headers, timeout=50)
        out.append((status, hdrs, raw, time.perf_counter() - t))
    th = threading.Thread(target=run)
    th.start()
    return th


@pytest.mark.integration
def test_memory_bounded_by_configuration(service_factory):
    """Three concurrent 8 MiB bodies of the smallest events and a gzip bomb (8 MiB that
    inflates to 8 GiB) leave the ingest process under 300 MB; a body over the in-flight
    budget (default: 32 MiB) gets 503 + Retry-After at once; every accepted event reaches
    the worker."""
    ingest = service_factory("ingest", AGG_ROLE="ingest").start()
    worker = service_factory("worker", AGG_ROLE="worker").start()
    pid = ingest.proc.pid
    assert vm(pid)["VmHWM"] < 120, vm(pid)

    body, n = tiny_events("rss-a", 8 * MiB - 64)
    member = gzip.compress(bytes(64 * MiB), compresslevel=9)  # ~64 KiB
    bomb = member * (8 * MiB // len(member))                  # 128 members: 8 GiB inflated
    assert len(bomb) <= 8 * MiB

    answers: list = []
    threads = [post_async(ingest.url, body, NDJSON, answers) for _ in range(3)]
    bomb_answer: list = []
    threads.append(post_async(ingest.url, bomb, {**NDJSON, "Content-Encoding": "gzip"}, bomb_answer))
    for th in threads:
        th.join(55)
    assert bomb_answer[0][0] == 413, bomb_answer[0][:3]
    assert [a[0] for a in answers] == [200, 200, 200], [a[:3] for a in answers]
    accepted = sum(orjson.loads(a[2])["accepted"] for a in answers)
    assert accepted == 3 * n
    peak = vm(pid)
    assert peak["VmHWM"] < RSS_BOUND_MB, peak

    # four bodies announced and never sent hold none of the budget: others are served
    head = (b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
            b"Content-Length: %d\r\n\r\n" % (8 * MiB))
    holds = [connect(ingest.url) for _ in range(4)]
    for s in holds:
        s.sendall(head)
    t = time.perf_counter()
    assert http("POST", ingest.url + "/v1/events", b'{"region":"rss-b"}\n', NDJSON)[0] == 200
    assert time.perf_counter() - t < 1.0
    # four bodies sent but for their last byte fill it (8 MiB - 1 each, as they arrive): the
    # next request is refused at once, before a byte of its body is read.  Bytes are taken as
    # they arrive, so a request may only probe once the server has them all (else it could
    # take room one of the four needs, and that one would be refused)
    for s in holds:
        s.sendall(b" " * (8 * MiB - 1))
    wait_for(lambda: all(unacked(s) == 0 for s in holds), 10, interval=0.05, what="the bodies acknowledged")
    time.sleep(0.5)  # and read off the server's socket buffers by the handlers

    def refused() -> tuple | None:
        t = time.perf_counter()
        status, hdrs, raw = http("POST", ingest.url + "/v1/events", b'{"region":"rss-b"}\n', NDJSON)
        return (hdrs, raw, time.perf_counter() - t) if status == 503 else None

    hdrs, raw, took = wait_for(refused, 10, interval=0.1, what="a 503 while the budget is full")
    assert hdrs.get("Retry-After") == "1" and b"in-flight" in raw and took < 1.0, (hdrs, raw, took)
    for s in holds:
        s.close()
    # the budget is given back when they go
    wait_for(lambda: http("POST", ingest.url + "/v1/events", b'{"region":"rss-b"}\n', NDJSON)[0] == 200, 10,
             interval=0.2, what="the budget given back")

    # nothing accepted is lost: the worker counts exactly what was acknowledged
    def counted() -> int | None:
        snaps = [s for s in worker.snapshots() if s["region"] == "rss-a"]
        total = sum(s["count"] + s["late"] for s in snaps)
        return total if total >= accepted else None

    assert wait_for(counted, 45, interval=1, what="the worker's count of the accepted events") == accepted
    assert vm(pid)["VmHWM"] < RSS_BOUND_MB


def _slow(url: str, body_phase: bool) -> socket.socket:
    s = connect(url)
    s.setblocking(False)
    if body_phase:  # whole headers announcing 8 MiB (four would fill the in-flight budget), then a byte a second
        s.send(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
               b"Content-Length: %d\r\n\r\n" % (8 * MiB))
    return s


@pytest.mark.integration
def test_slow_clients_cut_off(service_factory):
    """50 connections sending a byte a second (half in their headers, half in their body)
    are closed within the timeouts while normal requests keep their latency; connections
    over the cap get 503 + Retry-After."""
    timeout = 2.0
    svc = service_factory("ingest", AGG_ROLE="ingest", AGG_HTTP_HEADER_TIMEOUT_SECONDS=str(timeout),
                          AGG_HTTP_BODY_TIMEOUT_SECONDS=str(timeout), AGG_HTTP_MAX_CONNECTIONS="60").start()
    started = time.monotonic()
    slow = {_slow(svc.url, body_phase=i % 2 == 1): i % 2 == 1 for i in range(50)}
    header_bytes = b"POST /v1/events HTTP/1.1\r\nHost: x\r\n"
    closed_at: dict[socket.socket, float] = {}
    answers: dict[socket.socket, bytes] = {}
    latencies: list[float] = []
    sent = 0
    while len(closed_at) < len(slow) and time.monotonic() - started < 15:
        # a byte a second on every open slow connection
        for s in slow:
            if s in closed_at:
                continue
            try:
                s.send(b"{" if slow[s] else header_bytes[sent % len(header_bytes):][:1])
            except OSError:
                closed_at[s] = time.monotonic() - started
        sent += 1
        # normal requests meanwhile
        for _ in range(3):
            t = time.perf_counter()
            status, _, raw = http("POST", svc.url + "/v1/events", b'{"region":"fast"}\n' * 100, NDJSON)
            latencies.append(time.perf_counter() - t)
            assert status == 200, raw
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            open_ = [s for s in slow if s not in closed_at]
            readable, _, _ = select.select(open_, [], [], max(0.0, end - time.monotonic()))
            for s in readable:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                answers[s] = answers.get(s, b"") + data
                if not data:
                    closed_at[s] = time.monotonic() - started
    for s in slow:
        s.close()
    assert len(closed_at) == 50, f"{50 - len(closed_at)} slow connections still open after 15 s"
    # header timeout + its sweep (a quarter of it) + a byte's second + slack
    assert max(closed_at.values()) < timeout + timeout / 4 + 1 + 2, sorted(closed_at.values())
    timed_out_bodies = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408")]
    assert len(timed_out_bodies) == 25, list(answers.values())[:3]
    latencies.sort()
    assert latencies[-1] < 1.0, latencies[-5:]

    # the connection cap: 60 open at most, the ones beyond get 503 + Retry-After and are closed
    held = [connect(svc.url) for _ in range(60)]
    try:
        extra = connect(svc.url)
        extra.settimeout(5)
        reply = extra.recv(65536)
        assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in reply, reply
        assert extra.recv(65536) == b""  # closed
        extra.close()
    finally:
        for s in held:
            s.close()
    # and once they are gone, requests are served again
    wait_for(lambda: http("GET", svc.url + "/healthz")[0] == 200, 5, what="the server after the cap")
