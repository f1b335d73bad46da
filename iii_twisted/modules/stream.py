"""
The stream module, ``modules::stream::StreamModule`` (../shared/spec/modules.md §5):
items in groups of named streams, pushed live to WebSocket clients.

Config (unknown keys refused)::

    port: 3112                 # the client WebSocket port
    host: 0.0.0.0              # an IP literal, as in the reference
    auth_function: my::auth    # optional: called on every client connection
    auth:                      # optional: clients need one of these tokens
      tokens: [{name: web, token: "${STREAM_TOKEN}"}]
    adapter:
      class: modules::stream::adapters::KvStore
      config: {store_method: in_memory|file_based, file_path: DIR, channel_size: N}
    # or, shared by every engine on one Redis (items and pushes; docs/scale-out.rst):
    adapter:
      class: modules::stream::adapters::RedisAdapter
      config: {redis_url: redis://localhost:6379}
    # or, kept on another engine (the hub) through its stream::* and pub/sub
    # (iii_twisted/adapters/bridge.py):
    adapter:
      class: modules::stream::adapters::Bridge
      config: {bridge_url: ws://localhost:49134}

Client wire protocol (path ``/`` only; anything else is a 404)::

    client -> engine   {"type": "join",  "data": {"subscriptionId": S, "streamName": N,
                                                  "groupId": G, "id": ITEM (optional)}}
                       {"type": "leave", "data": {same}}
    engine -> client   {"type": "stream", "timestamp": MS, "streamName": N, "groupId": G,
                        "id": ITEM|null, "event": EVENT}

where EVENT is ``{"type": "create"|"update"|"delete"|"sync", "data": V}``,
``{"type": "event", "event": {"type": T, "data": V}}`` (``stream::send``) or
``{"type": "unauthorized"}`` (a ``stream:join`` trigger refused the join). A join
first calls every ``stream:join`` trigger, then subscribes and sends a ``sync`` with
the item (``id`` given) or the group's items. Pushes go once per matching
subscription: same stream and group, and no item id or the event's.

Bad input is dropped (undecodable JSON, unknown types, malformed join/leave). A
client cannot grow the engine's memory without bound: inbound messages are capped at
``MAX_MESSAGE_SIZE``; while more than ``MAX_INBOX`` messages wait, reading from the
client pauses; subscriptions per client are capped; and what waits to be written to
a client that does not read is capped at ``MAX_OUTBOUND_BYTES``, past which the
client is dropped.

Functions: ``stream::set/get/delete/list/list_groups/list_all/send/update``. For
set/get/delete/list/list_groups/update, a function registered as
``stream::<op>(<stream_name>)`` (the SDKs' ``create_stream``) takes over that
operation for that stream. Trigger types: ``stream`` (``{stream_name, group_id?,
item_id?, condition_function_id?}``), ``stream:join`` and ``stream:leave``.
"""

import ipaddress
from collections import deque
from urllib.parse import quote, unquote
from uuid import uuid4

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .. import __version__
from ..adapters import KV_STORE_SCHEMA, REDIS_SCHEMA
from ..adapters.bridge import BRIDGE_SCHEMA, BridgeStreamBus, stream_store_from_config
from ..auth import AuthRefused, Authenticator, parse_auth_config
from ..config import ConfigError, get_option
from ..listeners import Listener
from ..schema import Adapter, Adapters, Key, Section
from ..interfaces import IModule, InvalidUpdateOp, ITriggerProvider, KvStoreError, TriggerError
from ..protocol import InvocationError, encode, loads
from ..worker import send_close
from ..adapters.ops import validate_ops
from ..connlimits import AddressCounter
from ..limits import check_stored, release_receive_buffers
from ._kvcommon import (
    EventDispatcher, check_keys, input_error, kv_adapter_from_config, read_input,
)

KV_ADAPTER = "modules::stream::adapters::KvStore"
REDIS_ADAPTER = "modules::stream::adapters::RedisAdapter"
BRIDGE_ADAPTER = "modules::stream::adapters::Bridge"
CONFIG_KEYS = ("port", "host", "auth_function", "adapter", "auth")

def _ip_address(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return ("must be an IP address (such as 0.0.0.0 or 127.0.0.1), not "
                "{!r}".format(host))
    return None


# Every key of the module's config (iii_twisted/schema.py says how to add one).
CONFIG_SCHEMA = Section(
    port=Key(int, 3112, "TCP port of the stream WebSocket", min=0, max=65535),
    host=Key(str, "0.0.0.0", "interface (an IP address) the port listens on",
             check=_ip_address),
    auth_function=Key(str, None, "function that accepts or refuses a client"),
    auth=Key(dict, None, "tokens a client must present (Authorization: Bearer or "
             "?token=), checked before auth_function (docs/security.rst)"),
    adapter=Key(Adapters(
        Adapter("kv", (KV_ADAPTER,), KV_STORE_SCHEMA.extend(
            channel_size=Key(int, 256, "events buffered per subscriber", min=1))),
        Adapter("redis", (REDIS_ADAPTER,), REDIS_SCHEMA),
        Adapter("bridge", (BRIDGE_ADAPTER,), BRIDGE_SCHEMA),
    ), None, "where items are kept (default: kv in memory)"),
)
STREAM_TRIGGER = "stream"
JOIN_TRIGGER = "stream:join"
LEAVE_TRIGGER = "stream:leave"

# Store groups are "stream:<percent-encoded stream name>:<group id>", so a stream name
# holding ":" cannot be confused with another stream's group.
_PREFIX = "stream:"

MAX_MESSAGE_SIZE = 64 * 1024  # bytes of one client message (join/leave are tiny)
MAX_INBOX = 64  # client messages waiting before reading from that client pauses
MAX_SUBSCRIPTIONS = 10000  # per client
MAX_OUTBOUND_BYTES = 4 * 1024 * 1024  # waiting for a client that does not read


def _store_group(stream_name, group_id):
    return _PREFIX + quote(stream_name, safe="") + ":" + group_id


def split_store_group(group):
    """@return: (stream name, group id) of a store group name, or None."""
    if not group.startswith(_PREFIX):
        return None
    name, sep, group_id = group[len(_PREFIX):].partition(":")
    return (unquote(name), group_id) if sep else None


def _bridge_store(adapter_config, reactor):
    return stream_store_from_config(adapter_config, reactor, split_store_group)


def _now_ms(clock):
    return int(clock.seconds() * 1000)


def _fail(code, action, reason):
    return InvocationError(code, "Failed to {}: {}".format(action, reason))


@implementer(IModule, ITriggerProvider)
class StreamModule(MultiService):
    """
    The stream functions, trigger types and client WebSocket server.

    @ivar store: the L{iii_twisted.interfaces.IKvStore} holding the items.
    @ivar factory: the L{StreamSocketFactory} of the client port.
    @ivar clients: the connected L{StreamClient}s.
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
        MultiService.__init__(self)
        check_keys(config, CONFIG_KEYS)
        port = get_option(config, "port", int, 3112)
        if not 0 <= port <= 65535:
            raise ConfigError("port must be between 0 and 65535, not {}".format(port), "port")
        host = get_option(config, "host", str, "0.0.0.0")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError("host must be an IP address (such as 0.0.0.0 or 127.0.0.1), "
                              "not {!r}".format(host), "host")
        self.auth_function = get_option(config, "auth_function", str, None)
        auth = parse_auth_config(config.get("auth"), "auth")
        # Tokens on the stream socket: the same check as on the worker port (constant
        # time, bounded refusal log, counted), before the auth function.
        self.token_auth = None if auth is None else Authenticator(
            engine, auth, reactor, "iii-stream")
        self._bus = None  # a RedisStreamBus or BridgeStreamBus, with those adapters
        if store is None:
            store, _ = kv_adapter_from_config(config, reactor, KV_ADAPTER,
                                              extra_keys=("channel_size",),
                                              redis_class=REDIS_ADAPTER,
                                              redis_prefixes=("", _PREFIX),
                                              bridge_class=BRIDGE_ADAPTER,
                                              bridge_store=_bridge_store)
            adapter_config = (config.get("adapter") or {}).get("config") or {}
            channel_size = get_option(adapter_config, "channel_size", int, 256,
                                      prefix="adapter.config.")
            if channel_size <= 0:
                raise ConfigError("must be positive", "adapter.config.channel_size")
        if (config.get("adapter") or {}).get("class") == REDIS_ADAPTER:
            # Also for a store handed over on reload: pushes go through Redis.
            self._bus = self._redis_bus(
                (config.get("adapter") or {}).get("config") or {}, reactor)
        elif (config.get("adapter") or {}).get("class") == BRIDGE_ADAPTER:
            # Pushes go through the hub's pub/sub, on the store's link.
            self._bus = BridgeStreamBus(store.client, self._push_local)
        self.store = store
        self.port = port
        self.host = host
        self.clients = set()
        self._engine = engine
        self._clock = engine.clock
        self._stream_triggers = {}  # trigger id -> (Trigger, stream, group, item)
        self._subscribers = {}  # (stream, group) -> {(client, subscription id): item id}
        self._events = EventDispatcher(engine, engine.clock, STREAM_TRIGGER)
        for name, fn, description in [
            ("stream::set", self.set, "Set a value in a stream"),
            ("stream::get", self.get, "Get a value from a stream"),
            ("stream::delete", self.delete, "Delete a value from a stream"),
            ("stream::list", self.list, "List all items in a stream group"),
            ("stream::list_groups", self.list_groups, "List all groups in a stream"),
            ("stream::list_all", self.list_all, "List all available stream with metadata"),
            ("stream::send", self.send, "Send a custom event to stream subscribers"),
            ("stream::update", self.update,
             "Atomically update a stream value with multiple operations"),
        ]:
            engine.register_function(name, fn, description)
        engine.register_trigger_type(JOIN_TRIGGER, self, "Stream join trigger")
        engine.register_trigger_type(LEAVE_TRIGGER, self, "Stream leave trigger")
        engine.register_trigger_type(STREAM_TRIGGER, self, "Stream trigger")
        self.factory = StreamSocketFactory(self, reactor)
        listen = "tcp:{}:interface={}".format(port, host.replace(":", "\\:"))
        self._listener = Listener(
            listen, self.factory, reactor, "iii-stream",
            authenticated=self.token_auth is not None or self.auth_function is not None)
        self._listener.setServiceParent(self)

    def _redis_bus(self, adapter_config, reactor):
        from ..extras import redis_client_for, require_extra

        client = redis_client_for(adapter_config, REDIS_ADAPTER, reactor)
        module = require_extra("iii_twisted.adapters.redis_stream", REDIS_ADAPTER)
        return module.RedisStreamBus(client, self._push_local)

    def startService(self):
        MultiService.startService(self)
        if self._bus is not None:
            self._bus.start()
        # A store with a link (the Bridge adapter) opens it now, after the bus has
        # registered its subscription (sent on connect); idempotent on reload.
        start = getattr(self.store, "start", None)
        if start is not None:
            start()

    def stopService(self):
        d = MultiService.stopService(self)

        def stopped(result):
            for client in list(self.clients):
                client.connection.disconnect(1001, "engine shutting down")
            self._events.stop()
            if self._bus is not None:
                self._bus.close()
            return self.store.close()
        return d.addBoth(stopped)

    # -- custom streams ----------------------------------------------------------------

    def _custom(self, op, stream_name):
        """@return: the id of the function that takes over C{op} for this stream, or None."""
        function_id = "stream::{}({})".format(op, stream_name)
        return function_id if function_id in self._engine.functions else None

    async def _call_custom(self, function_id, data, code, action):
        """
        Call a custom stream function that must return a result object.

        @return: the result (a dict).
        @raise InvocationError: C{code} when the call fails or returns nothing,
            ``JSON_ERROR`` when the result is not an object of the expected shape.
        """
        try:
            result = await self._engine.call(function_id, data)
        except InvocationError as e:
            raise _fail(code, action, "Failed to invoke function: {}".format(e))
        if result is None:
            raise _fail(code, action, "Function returned no result")
        return result

    # -- functions -------------------------------------------------------------------

    async def set(self, data):
        """
        @return: C{{"old_value", "new_value"}}.
        @raise InvocationError: ``deserialization_error``, ``STREAM_SET_ERROR``,
            ``JSON_ERROR``.
        """
        read_input("stream::set", data, strings=("stream_name", "group_id", "item_id"))
        check_stored(self._engine.limits, "stream::set", data)
        name, group, item = data["stream_name"], data["group_id"], data["item_id"]
        return await self._write("set", name, group, item, "data", data.get("data"),
                                 "STREAM_SET_ERROR", "set value")

    async def update(self, data):
        """
        @return: C{{"old_value", "new_value"}}.
        @raise InvocationError: ``deserialization_error`` (naming a malformed op),
            ``STREAM_UPDATE_ERROR``, ``JSON_ERROR``.
        """
        read_input("stream::update", data, strings=("stream_name", "group_id", "item_id"))
        check_stored(self._engine.limits, "stream::update", data)
        name, group, item = data["stream_name"], data["group_id"], data["item_id"]
        ops = data.get("ops")
        try:
            validate_ops(ops)
        except InvalidUpdateOp as e:
            raise input_error("stream::update", e.message)
        return await self._write("update", name, group, item, "ops", ops,
                                 "STREAM_UPDATE_ERROR", "update value")

    async def _write(self, op, name, group, item, field, value, code, what):
        """
        Set or update one item, through the stream's custom C{op} function when one is
        registered, else in the store; then push and fire the change.

        @param op: ``set`` or ``update`` (the store method and the custom function's op).
        @param field: the name C{value} has in a custom function's input (``data``,
            ``ops``).
        @return: C{{"old_value", "new_value"}}.
        @raise InvocationError: C{code} (or ``JSON_ERROR``) when the write fails.
        """
        custom = self._custom(op, name)
        if custom is not None:
            result = _write_result(await self._call_custom(
                custom, {"stream_name": name, "group_id": group, "item_id": item,
                         field: value}, code, what))
        else:
            try:
                result = await getattr(self.store, op)(_store_group(name, group), item,
                                                       value)
            except KvStoreError as e:
                raise _fail(code, what, e)
        self._changed(name, group, item, result)
        return result

    async def get(self, data):
        """
        @return: the item, or None.
        @raise InvocationError: ``deserialization_error``, ``STREAM_GET_ERROR``, or a
            custom get function's own error.
        """
        read_input("stream::get", data, strings=("stream_name", "group_id", "item_id"))
        name, group, item = data["stream_name"], data["group_id"], data["item_id"]
        custom = self._custom("get", name)
        if custom is not None:
            return await self._engine.call(
                custom, {"stream_name": name, "group_id": group, "item_id": item})
        try:
            return await self.store.get(_store_group(name, group), item)
        except KvStoreError as e:
            raise _fail("STREAM_GET_ERROR", "get value", e)

    async def delete(self, data):
        """
        @return: C{{"old_value": previous or None}}.
        @raise InvocationError: ``deserialization_error``, ``STREAM_DELETE_ERROR``,
            ``JSON_ERROR``.
        """
        read_input("stream::delete", data, strings=("stream_name", "group_id", "item_id"))
        name, group, item = data["stream_name"], data["group_id"], data["item_id"]
        custom = self._custom("delete", name)
        if custom is not None:
            result = await self._call_custom(
                custom, {"stream_name": name, "group_id": group, "item_id": item},
                "STREAM_DELETE_ERROR", "delete value")
            if not isinstance(result, dict):
                raise InvocationError("JSON_ERROR", "Failed to convert result to value: "
                                      "expected an object with old_value")
            result = {"old_value": result.get("old_value")}
        else:
            try:
                result = await self.store.delete(_store_group(name, group), item)
            except KvStoreError as e:
                raise _fail("STREAM_DELETE_ERROR", "delete value", e)
        if result["old_value"] is not None:
            self._emit(name, group, item, {"type": "delete", "data": result["old_value"]})
        return result

    async def list(self, data):
        """
        @return: the group's items (C{[]} for an unknown group); with ``with_keys:
            true`` (our addition, for the console) C{[{"key", "value"}]}.
        @raise InvocationError: ``deserialization_error``, ``STREAM_GET_GROUP_ERROR``,
            or a custom list function's own error.
        """
        read_input("stream::list", data, strings=("stream_name", "group_id"))
        name, group = data["stream_name"], data["group_id"]
        custom = self._custom("list", name)
        if custom is not None:
            return await self._engine.call(custom, {"stream_name": name, "group_id": group})
        try:
            if data.get("with_keys") is True:  # our addition, for the console
                pairs = await self.store.items(_store_group(name, group))
                return [{"key": k, "value": v} for k, v in pairs]
            return await self.store.list(_store_group(name, group))
        except KvStoreError as e:
            raise _fail("STREAM_GET_GROUP_ERROR", "get group", e)

    async def list_groups(self, data):
        """
        @return: the stream's group ids that hold items, sorted.
        @raise InvocationError: ``deserialization_error``,
            ``STREAM_LIST_GROUPS_ERROR``, or a custom function's own error.
        """
        read_input("stream::list_groups", data, strings=("stream_name",))
        name = data["stream_name"]
        custom = self._custom("list_groups", name)
        if custom is not None:
            return await self._engine.call(custom, {"stream_name": name})
        prefix = _store_group(name, "")
        try:
            by_stream = getattr(self.store, "list_stream_groups", None)
            if by_stream is not None:  # a store that cannot list all groups (Bridge)
                return await by_stream(name)
            groups = await self.store.list_groups()
        except KvStoreError as e:
            raise _fail("STREAM_LIST_GROUPS_ERROR", "list groups", e)
        return [g[len(prefix):] for g in groups if g.startswith(prefix)]

    async def list_all(self, data):
        """
        @return: C{{"stream": [{"id": name, "groups": [sorted]}], "count": n}}, sorted
            by name (streams of the adapter only, not custom streams).
        @raise InvocationError: ``STREAM_LIST_ALL_ERROR``.
        """
        try:
            groups = await self.store.list_groups()
        except KvStoreError as e:
            raise _fail("STREAM_LIST_ALL_ERROR", "list stream", e)
        streams = {}
        for group in groups:
            if group.startswith(_PREFIX):
                name, sep, group_id = group[len(_PREFIX):].partition(":")
                if sep:
                    streams.setdefault(unquote(name), []).append(group_id)
        found = [{"id": name, "groups": sorted(streams[name])} for name in sorted(streams)]
        return {"stream": found, "count": len(found)}

    def send(self, data):
        """
        Push a custom event to the group's (or item's) subscribers and stream
        triggers.

        @return: None.
        @raise InvocationError: ``deserialization_error``.
        """
        read_input("stream::send", data, strings=("stream_name", "group_id", "type"),
                   optional_strings=("id",))
        self._emit(data["stream_name"], data["group_id"], data.get("id"),
                   {"type": "event", "event": {"type": data["type"], "data": data.get("data")}})
        return None

    # -- events ----------------------------------------------------------------------

    def _changed(self, name, group, item, result):
        kind = "create" if result["old_value"] is None else "update"
        self._emit(name, group, item, {"type": kind, "data": result["new_value"]})

    def wrapper(self, name, group, item, event):
        """@return: the message clients and stream triggers get for C{event}."""
        return {"type": "stream", "timestamp": _now_ms(self._clock), "streamName": name,
                "groupId": group, "id": item, "event": event}

    def _emit(self, name, group, item, event):
        """Schedule the stream triggers, then push to subscribed clients (in that order)."""
        message = self.wrapper(name, group, item, event)
        triggers = [
            trigger for trigger, t_name, t_group, t_item in self._stream_triggers.values()
            if t_name == name and (not t_group or t_group == group)
            and (not t_item or t_item == (item or ""))
        ]
        self._events.fire(triggers, message)
        if self._bus is not None:
            # Through Redis to every engine, this one included (one order for all).
            payload = _encode_push(message, self._log)
            if payload is not None:
                self._bus.publish(payload)
            return
        if not self._subscribers.get((name, group)):
            return
        payload = _encode_push(message, self._log)
        if payload is not None:
            self._push_local(name, group, item, payload)

    def _push_local(self, name, group, item, payload):
        """Send one encoded push to this engine's clients subscribed to it."""
        subscribers = self._subscribers.get((name, group))
        if not subscribers:
            return
        for (client, _), sub_item in list(subscribers.items()):
            if sub_item is None or sub_item == item:
                client.connection.send_payload(payload)

    # -- subscriptions (used by StreamClient) ------------------------------------------

    def subscribe(self, client, subscription_id, name, group, item):
        self._subscribers.setdefault((name, group), {})[(client, subscription_id)] = item

    def unsubscribe(self, client, subscription_id, name, group):
        subscribers = self._subscribers.get((name, group))
        if subscribers is not None:
            subscribers.pop((client, subscription_id), None)
            if not subscribers:
                del self._subscribers[(name, group)]

    async def authenticate(self, request_info):
        """
        Ask ``auth_function`` about a connecting client.

        Deviation: the reference ignores the answer's refusals and errors. Here a
        result of exactly ``false`` or an object with ``"unauthorized": true`` refuses
        the client (HTTP 401), and so does a failing call (HTTP 500), rather than
        letting an unauthenticated client in.

        @return: the connection's context (the result's ``context``), or None.
        @raise ConnectionDeny: to refuse the client.
        """
        try:
            result = await self._engine.call(self.auth_function, request_info)
        except InvocationError as e:
            self._log.error("stream auth function {function_id} failed for {addr}: "
                            "{error}; client refused", function_id=self.auth_function,
                            addr=request_info["addr"], error=e)
            raise ConnectionDeny(500, "Authentication failed")
        if result is False or (isinstance(result, dict) and result.get("unauthorized") is True):
            self._log.info("stream client {addr} refused by {function_id}",
                           addr=request_info["addr"], function_id=self.auth_function)
            raise ConnectionDeny(401, "Unauthorized")
        if isinstance(result, dict):
            return result.get("context")
        return None

    async def join_triggers(self, kind, event):
        """
        Call every trigger of C{kind} (``stream:join``/``stream:leave``) in turn.

        @return: True when a join trigger answered ``{"unauthorized": true}``.
        """
        unauthorized = False
        for trigger in self._engine.triggers_of_type(kind):
            try:
                result = await self._engine.call(trigger.function_id, event,
                                                 metadata=trigger.metadata)
            except InvocationError as e:
                self._log.error("{kind} handler {function_id} failed: {error}", kind=kind,
                                function_id=trigger.function_id, error=e)
                continue
            if isinstance(result, dict) and result.get("unauthorized") is True:
                unauthorized = True
        return unauthorized

    # -- ITriggerProvider ------------------------------------------------------------

    def register_trigger(self, trigger):
        """
        @return: Deferred firing with None; failing with TriggerError for a
            ``stream`` trigger without a string ``stream_name`` or with a non-string
            filter (``stream:join``/``stream:leave`` take any config).
        """
        if trigger.trigger_type != STREAM_TRIGGER:
            return succeed(None)
        config = trigger.config
        if not isinstance(config, dict):
            raise TriggerError("stream trigger config must be an object with "
                               "stream_name and optional group_id, item_id, "
                               "condition_function_id")
        if not isinstance(config.get("stream_name"), str):
            raise TriggerError("stream trigger config needs a string stream_name")
        for name in ("group_id", "item_id", "condition_function_id"):
            if config.get(name) is not None and not isinstance(config[name], str):
                raise TriggerError("stream trigger config: {} must be a string, not {}"
                                   .format(name, type(config[name]).__name__))
        self._stream_triggers[trigger.id] = (
            trigger, config["stream_name"], config.get("group_id"), config.get("item_id"))
        return succeed(None)

    def unregister_trigger(self, trigger):
        """@return: Deferred firing with None."""
        current = self._stream_triggers.get(trigger.id)
        if current is not None and current[0] is trigger:
            del self._stream_triggers[trigger.id]
        return succeed(None)


def _encode_push(message, log):
    """
    @return: a message for browser clients as UTF-8 JSON bytes, or None (logged) when
        it holds something JSON cannot carry, NaN and infinities included: the
        browser's JSON.parse would throw on them.
    """
    try:
        return encode(message)
    except (TypeError, ValueError, RecursionError) as e:
        log.warn("stream: dropped a {type} push that is not JSON: {error}",
                 type=message.get("type"), error=e)
        return None


def _write_result(result):
    """
    @return: a custom set/update function's result as C{{"old_value", "new_value"}}.
    @raise InvocationError: ``JSON_ERROR`` when it is not of that shape.
    """
    if not isinstance(result, dict) or "new_value" not in result:
        raise InvocationError("JSON_ERROR", "Failed to convert result to value: expected "
                              "an object with new_value and optional old_value")
    out = {"old_value": result.get("old_value"), "new_value": result["new_value"]}
    if isinstance(result.get("errors"), list) and result["errors"]:
        out["errors"] = result["errors"]  # per-op errors of a custom update function
    return out


class StreamClient:
    """
    One stream client's subscriptions and messages, apart from its socket: messages
    are handled one at a time, in arrival order.

    @ivar connection: what it sends through (L{StreamProtocol}, or a test double with
        C{send_payload(bytes)}, C{disconnect(code, reason)}, C{pause_reading()} and
        C{resume_reading()}).
    @ivar context: what ``auth_function`` returned as context, or None.
    @ivar subscriptions: subscription id -> (stream name, group id, item id or None).
    """

    _log = Logger()

    def __init__(self, module, connection, context=None):
        self.id = str(uuid4())
        self.module = module
        self.connection = connection
        self.context = context
        self.subscriptions = {}
        self._inbox = deque()
        self._busy = False
        self._paused = False
        self._closed = False

    def received(self, message):
        """Take one decoded client message (any JSON value)."""
        if self._closed:
            return
        self._inbox.append(message)
        if len(self._inbox) >= MAX_INBOX and not self._paused:
            self._paused = True
            self.connection.pause_reading()
        if not self._busy:
            self._busy = True
            Deferred.fromCoroutine(self._drain()).addErrback(
                lambda f: self._log.failure("stream client {id} message handling failed",
                                            f, id=self.id))

    async def _drain(self):
        try:
            while self._inbox and not self._closed:
                message = self._inbox.popleft()
                if self._paused and len(self._inbox) < MAX_INBOX // 2:
                    self._paused = False
                    self.connection.resume_reading()
                try:
                    await self._handle(message)
                except Exception:
                    self._log.failure("stream client {id}: error handling a message",
                                      id=self.id)
        finally:
            self._busy = False

    async def _handle(self, message):
        kind = message.get("type") if isinstance(message, dict) else None
        data = message.get("data") if isinstance(message, dict) else None
        if kind not in ("join", "leave") or not _valid_join_data(data):
            self._log.debug("stream client {id}: ignored message {message!r}", id=self.id,
                            message=message)
            return
        subscription_id, name, group = data["subscriptionId"], data["streamName"], data["groupId"]
        item = data.get("id")
        event = {"subscription_id": subscription_id, "stream_name": name,
                 "group_id": group, "id": item, "context": self.context}
        if kind == "leave":
            await self.module.join_triggers(LEAVE_TRIGGER, event)
            self._drop(subscription_id)
            return
        if subscription_id not in self.subscriptions \
                and len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            self._log.warn("stream client {id}: join refused, already {count} "
                           "subscriptions", id=self.id, count=len(self.subscriptions))
            return
        if await self.module.join_triggers(JOIN_TRIGGER, event):
            self._send(self.module.wrapper(name, group, item, {"type": "unauthorized"}))
            return
        if self._closed:
            return
        self._drop(subscription_id)
        self.subscriptions[subscription_id] = (name, group, item)
        self.module.subscribe(self, subscription_id, name, group, item)
        try:
            if item is not None:
                value = await self.module.get(
                    {"stream_name": name, "group_id": group, "item_id": item})
            else:
                value = await self.module.list({"stream_name": name, "group_id": group})
        except InvocationError as e:
            self._log.error("stream client {id}: sync of {name}/{group} failed: {error}",
                            id=self.id, name=name, group=group, error=e)
            return
        self._send(self.module.wrapper(name, group, item, {"type": "sync", "data": value}))

    def _drop(self, subscription_id):
        previous = self.subscriptions.pop(subscription_id, None)
        if previous is not None:
            self.module.unsubscribe(self, subscription_id, previous[0], previous[1])

    def _send(self, message):
        if not self._closed:
            payload = _encode_push(message, self._log)
            if payload is not None:
                self.connection.send_payload(payload)

    def closed(self):
        """
        The socket closed: stop pushes at once, then call the ``stream:leave``
        triggers for each subscription it still had.
        """
        self._closed = True
        self._inbox.clear()
        remaining = list(self.subscriptions.items())
        for subscription_id, _ in remaining:
            self._drop(subscription_id)
        if remaining:
            Deferred.fromCoroutine(self._leave_all(remaining)).addErrback(
                lambda f: self._log.failure("stream client {id}: leave triggers failed",
                                            f, id=self.id))

    async def _leave_all(self, remaining):
        for subscription_id, (name, group, item) in remaining:
            await self.module.join_triggers(LEAVE_TRIGGER, {
                "subscription_id": subscription_id, "stream_name": name,
                "group_id": group, "id": item, "context": self.context})


def _valid_join_data(data):
    return (isinstance(data, dict) and isinstance(data.get("subscriptionId"), str)
            and isinstance(data.get("streamName"), str)
            and isinstance(data.get("groupId"), str)
            and (data.get("id") is None or isinstance(data.get("id"), str)))


def _query_params(query):
    """
    @return: C{{key: [values]}} of a raw query string, split on ``&`` and ``=``
        without percent-decoding (as the reference does); empty keys skipped.
    """
    params = {}
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key:
            params.setdefault(key, []).append(value)
    return params


@implementer(IPushProducer)
class _WriteGate:
    """Told by the transport when its write buffer is full (paused) and drained."""

    def __init__(self, protocol):
        self._protocol = protocol
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._protocol._flush_backlog()

    def stopProducing(self):
        self.paused = True


class StreamProtocol(WebSocketServerProtocol):
    """One client connection on the stream port."""

    _log = Logger()
    client = None
    _context = None
    _gate = None

    def onConnect(self, request):
        if request.path != "/":
            raise ConnectionDeny(404, "Not Found")
        module = self.factory.module
        self._backlog = deque()
        self._backlog_bytes = 0
        if module.token_auth is not None:
            peer = self.transport.getPeer()
            d = module.token_auth.authenticate(
                {k.lower(): v for k, v in request.headers.items()}, request.params,
                getattr(peer, "host", None), request.path)

            def refused(failure):
                failure.trap(AuthRefused)
                raise ConnectionDeny(401, "Unauthorized")

            def authenticated(session):
                self._context = {"token": session.name}
                if module.auth_function is None:
                    return None
                return self._ask_auth_function(request, module)
            return d.addCallbacks(authenticated, refused)
        if module.auth_function is None:
            return None
        return self._ask_auth_function(request, module)

    def _ask_auth_function(self, request, module):
        try:
            peer = self.transport.getPeer()
            uri = getattr(self, "http_request_uri", "") or ""
            info = {
                "headers": dict(request.headers),
                "path": request.path,
                "query_params": _query_params(uri.partition("?")[2]),
                "addr": "{}:{}".format(getattr(peer, "host", ""), getattr(peer, "port", "")),
            }
        except Exception:
            self._log.failure("error reading a stream client's handshake")
            raise ConnectionDeny(500, "Internal Server Error")

        def accepted(context):
            self._context = context
            return None
        return Deferred.fromCoroutine(module.authenticate(info)).addCallback(accepted)

    def onOpen(self):
        try:
            self._gate = _WriteGate(self)
            self.transport.registerProducer(self._gate, True)
            self.client = StreamClient(self.factory.module, self, self._context)
            self.factory.module.clients.add(self.client)
        except Exception:
            self._log.failure("error opening a stream client connection")
            self.sendClose(1011)

    def onMessage(self, payload, isBinary):
        if self.client is None:
            return
        try:
            message = loads(payload)
        except (ValueError, RecursionError):
            self._log.debug("stream client {id}: dropped a frame that is not JSON",
                            id=self.client.id)
            return
        self.client.received(message)

    counted_host = None

    def connectionLost(self, reason):
        WebSocketServerProtocol.connectionLost(self, reason)
        release_receive_buffers(self)
        if self.factory.addresses is not None:
            self.factory.addresses.release(self.counted_host)
            self.counted_host = None

    def onClose(self, wasClean, code, reason):
        client, self.client = self.client, None
        if client is not None:
            self.factory.module.clients.discard(client)
            try:
                client.closed()
            except Exception:
                self._log.failure("error cleaning up a stream client")
        self._backlog = deque()
        self._backlog_bytes = 0

    # -- what StreamClient and the module use ------------------------------------------

    def send_payload(self, payload):
        """Send one text frame, or keep it while the client is not reading (bounded)."""
        if self.state != self.STATE_OPEN:
            return
        if self._gate is not None and (self._gate.paused or self._backlog):
            self._backlog.append(payload)
            self._backlog_bytes += len(payload)
            if self._backlog_bytes > self.factory.max_outbound_bytes:
                self._log.warn(
                    "stream client {addr} does not read: {size} bytes waiting; dropped",
                    addr=self.peer, size=self._backlog_bytes)
                self._backlog.clear()
                self._backlog_bytes = 0
                self.dropConnection(abort=True)
            return
        self._send_frame(payload)

    def _send_frame(self, payload):
        # Autobahn applies maxMessagePayloadSize to what it sends as well; ours bounds
        # what clients send us, not the items we push.
        limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0
        try:
            self.sendMessage(payload, False)
        finally:
            self.maxMessagePayloadSize = limit

    def _flush_backlog(self):
        while self._backlog and not self._gate.paused and self.state == self.STATE_OPEN:
            payload = self._backlog.popleft()
            self._backlog_bytes -= len(payload)
            self._send_frame(payload)

    def disconnect(self, code=1000, reason=None):
        """Close with C{code} and C{reason} (L{send_close}: 1001 at shutdown too)."""
        send_close(self, code, reason)

    def pause_reading(self):
        self.transport.pauseProducing()

    def resume_reading(self):
        self.transport.resumeProducing()


class StreamSocketFactory(WebSocketServerFactory):
    """Builds L{StreamProtocol}s for one L{StreamModule}, with explicit options."""

    protocol = StreamProtocol

    def __init__(self, module, reactor, max_message_size=MAX_MESSAGE_SIZE,
                 max_outbound_bytes=MAX_OUTBOUND_BYTES, ping_interval=30.0):
        WebSocketServerFactory.__init__(
            self, url=None, reactor=reactor, server="iii-twisted/{}".format(__version__))
        self.module = module
        self.max_outbound_bytes = max_outbound_bytes
        self.setProtocolOptions(
            maxMessagePayloadSize=max_message_size,
            maxFramePayloadSize=max_message_size,
            webStatus=False,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_interval,
            # Covers the auth_function call, which runs during the handshake.
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
            # Fail a connection with a close frame that says why (1009 for a message
            # over the limit), not by dropping TCP.
            failByDrop=False,
            perMessageCompressionAccept=lambda offers: None,
        )
        limits = getattr(getattr(module, "_engine", None), "limits", None)
        # Connections per client address (docs/limits.rst), as on the worker port.
        self.addresses = AddressCounter(limits, "stream") if limits is not None else None

    def buildProtocol(self, addr):
        host = self.addresses.admit(addr) if self.addresses is not None else None
        if host is False:
            return None  # Twisted closes the new socket at once
        protocol = WebSocketServerFactory.buildProtocol(self, addr)
        protocol.counted_host = host
        return protocol
