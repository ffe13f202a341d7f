"""The Kafka names of one deployment: contract.py's topic names and group id, each behind
``AGG_TOPIC_PREFIX`` (docs/contract.md §4).  Standard library only.

``Topics()`` (no prefix) holds contract.py's names exactly; ``Topics("team-a.")`` holds
``team-a.clicks``, ..., the consumer group (Faust's app id) ``team-a.clickstream-aggregator``
and with it the names Faust derives from the app id: the window state's changelog and the
leader assignor's topic.  Every part that names a topic or the group takes it from here,
so that two deployments on one cluster share nothing, and a cluster that grants topics and
groups only under a prefix can host the service."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from aggregator.core.contract import (
    APP_ID,
    CLICKS,
    CLICKS_REPARTITION,
    DLQ,
    LEADER_TOPIC,
    SNAPSHOTS,
    STATE_CHANGELOG,
    STATE_TABLE,
)

# Kafka's rule for a topic name: these characters, at most 249 of them
LEGAL = re.compile(r"[a-zA-Z0-9._-]*")
MAX_NAME_CHARS = 249
UNPREFIXED = (CLICKS, DLQ, SNAPSHOTS, CLICKS_REPARTITION, STATE_CHANGELOG, LEADER_TOPIC)
MAX_PREFIX_CHARS = MAX_NAME_CHARS - max(map(len, UNPREFIXED))


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot prefix the service's names (None: it can)."""
    if not LEGAL.fullmatch(prefix):
        bad = sorted({c for c in prefix if not LEGAL.fullmatch(c)})
        return (f"Kafka names take only the characters a-z, A-Z, 0-9, '.', '_' and '-' (got {prefix!r}, with "
                f"{', '.join(map(repr, bad))})")
    if len(prefix) > MAX_PREFIX_CHARS:
        longest = max(UNPREFIXED, key=len)
        return (f"at most {MAX_PREFIX_CHARS} characters: the longest name it prefixes, {longest}, would be "
                f"{len(prefix) + len(longest)} characters, over Kafka's {MAX_NAME_CHARS} (got {len(prefix)})")
    return None


@dataclass(frozen=True)
class Topics:
    """The topic names and the consumer group of a deployment whose names begin with ``prefix``."""

    prefix: str = ""
    clicks: str = field(init=False)
    dlq: str = field(init=False)
    snapshots: str = field(init=False)
    clicks_repartition: str = field(init=False)
    app_id: str = field(init=False)  # the consumer group
    state_changelog: str = field(init=False)  # Faust's name for the table's changelog: <app id>-<table>-changelog
    leader_topic: str = field(init=False)  # Faust's leader assignor's: <app id>-__assignor-__leader

    def __post_init__(self) -> None:
        problem = prefix_problem(self.prefix)
        if problem is not None:
            raise ValueError(problem)
        p = self.prefix
        for name, value in (("clicks", CLICKS), ("dlq", DLQ), ("snapshots", SNAPSHOTS),
                            ("clicks_repartition", CLICKS_REPARTITION), ("app_id", APP_ID)):
            object.__setattr__(self, name, p + value)
        # as Faust derives them from the app id (faust.tables.base, faust.assignor.leader_assignor)
        object.__setattr__(self, "state_changelog", f"{self.app_id}-{STATE_TABLE}-changelog")
        object.__setattr__(self, "leader_topic", f"{self.app_id}-__assignor-__leader")

    def topics(self, worker: bool = True) -> tuple[str, ...]:
        """Every topic a role uses: ``clicks``, ``clicks-repartition``, ``clicks-dlq``,
        ``click-snapshots``; ``worker``: the changelog and the leader topic too."""
        base = (self.clicks, self.clicks_repartition, self.dlq, self.snapshots)
        return (*base, self.state_changelog, self.leader_topic) if worker else base


DEFAULT = Topics()  # contract.py's names, unprefixed
