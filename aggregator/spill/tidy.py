"""Spill that is of no use any more (docs/contract.md §6): regions drained and quiet, and
the spills of partitions this worker no longer owns.

* ``forget_idle(spill)``: at a sweep (every ``SWEEP_S``), the regions of an owned partition
  drained and with nothing spilled since the last sweep go from the ledger (which keeps
  their sequence numbers used, ``SpillLedger.next_seq``) and from the disk, so every region
  that spilled once does not stay in each state written and in a directory for ever.
* ``LeftSpills`` (``left_spills(root)``, ``delete_spill(root, partition)``): the spill a
  revoked partition leaves on disk (or a previous run of the process left) is counted in the
  spill's size until it is deleted; it is deleted once an assignment this worker received
  after the partition left (after the revoke; for a spill found at start, after the start)
  does not give the partition here.  Never before this worker's first assignment: until
  then what the consumer calls its assignment is empty, not "elsewhere".  That is safe: a
  spill that is missing is re-read from ``clicks`` by whoever opens the partition with a
  state naming this directory (``PartitionSpill.reconcile``: the consumer never commits past
  a backlog), and a state the next owner writes names its own directory, after which this
  one's records are never taken anyway.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Container

from aggregator.spill.layout import GONE, move_to_gone
from aggregator.spill.partition import PartitionSpill

log = logging.getLogger("aggregator.spill")

SWEEP_S = 60.0  # a region drained and quiet from one sweep to the next is forgotten
_PARTITION_DIR = re.compile(r"p(\d+)\Z")


def forget_idle(spill: PartitionSpill) -> list[str]:
    """One sweep of ``spill``: forget the regions ``SpillLedger.sweep`` finds quiet whose
    records are all acknowledged on disk, and delete their directories (and those of regions
    the disk holds with nothing undrained and the ledger does not know).  Returns the
    regions forgotten."""
    ledger, store = spill.ledger, spill.store
    busy = {r for r, _ in spill.pending_acks} | set(spill.uncommitted) | set(spill.rebuilding)
    gone = []
    for region in ledger.sweep():
        if region not in busy and not store.backlog(region):
            ledger.forget(region)
            gone.append(region)
    failed: list[str] = []
    for region in store.regions():
        if region not in ledger.regions and region not in busy and not store.backlog(region):
            try:
                store.drop_region(region)
            except OSError as e:  # the next sweep tries again (a restart acknowledges what is left)
                failed.append(f"{region!r}: {e}")
    if failed:
        log.warning("spill p%d: could not delete the directories of %d drained regions (%s); tried again "
                    "at the next sweep", spill.partition, len(failed), "; ".join(failed[:3]))
    return gone


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of the files under ``path`` (0: none, or no such directory)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    return total


def spill_bytes_on_disk(root: str | os.PathLike[str], partition: int) -> int:
    return dir_bytes(os.path.join(root, f"p{partition}", "regions"))


def left_spills(root: str | os.PathLike[str]) -> dict[int, int]:
    """partition -> bytes of the spill under ``root``, for every partition's directory
    there (at start: the spills a previous run left); what a crash left of a deletion
    (``gone/``) is deleted."""
    try:
        entries = os.listdir(root)
    except OSError:  # none yet (or unreadable: opening a partition's spill says so)
        return {}
    out = {}
    for entry in entries:
        m = _PARTITION_DIR.match(entry)
        if m and os.path.isdir(os.path.join(root, entry)):
            shutil.rmtree(os.path.join(root, entry, GONE), ignore_errors=True)
            out[int(m.group(1))] = spill_bytes_on_disk(root, int(m.group(1)))
    return out


def delete_spill(root: str | os.PathLike[str], partition: int) -> None:
    """Delete the spill records a partition left under ``root`` (its directory's id and
    quarantine stay): moved out of the way in one rename first, so a crash half-way leaves
    no half spill.  Raises ``OSError`` when the disk refuses the rename."""
    d = os.path.join(root, f"p{partition}")
    regions = os.path.join(d, "regions")
    if not os.path.isdir(regions):
        return
    moved = move_to_gone(regions, d)
    shutil.rmtree(moved, ignore_errors=True)  # what stays is deleted at the next start


class LeftSpills:
    """The spills on disk here of partitions this worker does not own (revoked, or left by an
    earlier run): their bytes, counted against AGG_SPILL_MAX_BYTES, and when each may go."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = root
        self.bytes: dict[int, int] = left_spills(root)  # partition -> bytes of its spill on disk
        # the partitions of clicks of the last assignment this worker received (the group's,
        # on_partitions_assigned); None: none yet.  A partition leaves (revoke) while the last
        # one still gives it here: one that does not was received after it left
        self.assigned: frozenset[int] | None = None
        self.stuck: set[int] = set()  # those the disk would not let delete (said once)

    def received(self, partitions: set[int]) -> None:
        """An assignment of the group reached this worker: ``partitions`` of clicks are its.
        One without any is not taken for the group's word on clicks: the group's leader
        leaves out a topic missing from its metadata (clicks deleted and created again, for
        a moment after a restart), so such an assignment says nothing of where partitions
        went (a worker of a group with more workers than partitions keeps its left spills,
        counted, until it is given one)."""
        if partitions:
            self.assigned = frozenset(partitions)

    def left(self, partition: int) -> None:
        """The partition's spill stays on disk, not owned here any more: counted until it goes."""
        self.bytes[partition] = spill_bytes_on_disk(self.root, partition)

    def total(self, owned: Container[int]) -> int:
        return sum(n for partition, n in self.bytes.items() if partition not in owned)

    def elsewhere(self, keep: Container[int]) -> list[int]:
        """The partitions whose spill may go: the last assignment received (so one received
        since they left) does not give them here, nor does ``keep`` (owned, or the consumer's
        assignment now) hold them."""
        last = self.assigned
        if last is None:  # no assignment yet: the consumer's, empty, is not the group's word
            return []
        return [n for n in self.bytes if n not in last and n not in keep]

    def delete(self, keep: Container[int]) -> None:
        """Delete the spills of ``elsewhere(keep)``; one the disk refuses stays counted, said
        once, and is tried again at the next call."""
        for partition in self.elsewhere(keep):
            try:
                delete_spill(self.root, partition)
            except OSError as e:
                if partition not in self.stuck:
                    log.error("spill p%d: cannot delete the spill this worker left on disk (the partition is "
                              "assigned elsewhere): %s; it counts against AGG_SPILL_MAX_BYTES", partition, e)
                    self.stuck.add(partition)
                self.bytes[partition] = spill_bytes_on_disk(self.root, partition)
                continue
            self.stuck.discard(partition)
            if self.bytes.pop(partition):
                log.info("spill p%d: deleted the spill left here (an assignment received since gives the "
                         "partition to another worker)", partition)
