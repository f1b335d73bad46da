"""
L{RedisPubSubAdapter}: ``modules::pubsub::RedisAdapter``, pub/sub across every engine
that shares a Redis.

As in the reference (v0.10 ``pubsub/adapters/redis_adapter.rs``), a topic is the Redis
channel of the same name (no prefix) and a message is the ``data`` as JSON text. Each
engine holds one Redis subscription per topic that has local subscriptions, on the
pool's one subscriber connection (the reference opens a connection per topic), and
calls every local subscription of the topic once per message (the reference's HEAD
semantics; v0.10 kept one per topic). Subscriptions are made again after Redis comes
back; what is published while an engine's subscriber connection is down does not
reach that engine (Redis pub/sub keeps nothing).
"""

import json

from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IPubSubAdapter
from ..protocol import loads
from ..redis_client import RedisUnavailable

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@implementer(IPubSubAdapter)
class RedisPubSubAdapter:
    """
    @param client: the shared L{iii_twisted.redis_client.RedisClient} (released by
        L{close}).
    @param deliver: C{deliver(function_id, data)}, fire and forget.
    """

    _log = Logger()

    def __init__(self, client, deliver):
        self._client = client
        self._deliver = deliver
        self._topics = {}  # topic -> {subscription id: function id}

    def subscribe(self, topic, subscription_id, function_id):
        """
        @return: Deferred firing with None once Redis confirmed the subscription (or,
            Redis being unreachable, once that is logged: it is made on reconnect).
        """
        subscriptions = self._topics.get(topic)
        if subscriptions is None:
            subscriptions = self._topics[topic] = {}
            subscriptions[subscription_id] = function_id
            d = self._client.subscribe(topic, self._message)
            d.addErrback(self._not_now, topic)
            return d
        subscriptions[subscription_id] = function_id
        return succeed(None)

    def _not_now(self, failure, topic):
        failure.trap(RedisUnavailable)
        self._log.warn("pubsub: subscription to {topic} waits for Redis: {error}",
                       topic=topic, error=failure.getErrorMessage())

    def unsubscribe(self, topic, subscription_id):
        subscriptions = self._topics.get(topic)
        if subscriptions is None:
            return succeed(None)
        subscriptions.pop(subscription_id, None)
        if subscriptions:
            return succeed(None)
        del self._topics[topic]
        return self._client.unsubscribe(topic, self._message)

    def publish(self, topic, data):
        """
        @return: Deferred firing with the number of Redis subscribers that got it (one
            per engine subscribed to the topic, not per subscription); failing with
            L{iii_twisted.redis_client.RedisError} when Redis cannot be reached.
        """
        return self._client.publish(topic, _encoder.encode(data))

    def _message(self, channel, message):
        try:
            # Anyone with access to Redis may publish: refuse what the engine could not
            # write back (NaN, 1e999; protocol.loads).
            data = loads(message)
        except (ValueError, RecursionError):
            self._log.warn("pubsub: message on {topic} is not JSON; dropped", topic=channel)
            return
        for function_id in list(self._topics.get(channel, {}).values()):
            self._deliver(function_id, data)

    def subscriptions(self, topic):
        """@return: subscription id -> function id, for one topic (on this engine)."""
        return dict(self._topics.get(topic, {}))

    def close(self):
        """Drop every subscription and release the client. @return: Deferred."""
        for topic in list(self._topics):
            self._client.unsubscribe(topic, self._message)
        self._topics.clear()
        return self._client.release()
