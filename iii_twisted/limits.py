"""
Limits: what one client may take of the engine (docs/limits.rst lists them all).

The engine keeps one L{Limits} (``engine.limits``), read from the ``limits:`` mapping
of ``iii-config.yaml``. The checks here are called from small hooks in the core
(registrations, calls to a worker, channel creation) and in the socket protocols
(send buffers, frames being received); each refusal is logged, counted in
L{Limits.counters} (shown in ``engine::metrics::list`` and the Prometheus text as
``iii_limit_events_total``) and answered with a clear error.

Costs on the hot path are integer compares: a value is walked (depth, size) only
where it is kept (a registration, a state or stream value, a queued message).
"""

from collections import OrderedDict

from twisted.logger import Logger

from . import protocol as P
from .oplog import describe_worker
from .schema import Key, Section

_log = Logger()

MiB = 1024 * 1024

# config key -> (attribute, type, default, what it bounds). Sizes are bytes of the
# value written as compact JSON; lengths are characters.
SETTINGS = OrderedDict([
    ("max_functions_per_worker", ("functions_per_worker", int, 10000,
                                  "functions one worker connection may register")),
    ("max_triggers_per_worker", ("triggers_per_worker", int, 10000,
                                 "triggers one worker connection may register")),
    ("max_trigger_types_per_worker", ("trigger_types_per_worker", int, 1000,
                                      "trigger types one worker connection may provide")),
    ("max_services_per_worker", ("services_per_worker", int, 1000,
                                 "services one worker connection may register")),
    ("max_channels_per_worker", ("channels_per_worker", int, 1000,
                                 "live data channels one worker connection may create")),
    ("max_id_length", ("id_length", int, 1024,
                       "characters of a function, trigger, trigger type or service id")),
    ("max_description_length", ("description_length", int, 64 * 1024,
                                "characters of a description or a service name")),
    ("max_metadata_size", ("metadata_size", int, 1 * MiB,
                           "bytes of a registration's metadata, and of each of its "
                           "request/response formats")),
    ("max_trigger_config_size", ("trigger_config_size", int, 1 * MiB,
                                 "bytes of a trigger's config")),
    ("max_value_depth", ("value_depth", int, 64,
                         "nesting depth of any value the engine keeps")),
    ("send_buffer_soft", ("send_buffer_soft", int, 8 * MiB,
                          "bytes waiting to be sent to one peer before the engine stops "
                          "reading it and stops forwarding calls to it")),
    ("send_buffer_hard", ("send_buffer_hard", int, 128 * MiB,
                          "bytes waiting to be sent to one peer before it is dropped")),
    ("send_stall_timeout_ms", ("send_stall_timeout_ms", int, 60000,
                               "ms a peer may stay over send_buffer_soft before it is "
                               "dropped")),
    ("large_frame_size", ("large_frame_size", int, 1 * MiB,
                          "bytes from which a frame being received counts against "
                          "frames_in_flight_budget")),
    ("frames_in_flight_budget", ("frames_in_flight_budget", int, 256 * MiB,
                                 "bytes of large frames being received at once, over "
                                 "all connections")),
    ("max_connections_per_address", ("connections_per_address", int, 512,
                                     "open connections from one client IP address, per "
                                     "port")),
    ("http_header_timeout_ms", ("http_header_timeout_ms", int, 10000,
                                "ms an HTTP client has to send a request's headers "
                                "(the worker port's WebSocket handshake has "
                                "handshake_timeout_ms)")),
    ("http_idle_timeout_ms", ("http_idle_timeout_ms", int, 60000,
                              "ms an HTTP connection may stay idle")),
])

LIMIT_EXCEEDED = "limit_exceeded"  # our error code: a quota of limits.rst was hit

# The ``limits:`` section of the config (iii_twisted/schema.py validates it).
LIMITS_SCHEMA = Section(**{
    key: Key(kind, default, doc, min=1) for key, (attr, kind, default, doc) in SETTINGS.items()
})


class LimitError(ValueError):
    """A value or a registration over one of the L{Limits}; C{str()} says which."""


class Limits:
    """
    The engine's limits (see L{SETTINGS} for each attribute, its default and config
    key) and the counters of what they refused.

    @ivar counters: event name -> count: ``quota_refused`` (registrations and channel
        creations refused), ``calls_refused_congested`` (calls not forwarded to a
        worker that does not read), ``peers_paused``, ``peers_dropped_slow``,
        ``frames_waited`` (large frames held back by the budget),
        ``frames_refused_budget``, ``connections_refused_per_address``,
        ``handshakes_timed_out``.
    """

    def __init__(self, **values):
        """
        @param values: attribute names of L{SETTINGS} (``functions_per_worker=...``).
        @raise TypeError: for an unknown name.
        """
        for key, (attr, kind, default, _) in SETTINGS.items():
            setattr(self, attr, values.pop(attr, default))
        if values:
            raise TypeError("unknown limits: {}".format(", ".join(sorted(values))))
        self.counters = dict.fromkeys((
            "quota_refused", "calls_refused_congested", "peers_paused",
            "peers_dropped_slow", "frames_waited", "frames_refused_budget",
            "connections_refused_per_address", "handshakes_timed_out"), 0)
        self._refusals = OrderedDict()  # function id -> why its registration was refused

    @classmethod
    def from_config(cls, mapping):
        """
        @param mapping: the ``limits:`` mapping of the config file, validated by
            L{LIMITS_SCHEMA} (or None).
        @return: a L{Limits}.
        @raise ConfigError: naming ``limits.send_buffer_hard`` when it is below
            ``send_buffer_soft`` (types, ranges and unknown keys are the schema's).
        """
        values = {}
        for key, value in (mapping or {}).items():
            if value is not None:
                values[SETTINGS[key][0]] = value
        limits = cls(**values)
        if limits.send_buffer_hard < limits.send_buffer_soft:
            from .config import ConfigError
            raise ConfigError("must be at least send_buffer_soft ({})".format(
                limits.send_buffer_soft), "limits.send_buffer_hard")
        return limits

    def settings(self):
        """@return: {attribute: value} of every limit (not the counters)."""
        return {attr: getattr(self, attr) for attr, _, _, _ in SETTINGS.values()}

    def update_from(self, other):
        """Take C{other}'s limits (a config reload), keeping these counters."""
        for attr, value in other.settings().items():
            setattr(self, attr, value)

    def count(self, event):
        self.counters[event] = self.counters.get(event, 0) + 1

    # -- values the engine keeps -----------------------------------------------------

    def check_value(self, value, what, max_size=None):
        """
        Check a value the engine is about to keep: its nesting depth and, given a
        C{max_size}, that JSON can carry it (no NaN or infinity, whatever its
        spelling) and its size.

        @param what: how to name it in the error (``metadata``, ``state value``).
        @param max_size: bytes of its compact JSON, or None for a depth check only
            (values from the wire were checked for non-finite numbers as they were
            read).
        @raise LimitError: saying what is wrong.
        """
        if value is None or isinstance(value, (str, int, float, bool)):
            if isinstance(value, float) and value - value != 0.0:
                raise LimitError("{} is not JSON: NaN and infinities are refused".format(what))
            if max_size is None or not isinstance(value, str) or len(value) <= max_size // 4:
                return
        elif too_deep(value, self.value_depth):
            raise LimitError("{} is nested deeper than max_value_depth ({})".format(
                what, self.value_depth))
        if max_size is None:
            return
        try:
            encoded = P.encode(value)
        except (TypeError, ValueError, RecursionError):
            raise LimitError("{} is not JSON (NaN, infinity or another value JSON "
                             "cannot carry)".format(what))
        if max_size is not None and len(encoded) > max_size:
            raise LimitError("{} is {} bytes, over {} bytes".format(
                what, len(encoded), max_size))

    # -- registrations (hooks in Engine._handle_register*) ---------------------------

    def _refuse(self, worker, kind, ident, reason):
        self.count("quota_refused")
        _log.warn("refused {kind} {ident} from {worker}: {reason}",
                  kind=kind, ident=_short(ident), worker=describe_worker(worker),
                  worker_id=worker.id, reason=reason)
        return reason

    def _check_common(self, worker, kind, ident, owned, quota, quota_key, key=None):
        if len(ident) > self.id_length:
            return "its id is {} characters, over max_id_length ({})".format(
                len(ident), self.id_length)
        if (ident if key is None else key) not in owned and len(owned) >= quota:
            return "the worker has {} {}s, the most {} allows".format(
                len(owned), kind.replace("_", " "), quota_key)
        return None

    def _check_description(self, message, field="description"):
        description = message.get(field)
        if isinstance(description, str) and len(description) > self.description_length:
            return "its {} is {} characters, over max_description_length ({})".format(
                field, len(description), self.description_length)
        return None

    def _check_values(self, message, fields, max_size, size_key):
        for field in fields:
            try:
                self.check_value(message.get(field), field, max_size)
            except LimitError as e:
                return "{} (limits.{} / max_value_depth)".format(e, size_key)
        return None

    def refuse_function(self, worker, message):
        """
        @return: why a ``registerfunction`` is refused, or None to accept it. A refused
            id is remembered, so that calling it says why (L{refusal}).
        """
        ident = message["id"]
        reason = (self._check_common(worker, "function", ident, worker.functions,
                                     self.functions_per_worker, "max_functions_per_worker")
                  or self._check_description(message)
                  or self._check_values(message, ("metadata", "request_format",
                                                  "response_format", "invocation"),
                                        self.metadata_size, "max_metadata_size"))
        if reason is None:
            self._refusals.pop(ident, None)
            return None
        if len(ident) <= self.id_length:
            self._refusals[ident] = reason
            if len(self._refusals) > 1000:
                self._refusals.popitem(last=False)
        return self._refuse(worker, "function", ident, reason)

    def refusal(self, function_id):
        """@return: why the last registration of C{function_id} was refused, or None."""
        return self._refusals.get(function_id)

    def refuse_trigger_type(self, worker, message):
        """@return: why a ``registertriggertype`` is refused, or None."""
        ident = message["id"]
        reason = (self._check_common(worker, "trigger_type", ident, worker.trigger_types,
                                     self.trigger_types_per_worker,
                                     "max_trigger_types_per_worker")
                  or self._check_description(message)
                  or self._check_values(message, ("trigger_request_format",
                                                  "call_request_format"),
                                        self.metadata_size, "max_metadata_size"))
        return reason and self._refuse(worker, "trigger type", ident, reason)

    def refuse_trigger(self, worker, message):
        """@return: why a ``registertrigger`` is refused, or None."""
        ident = message["id"]
        reason = (self._check_common(worker, "trigger", ident, worker.triggers,
                                     self.triggers_per_worker, "max_triggers_per_worker")
                  or _too_long(message["trigger_type"], "trigger_type", self.id_length)
                  or _too_long(message["function_id"], "function_id", self.id_length)
                  or self._check_values(message, ("config",), self.trigger_config_size,
                                        "max_trigger_config_size")
                  or self._check_values(message, ("metadata",), self.metadata_size,
                                        "max_metadata_size"))
        return reason and self._refuse(worker, "trigger", ident, reason)

    def refuse_service(self, worker, message, owned):
        """@return: why a ``registerservice`` is refused, or None."""
        ident = message["id"]
        reason = (self._check_common(worker, "service", ident, owned,
                                     self.services_per_worker, "max_services_per_worker",
                                     message["name"] or ident)
                  or _too_long(message["name"], "name", self.id_length)
                  or _too_long(message["parent_service_id"], "parent_service_id",
                               self.id_length)
                  or self._check_description(message))
        return reason and self._refuse(worker, "service", ident, reason)


def _too_long(value, field, limit):
    if isinstance(value, str) and len(value) > limit:
        return "its {} is {} characters, over max_id_length ({})".format(
            field, len(value), limit)
    return None


def _short(ident):
    return ident if len(ident) <= 80 else ident[:77] + "..."


def too_deep(value, max_depth):
    """
    @return: True if C{value} (decoded JSON) nests lists and objects deeper than
        C{max_depth} (a scalar has depth 0, C{[]} depth 1, C{[[]]} depth 2). Walks
        without recursion, so any depth the decoder produced can be measured.
    """
    if not isinstance(value, (dict, list)):
        return False
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > max_depth:
            return True
        for item in (node.values() if isinstance(node, dict) else node):
            if isinstance(item, (dict, list)):
                push((item, depth + 1))
    return False


def check_stored(limits, function_id, data):
    """
    The hook of the functions that keep their input (``state::set``, ``stream::set``,
    their ``update``s, an enqueued message): refuse a value nested deeper than
    ``max_value_depth``, so that nothing accepted fails to be written or replayed.

    @raise InvocationError: ``limit_exceeded`` naming the function and the limit.
    """
    try:
        limits.check_value(data, "its input")
    except LimitError as e:
        raise P.InvocationError(LIMIT_EXCEEDED, "{}: {}".format(function_id, e))


# -- descriptors -----------------------------------------------------------------------


def raise_nofile_limit(log=_log):
    """
    Raise this process's soft limit of open descriptors to its hard limit, so that
    slow or idle connections do not leave none for new workers. (The engine's
    start-up report logs the result.)

    @param log: where a failure to raise it is logged.
    @return: (soft, soft before, hard), or None where the platform has no
        C{resource} module.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        wanted = 1048576  # an unlimited hard limit still has a kernel ceiling
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            log.warn("could not raise the open-file limit from {soft} to {hard}: {error}",
                     soft=soft, hard=wanted, error=e)
    new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return new_soft, soft, new_hard


def release_receive_buffers(protocol):
    """
    Drop what an Autobahn protocol holds of frames it was still receiving. Called when
    its connection is lost: the protocol object can outlive its connection for a while
    (reference cycles wait for the collector), and a partly received large frame must
    not live on with it.
    """
    protocol.data = b""
    protocol.message_data = None
    protocol.frame_data = None
    protocol.current_frame = None
