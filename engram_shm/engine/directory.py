"""The segments of an engine's catalog, mapped into this process as they appear.

The engine hands out the segments it created; other processes (index workers,
attached readers) attach them by name. Readers look segments up by space;
index writers take them as targets with their space's parameters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..store.catalog import Catalog, SpaceParams, segment_name
from ..store.segment import Segment


@dataclass(frozen=True)
class Target:
    """A segment an index writer may work on, with its space's parameters."""
    index: int  # catalog segment index
    segment: Segment
    params: SpaceParams


class SegmentDirectory:
    """`open_segment(index)` hands out a segment the caller owns; without it,
    the directory attaches segments by name itself (writable or read-only)
    and closes them in `close()`."""

    def __init__(self, catalog: Catalog, open_segment: Callable[[int], Segment] | None = None,
                 writable: bool = False):
        self.catalog = catalog
        self._attached: list[Segment] = []
        self.open_segment = open_segment or (lambda index: self._attach(index, writable))
        self._by_space: dict[int, list[Segment]] = {}
        self._targets: list[Target] = []
        self._params: dict[int, SpaceParams] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Map the segments published since the last call."""
        n = self.catalog.n_segments
        if n <= len(self._targets):
            return
        with self._lock:
            for index in range(len(self._targets), n):
                space = self.catalog.segment_space(index)
                params = self._params.get(space)
                if params is None:
                    params = self._params[space] = self.catalog.space(space)
                seg = self.open_segment(index)
                self._by_space.setdefault(space, []).append(seg)
                self._targets.append(Target(index, seg, params))

    def of_space(self, space: int) -> list[Segment]:
        self.refresh()
        return list(self._by_space.get(space, ()))

    def targets(self) -> list[Target]:
        self.refresh()
        return list(self._targets)

    def segments(self) -> list[Segment]:
        return [t.segment for t in self.targets()]

    def _attach(self, index: int, writable: bool) -> Segment:
        seg = Segment.attach(segment_name(self.catalog.engine, index), writable=writable)
        self._attached.append(seg)
        return seg

    def close(self) -> None:
        """Forget the mappings and unmap the segments this directory attached."""
        with self._lock:
            self._by_space.clear()
            self._targets.clear()
            for seg in self._attached:
                seg.close()
            self._attached.clear()
