"""A node's side of the cluster (docs/cluster.md), held by the front: its
membership under an etcd lease, the cached space table, and the spaces it is
moving out. `route` decides, before a write or a recall, whether this node
may answer for a space, and raises the coded refusal if not."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass

from ..config import NAME_PATTERN, EngineConfig
from ..errors import Moved, Moving, Unavailable
from .coord import Coordinator, Owner, TableCache

log = logging.getLogger(__name__)

FREEZE_TIMEOUT_S = 30.0  # a freeze the mover stopped renewing (it died) is reconsidered after this
RETRY_MOVING_MS = 200
RETRY_UNAVAILABLE_MS = 500


def node_name(config: EngineConfig) -> str:
    """--node, else the name kept in DATA_DIR/NODE, made on the first start:
    a node restarted on its data directory is the same node."""
    if config.node:
        return config.node
    path = os.path.join(config.data_dir, "NODE")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()).strip("-.")[:40] or "node"
    name = f"{host}-{secrets.token_hex(3)}"
    assert NAME_PATTERN.match(name), name
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return name


@dataclass
class Freeze:
    """A space being moved out: writes refused from `since`; `epoch` is the
    owner's epoch when it froze; renewed by every export call."""
    epoch: int
    deadline: float


class NodeCluster:
    def __init__(self, config: EngineConfig):
        self.node = node_name(config)
        self.endpoint = config.advertise or config.endpoint
        self.coord = Coordinator(config.cluster, config.cluster_name)
        self.etcd, self.name = config.cluster, config.cluster_name
        self.coord.join(self.node, self.endpoint, config.lease_ttl_s)
        self.table = TableCache(self.coord)
        self.table.start()
        self._rejoins = self.coord.rejoins
        self.frozen: dict[str, Freeze] = {}
        log.info("node %s joined cluster %s at %s", self.node, config.cluster_name, self.endpoint)

    # -- the check before every request -------------------------------------------
    def route(self, space: str, epoch: int | None, write: bool) -> None:
        """Return if this node answers for `space`; else raise Unavailable,
        Moving or Moved. A write to a space nobody owns places it."""
        if not self.coord.lease_valid():
            raise Unavailable(f"node {self.node} has lost its etcd lease: it answers for no space until "
                              "it holds one again", space=space, node=self.node,
                              retry_after_ms=RETRY_UNAVAILABLE_MS)
        if self.coord.rejoins != self._rejoins:
            # The lease was lost and granted again: spaces may have been
            # reassigned meanwhile, so the whole table is read before serving.
            if not self.table.poll():
                raise Unavailable(f"node {self.node} cannot read the space table from etcd", space=space,
                                  node=self.node, retry_after_ms=RETRY_UNAVAILABLE_MS)
            self._rejoins = self.coord.rejoins
        owner = self.table.get(space)
        if owner is None or (epoch is not None and epoch > owner.epoch):
            owner = self.table.refresh(space)
        if owner is None:
            if not write:
                return  # nobody owns it: nothing is stored anywhere, the engine says unknown_space
            owner = self.coord.place(space)
        if owner.node != self.node:
            raise self.elsewhere(space, owner)
        if write and space in self.frozen:
            raise Moving(f"space {space!r} is being moved off node {self.node}; writes wait",
                         space=space, node=self.node, retry_after_ms=RETRY_MOVING_MS)

    def elsewhere(self, space: str, owner: Owner) -> Exception:
        """The refusal of a request for a space another node owns."""
        info = self.table.members.get(owner.node)
        if info is None:
            return Unavailable(f"space {space!r} is owned by node {owner.node}, which is not live",
                               space=space, node=owner.node, epoch=owner.epoch,
                               retry_after_ms=RETRY_UNAVAILABLE_MS)
        return Moved(f"space {space!r} is owned by node {owner.node} at epoch {owner.epoch}",
                     space=space, node=owner.node, endpoint=info["endpoint"], epoch=owner.epoch)

    # -- moving a space out ---------------------------------------------------------
    def owns(self, space: str) -> Owner:
        """This node's ownership of `space` as etcd has it now (a mover's
        precondition), else the refusal."""
        owner = self.table.refresh(space)
        if owner is None or owner.node != self.node:
            raise self.elsewhere(space, owner) if owner else Unavailable(
                f"space {space!r} is not in the cluster's table", space=space)
        return owner

    def freeze(self, space: str) -> Freeze:
        """Refuse writes to `space` from now on (renewed by each call)."""
        freeze = self.frozen.get(space)
        if freeze is None:
            freeze = self.frozen[space] = Freeze(self.owns(space).epoch, 0.0)
            log.info("space %s frozen for a move (epoch %d)", space, freeze.epoch)
        freeze.deadline = time.monotonic() + FREEZE_TIMEOUT_S
        return freeze

    def release(self, space: str) -> Owner:
        """The move switched `space` to another node: the cache learns it now
        (so `route` answers `moved` from this request on) and the freeze ends."""
        owner = self.table.refresh(space)
        if owner is None or owner.node == self.node:
            raise Unavailable(f"space {space!r} has not changed owner in etcd; it stays here", space=space)
        self.frozen.pop(space, None)
        log.info("space %s released to node %s (epoch %d)", space, owner.node, owner.epoch)
        return owner

    def upkeep(self) -> None:
        """A freeze whose mover went silent ends once etcd answers: if the
        space is still this node's, its move stopped before the switch and
        writes resume; if not, the cache now names its owner (`moved`)."""
        now = time.monotonic()
        for space, freeze in list(self.frozen.items()):
            if now < freeze.deadline:
                continue
            try:
                owner = self.table.refresh(space)
            except Unavailable:
                continue  # etcd unreachable: stay frozen
            del self.frozen[space]
            if owner is not None and owner.node == self.node:
                log.warning("space %s unfrozen: its move stopped before the switch", space)

    def stats(self) -> dict:
        return {"node": self.node, "endpoint": self.endpoint, "etcd": self.etcd, "name": self.name,
                "lease_valid": self.coord.lease_valid(), "frozen": sorted(self.frozen)}

    def close(self) -> None:
        self.table.stop()
        self.coord.leave()
