"""The worker's Faust side, and all of it: the app (consumer group, the changelog-backed
table ``window-state``, recovery, offset commits), the batch consumer's hooks, and the
few questions the worker asks Faust (assignment, end offsets, recovery done).

The rest of the worker sees only this object's methods, so that which Faust calls it
takes to read or write state, or to make an offset safe to commit, is written once.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import faust
import orjson
from aiokafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError
from faust.tables.recovery import Recovery

from aggregator.config import Settings
from aggregator.core.contract import STATE_TABLE
from aggregator.core.statechunks import decode_state
from aggregator.worker.consumer import BatchConsumer, BatchHandler, BatchTransport, positions, read_from, read_to
from aggregator.worker.stamps import end_seen, member_clock, not_left, not_member

log = logging.getLogger("aggregator.worker")
FaustWorker = faust.Worker  # what runs the worker role's services (roles.py)

# how soon the consumer group sees a topic that was deleted and created again (aiokafka's
# default is 5 minutes, during which a recreated `clicks` is not consumed at all; issue 15)
METADATA_MAX_AGE_MS = 10_000
FETCH_MAX_BYTES = 4 * 1024 * 1024  # per partition (Faust's default is 1 MiB): fewer, larger batches


async def _seek_offsets(self: Recovery, consumer: Any, tps: Any, offsets: Any, title: str) -> None:
    """Faust's ``Recovery._seek_offsets`` with every offset below 0 read from the start.
    Faust maps only -1 to 0; its earliest offsets are "earliest - 1", so an earliest the
    broker reports as unknown (-1, seen on Kafka just after a worker was killed) became -2,
    and aiokafka's seek raised ValueError, which crashed the worker's recovery.  Reading a
    changelog from its start is always safe: recovery keeps the latest value of each key."""
    await consumer.seek_wait({tp: max(0, offsets[tp]) for tp in tps})


Recovery._seek_offsets = _seek_offsets  # type: ignore[method-assign]
_faust_build_offsets = Recovery._build_offsets


async def _build_offsets(self: Recovery, consumer: Any, tps: Any, destination: Any, title: str) -> None:
    """Faust's ``Recovery._build_offsets``, then an offset at or past the end of its
    changelog partition is read from the start again: the changelog started over (the
    broker came back without its data) while this worker kept, in memory, how far it had
    read the old one.  Faust would stop the whole process with ConsistencyError ("persisted
    offset ... higher than the last offset"): seen with two workers, on the one that kept
    running, for a partition it had read as a standby.  Its state is then the old log's,
    which the worker's own check of ``clicks`` (core.sourcelog) treats as for one worker."""
    await _faust_build_offsets(self, consumer, tps, destination, title)
    if not tps:
        return
    ends = await consumer.highwaters(*tps)
    for tp in tps:
        end, read = ends.get(tp), destination.get(tp, -1)
        if end is not None and read >= 0 and read >= end:
            log.warning("changelog %s partition %d (%s): read to offset %d, but it ends at %d: it started over "
                        "(the broker came back without its data); reading it from its start", tp.topic,
                        tp.partition, title, read, end)
            destination[tp] = -1


Recovery._build_offsets = _build_offsets  # type: ignore[method-assign]


class _App(faust.App):
    def _new_transport(self) -> BatchTransport:
        return BatchTransport(self.conf.broker_consumer, self)


class FaustApp:
    def __init__(self, s: Settings) -> None:
        self.session_s = s.session_timeout
        # the topics and the group (the app id, which Faust's changelog and leader topic are named
        # after), AGG_TOPIC_PREFIX before each
        self.topics = t = s.topics
        self._refused_said: str | None = None
        # TLS/SASL for Faust's consumer, producer and topic creation; the changelog (and
        # Faust's leader topic) get the replication factor of the topics the service creates
        self.app = _App(
            t.app_id, env={}, broker=s.faust_broker(), datadir=str(s.data_dir) + "/faust", **s.kafka_security().faust_settings(),
            topic_partitions=s.partitions, topic_replication_factor=s.topic_replication_factor,
            topic_allow_declare=False,  # `run` creates every topic (broker.admin): Faust asked to even where
            # they existed, which a principal without CREATE is refused (a managed Kafka's ACLs)
            table_cleanup_interval=3600,
            web_enabled=False, broker_session_timeout=s.session_timeout,
            broker_heartbeat_interval=max(0.5, s.session_timeout / 4), broker_commit_interval=s.state_flush_seconds,
            consumer_auto_offset_reset="earliest", consumer_max_fetch_size=FETCH_MAX_BYTES,
            consumer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
            stream_wait_empty=False, producer_acks=-1, logging_config=None, key_serializer="raw",
            value_serializer="raw")
        self.clicks = self.app.topic(t.clicks, key_type=bytes, value_type=bytes, partitions=s.partitions,
                                     internal=False)
        # records forwarded to their region's home partition (core.repartition).  Same partition
        # count, same consumer group: Faust's assignor puts the two topics in one co-partitioned
        # group (assignor.partition_assignor._get_copartitioned_groups), so partition p of both
        # is assigned to the same worker
        self.forwarded = self.app.topic(t.clicks_repartition, key_type=bytes, value_type=bytes,
                                        partitions=s.partitions, internal=False)
        insync = {"min.insync.replicas": str(s.topic_min_insync_replicas)} if s.topic_min_insync_replicas > 0 else {}
        self.table = self.app.Table(STATE_TABLE, partitions=s.partitions, extra_topic_configs=insync)

    def wire(self, on_batch: BatchHandler, hold: Callable[[], bool],
             ticks: Callable[[], Coroutine[Any, Any, None]],
             on_revoked: Callable[..., Coroutine[Any, Any, None]],
             on_assigned: Callable[..., Coroutine[Any, Any, None]]) -> None:
        """Batches of ``clicks`` and ``clicks-repartition`` go to ``on_batch`` (nothing is
        fetched while ``hold()``);
        ``ticks`` runs as the app's task; ``on_revoked(app, revoked)`` before a rebalance
        takes partitions away, ``on_assigned(app, assigned)`` once it gave this worker its
        partitions (every topic's, the whole assignment)."""
        BatchConsumer.batch_topics = frozenset({self.topics.clicks, self.topics.clicks_repartition})
        BatchConsumer.batch_handler = on_batch
        BatchConsumer.hold = hold

        @self.app.agent(self.clicks)
        async def _clicks(stream: Any) -> None:  # subscribes the topic; batches bypass it
            async for _ in stream:  # pragma: no cover
                pass

        @self.app.agent(self.forwarded)
        async def _forwarded(stream: Any) -> None:  # the same for clicks-repartition
            async for _ in stream:  # pragma: no cover
                pass

        self.app.task(ticks)
        self.app.on_partitions_revoked.connect(on_revoked)
        self.app.on_partitions_assigned.connect(on_assigned)

    # ---------------------------------------------------------------- questions
    def recovered(self) -> bool:
        """The table's recovery from its changelog has completed."""
        try:
            # TableManager has it; the TableManagerT it is declared as does not
            return bool(self.app.tables.recovery.completed.is_set())  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - no recovery yet
            return False

    def recovery_state(self) -> str:
        """Faust's side of a rebalance, for a log line when one lasts (never raises)."""
        app: Any = self.app
        try:
            rec = app.tables.recovery
            consumer = app.consumer
            paused = sorted(tp.partition for tp in consumer._paused_partitions if tp.topic == self.topics.clicks)
            return (f"generation {app.consumer_generation_id} (recovery's {rec._generation_id}), "
                    f"recovery started {rec.signal_recovery_start.is_set()}, in recovery {rec.in_recovery}, "
                    f"changelog records to recover {rec.active_remaining_total()}, "
                    f"assigned clicks partitions {sorted(self.assigned())}, paused {paused}, "
                    f"flow active {consumer.flow_active}; changelog partitions to recover: "
                    f"{_changelog_state(rec, consumer)}")
        except Exception as exc:  # noqa: BLE001 - a diagnostic: whatever Faust has then
            return f"(Faust's recovery state unavailable: {exc!r})"

    def recovery_progress(self) -> object:
        """A marker that changes while a rebalance makes progress: the group generation and
        the changelog records left to recover (None when Faust has none to show; never raises)."""
        app: Any = self.app
        try:
            return (app.consumer_generation_id, app.tables.recovery.active_remaining_total())
        except Exception:  # noqa: BLE001 - a diagnostic: whatever Faust has then
            return None

    def assigned(self) -> set[int]:
        """Partitions of ``clicks`` assigned to this worker (raises before the consumer exists)."""
        return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topics.clicks}

    def highwater(self, partition: int, topic: str | None = None) -> int | None:
        """The partition's end offset as of the last fetch answered for it (None: not known
        yet; ``topic`` None: ``clicks``); the end of :meth:`end_seen`, so the clock and the
        source-log checks read one."""
        seen = self.end_seen(partition, topic)
        return None if seen is None else seen[0]

    async def seek(self, partition: int, offset: int) -> None:
        """Fetch the partition of ``clicks`` again from ``offset`` (nothing if it is no longer
        assigned: its next owner checks its log itself)."""
        consumer = self.app.consumer
        if isinstance(consumer, BatchConsumer):
            await consumer.seek_quietly(faust.types.TP(self.topics.clicks, partition), offset)

    def _aiokafka(self) -> Any:
        """The aiokafka consumer under Faust's (its subscription and group state are read from
        this thread), or None before it exists."""
        try:
            return self.app.consumer._thread._ensure_consumer()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - no consumer yet
            return None

    def refused(self) -> str | None:
        """Why the broker refuses this worker's group or its topics (an authorization error
        aiokafka holds for a caller that, before an assignment, never comes: the worker would
        wait without a word); said in one error line the first time.  None: no such error."""
        coordinator = getattr(self._aiokafka(), "_coordinator", None)
        exc = getattr(coordinator, "_pending_exception", None)
        if not isinstance(exc, (GroupAuthorizationFailedError, TopicAuthorizationFailedError)):
            return None
        what = f"group {self.topics.app_id}" if isinstance(exc, GroupAuthorizationFailedError) else "its topics"
        reason = (f"the broker refuses this worker's consumer {what} ({type(exc).__name__}): grant this principal "
                  "the ACLs of the README's table (Read on the group, Read and Write on the topics), then restart it")
        if reason != self._refused_said:
            log.error("%s", reason)
            self._refused_said = reason
        return reason

    def not_member(self) -> tuple[int, str] | None:
        """Why the group may have given this worker's partitions to another (``stamps.not_member``;
        None: it cannot have), for the checkpoint's fence."""
        consumer = self._aiokafka()
        return None if consumer is None else not_member(consumer, self.session_s, member_clock())

    def not_left(self) -> str | None:
        """Once the consumer has closed: why it did not leave its group ("": it left; None:
        it was no member then, or it has not closed; ``stamps.not_left``)."""
        return not_left(self._aiokafka())

    def end_seen(self, partition: int, topic: str | None = None) -> tuple[int | None, int] | None:
        """The partition's end offset as of the last fetch answered for it (None: the broker
        gave none) and when that fetch was sent, wall ms (``stamps.end_seen``); None: no
        fetch answered since it was assigned; ``topic`` None: ``clicks``."""
        consumer = self._aiokafka()
        tp = faust.types.TP(topic or self.topics.clicks, partition)
        return None if consumer is None else end_seen(consumer, tp)

    def position(self, partition: int) -> int | None:
        """The consumer's fetch position in the partition of ``clicks`` (None: not known, e.g.
        while it is looked up after an assignment).  Read from aiokafka's subscription state:
        its ``position()`` is a coroutine that waits for that lookup."""
        consumer = self._aiokafka()
        if consumer is None:
            return None
        tp = faust.types.TP(self.topics.clicks, partition)
        return positions(consumer, [tp])[tp]

    def read_to(self, partition: int, next_offset: int) -> int:
        """Where the partition of ``clicks`` stands as read, its records applied up to
        ``next_offset`` (the book's): the consumer's position once every record it handed
        over is applied, which is past the transaction markers (and aborted batches) after
        them; else ``next_offset`` (``consumer.read_to``).  What "caught up" compares with
        the end offset: a marker takes an offset no record is applied at."""
        consumer = self._aiokafka()
        if consumer is None:
            return next_offset
        return read_to(consumer, faust.types.TP(self.topics.clicks, partition), next_offset)

    def read_from(self, partition: int) -> tuple[int, int | None] | None:
        """Of the last batch of the partition of ``clicks`` handed over: from where the
        consumer read every offset up to its first record, handing no record over, and the
        worker's seek that read began with (None: an offset reset, Faust's seek); None: not
        known (``consumer.read_from``).  Whether offsets before the batch were read."""
        consumer = self._aiokafka()
        return None if consumer is None else read_from(consumer, faust.types.TP(self.topics.clicks, partition))

    # -------------------------------------------------------------------- state
    def stored_state(self, partition: int) -> tuple[dict[str, Any], int | None] | None:
        """The partition's state in the table (recovered from the changelog, or confirmed
        here) and its slot, or None (core.statechunks)."""
        # Faust's recovery hands keys and values back JSON-decoded (b"3" -> 3); what this
        # process confirmed is kept the same way, its values as bytes
        data = self.table.data
        head = data.get(partition) or data.get(str(partition).encode()) or data.get(str(partition))
        return decode_state(partition, head, data.get)

    def stored_record(self, key: str) -> Any:
        """The JSON value of a record of the state kept under ``key`` (None: none)."""
        value = self.table.data.get(key)
        return orjson.loads(value) if isinstance(value, bytes | bytearray | memoryview) else value

    def state_confirmed(self, partition: int, records: list[tuple[bytes, bytes | None]]) -> None:
        """Records of the partition's state the broker acknowledged on its changelog: kept in
        the table too, as recovery would have them, for when the partition comes back here
        (a value of None was a delete)."""
        data = self.table.data
        for key, value in records:
            if value is None:
                data.pop(orjson.loads(key), None)
            else:
                data[orjson.loads(key)] = value

    def mark_safe(self, partition: int, offset: int) -> None:
        """Every record of the partition before ``offset`` is durably accounted for: the
        next commit may go up to it."""
        consumer = self.app.consumer
        if isinstance(consumer, BatchConsumer):
            consumer.mark_safe(faust.types.TP(self.topics.clicks, partition), offset)

    def log_restarted(self, partition: int) -> None:
        """The partition of ``clicks`` started over (core.sourcelog): its new offsets are below
        those committed on the old log, and Faust commits only offsets above the last one."""
        consumer = self.app.consumer
        if isinstance(consumer, BatchConsumer):
            consumer.log_restarted(faust.types.TP(self.topics.clicks, partition))

    def mark_safe_forwarded(self, partition: int, offset: int) -> None:
        """The same for the partition of ``clicks-repartition``."""
        consumer = self.app.consumer
        if isinstance(consumer, BatchConsumer):
            consumer.mark_safe(faust.types.TP(self.topics.clicks_repartition, partition), offset)


def _changelog_state(rec: Any, consumer: Any) -> str:
    """Per changelog partition Faust's recovery reads: whether Faust fetches it, aiokafka's
    position in it (and whether aiokafka has it paused) and the offset recovery waits
    for, to tell a stalled recovery's cause from its log line (never raises)."""
    try:
        try:
            assignment = consumer._thread._ensure_consumer()._subscription.subscription.assignment
        except Exception:  # noqa: BLE001 - no consumer or no assignment yet
            assignment = None
        fetching = consumer._active_partitions or set()
        out = []
        for tp in sorted(rec.active_tps):
            where = "?"
            if assignment is not None:
                st = assignment.state_value(tp)
                if st is None:
                    where = "not assigned"
                else:
                    where = (f"at {st.position}" if st.has_valid_position else "no position") + (
                        ", paused" if st.paused else "")
            out.append(f"{tp.partition} ({'fetching' if tp in fetching else 'not fetching'}, {where}, "
                       f"recovers to {rec.active_highwaters.get(tp)})")
        return "; ".join(out) or "none"
    except Exception as exc:  # noqa: BLE001 - a diagnostic: the rest of the line still counts
        return f"(unavailable: {exc!r})"
