"""The WebSocket bridge: Engram's JSON stream on `GET /v1/stream`, carried
to the front as an ordinary client (docs/protocol.md, "WebSocket").

A process of its own, supervised by the server like the front. Each
WebSocket connection gets its own DEALER to the front: a front session
belongs to the connection that opened it, and one socket per connection
keeps that true here (a second connection resuming the session takes it
over, as a reconnecting ZeroMQ client does), and a client that stops reading
backs up only its own socket. Credit, sequence checks, durability, errors
and recall are the front's; the bridge only translates (jsonstream.py).

    python -m engram_shm.transport.ws_bridge ENGINE CONFIG_JSON INCARNATION READY_FILE
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import signal
import sys
from http import HTTPStatus

import msgpack
import zmq
import zmq.asyncio
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ..config import EngineConfig
from ..engine import lifeline
from ..engine.readiness import report_ready
from ..errors import EngramError, Internal, InvalidArgument, NotInitialized, SessionMismatch
from ..observability import logs
from . import jsonstream as js
from . import protocol as p

log = logging.getLogger(__spec__.name)  # its module's name, also when run with -m

PATH = "/v1/stream"
# Pages served from this machine may connect; others only if ws_origins says.
LOOPBACK_ORIGIN = re.compile(r"^https?://(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\])(:\d+)?$")


def front_address(endpoint: str) -> str:
    """The front's endpoint as a local client connects to it (a wildcard
    bind is reached on loopback)."""
    return re.sub(r"://(\*|0\.0\.0\.0):", "://127.0.0.1:", endpoint).replace("://[::]:", "://[::1]:")


def allowed_origins(config: EngineConfig) -> list | None:
    """The Origin values that may open a connection (None: any). No Origin
    header at all is a non-browser client, always allowed."""
    extra = [o.strip() for o in config.ws_origins.split(",") if o.strip()]
    return None if "*" in extra else [None, LOOPBACK_ORIGIN, *extra]


class Bridge:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.front = front_address(config.endpoint)
        self.ctx = zmq.asyncio.Context()
        self.stopping = asyncio.Event()

    async def serve(self, ready=lambda: None) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        async with serve(self.connection, self.config.ws_host, self.config.ws_port,
                         process_request=_only_the_stream, origins=allowed_origins(self.config),
                         max_size=self.config.max_frame_bytes, compression=None):
            ready()
            await self.stopping.wait()
        self.ctx.term()

    async def connection(self, ws: ServerConnection) -> None:
        await Connection(self, ws).run()


def _only_the_stream(connection, request):
    if request.path.split("?")[0] != PATH:
        return connection.respond(HTTPStatus.NOT_FOUND, f"the JSON stream is served on {PATH}\n")
    return None


class Connection:
    """One WebSocket client and its DEALER to the front."""

    def __init__(self, bridge: Bridge, ws: ServerConnection):
        self.bridge = bridge
        self.ws = ws
        self.dealer = bridge.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.RCVHWM, 0)  # replies are bounded by the credit in flight
        self.dealer.connect(bridge.front)
        self.rids = itertools.count(1)
        self.pending: dict[int, js.Pending] = {}
        self.session: str | None = None
        self.space = js.DEFAULT_SPACE
        self.level: str | None = None  # last level told to the client
        self.retake_needed = False

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._relay()), asyncio.create_task(self._heartbeat())]
        try:
            async for message in self.ws:
                await self._handle(message)
        except ConnectionClosed:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.dealer.close(linger=0)
        # The front session outlives the connection: the client may resume it
        # (init with resume_session_id) until it expires (session_idle_s).

    async def _send(self, msg: dict) -> None:
        await self.ws.send(js.encode(msg), text=True)

    # -- client to front -------------------------------------------------------------
    async def _handle(self, message) -> None:
        try:
            msg = js.decode(message)
            await getattr(self, "_on_" + msg["type"])(msg)
        except EngramError as e:
            await self._send(js.error(e, self.session))
        except ConnectionClosed:
            raise
        except Exception as e:  # a bug must cost one message, never the connection
            log.exception("internal error on a WebSocket message")
            await self._send(js.error(Internal(f"internal error: {type(e).__name__}: {e}"), self.session))

    async def _request(self, header: dict, pending: js.Pending, *payload) -> None:
        rid = next(self.rids)
        self.pending[rid] = pending
        await self.dealer.send_multipart(p.pack({**header, "rid": rid}, *payload), copy=False)

    def _session_of(self, msg: dict) -> str:
        if self.session is None:
            raise NotInitialized(f"send init before {msg['type']}")
        named = p.field(msg, "session_id", str)
        if named != self.session:
            raise SessionMismatch(f"session id mismatch: this connection's session is {self.session}, "
                                  f"the message names {named[:64]}", expected=self.session)
        return self.session

    async def _on_init(self, msg: dict) -> None:
        space = p.field(msg, "memory_space_id", str, js.DEFAULT_SPACE)
        header = {"op": "init", "priority": p.field(msg, "priority", str, "normal")}
        resume = p.field(msg, "resume_session_id", str, None)
        if resume is not None:
            header["resume"] = resume
        await self._request(header, js.Pending("init", space=space))

    async def _on_observation(self, msg: dict) -> None:
        await self._observe(msg, [p.field(msg, "episode", dict)])

    async def _on_observation_batch(self, msg: dict) -> None:
        await self._observe(msg, p.field(msg, "episodes", list))

    async def _observe(self, msg: dict, episodes: list) -> None:
        session = self._session_of(msg)
        seq = p.field(msg, "sequence_number", int)
        try:
            header, frame = js.observe_request(session, seq, self.space, episodes)
        except EngramError as e:
            await self._send(js.error(e, session, js.Pending("observe", seq=seq)))
            return
        await self._request(header, js.Pending("observe", seq=seq, ids=header["ids"]), frame)

    async def _on_flow_control(self, msg: dict) -> None:
        session = self._session_of(msg)
        action = p.field(msg, "action", str)
        if action not in ("pause", "resume"):
            raise InvalidArgument(f"flow_control action is pause or resume, got {action[:32]!r}",
                                  field="action")
        await self._request({"op": action, "session": session}, js.Pending(action))

    async def _on_close(self, msg: dict) -> None:
        session = self._session_of(msg)
        drain = p.field(msg, "drain", bool, False)
        await self._request({"op": "close", "session": session, "drain": drain}, js.Pending("close"))

    async def _on_recall(self, msg: dict) -> None:
        request_id = p.field(msg, "request_id", (str, int), None)
        header, frame = js.recall_request(msg, self.space)
        await self._request(header, js.Pending("recall", request_id=request_id), frame)

    # -- front to client --------------------------------------------------------------
    async def _relay(self) -> None:
        while True:
            frames = await self.dealer.recv_multipart()
            try:
                reply = msgpack.unpackb(frames[0], raw=False)
                messages = self._translate(reply)
            except EngramError as e:
                messages = [js.error(e, self.session)]
            if self.retake_needed:
                self.retake_needed = False
                await self._request({"op": "init", "resume": self.session}, js.Pending("retake"))
            for msg in messages:
                await self._send(msg)

    def _translate(self, reply: dict) -> list[dict]:
        op, rid = reply.get("op"), reply.get("rid")
        if op == "recall_result" and reply.get("more"):
            pending = self.pending.get(rid)
        else:
            pending = self.pending.pop(rid, None)
        if op == "error":
            if reply.get("code") == "not_session_owner" and self.session is not None:
                # The front restarted and ZeroMQ reconnected this socket by
                # itself: take the session back; the refused message is the
                # client's to send again.
                self.retake_needed = True
            return [js.error(reply, self.session, pending)]
        if op == "init_ack":
            self.session, self.level = reply["session"], reply["level"]
            if pending is not None and pending.kind == "retake":
                return []
            self.space = pending.space if pending is not None else self.space
            return [js.init_ack(reply, self.bridge.config.ring_capacity)]
        if op == "ack" and pending is not None:
            try:
                out = [js.ack(reply, pending)]
            except EngramError as e:  # a duplicate
                out = [js.error(e, self.session, pending)]
            return out + self._level_change(reply)
        if op in ("status", "resumed"):
            self.level = None  # always told
            return self._level_change(reply)
        if op == "paused":
            return [js.status(self.session, "paused")]
        if op == "closed":
            return [js.status(self.session, "closed", last_sequence=reply["last_sequence"])]
        if op == "durable":
            return [{"type": "durable", "session_id": self.session, "durable_sequence": reply["durable_seq"]}]
        if op == "recall_result" and pending is not None:
            return [js.recall_result(reply, pending.request_id)]
        return []  # indexed notifications (never asked for), answers to abandoned requests

    def _level_change(self, reply: dict) -> list[dict]:
        if "level" not in reply or reply["level"] == self.level:
            return []
        self.level = reply["level"]
        return [js.level_status(self.session, reply)]

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.bridge.config.ws_heartbeat_s)
            await self._send(js.heartbeat(self.session))


def main(argv=None) -> None:
    lifeline.bind_to_parent()  # first: an orphaned bridge must not hold the port
    argv = sys.argv[1:] if argv is None else argv
    engine, config_json, incarnation, ready_path = argv[0], argv[1], int(argv[2]), argv[3]
    config = EngineConfig.from_json(config_json)
    logs.configure(config, "ws-bridge")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides

    def ready():
        report_ready(ready_path, incarnation)
        log.info("WebSocket bridge of %s on ws://%s:%d%s", engine, config.ws_host, config.ws_port, PATH)

    asyncio.run(Bridge(config).serve(ready))


if __name__ == "__main__":
    main()
