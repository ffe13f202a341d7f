"""Spill that is of no use any more (docs/contract.md §6): regions drained and quiet.

* ``forget_idle(spill)``: at a sweep (every ``SWEEP_S``), the regions of an owned partition
  drained and with nothing spilled since the last sweep go from the ledger (which keeps
  their sequence numbers used, ``SpillLedger.next_seq``) and from the disk, so every region
  that spilled once does not stay in each state written and in a directory for ever.
"""
from __future__ import annotations

import logging

from aggregator.spill.partition import PartitionSpill

log = logging.getLogger("aggregator.spill")

SWEEP_S = 60.0  # a region drained and quiet from one sweep to the next is forgotten


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
