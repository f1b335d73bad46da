"""
The registry's records: a connected worker (L{WorkerRecord}), a function and its host
(L{FunctionEntry}), a trigger type and its provider (L{TriggerType}), a trigger
(L{Trigger}), and what a call observer sees of a call (L{CallInfo}).

They hold state only; L{iii_twisted.engine.Engine} keeps them in its registries and
changes them. Their C{info()} forms are what the discovery functions list.
"""

from .namespaces import plain

# Trigger states, as engine::triggers::list shows them.
PENDING = "pending"  # no provider for its type (yet)
ACTIVE = "active"  # handed to its provider
FAILED = "failed"  # a worker provider answered with an error


class WorkerRecord:
    """
    One connected worker: its connection, metadata and what it owns.

    @ivar functions: ids of the functions this worker currently hosts.
    @ivar triggers: ids of the triggers it registered.
    @ivar trigger_types: ids of the trigger types it provides.
    @ivar active_calls: its own calls still waiting for a result.
    @ivar session: its L{iii_twisted.auth.Session}, or None on a listener without
        auth (every grant).
    @ivar declared: what it declared in ``engine::workers::register`` beyond the v0.10
        keys (``description``, ``isolation``, ``features``, ``namespace``; see
        L{iii_twisted.discovery_current}), {} until then.
    """

    __slots__ = (
        "id", "connection", "ip_address", "connected_at_ms", "name", "runtime",
        "version", "os", "pid", "telemetry", "functions", "triggers", "trigger_types",
        "active_calls", "host", "reattach_token", "session", "declared", "held",
        "__weakref__",
    )

    def __init__(self, worker_id, connection, ip_address, connected_at_ms):
        self.id = worker_id
        self.connection = connection
        self.ip_address = ip_address
        self.connected_at_ms = connected_at_ms
        self.name = self.runtime = self.version = self.os = self.pid = None
        self.telemetry = None
        self.functions = set()
        self.triggers = set()
        self.trigger_types = set()
        self.active_calls = 0
        self.host = None
        self.reattach_token = None
        self.session = None
        # Messages waiting while a registration hook decides (iii_twisted.auth), or None.
        self.held = None
        self.declared = {}

    def __repr__(self):
        return "<Worker {} {!r}>".format(self.id, self.name)


class FunctionEntry:
    """A registered function: its id, description and formats, and its host."""

    __slots__ = (
        "function_id", "description", "request_format", "response_format", "metadata",
        "host", "owner",
    )

    def __init__(self, function_id, host, owner=None, description=None,
                 request_format=None, response_format=None, metadata=None):
        self.function_id = function_id
        self.host = host
        self.owner = owner
        self.description = description
        self.request_format = request_format
        self.response_format = response_format
        self.metadata = metadata

    def info(self):
        """@return: the FunctionInfo dict of engine::functions::list."""
        return {
            "function_id": plain(self.function_id),
            "description": self.description,
            "request_format": self.request_format,
            "response_format": self.response_format,
            "metadata": self.metadata,
        }


class TriggerType:
    """A trigger type and the provider that makes its triggers fire."""

    __slots__ = (
        "id", "description", "provider", "owner", "trigger_request_format",
        "call_request_format",
    )

    def __init__(self, type_id, provider, description=None, owner=None,
                 trigger_request_format=None, call_request_format=None):
        self.id = type_id
        self.provider = provider
        self.description = description
        self.owner = owner
        self.trigger_request_format = trigger_request_format
        self.call_request_format = call_request_format


class Trigger:
    """
    A binding of a trigger type, a function id and a config.

    @ivar status: L{PENDING} (no provider yet, or its provider has not yet said it is
        live), L{ACTIVE} or L{FAILED}.
    @ivar provided: True once the provider of its type was handed it (until that
        provider goes): the provider must then be told when it is unregistered.
    @ivar error: the ErrorBody a worker provider refused it with, or None.
    """

    __slots__ = (
        "id", "trigger_type", "function_id", "config", "owner", "metadata", "status",
        "error", "provided",
    )

    def __init__(self, trigger_id, trigger_type, function_id, config, owner=None,
                 metadata=None):
        self.id = trigger_id
        self.trigger_type = trigger_type
        self.function_id = function_id
        self.config = config
        self.owner = owner
        self.metadata = metadata
        self.status = PENDING
        self.error = None
        self.provided = False

    def info(self):
        """@return: the TriggerInfo dict of engine::triggers::list (plus status)."""
        info = {
            "id": self.id,
            "trigger_type": self.trigger_type,
            "function_id": self.function_id,
            "config": self.config,
            "status": self.status,
        }
        if self.error is not None:
            info["error"] = self.error
        return info


class CallInfo:
    """What an L{ICallObserver} sees of one call; it may replace the trace context."""

    __slots__ = ("function_id", "invocation_id", "caller_id", "traceparent", "baggage")

    def __init__(self, function_id, invocation_id, caller_id, traceparent, baggage):
        self.function_id = function_id
        self.invocation_id = invocation_id
        self.caller_id = caller_id
        self.traceparent = traceparent
        self.baggage = baggage
