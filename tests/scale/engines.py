"""Engines for the scale-out tests: several in one test process, on the real reactor."""

from twisted.internet import defer

from iii_twisted.service import EngineService
from iii_twisted.testing import wait_for  # noqa: F401 (tests import it from here)


def other_pool(redis_url):
    """
    @return: the same Redis under another URL (``localhost`` for ``127.0.0.1``), so
        that a second engine in this process gets a pool of its own, as a second
        process would.
    """
    return redis_url.replace("127.0.0.1", "localhost")


def redis_modules(redis_url, *names, stream_port=0):
    """@return: the ``modules:`` entries for C{names} (state, stream, pubsub, cron) on Redis."""
    adapter = {"redis_url": redis_url}
    entries = {
        "state": {"class": "modules::state::StateModule", "config": {"adapter": {
            "class": "modules::state::adapters::RedisAdapter", "config": adapter}}},
        "stream": {"class": "modules::stream::StreamModule", "config": {
            "port": stream_port, "host": "127.0.0.1", "adapter": {
                "class": "modules::stream::adapters::RedisAdapter", "config": adapter}}},
        "pubsub": {"class": "modules::pubsub::PubSubModule", "config": {"adapter": {
            "class": "modules::pubsub::RedisAdapter", "config": adapter}}},
        "cron": {"class": "modules::cron::CronModule", "config": {"adapter": {
            "class": "modules::cron::RedisCronAdapter", "config": adapter}}},
    }
    return [entries[name] for name in names]


class Engines:
    """Start engines; stop them all at the end of the test."""

    def __init__(self):
        self.services = []

    def start(self, modules):
        service = EngineService({"listen": "tcp:0:interface=127.0.0.1",
                                 "invocation_timeout_ms": 20000, "modules": modules})
        service.startService()
        self.services.append(service)
        return service

    def two_on_redis(self, redis_url, *names):
        """
        @param names: the Redis modules both run (L{redis_modules}).
        @return: two engines sharing one Redis, each with a connection pool of its own
            (L{other_pool}), as two processes would have.
        """
        return (self.start(redis_modules(redis_url, *names)),
                self.start(redis_modules(other_pool(redis_url), *names)))

    def stop(self, service):
        if service in self.services:
            self.services.remove(service)
            return service.stopService()
        return defer.succeed(None)

    def stop_all(self):
        return defer.gatherResults([self.stop(s) for s in list(self.services)],
                                   consumeErrors=True)


def module_of(service, cls):
    return next(m for m in service.modules if isinstance(m, cls))


class AutoWorker:
    """
    A fake worker (no socket) on an engine that registers functions and triggers and
    answers every call at once with C{result}, keeping what it was called with.

    @ivar calls: (function id, data) of every call, in order.
    """

    def __init__(self, engine, *function_ids, result=None):
        from twisted.internet import reactor

        from iii_twisted.testing import FakeWorkerConnection

        self.calls = []
        self._result = result
        self._reactor = reactor
        self.conn = FakeWorkerConnection.connect(engine)
        original = self.conn.send

        def send(message):
            ok = original(message)
            if message.get("type") == "invokefunction":
                self.calls.append((message["function_id"], message.get("data")))
                if message.get("invocation_id"):
                    reactor.callLater(0, self._answer, message)
            return ok
        self.conn.send = send
        for function_id in function_ids:
            self.conn.receive({"type": "registerfunction", "id": function_id})

    def _answer(self, message):
        if self.conn.closed is None:
            self.conn.receive({"type": "invocationresult",
                               "invocation_id": message["invocation_id"],
                               "function_id": message["function_id"],
                               "result": self._result})

    def trigger(self, trigger_id, trigger_type, function_id, config):
        self.conn.receive({"type": "registertrigger", "id": trigger_id,
                           "trigger_type": trigger_type, "function_id": function_id,
                           "config": config})

    def data_of(self, function_id):
        return [data for fid, data in self.calls if fid == function_id]


async def stream_port(service):
    """@return: the port the engine's stream module listens on (config port 0)."""
    from iii_twisted.modules.stream import StreamModule

    port = await module_of(service, StreamModule)._listener._waitingForPort
    return port.getHost().port


async def stream_client(port):
    """@return: a real WebSocket client (L{StreamTestClient}) open on a stream port."""
    from autobahn.twisted.websocket import WebSocketClientFactory
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    factory = WebSocketClientFactory("ws://127.0.0.1:{}/".format(port), reactor=reactor)
    factory.protocol = StreamTestClient
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await client.opened
    return client


def _client_class():
    import json

    from autobahn.twisted.websocket import WebSocketClientProtocol
    from twisted.internet.defer import Deferred

    class StreamTestClient(WebSocketClientProtocol):
        """A browser-like stream client: C{received} holds the decoded pushes."""

        def __init__(self):
            WebSocketClientProtocol.__init__(self)
            self.received = []
            self.opened = Deferred()
            self.closed = Deferred()

        def onOpen(self):
            self.opened.callback(self)

        def onClose(self, wasClean, code, reason):
            if not self.closed.called:
                self.closed.callback(code)

        def close(self):
            """Close and wait until closed (before the engines stop: see below)."""
            # (Engines stopping with stream clients still open try to close them with
            # code 1001, which Autobahn's sendClose refuses; noted for the stream
            # socket's owner.)
            self.sendClose()
            return self.closed

        def onMessage(self, payload, isBinary):
            self.received.append(json.loads(payload))

        def join(self, sub, name, group, item=None):
            data = {"subscriptionId": sub, "streamName": name, "groupId": group}
            if item is not None:
                data["id"] = item
            self.sendMessage(json.dumps({"type": "join", "data": data}).encode())

        def events(self, kind=None):
            return [m["event"] for m in self.received
                    if m.get("type") == "stream" and (kind is None or m["event"]["type"] == kind)]

    return StreamTestClient


StreamTestClient = _client_class()


def redis_queue_module(redis_url, queue_configs=None, lease_ms=30000):
    """@return: the queue module's entry on the Redis broker."""
    return {"class": "modules::queue::QueueModule", "config": {
        "adapter": {"class": "modules::queue::RedisAdapter",
                    "config": {"redis_url": redis_url, "lease_ms": lease_ms,
                               "poll_interval_ms": 50}},
        "queue_configs": queue_configs or {}}}


def rabbitmq_queue_module(amqp_url, queue_configs=None, **_):
    """@return: the queue module's entry on the RabbitMQ broker."""
    return {"class": "modules::queue::QueueModule", "config": {
        "adapter": {"class": "modules::queue::RabbitMQAdapter",
                    "config": {"amqp_url": amqp_url, "poll_interval_ms": 50}},
        "queue_configs": queue_configs or {}}}
