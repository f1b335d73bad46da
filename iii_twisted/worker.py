"""
The worker socket: an Autobahn WebSocket server on the engine port (49134).

Paths (../shared/spec/engine-core.md §1):

- ``/``: a worker. The engine sends ``{"type": "workerregistered", "worker_id",
  "reattach_token"}`` first (the token is an extension newer SDKs present to retire
  their previous, half-open connection; 0.10.0 ignores it); then every text frame is one JSON message (§2), handled in arrival order.
  Binary frames starting ``OTLP``/``LOGS``/``MTRC`` are telemetry for the observability
  sink; other binary frames are JSON messages too.
- ``/otel``: telemetry only (npm ``iii-sdk`` 0.11.2 sends its OTel frames here). No
  worker is registered; binary telemetry frames are accepted, anything else dropped.
- ``/ws/channels/<id>?key=...&dir=read|write``: a data channel end, handed to the
  channel manager (``factory.channels``) when one is installed, else 404.
- anything else: refused with 404 before the upgrade.

Authentication (a listener with ``auth:``, see L{iii_twisted.auth}): ``/`` and
``/otel`` need a valid token (``Authorization: Bearer`` or ``?token=``) or the auth
function's consent; without it the upgrade is answered ``401 Unauthorized`` and the
socket closed, before any worker exists (the reference sends an ``AUTH_ERROR`` frame
after the upgrade instead; no SDK reads that frame, both just reconnect, and refusing
before the upgrade costs a refused client nothing on our side but one HTTP answer). A
channel end is authorized by its ``key`` (a secret only an authenticated session got
from ``engine::channels::create``); a token it presents must still be valid.

Bad input never closes the connection: undecodable JSON, a non-object, an unknown type
or a wrong field type is logged and dropped; a malformed ``invokefunction`` that still
carries an ``invocation_id`` is answered with an ``invalid_message`` error so its
caller does not wait for a timeout. A frame over ``max_message_size`` is dropped the
same way (answered with ``message_too_large`` when it is an ``invokefunction`` whose
id can be found). Autobahn's own hard limit (4 x ``max_message_size``) bounds the
memory one frame may take; past it the connection is failed with close code 1009.
"""

import re

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger
from zope.interface import implementer

from . import __version__
from . import protocol as P
from .auth import AuthRefused, headers_of
from .interfaces import IWorkerConnection
from .backpressure import FrameBudget, LargeFrames, ReadHolds, SendGate
from .connlimits import AddressCounter
from .limits import release_receive_buffers
from .oplog import describe_worker
from .peer_limits import PeerFrameLimits, too_large

WORKER_PATH = "/"
OTEL_PATH = "/otel"
CHANNELS_PREFIX = "/ws/channels/"

# How a too-large frame is still answered: its invocation id, if it is near the start.
_INVOCATION_ID = re.compile(rb'"invocation_id"\s*:\s*"([^"\\]{1,100})"')
_FUNCTION_ID = re.compile(rb'"function_id"\s*:\s*"([^"\\]{1,1000})"')


@implementer(IWorkerConnection)
class WorkerProtocol(LargeFrames, ReadHolds, WebSocketServerProtocol):
    """
    One connection on the engine port. After the handshake it is a worker (path
    ``/``), a telemetry socket (``/otel``) or a channel end (handed over entirely to
    the channel manager's protocol logic).
    """

    _log = Logger()
    _worker = None
    _role = None
    _channel_end = None
    _session = None
    _gate = None
    _counted_host = None
    peer_address = None
    user_agent = None
    # Largest frame the peer accepts (peer_limits.PeerFrameLimits), or None for no
    # limit; learned from the User-Agent here and from engine::workers::register.
    max_frame_size = None
    # (code, reason, was_clean) once the connection has closed, for the engine's log.
    close_info = None

    @property
    def clock(self):
        return self.factory.reactor

    # True while the peer does not read what it was sent (set by its L{SendGate}); a
    # plain attribute, read for every call forwarded to a worker.
    congested = False

    def onConnect(self, request):
        authenticator = self.factory.authenticator
        if authenticator is None:
            return self._accept(request)
        # Authenticate first: an unauthenticated client learns nothing, not even
        # whether a channel exists.
        self.peer_address = getattr(self.transport.getPeer(), "host", None)
        headers = headers_of(request)
        if request.path.startswith(CHANNELS_PREFIX) and "authorization" not in headers \
                and "token" not in request.params:
            return self._accept(request)
        d = authenticator.authenticate(headers, request.params, self.peer_address,
                                       request.path)

        def authenticated(session):
            self._session = session
            return self._accept(request)

        def refused(failure):
            failure.trap(AuthRefused)
            raise ConnectionDeny(401, "Unauthorized")
        return d.addCallbacks(authenticated, refused)

    def _accept(self, request):
        try:
            path = request.path
            health = self.factory.engine.health
            if path == WORKER_PATH and health is not None and health.state == "draining":
                # No new workers while shutting down; channel ends (the calls in
                # flight may need them) are still accepted.
                raise ConnectionDeny(503, "engine shutting down")
            if path == WORKER_PATH:
                self._role = "worker"
            elif path == OTEL_PATH:
                self._role = "otel"
            elif path.startswith(CHANNELS_PREFIX) and self.factory.channels is not None:
                # Raises ConnectionDeny (404/400) for an unknown channel or a bad key.
                self._channel_end = self.factory.channels.accept(
                    path[len(CHANNELS_PREFIX):], request.params, self)
                self._role = "channel"
            else:
                raise ConnectionDeny(404, "Not Found")
            self.peer_address = getattr(self.transport.getPeer(), "host", None)
            if self._role in ("worker", "channel"):
                self.user_agent = request.headers.get("user-agent")
                limits = self.factory.frame_limits
                # A channel end never says its runtime: only a known library limits it.
                self.max_frame_size = limits.for_user_agent(self.user_agent) \
                    if self._role == "worker" else limits.for_channel(self.user_agent)
        except ConnectionDeny:
            raise
        except Exception:
            self._log.failure("error accepting a connection to {path}", path=request.path)
            raise ConnectionDeny(500, "Internal Server Error")
        return None

    def onOpen(self):
        try:
            if self._role == "worker":
                # Before attach, whose workerregistered is the first frame counted.
                self._gate = SendGate(self, self.factory.engine.limits, self.clock)
                self.transport.registerProducer(self._gate, True)
                self._worker = self.factory.engine.attach(self, self._session)
            elif self._role == "channel":
                self._channel_end.opened()
        except Exception:
            self._log.failure("error opening a {role} connection", role=self._role)
            self.sendClose(1011)

    def onMessage(self, payload, isBinary):
        if self.frame_bytes:
            self.large_message_done()
        if self._role == "channel":
            self._channel_end.frame(payload, isBinary)
            return
        if isBinary and payload[:4] in P.TELEMETRY_PREFIXES:
            self.factory.engine.ingest_telemetry(
                payload[:4].decode("ascii"), payload[4:],
                self._worker.id if self._worker else None)
            return
        worker = self._worker
        if worker is None:  # the /otel socket: telemetry only
            self._log.debug("dropped a non-telemetry frame on {path}", path=OTEL_PATH)
            return
        if len(payload) > self.factory.max_message_size:
            self._drop_oversized(payload)
            return
        try:
            message = P.decode(payload)
        except P.ProtocolError as e:
            self._drop_invalid(e)
            return
        try:
            self.factory.engine.handle_message(worker, message)
        except Exception:
            self._log.failure("error handling a {type} message from worker {worker_id}",
                              type=message.get("type"), worker_id=worker.id)

    def connectionLost(self, reason):
        WebSocketServerProtocol.connectionLost(self, reason)
        release_receive_buffers(self)
        self.release_large_frames()
        self.cancel_read_holds()
        if self._gate is not None:
            self._gate.stopProducing()
        self.factory.addresses.release(self._counted_host)
        self._counted_host = None

    def onOpenHandshakeTimeout(self):
        if self.state == self.STATE_CONNECTING:
            self.factory.engine.limits.count("handshakes_timed_out")
        WebSocketServerProtocol.onOpenHandshakeTimeout(self)

    def onClose(self, wasClean, code, reason):
        if code is None:
            # No close frame (the TCP connection dropped, or a ping went unanswered):
            # Autobahn says why in wasNotCleanReason.
            code, reason = 1006, getattr(self, "wasNotCleanReason", None) or reason
        self.close_info = (code, reason, wasClean)
        try:
            if self._worker is not None:
                worker, self._worker = self._worker, None
                self.factory.engine.detach(worker)
            elif self._channel_end is not None:
                self._channel_end.closed()
        except Exception:
            self._log.failure("error cleaning up after a {role} connection", role=self._role)

    # -- IWorkerConnection -----------------------------------------------------------

    def send(self, message):
        if self.state != self.STATE_OPEN:
            return True
        try:
            payload = P.encode(message)
        except (TypeError, ValueError, RecursionError):
            self._log.failure("dropped an unencodable {type} message", type=message.get("type"))
            return False
        limit = self.max_frame_size
        if limit is not None and len(payload) > limit:
            # The peer would close the connection (1009) and every call on it would die.
            who = describe_worker(self._worker) if self._worker else "the peer"
            self._log.warn("not sent to {who}: a {type} message of {size} bytes, over "
                           "the {limit} bytes it accepts", who=who,
                           type=message.get("type"), size=len(payload), limit=limit)
            return too_large(len(payload), limit, who)
        self.sendMessage(payload, False)
        gate = self._gate
        if gate is not None and gate.paused:
            gate.sent(len(payload))
        return True

    def disconnect(self, code=1000, reason=None):
        """Close with C{code} and C{reason} (L{send_close}: 1001 at shutdown too)."""
        send_close(self, code, reason)

    def drop_slow_peer(self, reason):
        """Called by the L{SendGate}: the peer does not read; drop the connection."""
        self._log.warn("dropped {role} {worker_id} at {peer}: it does not read: {reason}",
                       role=self._role, peer=self.peer, reason=reason,
                       worker_id=self._worker.id if self._worker else "")
        self.dropConnection(abort=True)

    # -- bad input -------------------------------------------------------------------

    def _drop_invalid(self, error):
        message = error.message
        worker_id = self._worker.id
        self._log.warn("dropped a message from worker {worker_id}: {reason}",
                       worker_id=worker_id, reason=error.reason)
        if message is not None and message.get("type") == P.INVOKE_FUNCTION:
            invocation_id = message.get("invocation_id")
            if isinstance(invocation_id, str):
                self._answer_error(invocation_id, message.get("function_id"),
                                   P.INVALID_MESSAGE, error.reason)

    def _drop_oversized(self, payload):
        limit = self.factory.max_message_size
        self._log.warn(
            "dropped a {size}-byte message from worker {worker_id}: over the "
            "{limit}-byte max_message_size", size=len(payload), limit=limit,
            worker_id=self._worker.id)
        # The ids are looked for at both ends: v0.10 SDKs write them before ``data``,
        # py 0.25 after it (its ``type`` comes last).
        head, tail = payload[:4096], payload[-4096:]
        if b'"invokefunction"' in head or b'"invokefunction"' in tail:
            invocation_id = _INVOCATION_ID.search(head) or _last_match(_INVOCATION_ID, tail)
            if invocation_id:
                function_id = _FUNCTION_ID.search(head) or _last_match(_FUNCTION_ID, tail)
                self._answer_error(
                    invocation_id.group(1).decode("utf-8", "replace"),
                    function_id.group(1).decode("utf-8", "replace") if function_id else None,
                    P.MESSAGE_TOO_LARGE,
                    "Message of {} bytes is over the engine's max_message_size of {} "
                    "bytes".format(len(payload), limit),
                )

    def _answer_error(self, invocation_id, function_id, code, message):
        self.send({
            "type": P.INVOCATION_RESULT,
            "invocation_id": invocation_id,
            "function_id": function_id if isinstance(function_id, str) else "",
            "error": P.error_body(code, message),
        })


def _last_match(pattern, text):
    match = None
    for match in pattern.finditer(text):
        pass
    return match


class _ClockTimer:
    """The part of txaio's batched timer Autobahn uses, on a given C{IReactorTime}."""

    def __init__(self, clock):
        self._clock = clock

    def call_later(self, delay, function, *args, **kwargs):
        return self._clock.callLater(delay, function, *args, **kwargs)


class WorkerFactory(WebSocketServerFactory):
    """
    Builds L{WorkerProtocol}s for one engine, with the Autobahn options set on purpose.

    @ivar engine: the L{iii_twisted.engine.Engine}.
    @ivar channels: the channel manager (see L{iii_twisted.channels}) or None.
    @ivar max_message_size: frames larger than this (bytes) are dropped.
    """

    protocol = WorkerProtocol

    def __init__(self, engine, reactor, max_message_size=16 * 1024 * 1024,
                 ping_interval=30.0, ping_timeout=30.0, channels=None, frame_limits=None,
                 handshake_timeout=10.0, authenticator=None):
        """
        @param frame_limits: the L{PeerFrameLimits} of workers (the defaults when None).
        @param handshake_timeout: seconds a client has to finish its opening
            handshake (headers included) before it is dropped.
        @param authenticator: the listener's L{iii_twisted.auth.Authenticator}, or
            None for a listener without auth (every connection has every grant).
        @param ping_interval: seconds between WebSocket pings the engine sends to detect
            dead peers (0 disables them). The SDKs answer pings automatically.
        @param ping_timeout: seconds a peer has to answer a ping before it is dropped.
        """
        WebSocketServerFactory.__init__(
            self, url=None, reactor=reactor, server="iii-twisted/{}".format(__version__))
        self.engine = engine
        self.channels = channels
        self.authenticator = authenticator
        self.max_message_size = max_message_size
        # Large frames being received at once, over all connections of this port.
        self.frame_budget = FrameBudget(engine.limits)
        self.addresses = AddressCounter(engine.limits, "worker")
        self.frame_limits = frame_limits if frame_limits is not None else PeerFrameLimits()
        engine.frame_limits = self.frame_limits  # for engine::workers::register
        # Autobahn schedules its handshake, close and ping timers through this object
        # on txaio's global loop (txaio refuses any other reactor); route them to ours,
        # so an injected clock drives them.
        self._batched_timer = _ClockTimer(reactor)
        self.setProtocolOptions(
            # Hard bound on one message's memory; the soft limit above drops politely.
            maxMessagePayloadSize=4 * max_message_size,
            maxFramePayloadSize=4 * max_message_size,
            webStatus=False,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            # Also the header timeout: a client sending its handshake a byte a second
            # is dropped when it runs out (handshake_timeout_ms).
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=5,
            # Fail a connection with a close frame that says why (1009 for a message
            # past the hard limit), not by dropping TCP.
            failByDrop=False,
            # json.loads validates UTF-8 itself; don't do it twice per frame.
            utf8validateIncoming=False,
            # The Python SDK offers permessage-deflate; compressing every small frame
            # costs more CPU than it saves on loopback and LAN.
            perMessageCompressionAccept=lambda offers: None,
        )

    def buildProtocol(self, addr):
        # Connections per client address (limits.max_connections_per_address): None
        # makes Twisted close the new socket at once.
        host = self.addresses.admit(addr)
        if host is False:
            return None
        protocol = WebSocketServerFactory.buildProtocol(self, addr)
        protocol._counted_host = host
        return protocol


def send_close(protocol, code=1000, reason=None):
    """
    Close an open Autobahn server C{protocol} with C{code} (an int) and C{reason}
    (text); nothing when it is not open. Autobahn's C{sendClose} takes only 1000 and
    3000-4999 (the codes an application picks) and raises for others; the protocol
    codes a server sends itself (1001 going away at shutdown, 1008, 1009, ...) go
    through its close-frame method, as its own protocol violations do. Used by the
    worker and stream sockets.
    """
    if protocol.state != protocol.STATE_OPEN:
        return
    if code == 1000 or 3000 <= code <= 4999:
        protocol.sendClose(code, reason)
    else:
        reason_utf8 = reason.encode("utf-8")[:123] if reason else None
        protocol.sendCloseFrame(code=code, reasonUtf8=reason_utf8, isReply=False)
