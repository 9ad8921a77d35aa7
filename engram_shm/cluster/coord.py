"""Membership and the space table, kept in etcd.

Keys, under `/engram_shm/<cluster>/`:

| key              | value (JSON)                                | written by                         |
|------------------|---------------------------------------------|------------------------------------|
| `members/<node>` | {"node", "endpoint", "pid", "started"}      | the node, under its lease          |
| `spaces/<space>` | {"owner": node, "epoch": int}, epoch from 1 | transactions only (place, assign)  |

A space is placed once, by rendezvous hashing over the live members, with a
create-if-absent transaction; afterwards only `assign` changes it, comparing the
whole value, so the epoch only grows and a stale writer is refused: that is the
fence. A node holds its lease with a keepalive thread and counts it lost a margin
*before* etcd would drop it, so it stops serving before anyone may take over.

etcd is spoken to through its JSON gateway (etcd3gw's client does the HTTP); every
failure becomes `Unavailable` naming the endpoints, after trying each endpoint.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_errors

from engram_shm.errors import ClusterConflict, Corrupt, EngramError, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 0.5  # a node counts its lease lost this long before etcd may drop it
MIN_TTL_S = 2  # etcd rounds shorter leases up to about this (1.5 election timeouts)
# Failures after which another endpoint may answer; any other etcd error is an answer.
_FAILOVER = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
             etcd_errors.InternalServerError, requests.RequestException)


@dataclass(frozen=True)
class Owner:
    """A space's entry in the table: the node that owns it, and since when (epoch)."""
    node: str
    epoch: int

    def to_json(self) -> str:
        # Canonical (fixed key order, no spaces): assign compares values byte for byte.
        return json.dumps({"owner": self.node, "epoch": self.epoch}, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> Owner:
        try:
            entry = json.loads(data)
            return cls(str(entry["owner"]), int(entry["epoch"]))
        except (ValueError, TypeError, KeyError) as e:
            raise Corrupt(f"a space table entry is not {{owner, epoch}} JSON: {data!r}") from e


def rendezvous(space: str, nodes: Iterable[str]) -> str:
    """The node with the highest score blake2b(node NUL space)[:8] (big-endian):
    adding a node moves to it only the spaces it now wins, about 1/(n+1) of them."""
    def score(node: str) -> tuple[int, str]:
        digest = hashlib.blake2b(f"{node}\0{space}".encode()).digest()
        return int.from_bytes(digest[:8], "big"), node
    try:
        return max(nodes, key=score)
    except ValueError:
        raise Unavailable(f"no live node to place space {space!r} on") from None


class Coordinator:
    """One process's view of the cluster: `join` to be a member, the table to route."""

    def __init__(self, endpoints: str, cluster: str = "default", timeout: float = 2.0):
        self.endpoints = endpoints
        self.prefix = f"/engram_shm/{cluster}/"
        self.timeout = timeout
        self._clients = [_client(e, timeout) for e in endpoints.split(",") if e.strip()]
        if not self._clients:
            raise InvalidArgument(f"no etcd endpoint in {endpoints!r}")
        self._current = 0  # the endpoint that answered last: asked first
        self.node: str | None = None
        self.rejoins = 0
        self._member = ""
        self._ttl = MIN_TTL_S
        self._lease: int | None = None
        self._deadline = 0.0  # monotonic; see lease_valid
        self._on_lease_change: Callable[[bool], None] | None = None
        self._reported = False
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    # -- etcd calls ---------------------------------------------------------------

    def _post(self, path: str, payload: dict) -> dict:
        """One gateway call, on each endpoint in turn until one answers."""
        n = len(self._clients)
        failures = []
        for i in range(n):
            index = (self._current + i) % n
            client = self._clients[index]
            try:
                reply = client.post(client.get_url(path), json=payload)
            except _FAILOVER as e:
                failures.append(f"{client.base_url}: {_describe(e)}")
                continue
            except etcd_errors.Etcd3Exception as e:
                raise Unavailable(f"etcd at {client.base_url} refused {path}: {_describe(e)}",
                                  endpoints=self.endpoints) from e
            self._current = index
            return reply
        raise Unavailable(f"etcd is unreachable at {self.endpoints} ({'; '.join(failures)})",
                          endpoints=self.endpoints)

    def _range(self, key: str, prefix: bool = False) -> tuple[list[tuple[str, bytes]], int]:
        """(key, value) pairs of a key or of all keys under a prefix, and the revision read."""
        payload = {"key": _b64(key)}
        if prefix:
            payload["range_end"] = _b64(_prefix_end(key))
        reply = self._post("kv/range", payload)
        rows = [(_unb64(kv["key"]).decode(), _unb64(kv.get("value", ""))) for kv in reply.get("kvs", [])]
        return rows, int(reply["header"]["revision"])

    # -- membership ---------------------------------------------------------------

    def join(self, node: str, endpoint: str, ttl: float = 5.0,
             on_lease_change: Callable[[bool], None] | None = None) -> None:
        """Become a live member until `leave`. A keepalive thread refreshes the lease
        every ttl/3, and joins again (counted in `rejoins`) if etcd dropped it.
        `on_lease_change(valid)` is called from that thread when lease_valid() flips."""
        if self._keeper is not None:
            raise InvalidArgument(f"already joined as {self.node!r}: leave first")
        self.node = node
        self._member = json.dumps({"node": node, "endpoint": endpoint, "pid": os.getpid(),
                                   "started": time.time()})
        self._ttl = max(MIN_TTL_S, math.ceil(ttl))
        self._on_lease_change = on_lease_change
        self._grant_and_put()
        self._reported = True
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep, name=f"engram-lease-{node}", daemon=True)
        self._keeper.start()

    def lease_valid(self) -> bool:
        """True until TTL - LEASE_MARGIN_S after the last successful refresh was *sent*.
        etcd restarted the TTL when the request arrived, later than that, so the node
        counts the lease lost before etcd can drop it and give its spaces away."""
        return self._lease is not None and time.monotonic() < self._deadline

    def leave(self, revoke: bool = True) -> None:
        """Stop refreshing; revoke the lease (best effort), which removes the member key.
        leave(revoke=False) lets the lease run out, as a crashed node's does."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(2 * self.timeout * len(self._clients) + 1)  # a daemon: bounded
            self._keeper = None
        if revoke and self._lease is not None:
            lease, self._lease = self._lease, None
            try:
                self._post("kv/lease/revoke", {"ID": lease})
            except Unavailable as e:
                log.warning("leaving without revoking lease %x: %s", lease, e)

    def members(self) -> dict[str, dict]:
        """node -> {"node", "endpoint", "pid", "started"} of every live member."""
        rows, _ = self._range(self.prefix + "members/", prefix=True)
        start = len(self.prefix + "members/")
        try:
            return {key[start:]: json.loads(value) for key, value in rows}
        except ValueError as e:
            raise Corrupt(f"a member entry under {self.prefix}members/ is not JSON") from e

    def _grant_and_put(self) -> None:
        sent = time.monotonic()
        granted = self._post("lease/grant", {"TTL": self._ttl})
        lease = int(granted["ID"])
        self._post("kv/put", {"key": _b64(self.prefix + "members/" + self.node),
                              "value": _b64(self._member), "lease": lease})
        self._lease = lease
        self._deadline = sent + int(granted["TTL"]) - LEASE_MARGIN_S

    def _keep(self) -> None:
        period = self._ttl / 3
        next_refresh = time.monotonic() + period
        while True:
            # Wake at the deadline too, so that on_lease_change(False) comes on time.
            wake = min(next_refresh, self._deadline) if self.lease_valid() else next_refresh
            if self._stop.wait(max(0.0, wake - time.monotonic())):
                return
            self._report()  # before a refresh: the deadline may have passed while the process was stopped
            if time.monotonic() >= next_refresh:
                self._refresh()
                next_refresh = time.monotonic() + period
                self._report()

    def _refresh(self) -> None:
        sent = time.monotonic()
        try:
            reply = self._post("lease/keepalive", {"ID": self._lease})
            if "result" not in reply:  # a streaming call: the gateway reports errors in the body
                raise Unavailable(f"etcd refused the keepalive: {reply.get('error', reply)}")
            ttl = int(reply["result"].get("TTL", 0))  # none or 0: etcd dropped the lease
            if ttl > 0:
                self._deadline = sent + ttl - LEASE_MARGIN_S
                return
            if self._stop.is_set():
                return
            log.warning("etcd dropped the lease of node %s; joining again", self.node)
            self._grant_and_put()
            self.rejoins += 1
        except Unavailable as e:
            log.warning("lease refresh of node %s failed: %s", self.node, e)

    def _report(self) -> None:
        valid = self.lease_valid()
        if valid == self._reported:
            return
        self._reported = valid
        log.log(logging.INFO if valid else logging.WARNING, "node %s: lease %s", self.node,
                "valid again" if valid else "lost")
        if self._on_lease_change is not None:
            try:
                self._on_lease_change(valid)
            except Exception:
                log.exception("on_lease_change(%s) failed", valid)

    # -- the space table ----------------------------------------------------------

    def table(self) -> tuple[dict[str, Owner], int]:
        """Every space's owner, and the etcd revision they were read at."""
        rows, revision = self._range(self.prefix + "spaces/", prefix=True)
        start = len(self.prefix + "spaces/")
        return {key[start:]: Owner.from_json(value) for key, value in rows}, revision

    def owner(self, space: str) -> Owner | None:
        return self._entry(space)[0]

    def _entry(self, space: str) -> tuple[Owner | None, int]:
        rows, revision = self._range(self.prefix + "spaces/" + space)
        return (Owner.from_json(rows[0][1]) if rows else None), revision

    def place(self, space: str) -> Owner:
        """The space's owner; a space not in the table yet goes to the rendezvous
        winner among the live members, at epoch 1. Concurrent placers agree: one
        transaction creates the entry, the others read what it wrote."""
        current = self.owner(space)
        if current is not None:
            return current
        chosen = Owner(rendezvous(space, self.members()), 1)
        won, current = self._swap(space, None, chosen)
        return chosen if won else current

    def assign(self, space: str, node: str, expected: Owner | None) -> Owner:
        """Give the space to `node` at the next epoch if the table still holds
        `expected` (None: the space is not in the table; it gets epoch 1), else
        raise ClusterConflict naming what the table holds."""
        new = Owner(node, expected.epoch + 1 if expected else 1)
        won, current = self._swap(space, expected, new)
        # A swap that etcd applied but whose answer was lost is sent again (to
        # the next endpoint) and finds its own value: that is success.
        if not won and current != new:
            raise ClusterConflict(
                f"space {space!r} is {current or 'not in the table'}, not {expected}: read the table again",
                space=space, node=current and current.node, epoch=current and current.epoch)
        return new

    def transfer(self, space: str, expected: Owner, node: str) -> Owner:
        """A move's last step: the epoch grows by one, which fences the old owner."""
        return self.assign(space, node, expected)

    def _swap(self, space: str, expected: Owner | None, new: Owner) -> tuple[bool, Owner | None]:
        """Write `new` if the entry is `expected` (None: absent). Returns whether it
        was written, and the entry found when it was not."""
        key = _b64(self.prefix + "spaces/" + space)
        if expected is None:
            compare = {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": 0}
        else:
            compare = {"key": key, "target": "VALUE", "result": "EQUAL", "value": _b64(expected.to_json())}
        put = {"request_put": {"key": key, "value": _b64(new.to_json())}}
        reply = self._post("kv/txn", {"compare": [compare], "success": [put],
                                      "failure": [{"request_range": {"key": key}}]})
        if reply.get("succeeded"):
            return True, new
        kvs = reply["responses"][0]["response_range"].get("kvs", [])
        return False, Owner.from_json(_unb64(kvs[0]["value"])) if kvs else None


class TableCache:
    """A local copy of the table and the members, polled every poll_s by a daemon
    thread. While etcd does not answer, it keeps the last copy and `stale_since`
    (monotonic) says since when; the caller decides how old is too old."""

    def __init__(self, coordinator: Coordinator, poll_s: float = 0.5):
        self.coordinator = coordinator
        self.poll_s = poll_s
        self.spaces: dict[str, Owner] = {}
        self.members: dict[str, dict] = {}
        self.revision = 0
        self.stale_since: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> TableCache:
        """Read once now (so that `get` answers at once), then poll."""
        self.poll()
        self._thread = threading.Thread(target=self._run, name="engram-table", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.poll_s + 2 * self.coordinator.timeout)  # a daemon: bounded
            self._thread = None

    def get(self, space: str) -> Owner | None:
        return self.spaces.get(space)

    def endpoint_of(self, node: str) -> str | None:
        return self.members.get(node, {}).get("endpoint")

    def refresh(self, space: str) -> Owner | None:
        """Read the space's entry from etcd now (Unavailable if it does not answer)."""
        try:
            owner, revision = self.coordinator._entry(space)
        except Unavailable as e:
            self._stale(e)
            raise
        with self._lock:
            if revision >= self.revision:  # else a newer poll is in already
                spaces = dict(self.spaces)
                if owner is None:
                    spaces.pop(space, None)
                else:
                    spaces[space] = owner
                self.spaces, self.revision = spaces, revision
        return owner

    def poll(self) -> bool:
        """Read the table and the members; False (and stale) if etcd did not answer."""
        try:
            spaces, revision = self.coordinator.table()
            members = self.coordinator.members()
        except EngramError as e:
            self._stale(e)
            return False
        with self._lock:
            # Whole dicts are swapped, never edited: readers take no lock. A read
            # older than one already in (a refresh's, or a slow poll's) is dropped.
            if revision >= self.revision:
                self.spaces, self.members, self.revision = spaces, members, revision
            self.stale_since = None
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def _stale(self, error: Exception) -> None:
        if self.stale_since is None:
            self.stale_since = time.monotonic()
            log.warning("space table cache is stale: %s", error)


def _client(endpoint: str, timeout: float) -> etcd3gw.Etcd3Client:
    url = urlsplit(endpoint.strip() if "://" in endpoint else "http://" + endpoint.strip())
    return etcd3gw.Etcd3Client(host=url.hostname, port=url.port or 2379, protocol=url.scheme,
                               timeout=timeout)


def _describe(error: Exception) -> str:
    """A short reason: etcd's message, or the OS's, which requests buries in a page of repr."""
    if isinstance(error, etcd_errors.ConnectionTimeoutError):
        return "timed out"
    detail = getattr(error, "detail_text", None) or str(error)
    try:
        return str(json.loads(detail)["message"])  # etcd's own answer
    except (ValueError, TypeError, KeyError):
        pass
    reason = re.search(r"\[Errno \d+\] [^'\"()]*", detail)
    return reason.group(0).strip() if reason else detail.strip()[:200]


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _prefix_end(prefix: str) -> bytes:
    """The first key after every key that starts with prefix (etcd's range_end)."""
    raw = prefix.encode()
    return raw[:-1] + bytes([raw[-1] + 1])
