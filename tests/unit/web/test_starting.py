"""The HTTP port while ``run`` waits for its broker (aggregator/web/starting.py), on a real
socket: the probes' answers, and a handover that a client trickling a body does not hold
up (aiohttp read on after the 503 for 10 s, the port closed meanwhile)."""
from __future__ import annotations

import json
import socket
import time

from aggregator.broker import free_port
from aggregator.web.starting import while_starting
from tools.harness import http


def test_the_probes_are_answered_and_the_rest_is_503():
    port = free_port()
    with while_starting("127.0.0.1", port, "starting: waiting"):
        url = f"http://127.0.0.1:{port}"
        assert http("GET", url + "/healthz")[0] == 200
        status, _, body = http("GET", url + "/readyz")
        assert status == 503 and json.loads(body) == {"status": "not ready", "reason": "starting: waiting"}
        status, headers, body = http("POST", url + "/v1/events", b"[]")
        assert status == 503 and headers.get("Retry-After") == "5" and "not ready" in json.loads(body)["error"]
    with socket.socket() as s:  # the port is free for the service
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_a_client_trickling_a_body_does_not_hold_the_port_at_the_handover():
    port = free_port()
    with socket.socket() as c:
        with while_starting("127.0.0.1", port, "starting"):
            c.connect(("127.0.0.1", port))
            c.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
            c.settimeout(5)
            assert c.recv(4096).startswith(b"HTTP/1.1 503")
            for _ in range(3):
                try:
                    c.sendall(b"x" * 10)
                except OSError:
                    break  # the server closed it after its answer: what it should do
                time.sleep(0.1)
            started = time.monotonic()
        took = time.monotonic() - started
    assert took < 2.0, f"the handover waited {took:.1f}s for a client"


def _exchange(port: int, head: bytes) -> bytes:
    """What the server sends for ``head`` (headers only, no body sent), until it closes or 2 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
        c.sendall(head)
        got = b""
        try:
            while chunk := c.recv(4096):
                got += chunk
                if b"\r\n\r\n" in got and not got.startswith(b"HTTP/1.1 100"):
                    break
        except TimeoutError:
            pass
    return got


def test_expect_is_answered_as_the_service_answers_it():
    """A JSON 417 for an unknown expectation, and the 503 before any ``100 Continue``: a
    client that waits for one sends no body to be refused (contract §3)."""
    port = free_port()
    with while_starting("127.0.0.1", port, "starting"):
        got = _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 417") and b"application/json" in got, got
        got = _exchange(port, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                              b"Content-Length: 5000\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 503") and b"100 Continue" not in got, got
        got = _exchange(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503"), got
