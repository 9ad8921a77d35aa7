"""The cluster's client (docs/cluster.md): routes each space to its owner.

One `Client` (one connection, one session) per space written or recalled:
a space's session can then move with the space, and its sequence numbers
stay one space's. The space table and the members come from etcd (cached,
read again on `moved`, `unavailable` and silence). Recall across spaces on
different nodes is a fan-out here."""

from __future__ import annotations

import heapq
import time
from concurrent.futures import ThreadPoolExecutor

from ..engine.reader import Memory
from ..errors import InvalidArgument, Moved, NotSessionOwner, Unavailable, UnknownSpace
from ..transport.client import Client, ClientTimeout
from .coord import Coordinator, Owner, TableCache


def coordinator_for(cluster: str, cluster_name: str = "default") -> Coordinator:
    """The cluster's etcd from its endpoints, or from any node's address
    (tcp://, ipc://: the node names its etcd and cluster in its stats)."""
    if not cluster.startswith(("tcp://", "ipc://")):
        return Coordinator(cluster, cluster_name)
    with Client(cluster, timeout=10.0) as client:
        info = client.stats().get("cluster")
    if info is None:
        raise InvalidArgument(f"the server at {cluster} is not a cluster node (started without --cluster)")
    return Coordinator(info["etcd"], info["name"])


class ClusterClient:
    def __init__(self, cluster: str | Coordinator, *, cluster_name: str = "default", timeout: float = 30.0,
                 **client_options):
        """`cluster`: etcd endpoints (comma-separated), any node's address
        (tcp://HOST:PORT), or a Coordinator. `client_options` go to every
        per-space `Client` (batch_size, payload_dtype, keys...)."""
        self.coord = cluster if isinstance(cluster, Coordinator) else coordinator_for(cluster, cluster_name)
        self.table = TableCache(self.coord)
        self.table.start()
        self.timeout = timeout
        self.options = client_options
        self.clients: dict[str, Client] = {}
        self.redirects = 0

    # -- where a space is ----------------------------------------------------------
    def _owner(self, space: str, place: bool) -> Owner:
        owner = self.table.get(space) or self.table.refresh(space)
        if owner is None and place:
            owner = self.coord.place(space)
        if owner is None:
            raise UnknownSpace(f"no space {space!r} in the cluster", space=space)
        return owner

    def _endpoint(self, space: str, owner: Owner) -> str:
        info = self.table.members.get(owner.node) or self.coord.members().get(owner.node)
        if info is None:
            raise Unavailable(f"space {space!r} is owned by node {owner.node}, which is not live",
                              space=space, node=owner.node, epoch=owner.epoch)
        return info["endpoint"]

    def _router(self, space: str):
        def where_now() -> str | None:
            """The owner's endpoint as etcd has it now (None: not live, or
            etcd unreachable: keep trying the last one)."""
            try:
                owner = self.table.refresh(space)
                if owner is None:
                    return None
                endpoint = self._endpoint(space, owner)
            except Unavailable:
                return None
            client = self.clients[space]
            if endpoint != client.endpoint:
                self.redirects += 1
            client.route_fields = {"epoch": owner.epoch}
            return endpoint
        return where_now

    def client(self, space: str, place: bool = True) -> Client:
        """The connection and session of `space` (opened on its owner)."""
        client = self.clients.get(space)
        if client is None:
            owner = self._owner(space, place)
            client = Client(self._endpoint(space, owner), timeout=self.timeout, **self.options)
            client.route_fields = {"epoch": owner.epoch}
            self.clients[space] = client
            client.router = self._router(space)
        return client

    # -- observations --------------------------------------------------------------
    def observe(self, space: str, obs_id: str, vector, **fields) -> None:
        self.client(space).observe(space, obs_id, vector, **fields)

    def observe_batch(self, space: str, ids, vectors, what=None, when=None, confidence=None) -> None:
        self.client(space).observe_batch(space, ids, vectors, what, when, confidence)

    def flush(self, timeout: float | None = None, durable: bool = False) -> None:
        for client in list(self.clients.values()):
            client.flush(timeout, durable)

    # -- recall ----------------------------------------------------------------------
    def recall(self, space: str, cue, k: int = 10, **options) -> list[Memory]:
        """The owner's answer. A space that moved is asked again at its new
        owner; an owner that is not live, or does not answer, raises
        Unavailable (with the node) once `timeout` has passed: never an
        answer from a node that does not own the space."""
        deadline = time.monotonic() + self.timeout
        while True:
            client = self.client(space, place=False)
            try:
                return client.recall(space, cue, k, **options)
            except Moved:
                self._reconnect(space)
            except (Unavailable, ClientTimeout) as e:
                if time.monotonic() > deadline:
                    owner = self.table.refresh(space)
                    raise Unavailable(f"space {space!r}: its owner did not answer within {self.timeout} s "
                                      f"({e.code}: {e})", space=space,
                                      node=owner.node if owner else None) from None
                time.sleep(0.2)
                self._reconnect(space)

    def _reconnect(self, space: str) -> None:
        client = self.clients[space]
        client.reconnect(time.monotonic() + min(self.timeout, 5.0))

    def recall_many(self, spaces, cue, k: int = 10, **options) -> list[tuple[str, Memory]]:
        """The best k of several spaces, each asked of its owner at once:
        (space, memory) pairs, best first."""
        spaces = list(dict.fromkeys(spaces))
        for space in spaces:
            self.client(space, place=False).flush()
        with ThreadPoolExecutor(max_workers=min(16, len(spaces)) or 1) as pool:
            answers = list(pool.map(lambda s: [(s, m) for m in self.recall(s, cue, k, **options)], spaces))
        return heapq.nlargest(k, (pair for answer in answers for pair in answer),
                              key=lambda pair: pair[1].similarity)

    # -- the rest ----------------------------------------------------------------------
    def close(self) -> None:
        try:
            for client in self.clients.values():
                try:
                    client.close()
                except NotSessionOwner:
                    # The node restarted and ZeroMQ reconnected by itself: the
                    # session is ours, so take it over on this connection first.
                    client.reconnect()
                    client.close()
        finally:
            self.table.stop()

    def __enter__(self) -> "ClusterClient":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # no flushing on the way out of an error
            for client in self.clients.values():
                client.__exit__(*exc)
            self.table.stop()
