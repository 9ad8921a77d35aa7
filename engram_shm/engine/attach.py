"""Readers attached to a running engine from another local process.

`attach(name)` maps the engine's catalog and segments through read-only views
and recalls with the same kernels and the same Reader as the engine itself,
with no IPC: at the same generation it returns what the engine returns. The
one word it writes is the recall beacon, which asks the engine's index
writers to step aside while it recalls (beacon.py).
"""

from __future__ import annotations

from ..errors import EngineClosed
from ..store.catalog import Catalog
from .directory import SegmentDirectory
from .reader import InFlight, Reader, Recalls


class AttachedEngine(Recalls):
    def __init__(self, name: str, ef_search: int = 64):
        self.name = name
        self.ef_search = ef_search
        self.catalog = Catalog.attach(name)
        self.directory = SegmentDirectory(self.catalog)
        self.reader = Reader(self.directory)
        self.in_flight = InFlight()
        self.owner = self.catalog.owner_watch()  # asked at every recall

    def _check_open(self) -> None:
        if self.catalog is None:
            raise EngineClosed(f"reader of engine {self.name!r} is closed")
        if self.catalog.stopped or not self.owner.alive():
            raise EngineClosed(f"engine {self.name!r} has stopped")

    def spaces(self) -> list[str]:
        return [self.catalog.space(i).name for i in range(self.catalog.n_spaces)]

    def close(self) -> None:
        """Unmap everything; the engine's memory stays."""
        if self.catalog is None:
            return
        self.in_flight.close()  # recalls in other threads leave before anything is unmapped
        self.owner.close()
        self.reader.close()
        self.directory.close()
        self.catalog.close()
        self.catalog = None

    def __enter__(self) -> "AttachedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(name: str, ef_search: int = 64) -> AttachedEngine:
    """Map a running engine's shared memory read-only, for recall without IPC."""
    return AttachedEngine(name, ef_search)
