"""
A worker-protocol *client*: this engine connecting to another engine's worker port
(or link listener) as a worker does, over an Autobahn WebSocket.

Used by the cluster's links (L{iii_twisted.cluster.links}): the link member A opens
to member B is this client, offering A's functions to B and running B's calls of
them. It knows nothing of clusters, so a bridge to a remote engine can use it too.

Wire protocol (../shared/spec/engine-core.md §2), from the client's side:

- the server sends ``workerregistered`` first; then L{WorkerClientProtocol.worker_id}
  is set and the handler's C{opened(protocol)} runs: register what you offer there
  with L{WorkerClientProtocol.send} (``registerfunction``, ``registertrigger``...);
- ``invokefunction`` from the server: the handler's C{invoke(protocol, message)}
  returns a Deferred (or a value); its result or L{InvocationError} is answered with
  ``invocationresult`` (never for a call without ``invocation_id``: ``void``);
- L{WorkerClientProtocol.call} sends an ``invokefunction`` of our own and returns a
  Deferred firing with the ``invocationresult``'s result or failing with its error,
  with ``invocation_stopped`` when the connection closes first, or
  ``invocation_timeout`` after C{timeout} seconds;
- ``ping`` is answered ``pong``; any other frame goes to the handler's optional
  C{frame(protocol, message)}; a frame that is not a JSON object is logged and
  dropped (the connection stays).
- when the connection closes the handler's C{closed(protocol, code, reason)} runs
  (code 1006 without a close frame, e.g. the server process died).

Connect with L{connect}, which takes a Twisted client endpoint string (``tcp:``,
``tls:``, ``unix:``), so TLS is a matter of the string.
"""

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from .. import __version__
from .. import protocol as P
from ..protocol import InvocationError


class WorkerClientProtocol(WebSocketClientProtocol):
    """
    One client connection. C{self.factory.handler} receives its events.

    @ivar worker_id: the id the server gave this connection (None until then).
    """

    _log = Logger()
    worker_id = None
    close_info = None

    def onOpen(self):
        self._pending = {}  # invocation id -> (Deferred, timer or None)
        self._ids = P.sequential_ids()

    def onMessage(self, payload, isBinary):
        try:
            message, _ = P.read_json(payload)
        except (ValueError, RecursionError) as e:
            self._log.warn("dropped an undecodable frame from {url}: {error}",
                           url=self.factory.url, error=str(e))
            return
        if not isinstance(message, dict):
            self._log.warn("dropped a frame from {url}: not a JSON object",
                           url=self.factory.url)
            return
        kind = message.get("type")
        try:
            if kind == P.INVOKE_FUNCTION:
                self._invoked(message)
            elif kind == P.INVOCATION_RESULT:
                self._result(message)
            elif kind == P.WORKER_REGISTERED:
                self.worker_id = message.get("worker_id")
                self.factory.handler.opened(self)
            elif kind == P.PING:
                self.send({"type": P.PONG})
            else:
                frame = getattr(self.factory.handler, "frame", None)
                if frame is not None:
                    frame(self, message)
        except Exception:
            self._log.failure("error handling a {type} frame from {url}", type=kind,
                              url=self.factory.url)

    def onClose(self, wasClean, code, reason):
        if code is None:
            code, reason = 1006, getattr(self, "wasNotCleanReason", None) or reason
        self.close_info = (code, reason, wasClean)
        pending, self._pending = getattr(self, "_pending", {}), {}
        for d, timer in pending.values():
            if timer is not None and timer.active():
                timer.cancel()
            d.errback(InvocationError(P.INVOCATION_STOPPED, "connection to {} closed "
                                      "({})".format(self.factory.url, reason or code)))
        try:
            self.factory.handler.closed(self, code, reason)
        except Exception:
            self._log.failure("error after the connection to {url} closed",
                              url=self.factory.url)

    # -- sending -----------------------------------------------------------------------

    def send(self, message):
        """
        Send one message. @return: False when it cannot be encoded (logged) or the
        connection is not open, else True.
        """
        if self.state != self.STATE_OPEN:
            return False
        try:
            payload = P.encode(message)
        except (TypeError, ValueError, RecursionError):
            self._log.failure("dropped an unencodable {type} message",
                              type=message.get("type"))
            return False
        self.sendMessage(payload, False)
        return True

    def call(self, function_id, data=None, action=None, traceparent=None, baggage=None,
             metadata=None, timeout=None):
        """
        Call a function on the server.

        @param timeout: seconds, or None for no timeout of our own.
        @return: Deferred firing with the result (None at once for ``void``) or
            failing with L{InvocationError} (the server's error, ``invocation_stopped``
            when the connection closes, ``invocation_timeout``).
        """
        message = {"type": P.INVOKE_FUNCTION, "function_id": function_id, "data": data}
        for key, value in (("action", action), ("traceparent", traceparent),
                           ("baggage", baggage), ("metadata", metadata)):
            if value is not None:
                message[key] = value
        if action is not None and action.get("type") == "void":
            if not self.send(message):
                return _failed(function_id, self.factory.url)
            return succeed(None)
        invocation_id = message["invocation_id"] = next(self._ids)
        d = Deferred(lambda _: self._forget(invocation_id))
        timer = None
        if timeout:
            timer = self.factory.reactor.callLater(
                timeout, self._timed_out, invocation_id, function_id, timeout)
        self._pending[invocation_id] = (d, timer)
        if not self.send(message):
            self._forget(invocation_id)
            return _failed(function_id, self.factory.url)
        return d

    def _forget(self, invocation_id):
        entry = self._pending.pop(invocation_id, None)
        if entry is not None and entry[1] is not None and entry[1].active():
            entry[1].cancel()
        return entry

    def _timed_out(self, invocation_id, function_id, timeout):
        entry = self._pending.pop(invocation_id, None)
        if entry is not None:
            entry[0].errback(InvocationError(
                P.INVOCATION_TIMEOUT, "Invocation of {} timed out after {}ms".format(
                    function_id, int(timeout * 1000))))

    def _result(self, message):
        entry = self._forget(message.get("invocation_id"))
        if entry is None:
            self._log.info("dropped a result for no pending call: {invocation_id}",
                           invocation_id=message.get("invocation_id"))
            return
        error = message.get("error")
        if isinstance(error, dict):
            entry[0].errback(InvocationError.from_body(error))
        else:
            entry[0].callback(message.get("result"))

    # -- calls from the server ---------------------------------------------------------

    def _invoked(self, message):
        try:
            _check_invoke(message)
        except P.ProtocolError as e:
            self._log.warn("dropped an invokefunction from {url}: {reason}",
                           url=self.factory.url, reason=e.reason)
            invocation_id = message.get("invocation_id")
            if isinstance(invocation_id, str):
                self._answer_error(invocation_id, message.get("function_id"),
                                   InvocationError(P.INVALID_MESSAGE, e.reason))
            return
        invocation_id = message["invocation_id"]
        function_id = message["function_id"]
        d = maybeDeferred(self.factory.handler.invoke, self, message)
        if invocation_id is None:
            d.addErrback(self._log_void, function_id)
            return
        d.addCallbacks(self._answer, self._answer_failure,
                       callbackArgs=(invocation_id, function_id),
                       errbackArgs=(invocation_id, function_id))

    def _answer(self, result, invocation_id, function_id):
        message = {"type": P.INVOCATION_RESULT, "invocation_id": invocation_id,
                   "function_id": function_id}
        if result is not None:
            message["result"] = result
        if not self.send(message) and self.state == self.STATE_OPEN:
            self._answer_error(invocation_id, function_id, InvocationError(
                P.INVOCATION_FAILED, "the result of {} cannot be sent: it is not "
                "JSON".format(function_id)))

    def _answer_failure(self, failure, invocation_id, function_id):
        if failure.check(InvocationError):
            error = failure.value
        else:
            self._log.failure("call of {function_id} failed", failure,
                              function_id=function_id)
            error = InvocationError(P.INVOCATION_FAILED, failure.getErrorMessage())
        self._answer_error(invocation_id, function_id, error)

    def _answer_error(self, invocation_id, function_id, error):
        self.send({"type": P.INVOCATION_RESULT, "invocation_id": invocation_id,
                   "function_id": function_id if isinstance(function_id, str) else "",
                   "error": error.to_body()})

    def _log_void(self, failure, function_id):
        if not failure.check(InvocationError):
            self._log.failure("void call of {function_id} failed", failure,
                              function_id=function_id)


def _check_invoke(message):
    """
    Check an ``invokefunction`` against the worker protocol's schema, in place (absent
    optional keys become None). @raise P.ProtocolError: when it does not fit.
    """
    for field, (types, required) in P._SCHEMAS[P.INVOKE_FUNCTION].items():
        value = message.get(field)
        if value is None:
            if required:
                raise P.ProtocolError("invokefunction: missing required field "
                                      "{!r}".format(field), message)
            message[field] = None
        elif types is not P._ANY and not isinstance(value, types):
            raise P.ProtocolError("invokefunction: field {!r} has the wrong type".format(
                field), message)


def _failed(function_id, url):
    return fail(InvocationError(
        P.INVOCATION_STOPPED, "call of {} not sent: the connection to {} is not "
        "open".format(function_id, url)))


class WorkerClientFactory(WebSocketClientFactory):
    """
    Builds L{WorkerClientProtocol}s with the Autobahn options set on purpose.

    @ivar handler: an L{iii_twisted.interfaces.IWorkerClientHandler} (C{frame} is
        optional).
    """

    protocol = WorkerClientProtocol
    noisy = False

    def __init__(self, handler, reactor, url="ws://iii-engine/", headers=None,
                 max_message_size=16 * 1024 * 1024, ping_interval=1.0, ping_timeout=2.0,
                 handshake_timeout=5.0):
        """
        @param url: the WebSocket URL (its path and Host header; the endpoint given to
            L{connect} decides where the TCP/TLS connection goes).
        @param headers: extra handshake headers (C{{"Authorization": "Bearer ..."}}).
        @param ping_interval, ping_timeout: seconds; a server that stops answering
            pings is dropped (0 disables them).
        """
        WebSocketClientFactory.__init__(
            self, url, headers=headers or {}, reactor=reactor,
            useragent="iii-twisted/{}".format(__version__))
        self.handler = handler
        from ..worker import _ClockTimer
        self._batched_timer = _ClockTimer(reactor)
        self.setProtocolOptions(
            maxMessagePayloadSize=4 * max_message_size,
            maxFramePayloadSize=4 * max_message_size,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=2,
            failByDrop=False,
            utf8validateIncoming=False,
        )


def connect(reactor, address, factory):
    """
    Open a connection.

    @param address: a Twisted client endpoint string (C{"tcp:127.0.0.1:40123"},
        C{"tls:peer.example:40123"}).
    @return: Deferred firing with the L{WorkerClientProtocol} once TCP (and TLS) is up
        (the WebSocket handshake follows; the handler's C{opened} says when the
        server has registered it), or failing when the connection cannot be made.
    @raise ValueError: for an endpoint string Twisted does not parse.
    """
    return clientFromString(reactor, address).connect(factory)
