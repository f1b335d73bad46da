"""
The ``Bridge`` adapters of the state and stream modules
(``modules::state::adapters::Bridge``, ``modules::stream::adapters::Bridge``; current
format ``name: bridge``; reference engine/src/modules/{state,stream}/adapters/bridge.rs):
this engine keeps no data of its own, and stores it on another engine (the hub) by
calling the hub's ``state::*`` / ``stream::*`` functions over a worker-protocol link
(L{iii_twisted.wsclient}), as the reference does. Config: ``{bridge_url}`` (default
``ws://localhost:49134``).

- L{BridgeStateStore}: an L{IKvStore} over ``state::*`` (group = scope).
- L{BridgeStreamStore}: an L{IKvStore} over ``stream::*`` (the stream module's group
  names are split back into stream name and group id).
- L{BridgeStreamBus}: pushes go to the hub as ``publish {topic: "stream.events", data:
  <the client message>}``; each engine using the adapter registers a function
  ``stream::bridge::on_pub::<uuid>`` there with a ``subscribe`` trigger on that topic
  and sends what arrives to its own clients (the hub needs the pub/sub module).

What the hub gives, the store gives: ordering of writes holds when the hub handles one
worker's frames in order (ours does). Deviations and limits:

- a call while the link is down fails at once with C{KvStoreError} ``bridge_error:
  iii is not connected`` (the reference waits for its 30 s timeout);
- C{items()} (keys with values, for the console) uses ``with_keys: true``, which only
  an iii-twisted hub understands; against another hub it fails with KvStoreError;
- the stream store cannot list every stream's groups (``stream::list_all`` answers
  with none, as the reference's does); a stream's own groups come from the hub's
  ``stream::list_groups``.
"""

from uuid import uuid4

from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IKvStore, InvalidUpdateOp, KvStoreError
from ..protocol import DESERIALIZATION_ERROR, InvocationError, encode, loads
from ..schema import Key, Section
from ..wsclient import CONNECTED, DEFAULT_TIMEOUT_MS, LinkError, WorkerClient, check_url

DEFAULT_BRIDGE_URL = "ws://localhost:49134"
STREAM_EVENTS_TOPIC = "stream.events"

BRIDGE_SCHEMA = Section(
    bridge_url=Key(str, DEFAULT_BRIDGE_URL, "the hub engine's worker port (ws:// or "
                   "wss://; ?token=... for a hub with auth)", check=check_url),
)

# The worker names the reference (0.23) gives these links on the hub.
STATE_WORKER_NAME = "iii-state-bridge"
STREAM_WORKER_NAME = "iii-stream-bridge"


def bridge_client_from_config(config, reactor, name):
    """
    @param config: the adapter's ``config`` mapping.
    @return: a (not yet started) L{WorkerClient} to ``bridge_url``, named C{name}.
    @raise ConfigError: naming the key at fault.
    """
    config = BRIDGE_SCHEMA.validate(config)
    return WorkerClient(config.get("bridge_url") or DEFAULT_BRIDGE_URL, reactor, name)


def state_store_from_config(config, reactor):
    """@return: the L{BridgeStateStore} of a state ``Bridge`` adapter config."""
    return BridgeStateStore(bridge_client_from_config(config, reactor, STATE_WORKER_NAME))


def stream_store_from_config(config, reactor, split_group):
    """@return: the L{BridgeStreamStore} of a stream ``Bridge`` adapter config."""
    return BridgeStreamStore(bridge_client_from_config(config, reactor, STREAM_WORKER_NAME),
                             split_group)


def _store_error(failure, function_id):
    """Translate a failed hub call into what an L{IKvStore} fails with."""
    if failure.check(LinkError):
        raise KvStoreError("bridge_error: {}".format(failure.value))
    if failure.check(InvocationError):
        error = failure.value
        if error.code == DESERIALIZATION_ERROR and function_id.endswith("::update"):
            # A malformed op: the hub refused the whole update and changed nothing.
            prefix = "Failed to deserialize input for {}: ".format(function_id)
            message = error.message
            raise InvalidUpdateOp(message[len(prefix):] if message.startswith(prefix)
                                  else message)
        raise KvStoreError("remote error ({}): {}".format(error.code, error.message))
    return failure


class _BridgeStore:
    """What both bridge stores share: the link, its lifecycle and the hub calls."""

    def __init__(self, client, owns_client=True):
        self.client = client
        self._owns_client = owns_client
        self._closed = False

    def start(self):
        """Open the link (called when the module starts; idempotent)."""
        self.client.start()

    def health(self):
        """Readiness (iii_twisted.health): None while the link is up, else why not."""
        if self._closed:
            return "closed"
        if self.client.state == CONNECTED:
            return None
        return "bridge to {} is {}".format(self.client.url, self.client.state)

    def close(self):
        self._closed = True
        if self._owns_client:
            return self.client.stop()
        return succeed(None)

    def _call(self, function_id, data):
        if self._closed:
            return fail(KvStoreError("the store is closed"))
        return self.client.call(function_id, data, DEFAULT_TIMEOUT_MS).addErrback(
            _store_error, function_id)

    def _check(self, *names):
        for name in names:
            if not isinstance(name, str):
                return fail(KvStoreError("group and key must be strings, not {}".format(
                    type(name).__name__)))
        return None


def _items(result, function_id):
    if not isinstance(result, list) or not all(
            isinstance(r, dict) and set(r) == {"key", "value"} for r in result):
        raise KvStoreError("the hub's {} does not list keys (with_keys is an iii-twisted "
                           "extension)".format(function_id))
    return [(r["key"], r["value"]) for r in result]


def _delete_result(previous):
    return {"old_value": previous}


@implementer(IKvStore)
class BridgeStateStore(_BridgeStore):
    """
    An L{IKvStore} kept on a hub engine through its ``state::*`` functions.

    @ivar client: the L{WorkerClient} of the link.
    """

    def get(self, group, key):
        return self._check(group, key) or self._call(
            "state::get", {"scope": group, "key": key})

    def set(self, group, key, value):
        return self._check(group, key) or self._call(
            "state::set", {"scope": group, "key": key, "value": value})

    def delete(self, group, key):
        # The hub's state::delete answers with the previous value itself.
        return (self._check(group, key) or self._call(
            "state::delete", {"scope": group, "key": key}).addCallback(_delete_result))

    def update(self, group, key, ops):
        return self._check(group, key) or self._call(
            "state::update", {"scope": group, "key": key, "ops": ops})

    def list(self, group):
        return self._check(group) or self._call("state::list", {"scope": group})

    def items(self, group):
        return self._check(group) or self._call(
            "state::list", {"scope": group, "with_keys": True}).addCallback(
                _items, "state::list")

    def list_groups(self):
        def groups(result):
            if not isinstance(result, dict) or not isinstance(result.get("groups"), list):
                raise KvStoreError("invalid state::list_groups response: missing "
                                   "'groups' field")
            return sorted(result["groups"])
        return self._call("state::list_groups", {}).addCallback(groups)


@implementer(IKvStore)
class BridgeStreamStore(_BridgeStore):
    """
    An L{IKvStore} kept on a hub engine through its ``stream::*`` functions.

    @param split_group: turns one of the stream module's group names into
        C{(stream_name, group_id)}, or None for a name that is not a stream group.
    """

    def __init__(self, client, split_group, owns_client=True):
        _BridgeStore.__init__(self, client, owns_client)
        self._split = split_group

    def _item(self, group, key):
        bad = self._check(group, key)
        if bad is not None:
            return bad, None
        parts = self._split(group)
        if parts is None:
            return fail(KvStoreError("{!r} is not a stream group".format(group))), None
        return None, {"stream_name": parts[0], "group_id": parts[1], "item_id": key}

    def get(self, group, key):
        bad, data = self._item(group, key)
        return bad or self._call("stream::get", data)

    def set(self, group, key, value):
        bad, data = self._item(group, key)
        return bad or self._call("stream::set", dict(data, data=value))

    def delete(self, group, key):
        bad, data = self._item(group, key)
        return bad or self._call("stream::delete", data)

    def update(self, group, key, ops):
        bad, data = self._item(group, key)
        return bad or self._call("stream::update", dict(data, ops=ops))

    def _group(self, group):
        bad = self._check(group)
        if bad is not None:
            return bad, None
        parts = self._split(group)
        if parts is None:
            return fail(KvStoreError("{!r} is not a stream group".format(group))), None
        return None, {"stream_name": parts[0], "group_id": parts[1]}

    def list(self, group):
        bad, data = self._group(group)
        return bad or self._call("stream::list", data)

    def items(self, group):
        bad, data = self._group(group)
        return bad or self._call("stream::list", dict(data, with_keys=True)).addCallback(
            _items, "stream::list")

    def list_groups(self):
        """The hub has no call listing every stream's groups: none, as the reference."""
        if self._closed:
            return fail(KvStoreError("the store is closed"))
        return succeed([])

    def list_stream_groups(self, stream_name):
        """@return: Deferred firing with the group ids of one stream (the hub's answer)."""
        return self._call("stream::list_groups", {"stream_name": stream_name})


class BridgeStreamBus:
    """
    Stream pushes through the hub's pub/sub (see the module docstring).

    @param client: the link (shared with the L{BridgeStreamStore}).
    @param push_local: C{push_local(stream_name, group_id, item_id, payload_bytes)}.
    """

    _log = Logger()

    def __init__(self, client, push_local):
        self._client = client
        self._push_local = push_local
        self.function_id = "stream::bridge::on_pub::{}".format(uuid4())
        self._trigger_id = None

    def start(self):
        """Register the handler and its subscription (sent on every connect)."""
        if self._trigger_id is None:
            self._client.register_function(self.function_id, self._message)
            self._trigger_id = self._client.register_trigger(
                "subscribe", self.function_id, {"topic": STREAM_EVENTS_TOPIC})

    def publish(self, payload):
        """
        Send one encoded push (UTF-8 JSON bytes) to every engine on the hub. Fire and
        forget: a push that cannot be published is logged and lost.
        """
        d = self._client.call("publish", {"topic": STREAM_EVENTS_TOPIC,
                                          "data": loads(payload)}, DEFAULT_TIMEOUT_MS)
        d.addErrback(lambda f: self._log.warn(
            "stream: a push was lost, the bridge could not publish it: {error}",
            error=f.getErrorMessage()))

    def _message(self, message):
        try:
            name, group, item = message["streamName"], message["groupId"], message.get("id")
        except (KeyError, TypeError):
            name = group = None
        if not isinstance(name, str) or not isinstance(group, str):
            raise InvocationError("DESERIALIZATION_ERROR",
                                  "Failed to deserialize stream message: not a stream push")
        self._push_local(name, group, item, encode(message))
        return None

    def close(self):
        """Withdraw the handler and its subscription. @return: Deferred."""
        if self._trigger_id is not None:
            self._client.unregister_trigger(self._trigger_id)
            self._client.unregister_function(self.function_id)
            self._trigger_id = None
        return succeed(None)
