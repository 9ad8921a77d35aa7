"""The segments of an engine's catalog, mapped into this process as they appear
and forgotten as compactions retire them.

The engine hands out the segments it created; other processes (index workers,
attached readers, the checkpointer) attach them by name. Readers look up a
space's LIVE segments; index writers take LIVE and BUILDING ones as targets
with their space's parameters. Each refresh takes the catalog's layout (the
segment states, read under its sequence lock), so a reader never sees a merged
segment together with its sources. A retired segment is only forgotten, never
unmapped here: a recall in flight may still search it, and its mapping goes
when the last view of it does (Segment.__del__).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import Corrupt
from ..store.catalog import BUILDING, LAYOUT_SEQ, LIVE, Catalog, SpaceParams, segment_name
from ..store.segment import Segment
from . import release


@dataclass(frozen=True)
class Target:
    """A segment an index writer may work on, with its space's parameters."""
    index: int  # catalog segment index
    segment: Segment
    params: SpaceParams
    building: bool = False  # a compaction's merged segment, not yet searched


class _Layout(NamedTuple):
    token: tuple[int, int] | None  # (LAYOUT_SEQ, N_SEGMENTS) it was taken at
    by_space: dict[int, list[Segment]]  # LIVE segments of each space, catalog order
    live: list[Segment]  # every LIVE segment, catalog order
    targets: list[Target]  # LIVE and BUILDING


_EMPTY = _Layout(None, {}, [], [])


class SegmentDirectory:
    """`open_segment(index)` hands out a segment the caller owns (None once
    the caller has let it go); without it, the directory attaches segments by
    name itself (writable or read-only) and closes them in `close()`."""

    def __init__(self, catalog: Catalog, open_segment: Callable[[int], Segment | None] | None = None,
                 writable: bool = False):
        self.catalog = catalog
        self._attached: dict[int, Segment] = {}
        self.open_segment = open_segment or (lambda index: self._attach(index, writable))
        self._mapped: dict[int, Segment] = {}
        self._params: dict[int, SpaceParams] = {}
        self._layout = _EMPTY  # replaced whole, so threads always read one layout
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Take the catalog's layout if it changed since the last call: map
        segments published since, forget those retired."""
        if self._layout.token == (int(self.catalog.header[LAYOUT_SEQ]), self.catalog.n_segments):
            return
        with self._lock:
            while not self._take_layout():
                pass

    def _take_layout(self) -> bool:
        """False if a segment of the layout read was retired and unlinked
        before it could be mapped (the layout is read again). Only segments
        were added while the sequence stayed the same: the layout held is
        extended with them (an engine may hold thousands)."""
        seq, states = self.catalog.layout()
        held = self._layout
        start = held.token[1] if held.token is not None and held.token[0] == seq else 0
        by_space = dict(held.by_space) if start else {}
        live, targets = (list(held.live), list(held.targets)) if start else ([], [])
        for index, state in enumerate(states[start:].tolist(), start):
            if state not in (LIVE, BUILDING):
                self._forget(index)
                continue
            seg = self._mapped.get(index)
            if seg is None:
                try:
                    seg = self.open_segment(index)
                except FileNotFoundError:
                    if self.catalog.segment_state(index) in (LIVE, BUILDING):  # a writer retires
                        # before it unlinks, so this one was removed by someone else
                        raise Corrupt(f"segment {segment_name(self.catalog.engine, index)} of engine "
                                      f"{self.catalog.engine!r} is gone from /dev/shm") from None
                    return False
                if seg is None:
                    return False
                self._mapped[index] = seg
            space = self.catalog.segment_space(index)
            params = self._params.get(space)
            if params is None:
                params = self._params[space] = self.catalog.space(space)
            if state == LIVE:
                by_space[space] = [*by_space.get(space, ()), seg]  # the held layout's lists stay as they are
                live.append(seg)
            targets.append(Target(index, seg, params, building=state == BUILDING))
        self._layout = _Layout((seq, len(states)), by_space, live, targets)
        return True

    def _forget(self, index: int) -> None:
        self._mapped.pop(index, None)
        seg = self._attached.pop(index, None)
        if seg is not None:
            release.later(seg)  # unmapped off this thread, once no recall holds it

    def of_space(self, space: int) -> list[Segment]:
        """The space's LIVE segments, in catalog order, from one layout."""
        return list(self.layout().by_space.get(space, ()))

    def layout(self) -> _Layout:
        """The current layout, refreshed (its lists are never changed in
        place; its token changes with it)."""
        self.refresh()
        return self._layout

    def live(self) -> list[Segment]:
        """Every LIVE segment, in catalog order, from one layout."""
        self.refresh()
        return list(self._layout.live)

    def targets(self) -> list[Target]:
        self.refresh()
        return list(self._layout.targets)

    def segments(self) -> list[Segment]:
        """Every segment index writers may work on (LIVE and BUILDING)."""
        return [t.segment for t in self.targets()]

    def _attach(self, index: int, writable: bool) -> Segment:
        seg = Segment.attach(segment_name(self.catalog.engine, index), writable=writable)
        self._attached[index] = seg
        return seg

    def close(self) -> None:
        """Forget the mappings and unmap the segments this directory attached."""
        with self._lock:
            self._layout = _EMPTY
            self._mapped.clear()
            for seg in self._attached.values():
                seg.close()
            self._attached.clear()
