"""The connection cap and the header timeout of the HTTP server (docs/contract.md §3): a
guard in front of aiohttp's protocol for each connection (web.server's site uses it)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("aggregator.web")


_REFUSED_BODY = b'{"error":"too many connections: retry in a second"}'
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


class _Conn(asyncio.Protocol):
    """One connection: aiohttp's protocol behind a guard that counts it against the cap
    and notes when it last started or finished a request (for the header timeout)."""

    __slots__ = ("gate", "inner", "transport", "idle_since", "busy", "refused")

    def __init__(self, gate: ConnectionGate, inner: asyncio.Protocol) -> None:
        self.gate = gate
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None
        self.idle_since = time.monotonic()
        self.busy = 0  # requests of this connection in a handler
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if len(self.gate.conns) >= self.gate.max_connections:
            self.refused = True
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(REFUSED)
            transport.close()
            self.gate.refuse()
            return
        self.gate.conns[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.refused else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        if self.transport is not None:
            self.gate.conns.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.refused:
            self.inner.resume_writing()


REFUSED_LOG_INTERVAL = 10.0  # seconds: one warning at most per interval while connections are refused


class ConnectionGate:
    """The connection cap and the header timeout of the HTTP server.

    A connection over ``max_connections`` gets a 503 with ``Retry-After`` and is closed
    before aiohttp sees it: counted (``on_refused``, the metric
    ``clickstream_http_connections_refused_total``) and logged, one warning per
    ``REFUSED_LOG_INTERVAL`` at most, with the number refused since the last one.
    A connection not in a handler (sending a request's headers, or idle between
    requests) for longer than ``header_timeout`` is closed by a sweep every quarter of it
    (a byte a second never completes the headers; aborted, its answer dropped, when it has
    not read the last one); a handler bounds its own body read (ingest:
    ``AGG_HTTP_BODY_TIMEOUT_SECONDS``)."""

    def __init__(self, max_connections: int, header_timeout: float,
                 on_refused: Callable[[int], None] | None = None) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.conns: dict[asyncio.BaseTransport, _Conn] = {}
        self.refused = 0    # connections refused over the cap
        self.timed_out = 0  # connections closed by the header timeout
        self.on_refused = on_refused
        self._refused_logged = 0   # self.refused at the last warning
        self._next_refused_log = 0.0  # monotonic time before which no further warning is logged

    def refuse(self) -> None:
        """A connection over the cap was answered 503 and closed."""
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused(1)
        now = time.monotonic()
        if now >= self._next_refused_log:
            self._next_refused_log = now + REFUSED_LOG_INTERVAL
            log.warning("HTTP: %d connection(s) refused with 503 since the last such line: %d open, "
                        "AGG_HTTP_MAX_CONNECTIONS is %d", self.refused - self._refused_logged, len(self.conns),
                        self.max_connections)
            self._refused_logged = self.refused

    def protocol(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Conn(self, make())

    def begin(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self.conns.get(transport) if transport is not None else None
        if conn is not None:
            conn.busy += 1

    def end(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self.conns.get(transport) if transport is not None else None
        if conn is not None:
            conn.busy -= 1
            conn.idle_since = time.monotonic()

    def sweep(self, now: float) -> int:
        """Close the connections idle (not in a handler) past the header timeout."""
        cutoff = now - self.header_timeout
        late = [c for c in self.conns.values() if not c.busy and c.idle_since < cutoff]
        for c in late:
            assert c.transport is not None
            # close() would wait for an unflushed answer its client no longer reads
            if isinstance(c.transport, asyncio.WriteTransport) and c.transport.get_write_buffer_size():
                c.transport.abort()
            else:
                c.transport.close()
        self.timed_out += len(late)
        return len(late)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.header_timeout / 4))
            self.sweep(time.monotonic())
