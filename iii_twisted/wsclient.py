"""
A worker-protocol client: this engine connecting to another iii engine *as a worker*,
exactly as an official SDK does (../shared/spec/engine-core.md §2-§4), so that it works
against any engine speaking that protocol (ours, or the reference's).

What goes over the link (client -> remote engine)::

    registerservice / registerfunction / registertrigger   on every (re)connect
    invokefunction {invocation_id, function_id, data}      a call, answered by
                                                           invocationresult
    invokefunction {function_id, data, action: void}       fire and forget
    invokefunction engine::workers::register (void)        the client's metadata
    invocationresult {invocation_id, function_id, result|error}
                                                           the answer to a call the
                                                           remote made to one of ours

(remote -> client): ``workerregistered``, ``invokefunction`` for a function we
registered, ``invocationresult`` for one of our calls; anything else is ignored, as the
SDKs do.

The link reconnects with exponential backoff (the SDKs' policy: 1 s, doubling, at most
30 s, +-30 % jitter; the attempt count resets once a connection opens) and re-sends every
registration each time it opens, so a remote engine that restarted learns them again.
State changes are logged once each (connected, lost, cannot connect), not per attempt.

Calls never hang on the link: a call made while the link is down fails at once
(L{LinkError} ``iii is not connected``), except during the very first connection
attempt, which it waits for; calls in flight when the link drops fail at once (``the
link was lost before the result came``); each call has a timeout (``invocation timed
out``). An error the remote answered with is an L{InvocationError} carrying the
remote's code, message and stack trace.

Used by the bridge module and the state/stream ``Bridge`` adapters
(L{iii_twisted.modules.bridge_client}, L{iii_twisted.adapters.bridge}).
"""

import os
import platform
import random
import traceback
from uuid import uuid4

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.util import parse_url
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

from . import __version__
from . import protocol as P
from .protocol import InvocationError

# LinkError messages; the first two are the reference SDK's wording (Rust iii-sdk
# error.rs, what the reference bridge's bridge_error carries).
NOT_CONNECTED = "iii is not connected"
TIMED_OUT = "invocation timed out"
LINK_LOST = "the link was lost before the result came"
STOPPED = "the link is stopped"

DEFAULT_TIMEOUT_MS = 30000  # the SDKs' default call timeout

# Client states.
IDLE = "idle"  # not started
FIRST = "connecting"  # the first attempt, calls wait for it
CONNECTED = "connected"
DOWN = "disconnected"  # waiting to retry; calls fail at once
STOPPED_STATE = "stopped"


class LinkError(Exception):
    """
    A call that could not be made or answered over the link: not connected, timed
    out, link lost, link stopped, or data that is not JSON. C{str()} is the reason.
    """


def check_url(url):
    """
    @return: None when C{url} is a usable ``ws://`` or ``wss://`` URL, else what is
        wrong with it (for a config error).
    """
    try:
        parse_url(url)
    except Exception as e:
        return "must be a ws:// or wss:// URL ({})".format(e)
    return None


def endpoint_connector(reactor, url, timeout):
    """
    @return: a connector for L{WorkerClient}: a callable taking a protocol factory and
        returning a Deferred firing with the connected protocol (TCP, or TLS for
        ``wss://``, with a connect C{timeout} in seconds).
    """
    secure, host, port = parse_url(url)[:3]
    endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if secure:
        from twisted.internet.ssl import optionsForClientTLS
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return endpoint.connect


class _LinkProtocol(WebSocketClientProtocol):
    """One connection of a L{WorkerClient}: hands frames and events to it."""

    def onOpen(self):
        self.factory.client._opened(self)

    def onMessage(self, payload, isBinary):
        self.factory.client._received(self, payload)

    def onClose(self, wasClean, code, reason):
        self.factory.client._closed(self, code, reason)


class _ClockTimer:
    """Autobahn's handshake/close/ping timers on the injected clock (see worker.py)."""

    def __init__(self, clock):
        self._clock = clock

    def call_later(self, delay, function, *args, **kwargs):
        return self._clock.callLater(delay, function, *args, **kwargs)


class WorkerClient:
    """
    One worker-protocol link to a remote engine, kept up until L{stop}.

    @ivar state: ``idle``, ``connecting`` (first attempt), ``connected``,
        ``disconnected`` (waiting to retry) or ``stopped``.
    @ivar worker_id: the id the remote engine gave this connection (None until
        ``workerregistered`` arrives).
    @ivar connects: how many times the link has opened (1 after the first connect).
    """

    _log = Logger()

    def __init__(self, url, reactor, name, headers=None, connector=None,
                 connect_timeout=5.0, initial_delay=1.0, max_delay=30.0, factor=2.0,
                 jitter=0.3, ping_interval=20.0, ping_timeout=20.0,
                 max_message_size=64 * 1024 * 1024, random=random.random):
        """
        @param url: ``ws://host:port[/path][?token=...]`` or ``wss://...``.
        @param name: the worker name the remote engine lists this link under.
        @param headers: extra HTTP headers of the opening handshake (a dict).
        @param connector: see L{endpoint_connector} (tests pass an in-memory one).
        @param initial_delay, max_delay: seconds of the reconnect backoff.
        @param ping_interval, ping_timeout: WebSocket pings that detect a dead remote
            (0 disables them).
        @raise ValueError: for a URL that is not ws:// or wss://.
        """
        problem = check_url(url)
        if problem:
            raise ValueError("{}: {}".format(url, problem))
        self.url = url
        self.name = name
        self.state = IDLE
        self.worker_id = None
        self.connects = 0
        self._clock = reactor
        self._connector = connector or endpoint_connector(reactor, url, connect_timeout)
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._factor = factor
        self._jitter = jitter
        self._random = random
        self._failures = 0  # failed attempts since the link was last open
        self._protocol = None  # the open connection
        self._attempt_d = None
        self._handshaking = None  # connected, opening handshake not done yet
        self._retry = None
        self._waiters = []  # calls waiting for the first attempt
        self._pending = {}  # invocation id -> (Deferred, IDelayedCall)
        self._functions = {}  # id -> (registerfunction message, handler)
        self._services = {}  # id -> registerservice message
        self._triggers = {}  # id -> registertrigger message
        self._closed_waiters = []
        self._state_listeners = []
        self._factory = WebSocketClientFactory(
            url, reactor=reactor, headers=headers or {},
            useragent="iii-twisted/{}".format(__version__))
        self._factory.protocol = _LinkProtocol
        self._factory.client = self
        self._factory._batched_timer = _ClockTimer(reactor)
        self._factory.setProtocolOptions(
            maxMessagePayloadSize=max_message_size, maxFramePayloadSize=max_message_size,
            autoPingInterval=ping_interval, autoPingTimeout=ping_timeout,
            openHandshakeTimeout=10, closeHandshakeTimeout=5, failByDrop=False,
            utf8validateIncoming=False)

    # -- registrations (kept, and re-sent on every connect) ------------------------

    def register_function(self, function_id, handler, description=None, metadata=None):
        """
        Offer a function to the remote engine (now if connected, and on every
        reconnect).

        @param handler: called with the call's data; returns a JSON value, a Deferred or
            a coroutine. An L{InvocationError} it raises is answered with its code; any
            other exception with ``invocation_failed`` and the stack trace.
        """
        message = {"type": P.REGISTER_FUNCTION, "id": function_id}
        if description is not None:
            message["description"] = description
        if metadata is not None:
            message["metadata"] = metadata
        self._functions[function_id] = (message, handler)
        self._send_if_open(message)

    def unregister_function(self, function_id):
        """Withdraw a function registered with L{register_function}."""
        if self._functions.pop(function_id, None) is not None:
            self._send_if_open({"type": P.UNREGISTER_FUNCTION, "id": function_id})

    def register_service(self, service_id, name=None):
        """Register a service on the remote engine (v0.10 ``registerservice``)."""
        message = {"type": P.REGISTER_SERVICE, "id": service_id,
                   "name": service_id if name is None else name}
        self._services[service_id] = message
        self._send_if_open(message)

    def register_trigger(self, trigger_type, function_id, config):
        """
        Bind one of the remote engine's trigger types to a function (kept across
        reconnects under the same id, as the SDKs do).

        @return: the trigger id.
        """
        trigger_id = str(uuid4())
        message = {"type": P.REGISTER_TRIGGER, "id": trigger_id,
                   "trigger_type": trigger_type, "function_id": function_id,
                   "config": config}
        self._triggers[trigger_id] = message
        self._send_if_open(message)
        return trigger_id

    def unregister_trigger(self, trigger_id):
        """Remove a trigger made with L{register_trigger}."""
        message = self._triggers.pop(trigger_id, None)
        if message is not None:
            self._send_if_open({"type": P.UNREGISTER_TRIGGER, "id": trigger_id,
                                "trigger_type": message["trigger_type"]})

    # -- calls ------------------------------------------------------------------------

    def call(self, function_id, data, timeout_ms=DEFAULT_TIMEOUT_MS):
        """
        Call a function on the remote engine and wait for its result.

        @param timeout_ms: how long to wait for the result (milliseconds).
        @return: Deferred firing with the result (None for none); failing with
            L{InvocationError} (the remote's error body) or L{LinkError}.
        """
        if self.state == FIRST:
            waiter = Deferred()
            self._waiters.append(waiter)
            return waiter.addCallback(lambda _: self.call(function_id, data, timeout_ms))
        if self.state != CONNECTED:
            return fail(LinkError(STOPPED if self.state == STOPPED_STATE else NOT_CONNECTED))
        invocation_id = str(uuid4())
        message = {"type": P.INVOKE_FUNCTION, "invocation_id": invocation_id,
                   "function_id": function_id, "data": data}
        try:
            payload = P.encode(message)
        except (TypeError, ValueError) as e:
            return fail(LinkError("the data is not JSON: {}".format(e)))

        def cancel(d):
            entry = self._pending.pop(invocation_id, None)
            if entry is not None and entry[1].active():
                entry[1].cancel()
        d = Deferred(cancel)
        timer = self._clock.callLater(timeout_ms / 1000.0, self._timed_out, invocation_id)
        self._pending[invocation_id] = (d, timer)
        self._protocol.sendMessage(payload, isBinary=False)
        return d

    def call_void(self, function_id, data):
        """
        Call a function on the remote engine without waiting for (or getting) a
        result: ``action: {"type": "void"}``.

        @return: Deferred firing with None once sent; failing with L{LinkError}.
        """
        if self.state == FIRST:
            waiter = Deferred()
            self._waiters.append(waiter)
            return waiter.addCallback(lambda _: self.call_void(function_id, data))
        if self.state != CONNECTED:
            return fail(LinkError(STOPPED if self.state == STOPPED_STATE else NOT_CONNECTED))
        try:
            payload = P.encode({"type": P.INVOKE_FUNCTION, "function_id": function_id,
                                "data": data, "action": {"type": "void"}})
        except (TypeError, ValueError) as e:
            return fail(LinkError("the data is not JSON: {}".format(e)))
        self._protocol.sendMessage(payload, isBinary=False)
        return succeed(None)

    def _timed_out(self, invocation_id):
        entry = self._pending.pop(invocation_id, None)
        if entry is not None:
            entry[0].errback(LinkError(TIMED_OUT))

    # -- lifecycle --------------------------------------------------------------------

    def start(self):
        """Start connecting (and keep reconnecting until L{stop}). Idempotent."""
        if self.state != IDLE:
            return
        self._set_state(FIRST)
        self._attempt()

    def stop(self):
        """
        Close the link for good: calls in flight and waiting fail with L{LinkError}
        (``the link is stopped``); no more reconnects.

        @return: Deferred firing once the connection is closed.
        """
        if self.state == STOPPED_STATE:
            return succeed(None)
        was_first = self.state == FIRST
        self._set_state(STOPPED_STATE)
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt_d is not None:
            self._attempt_d.cancel()
        self._fail_waiters(STOPPED if was_first else NOT_CONNECTED)
        self._fail_pending(STOPPED)
        protocol, self._protocol = self._protocol, None
        handshaking, self._handshaking = self._handshaking, None
        if protocol is None and handshaking is None:
            return succeed(None)
        closed = Deferred()
        self._closed_waiters.append(closed)
        if protocol is not None:
            protocol.sendClose(1000, "bridge stopping")
        else:
            handshaking.dropConnection(abort=True)
        return closed

    def add_state_listener(self, listener):
        """Call C{listener(state)} on every state change (tests, health)."""
        self._state_listeners.append(listener)

    def _set_state(self, state):
        self.state = state
        for listener in list(self._state_listeners):
            listener(state)

    def _attempt(self):
        self._retry = None
        d = self._attempt_d = maybeDeferred(self._connector, self._factory)

        def failed(failure):
            if self._attempt_d is d:
                self._attempt_d = None
            if self.state == STOPPED_STATE:
                return None
            self._attempt_failed(failure.getErrorMessage() or failure.type.__name__)

        def done(protocol):
            if self._attempt_d is d:
                self._attempt_d = None
            self._handshaking = protocol
        d.addCallbacks(done, failed)

    def _attempt_failed(self, reason):
        if self._failures == 0:
            self._log.warn(
                "link {name} cannot connect to {url}: {reason}; retrying with backoff "
                "(calls fail with {error!r} until it connects)",
                name=self.name, url=self.url, reason=reason, error=NOT_CONNECTED)
        else:
            self._log.debug("link {name}: attempt {n} to {url} failed: {reason}",
                            name=self.name, n=self._failures + 1, url=self.url,
                            reason=reason)
        self._failures += 1
        if self.state == FIRST:
            self._fail_waiters(NOT_CONNECTED)
        self._set_state(DOWN)
        self._schedule_retry()

    def _schedule_retry(self):
        delay = min(self._max_delay,
                    self._initial_delay * self._factor ** max(self._failures - 1, 0))
        delay *= 1 + self._jitter * (2 * self._random() - 1)
        self._retry = self._clock.callLater(max(delay, 0.0), self._attempt)

    def _opened(self, protocol):
        self._handshaking = None
        if self.state == STOPPED_STATE:
            protocol.sendClose(1000, "bridge stopping")
            return
        self._protocol = protocol
        self.connects += 1
        if self._failures:
            self._log.info("link {name} connected to {url} after {n} failed attempts",
                           name=self.name, url=self.url, n=self._failures)
        else:
            self._log.info("link {name} connected to {url}", name=self.name, url=self.url)
        self._failures = 0
        # The SDKs' order: services, functions, triggers, then the worker metadata.
        for message in self._services.values():
            self._send(message)
        for message, _ in self._functions.values():
            self._send(message)
        for message in self._triggers.values():
            self._send(message)
        self._send({"type": P.INVOKE_FUNCTION, "function_id": "engine::workers::register",
                    "data": self._metadata(), "action": {"type": "void"}})
        self._set_state(CONNECTED)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _metadata(self):
        return {"runtime": "python", "version": __version__, "name": self.name,
                "os": "{} {} ({})".format(platform.system(), platform.release(),
                                          platform.machine()),
                "pid": os.getpid()}

    def _closed(self, protocol, code, reason):
        if protocol is self._handshaking:
            self._handshaking = None
        if protocol is not self._protocol:
            # A connection that never opened (handshake refused or timed out), or the
            # one stop() closed.
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            if self.state not in (STOPPED_STATE, CONNECTED) and self._retry is None \
                    and self._attempt_d is None:
                self._attempt_failed("the opening handshake failed ({})".format(
                    reason or code))
            return
        self._protocol = None
        self.worker_id = None
        self._log.warn("link {name} to {url} lost (code {code}, {reason}); reconnecting "
                       "with backoff", name=self.name, url=self.url, code=code,
                       reason=reason or "no reason")
        self._fail_pending(LINK_LOST)
        self._set_state(DOWN)
        self._schedule_retry()

    def _fail_waiters(self, reason):
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(LinkError(reason))

    def _fail_pending(self, reason):
        pending, self._pending = self._pending, {}
        for d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(LinkError(reason))

    # -- frames -----------------------------------------------------------------------

    def _send(self, message):
        try:
            payload = P.encode(message)
        except (TypeError, ValueError) as e:
            self._log.error("link {name}: cannot send a {kind}: {error}", name=self.name,
                            kind=message.get("type"), error=e)
            return False
        self._protocol.sendMessage(payload, isBinary=False)
        return True

    def _send_if_open(self, message):
        # Registrations made while down are not queued: the next connect sends them.
        if self.state == CONNECTED and self._protocol is not None:
            self._send(message)

    def _received(self, protocol, payload):
        if protocol is not self._protocol:
            return
        try:
            message, _ = P.read_json(payload)
        except (ValueError, RecursionError) as e:
            self._log.warn("link {name}: undecodable frame dropped: {error}",
                           name=self.name, error=e)
            return
        if not isinstance(message, dict):
            self._log.warn("link {name}: a frame that is not an object dropped",
                           name=self.name)
            return
        kind = message.get("type")
        if kind == P.INVOCATION_RESULT:
            self._handle_result(message)
        elif kind == P.INVOKE_FUNCTION:
            self._handle_invoke(protocol, message)
        elif kind == P.WORKER_REGISTERED:
            worker_id = message.get("worker_id")
            self.worker_id = worker_id if isinstance(worker_id, str) else None
        else:
            # registertrigger (we provide no trigger type), registrationrejected, ...
            self._log.debug("link {name}: {kind} ignored", name=self.name, kind=kind)

    def _handle_result(self, message):
        entry = self._pending.pop(message.get("invocation_id"), None)
        if entry is None:
            return  # timed out already, or not ours
        d, timer = entry
        if timer.active():
            timer.cancel()
        error = message.get("error")
        if error:
            d.errback(InvocationError.from_body(error if isinstance(error, dict)
                                                else {"message": str(error)}))
        else:
            d.callback(message.get("result"))

    def _handle_invoke(self, protocol, message):
        function_id = message.get("function_id")
        invocation_id = message.get("invocation_id")
        entry = self._functions.get(function_id) if isinstance(function_id, str) else None
        if entry is None:
            d = fail(InvocationError(P.FUNCTION_NOT_FOUND,
                                     "Function '{}' not found".format(function_id)))
        else:
            d = maybeDeferred(entry[1], message.get("data"))
            d.addCallback(_awaited)
        if not isinstance(invocation_id, str):
            d.addErrback(lambda f: None)  # void: nobody to answer
            return
        d.addCallbacks(self._answer, self._answer_error,
                       callbackArgs=(protocol, invocation_id, function_id),
                       errbackArgs=(protocol, invocation_id, function_id))
        d.addErrback(lambda f: self._log.failure("link {name}: answering failed", f,
                                                 name=self.name))

    def _answer(self, result, protocol, invocation_id, function_id):
        message = {"type": P.INVOCATION_RESULT, "invocation_id": invocation_id,
                   "function_id": function_id, "result": result}
        try:
            payload = P.encode(message)
        except (TypeError, ValueError) as e:
            payload = P.encode(dict(message, result=None, error=P.error_body(
                P.INVOCATION_FAILED, "the result is not JSON: {}".format(e))))
        self._send_on(protocol, payload)

    def _answer_error(self, failure, protocol, invocation_id, function_id):
        if failure.check(InvocationError):
            body = failure.value.to_body()
        else:
            body = P.error_body(P.INVOCATION_FAILED, failure.getErrorMessage(),
                                "".join(traceback.format_exception(
                                    failure.type, failure.value, failure.getTracebackObject())))
        self._send_on(protocol, P.encode({
            "type": P.INVOCATION_RESULT, "invocation_id": invocation_id,
            "function_id": function_id, "error": body}))

    def _send_on(self, protocol, payload):
        if protocol is self._protocol and protocol.state == protocol.STATE_OPEN:
            protocol.sendMessage(payload, isBinary=False)
        else:
            self._log.debug("link {name}: a result was dropped, the link it came on "
                            "is gone", name=self.name)


def _awaited(result):
    """Let a handler return a coroutine."""
    from inspect import iscoroutine
    if iscoroutine(result):
        return Deferred.fromCoroutine(result)
    return result
