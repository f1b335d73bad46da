"""
Function hosts and trigger providers that are not modules: a Python callable run
in-process (L{CallableHost}), a worker connection (L{WorkerHost},
L{WorkerTriggerProvider}), and the engine's own event trigger types
(L{EngineEventsProvider}). Each implements L{IFunctionHost} or L{ITriggerProvider}.
"""

import traceback
from inspect import iscoroutine

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import protocol as P
from .interfaces import IFunctionHost, ITriggerProvider
from .limits import LIMIT_EXCEEDED
from .namespaces import plain
from .peer_limits import NotSent
from .protocol import InvocationError


@implementer(IFunctionHost)
class CallableHost:
    """
    Runs a function in-process: a Python callable taking the call's data and returning
    a value, a Deferred or a coroutine. Raising L{InvocationError} fails the call with
    that code; any other exception becomes ``invocation_failed``.
    """

    _log = Logger()
    host_kind = "in-process"  # what engine::functions::list says with include_host

    def __init__(self, fn):
        self._fn = fn

    def invoke(self, function_id, invocation_id, data, traceparent, baggage, metadata=None):
        # metadata: in-process functions take the data only.
        try:
            result = self._fn(data)
        except InvocationError as e:
            return fail(e)
        except Exception as e:
            return fail(self._as_invocation_error(Failure(e), function_id))
        if isinstance(result, Deferred):
            return result.addErrback(self._as_invocation_error, function_id)
        if iscoroutine(result):
            return Deferred.fromCoroutine(result).addErrback(
                self._as_invocation_error, function_id
            )
        return succeed(result)

    def _as_invocation_error(self, failure, function_id):
        if failure.check(InvocationError, CancelledError):
            return failure
        self._log.failure("in-process function {function_id} failed", failure,
                          function_id=function_id)
        return Failure(InvocationError(
            P.INVOCATION_FAILED,
            failure.getErrorMessage(),
            # The three-argument form: Python 3.9 (PyPy) has no one-argument one.
            "".join(traceback.format_exception(
                type(failure.value), failure.value, failure.value.__traceback__)),
        ))


@implementer(IFunctionHost)
class WorkerHost:
    """Runs a function on a worker: ``invokefunction`` out, ``invocationresult`` back."""

    __slots__ = ("_tracker", "_worker", "_limits")
    host_kind = "worker"

    def __init__(self, tracker, worker, limits=None):
        self._tracker = tracker
        self._worker = worker
        self._limits = limits

    def invoke(self, function_id, invocation_id, data, traceparent, baggage, metadata=None):
        if self._worker.connection.congested:
            return fail(self._congested(function_id))
        # Recorded before it is sent: a fast reply must find its entry (the reference
        # engine has this race, engine-core.md §4.5).
        d = self._tracker.add(invocation_id, function_id, self._worker)
        session = self._worker.session
        message = {
            "type": P.INVOKE_FUNCTION,
            "invocation_id": invocation_id,
            # A namespaced function's own id; a session's function_registration_prefix
            # is the engine's, not the worker's: it gets the id it registered.
            "function_id": plain(function_id) if session is None
            else session.local_id(plain(function_id)),
            "data": data,
        }
        if traceparent is not None:
            message["traceparent"] = traceparent
        if baggage is not None:
            message["baggage"] = baggage
        if metadata is not None:
            message["metadata"] = metadata
        sent = self._worker.connection.send(message)
        if not sent:
            # The data holds something JSON cannot carry (an in-process caller's
            # Python object), or makes a frame larger than the worker accepts
            # (peer_limits): fail now rather than at the timeout.
            self._tracker.resolve(invocation_id, self._worker, None, not_sent_error(
                sent, "the data for {} cannot be sent: it is not JSON".format(function_id),
                "call of {} not forwarded".format(function_id)))
        return d

    def _congested(self, function_id):
        # Backpressure: the worker does not read what it was sent (limits.rst).
        if self._limits is not None:
            self._limits.count("calls_refused_congested")
        return InvocationError(LIMIT_EXCEEDED, (
            "worker {} does not read its connection (over limits.send_buffer_soft): "
            "call of {} not forwarded").format(self._worker.id, function_id))


@implementer(ITriggerProvider)
class WorkerTriggerProvider:
    """
    A worker that registered a trigger type: triggers of that type are sent to it as
    ``registertrigger``; its ``triggerregistrationresult`` is recorded by the engine.
    """

    def __init__(self, worker):
        self.worker = worker

    def register_trigger(self, trigger):
        message = {
            "type": P.REGISTER_TRIGGER,
            "id": trigger.id,
            "trigger_type": trigger.trigger_type,
            "function_id": trigger.function_id,
            "config": trigger.config,
        }
        if trigger.metadata is not None:
            message["metadata"] = trigger.metadata
        self.worker.connection.send(message)
        return succeed(None)

    def unregister_trigger(self, trigger):
        self.worker.connection.send({
            "type": P.UNREGISTER_TRIGGER,
            "id": trigger.id,
            "trigger_type": trigger.trigger_type,
        })
        return succeed(None)


@implementer(ITriggerProvider)
class EngineEventsProvider:
    """
    Provides ``engine::workers-available`` and ``engine::functions-available``: the
    engine fires their triggers itself (L{Engine.fire_triggers}), so there is nothing
    to start or stop per trigger.
    """

    def register_trigger(self, trigger):
        return succeed(None)

    def unregister_trigger(self, trigger):
        return succeed(None)


def not_sent_error(sent, not_json, what):
    """
    The error body for a message a connection did not send: C{sent} is what its
    C{send} returned (False: not JSON; a L{NotSent}: why, e.g. too large).
    """
    if isinstance(sent, NotSent):
        return P.error_body(sent.code, "{}: {}".format(what, sent.message))
    return P.error_body(P.INVOCATION_FAILED, not_json)
