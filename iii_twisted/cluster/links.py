"""
The links between cluster members: the worker protocol over a WebSocket, one link each
way between two members.

The link member A opens to member B (L{PeerLink}, a L{WorkerClientProtocol}) acts on
B like a worker hosting A's *local* functions: over it A sends

- ``registerfunction`` / ``unregisterfunction`` for each function a worker connected
  to A hosts (not A's in-process functions: every member has its own modules; not the
  functions other members offer A: a call crosses at most one link, so there are no
  loops and no forwarding chains);
- ``registertrigger`` / ``unregistertrigger`` for its workers' triggers of the types
  in ``cluster.trigger_types`` (HTTP routes, state and stream triggers: events that
  arise on one member), so every member serves them;
- ``clusterview`` (a frame of ours): ``{"type": "clusterview", "workers": [WorkerInfo
  rows], "triggers": [TriggerInfo rows]}``, A's own workers and triggers, shown by B's
  discovery as A's;

kept in sync as A's workers come and go (L{iii_twisted.engine.Engine.registry_watchers}).
B (L{LinkServerProtocol}, a L{WorkerProtocol}) treats the link as one more worker:
its functions join B's registry as hosts ranked after B's own (L{iii_twisted.replicas}),
and B invokes them with ``invokefunction``; A runs each on one of its local hosts
(L{Offer.run_local}) and answers ``invocationresult``, errors, ``traceparent`` and
``baggage`` passed unchanged. B's invocation tracking, timeouts and detach apply:
when the link closes, everything offered over it leaves B's registry at once and the
calls waiting on it fail with ``invocation_stopped``.

Authentication: the dialing member presents ``Authorization: Bearer <cluster
secret>`` and ``X-III-Engine-Id``/``X-III-Engine-Name`` on the upgrade to
L{LINK_PATH}; a wrong or missing secret is answered ``401`` before the upgrade (the
secret compared with C{hmac.compare_digest}), so such a link never becomes a peer.
"""

import hmac

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import fail
from twisted.logger import Logger
from zope.interface import implementer

from .. import protocol as P
from ..interfaces import IWorkerClientHandler
from ..namespaces import SEP
from ..protocol import InvocationError
from ..replicas import is_peer
from ..worker import WorkerFactory, WorkerProtocol
from .client import WorkerClientFactory, connect

LINK_PATH = "/iii/cluster/link"
CLUSTER_VIEW = "clusterview"
ENGINE_ID_HEADER = "X-III-Engine-Id"
ENGINE_NAME_HEADER = "X-III-Engine-Name"

# Redial backoff, seconds: doubled after each failure, reset once a link opens.
REDIAL_MIN = 0.1
REDIAL_MAX = 2.0


class PeerView:
    """
    What a member has told us about itself over its link: its identity, and the rows
    of its workers and triggers for our discovery.

    @ivar worker_of: function id -> (id, name) of the member's worker hosting it.
    """

    __slots__ = ("engine_id", "name", "workers", "triggers", "worker_of")

    def __init__(self, engine_id, name):
        self.engine_id = engine_id
        self.name = name
        self.workers = []
        self.triggers = []
        self.worker_of = {}

    def update(self, message):
        """
        Take a ``clusterview`` frame.

        @raise ValueError: when it is not of that shape (nothing is kept then).
        """
        workers, triggers = message.get("workers"), message.get("triggers")
        if not (isinstance(workers, list) and all(isinstance(w, dict) for w in workers)
                and isinstance(triggers, list)
                and all(isinstance(t, dict) for t in triggers)):
            raise ValueError("clusterview needs lists of objects in workers and triggers")
        worker_of = {}
        for row in workers:
            functions = row.get("functions")
            name = row.get("name") if isinstance(row.get("name"), str) else row.get("id")
            if isinstance(functions, list):
                for function_id in functions:
                    if isinstance(function_id, str):
                        worker_of[function_id] = (row.get("id"), name)
        self.workers, self.triggers, self.worker_of = workers, triggers, worker_of


class LinkServerProtocol(WorkerProtocol):
    """
    The accepting end of a link: a worker connection whose worker is another member
    (L{cluster_peer} says which). Only L{LINK_PATH} with the cluster secret is
    accepted.
    """

    _log = Logger()
    # The L{PeerView} of the member at the other end (None until authenticated).
    cluster_peer = None

    def onConnect(self, request):
        try:
            cluster = self.factory.cluster
            self.peer_address = getattr(self.transport.getPeer(), "host", None)
            if request.path != LINK_PATH:
                raise ConnectionDeny(404, "Not Found")
            presented = request.headers.get("authorization", "")
            presented = presented[7:] if presented[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(presented.encode("utf-8"),
                                       cluster.secret.encode("utf-8")):
                cluster.refused_links += 1
                self._log.warn("refused a cluster link from {ip} (says it is member "
                               "{name!r}): wrong or missing secret", ip=self.peer_address,
                               name=request.headers.get(ENGINE_NAME_HEADER.lower()))
                raise ConnectionDeny(401, "Unauthorized")
            engine_id = request.headers.get(ENGINE_ID_HEADER.lower())
            if not engine_id or engine_id == cluster.engine_id:
                raise ConnectionDeny(400, "a cluster link says its engine id")
            name = request.headers.get(ENGINE_NAME_HEADER.lower()) or engine_id
            self.cluster_peer = PeerView(engine_id, name)
            self._role = "worker"
            self.user_agent = request.headers.get("user-agent")
        except ConnectionDeny:
            raise
        except Exception:
            self._log.failure("error accepting a cluster link")
            raise ConnectionDeny(500, "Internal Server Error")
        return None

    def onOpen(self):
        WorkerProtocol.onOpen(self)
        worker = self._worker
        if worker is None:
            return
        peer = self.cluster_peer
        worker.name = "{} (cluster link)".format(peer.name)
        worker.runtime = "iii-engine"
        self.factory.cluster.peer_linked(self)

    def onClose(self, wasClean, code, reason):
        WorkerProtocol.onClose(self, wasClean, code, reason)
        if self.cluster_peer is not None:
            self.factory.cluster.peer_unlinked(self)

    def _drop_invalid(self, error):
        # The frames of ours are not worker-protocol messages: decode refuses them,
        # and they are taken here, off the path of every other frame.
        message = error.message
        if message is not None and message.get("type") == CLUSTER_VIEW:
            try:
                self.cluster_peer.update(message)
            except ValueError as e:
                self._log.warn("dropped a clusterview from {peer}: {reason}",
                               peer=self.cluster_peer.name, reason=str(e))
            return
        WorkerProtocol._drop_invalid(self, error)


class _LinkEngine:
    """
    The engine as the link listener's connections see it: the trigger registrations
    a member offers go to the cluster (L{iii_twisted.cluster.triggers}), which puts
    one copy of each in force; every other message and attribute is the engine's.
    """

    def __init__(self, engine, cluster):
        self._engine = engine
        self._cluster = cluster

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def handle_message(self, worker, message):
        kind = message["type"]
        if kind == P.REGISTER_TRIGGER or kind == P.UNREGISTER_TRIGGER:
            self._cluster.trigger_offered(worker, message)
        else:
            self._engine.handle_message(worker, message)


class LinkServerFactory(WorkerFactory):
    """The link listener's factory: L{LinkServerProtocol}s of one cluster member."""

    protocol = LinkServerProtocol

    def __init__(self, engine, reactor, cluster, max_message_size=16 * 1024 * 1024,
                 ping_interval=1.0, ping_timeout=3.0):
        # (The frame limits WorkerFactory sets land on the proxy: the engine keeps
        # the worker port's.)
        WorkerFactory.__init__(self, _LinkEngine(engine, cluster), reactor,
                               max_message_size=max_message_size,
                               ping_interval=ping_interval, ping_timeout=ping_timeout)
        self.cluster = cluster


class Offer:
    """
    What this member offers the others (its workers' functions, the triggers of the
    shared types, the rows of its view), computed once per registry change and sent
    to each peer as a difference; and how a peer's call runs here.
    """

    def __init__(self, engine, trigger_types):
        self.engine = engine
        self.trigger_types = trigger_types
        self._current = None

    def changed(self):
        self._current = None

    def current(self):
        """@return: C{(functions, triggers, view)}: id -> message dicts, and a frame."""
        if self._current is None:
            self._current = self._compute()
        return self._current

    def _compute(self):
        engine = self.engine
        sets = engine.replicas.sets
        functions = {}
        for function_id, entry in engine.functions.items():
            if SEP in function_id:
                continue  # a named namespace's: not offered (docs/cluster.rst)
            if function_id in sets:
                local = [e for e in sets[function_id].entries
                         if e.owner is not None and not is_peer(e.owner)]
                entry = local[-1] if local else None
            elif entry.owner is None or is_peer(entry.owner):
                entry = None
            if entry is None:
                continue
            message = {"type": P.REGISTER_FUNCTION, "id": function_id}
            for key in ("description", "request_format", "response_format", "metadata"):
                value = getattr(entry, key)
                if value is not None:
                    message[key] = value
            functions[function_id] = message
        triggers, trigger_rows = {}, []
        for trigger in engine.triggers.values():
            owner = trigger.owner
            if owner is None or is_peer(owner) or SEP in trigger.function_id:
                continue
            trigger_rows.append(trigger.info())
            if trigger.trigger_type not in self.trigger_types:
                continue
            message = {"type": P.REGISTER_TRIGGER, "id": trigger.id,
                       "trigger_type": trigger.trigger_type,
                       "function_id": trigger.function_id, "config": trigger.config}
            if trigger.metadata is not None:
                message["metadata"] = trigger.metadata
            triggers[trigger.id] = message
        view = {"type": CLUSTER_VIEW, "workers": self._worker_rows(),
                "triggers": trigger_rows}
        return functions, triggers, view

    def _worker_rows(self):
        from ..discovery import _worker_info
        from ..discovery_current import worker_row

        rows = []
        for worker in self.engine.workers.values():
            if is_peer(worker):
                continue
            row = worker_row(self.engine, worker, _worker_info(self.engine, worker))
            row["latest_metrics"] = None  # per engine (engine::workers::list there)
            rows.append(row)
        return rows

    def local_entry(self, function_id):
        """
        @return: the entry of a host of C{function_id} on this engine (a worker's or
            in-process; least loaded first among several), or None when only peers
            offer it (a call never crosses a second link).
        """
        engine = self.engine
        entry = engine.functions.get(function_id)
        if entry is None:
            return None
        if function_id in engine.replicas.sets:
            entry = engine.replicas.pick_local(function_id)
        return None if entry is None or (entry.owner is not None
                                         and is_peer(entry.owner)) else entry

    def run_local(self, message, engine_name):
        """
        Run a peer's ``invokefunction`` on a local host.

        @return: Deferred firing with the result, or failing with L{InvocationError}
            (``function_not_found`` when no local host has it any more).
        """
        function_id = message["function_id"]
        entry = self.local_entry(function_id)
        if entry is None:
            return fail(InvocationError(P.FUNCTION_NOT_FOUND, "Function {} not found on "
                                        "engine {}".format(function_id, engine_name)))
        return self.engine.invoke_entry(entry, function_id, message["data"],
                                        message["traceparent"], message["baggage"],
                                        message["metadata"])


@implementer(IWorkerClientHandler)
class PeerLink:
    """
    The link this member opens to one other member: dials it (again with backoff
    while the directory lists it), keeps what it offers there in sync, and runs the
    calls that come back over it.
    """

    _log = Logger()

    def __init__(self, cluster, member, reactor):
        self.cluster = cluster
        self.member = member
        self.reactor = reactor
        self.protocol = None
        self.stopped = False
        self._sent = ({}, {}, None)
        self._retry = None
        self._connecting = None
        self._delay = REDIAL_MIN
        # When this link last went down (or was created): None while it is open.
        self.down_since = reactor.seconds()

    def start(self):
        self._dial()

    def _dial(self):
        self._retry = None
        if self.stopped:
            return
        cluster = self.cluster
        factory = WorkerClientFactory(
            self, self.reactor, url="ws://iii-cluster" + LINK_PATH,
            headers={"Authorization": "Bearer " + cluster.secret,
                     ENGINE_ID_HEADER: cluster.engine_id,
                     ENGINE_NAME_HEADER: cluster.name},
            max_message_size=cluster.max_message_size,
            ping_interval=cluster.heartbeat, ping_timeout=cluster.member_ttl)
        try:
            d = connect(self.reactor, self.member.address, factory)
        except Exception as e:
            self._log.error("cannot link to member {name}: address {address!r}: "
                            "{error}", name=self.member.name,
                            address=self.member.address, error=str(e))
            return
        self._connecting = d
        d.addCallbacks(self._connected, self._not_connected)

    def _connected(self, protocol):
        self._connecting = None

    def _not_connected(self, failure):
        self._connecting = None
        if not self.stopped:
            self._log.info("link to member {name} at {address} not made: {error}",
                           name=self.member.name, address=self.member.address,
                           error=failure.getErrorMessage())
        self._again()

    def _again(self):
        if self.stopped or self._retry is not None:
            return
        self._retry = self.reactor.callLater(self._delay, self._dial)
        self._delay = min(self._delay * 2, REDIAL_MAX)

    def stop(self):
        """Stop dialing and close the link (the directory says the member left)."""
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self.protocol is not None:
            self.protocol.dropConnection(abort=True)

    # -- WorkerClientProtocol handler ---------------------------------------------------

    def opened(self, protocol):
        if self.stopped:
            protocol.dropConnection(abort=True)
            return
        self.protocol = protocol
        self.down_since = None
        self._delay = REDIAL_MIN
        self._sent = ({}, {}, None)
        self._log.info("linked to cluster member {name} ({engine_id}) at {address}",
                       name=self.member.name, engine_id=self.member.engine_id,
                       address=self.member.address)
        self.sync()

    def closed(self, protocol, code, reason):
        if protocol is self.protocol:
            self.protocol = None
            self.down_since = self.reactor.seconds()
            self._log.info("link to cluster member {name} closed ({code} {reason})",
                           name=self.member.name, code=code, reason=reason)
        elif not self.stopped:
            self._log.info("link to member {name} refused or failed: {reason}",
                           name=self.member.name, reason=reason or code)
        self._again()

    def invoke(self, protocol, message):
        return self.cluster.offer.run_local(message, self.cluster.name)

    def frame(self, protocol, message):
        kind = message.get("type")
        if kind == P.TRIGGER_REGISTRATION_RESULT and message.get("error"):
            self._log.warn("member {name} refused trigger {trigger_id}: {error}",
                           name=self.member.name, trigger_id=message.get("id"),
                           error=message.get("error"))
        elif kind not in (P.PONG, P.TRIGGER_REGISTRATION_RESULT):
            self._log.info("member {name} sent {type}: {message}", name=self.member.name,
                           type=kind, message=message)

    # -- keeping the peer in sync -------------------------------------------------------

    def sync(self):
        """Send the peer what changed in our offer since the last sync."""
        protocol = self.protocol
        if protocol is None:
            return
        functions, triggers, view = self.cluster.offer.current()
        sent_functions, sent_triggers, sent_view = self._sent
        send = protocol.send
        for trigger_id, message in sent_triggers.items():
            if trigger_id not in triggers:
                send({"type": P.UNREGISTER_TRIGGER, "id": trigger_id,
                      "trigger_type": message["trigger_type"]})
        for function_id in sent_functions:
            if function_id not in functions:
                send({"type": P.UNREGISTER_FUNCTION, "id": function_id})
        for function_id, message in functions.items():
            if sent_functions.get(function_id) != message:
                send(message)
        for trigger_id, message in triggers.items():
            if sent_triggers.get(trigger_id) != message:
                send(message)
        if view != sent_view:
            send(view)
        self._sent = (functions, triggers, view)
