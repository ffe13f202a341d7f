"""What ``aggregator run`` sets in its own process before anything starts: the garbage
collector's thresholds and malloc's arenas for its role (``tune_memory``), and the open-file
limit its connection cap and spill need (``open_files``)."""
from __future__ import annotations

import gc
import resource

# CPython collects its youngest generation every 700 net container allocations, the
# middle one every 10 of those, and the whole heap once enough has been promoted.  The
# worker keeps each fetched batch (up to hundreds of thousands of records, header lists
# and event tuples) alive while it counts it: with the default thresholds every batch
# was promoted into the oldest generation, and collections that walk the whole heap
# (Faust, aiokafka, aiohttp) ran every second batch or so, about a third of the worker's
# CPU.  With (50000, 20, 10) a batch was no longer promoted, but the youngest generation
# was still collected four or five times while each fetched batch was alive (the count is
# of *net* allocations, so what a batch allocates counts until it is freed), each time
# walking the live batch: 0.6-1.0 s of collection per million events of ingest's records
# (gc.callbacks), 5-85 ms a pause.  The worker's threshold is now above what one round of
# fetches keeps alive (4 partitions x 4 MiB), so a collection mostly finds the batches
# already freed by reference counting: no collection after start-up over the same 1M
# events, 0.5-1 us less CPU an event, and figure 4b (3M events, 1000 regions) 91k -> 130k
# events/s at 265 -> 275 MB peak RSS.  Ingest allocates per request, not per fetched
# batch; it keeps (50000, 20, 10), which its memory tests were measured with.
# Once a role is ready, roles.HeapFreezer freezes what is alive then, so that full
# collections walk only what came after (worker: ~100 ms instead of ~160-200 ms each).
GC_THRESHOLDS = (50_000, 20, 10)
WORKER_GC_THRESHOLDS = (500_000, 20, 10)  # roles with a worker (worker, all)


def tune_memory(role: str) -> None:
    """The collector's thresholds for ``role``; with a worker, glibc's malloc set to keep
    the fetch responses' blocks from fetch to fetch (worker/arenas.py)."""
    gc.set_threshold(*(GC_THRESHOLDS if role == "ingest" else WORKER_GC_THRESHOLDS))
    if role != "ingest":
        from aggregator.worker.arenas import keep_heap
        keep_heap()


# Files a process opens beyond its HTTP connections and spill writers: Kafka connections
# (consumer, producer and admin, to each broker), the changelog table's, log files, the
# event loop's, spill segments being read or cut, the locks.
FD_RESERVE = 256


def open_files(max_connections: int, spill_writers: int) -> str | None:
    """Raise the soft open-file limit (RLIMIT_NOFILE) to what ``max_connections`` HTTP
    connections (AGG_HTTP_MAX_CONNECTIONS) and ``spill_writers`` spill files open at once
    (one a region with a backlog: AGG_MAX_REGIONS with a worker) need, within the hard
    limit; the reason it cannot, for a refusal at start.  Past the limit, accepting a
    connection, opening a spill segment or connecting to a broker would fail with EMFILE
    at a busy moment instead."""
    need = max_connections + spill_writers + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    if hard != resource.RLIM_INFINITY and hard < need:
        fits = hard - spill_writers - FD_RESERVE
        return (f"AGG_HTTP_MAX_CONNECTIONS={max_connections}"
                + (f" and AGG_MAX_REGIONS={spill_writers} (a spill file each)" if spill_writers else "")
                + f" need about {need} open files, and this process may open {hard} at most (RLIMIT_NOFILE): "
                "raise that limit (ulimit -n, systemd LimitNOFILE=, docker --ulimit nofile=)"
                + (f" or lower AGG_HTTP_MAX_CONNECTIONS to {fits} or less" if fits >= 1 else ""))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (ValueError, OSError) as exc:  # above the kernel's own ceiling (fs.nr_open)
        return (f"AGG_HTTP_MAX_CONNECTIONS={max_connections} and AGG_MAX_REGIONS={spill_writers} need about {need} "
                f"open files, and the open-file limit cannot be raised that far ({exc}): lower them")
    return None
