"""Is the broker reachable?  A TCP connect to a bootstrap address every second, for
``/readyz``: a process whose broker is gone must say so (it answered 200 through an
outage before), and one that is ready again must say that too, without a restart.

A connect only shows that something listens; a broker that accepts connections but
does not answer is seen by the parts that talk to it (their own time-outs)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aggregator.background import BackgroundService

log = logging.getLogger("aggregator.broker")
INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 1.0
FAILURES_BEFORE_DOWN = 2  # one lost connect is not an outage


class BrokerProbe(BackgroundService):
    def __init__(self, bootstrap: str, report: Callable[[bool], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.report = report  # called with the outcome of every probe
        self.addresses = [_host_port(a) for a in bootstrap.split(",") if a.strip()]
        self.reachable = True  # until shown otherwise: start-up has its own reasons
        self.failures = 0

    async def check(self) -> bool:
        for host, port in self.addresses:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError):
                continue
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
            return True
        return False

    async def background(self) -> None:
        while True:
            if await self.check():
                if not self.reachable:
                    log.info("broker reachable again")
                self.failures, self.reachable = 0, True
            else:
                self.failures += 1
                if self.reachable and self.failures >= FAILURES_BEFORE_DOWN:
                    log.error("broker unreachable at %s", ",".join(f"{h}:{p}" for h, p in self.addresses))
                    self.reachable = False
            if self.report is not None:
                self.report(self.reachable)
            await asyncio.sleep(INTERVAL_S)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().split("://", 1)[-1].rpartition(":")
    return host.strip("[]"), int(port)
