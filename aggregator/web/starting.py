"""The HTTP port while ``aggregator run`` waits for its broker at start (docs/contract.md §3).

The routes of web/server.py listen only once the broker has answered and the topics are
checked (up to AGG_BROKER_WAIT_SECONDS).  Until then a probe found nothing listening: a
liveness check could not tell a process that waits from one that hangs, and ``/readyz``
could not say why it was not ready.  ``while_starting`` serves the port meanwhile, from a
thread of its own (the wait blocks the main thread): ``/healthz`` 200, ``/readyz`` 503 with
the reason, every other request 503 with ``Retry-After``; it stops, freeing the port, before
the service's own server binds it."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import orjson
from aiohttp import HttpVersion11, hdrs, web

from aggregator.web.server import CONTINUE, expectation_failed

STOP_WAIT_S = 5.0
SHUTDOWN_S = 1.0  # requests still open when the wait ends: cut off after this (they are all 503s)


def _json(status: int, body: dict[str, str], headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)
    resp.force_close()  # no keep-alive: nothing left open to wait for when the port is handed over
    return resp


def starting_app(reason: str) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return _json(200, {"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        return _json(503, {"status": "not ready", "reason": reason})

    async def other(request: web.Request) -> web.Response:
        return _json(503, {"error": f"not ready: {reason}"}, {"Retry-After": "5"})

    async def expect(request: web.Request) -> web.StreamResponse | None:
        """As the service's (web.server ``Routes.expect``): a JSON 417 for an expectation other
        than ``100-continue``, and the 503 before ``100 Continue``, so no body is sent for it."""
        if request.version != HttpVersion11:
            return None
        expectation = request.headers.get(hdrs.EXPECT, "")
        if expectation.strip().lower() != "100-continue":
            resp = expectation_failed(expectation)
            resp.force_close()
            return resp
        if request.match_info.handler is other:
            return await other(request)
        await request.writer.write(CONTINUE)
        request.writer.output_size = 0  # the answer has not begun (as aiohttp's own handler)
        return None

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz, expect_handler=expect),
                    web.get("/readyz", readyz, expect_handler=expect),
                    web.route("*", "/{any:.*}", other, expect_handler=expect)])
    return app


@contextlib.contextmanager
def while_starting(host: str, port: int, reason: str) -> Iterator[None]:
    """Serve ``host:port`` as the module says within the block (not for port 0: the service
    takes a free port of its own later, which a probe could not know)."""
    if port == 0:
        yield
        return
    loop = asyncio.new_event_loop()
    # lingering_time 0: a POST whose body is not read (a 503) is not read on for 10 s more,
    # which held the port closed that long at the handover
    runner = web.AppRunner(starting_app(reason), handle_signals=False, access_log=None, lingering_time=0,
                           shutdown_timeout=SHUTDOWN_S)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, host, port, reuse_address=True).start())
    thread = threading.Thread(target=loop.run_forever, name="http-while-starting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_WAIT_S)
        if not thread.is_alive():  # (else the loop is stuck: leave it, the service's bind will say so)
            loop.run_until_complete(runner.cleanup())  # the port is free again
            loop.close()
