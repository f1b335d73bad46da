"""
L{RabbitMQBroker}: ``modules::queue::RabbitMQAdapter``, the queue module's messages
in RabbitMQ (an L{IQueueBroker}), on pika's Twisted connection.

Topology per queue key ``Q`` (``__fn_queue::NAME`` for a named queue, the topic for a
topic queue), every exchange and queue durable, named after the reference's named
queues (v0.10 ``queue/adapters/rabbitmq/naming.rs``)::

    exchange iii.Q (direct) --Q--> queue iii.Q.queue          (x-dead-letter-exchange
                                                               iii.Q::dlq, as the
                                                               reference declares it)
    exchange iii.Q::dlq     --Q--> queue iii.Q::dlq.queue
    queue iii.Q::retry.D.queue    (x-message-ttl D ms, dead-letters back to iii.Q)

A message is published persistent, with publisher confirms: L{publish} fires once
RabbitMQ has confirmed it. A retry (and a requeue, for a function this engine does
not have) is published to the delay queue of its delay, confirmed, and only *then*
is the delivery acknowledged: a crash in between delivers it twice, never zero times
(the reference acknowledges first). One delay queue per distinct delay keeps the
builtin queue's exponential backoff without per-message TTLs blocking each other.
Dead letters are published (confirmed) to the DLQ with ``x-iii-error`` and
``x-iii-failed-at`` headers, then acknowledged.

Consumers get ``prefetch`` unacknowledged messages at a time (``basic_qos``); a FIFO
queue is declared with ``x-single-active-consumer`` so one engine at a time consumes it,
in order. When the connection drops, RabbitMQ gives every unacknowledged message back;
the broker reconnects (0.2 s backing off to 2 s), declares again and consumes again.

The message body is the job's JSON (the reference sends the bare data with headers):
a fleet mixing this engine and the reference must not share queues.

Dead-letter listing, redrive and discard read the DLQ with ``basic_get`` and put back
what they leave (not atomic, as in the reference). In a FIFO queue a retry keeps its delivery (the
next message waits for it) and is handed out again after its backoff. Queue stats count what RabbitMQ
reports ready in the queue and its DLQ (``in_flight`` and ``delayed`` are this
engine's own counts).
"""

import json

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import IQueueBroker

DEFAULT_URL = "amqp://localhost:5672"
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class RabbitMQUnavailable(Exception):
    """RabbitMQ could not be reached in time."""


def names(queue):
    base = "iii." + queue
    return {"exchange": base, "queue": base + ".queue", "dlx": base + "::dlq",
            "dlq": base + "::dlq.queue", "key": queue}


def delay_queue(queue, delay_ms):
    return "iii.{}::retry.{}.queue".format(queue, int(delay_ms))


class _Consumer:
    def __init__(self, queue, prefetch, fifo):
        self.queue = queue
        self.prefetch = prefetch
        self.fifo = fifo
        self.channel = None
        self.tag = None


@implementer(IQueueBroker)
class RabbitMQBroker:
    """
    An L{IQueueBroker} in RabbitMQ; see the module docstring.

    @param url: ``amqp://user:password@host:port/vhost`` (``amqps://`` for TLS).
    @param job_from_record: builds a Job from its JSON object.
    @param timeout: seconds an operation waits for the connection before failing.
    """

    broker_type = "rabbitmq"
    _log = Logger()

    def __init__(self, url, reactor, job_from_record, timeout=5.0):
        import pika

        self._pika = pika
        self.params = pika.URLParameters(url)
        self._safe_url = "{}://{}:{}{}".format(
            "amqps" if self.params.ssl_options else "amqp", self.params.host,
            self.params.port, "/" + self.params.virtual_host.lstrip("/"))
        self._reactor = reactor
        self._job_from_record = job_from_record
        self.timeout = timeout
        self._consumers = {}
        self._declared = set()
        self._delays = {}  # queue -> set of delay queues declared
        self._held = {}  # (queue, job id) -> (channel, delivery tag)
        self._fanouts = set()  # (topic, queue) bound here, bound again on reconnect
        self._connection = None
        self._publisher = None
        self._service = None
        self._arrived = None
        self._waiters = []
        self._stopping = False

    # -- connection ------------------------------------------------------------------

    def start(self, arrived):
        from pika.adapters.twisted_connection import TwistedProtocolConnection

        self._arrived = arrived
        params = self.params
        endpoint = HostnameEndpoint(self._reactor, params.host, params.port,
                                    timeout=self.timeout)
        if params.ssl_options:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(params.host), endpoint)
        factory = Factory.forProtocol(lambda: TwistedProtocolConnection(params))
        self._service = ClientService(endpoint, factory, retryPolicy=backoffPolicy(
            initialDelay=0.2, maxDelay=2.0), prepareConnection=self._prepare,
            clock=self._reactor)
        self._service.startService()
        return defer.succeed(None)

    async def _prepare(self, connection):
        # Runs on every (re)connection, before the service reports it connected.
        await connection.ready
        self._declared.clear()
        self._delays.clear()
        publisher = await connection.channel()
        await publisher.confirm_delivery()
        self._connection, self._publisher = connection, publisher
        connection.closed.addBoth(self._lost, connection)
        for topic, queue in sorted(self._fanouts):
            await self._add_fanout(topic, queue)
        for consumer in list(self._consumers.values()):
            await self._start_consumer(consumer)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _lost(self, reason, connection):
        if self._connection is connection:
            self._connection = self._publisher = None
            self._held.clear()  # RabbitMQ gives unacknowledged messages back
            for consumer in self._consumers.values():
                consumer.channel = None
            if not self._stopping:
                self._log.warn("RabbitMQ at {url}: connection lost; reconnecting",
                               url=self._safe_url)

    def _ready(self):
        if self._publisher is not None and self._publisher.is_closed \
                and self._connection is not None and self._connection.is_open:
            # The broker closed the channel (a refused declare): open another.
            return defer.Deferred.fromCoroutine(self._reopen_publisher())
        if self._publisher is not None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)

        def expire():
            if d in self._waiters:
                self._waiters.remove(d)
                d.errback(RabbitMQUnavailable("no connection to RabbitMQ at {} within "
                                              "{:g} s".format(self._safe_url, self.timeout)))
        call = self._reactor.callLater(self.timeout, expire)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    async def _reopen_publisher(self):
        publisher = await self._connection.channel()
        await publisher.confirm_delivery()
        self._publisher = publisher
        self._declared.clear()
        self._delays.clear()

    def health(self):
        """Readiness (iii_twisted.health): None while connected, else why not."""
        connection = self._connection
        if connection is not None and connection.is_open and self._publisher is not None:
            return None
        return "no connection to RabbitMQ at {}".format(self._safe_url)

    def stop(self):
        self._stopping = True
        self._consumers.clear()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(RabbitMQUnavailable("the RabbitMQ broker is stopped"))
        if self._service is None:
            return defer.succeed(None)
        # A connection dropped mid-handshake fails its own Deferreds; stopping is done.
        return self._service.stopService().addErrback(lambda f: self._log.info(
            "RabbitMQ at {url}: stopped ({error})", url=self._safe_url,
            error=f.getErrorMessage()))

    # -- topology --------------------------------------------------------------------

    async def _declare(self, channel, queue, fifo=False):
        if queue in self._declared:
            return
        n = names(queue)
        await channel.exchange_declare(exchange=n["exchange"], exchange_type="direct",
                                       durable=True)
        await channel.exchange_declare(exchange=n["dlx"], exchange_type="direct",
                                       durable=True)
        arguments = {"x-dead-letter-exchange": n["dlx"]}
        if fifo:
            arguments["x-single-active-consumer"] = True
        await channel.queue_declare(queue=n["queue"], durable=True, arguments=arguments)
        await channel.queue_bind(queue=n["queue"], exchange=n["exchange"], routing_key=n["key"])
        await channel.queue_declare(queue=n["dlq"], durable=True)
        await channel.queue_bind(queue=n["dlq"], exchange=n["dlx"], routing_key=n["key"])
        self._declared.add(queue)

    async def _declare_delay(self, channel, queue, delay_ms):
        name = delay_queue(queue, delay_ms)
        if name in self._delays.setdefault(queue, set()):
            return name
        n = names(queue)
        await channel.queue_declare(queue=name, durable=True, arguments={
            "x-message-ttl": int(delay_ms), "x-dead-letter-exchange": n["exchange"],
            "x-dead-letter-routing-key": n["key"]})
        self._delays[queue].add(name)
        return name

    # -- consuming -------------------------------------------------------------------

    def consume(self, queue, prefetch, fifo):
        consumer = self._consumers.get(queue)
        if consumer is not None:
            if fifo:
                prefetch = 1
            if consumer.prefetch != prefetch and consumer.channel is not None:
                consumer.prefetch = prefetch
                consumer.channel.basic_qos(prefetch_count=max(1, prefetch))
            return
        if fifo:
            prefetch = 1  # with one active consumer: one message at a time, in order
        consumer = self._consumers[queue] = _Consumer(queue, prefetch, fifo)
        if self._connection is not None:
            defer.Deferred.fromCoroutine(self._start_consumer(consumer)).addErrback(
                lambda f: self._log.warn("queue {queue}: consuming failed: {error}",
                                         queue=queue, error=f.getErrorMessage()))

    async def _start_consumer(self, consumer):
        channel = await self._connection.channel()
        await self._declare(channel, consumer.queue, consumer.fifo)
        await channel.basic_qos(prefetch_count=max(1, consumer.prefetch))
        messages, tag = await channel.basic_consume(queue=names(consumer.queue)["queue"])
        consumer.channel, consumer.tag = channel, tag
        self._read(consumer, channel, messages)

    def _read(self, consumer, channel, messages):
        def got(message):
            if self._consumers.get(consumer.queue) is not consumer:
                # Stopped consuming: give it back at once.
                channel.basic_nack(delivery_tag=message.method.delivery_tag, requeue=True)
                return
            try:
                job = self._job_from_record(json.loads(message.body))
            except (ValueError, KeyError, TypeError) as e:
                self._log.warn("queue {queue}: a message that is not a job was "
                               "dead-lettered: {error}", queue=consumer.queue, error=e)
                channel.basic_nack(delivery_tag=message.method.delivery_tag, requeue=False)
            else:
                # A fanout copy says the queue it was published for: it is this one.
                job.queue = consumer.queue
                self._held[(job.queue, job.id)] = (channel, message.method.delivery_tag)
                try:
                    self._arrived(job)
                except Exception:
                    self._log.failure("queue {queue}: handing out {job_id} failed",
                                      queue=consumer.queue, job_id=job.id)
            self._read(consumer, channel, messages)

        def closed(failure):
            return None  # the channel or connection closed: _prepare starts anew
        messages.get().addCallbacks(got, closed)

    def stop_consuming(self, queue):
        consumer = self._consumers.pop(queue, None)
        if consumer is not None and consumer.channel is not None:
            consumer.channel.basic_cancel(consumer.tag).addErrback(lambda _: None)

    # -- messages --------------------------------------------------------------------

    def _properties(self, job, headers=None):
        return self._pika.BasicProperties(
            delivery_mode=2, message_id=job.id, content_type="application/json",
            headers=headers)

    async def _publish(self, exchange, routing_key, job, declare=None, headers=None):
        await self._ready()
        channel = self._publisher
        if declare is not None:
            routing_key = await declare(channel) or routing_key
        await channel.basic_publish(exchange, routing_key,
                                    _encoder.encode(job.record()).encode("utf-8"),
                                    self._properties(job, headers))

    def publish(self, job):
        n = names(job.queue)
        fifo = self._consumers[job.queue].fifo if job.queue in self._consumers else False
        d = defer.Deferred.fromCoroutine(self._publish(
            n["exchange"], n["key"], job,
            lambda channel: self._declare(channel, job.queue, fifo)))
        return d.addErrback(self._named)

    def _named(self, failure):
        """Say which broker failed (the client's own messages do not)."""
        if failure.check(RabbitMQUnavailable):
            return failure
        raise RabbitMQUnavailable("RabbitMQ at {}: {}".format(
            self._safe_url, failure.getErrorMessage() or failure.type.__name__))

    @staticmethod
    def _fanout_exchange(topic):
        return "iii.fanout::" + topic

    async def _add_fanout(self, topic, queue):
        await self._ready()
        channel = self._publisher
        await self._declare(channel, queue)
        exchange = self._fanout_exchange(topic)
        await channel.exchange_declare(exchange=exchange, exchange_type="fanout",
                                       durable=True)
        await channel.queue_bind(queue=names(queue)["queue"], exchange=exchange)

    def add_fanout(self, topic, queue):
        """
        Binds the queue to the topic's durable fanout exchange ``iii.fanout::TOPIC``
        (now, or as soon as connected; again on every reconnection).

        @return: Deferred firing once bound; failing when RabbitMQ cannot be reached
            in time (the binding is then made on connection).
        """
        self._fanouts.add((topic, queue))
        d = self._ready()
        return d.addCallback(lambda _: defer.Deferred.fromCoroutine(
            self._add_fanout(topic, queue)))

    def publish_fanout(self, topic, job):
        """One publish to the fanout exchange; RabbitMQ copies it to every bound queue."""
        exchange = self._fanout_exchange(topic)

        async def declare(channel):
            await channel.exchange_declare(exchange=exchange, exchange_type="fanout",
                                           durable=True)
        return defer.Deferred.fromCoroutine(
            self._publish(exchange, "", job, declare)).addErrback(self._named)

    def remove_fanout(self, topic, queue):
        """
        Keeps the record: another engine may still subscribe the queue, and a durable
        subscription collects messages while its subscriber is away.
        """
        return defer.succeed(None)

    def ack(self, job):
        held = self._held.pop((job.queue, job.id), None)
        if held is not None:
            channel, tag = held
            channel.basic_ack(delivery_tag=tag)
        return defer.succeed(None)

    async def _then_ack(self, job, publishing):
        try:
            await publishing
        except Exception:
            # Not republished: give the delivery back (redelivered later, at once).
            held = self._held.pop((job.queue, job.id), None)
            if held is not None:
                held[0].basic_nack(delivery_tag=held[1], requeue=True)
            raise
        await self.ack(job)

    def retry(self, job, delay_ms):
        consumer = self._consumers.get(job.queue)
        if consumer is not None and consumer.fifo and (job.queue, job.id) in self._held:
            # FIFO (one active consumer, prefetch 1): keep the delivery, so nothing
            # overtakes it, and hand it out again after the delay. Should this engine
            # go, RabbitMQ gives it back at the head of the queue.
            self._reactor.callLater(delay_ms / 1000.0, self._again, job)
            return defer.succeed(None)

        async def declare(channel):
            return await self._declare_delay(channel, job.queue, delay_ms)
        return defer.Deferred.fromCoroutine(self._then_ack(
            job, self._publish("", None, job, declare)))

    def requeue(self, job, delay_ms):
        """
        The function is not on this engine: keep the delivery for C{delay_ms}, then
        give it back to the queue (``basic_nack`` with requeue), where any engine's
        consumer may take it. It never leaves the queue, so nothing can lose it (a
        trip through a delay queue would be dead-lettered, which RabbitMQ does not
        confirm). In a FIFO queue it is handed out here again, as a retry is.
        """
        consumer = self._consumers.get(job.queue)
        if consumer is not None and consumer.fifo:
            return self.retry(job, delay_ms)
        self._reactor.callLater(delay_ms / 1000.0, self._give_back, job)
        return defer.succeed(None)

    def _give_back(self, job):
        held = self._held.pop((job.queue, job.id), None)
        if held is not None:
            channel, tag = held
            channel.basic_nack(delivery_tag=tag, requeue=True)

    def _again(self, job):
        if (job.queue, job.id) in self._held and not self._stopping:
            self._arrived(job)

    def dead(self, job, error, failed_at):
        n = names(job.queue)
        return defer.Deferred.fromCoroutine(self._then_ack(job, self._publish(
            n["dlx"], n["key"], job,
            lambda channel: self._declare(channel, job.queue),
            headers={"x-iii-error": error, "x-iii-failed-at": failed_at})))

    # -- dead letters and stats ------------------------------------------------------

    async def _take_dlq(self, queue):
        """@return: (channel, [(message, job)]) of every dead letter, unacknowledged."""
        await self._ready()
        channel = await self._connection.channel()
        await self._declare(channel, queue)
        taken = []
        while True:
            message = await channel.basic_get(queue=names(queue)["dlq"], auto_ack=False)
            if message is None:
                return channel, taken
            taken.append((message, self._job_from_record(json.loads(message.body))))

    @staticmethod
    def _entry(message, job):
        headers = message.properties.headers or {}
        failed_at = headers.get("x-iii-failed-at")
        error = headers.get("x-iii-error")
        if isinstance(error, bytes):
            error = error.decode("utf-8", "replace")
        return job, error, failed_at

    async def _dlq(self, queue, act=None):
        channel, taken = await self._take_dlq(queue)
        try:
            result = []
            for message, job in taken:
                if act is None:
                    result.append(self._entry(message, job))
                else:
                    result.append(await act(channel, message, job))
            return [r for r in result if r is not None]
        finally:
            # Closing the channel gives back what was not acknowledged; wait for it,
            # or a listing right after this one finds the DLQ empty.
            channel.close()
            await channel.on_closed

    def dlq_messages(self, queue):
        return defer.Deferred.fromCoroutine(self._dlq(queue))

    def redrive(self, queue, ids):
        n = names(queue)

        async def act(channel, message, job):
            if ids is not None and job.id not in ids:
                return None
            job.attempts = 0
            await self._publish(n["exchange"], n["key"], job)
            channel.basic_ack(delivery_tag=message.method.delivery_tag)
            return job.id
        return defer.Deferred.fromCoroutine(self._dlq(queue, act))

    def discard(self, queue, ids):
        async def act(channel, message, job):
            if ids is not None and job.id not in ids:
                return None
            channel.basic_ack(delivery_tag=message.method.delivery_tag)
            return job.id
        return defer.Deferred.fromCoroutine(self._dlq(queue, act))

    async def _stats(self, queue):
        await self._ready()
        channel = await self._connection.channel()
        try:
            await self._declare(channel, queue)
            n = names(queue)
            ready = await channel.queue_declare(queue=n["queue"], passive=True)
            dlq = await channel.queue_declare(queue=n["dlq"], passive=True)
            delayed = 0
            for name in self._delays.get(queue, ()):
                frame = await channel.queue_declare(queue=name, passive=True)
                delayed += frame.method.message_count
        finally:
            channel.close()
        held = sum(1 for (q, _) in self._held if q == queue)
        return {"ready": ready.method.message_count, "delayed": delayed,
                "in_flight": held, "dlq": dlq.method.message_count}

    def stats(self, queue):
        return defer.Deferred.fromCoroutine(self._stats(queue))

    async def _dlq_queues(self):
        found = {}
        for queue in sorted(self._declared | set(self._consumers)):
            stats = await self._stats(queue)
            if stats["dlq"]:
                found[queue] = stats["dlq"]
        return found

    def dlq_queues(self):
        """Queues this engine declared (AMQP cannot list queues) that hold dead letters."""
        return defer.Deferred.fromCoroutine(self._dlq_queues())


    # -- what this process holds: nothing (the messages are on the server) ----------

    def local_queues(self):
        return []

    def local_counts(self, queue):
        return {"ready": 0, "delayed": 0, "dlq": 0}
