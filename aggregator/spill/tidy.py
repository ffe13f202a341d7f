"""Spill that is of no use any more (docs/contract.md §6): regions drained and quiet, and
the spills of partitions this worker no longer owns.

* ``forget_idle(spill)``: at a sweep (every ``SWEEP_S``), the regions of an owned partition
  drained and with nothing spilled since the last sweep go from the ledger (which keeps
  their sequence numbers used, ``SpillLedger.next_seq``) and from the disk, so every region
  that spilled once does not stay in each state written and in a directory for ever.
* ``left_spills(root)``, ``delete_spill(root, partition)``: the spill a revoked partition
  leaves on disk (or a previous run of the process left) is counted in the spill's size
  until it is deleted; it is deleted once the partition is assigned to another worker.
  That is safe: a spill that is missing is re-read from ``clicks`` by whoever opens the
  partition with a state naming this directory (``PartitionSpill.reconcile``: the consumer
  never commits past a backlog), and a state the next owner writes names its own directory,
  after which this one's records are never taken anyway.
"""
from __future__ import annotations

import logging
import os
import re
import shutil

from aggregator.spill.layout import GONE
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
    trash = os.path.join(d, GONE)
    os.makedirs(trash, exist_ok=True)
    moved = os.path.join(trash, f"regions.{os.urandom(4).hex()}")
    os.rename(regions, moved)
    shutil.rmtree(moved, ignore_errors=True)  # what stays is deleted at the next start
