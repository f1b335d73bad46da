"""
What the state and stream modules share: reading a built-in function's input,
choosing the KvStore adapter, and delivering trigger events one by one after the
write that caused them has been answered.
"""

from collections import deque

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .. import protocol as P
from ..adapters import kv_store_from_config
from ..config import ConfigError
from ..protocol import InvocationError


def input_error(function_id, reason):
    """@return: the InvocationError for an input that cannot be used, as the reference words it."""
    return InvocationError(
        P.DESERIALIZATION_ERROR,
        "Failed to deserialize input for {}: {}".format(function_id, reason))


def read_input(function_id, data, strings=(), optional_strings=()):
    """
    Check a built-in function's input: an object whose C{strings} fields are strings
    (and C{optional_strings} strings or null/absent). Other keys are ignored.

    @return: C{data}.
    @raise InvocationError: ``deserialization_error`` naming the field.
    """
    if not isinstance(data, dict):
        raise input_error(function_id, "expected an object, got {}".format(
            "null" if data is None else type(data).__name__))
    for name in strings:
        value = data.get(name)
        if value is None:
            raise input_error(function_id, "missing field `{}`".format(name))
        if not isinstance(value, str):
            raise input_error(function_id, "field `{}` must be a string, not {}".format(
                name, type(value).__name__))
    for name in optional_strings:
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise input_error(function_id, "field `{}` must be a string, not {}".format(
                name, type(value).__name__))
    return data


def check_keys(config, known):
    """@raise ConfigError: for a key of C{config} not in C{known}, naming it."""
    for key in config:
        if key not in known:
            raise ConfigError("unknown key {!r}; known keys: {}".format(
                key, ", ".join(known)), key)


def kv_adapter_from_config(config, reactor, kv_class, extra_keys=(), redis_class=None,
                           redis_prefixes=("state:", ""), bridge_class=None,
                           bridge_store=None):
    """
    Build the store of an ``adapter: {class, config}`` entry (absent: the default
    C{kv_class} in memory).

    @param redis_class: the class name of the Redis adapter, if the module has one;
        its config is ``{redis_url}`` (L{iii_twisted.adapters.redis_kv}).
    @param redis_prefixes: (key prefix, group prefix) of the Redis store.
    @param bridge_class: the class name of the module's ``Bridge`` adapter, if any;
        C{bridge_store(adapter_config, reactor)} builds its store
        (L{iii_twisted.adapters.bridge}).
    @return: (store, adapter config mapping).
    @raise ConfigError: naming ``adapter.class`` for an unknown class, or the
        adapter config key at fault.
    """
    adapter = config.get("adapter")
    if adapter is None:
        return kv_store_from_config({}, reactor), {}
    if not isinstance(adapter, dict):
        raise ConfigError("must be a mapping with a class", "adapter")
    try:
        check_keys(adapter, ("class", "config"))
    except ConfigError as e:
        raise e.within("adapter")
    name = adapter.get("class")
    known = [kv_class] + ([redis_class] if redis_class else []) + (
        [bridge_class] if bridge_class else [])
    if name not in known:
        raise ConfigError("Adapter factory {!r} not found. Available: [{}]".format(
            name, ", ".join(known)), "adapter.class")
    adapter_config = adapter.get("config") or {}
    if not isinstance(adapter_config, dict):
        raise ConfigError("must be a mapping", "adapter.config")
    try:
        if name == bridge_class:
            store = bridge_store(adapter_config, reactor)
        elif name == redis_class:
            from ..adapters import redis_kv_store_from_config
            store = redis_kv_store_from_config(adapter_config, reactor, name,
                                               redis_prefixes, extra_keys)
        else:
            store = kv_store_from_config(adapter_config, reactor, extra_keys=extra_keys)
    except ConfigError as e:
        if e.key == "adapter.class":
            raise
        raise e.within("adapter.config")
    return store, adapter_config


class EventDispatcher:
    """
    Delivers trigger events in the order they were fired, one call at a time: for
    each event, each of its triggers' condition (if any) and then its function, each
    awaited before the next. Delivery starts on a later reactor turn than C{fire},
    so the write that fired an event is always answered before any handler runs.

    Events waiting are bounded by C{max_pending}; past it new events are dropped and
    counted (a warning is logged), so slow handlers cannot grow memory without bound.

    @ivar dropped: how many events were dropped.
    """

    _log = Logger()

    def __init__(self, engine, clock, kind, max_pending=10000):
        self._engine = engine
        self._clock = clock
        self._kind = kind
        self._max_pending = max_pending
        self._queue = deque()
        self._scheduled = None
        self._running = False
        self._stopped = False
        self.dropped = 0

    def fire(self, triggers, payload):
        """Queue C{payload} for each of C{triggers} (a list of L{Trigger})."""
        if not triggers or self._stopped:
            return
        if len(self._queue) >= self._max_pending:
            self.dropped += 1
            self._log.warn(
                "{kind} trigger event dropped: {count} events already wait for slow "
                "handlers ({dropped} dropped so far)", kind=self._kind,
                count=len(self._queue), dropped=self.dropped)
            return
        self._queue.append((triggers, payload))
        if not self._running and self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._start)

    def _start(self):
        self._scheduled = None
        self._running = True
        Deferred.fromCoroutine(self._drain()).addErrback(
            lambda f: self._log.failure("{kind} trigger delivery failed", f, kind=self._kind))

    async def _drain(self):
        try:
            while self._queue and not self._stopped:
                triggers, payload = self._queue.popleft()
                for trigger in triggers:
                    if self._engine.triggers.get(trigger.id) is not trigger:
                        continue  # unregistered since the event fired
                    await self._deliver(trigger, payload)
        finally:
            self._running = False

    async def _deliver(self, trigger, payload):
        try:
            proceed = await self._engine.check_condition(trigger, payload)
        except InvocationError as e:
            self._log.error(
                "condition of {kind} trigger {trigger_id} failed: {error}; handler "
                "skipped", kind=self._kind, trigger_id=trigger.id, error=e)
            return
        except Exception:
            self._log.failure("condition of {kind} trigger {trigger_id} failed",
                              kind=self._kind, trigger_id=trigger.id)
            return
        if not proceed:
            return
        try:
            await self._engine.call(trigger.function_id, payload,
                                        metadata=trigger.metadata)
        except InvocationError as e:
            self._log.error(
                "handler {function_id} of {kind} trigger {trigger_id} failed: {error}",
                function_id=trigger.function_id, kind=self._kind, trigger_id=trigger.id,
                error=e)
        except Exception:
            self._log.failure("handler {function_id} of {kind} trigger {trigger_id} failed",
                              function_id=trigger.function_id, kind=self._kind,
                              trigger_id=trigger.id)

    def stop(self):
        """Drop waiting events and cancel the scheduled start."""
        self._stopped = True
        self._queue.clear()
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
