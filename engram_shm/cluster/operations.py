"""An operator's cluster commands (docs/cluster.md): move, drain, reassign,
status. They talk to etcd and to the nodes' fronts as an engine admin."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ClusterConflict, EngramError, InvalidArgument, Unavailable, UnknownSpace
from ..transport.client import Client
from .coord import Coordinator, Owner, rendezvous

log = logging.getLogger(__name__)

COPY_PASSES = 2  # the copy stops once it has read this many times the rows there were at its start


@dataclass
class MoveReport:
    space: str
    source: str
    target: str
    epoch: int
    copied: int  # rows read while the source kept taking writes
    tail: int  # rows read after the freeze
    sessions: int
    seconds: float
    frozen_seconds: float  # how long writes to the space waited


def _endpoint(members: dict, node: str, role: str) -> str:
    if node not in members:
        raise Unavailable(f"the {role} node {node} is not a live member of the cluster", node=node)
    return members[node]["endpoint"]


def move(coord: Coordinator, space: str, target: str, *, chunk: int = 4096, timeout: float = 60.0,
         progress=lambda text: None) -> MoveReport:
    """Copy `space` to `target` while its owner keeps writing, freeze it
    there, copy the tail and the sessions, and switch the owner in etcd (the
    epoch grows by one: the fence)."""
    owner = coord.owner(space)
    if owner is None:
        raise UnknownSpace(f"no space {space!r} in the cluster", space=space)
    if owner.node == target:
        raise InvalidArgument(f"space {space!r} is already on node {target}")
    members = coord.members()
    started = time.monotonic()
    source = Client(_endpoint(members, owner.node, "source"), timeout=timeout)
    try:
        def export(cursor, freeze=False):
            return source.request({"op": "export", "space": space, "cursor": cursor, "limit": chunk,
                                   "freeze": freeze})

        first = export([], False)
        dtype = "f16" if first["params"]["dtype"] == "f16" else "f32"
        sink = Client(_endpoint(members, target, "target"), timeout=timeout, batch_size=chunk,
                      payload_dtype=dtype, priority="high")
        try:
            sink.route_fields = {"import": True, "params": first["params"], "owner": first["owner"]}

            def ship(reply) -> int:
                if reply["ids"]:
                    vectors = np.frombuffer(reply["_payload"][0], np.float16 if reply["dtype"] == "f16"
                                            else np.float32).reshape(reply["shape"])
                    sink.observe_batch(space, reply["ids"], vectors, reply["what"], reply["when"],
                                       reply["confidence"])
                return len(reply["ids"])

            copied, reply = ship(first), first
            while reply["more"] and copied < COPY_PASSES * first["count"] + chunk:
                reply = export(reply["cursor"])
                copied += ship(reply)
                progress(f"copied {copied:,} rows")
            sink.flush()
            frozen_at, tail = time.monotonic(), 0
            while True:
                reply = export(reply["cursor"], freeze=True)
                tail += ship(reply)
                if not reply["more"]:
                    break
            progress(f"copied a tail of {tail:,} rows")
            sink.flush(durable=True)  # on the target's disk before it owns the space
            sessions = reply["sessions"]
            sink.request({"op": "adopt", "sessions": sessions})
        finally:
            _close(sink)  # its rows are the target's now, indexed in the background
        new = coord.transfer(space, Owner(owner.node, reply["epoch"]), target)
        try:
            source.request({"op": "release", "space": space}, timeout=5.0)
        except EngramError as e:  # it learns the new owner from etcd
            log.warning("the source did not confirm the release of %s: %s", space, e)
    finally:
        _close(source)
    done = time.monotonic()
    return MoveReport(space, owner.node, target, new.epoch, copied, tail, len(sessions),
                      round(done - started, 3), round(done - frozen_at, 3))


def _close(client: Client) -> None:
    """Close without waiting long: a source may be stopped or gone."""
    try:
        client.close(drain=False, timeout=5.0)
    except EngramError as e:
        log.warning("closing the connection to %s: %s", client.endpoint, e)


def drain(coord: Coordinator, node: str, progress=lambda text: None, **options) -> list[MoveReport]:
    """Move every space of `node` to the live member rendezvous hashing picks
    among the others (before the node leaves)."""
    table, _ = coord.table()
    others = [m for m in coord.members() if m != node]
    reports = []
    for space, owner in sorted(table.items()):
        if owner.node == node:
            target = rendezvous(space, others)
            progress(f"moving {space} to {target}")
            reports.append(move(coord, space, target, progress=progress, **options))
    return reports


def reassign(coord: Coordinator, space: str, node: str) -> Owner:
    """Give a space whose owner is gone to `node`, copying nothing: refused
    while the owner's lease is live (use move)."""
    owner = coord.owner(space)
    if owner is None:
        raise UnknownSpace(f"no space {space!r} in the cluster", space=space)
    members = coord.members()
    if owner.node in members:
        raise ClusterConflict(f"node {owner.node} owning {space!r} is live: move the space instead",
                              node=owner.node)
    _endpoint(members, node, "target")
    return coord.assign(space, node, owner)


def status(coord: Coordinator, timeout: float = 5.0) -> dict:
    """Members (with each node's figures), spaces with owner, epoch and size."""
    members = coord.members()
    table, revision = coord.table()
    sizes: dict[str, dict] = {}
    for node, info in members.items():
        try:
            with Client(info["endpoint"], timeout=timeout) as client:
                stats = client.stats()
            info["spaces"] = len(stats["spaces"])
            sizes.update({name: s for name, s in stats["spaces"].items()
                          if name in table and table[name].node == node})
        except EngramError as e:
            info["error"] = f"{e.code}: {e}"
    spaces = {name: {"owner": o.node, "epoch": o.epoch, "live": o.node in members,
                     **{k: sizes.get(name, {}).get(k) for k in ("count", "shm_bytes")}}
              for name, o in sorted(table.items())}
    return {"revision": revision, "members": members, "spaces": spaces}
