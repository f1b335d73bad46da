"""
The routing core: the function, trigger and worker registries, and L{Engine.call}.

Everything that can be called is a L{FunctionEntry} whose C{host} knows how to run it
(a worker connection, a Python callable, an HTTP endpoint). Everything that can fire is
a L{Trigger} whose L{TriggerType} has a provider (a module, or a worker). The engine
never touches a socket: workers are L{IWorkerConnection}s, so the whole core runs in
tests with L{iii_twisted.testing.FakeWorkerConnection} and a C{task.Clock}.

The records the registries hold are in L{iii_twisted.registry}; the hosts of workers'
and in-process functions in L{iii_twisted.hosts}; several hosts of one id in
L{iii_twisted.replicas}; calls waiting for a worker's answer in
L{iii_twisted.invocations}.

Deviations from the reference engine (iii v0.10; ../shared/spec/engine-core.md) are
listed in docs/deviations.rst; each is marked "Deviation" where it is implemented.
"""

import hmac
import secrets
import time
from collections import deque
from uuid import uuid4

from twisted.internet.defer import fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import auth
from . import protocol as P
from .interfaces import TriggerError
from .hints import function_hint, module_for_trigger_type, trigger_type_hint
from .invocations import InvocationTracker
from .limits import LIMIT_EXCEEDED, Limits, check_stored
from .namespaces import Namespaces, plain
from .oplog import describe_agent, describe_close, describe_worker
from .protocol import InvocationError
from .replicas import SPREAD, Replicas
# The records and hosts live in their own modules; they are imported from here too.
from .hosts import (  # noqa: F401
    CallableHost, EngineEventsProvider, WorkerHost, WorkerTriggerProvider, not_sent_error)
from .registry import (  # noqa: F401
    ACTIVE, FAILED, PENDING, CallInfo, FunctionEntry, Trigger, TriggerType, WorkerRecord)

WORKERS_AVAILABLE = "engine::workers-available"
FUNCTIONS_AVAILABLE = "engine::functions-available"

VOID = {"type": "void"}


class Engine:
    """
    The iii engine core.

    @ivar functions: function id -> L{FunctionEntry}.
    @ivar workers: worker id -> L{WorkerRecord}.
    @ivar trigger_types: type id -> L{TriggerType}.
    @ivar triggers: trigger id -> L{Trigger}.
    @ivar tracker: the L{InvocationTracker} of calls forwarded to workers.
    @ivar enqueuer: the L{IEnqueuer} (queue module) or None.
    @ivar telemetry_sink: the L{ITelemetrySink} (observability module) or None.
    @ivar worker_metrics: the L{IWorkerMetricsSource} (observability module) or None.
    @ivar http_functions: the HTTP functions module (registers ``invocation``
        functions) or None.
    @ivar current_session: the L{iii_twisted.auth.Session} of the call running now.
    @ivar auth_stats: L{iii_twisted.auth.AuthStats} (refusals, for metrics).
    """

    _log = Logger()

    def __init__(self, clock, invocation_timeout=300.0, functions_available_delay=0.1,
                 function_replicas=SPREAD):
        """
        @param clock: the C{IReactorTime} for every timer of the core.
        @param invocation_timeout: seconds any call may stay unanswered before it fails
            with ``invocation_timeout`` (0 disables it). Deviation: the reference waits
            forever.
        @param functions_available_delay: seconds to gather registry changes before
            ``engine::functions-available`` fires (the reference polls every 5 s).
        @param function_replicas: ``spread`` (several workers may host one id; see
            L{iii_twisted.replicas}) or ``last_wins`` (the reference's takeover).
        """
        self.clock = clock
        self.invocation_timeout = invocation_timeout
        self.functions = {}
        self.workers = {}
        self.trigger_types = {}
        self.triggers = {}
        self._triggers_by_type = {}
        self.services = {}
        self._services_by_worker = {}  # worker id -> names it registered
        self.limits = Limits()  # EngineService sets the configured ones
        self.tracker = InvocationTracker(clock, invocation_timeout)
        # Ids hosted by several workers, and the router picking one per call.
        self.replicas = Replicas(self.tracker, function_replicas)
        self._replica_sets = self.replicas.sets
        # Invocation ids need not be unguessable: a result is accepted only from the
        # worker the call went to (InvocationTracker.resolve).
        self._invocation_ids = P.sequential_ids()
        self.enqueuer = None
        self.telemetry_sink = None
        self.worker_metrics = None
        self.http_functions = None
        # The session of the call running now, for in-process functions (see call()).
        self.current_session = None
        self.auth_stats = auth.AuthStats()
        # The peer_limits.PeerFrameLimits the worker port uses; engine::workers::register
        # tells it each worker's runtime.
        self.frame_limits = None
        # The health.Health the engine service keeps (liveness/readiness endpoints).
        self.health = None
        # Calls of ids no one provides (they never reach a call observer).
        self.unknown_calls = 0
        self._observers = []
        self._detach_hooks = []
        # Called (no arguments) whenever a worker, function or trigger comes or goes:
        # the cluster's links keep what they offer peers in sync (cluster/links.py).
        self.registry_watchers = []
        # The cluster membership (iii_twisted.cluster.wiring.Cluster) or None.
        self.cluster = None
        self._functions_available_delay = functions_available_delay
        self._functions_check = None
        self._last_function_ids = frozenset()
        # The latest triggers a provider refused, with why (engine::triggers::list
        # with include_refused; the console's triggers page).
        self.refused_triggers = deque(maxlen=100)
        self.namespaces = Namespaces(self)
        self._handlers = {
            P.INVOKE_FUNCTION: self._handle_invokefunction,
            P.INVOCATION_RESULT: self._handle_invocationresult,
            P.REGISTER_FUNCTION: self._handle_registerfunction,
            P.UNREGISTER_FUNCTION: self._handle_unregisterfunction,
            P.REGISTER_TRIGGER_TYPE: self._handle_registertriggertype,
            P.UNREGISTER_TRIGGER_TYPE: self._handle_unregistertriggertype,
            P.REGISTER_TRIGGER: self._handle_registertrigger,
            P.UNREGISTER_TRIGGER: self._handle_unregistertrigger,
            P.TRIGGER_REGISTRATION_RESULT: self._handle_triggerregistrationresult,
            P.REGISTER_SERVICE: self._handle_registerservice,
            P.REATTACH: self._handle_reattach,
            P.PING: self._handle_ping,
            P.PONG: _ignore,
            P.WORKER_REGISTERED: _ignore,
        }
        events = EngineEventsProvider()
        self.register_trigger_type(
            WORKERS_AVAILABLE, events, "Fires when a worker connects, updates its "
            "metadata or disconnects")
        self.register_trigger_type(
            FUNCTIONS_AVAILABLE, events, "Fires when the set of registered functions "
            "changes")
        from .discovery import register_engine_functions
        register_engine_functions(self)

    # -- workers ---------------------------------------------------------------------

    def attach(self, connection, session=None):
        """
        A worker connected: give it an id, send ``workerregistered`` (with the
        ``reattach_token`` newer SDKs present after a reconnect, see
        L{_handle_reattach}; older SDKs ignore it) and fire
        ``engine::workers-available``.

        @param connection: its L{IWorkerConnection}.
        @param session: its L{iii_twisted.auth.Session}, or None for every grant.
        @return: its L{WorkerRecord}, which the connection passes back to
            L{handle_message} and L{detach}.
        """
        worker = WorkerRecord(
            str(uuid4()), connection, connection.peer_address,
            int(time.time() * 1000),
        )
        worker.host = WorkerHost(self.tracker, worker, self.limits)
        worker.session = session
        self.workers[worker.id] = worker
        worker.reattach_token = secrets.token_urlsafe(24)
        connection.send({"type": P.WORKER_REGISTERED, "worker_id": worker.id,
                         "reattach_token": worker.reattach_token,
                         "features": list(P.ENGINE_FEATURES)})
        self._log.info("worker {worker_id} connected from {ip}{agent}",
                       worker_id=worker.id, ip=worker.ip_address,
                       agent=describe_agent(connection))
        self.fire_triggers(WORKERS_AVAILABLE,
                           {"event": "worker_connected", "worker_id": worker.id})
        if self.registry_watchers:
            self.registry_changed()
        return worker

    def detach(self, worker):
        """
        A worker's connection is gone: remove what it owns and fail what it owed.

        In order: the functions it still hosts go (a function another worker has
        re-registered since stays); the calls it was running fail with
        ``invocation_stopped``; its triggers are unregistered from their providers; the
        trigger types it provided go, and triggers that others bound to them wait,
        pending, for the next provider; then ``engine::workers-available`` fires.
        Calling it twice is harmless.
        """
        if self.workers.pop(worker.id, None) is None:
            return
        for function_id in list(worker.functions):
            self.unregister_function(function_id, owner=worker)
        failed_calls = self.tracker.count_for(worker)
        self.tracker.detach(worker)
        self.namespaces.detach(worker)
        for trigger_id in list(worker.triggers):
            self.unregister_trigger(trigger_id, owner=worker)
        for type_id in list(worker.trigger_types):
            self.unregister_trigger_type(type_id, owner=worker)
        self._forget_services(worker)
        for hook in self._detach_hooks:
            try:
                hook(worker)
            except Exception:
                self._log.failure("detach hook {hook!r} failed", hook=hook)
        self._log.info("{worker} disconnected: {close}; {calls} calls in flight "
                       "failed", worker=describe_worker(worker),
                       close=describe_close(getattr(worker.connection, "close_info", None)),
                       calls=failed_calls, worker_id=worker.id)
        self.fire_triggers(WORKERS_AVAILABLE,
                           {"event": "worker_disconnected", "worker_id": worker.id})
        if self.registry_watchers:
            self.registry_changed()

    def registry_changed(self):
        """Tell the L{registry_watchers} that workers, functions or triggers changed."""
        for watcher in list(self.registry_watchers):
            try:
                watcher()
            except Exception:
                self._log.failure("registry watcher {watcher!r} failed", watcher=watcher)

    def add_detach_hook(self, hook):
        """Call C{hook(worker_record)} whenever a worker is detached (after cleanup)."""
        self._detach_hooks.append(hook)

    def handle_message(self, worker, message):
        """
        Act on one decoded message (L{iii_twisted.protocol.decode}) from C{worker}.

        Runs synchronously up to the point where a call is handed to its host, so the
        messages of one connection take effect in the order they arrived. While a
        registration hook of the worker's session decides (L{iii_twisted.auth}), its
        later messages wait, in order.
        """
        if worker.held is not None:
            worker.held.append(message)
            return
        self._handlers[message["type"]](worker, message)

    def ingest_telemetry(self, kind, payload, worker_id):
        """
        Hand one telemetry frame's body to the observability sink, or drop it when no
        sink is loaded.
        """
        sink = self.telemetry_sink
        if sink is not None:
            sink.ingest(kind, payload, worker_id)

    # -- functions -------------------------------------------------------------------

    def register_function(self, function_id, fn, description=None, request_format=None,
                          response_format=None, metadata=None):
        """
        Register an in-process function that workers (and the app) can call.

        @param fn: a callable taking the call's data (any JSON value) and returning a
            JSON value, a Deferred or a coroutine of one. Raise
            L{iii_twisted.protocol.InvocationError} to fail with a given code.
        @return: the L{FunctionEntry}.
        """
        return self.add_function(FunctionEntry(
            function_id, CallableHost(fn), None, description, request_format,
            response_format, metadata,
        ))

    def add_function(self, entry):
        """
        Put C{entry} in the registry. Where another live worker hosts the id, a
        worker's entry joins it as a replica (L{iii_twisted.replicas}; the entry becomes
        the primary one discovery shows); with ``function_replicas: last_wins``, or
        for an in-process entry, it replaces the function (the reference's takeover).

        Deviation: a worker may not replace an in-process function (``engine::*`` and
        the modules' functions), nor, with auth, a function of another principal
        (L{iii_twisted.auth.may_take_over}); such a registration is refused with a
        warning, and the worker told with ``registrationrejected``
        (``FUNCTION_NAMESPACE_CONFLICT``, which SDKs take as non-fatal).

        @return: the entry, or None if it was refused.
        """
        function_id = entry.function_id
        previous = self.functions.get(function_id)
        if previous is not None:
            if auth.refuse_takeover(self, entry.owner, previous.owner, "function",
                                    function_id):
                auth.tell_function_taken(self, entry.owner, function_id, previous.owner)
                return None
            if previous.owner is entry.owner:
                self.replicas.replaced(entry)
            elif not self.replicas.join(previous, entry):
                for gone in self.replicas.drop(function_id) or [previous]:
                    if gone.owner is not None and gone.owner is not entry.owner:
                        gone.owner.functions.discard(function_id)
                if previous.owner is not None:
                    self._log.warn(
                        "function {function_id} of worker {old} replaced by worker {new}",
                        function_id=function_id, old=previous.owner.id,
                        new=entry.owner.id if entry.owner else "engine")
        self.functions[function_id] = entry
        if entry.owner is not None:
            entry.owner.functions.add(function_id)
        self._service_add(function_id)
        self._functions_changed()
        return entry

    def unregister_function(self, function_id, owner=None):
        """
        Remove a function.

        @param owner: the worker asking, or None for in-process code. A worker removes
            only a function it hosts (deviation: the reference removes any); where
            other workers host it too, only its own replica goes and the id stays.
        @return: the removed L{FunctionEntry}, or None.
        """
        entry = self.functions.get(function_id)
        if entry is None:
            return None
        if owner is not None and function_id in self._replica_sets:
            return self.drop_host(function_id, owner)
        if owner is not None and entry.owner is not owner:
            return None
        del self.functions[function_id]
        for gone in self.replicas.drop(function_id):  # in-process code removes them all
            if gone.owner is not None:
                gone.owner.functions.discard(function_id)
        if entry.owner is not None:
            entry.owner.functions.discard(function_id)
        closer = getattr(entry.host, "unregistered", None)
        if closer is not None:
            closer(function_id)
        self._service_remove(function_id)
        self._functions_changed()
        return entry

    def host_entry(self, function_id, worker):
        """@return: C{worker}'s own entry for C{function_id} (a replica's), or None."""
        entry = self.replicas.entry_of(function_id, worker)
        if entry is None:
            entry = self.functions.get(function_id)
        return entry if entry is not None and entry.owner is worker else None

    def drop_host(self, function_id, worker):
        """
        Take C{worker}'s replica of a function several workers host out of the
        registry; the id stays with the others (no other effect: no
        ``engine::functions-available``, the id set is unchanged).

        @return: the removed entry, or None when C{worker} is not one of its hosts.
        """
        left = self.replicas.leave(function_id, worker)
        if left is None:
            return None
        removed, primary = left
        self.functions[function_id] = primary
        worker.functions.discard(function_id)
        if self.registry_watchers:
            self.registry_changed()
        return removed

    # -- calls -----------------------------------------------------------------------

    def call(self, function_id, data=None, action=None, caller=None, traceparent=None,
             baggage=None, metadata=None, session=None):
        """
        Call a function by id: the one way every call is made, and where a session's
        grants are checked (L{iii_twisted.auth.gate_call}).

        @param action: None (request/response), ``{"type": "void"}`` (fire and forget)
            or ``{"type": "enqueue", "queue": NAME}``.
        @param caller: the calling L{WorkerRecord}, or None for the engine and its
            modules.
        @param session: the caller's L{iii_twisted.auth.Session} when it is not a
            worker (a console, an HTTP client); a worker's is its own. None with no
            caller: the engine's own calls, with every grant. While an in-process
            function runs (up to its first wait), L{current_session} is this session,
            so discovery can answer only what the caller may call.
        @param metadata: invocation metadata (any JSON value) sent to a worker-hosted
            function beside C{data} (reference 0.21.3; a fired trigger passes its
            C{metadata}), or None.
        @return: a Deferred firing with the result (None at once for ``void``;
            ``{"messageReceiptId": ...}`` for ``enqueue``) or failing with
            L{InvocationError}: ``function_not_found`` at once for an unknown id,
            ``invocation_timeout``, ``invocation_stopped``, ``enqueue_error``,
            ``FORBIDDEN`` outside the session's grants, or the function's own error.
        """
        if session is None and caller is not None:
            session = caller.session
        if session is not None and session.restricted:
            gated = auth.gate_call(self, session, function_id, data, action)
            if gated is not None:
                return gated
        previous, self.current_session = self.current_session, session
        try:
            return self._call(function_id, data, action, caller, traceparent, baggage,
                              metadata)
        finally:
            self.current_session = previous

    def _call(self, function_id, data, action, caller, traceparent, baggage, metadata):
        if action is not None:
            kind = action.get("type")
            if kind == "void":
                self._invoke(function_id, data, None, traceparent, baggage,
                             metadata).addErrback(
                    self._log_void_failure, function_id)
                return succeed(None)
            if kind == "enqueue":
                return self._enqueue(function_id, data, action, traceparent, baggage)
            return fail(InvocationError(
                P.INVALID_MESSAGE, "Unknown action type {!r}".format(kind)))
        return self._invoke(function_id, data, caller, traceparent, baggage, metadata)

    def invoke_entry(self, entry, function_id, data, traceparent=None, baggage=None,
                     metadata=None):
        """
        Run one call on the host of C{entry}, chosen by the caller (a cluster link
        running a peer's call on a local host only), with the call observers and the
        timeout, as every call.

        @return: Deferred firing with the result or failing with L{InvocationError}.
        """
        return self._invoke(function_id, data, None, traceparent, baggage, metadata, entry)

    def _invoke(self, function_id, data, caller, traceparent, baggage, metadata=None,
                entry=None):
        if entry is None:
            entry = self.functions.get(function_id)
            if entry is None:
                self.unknown_calls += 1  # iii_invocations_not_found_total
                return fail(self._not_found(function_id))
            if function_id in self._replica_sets:
                entry = self.replicas.pick(function_id)  # several workers host it
        invocation_id = next(self._invocation_ids)
        finish = None
        if self._observers:
            finish, traceparent, baggage = self._observe(
                function_id, invocation_id, caller, traceparent, baggage)
        if metadata is None:
            d = entry.host.invoke(function_id, invocation_id, data, traceparent, baggage)
        else:
            d = entry.host.invoke(function_id, invocation_id, data, traceparent, baggage,
                                  metadata)
        if not d.called and not isinstance(entry.host, WorkerHost) and self.invocation_timeout:
            # Worker calls time out in the tracker; anything else here.
            d.addTimeout(self.invocation_timeout, self.clock, self._timed_out(function_id))
        if caller is not None:
            caller.active_calls += 1
            d.addBoth(_count_down, caller)
        if finish is not None:
            d.addBoth(_report_finish, finish)
        return d

    def _not_found(self, function_id):
        # Says why, when the id is an HTTP function whose registration was refused.
        refusal = self.http_functions.refusal(function_id) \
            if self.http_functions is not None else None
        refusal = refusal or self.limits.refusal(function_id)
        if refusal is None:
            error = self.namespaces.not_found(function_id)
            # "publish" with no pub/sub module: say which module to add (hints.py).
            hint = function_hint(plain(function_id))
            if hint and error.message.endswith(" not found"):
                return InvocationError(error.code, error.message + hint)
            return error
        return InvocationError(P.FUNCTION_NOT_FOUND, "Function {} not found ({})".format(
            function_id, refusal))

    def _timed_out(self, function_id):
        timeout = self.invocation_timeout

        def on_timeout(result, seconds):
            raise InvocationError(
                P.INVOCATION_TIMEOUT,
                "Invocation of {} timed out after {}ms".format(function_id, int(timeout * 1000)),
            )
        return on_timeout

    def _enqueue(self, function_id, data, action, traceparent, baggage):
        queue = action.get("queue")
        if self.enqueuer is None:
            return fail(InvocationError(P.ENQUEUE_ERROR, "QueueModule not loaded"))
        if not isinstance(queue, str):
            return fail(InvocationError(P.ENQUEUE_ERROR, "enqueue action needs a queue name"))
        try:
            check_stored(self.limits, function_id, data)
        except InvocationError as e:
            return fail(e)
        d = maybeDeferred(self.enqueuer.enqueue, queue, function_id, data, traceparent, baggage)
        return d.addCallbacks(_receipt, _as_enqueue_error)

    def _log_void_failure(self, failure, function_id):
        if failure.check(InvocationError):
            self._log.debug("void call of {function_id} failed: {error}",
                            function_id=function_id, error=failure.value)
        else:
            self._log.failure("void call of {function_id} failed", failure,
                              function_id=function_id)

    def add_call_observer(self, observer):
        """Add an L{ICallObserver}; it sees every call from now on."""
        self._observers.append(observer)

    def _observe(self, function_id, invocation_id, caller, traceparent, baggage):
        info = CallInfo(function_id, invocation_id, caller.id if caller else None,
                        traceparent, baggage)
        finishers = []
        for observer in self._observers:
            try:
                finish = observer.call_started(info)
            except Exception:
                self._log.failure("call observer {observer!r} failed", observer=observer)
                continue
            if finish is not None:
                finishers.append(finish)

        def finish_all(result, error):
            for finish in finishers:
                try:
                    finish(result, error)
                except Exception:
                    self._log.failure("call observer finish failed")
        return (finish_all if finishers else None), info.traceparent, info.baggage

    # -- triggers --------------------------------------------------------------------

    def register_trigger_type(self, type_id, provider, description=None, owner=None,
                              trigger_request_format=None, call_request_format=None):
        """
        Make C{provider} (an L{ITriggerProvider}) the provider of a trigger type, and
        hand it every trigger of that type that is waiting for one.

        @param owner: the providing L{WorkerRecord}, or None for a module.
        @return: the L{TriggerType}, or None when a worker tried to take over a type a
            module provides (deviation: the reference lets it).
        """
        previous = self.trigger_types.get(type_id)
        if previous is not None:
            if auth.refuse_takeover(self, owner, previous.owner, "trigger type", type_id):
                if owner.session is not None:
                    auth.tell_trigger_type_taken(self, owner, type_id, previous.owner)
                return None
            if previous.owner is not None:
                previous.owner.trigger_types.discard(type_id)
        trigger_type = TriggerType(type_id, provider, description, owner,
                                   trigger_request_format, call_request_format)
        self.trigger_types[type_id] = trigger_type
        if owner is not None:
            owner.trigger_types.add(type_id)
        for trigger in list(self._triggers_by_type.get(type_id, {}).values()):
            self._activate(trigger, trigger_type)
        return trigger_type

    def unregister_trigger_type(self, type_id, owner=None):
        """
        Remove a trigger type (a worker may remove only one it provides). Its triggers
        stay, pending, until a provider registers the type again.

        @return: True if it was removed.
        """
        trigger_type = self.trigger_types.get(type_id)
        if trigger_type is None or trigger_type.owner is not owner:
            return False
        del self.trigger_types[type_id]
        if owner is not None:
            owner.trigger_types.discard(type_id)
        for trigger in self._triggers_by_type.get(type_id, {}).values():
            trigger.status = PENDING
            trigger.error = None
            trigger.provided = False
        return True

    def register_trigger(self, trigger_id, trigger_type, function_id, config=None,
                         owner=None, metadata=None):
        """
        Bind a trigger. If its type has a provider the trigger is handed to it;
        otherwise it is kept, pending, until one registers (deviation: the reference
        drops it). A trigger with the same id is replaced, by its own worker or the
        same principal only (L{iii_twisted.auth.refuse_takeover}); a worker's trigger
        is also refused outside its session's grants (C{allowed_trigger_types}, and
        its function must be one the session may call).

        @param owner: the registering L{WorkerRecord}, or None for in-process code.
        @return: a Deferred firing with the L{Trigger}, or failing with
            L{TriggerError} when the provider refuses it (it is then removed, and a
            registering worker is told with a ``triggerregistrationresult`` error).
        """
        existing = self.triggers.get(trigger_id)
        refusal = None
        if existing is not None and auth.refuse_takeover(self, owner, existing.owner,
                                                         "trigger", trigger_id):
            refusal = "trigger '{}' is registered by another {}".format(
                trigger_id, "worker" if existing.owner is not None else "part of the engine")
        elif owner is not None:
            refusal = auth.trigger_refusal(self, owner, trigger_type, function_id)
        if refusal is not None:
            return self._refuse_trigger(owner, trigger_id, trigger_type, function_id,
                                        refusal)
        if existing is not None:
            if existing.owner is not owner and owner is not None:
                self._log.warn("trigger {trigger_id} of worker {old} replaced by worker "
                               "{new}", trigger_id=trigger_id, old=existing.owner.id,
                               new=owner.id)
            self.unregister_trigger(trigger_id)
        trigger = Trigger(trigger_id, trigger_type, function_id, config, owner, metadata)
        self.triggers[trigger_id] = trigger
        self._triggers_by_type.setdefault(trigger_type, {})[trigger_id] = trigger
        if owner is not None:
            owner.triggers.add(trigger_id)
        if self.registry_watchers:
            self.registry_changed()
        provider_type = self.trigger_types.get(trigger_type)
        if provider_type is None:
            # Warn when a module would provide the type: a cron trigger without the
            # cron module waits for ever (hints.py).
            log = self._log.warn if module_for_trigger_type(trigger_type) else self._log.info
            log("trigger {trigger_id} ({function_id}) waits: {hint}", trigger_id=trigger_id,
                function_id=function_id, hint=trigger_type_hint(trigger_type),
                trigger_type=trigger_type)
            return succeed(trigger)
        return self._activate(trigger, provider_type)

    def _refuse_trigger(self, owner, trigger_id, trigger_type, function_id, message):
        self._log.warn("trigger {trigger_id} of worker {worker_id} refused: {message}",
                       trigger_id=trigger_id, worker_id=owner.id, message=message)
        owner.connection.send({
            "type": P.TRIGGER_REGISTRATION_RESULT,
            "id": trigger_id,
            "trigger_type": trigger_type,
            "function_id": function_id,
            "error": P.error_body(auth.FORBIDDEN, message),
        })
        return fail(TriggerError(message, auth.FORBIDDEN))

    def _activate(self, trigger, trigger_type):
        # Pending until the provider says the trigger is live (a Redis subscription
        # is live once Redis confirmed it): engine::triggers::list shows "active" only
        # then, so a worker that waits for it knows events reach its function.
        trigger.status = PENDING
        trigger.error = None
        trigger.provided = True
        d = maybeDeferred(trigger_type.provider.register_trigger, trigger)
        return d.addCallbacks(self._live, self._refused, callbackArgs=(trigger,),
                              errbackArgs=(trigger,))

    def _live(self, _, trigger):
        if trigger.provided and trigger.status == PENDING \
                and self.triggers.get(trigger.id) is trigger:
            trigger.status = ACTIVE
        return trigger

    def _refused(self, failure, trigger):
        if failure.check(TriggerError):
            code, message = failure.value.code, failure.value.message
        else:
            self._log.failure("provider of {trigger_type} failed on trigger {trigger_id}",
                              failure, trigger_type=trigger.trigger_type,
                              trigger_id=trigger.id)
            code, message = P.TRIGGER_REGISTRATION_FAILED, failure.getErrorMessage()
        self._log.warn(
            "trigger {trigger_id} of type {trigger_type} refused: {message}",
            trigger_id=trigger.id, trigger_type=trigger.trigger_type, message=message)
        self.refused_triggers.append(dict(
            trigger.info(), status="refused", error=P.error_body(code, message),
            refused_at_ms=int(time.time() * 1000)))
        if self.triggers.get(trigger.id) is trigger:
            self._forget_trigger(trigger)
            if trigger.owner is not None:
                trigger.owner.connection.send({
                    "type": P.TRIGGER_REGISTRATION_RESULT,
                    "id": trigger.id,
                    "trigger_type": trigger.trigger_type,
                    "function_id": trigger.function_id,
                    "error": P.error_body(code, message),
                })
        return Failure(TriggerError(message, code))

    def unregister_trigger(self, trigger_id, owner=None):
        """
        Remove a trigger and tell its provider.

        @param owner: the worker asking, or None for in-process code. A worker removes
            only its own triggers (deviation: the reference lets any worker).
        @return: the removed L{Trigger}, or None.
        """
        trigger = self.triggers.get(trigger_id)
        if trigger is None or (owner is not None and trigger.owner is not owner):
            if trigger is None:
                self._log.info("unregister of unknown trigger {trigger_id}",
                               trigger_id=trigger_id)
            return None
        self._forget_trigger(trigger)
        trigger_type = self.trigger_types.get(trigger.trigger_type)
        if trigger_type is not None and trigger.provided:
            maybeDeferred(trigger_type.provider.unregister_trigger, trigger).addErrback(
                lambda f: self._log.failure(
                    "provider of {trigger_type} failed to unregister {trigger_id}", f,
                    trigger_type=trigger.trigger_type, trigger_id=trigger.id))
        return trigger

    def _forget_trigger(self, trigger):
        del self.triggers[trigger.id]
        same_type = self._triggers_by_type[trigger.trigger_type]
        del same_type[trigger.id]
        if not same_type:
            del self._triggers_by_type[trigger.trigger_type]
        if trigger.owner is not None:
            trigger.owner.triggers.discard(trigger.id)
        if self.registry_watchers:
            self.registry_changed()

    def triggers_of_type(self, type_id):
        """@return: a list of the active L{Trigger}s of a type."""
        return [t for t in self._triggers_by_type.get(type_id, {}).values()
                if t.status == ACTIVE]

    def fire_triggers(self, type_id, payload):
        """
        Call the function of every active trigger of a type with C{payload}, fire and
        forget (each call's failure is logged).
        """
        for trigger in self.triggers_of_type(type_id):
            self.call(trigger.function_id, payload, VOID, metadata=trigger.metadata)

    def check_condition(self, trigger, payload):
        """
        Evaluate a trigger's ``condition_function_id``, if its config has one.

        @return: Deferred firing with True unless the condition function returned
            exactly ``false``; failing with InvocationError if that call failed.
        """
        config = trigger.config
        condition = config.get("condition_function_id") if isinstance(config, dict) else None
        if not condition:
            return succeed(True)
        return self.call(condition, payload).addCallback(lambda result: result is not False)

    # -- engine::functions-available --------------------------------------------------

    def _functions_changed(self):
        if self.registry_watchers:
            self.registry_changed()
        if self._functions_check is None and FUNCTIONS_AVAILABLE in self._triggers_by_type:
            self._functions_check = self.clock.callLater(
                self._functions_available_delay, self._notify_functions_available)

    def _notify_functions_available(self):
        self._functions_check = None
        ids = frozenset(self.functions)
        if ids == self._last_function_ids:
            return
        self._last_function_ids = ids
        from .discovery_current import function_row
        # v0.10's FunctionInfo keys plus the 0.13 FunctionSummary's namespace and
        # worker_name: each SDK generation reads its own.
        self.fire_triggers(FUNCTIONS_AVAILABLE, {
            "event": "functions_changed",
            "functions": [function_row(self, entry) for entry in self.functions.values()],
        })

    def stop(self):
        """Detach every worker (failing their pending calls), then cancel the core's timers."""
        for worker in list(self.workers.values()):
            self.detach(worker)
        if self._functions_check is not None:
            self._functions_check.cancel()
            self._functions_check = None

    # -- services (bookkeeping only, as in the reference; engine-core.md §9) ----------

    def _service_add(self, function_id):
        name, sep, rest = function_id.partition("::")
        if sep:
            service = self.services.get(name)
            if service is None:
                service = self.services[name] = {"id": name, "parent_service_id": None,
                                                  "functions": set()}
            service["functions"].add(rest)

    def _service_remove(self, function_id):
        name, sep, rest = function_id.partition("::")
        service = self.services.get(name) if sep else None
        if service is not None:
            service["functions"].discard(rest)
            if not service["functions"]:
                del self.services[name]

    # -- worker message handlers -------------------------------------------------------

    def _handle_invokefunction(self, worker, message):
        action = message["action"]
        invocation_id = message["invocation_id"]
        function_id = message["function_id"]
        data = message["data"]
        kind = None if action is None else action.get("type")
        try:
            function_id = self.namespaces.call_key(function_id, message["namespace"])
        except InvocationError as e:
            if invocation_id is not None and kind != "void":
                self._answer_error(Failure(e), worker, invocation_id, message["function_id"])
            return
        if isinstance(data, dict):
            # How engine::workers::register (and any handler) knows its caller: the
            # engine alone says who that is, whatever the sender put there. A queued
            # message is not a call from this worker: it carries no caller.
            if kind is None or kind == "void":
                data["_caller_worker_id"] = worker.id
            else:
                data.pop("_caller_worker_id", None)
        if kind == "void":
            invocation_id = None  # never answer a void call
        d = self.call(function_id, data, action, worker, message["traceparent"],
                      message["baggage"], message["metadata"])
        if invocation_id is None:
            d.addErrback(self._log_void_failure, function_id)
        else:
            d.addCallbacks(_answer, self._answer_error,
                           callbackArgs=(worker, invocation_id, message["function_id"]),
                           errbackArgs=(worker, invocation_id, message["function_id"]))

    def _answer_error(self, failure, worker, invocation_id, function_id):
        if failure.check(InvocationError):
            body = failure.value.to_body()
        else:
            self._log.failure("call of {function_id} failed in the engine", failure,
                              function_id=function_id)
            body = P.error_body(P.INVOCATION_FAILED, "Internal engine error: {}".format(
                failure.getErrorMessage()))
        worker.connection.send({
            "type": P.INVOCATION_RESULT,
            "invocation_id": invocation_id,
            "function_id": function_id,
            "error": body,
        })

    def _handle_invocationresult(self, worker, message):
        if not self.tracker.resolve(message["invocation_id"], worker, message["result"],
                                    message["error"]):
            self._log.info(
                "dropped result {invocation_id} from worker {worker_id}: no call pending "
                "for it (late, unknown or not this worker's)",
                invocation_id=message["invocation_id"], worker_id=worker.id)

    def _handle_registerfunction(self, worker, message):
        if auth.held_for_hook(self, worker, message, self._handle_registerfunction):
            return
        if self.limits.refuse_function(worker, message):
            return  # logged; a call of it fails saying why (_not_found)
        function_id = message["id"]
        if auth.refuse_function_registration(self, worker, function_id):
            return
        if worker.session is not None:
            function_id = message["id"] = worker.session.registration_id(function_id)
        if message["invocation"] is not None:
            if self.http_functions is None:
                self._log.warn(
                    "worker {worker_id} registered HTTP function {function_id} but "
                    "HttpFunctionsModule is not loaded; ignored",
                    worker_id=worker.id, function_id=function_id)
                return
            self.http_functions.register_from_worker(worker, message)
            return
        registry_key = self.namespaces.function_key(worker, message)
        if registry_key is not None:
            self.add_worker_function(worker, message, registry_key)

    def add_worker_function(self, worker, message, registry_key):
        """Register a worker's ``registerfunction`` under C{registry_key} (L{namespaces})."""
        self.add_function(FunctionEntry(
            registry_key, worker.host, worker, message["description"],
            message["request_format"], message["response_format"], message["metadata"],
        ))

    def _handle_unregisterfunction(self, worker, message):
        function_id = message["id"]
        if worker.session is not None:
            function_id = worker.session.registration_id(function_id)
        self.unregister_function(self.namespaces.unregister_key(worker, function_id),
                                 owner=worker)

    def _handle_registertriggertype(self, worker, message):
        if auth.held_for_hook(self, worker, message, self._handle_registertriggertype):
            return
        if auth.refuse_trigger_type_registration(self, worker, message["id"]):
            return
        if self.limits.refuse_trigger_type(worker, message):
            return  # logged
        self.register_trigger_type(
            message["id"], WorkerTriggerProvider(worker), message["description"], worker,
            message["trigger_request_format"], message["call_request_format"],
        )

    def _handle_unregistertriggertype(self, worker, message):
        self.unregister_trigger_type(message["id"], owner=worker)

    def _handle_registertrigger(self, worker, message):
        if auth.held_for_hook(self, worker, message, self._handle_registertrigger):
            return
        reason = self.limits.refuse_trigger(worker, message)
        if reason:
            worker.connection.send({
                "type": P.TRIGGER_REGISTRATION_RESULT, "id": message["id"],
                "trigger_type": message["trigger_type"],
                "function_id": message["function_id"],
                "error": P.error_body(LIMIT_EXCEEDED, reason)})
            return
        if worker.session is not None:
            # A session's function_registration_prefix applies to its triggers' targets.
            message["function_id"] = worker.session.registration_id(message["function_id"])
        try:
            function_key = self.namespaces.trigger_function_key(message)
        except InvocationError as e:
            worker.connection.send({
                "type": P.TRIGGER_REGISTRATION_RESULT, "id": message["id"],
                "trigger_type": message["trigger_type"],
                "function_id": message["function_id"], "error": e.to_body()})
            return
        # A refusal has been logged and answered by _refused; nothing more to do.
        self.register_trigger(
            message["id"], message["trigger_type"], function_key,
            message["config"], worker, message["metadata"],
        ).addErrback(lambda f: f.trap(TriggerError) and None)

    def _handle_unregistertrigger(self, worker, message):
        self.unregister_trigger(message["id"], owner=worker)

    def _handle_triggerregistrationresult(self, worker, message):
        trigger = self.triggers.get(message["id"])
        trigger_type = self.trigger_types.get(trigger.trigger_type) if trigger else None
        if trigger_type is None or trigger_type.owner is not worker:
            self._log.info("ignored triggerregistrationresult for {trigger_id} from "
                           "{worker_id}: not its provider", trigger_id=message["id"],
                           worker_id=worker.id)
            return
        error = message["error"]
        if error is None:
            trigger.status, trigger.error = ACTIVE, None
            return
        trigger.status, trigger.error = FAILED, error
        self._log.warn(
            "provider {worker_id} failed trigger {trigger_id} ({trigger_type}): {error}",
            worker_id=worker.id, trigger_id=trigger.id, trigger_type=trigger.trigger_type,
            error=error)
        if trigger.owner is not None and trigger.owner is not worker:
            trigger.owner.connection.send(dict(message, type=P.TRIGGER_REGISTRATION_RESULT))

    def _handle_registerservice(self, worker, message):
        owned = self._services_by_worker.setdefault(worker.id, set())
        name = message["name"] or message["id"]
        if self.limits.refuse_service(worker, message, owned):
            return  # logged
        self.services[name] = {"id": message["id"],
                               "parent_service_id": message["parent_service_id"],
                               "functions": set(), "owner": worker}
        owned.add(name)

    def _forget_services(self, worker):
        # Nothing a connection registered outlives it, services included.
        for name in self._services_by_worker.pop(worker.id, ()):
            service = self.services.get(name)
            if service is not None and service.get("owner") is worker:
                del self.services[name]

    def _handle_reattach(self, worker, message):
        """
        A newer SDK reconnected and names the connection it had before (engine-core.md
        §11). If that worker is still attached here (its socket is half-open: we
        have not seen it close) and the token is the one it was given, retire it
        now, before the new connection's replay: its calls fail with
        ``invocation_stopped`` at once instead of waiting for a ping timeout.
        Anything else (an id we do not know, e.g. after an engine restart, a wrong
        token, or, with auth, a connection of another principal) is ignored.
        """
        previous = self.workers.get(message["previous_worker_id"])
        token = message["reattach_token"]
        if previous is None or previous is worker:
            return
        if token is None or not hmac.compare_digest(
                token.encode("utf-8"), previous.reattach_token.encode("utf-8")):
            self._log.warn("worker {worker_id} tried to reattach {previous_id} with a "
                           "wrong token", worker_id=worker.id, previous_id=previous.id)
            return
        if not auth.may_take_over(worker, previous):
            # A connection of another principal (token) may not retire this one,
            # even with its token.
            self._log.warn("worker {worker_id} tried to reattach {previous_id} of another "
                           "principal", worker_id=worker.id, previous_id=previous.id)
            return
        self._log.info("worker {worker_id} reattached: retiring {previous_id}",
                       worker_id=worker.id, previous_id=previous.id)
        self.detach(previous)
        previous.connection.disconnect(1000, "reattached")

    def _handle_ping(self, worker, message):
        worker.connection.send({"type": P.PONG})


def _ignore(worker, message):
    pass


def _answer(result, worker, invocation_id, function_id):
    message = {
        "type": P.INVOCATION_RESULT,
        "invocation_id": invocation_id,
        "function_id": function_id,
    }
    if result is not None:
        message["result"] = result
    sent = worker.connection.send(message)
    if not sent:
        # An in-process function returned something JSON cannot carry, or a result
        # too large for the caller's WebSocket (peer_limits): the caller gets an error
        # now instead of waiting for its own timeout, or losing its connection.
        message.pop("result", None)
        message["error"] = not_sent_error(
            sent, "the result of {} cannot be sent: it is not JSON".format(function_id),
            "the result of {} was not delivered (the call itself completed)".format(
                function_id))
        worker.connection.send(message)


def _count_down(result, caller):
    caller.active_calls -= 1
    return result


def _report_finish(result, finish):
    if isinstance(result, Failure):
        error = result.value if isinstance(result.value, InvocationError) else \
            InvocationError(P.INVOCATION_FAILED, result.getErrorMessage())
        finish(None, error)
    else:
        finish(result, None)
    return result


def _receipt(receipt_id):
    return {"messageReceiptId": receipt_id}


def _as_enqueue_error(failure):
    if failure.check(InvocationError):
        return failure
    return Failure(InvocationError(P.ENQUEUE_ERROR, failure.getErrorMessage()))
