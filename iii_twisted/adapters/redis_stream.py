"""
L{RedisStreamBus}: how ``modules::stream::adapters::RedisAdapter`` pushes stream
changes to clients joined on any engine sharing a Redis.

As in the reference (v0.10 ``stream/adapters/redis_adapter.rs``), every push is
PUBLISHed on one channel, ``stream::events``, as the client message JSON
(``{"type": "stream", "timestamp", "streamName", "groupId", "id", "event"}``), and
every engine, the writer included, sends what arrives on it to its own subscribed
clients. One path for everyone keeps one order: an engine publishes on one connection,
so its pushes arrive everywhere in the order it made them. Stream triggers still fire
only on the engine that made the change (as in the reference).

Deviation: the subscription is made again when Redis comes back (the reference's
stays dead until the engine restarts). Pushes published while an engine's connection
is down are lost for that engine's clients (Redis pub/sub keeps nothing); clients
re-``join`` to get a ``sync`` of the current items.
"""

from twisted.logger import Logger

from ..protocol import loads

CHANNEL = "stream::events"


class RedisStreamBus:
    """
    @param client: the shared L{iii_twisted.redis_client.RedisClient} (released by
        L{close}).
    @param push_local: C{push_local(stream_name, group_id, item_id, payload_bytes)},
        which sends one push to this engine's matching clients.
    """

    _log = Logger()

    def __init__(self, client, push_local):
        self._client = client
        self._push_local = push_local
        self._subscribed = None

    def start(self):
        """Subscribe to the channel. @return: Deferred firing once subscribed (or logged)."""
        d = self._client.subscribe(CHANNEL, self._message)

        def not_now(failure):
            self._log.warn("stream: subscription to Redis waits for the connection: "
                           "{error}", error=failure.getErrorMessage())
        return d.addErrback(not_now)

    def publish(self, payload):
        """
        Send one encoded push (UTF-8 JSON bytes) to every engine's clients.

        Fire and forget: a push that cannot be published is logged and lost.
        """
        d = self._client.execute_ordered("PUBLISH", CHANNEL, payload.decode("utf-8"))
        d.addErrback(lambda f: self._log.warn(
            "stream: a push was lost, Redis is unreachable: {error}",
            error=f.getErrorMessage()))

    def _message(self, channel, text):
        try:
            message = loads(text)  # refuses NaN and 1e999 too (protocol.loads)
            name, group, item = message["streamName"], message["groupId"], message.get("id")
        except (ValueError, KeyError, TypeError, RecursionError):
            self._log.warn("stream: a message on {channel} is not a stream push; dropped",
                           channel=channel)
            return
        if not isinstance(name, str) or not isinstance(group, str):
            return
        self._push_local(name, group, item, text.encode("utf-8"))

    def close(self):
        """Unsubscribe and release the client. @return: Deferred."""
        self._client.unsubscribe(CHANNEL, self._message)
        return self._client.release()
