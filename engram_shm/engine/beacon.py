"""The recall beacon: recalls tell the index writers to step aside.

Index writers run under SCHED_IDLE in idle autogroups (idle.py), yet on a
machine whose cores they fill, a recall's threads still wait for a core at
each hop: the scheduler compares groups before tasks, and a worker's group
keeps the core for the rest of its slice. So each recall stamps a deadline,
on CLOCK_MONOTONIC, into one word of the catalog (RECALL_UNTIL), and an
index writer looks at it after every node it inserts and sleeps while the
deadline lies ahead (kernels/cpu.py `defer_to_recalls`), never longer in
all than it has worked: recalls slow indexing to half its speed at most.

A recall stamps now + BUDGET_NS as it starts (a deadline, not a count: a
process killed mid-recall leaves nothing to undo), and as its search ends
moves the deadline to now + LINGER_NS, which covers the decoding and the
reply, unless another recall has stamped since (the recall kernel stamps
both within its one call: kernels/recall.py). The stamps are plain
stores and one compare-and-swap: a race can only shorten or lengthen one
pause. Every process that recalls stamps, attached readers included: the
beacon is the one word of the engine's memory they write.
"""

from __future__ import annotations

import numpy as np

from ..kernels.cpu import announce_recall_now, recall_searched_now
from ..store.catalog import RECALL_UNTIL, Catalog

BUDGET_NS = 5_000_000  # the latency a recall under ingestion should stay within
LINGER_NS = 1_000_000  # from the end of the search to the answer at the client


def beacon_of(catalog: Catalog) -> np.ndarray:
    """The beacon word, as the one-element view the insert kernel reads."""
    return catalog.header[RECALL_UNTIL:RECALL_UNTIL + 1]


class RecallBeacon:
    def __init__(self, catalog: Catalog):
        self.word = beacon_of(catalog)

    def begin(self) -> int:
        """Stamp a recall's start; returns the stamp for `end`. (The recall
        kernel stamps and ends its own search: kernels/recall.py.)"""
        return int(announce_recall_now(self.word, BUDGET_NS))

    def end(self, stamp: int) -> None:
        """The recall's search is done: leave the writers LINGER_NS more,
        unless a later recall stamped in the meantime."""
        recall_searched_now(self.word, stamp, LINGER_NS)

    def close(self) -> None:
        self.word = None  # a view of the catalog, released before it is unmapped
