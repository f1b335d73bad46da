"""
The pub/sub module, ``modules::pubsub::PubSubModule`` (../shared/spec/modules.md §6).

``publish {topic, data}`` sends ``data``, unchanged, to the function of every
``subscribe`` trigger ``{topic}`` of that topic, fire and forget (no queue, no retry:
a subscriber that is not there misses the message; use the queue module for that).

Deviations from the reference (docs/queues-pubsub-cron.rst): unregistering one
subscription removes only that one (the reference's LocalAdapter drops every
subscription of the topic), and a ``subscribe`` trigger without a topic is refused
instead of being accepted and never firing.

Adapters: ``modules::pubsub::LocalAdapter`` (the default, this engine only) and
``modules::pubsub::RedisAdapter`` (config ``redis_url``; every engine sharing the
Redis, L{iii_twisted.adapters.redis_pubsub}).
"""

from twisted.application.service import Service
from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from .. import protocol as P
from ..config import ConfigError, get_option
from ..adapters import REDIS_SCHEMA
from ..schema import Adapter, Adapters, Key, Section
from ..interfaces import IModule, IPubSubAdapter, ITriggerProvider, TriggerError
from ..protocol import InvocationError

LOCAL_ADAPTER = "modules::pubsub::LocalAdapter"
REDIS_ADAPTER = "modules::pubsub::RedisAdapter"
ADAPTERS = (LOCAL_ADAPTER, REDIS_ADAPTER)

# Every key of the module's config (iii_twisted/schema.py says how to add one).
CONFIG_SCHEMA = Section(
    adapter=Key(Adapters(
        Adapter("local", (LOCAL_ADAPTER,), Section()),
        Adapter("redis", (REDIS_ADAPTER,), REDIS_SCHEMA),
    ), None, "how messages travel (default: local, in this process)"),
)
VOID = {"type": "void"}


@implementer(IPubSubAdapter)
class LocalAdapter:
    """
    In-process fan-out: topic -> subscriptions, each delivered with
    C{deliver(function_id, data)}.
    """

    def __init__(self, deliver):
        self._deliver = deliver
        self._topics = {}

    def subscribe(self, topic, subscription_id, function_id):
        self._topics.setdefault(topic, {})[subscription_id] = function_id
        return succeed(None)

    def unsubscribe(self, topic, subscription_id):
        subscriptions = self._topics.get(topic)
        if subscriptions is not None:
            subscriptions.pop(subscription_id, None)
            if not subscriptions:
                del self._topics[topic]
        return succeed(None)

    def publish(self, topic, data):
        subscriptions = list(self._topics.get(topic, {}).values())
        for function_id in subscriptions:
            self._deliver(function_id, data)
        return succeed(len(subscriptions))

    def subscriptions(self, topic):
        """@return: subscription id -> function id, for one topic."""
        return dict(self._topics.get(topic, {}))


@implementer(IModule, ITriggerProvider)
class PubSubModule(Service):
    """The ``publish`` function and the ``subscribe`` trigger type."""

    iii_class = None
    config_schema = CONFIG_SCHEMA
    _log = Logger()

    def __init__(self, engine, config, reactor, adapter=None):
        """
        @raise ConfigError: for an unknown key (the reference rejects them) or adapter.
        """
        self.engine = engine
        for key in config:
            if key != "adapter":
                raise ConfigError("unknown field `{}`, expected `adapter`".format(key), key)
        spec = get_option(config, "adapter", dict, {})
        for key in spec:
            if key not in ("class", "config"):
                raise ConfigError("unknown field `{}`, expected `class` or `config`".format(key),
                                  "adapter." + key)
        cls = get_option(spec, "class", str, LOCAL_ADAPTER, "adapter.")
        if cls not in ADAPTERS:
            raise ConfigError("Adapter factory '{}' not found. Available: [{}]".format(
                cls, ", ".join(ADAPTERS)), "adapter.class")
        adapter_config = get_option(spec, "config", dict, {}, "adapter.")
        if adapter is None and cls == REDIS_ADAPTER:
            adapter = self._redis_adapter(adapter_config, reactor)
        self.adapter = adapter if adapter is not None else LocalAdapter(self._deliver)
        engine.register_function(
            "publish", self._fn_publish,
            "Send {topic, data} to every function subscribed to the topic")
        engine.register_trigger_type(
            "subscribe", self, "Receive the data `publish` sends to a topic")

    def _redis_adapter(self, config, reactor):
        from ..extras import redis_adapter_client, require_extra

        client = redis_adapter_client(config, REDIS_ADAPTER, reactor)
        module = require_extra("iii_twisted.adapters.redis_pubsub", REDIS_ADAPTER)
        return module.RedisPubSubAdapter(client, self._deliver)

    def stopService(self):
        Service.stopService(self)
        close = getattr(self.adapter, "close", None)
        if close is not None:
            return close()

    def _deliver(self, function_id, data):
        # VOID: Engine.call logs a failure and never raises.
        self.engine.call(function_id, data, VOID)

    def _fn_publish(self, data):
        if not isinstance(data, dict):
            raise InvocationError(P.DESERIALIZATION_ERROR,
                                  "Failed to deserialize input for publish: expected an "
                                  "object with topic and data")
        topic = data.get("topic")
        if topic is None or topic == "":
            raise InvocationError("topic_not_set", "Topic is not set")
        if not isinstance(topic, str):
            raise InvocationError(P.DESERIALIZATION_ERROR,
                                  "Failed to deserialize input for publish: topic must "
                                  "be a string")
        d = self.adapter.publish(topic, data.get("data"))

        def failed(failure):
            if failure.check(InvocationError):
                return failure
            raise InvocationError("publish_failed", "Failed to publish to {}: {}".format(
                topic, failure.getErrorMessage()))
        return d.addCallbacks(lambda _: None, failed)

    def register_trigger(self, trigger):
        """
        @return: Deferred firing with None, or failing with L{TriggerError} when the
            config has no topic.
        """
        config = trigger.config
        topic = config.get("topic") if isinstance(config, dict) else None
        if not isinstance(topic, str) or not topic:
            return fail(TriggerError(
                "subscribe trigger {}: config needs a non-empty string 'topic'".format(
                    trigger.id)))
        return self.adapter.subscribe(topic, trigger.id, trigger.function_id)

    def unregister_trigger(self, trigger):
        """Remove that one subscription. @return: Deferred firing with None."""
        return self.adapter.unsubscribe(trigger.config["topic"], trigger.id)
