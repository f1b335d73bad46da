"""
The queue module, ``modules::queue::QueueModule`` (../shared/spec/modules.md §7).

Two kinds of queue share one delivery engine:

- **named queues** from ``queue_configs``: a worker sends ``invokefunction`` with
  ``action: {"type": "enqueue", "queue": NAME}``; the engine answers at once with a
  ``messageReceiptId`` and the message is later delivered to that function
  (L{QueueModule.enqueue}, our L{IEnqueuer});
- **topic queues**: the ``enqueue`` function ``{topic, data}`` puts a message on a
  topic, and the functions bound to it with a ``queue`` trigger ``{topic}`` consume it
  (competing consumers: each message goes to one of them, as in the reference).

A delivery is ``engine.call(function_id, data)``; success (any result, null included)
acknowledges the message; failure retries it after ``backoff_ms * 2^(attempt-1)`` ms
until ``max_retries`` attempts were made, then moves it to the dead-letter queue
(DLQ), from where ``iii::queue::redrive*`` puts it back and ``iii::queue::discard*``
drops it.

Every event (enqueue, ack, nack, dead-letter, redrive, discard) goes to an
L{IQueueStore}: in memory by default, or an fsync'd journal
(L{iii_twisted.adapters.queue_journal.JournalQueueStore}) with ``store_method:
file_based``, in which case a message is acknowledged to its sender only once it is on
disk and survives a crash of the engine (at-least-once delivery).

Deviations from the reference (docs/queues-pubsub-cron.rst lists them):

- a message whose function is not registered (yet) waits for it instead of failing
  with ``function_not_found`` (so messages replayed after a restart are not
  dead-lettered before their workers reconnect);
- FIFO queues keep order per message group, retries included (a group waits for its
  head message's retries), and run up to ``concurrency`` groups at once (the reference
  runs one message at a time and lets retries overtake);
- the receipt id is also the message id that the DLQ functions take;
- a ``queue`` trigger without a topic, or with a malformed ``queue_config``, is refused.
"""

import json
import os
from collections import deque
from uuid import uuid4

from twisted.application.service import Service
from twisted.internet.defer import fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import protocol as P
from ..adapters.queue_journal import JournalQueueStore, MemoryQueueStore, thread_runner
from ..config import ConfigError, get_option
from ..schema import Adapter, Adapters, Key, MapOf, Section
from ..interfaces import IEnqueuer, IModule, ITriggerProvider, TriggerError
from ..protocol import InvocationError

FN_QUEUE_PREFIX = "__fn_queue::"
BUILTIN_ADAPTER = "modules::queue::BuiltinQueueAdapter"
REDIS_ADAPTER = "modules::queue::RedisAdapter"
RABBITMQ_ADAPTER = "modules::queue::RabbitMQAdapter"
ADAPTERS = (BUILTIN_ADAPTER, REDIS_ADAPTER, RABBITMQ_ADAPTER)

_MODULE_KEYS = {"adapter", "queue_configs"}
_QUEUE_KEYS = {"max_retries", "concurrency", "type", "message_group_field", "backoff_ms",
               "poll_interval_ms"}
_ADAPTER_KEYS = {"store_method", "file_path", "save_interval_ms", "channel_size",
                 "max_attempts", "backoff_ms", "concurrency", "poll_interval_ms", "mode",
                 "redis_url", "lease_ms", "amqp_url", "prefetch_count", "queue_mode"}
# Every key of the module's config (iii_twisted/schema.py says how to add one).
_QUEUE_DEFAULTS = dict(
    concurrency=Key(int, 10, "messages delivered at once", min=1),
    backoff_ms=Key(int, 1000, "first retry delay, ms (doubles each attempt)", min=0),
    poll_interval_ms=Key(int, 100, "how often an idle queue looks for work, ms", min=1),
)
CONFIG_SCHEMA = Section(
    adapter=Key(Adapters(
        Adapter("builtin", (BUILTIN_ADAPTER,), Section(
            store_method=Key(str, "in_memory", "in_memory, or file_based (a journal in "
                             "file_path)", choices=("in_memory", "file_based")),
            file_path=Key(str, "data/queue_store", "directory of a file_based journal"),
            save_interval_ms=Key(int, 5000, "accepted for compatibility", min=0),
            channel_size=Key(int, 256, "accepted for compatibility", min=1),
            max_attempts=Key(int, 3, "deliveries before a message is dead-lettered",
                             min=0),
            mode=Key(str, "standard", "standard, or fifo (one at a time, in order)",
                     choices=("standard", "fifo")),
            **_QUEUE_DEFAULTS)),
        Adapter("rabbitmq", (RABBITMQ_ADAPTER,), Section(
            amqp_url=Key(str, "amqp://localhost:5672", "the RabbitMQ server: amqp://user:"
                         "password@host:port/vhost (amqps:// for TLS)"),
            max_attempts=Key(int, 3, "deliveries before a message is dead-lettered",
                             min=0),
            prefetch_count=Key(int, 10, "messages an engine holds unacknowledged at "
                               "once, per queue (the default concurrency)", min=1),
            queue_mode=Key(str, "standard", "standard, or fifo (one consumer at a time, "
                           "in order)", choices=("standard", "fifo")),
            **_QUEUE_DEFAULTS)),
        Adapter("redis", (REDIS_ADAPTER,), Section(
            redis_url=Key(str, "redis://localhost:6379",
                          "the Redis server (redis:// or rediss:// for TLS, password, db)"),
            lease_ms=Key(int, 30000, "how long a message handed to an engine stays its "
                         "without a renewal, ms (a dead engine's messages come back "
                         "after it)", min=100),
            max_attempts=Key(int, 3, "deliveries before a message is dead-lettered",
                             min=0),
            mode=Key(str, "standard", "standard, or fifo (in order per message group)",
                     choices=("standard", "fifo")),
            **_QUEUE_DEFAULTS)),
        Adapter("bridge", ("modules::queue::adapters::Bridge",), None,
                "the queue's bridge adapter is not built in this engine (the state "
                "and stream ones are; docs/cluster.rst)"),
    ), None, "where messages are kept (default: builtin in memory)"),
    queue_configs=Key(MapOf(Section(
        _check=lambda q: ("message_group_field", "a fifo queue needs message_group_field "
                          "(the data field that names a message's group)")
        if q.get("type") == "fifo" and not q.get("message_group_field") else None,
        max_retries=Key(int, 3, "deliveries before dead-lettering", min=0),
        type=Key(str, "standard", "standard or fifo", choices=("standard", "fifo")),
        message_group_field=Key(str, None, "data field naming a fifo message's group"),
        **_QUEUE_DEFAULTS)), None, "named queues (for the Enqueue action), by name"),
)

_SUBSCRIPTION_KEYS = {"type", "concurrency", "maxRetries", "visibilityTimeout",
                      "delaySeconds", "backoffType", "backoffDelayMs", "maxPriority"}
# Per-subscriber settings the reference knows that this queue does not implement: a
# trigger naming one is refused (rather than run with the setting silently off).
_UNSUPPORTED_SUBSCRIPTION_KEYS = {
    "visibilityTimeout": "there is no visibility timeout (a delivery lasts until its "
                         "call ends or times out: invocation_timeout_ms)",
    "delaySeconds": "deliveries are not delayed",
    "maxPriority": "there are no priority queues (RabbitMQ only in the reference)",
}
DURABLE_SUBSCRIBER = "durable:subscriber"
_DURABLE_PREFIX = "__durable::"


class QueueSettings:
    """How one queue delivers: attempts, parallelism, order, retry delay."""

    __slots__ = ("max_attempts", "concurrency", "fifo", "group_field", "backoff_ms",
                 "poll_interval_ms", "fixed_backoff")

    def __init__(self, max_attempts=3, concurrency=10, fifo=False, group_field=None,
                 backoff_ms=1000, poll_interval_ms=100, fixed_backoff=False):
        self.fixed_backoff = fixed_backoff  # backoffType "fixed": no doubling
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self.fifo = fifo
        self.group_field = group_field
        self.backoff_ms = backoff_ms
        self.poll_interval_ms = poll_interval_ms

    def info(self):
        return {
            "max_retries": self.max_attempts,
            "concurrency": self.concurrency,
            "type": "fifo" if self.fifo else "standard",
            "message_group_field": self.group_field,
            "backoff_ms": self.backoff_ms,
            "poll_interval_ms": self.poll_interval_ms,
        }


class Job:
    """One message: what to deliver, where, and how often it was tried."""

    __slots__ = ("id", "queue", "function_id", "data", "attempts", "created_at", "group",
                 "traceparent", "baggage")

    def __init__(self, job_id, queue, function_id, data, attempts=0, created_at=0,
                 group=None, traceparent=None, baggage=None):
        self.id = job_id
        self.queue = queue
        self.function_id = function_id
        self.data = data
        self.attempts = attempts
        self.created_at = created_at
        self.group = group
        self.traceparent = traceparent
        self.baggage = baggage

    def record(self):
        """@return: the job as a JSON object (in the journal)."""
        return {
            "id": self.id, "queue": self.queue, "function_id": self.function_id,
            "data": self.data, "attempts": self.attempts, "created_at": self.created_at,
            "group": self.group, "traceparent": self.traceparent, "baggage": self.baggage,
        }

    @classmethod
    def from_record(cls, r):
        return cls(r["id"], r["queue"], r.get("function_id"), r.get("data"),
                   r.get("attempts", 0), r.get("created_at", 0), r.get("group"),
                   r.get("traceparent"), r.get("baggage"))


class _Subscription:
    """
    A ``queue`` or ``durable:subscriber`` trigger: one consumer of a topic.

    @ivar settings: the L{QueueSettings} its ``queue_config`` gives for retries (they
        apply to the attempts it makes), or None for the queue's.
    """

    __slots__ = ("trigger", "concurrency", "fifo", "inflight", "settings")

    def __init__(self, trigger, concurrency, fifo, settings=None):
        self.trigger = trigger
        self.concurrency = concurrency
        self.fifo = fifo
        self.inflight = 0
        self.settings = settings


class _Queue:
    """
    One queue's live state.

    @ivar waiting: jobs ready to go, in delivery order.
    @ivar inflight: job id -> (job, subscription or None) being delivered now.
    @ivar delayed: job id -> (job, IDelayedCall) waiting out a retry backoff.
    @ivar busy_groups: FIFO groups with a job in flight or in backoff.
    @ivar dlq: job id -> (job, error, failed_at ms), oldest first.
    """

    def __init__(self, key, name, settings, topic):
        self.key = key
        self.name = name
        self.settings = settings
        self.topic = topic
        self.waiting = deque()
        self.inflight = {}
        self.delayed = {}
        self.busy_groups = set()
        self.dlq = {}
        self.subscriptions = {}
        self.poll = None
        self._rr = 0

    @property
    def fifo(self):
        if self.topic:
            return any(s.fifo for s in self.subscriptions.values())
        return self.settings.fifo

    @property
    def concurrency(self):
        if self.topic:
            return sum(s.concurrency for s in self.subscriptions.values())
        return self.settings.concurrency

    def idle(self):
        return not (self.waiting or self.inflight or self.delayed or self.dlq
                    or self.subscriptions)

    def next_subscription(self, functions):
        """@return: a subscription with a free slot whose function exists, or None."""
        subs = list(self.subscriptions.values())
        for i in range(len(subs)):
            sub = subs[(self._rr + i) % len(subs)]
            if sub.inflight < sub.concurrency and sub.trigger.function_id in functions:
                self._rr = (self._rr + i + 1) % len(subs)
                return sub
        return None


def _group_key(value):
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _error_text(failure):
    if failure.check(InvocationError):
        return "{}: {}".format(failure.value.code, failure.value.message)
    return failure.getErrorMessage()


@implementer(IModule, IEnqueuer, ITriggerProvider)
class QueueModule(Service):
    """
    Named queues (the ``enqueue`` action), topic queues (``enqueue`` + ``queue``
    triggers), retries, the DLQ and its functions.

    @ivar store: the L{IQueueStore}.
    @ivar queues: internal queue key -> L{_Queue} (named queues are keyed
        ``__fn_queue::<name>``, topics by their name).
    """

    iii_class = None
    config_schema = CONFIG_SCHEMA
    _log = Logger()

    def __init__(self, engine, config, reactor, store=None):
        """
        Validate C{config}, register the functions and the ``queue`` trigger type, and
        become the engine's enqueuer.

        @param store: an L{IQueueStore} to use instead of the one the config names
            (tests).
        @raise ConfigError: naming the key that is wrong.
        """
        self.engine = engine
        self.clock = reactor
        self.running = False
        _warn_unknown(config, _MODULE_KEYS, "")
        adapter_config, self.defaults = _adapter_settings(config)
        self.named = _named_queues(config)
        # A shared broker (Redis) holds the messages instead of this process's
        # memory and journal; the delivery logic below stays the same.
        self.broker = _build_broker(config, adapter_config, self.defaults, reactor)
        if self.broker is not None and store is None:
            store = MemoryQueueStore()
        self.store = store if store is not None else _build_store(adapter_config, reactor)
        self.queues = {}
        self._storing = {}
        for name, settings in self.named.items():
            key = FN_QUEUE_PREFIX + name
            self.queues[key] = _Queue(key, name, settings, topic=False)
        engine.enqueuer = self
        engine.register_trigger_type(
            "queue", self, "Consume the messages `enqueue` puts on a topic")
        engine.register_trigger_type(
            DURABLE_SUBSCRIBER, self, "Receive a copy of every message "
            "`iii::durable::publish` puts on a topic (replicas of one function compete)")
        functions = [
            ("enqueue", self._fn_enqueue, "Put a message {topic, data} on a topic queue"),
            ("iii::durable::publish", self._fn_durable_publish,
             "Put a copy of {data} in the queue of every function subscribed to {topic} "
             "(durable:subscriber)"),
            ("engine::queue::enqueue", self._fn_engine_enqueue,
             "Put {data} for {function_id} on the named queue {queue} "
             "(messageReceiptId optional); returns {messageReceiptId}"),
            ("iii::queue::redrive", self._fn_redrive,
             "Move every dead-lettered message of {queue} back to its queue"),
            ("iii::queue::redrive_message", self._fn_redrive_message,
             "Move one dead-lettered message {queue, message_id} back to its queue"),
            ("iii::queue::discard_message", self._fn_discard_message,
             "Drop one dead-lettered message {queue, message_id}"),
            ("iii::queue::discard", self._fn_discard,
             "Drop every dead-lettered message of {queue}"),
            ("engine::queue::list_topics", self._fn_list_topics,
             "List the named queues and topics"),
            ("engine::queue::topic_stats", self._fn_topic_stats,
             "Depth, consumers and DLQ depth of {topic}"),
            ("engine::queue::dlq_topics", self._fn_dlq_topics,
             "List the queues that have dead-lettered messages"),
            ("engine::queue::dlq_messages", self._fn_dlq_messages,
             "List the dead-lettered messages of {topic, offset, limit}, newest first"),
        ]
        for function_id, fn, description in functions:
            engine.register_function(function_id, fn, description)

    # -- service ---------------------------------------------------------------------

    def startService(self):
        """Replay the store, then start delivering."""
        Service.startService(self)
        records = self.store.open(self._snapshot)
        self._replay(records)
        self.running = True
        if self.broker is not None:
            self.broker.start(self._arrived)
            for queue in list(self.queues.values()):
                self.broker.consume(queue.key, queue.concurrency, queue.fifo)
        for queue in list(self.queues.values()):
            self._pump(queue)

    def stopService(self):
        """
        Stop delivering and cancel every timer; messages in backoff stay queued (and
        stored). @return: Deferred firing once the store has written what is pending.
        """
        Service.stopService(self)
        self.running = False
        for queue in self.queues.values():
            if queue.poll is not None:
                queue.poll.cancel()
                queue.poll = None
            # Messages in backoff go back to the head of their queue (they are in the
            # journal too): nothing accepted is dropped from memory on stop.
            for job, call in reversed(list(queue.delayed.values())):
                call.cancel()
                queue.waiting.appendleft(job)
                queue.busy_groups.discard(job.group)
            queue.delayed.clear()
        if self.broker is not None:
            # Messages handed to this engine and not settled come back to the others
            # when their leases lapse.
            self.broker.stop()
        return self.store.close()

    # -- IEnqueuer -------------------------------------------------------------------

    def enqueue(self, queue, function_id, data, traceparent=None, baggage=None):
        """
        Accept one message for C{function_id} on the named queue C{queue}.

        @return: Deferred firing with the receipt id (also the message id the DLQ
            functions take) once the message is stored, or failing with
            L{InvocationError} ``enqueue_error``: unknown queue, a FIFO message
            without its group field, or a store that cannot write.
        """
        settings = self.named.get(queue)
        if settings is None:
            return fail(InvocationError(P.ENQUEUE_ERROR, "Queue '{}' not found".format(queue)))
        group = None
        if settings.fifo:
            field = settings.group_field
            if not isinstance(data, dict) or field not in data:
                return fail(InvocationError(
                    P.ENQUEUE_ERROR,
                    "FIFO queue '{}' requires field '{}' in data, but it was not "
                    "found".format(queue, field)))
            if data[field] is None:
                return fail(InvocationError(
                    P.ENQUEUE_ERROR,
                    "FIFO queue '{}': field '{}' must not be null".format(queue, field)))
            group = _group_key(data[field])
        job = self._new_job(FN_QUEUE_PREFIX + queue, function_id, data, group,
                            traceparent, baggage)
        return self._accept(job).addCallback(lambda _: job.id)

    def depths(self):
        """
        The hook the observability module reads for its queue depth metrics.

        @return: ``{queue or topic name: messages waiting}``, counting messages ready
            to go and messages waiting out a retry backoff (not those in flight or in
            the dead-letter queue), for every queue the module knows.
        """
        return {queue.name: len(queue.waiting) + len(queue.delayed)
                for queue in self.queues.values()}

    def dlq_depths(self):
        """
        The observability module's hook for dead-letter metrics.

        @return: ``{queue or topic name: messages in its dead-letter queue}``.
        """
        return {queue.name: len(queue.dlq) for queue in self.queues.values()}

    def _new_job(self, key, function_id, data, group=None, traceparent=None, baggage=None):
        return Job(str(uuid4()), key, function_id, data, 0, self._now_ms(), group,
                   traceparent, baggage)

    def _accept(self, job):
        if self.broker is not None:
            return self.broker.publish(job).addErrback(self._not_published, job)
        # Until its record is durable the job is only here (a compaction's snapshot
        # must still include it).
        self._storing[job.id] = job
        d = self.store.append([{"op": "enq", "job": job.record()}])

        def stored(_):
            del self._storing[job.id]
            queue = self._queue(job.queue)
            queue.waiting.append(job)
            self._pump(queue)

        def not_stored(failure):
            del self._storing[job.id]
            self._log.error("queue {queue}: could not store a message: {error}",
                            queue=job.queue, error=failure.getErrorMessage())
            raise InvocationError(P.ENQUEUE_ERROR, "Could not store the message: {}".format(
                failure.getErrorMessage()))
        return d.addCallbacks(stored, not_stored)

    def _not_published(self, failure, job):
        self._log.error("queue {queue}: could not publish a message: {error}",
                        queue=job.queue, error=failure.getErrorMessage())
        raise InvocationError(P.ENQUEUE_ERROR, "Could not store the message: {}".format(
            failure.getErrorMessage()))

    def _arrived(self, job):
        """A shared broker handed this engine a message: deliver it as if enqueued here."""
        queue = self._queue(job.queue)
        queue.waiting.append(job)
        self._pump(queue)

    def _queue(self, key):
        queue = self.queues.get(key)
        if queue is None:
            if key.startswith(FN_QUEUE_PREFIX):
                # A named queue no longer in the config, found in the journal: deliver
                # its messages with the defaults rather than lose them.
                name = key[len(FN_QUEUE_PREFIX):]
                self._log.warn("queue {name} is not in queue_configs any more; its stored "
                               "messages are delivered with default settings", name=name)
                queue = _Queue(key, name, QueueSettings(), topic=False)
            elif key.startswith(_DURABLE_PREFIX):
                # One queue per (topic, function), named as the reference's builtin
                # adapter names it: "{topic}::{function_id}".
                queue = _Queue(key, key[len(_DURABLE_PREFIX):], self.defaults, topic=True)
            else:
                queue = _Queue(key, key, self.defaults, topic=True)
            self.queues[key] = queue
        return queue

    # -- delivery --------------------------------------------------------------------

    def _pump(self, queue):
        """Start as many deliveries as the queue's limits allow."""
        if not self.running:
            return
        functions = self.engine.functions
        waiting = queue.waiting
        fifo = queue.fifo
        skip = set()
        parked = False
        i = 0
        while i < len(waiting) and len(queue.inflight) < queue.concurrency:
            job = waiting[i]
            if fifo and (job.group in queue.busy_groups or job.group in skip):
                i += 1
                continue
            if queue.topic:
                subscription = queue.next_subscription(functions)
                if subscription is None:
                    # Full, or waiting for a subscriber's function to be registered.
                    parked = any(s.trigger.function_id not in functions
                                 for s in queue.subscriptions.values())
                    break
                function_id = subscription.trigger.function_id
            else:
                subscription = None
                function_id = job.function_id
                if function_id not in functions and self.broker is not None:
                    # Not here: give it back for another engine (or for later), without
                    # spending an attempt.
                    del waiting[i]
                    self._settle(self.broker.requeue(job, queue.settings.poll_interval_ms))
                    continue
                if function_id not in functions:
                    parked = True
                    if fifo:
                        skip.add(job.group)
                    i += 1
                    continue
            del waiting[i]
            self._deliver(queue, job, function_id, subscription)
        if parked and queue.poll is None:
            # Waiting for a function to be registered: look again shortly.
            queue.poll = self.clock.callLater(
                queue.settings.poll_interval_ms / 1000.0, self._poll, queue)
        elif not waiting and queue.poll is not None:
            queue.poll.cancel()
            queue.poll = None

    def _poll(self, queue):
        queue.poll = None
        try:
            self._pump(queue)
        except Exception:
            self._log.failure("queue {queue}: delivery loop failed", queue=queue.name)

    def _deliver(self, queue, job, function_id, subscription):
        queue.inflight[job.id] = (job, subscription)
        if queue.fifo:
            queue.busy_groups.add(job.group)
        if subscription is not None:
            subscription.inflight += 1
            d = self.engine.check_condition(subscription.trigger, job.data)
            d.addCallback(self._call_if, function_id, job)
        else:
            d = self.engine.call(function_id, job.data, traceparent=job.traceparent,
                                 baggage=job.baggage)
        d.addCallbacks(self._delivered, self._failed, callbackArgs=(queue, job),
                       errbackArgs=(queue, job))
        d.addErrback(lambda f: self._log.failure(
            "queue {queue}: bookkeeping failed", f, queue=queue.name))

    def _call_if(self, proceed, function_id, job):
        if proceed is False:
            return None  # condition false: the message is acknowledged, unprocessed
        return self.engine.call(function_id, job.data, traceparent=job.traceparent,
                                baggage=job.baggage)

    def _finish(self, queue, job):
        _, subscription = queue.inflight.pop(job.id, (None, None))
        if subscription is not None:
            subscription.inflight -= 1
        return subscription

    def _settle(self, d):
        d.addErrback(lambda f: self._log.warn(
            "queue: settling a message with the broker failed (it is delivered again "
            "when its lease lapses): {error}", error=f.getErrorMessage()))

    def _delivered(self, result, queue, job):
        self._finish(queue, job)
        queue.busy_groups.discard(job.group)
        if self.broker is not None:
            self._settle(self.broker.ack(job))
        else:
            self._record({"op": "ack", "id": job.id})
        self._pump(queue)
        self._maybe_forget(queue)

    def _failed(self, failure, queue, job):
        subscription = self._finish(queue, job)
        job.attempts += 1
        error = _error_text(failure)
        settings = queue.settings
        if subscription is not None and subscription.settings is not None:
            settings = subscription.settings
        if job.attempts >= settings.max_attempts:
            failed_at = self._now_ms()
            queue.busy_groups.discard(job.group)
            if self.broker is not None:
                self._settle(self.broker.dead(job, error, failed_at))
            else:
                queue.dlq[job.id] = (job, error, failed_at)
                self._record({"op": "dlq", "id": job.id, "error": error,
                              "failed_at": failed_at})
            self._log.warn(
                "queue {queue}: message {job_id} dead-lettered after {attempts} "
                "attempt(s): {error}", queue=queue.name, job_id=job.id,
                attempts=job.attempts, error=error)
        else:
            delay_ms = settings.backoff_ms
            if not settings.fixed_backoff:
                delay_ms *= 2 ** (job.attempts - 1)
            if self.broker is not None:
                # The broker holds it during the backoff (and the FIFO group with it).
                queue.busy_groups.discard(job.group)
                self._settle(self.broker.retry(job, delay_ms))
                self._pump(queue)
                return
            self._record({"op": "nack", "id": job.id, "attempts": job.attempts})
            self._log.info(
                "queue {queue}: message {job_id} failed (attempt {attempts}), retry in "
                "{delay_ms} ms: {error}", queue=queue.name, job_id=job.id,
                attempts=job.attempts, delay_ms=delay_ms, error=error)
            if self.running:
                call = self.clock.callLater(delay_ms / 1000.0, self._retry_due, queue, job)
                queue.delayed[job.id] = (job, call)
            else:
                queue.waiting.appendleft(job)
                queue.busy_groups.discard(job.group)
        self._pump(queue)

    def _retry_due(self, queue, job):
        queue.delayed.pop(job.id, None)
        queue.waiting.appendleft(job)  # retries go first, as in the reference
        queue.busy_groups.discard(job.group)
        try:
            self._pump(queue)
        except Exception:
            self._log.failure("queue {queue}: delivery loop failed", queue=queue.name)

    def _record(self, record):
        """Journal an event whose loss only means a redelivery (ack, nack, ...)."""
        if not self.running:
            # A call that ended after stopService: the store is closed, so the message
            # will be delivered again after the restart (at-least-once).
            self._log.info("queue: {op} of {job_id} after shutdown not recorded",
                           op=record["op"], job_id=record["id"])
            return
        self.store.append([record]).addErrback(
            lambda f: self._log.error("queue journal write failed: {error}",
                                      error=f.getErrorMessage()))

    def _maybe_forget(self, queue):
        if queue.topic and queue.idle():
            del self.queues[queue.key]

    def _now_ms(self):
        return int(self.clock.seconds() * 1000)

    # -- journal replay and snapshot ---------------------------------------------------

    def _replay(self, records):
        live = {}
        dead = {}
        for record in records:
            op = record.get("op")
            if op == "enq":
                job = Job.from_record(record["job"])
                live[job.id] = job
            elif op == "nack":
                job = live.get(record["id"])
                if job is not None:
                    job.attempts = record["attempts"]
            elif op in ("ack", "discard"):
                live.pop(record["id"], None)
                dead.pop(record["id"], None)
            elif op == "dlq":
                job = live.pop(record["id"], None)
                if job is not None:
                    job.attempts = max(job.attempts, 1)
                    dead[job.id] = (job, record.get("error"), record.get("failed_at"))
            elif op == "redrive":
                entry = dead.pop(record["id"], None)
                if entry is not None:
                    entry[0].attempts = 0
                    live[entry[0].id] = entry[0]
        for job in live.values():
            self._queue(job.queue).waiting.append(job)
        for job, error, failed_at in dead.values():
            self._queue(job.queue).dlq[job.id] = (job, error, failed_at)
        if live or dead:
            self._log.info("queue store: restored {live} message(s) and {dead} "
                           "dead-lettered", live=len(live), dead=len(dead))

    def _snapshot(self):
        """@return: records that rebuild the live state (journal compaction)."""
        records = []
        for queue in self.queues.values():
            jobs = [job for job, _ in queue.inflight.values()]
            jobs += [job for job, _ in queue.delayed.values()]
            jobs += list(queue.waiting)
            records += [{"op": "enq", "job": job.record()} for job in jobs]
            for job, error, failed_at in queue.dlq.values():
                records.append({"op": "enq", "job": job.record()})
                records.append({"op": "dlq", "id": job.id, "error": error,
                                "failed_at": failed_at})
        records += [{"op": "enq", "job": job.record()} for job in self._storing.values()]
        return records

    # -- ITriggerProvider: `queue` triggers ------------------------------------------

    def register_trigger(self, trigger):
        """
        Start consuming a topic for C{trigger.function_id}: a ``queue`` trigger
        competes with every other consumer of the topic; a ``durable:subscriber``
        consumes its function's own copy of each message (replicas of one function
        compete).

        The trigger's ``queue_config`` applies to the attempts it makes:
        ``concurrency``, ``type`` (standard or fifo), ``maxRetries`` (``queue``:
        attempts in all, as v0.10; ``durable:subscriber``: retries after the first
        attempt, as the reference since 0.11), ``backoffDelayMs`` (the first retry's
        delay, in ms) and ``backoffType`` (``exponential``, doubling, or ``fixed``).
        ``visibilityTimeout``, ``delaySeconds`` and ``maxPriority`` are refused:
        this queue does not implement them.

        @return: Deferred firing with None, or failing with L{TriggerError} for a
            config without a topic, a malformed ``queue_config`` or a setting this
            queue does not implement.
        """
        try:
            key, subscription = self._subscription(trigger)
        except TriggerError as e:
            return fail(e)
        queue = self._queue(key)
        queue.subscriptions[trigger.id] = subscription
        recorded = succeed(None)
        if self.broker is not None and trigger.trigger_type == DURABLE_SUBSCRIBER:
            # Every engine's durable publish must copy messages to this function: the
            # trigger is live once the broker has recorded it.
            recorded = self.broker.add_fanout(trigger.config["topic"], key).addErrback(
                lambda f: self._log.warn(
                    "queue: recording durable subscriber {key} failed: {error}",
                    key=key, error=f.getErrorMessage()))
        if self.broker is not None and self.running:
            self.broker.consume(queue.key, queue.concurrency, queue.fifo)
        self._pump(queue)
        return recorded

    def _subscription(self, trigger):
        """@return: (queue key, L{_Subscription}); @raise TriggerError: a bad config."""
        kind_name = trigger.trigger_type
        config = trigger.config if trigger.config is not None else {}
        if not isinstance(config, dict):
            raise TriggerError("{} trigger {}: config must be an object with a "
                               "'topic'".format(kind_name, trigger.id))
        topic = config.get("topic")
        if not isinstance(topic, str) or not topic:
            raise TriggerError(
                "{} trigger {}: config needs a non-empty string 'topic' (the topic "
                "the `{}` function writes to)".format(
                    kind_name, trigger.id,
                    "iii::durable::publish" if kind_name == DURABLE_SUBSCRIBER
                    else "enqueue"))
        if topic.startswith(FN_QUEUE_PREFIX) or topic.startswith(_DURABLE_PREFIX):
            raise TriggerError("{} trigger {}: topic names may not start with {} or "
                               "{}".format(kind_name, trigger.id, FN_QUEUE_PREFIX,
                                           _DURABLE_PREFIX))
        condition = config.get("condition_function_id")
        if condition is not None and not isinstance(condition, str):
            raise TriggerError("{} trigger {}: condition_function_id must be a "
                               "string".format(kind_name, trigger.id))
        sub_config = config.get("queue_config")
        if sub_config is None:
            sub_config = {}
        if not isinstance(sub_config, dict):
            raise TriggerError("{} trigger {}: queue_config must be an object".format(
                kind_name, trigger.id))
        where = "{} trigger {}: queue_config.".format(kind_name, trigger.id)
        for key, why in sorted(_UNSUPPORTED_SUBSCRIPTION_KEYS.items()):
            if sub_config.get(key) is not None:
                raise TriggerError("{}{} is not supported by this engine's queue: "
                                   "{}".format(where, key, why))
        kind = sub_config.get("type")
        if kind == "concurrent":  # the reference reads any non-fifo mode as standard
            kind = "standard"
        if kind not in (None, "standard", "fifo"):
            raise TriggerError("{}type must be 'standard' or 'fifo', not {!r}".format(
                where, kind))
        concurrency = _sub_int(sub_config, "concurrency", self.defaults.concurrency,
                               where, 1)
        fifo = kind == "fifo" or (kind is None and self.defaults.fifo)
        settings = None
        retries = _sub_int(sub_config, "maxRetries", None, where, 0)
        backoff = _sub_int(sub_config, "backoffDelayMs", None, where, 0)
        backoff_type = sub_config.get("backoffType")
        if backoff_type not in (None, "exponential", "fixed"):
            raise TriggerError("{}backoffType must be 'exponential' or 'fixed', not "
                               "{!r}".format(where, backoff_type))
        if retries is not None or backoff is not None or backoff_type is not None:
            base = self.defaults
            attempts = base.max_attempts
            if retries is not None:
                attempts = retries + 1 if kind_name == DURABLE_SUBSCRIBER else max(retries, 1)
            settings = QueueSettings(
                max_attempts=attempts, concurrency=concurrency, fifo=fifo,
                backoff_ms=base.backoff_ms if backoff is None else backoff,
                poll_interval_ms=base.poll_interval_ms,
                fixed_backoff=backoff_type == "fixed")
        for key in set(sub_config) - _SUBSCRIPTION_KEYS:
            self._log.warn("{kind} trigger {trigger_id}: unknown queue_config key {key} "
                           "ignored", kind=kind_name, trigger_id=trigger.id, key=key)
        subscription = _Subscription(trigger, 1 if fifo else concurrency, fifo, settings)
        if kind_name == DURABLE_SUBSCRIBER:
            return _durable_key(topic, trigger.function_id), subscription
        return topic, subscription

    def unregister_trigger(self, trigger):
        """Stop consuming for C{trigger}. @return: Deferred firing with None."""
        topic = trigger.config.get("topic") if isinstance(trigger.config, dict) else None
        key = topic
        if isinstance(topic, str) and trigger.trigger_type == DURABLE_SUBSCRIBER:
            key = _durable_key(topic, trigger.function_id)
        queue = self.queues.get(key) if isinstance(key, str) else None
        if queue is not None and queue.subscriptions.pop(trigger.id, None) is not None:
            if self.broker is not None:
                if queue.subscriptions:
                    self.broker.consume(queue.key, queue.concurrency, queue.fifo)
                else:
                    self.broker.stop_consuming(queue.key)
            if not queue.subscriptions and queue.poll is not None:
                queue.poll.cancel()
                queue.poll = None
            self._maybe_forget(queue)
        return succeed(None)

    # -- functions -------------------------------------------------------------------

    def _fn_enqueue(self, data):
        topic = _input(data, "enqueue").get("topic")
        if topic is None or topic == "":
            raise InvocationError("topic_not_set", "Topic is not set")
        if not isinstance(topic, str):
            raise _bad_input("enqueue", "topic must be a string")
        if topic.startswith(FN_QUEUE_PREFIX):
            raise _bad_input("enqueue", "topic names may not start with {}".format(
                FN_QUEUE_PREFIX))
        job = self._new_job(topic, None, data.get("data"))
        return self._accept(job).addCallback(lambda _: None)

    def _fn_durable_publish(self, data):
        """
        ``iii::durable::publish`` ``{topic, data}``: one message per function
        subscribed to the topic with ``durable:subscriber`` (reference 0.11: fan-out),
        each stored before the call returns; none when nobody subscribes.

        @return: Deferred firing with None.
        """
        fid = "iii::durable::publish"
        topic = _input(data, fid).get("topic")
        if topic is None or topic == "":
            raise InvocationError("topic_not_set", "Topic is not set")
        if not isinstance(topic, str):
            raise _bad_input(fid, "topic must be a string")
        if self.broker is not None:
            # The subscriptions of every engine are in the broker.
            job = self._new_job(_durable_key(topic, ""), None, data.get("data"))
            return self.broker.publish_fanout(topic, job).addCallbacks(
                lambda _: None, _as_error(P.ENQUEUE_ERROR))
        keys = sorted(set(
            _durable_key(topic, sub.trigger.function_id)
            for queue in self.queues.values()
            for sub in queue.subscriptions.values()
            if sub.trigger.trigger_type == DURABLE_SUBSCRIBER
            and sub.trigger.config.get("topic") == topic))
        stored = [self._accept(self._new_job(key, None, data.get("data"))) for key in keys]
        return gatherResults(stored, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure)

    def _fn_engine_enqueue(self, data):
        """
        ``engine::queue::enqueue`` ``{queue, function_id, data, messageReceiptId?,
        traceparent?, baggage?}``: what the reference (0.21.5) calls for an
        ``enqueue`` action, here on the same named queues. The receipt id is always
        this engine's (a caller's ``messageReceiptId`` could name another message);
        the answer says which.

        @return: Deferred firing with ``{"messageReceiptId"}``.
        """
        fid = "engine::queue::enqueue"
        data = _input(data, fid)
        values = {}
        for key, required in (("queue", True), ("function_id", True),
                              ("messageReceiptId", False), ("traceparent", False),
                              ("baggage", False)):
            value = data.get(key)
            if value is None and not required:
                values[key] = None
            elif not isinstance(value, str) or not value:
                raise _bad_input(fid, "{} must be a non-empty string".format(key))
            else:
                values[key] = value
        d = self.enqueue(values["queue"], values["function_id"], data.get("data"),
                         values["traceparent"], values["baggage"])
        return d.addCallback(lambda receipt: {"messageReceiptId": receipt})

    def _resolve(self, data, function_id, key="queue", code="queue_not_set",
                 message="Queue is not set"):
        name = _input(data, function_id).get(key)
        if name is None or name == "":
            raise InvocationError(code, message)
        if not isinstance(name, str):
            raise _bad_input(function_id, "{} must be a string".format(key))
        return name, (FN_QUEUE_PREFIX + name if name in self.named else name)

    def _message_id(self, data, function_id):
        message_id = data.get("message_id")
        if message_id is None or message_id == "":
            raise InvocationError("message_id_not_set", "Message id is not set")
        if not isinstance(message_id, str):
            raise _bad_input(function_id, "message_id must be a string")
        return message_id

    def _redrive(self, queue, job_ids):
        records = []
        for job_id in job_ids:
            job, _, _ = queue.dlq.pop(job_id)
            job.attempts = 0
            queue.waiting.append(job)
            records.append({"op": "redrive", "id": job_id})
        if records:
            d = self.store.append(records)
            self._pump(queue)
            return d
        return succeed(None)

    def _fn_redrive(self, data):
        name, key = self._resolve(data, "iii::queue::redrive")
        if self.broker is not None:
            return self.broker.redrive(key, None).addCallbacks(
                lambda ids: {"queue": name, "redriven": len(ids)},
                _as_error("redrive_failed"))
        queue = self.queues.get(key)
        ids = list(queue.dlq) if queue is not None else []
        return self._redrive(queue, ids).addCallbacks(
            lambda _: {"queue": name, "redriven": len(ids)},
            _as_error("redrive_failed"))

    def _fn_redrive_message(self, data):
        name, key = self._resolve(data, "iii::queue::redrive_message")
        message_id = self._message_id(data, "iii::queue::redrive_message")
        if self.broker is not None:
            return self.broker.redrive(key, [message_id]).addCallbacks(
                lambda ids: {"queue": name, "message_id": message_id,
                             "redriven": len(ids)},
                _as_error("redrive_message_failed"))
        queue = self.queues.get(key)
        ids = [message_id] if queue is not None and message_id in queue.dlq else []
        return self._redrive(queue, ids).addCallbacks(
            lambda _: {"queue": name, "message_id": message_id, "redriven": len(ids)},
            _as_error("redrive_message_failed"))

    def _discard(self, queue, job_ids):
        for job_id in job_ids:
            del queue.dlq[job_id]
        if not job_ids:
            return succeed(None)
        d = self.store.append([{"op": "discard", "id": job_id} for job_id in job_ids])
        self._maybe_forget(queue)
        return d

    def _fn_discard_message(self, data):
        name, key = self._resolve(data, "iii::queue::discard_message")
        message_id = self._message_id(data, "iii::queue::discard_message")
        if self.broker is not None:
            return self.broker.discard(key, [message_id]).addCallbacks(
                lambda ids: {"queue": name, "message_id": message_id,
                             "redriven": len(ids), "discarded": len(ids)},
                _as_error("discard_message_failed"))
        queue = self.queues.get(key)
        ids = [message_id] if queue is not None and message_id in queue.dlq else []
        # "redriven" is the reference's key for this count; "discarded" says what it is.
        return self._discard(queue, ids).addCallbacks(
            lambda _: {"queue": name, "message_id": message_id, "redriven": len(ids),
                       "discarded": len(ids)},
            _as_error("discard_message_failed"))

    def _fn_discard(self, data):
        name, key = self._resolve(data, "iii::queue::discard")
        if self.broker is not None:
            return self.broker.discard(key, None).addCallbacks(
                lambda ids: {"queue": name, "discarded": len(ids)},
                _as_error("discard_failed"))
        queue = self.queues.get(key)
        ids = list(queue.dlq) if queue is not None else []
        return self._discard(queue, ids).addCallbacks(
            lambda _: {"queue": name, "discarded": len(ids)}, _as_error("discard_failed"))

    def _fn_list_topics(self, data):
        result = []
        for queue in self.queues.values():
            if queue.topic:
                result.append({"name": queue.name, "broker_type": (
                    "builtin" if self.broker is None else self.broker.broker_type),
                               "subscriber_count": len(queue.subscriptions)})
            else:
                result.append({"name": queue.name, "broker_type": "function_queue",
                               "subscriber_count": queue.settings.concurrency})
        return result

    def _fn_topic_stats(self, data):
        name, key = self._resolve(data, "engine::queue::topic_stats", "topic",
                                  "topic_required", "Topic is required")
        queue = self.queues.get(key)
        if self.broker is not None:
            def shared(stats):
                return {
                    "depth": stats["ready"] + stats["delayed"],
                    "consumer_count": 0 if queue is None else (
                        len(queue.subscriptions) if queue.topic
                        else queue.settings.concurrency),
                    "dlq_depth": stats["dlq"],
                    "in_flight": stats["in_flight"],
                    "config": None if queue is None or queue.topic
                    else queue.settings.info(),
                }
            return self.broker.stats(key).addCallbacks(shared, _as_error("stats_failed"))
        if queue is None:
            return {"depth": 0, "consumer_count": 0, "dlq_depth": 0, "in_flight": 0,
                    "config": None}
        return {
            "depth": len(queue.waiting) + len(queue.delayed),
            "consumer_count": (len(queue.subscriptions) if queue.topic
                               else queue.settings.concurrency),
            "dlq_depth": len(queue.dlq),
            "in_flight": len(queue.inflight),
            "config": None if queue.topic else queue.settings.info(),
        }

    def _fn_dlq_topics(self, data):
        if self.broker is not None:
            def listed(counts):
                return [{"topic": key[len(FN_QUEUE_PREFIX):] if key.startswith(
                            FN_QUEUE_PREFIX) else key,
                         "broker_type": ("function_queue" if key.startswith(FN_QUEUE_PREFIX)
                                         else self.broker.broker_type),
                         "message_count": count} for key, count in counts.items()]
            return self.broker.dlq_queues().addCallbacks(listed, _as_error("dlq_failed"))
        return [{"topic": queue.name,
                 "broker_type": "builtin" if queue.topic else "function_queue",
                 "message_count": len(queue.dlq)}
                for queue in self.queues.values() if queue.dlq]

    def _fn_dlq_messages(self, data):
        name, key = self._resolve(data, "engine::queue::dlq_messages", "topic",
                                  "topic_required", "Topic is required")
        offset = data.get("offset", 0)
        limit = data.get("limit", 50)
        for field, value in (("offset", offset), ("limit", limit)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _bad_input("engine::queue::dlq_messages",
                                 "{} must be a non-negative integer".format(field))
        queue = self.queues.get(key)
        if self.broker is not None:
            d = self.broker.dlq_messages(key)
            return d.addCallbacks(lambda dead: _dlq_page(list(reversed(dead)), offset, limit),
                                  _as_error("dlq_failed"))
        entries = list(reversed(list(queue.dlq.values()))) if queue is not None else []
        return _dlq_page(entries, offset, limit)


def _dlq_page(entries, offset, limit):
    """@return: the dlq_messages answer for (job, error, failed_at) entries, newest first."""
    return [{
            "id": job.id,
            "payload": job.data,
            "error": error,
            "failed_at": failed_at // 1000 if isinstance(failed_at, int) else failed_at,
            "retries": job.attempts,
            "size_bytes": len(json.dumps(job.data).encode("utf-8")),
        } for job, error, failed_at in entries[offset:offset + limit]]


def _durable_key(topic, function_id):
    return "{}{}::{}".format(_DURABLE_PREFIX, topic, function_id)


def _sub_int(config, key, default, where, minimum):
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise TriggerError("{}{} must be an integer of at least {}, not {!r}".format(
            where, key, minimum, value))
    return value


def _input(data, function_id):
    if not isinstance(data, dict):
        raise _bad_input(function_id, "expected an object")
    return data


def _bad_input(function_id, why):
    return InvocationError(P.DESERIALIZATION_ERROR,
                           "Failed to deserialize input for {}: {}".format(function_id, why))


def _as_error(code):
    def convert(failure):
        if failure.check(InvocationError):
            return failure
        return Failure(InvocationError(code, failure.getErrorMessage()))
    return convert


# -- config ------------------------------------------------------------------------------

_log = Logger()


def _warn_unknown(mapping, known, prefix):
    # Queue config is lenient in the reference (unknown keys ignored): we say so.
    for key in set(mapping) - known:
        _log.warn("queue module: unknown config key {key} ignored", key=prefix + str(key))


def _positive(mapping, key, default, prefix, minimum=1):
    value = get_option(mapping, key, int, default, prefix)
    if value < minimum:
        raise ConfigError("must be at least {}, not {}".format(minimum, value), prefix + key)
    return value


def _adapter_settings(config):
    adapter = get_option(config, "adapter", dict, {})
    cls = get_option(adapter, "class", str, BUILTIN_ADAPTER, "adapter.")
    if cls not in ADAPTERS:
        raise ConfigError("Adapter factory '{}' not found. Available: [{}]".format(
            cls, ", ".join(ADAPTERS)), "adapter.class")
    adapter_config = get_option(adapter, "config", dict, {}, "adapter.")
    prefix = "adapter.config."
    _warn_unknown(adapter_config, _ADAPTER_KEYS, prefix)
    method = get_option(adapter_config, "store_method", str, "in_memory", prefix)
    if method not in ("in_memory", "file_based"):
        raise ConfigError("must be in_memory or file_based, not {!r}".format(method),
                          prefix + "store_method")
    get_option(adapter_config, "file_path", str, None, prefix)
    mode = get_option(adapter_config, "mode", str, None, prefix)
    if mode is None:  # queue_mode: the RabbitMQ adapter's name for it
        mode = get_option(adapter_config, "queue_mode", str, "standard", prefix)
    if mode not in ("standard", "fifo"):
        raise ConfigError("must be standard or fifo, not {!r}".format(mode),
                          prefix + ("mode" if "mode" in adapter_config else "queue_mode"))
    default_concurrency = _positive(adapter_config, "prefetch_count", 10, prefix)
    defaults = QueueSettings(
        max_attempts=_positive(adapter_config, "max_attempts", 3, prefix, 0),
        concurrency=_positive(adapter_config, "concurrency", default_concurrency, prefix),
        fifo=mode == "fifo",
        backoff_ms=_positive(adapter_config, "backoff_ms", 1000, prefix, 0),
        poll_interval_ms=_positive(adapter_config, "poll_interval_ms", 100, prefix),
    )
    return adapter_config, defaults


def _named_queues(config):
    queue_configs = get_option(config, "queue_configs", dict, {})
    named = {}
    for name, entry in queue_configs.items():
        prefix = "queue_configs.{}.".format(name)
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError("must be a mapping", prefix[:-1])
        _warn_unknown(entry, _QUEUE_KEYS, prefix)
        kind = get_option(entry, "type", str, "standard", prefix)
        if kind not in ("standard", "fifo"):
            raise ConfigError("must be standard or fifo, not {!r}".format(kind), prefix + "type")
        field = get_option(entry, "message_group_field", str, None, prefix)
        if kind == "fifo" and not field:
            raise ConfigError("a fifo queue needs message_group_field (the data field "
                              "that names a message's group)", prefix + "message_group_field")
        named[str(name)] = QueueSettings(
            max_attempts=_positive(entry, "max_retries", 3, prefix, 0),
            concurrency=_positive(entry, "concurrency", 10, prefix),
            fifo=kind == "fifo",
            group_field=field,
            backoff_ms=_positive(entry, "backoff_ms", 1000, prefix, 0),
            poll_interval_ms=_positive(entry, "poll_interval_ms", 100, prefix),
        )
    return named


def _build_broker(config, adapter_config, defaults, reactor):
    """
    @return: the L{IQueueBroker} the adapter class names, or None for the builtin.
    @raise ConfigError: naming the key, or the missing extra.
    """
    cls = (config.get("adapter") or {}).get("class", BUILTIN_ADAPTER)
    from ..extras import redis_client_for, require_extra

    prefix = "adapter.config."
    if cls == RABBITMQ_ADAPTER:
        url = get_option(adapter_config, "amqp_url", str, "amqp://localhost:5672", prefix)
        if not url.startswith(("amqp://", "amqps://")):
            raise ConfigError("must be an amqp:// or amqps:// URL, not {!r}".format(url),
                              prefix + "amqp_url")
        module = require_extra("iii_twisted.adapters.rabbitmq_queue", RABBITMQ_ADAPTER)
        try:
            return module.RabbitMQBroker(url, reactor, Job.from_record)
        except Exception as e:
            raise ConfigError("cannot use this URL: {}".format(e), prefix + "amqp_url")
    if cls != REDIS_ADAPTER:
        return None
    lease_ms = _positive(adapter_config, "lease_ms", 30000, prefix, 100)
    try:
        client = redis_client_for(adapter_config, REDIS_ADAPTER, reactor)
    except ConfigError as e:
        raise e if e.key == "adapter.class" else e.within("adapter.config")
    module = require_extra("iii_twisted.adapters.redis_queue", REDIS_ADAPTER)
    return module.RedisQueueBroker(client, reactor, Job.from_record, lease_ms=lease_ms,
                                   poll_interval_ms=defaults.poll_interval_ms)


def _build_store(adapter_config, reactor):
    if adapter_config.get("store_method", "in_memory") != "file_based":
        return MemoryQueueStore()
    directory = adapter_config.get("file_path") or "data/queue_store"
    # Checked now, so that a bad path is a config error naming the key rather than a
    # traceback at start-up.
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError("cannot create the queue store directory {}: {}".format(
            directory, e.strerror), "adapter.config.file_path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("the queue store directory {} is not writable".format(directory),
                          "adapter.config.file_path")
    return JournalQueueStore(directory, thread_runner(reactor))
