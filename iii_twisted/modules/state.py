"""
The state module, ``modules::state::StateModule`` (../shared/spec/modules.md §4):
scoped key-value state for workers, and the ``state`` trigger type.

Config (unknown keys refused)::

    adapter:
      class: modules::state::adapters::KvStore        # the default
      config:
        store_method: in_memory | file_based          # default in_memory
        file_path: ./data/state_store.db              # a directory (file_based)

    adapter:                                          # shared by engines (scale-out)
      class: modules::state::adapters::RedisAdapter
      config:
        redis_url: redis://localhost:6379             # the default; rediss:// for TLS

    adapter:                                          # kept on another engine
      class: modules::state::adapters::Bridge
      config:
        bridge_url: ws://localhost:49134              # the default (adapters/bridge.py)

Functions (inputs ignore unknown keys, such as ``_caller_worker_id``):

- ``state::set {scope, key, value}`` (``data`` is accepted for ``value``) ->
  ``{"old_value": previous|null, "new_value": value}``
- ``state::get {scope, key}`` -> the value, or no result
- ``state::delete {scope, key}`` -> the previous value itself, or no result
- ``state::update {scope, key, ops}`` -> ``{"old_value", "new_value"}``
- ``state::list {scope}`` -> the scope's values (``[]`` for an unknown scope)
- ``state::list_groups {}`` -> ``{"groups": [scopes, sorted]}``

Trigger type ``state``, config ``{scope?, key?, condition_function_id?}`` (exact
matches): after a write has been answered, each matching trigger's function is
called, one at a time, with ``{"type": "state", "event_type":
"state:created"|"state:updated"|"state:deleted", "scope", "key", "old_value",
"new_value"}``.
"""

from twisted.application.service import Service
from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..adapters import KV_STORE_SCHEMA, REDIS_SCHEMA
from ..adapters.bridge import BRIDGE_SCHEMA, state_store_from_config
from ..schema import Adapter, Adapters, Key, Section
from ..interfaces import IModule, InvalidUpdateOp, ITriggerProvider, KvStoreError, TriggerError
from ..protocol import InvocationError
from ..limits import check_stored
from ._kvcommon import (
    EventDispatcher, check_keys, input_error, kv_adapter_from_config, read_input,
)

KV_ADAPTER = "modules::state::adapters::KvStore"
REDIS_ADAPTER = "modules::state::adapters::RedisAdapter"
BRIDGE_ADAPTER = "modules::state::adapters::Bridge"
TRIGGER_TYPE = "state"
CONFIG_KEYS = ("adapter",)

# Every key of the module's config (iii_twisted/schema.py says how to add one).
CONFIG_SCHEMA = Section(
    adapter=Key(Adapters(
        Adapter("kv", (KV_ADAPTER,), KV_STORE_SCHEMA),
        Adapter("redis", (REDIS_ADAPTER,), REDIS_SCHEMA),
        Adapter("bridge", (BRIDGE_ADAPTER,), BRIDGE_SCHEMA),
    ), None, "where values are kept (default: kv in memory)"),
)

CREATED = "state:created"
UPDATED = "state:updated"
DELETED = "state:deleted"


def _store_error(failure, code, action):
    failure.trap(KvStoreError)
    raise InvocationError(code, "Failed to {}: {}".format(action, failure.getErrorMessage()))


@implementer(IModule, ITriggerProvider)
class StateModule(Service):
    """
    The state functions and the ``state`` trigger type over one L{IKvStore}.

    @ivar store: the L{iii_twisted.interfaces.IKvStore} (group = scope).
    """

    iii_class = None
    config_schema = CONFIG_SCHEMA
    # A reload hands the store to the new instance (iii_twisted/reload.py).
    reload_handover = ("store",)
    _log = Logger()

    def __init__(self, engine, config, reactor, store=None):
        """
        @param store: an L{IKvStore} to use instead of the configured adapter.
        @raise ConfigError: naming the key, for a config it cannot use.
        """
        check_keys(config, CONFIG_KEYS)
        if store is None:
            store, _ = kv_adapter_from_config(config, reactor, KV_ADAPTER,
                                              redis_class=REDIS_ADAPTER,
                                              bridge_class=BRIDGE_ADAPTER,
                                              bridge_store=state_store_from_config)
        self.store = store
        self._engine = engine
        self._triggers = {}  # trigger id -> (Trigger, scope, key)
        self._events = EventDispatcher(engine, engine.clock, TRIGGER_TYPE)
        for name, fn, description in [
            ("state::set", self.set, "Set a value in state"),
            ("state::get", self.get, "Get a value from state"),
            ("state::delete", self.delete, "Delete a value from state"),
            ("state::update", self.update,
             "Atomically update a value in state with a list of operations"),
            ("state::list", self.list, "List the values of a scope"),
            ("state::list_groups", self.list_groups, "List the scopes that hold values"),
        ]:
            engine.register_function(name, fn, description)
        engine.register_trigger_type(TRIGGER_TYPE, self, "State change trigger")

    def startService(self):
        Service.startService(self)
        # A store with a link (the Bridge adapter) opens it now; idempotent, so a
        # store handed over on reload is not opened twice.
        start = getattr(self.store, "start", None)
        if start is not None:
            start()

    def stopService(self):
        Service.stopService(self)
        self._events.stop()
        return self.store.close()

    # -- functions -------------------------------------------------------------------

    def set(self, data):
        """
        @return: Deferred firing with C{{"old_value", "new_value"}}; failing with
            InvocationError (``deserialization_error``, ``SET_ERROR``).
        """
        read_input("state::set", data, strings=("scope", "key"))
        check_stored(self._engine.limits, "state::set", data)
        if "value" in data:
            value = data["value"]
        elif "data" in data:
            value = data["data"]
        else:
            raise input_error("state::set", "missing field `value`")
        scope, key = data["scope"], data["key"]
        d = self.store.set(scope, key, value)
        d.addErrback(_store_error, "SET_ERROR", "set value")
        return d.addCallback(self._changed, scope, key)

    def get(self, data):
        """@return: Deferred firing with the value or None; failing with ``GET_ERROR``."""
        read_input("state::get", data, strings=("scope", "key"))
        return self.store.get(data["scope"], data["key"]).addErrback(
            _store_error, "GET_ERROR", "get value")

    def delete(self, data):
        """
        @return: Deferred firing with the previous value itself (None if there was
            none); failing with ``DELETE_ERROR``.
        """
        read_input("state::delete", data, strings=("scope", "key"))
        scope, key = data["scope"], data["key"]
        d = self.store.delete(scope, key).addErrback(
            _store_error, "DELETE_ERROR", "delete value")

        def deleted(result):
            old = result["old_value"]
            self._fire(DELETED, scope, key, old, None)
            return old
        return d.addCallback(deleted)

    def update(self, data):
        """
        @return: Deferred firing with C{{"old_value", "new_value"}}; failing with
            ``deserialization_error`` naming a malformed op, or ``UPDATE_ERROR``.
        """
        read_input("state::update", data, strings=("scope", "key"))
        check_stored(self._engine.limits, "state::update", data)
        scope, key = data["scope"], data["key"]
        d = self.store.update(scope, key, data.get("ops"))

        def failed(failure):
            if failure.check(InvalidUpdateOp):
                raise input_error("state::update", failure.value.message)
            return _store_error(failure, "UPDATE_ERROR", "update value")
        return d.addErrback(failed).addCallback(self._changed, scope, key)

    def list(self, data):
        """
        @return: Deferred firing with the scope's values, or with ``with_keys: true``
            (our addition, for the console) C{[{"key", "value"}]}; failing with
            ``LIST_ERROR``.
        """
        read_input("state::list", data, strings=("scope",))
        if data.get("with_keys") is True:
            d = self.store.items(data["scope"]).addCallback(
                lambda pairs: [{"key": k, "value": v} for k, v in pairs])
        else:
            d = self.store.list(data["scope"])
        return d.addErrback(_store_error, "LIST_ERROR", "list values")

    def list_groups(self, data):
        """@return: Deferred firing with C{{"groups": [...]}}; failing with ``LIST_GROUPS_ERROR``."""
        d = self.store.list_groups().addErrback(
            _store_error, "LIST_GROUPS_ERROR", "list groups")
        return d.addCallback(lambda groups: {"groups": sorted(set(groups))})

    # -- events ----------------------------------------------------------------------

    def _changed(self, result, scope, key):
        old = result["old_value"]
        self._fire(CREATED if old is None else UPDATED, scope, key, old,
                   result["new_value"])
        return result

    def _fire(self, event_type, scope, key, old, new):
        triggers = [trigger for trigger, t_scope, t_key in self._triggers.values()
                    if (t_scope is None or t_scope == scope) and (t_key is None or t_key == key)]
        if triggers:
            self._events.fire(triggers, {
                "type": "state", "event_type": event_type, "scope": scope, "key": key,
                "old_value": old, "new_value": new,
            })

    # -- ITriggerProvider ------------------------------------------------------------

    def register_trigger(self, trigger):
        """
        @return: Deferred firing with None; failing with TriggerError for a config
            that is not an object or has a non-string filter.
        """
        config = trigger.config
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise TriggerError("state trigger config must be an object with optional "
                               "scope, key and condition_function_id")
        for name in ("scope", "key", "condition_function_id"):
            if config.get(name) is not None and not isinstance(config[name], str):
                raise TriggerError("state trigger config: {} must be a string, not {}"
                                   .format(name, type(config[name]).__name__))
        self._triggers[trigger.id] = (trigger, config.get("scope"), config.get("key"))
        return succeed(None)

    def unregister_trigger(self, trigger):
        """@return: Deferred firing with None."""
        current = self._triggers.get(trigger.id)
        if current is not None and current[0] is trigger:
            del self._triggers[trigger.id]
        return succeed(None)
