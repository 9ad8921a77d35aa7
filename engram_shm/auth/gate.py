"""The front's gatekeeper: who sent a message, and may they do this.

Without authentication every client is the principal "anonymous" and may do
everything (the server then listens on loopback only, unless --insecure).
With `auth = "curve"` the socket is a CURVE server; pyzmq's ZAP authenticator
(a thread of the front) admits a connection only if its public key is an
accepted client key, and libzmq stamps each message with that key (the
"User-Id" property). The gate maps it to the key's name on every message, so
a key revoked while connected is refused from its next message on, without
a restart: CURVE authenticates connections, the gate authorizes messages.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..config import metrics_address
from ..errors import EngramError, Forbidden, InsecureBind, Unauthenticated
from ..limits import ANONYMOUS
from .acl import Acl
from .keys import KeysDir

log = logging.getLogger(__name__)


class OpenGate:
    """No authentication: one principal, every right."""

    auth = "none"

    def start(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        pass

    def principal_of(self, frame: zmq.Frame) -> str:
        return ANONYMOUS

    def check(self, principal: str, space: str, right: str) -> None:
        pass

    def check_engine(self, principal: str) -> None:
        pass

    def check_admitted(self, principal: str) -> None:
        pass

    def is_admin(self, principal: str) -> bool:
        return True

    def visible(self, principal: str, space: str) -> bool:
        return True

    def reload(self) -> set[str]:
        return set()

    def limits(self) -> dict[str, dict]:
        return {}

    def stop(self) -> None:
        pass


class CurveGate:
    auth = "curve"

    def __init__(self, keys: KeysDir):
        self.keys = keys
        self.server_public, self.server_secret = keys.server_key(create=True)
        self.accepted = keys.accepted()  # z85 public key -> name; swapped whole on reload
        self.acl = Acl.load(keys.acl)
        self._authenticator: ThreadAuthenticator | None = None
        if not self.acl.grants:
            log.warning("no grants in %s: every key is forbidden every space until you write one",
                        keys.acl)

    def start(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server checked by ZAP; call before binding."""
        self._authenticator = ThreadAuthenticator(ctx, log=log)
        self._authenticator.start()
        self._authenticator.configure_curve_callback("*", self)
        sock.curve_server = True
        sock.curve_publickey = self.server_public
        sock.curve_secretkey = self.server_secret

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question, from the authenticator's thread: admit this key?"""
        admitted = key in self.accepted
        if not admitted:
            log.info("refused a connection with an unknown or revoked key %s", key.decode())
        return admitted

    def principal_of(self, frame: zmq.Frame) -> str:
        name = self.accepted.get(frame.get("User-Id").encode())
        if name is None:
            raise Unauthenticated("this connection's key has been revoked")
        return name

    def check(self, principal: str, space: str, right: str) -> None:
        self.acl.check(principal, space, right)

    def check_engine(self, principal: str) -> None:
        self.acl.check_engine(principal)

    def is_admin(self, principal: str) -> bool:
        return self.acl.is_engine_admin(principal)

    def check_admitted(self, principal: str) -> None:
        """A key the ACL grants nothing is refused a session at once."""
        if not self.acl.holds_any(principal):
            raise Forbidden(f"key {principal!r} holds no grant in {self.keys.acl}")

    def visible(self, principal: str, space: str) -> bool:
        return bool(self.acl.rights(principal, space))

    def reload(self) -> set[str]:
        """Read the keys and the ACL again; returns the principals whose
        access changed (revoked, or other grants): their sessions end. A
        broken ACL file keeps the one in force (and says why)."""
        try:
            acl, accepted = Acl.load(self.keys.acl), self.keys.accepted()
        except EngramError as e:
            log.error("reload refused, the keys and ACL in force stay: %s", e.message)
            return set()
        names = set(self.accepted.values()) | set(accepted.values())
        by_name = {name: key for key, name in accepted.items()}
        old_by_name = {name: key for key, name in self.accepted.items()}
        changed = {n for n in names if by_name.get(n) != old_by_name.get(n)
                   or acl.grants.get(n) != self.acl.grants.get(n)}  # new limits apply without closing
        self.acl, self.accepted = acl, accepted
        log.warning("keys and ACL reloaded: %d keys; access changed for %s", len(accepted),
                    sorted(changed) or "nobody")
        return changed

    def limits(self) -> dict[str, dict]:
        """Per-key limits of the ACL ([limits.NAME])."""
        return self.acl.limits

    def stop(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


def gate_for(config) -> OpenGate | CurveGate:
    return CurveGate(KeysDir(config.keys_path)) if config.auth == "curve" else OpenGate()


def check_bind(config) -> bool:
    """Refuse to expose an unauthenticated server beyond this machine unless
    told to (`insecure`); returns whether an endpoint is exposed so. The
    WebSocket bridge has no authentication (config.py refuses it with
    --auth), so a non-loopback ws_host is exposed whatever --auth says."""
    exposed = [address for address, local in exposed_addresses(config) if not local]
    if exposed and not config.insecure:
        raise InsecureBind(f"{', '.join(exposed)} is reachable from other machines without authentication: "
                           "anyone reaching the port could read and write every space. Use --auth curve "
                           "(docs/security.md; not for the WebSocket bridge), bind 127.0.0.1, or pass "
                           "--insecure")
    return bool(exposed)


def exposed_addresses(config) -> list[tuple[str, bool]]:
    """(address, only this machine can reach it) of every unauthenticated
    listener of the server: the ZeroMQ endpoint without --auth, and the
    WebSocket bridge if it runs, and the metrics endpoint."""
    listeners = [] if config.auth != "none" else [(config.endpoint, is_local(config.endpoint))]
    if config.ws_port:
        listeners.append((f"ws://{config.ws_host}:{config.ws_port}", is_loopback_host(config.ws_host)))
    if config.metrics != "off":  # no authentication either, and it names every space
        host = metrics_address(config.metrics)[0]
        listeners.append((f"http://{config.metrics}/metrics", is_loopback_host(host)))
    return listeners


def is_local(endpoint: str) -> bool:
    """Whether only this machine can reach a ZeroMQ endpoint: ipc:// and
    inproc://, or tcp:// on addresses that all resolve to loopback."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    match = re.match(r"^(?:.*;)?\[?([^\[\]]+?)\]?:(\d+|\*)$", address)  # [source;]host:port
    if transport != "tcp" or match is None:
        return False
    return is_loopback_host(match.group(1))


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address resolves only to loopback addresses."""
    if host == "lo":  # an interface name: ZeroMQ binds its address
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False  # "*", an interface name, or nothing known: assume exposed
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
