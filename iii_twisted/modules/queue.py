"""
The queue module, ``modules::queue::QueueModule`` (../shared/spec/modules.md §7).

Two kinds of queue share one delivery path:

- **named queues** from ``queue_configs``: a worker sends ``invokefunction`` with
  ``action: {"type": "enqueue", "queue": NAME}``; the engine answers at once with a
  ``messageReceiptId`` and the message is later delivered to that function
  (L{QueueModule.enqueue}, our L{IEnqueuer});
- **topic queues**: the ``enqueue`` function ``{topic, data}`` puts a message on a
  topic, and the functions bound to it with a ``queue`` trigger ``{topic}`` consume it
  (competing consumers: each message goes to one of them, as in the reference); a
  ``durable:subscriber`` function gets its own copy of each ``iii::durable::publish``.

The module decides how a message is delivered; an L{IQueueBroker} keeps it. The
broker the ``adapter`` names (L{iii_twisted.modules.queue_config.build_broker}:
builtin, in this process and optionally journaled to disk; Redis; RabbitMQ) stores
each message, hands this engine up to ``concurrency`` of a queue's messages at a time
(L{QueueModule._arrived}), waits out retry delays and holds the dead letters. The
module, the same for every broker, picks the function (the named queue's, or a free
subscription's), checks the trigger's condition, bounds the calls in flight, keeps
FIFO groups in order, and tells the broker what became of each message:

- a delivery is ``engine.call(function_id, data)``; success (any result, null
  included) acks the message;
- failure retries it after ``backoff_ms * 2^(attempt-1)`` ms until ``max_retries``
  attempts were made, then dead-letters it; ``iii::queue::redrive*`` puts it back and
  ``iii::queue::discard*`` drops it (L{iii_twisted.modules.queue_functions});
- a message whose function is not registered (yet) goes back to the broker for
  ``poll_interval_ms`` without spending an attempt (another engine may have it).

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
from collections import deque
from uuid import uuid4

from twisted.application.service import Service
from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import protocol as P
from ..interfaces import IEnqueuer, IModule, ITriggerProvider, TriggerError
from ..protocol import InvocationError
from .queue_config import (  # noqa: F401 (DURABLE_SUBSCRIBER, Job: this module's API)
    CONFIG_SCHEMA, DURABLE_SUBSCRIBER, FN_QUEUE_PREFIX, Job, QueueSettings,
    adapter_settings, build_broker, display_name, durable_key, named_queues,
    subscription_config,
)
from .queue_functions import QueueFunctions



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
    One queue's delivery state in this engine (its messages are the broker's).

    @ivar waiting: jobs the broker handed out that wait to be called, in order (for
        a free subscription, or a FIFO group's turn).
    @ivar inflight: job id -> (job, subscription or None) being delivered now.
    @ivar busy_groups: FIFO groups with a job in flight.
    """

    def __init__(self, key, name, settings, topic):
        self.key = key
        self.name = name
        self.settings = settings
        self.topic = topic
        self.waiting = deque()
        self.inflight = {}
        self.busy_groups = set()
        self.subscriptions = {}
        self.poll = None
        self.pumping = False
        self.pump_again = False
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
        return not (self.waiting or self.inflight or self.subscriptions)

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
class QueueModule(QueueFunctions, Service):
    """
    Named queues (the ``enqueue`` action), topic queues (``enqueue`` + ``queue``
    triggers), durable subscribers, retries, the DLQ and its functions.

    @ivar broker: the L{IQueueBroker} holding the messages.
    @ivar store: the builtin broker's L{IQueueStore} (the health check and start-up
        report read it), or None with a shared broker.
    @ivar queues: queue key -> L{_Queue} (named queues are keyed
        ``__fn_queue::<name>``, topics by their name).
    """

    iii_class = None
    config_schema = CONFIG_SCHEMA
    _log = Logger()

    def __init__(self, engine, config, reactor, store=None):
        """
        Validate C{config}, make the broker, register the functions and the ``queue``
        and ``durable:subscriber`` trigger types, and become the engine's enqueuer.

        @param store: an L{IQueueStore} for the builtin broker instead of the one the
            config names (tests).
        @raise ConfigError: naming the key that is wrong.
        """
        self.engine = engine
        self.clock = reactor
        self.running = False
        adapter_config, self.defaults = adapter_settings(config)
        self.named = named_queues(config)
        self.broker = build_broker(config, adapter_config, self.defaults, reactor, store)
        self.store = getattr(self.broker, "store", None)
        self.queues = {}
        for name, settings in self.named.items():
            key = FN_QUEUE_PREFIX + name
            self.queues[key] = _Queue(key, name, settings, topic=False)
        engine.enqueuer = self
        engine.register_trigger_type(
            "queue", self, "Consume the messages `enqueue` puts on a topic")
        engine.register_trigger_type(
            DURABLE_SUBSCRIBER, self, "Receive a copy of every message "
            "`iii::durable::publish` puts on a topic (replicas of one function compete)")
        self._register_functions()

    # -- service ---------------------------------------------------------------------

    def startService(self):
        """
        Start the broker (the builtin one replays its journal), then consume every
        queue that has a consumer here.

        @raise Exception: what the broker failed to start with at once (a journal
            that cannot be read), so that the engine does not start without it.
        """
        Service.startService(self)
        started = self.broker.start(self._arrived)
        if started.called:
            outcome = []
            started.addBoth(outcome.append)
            if isinstance(outcome[0], Failure):
                Service.stopService(self)
                outcome[0].raiseException()
        else:
            started.addErrback(lambda f: self._log.failure(
                "queue: the broker failed to start", f))
        for key in self.broker.local_queues():
            self._queue(key)  # replayed: listed, counted, consumed when subscribed
        for queue in list(self.queues.values()):
            if not queue.topic or queue.subscriptions:
                self.broker.consume(queue.key, queue.concurrency, queue.fifo)

    def stopService(self):
        """
        Stop delivering and cancel every timer; messages not delivered yet stay with
        the broker. @return: Deferred firing once the broker has stopped (the
        builtin one: its store has written what is pending).
        """
        Service.stopService(self)
        for queue in self.queues.values():
            if queue.poll is not None:
                queue.poll.cancel()
                queue.poll = None
        # Messages handed to this engine and not settled come back (a shared broker:
        # to the other engines when their leases lapse; the builtin one: at restart).
        return self.broker.stop()

    # -- IEnqueuer -------------------------------------------------------------------

    def enqueue(self, queue, function_id, data, traceparent=None, baggage=None):
        """
        Accept one message for C{function_id} on the named queue C{queue}.

        @return: Deferred firing with the receipt id (also the message id the DLQ
            functions take) once the message is stored, or failing with
            L{InvocationError} ``enqueue_error``: unknown queue, a FIFO message
            without its group field, or a broker that cannot store it.
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
        return self.broker.publish(job).addCallbacks(
            lambda _: job.id, self._publish_failed, errbackArgs=(job,))

    def depths(self):
        """
        The hook the observability module reads for its queue depth metrics.

        @return: ``{queue or topic name: messages waiting}``, counting messages ready
            to go and messages waiting out a retry backoff (not those in flight or in
            the dead-letter queue), for every queue the module knows. A shared broker
            holds its messages elsewhere: only those handed to this engine and not
            called yet are counted.
        """
        counts = self.broker.local_counts
        result = {}
        for queue in self.queues.values():
            held = counts(queue.key)
            result[queue.name] = len(queue.waiting) + held["ready"] + held["delayed"]
        return result

    def dlq_depths(self):
        """
        The observability module's hook for dead-letter metrics.

        @return: ``{queue or topic name: messages in its dead-letter queue}`` (this
            process's: zero with a shared broker).
        """
        counts = self.broker.local_counts
        return {queue.name: counts(queue.key)["dlq"] for queue in self.queues.values()}

    def _new_job(self, key, function_id, data, group=None, traceparent=None, baggage=None):
        return Job(str(uuid4()), key, function_id, data, 0, self._now_ms(), group,
                   traceparent, baggage)

    def _accept(self, job):
        """@return: Deferred firing with None once the broker holds C{job}."""
        return self.broker.publish(job).addCallbacks(
            self._published, self._publish_failed, callbackArgs=(job,),
            errbackArgs=(job,))

    def _published(self, _, job):
        self._queue(job.queue)  # a topic nobody consumes yet is listed from now on

    def _publish_failed(self, failure, job):
        self._log.error("queue {queue}: could not store a message: {error}",
                        queue=job.queue, error=failure.getErrorMessage())
        raise InvocationError(P.ENQUEUE_ERROR, "Could not store the message: {}".format(
            failure.getErrorMessage()))

    def _arrived(self, job):
        """The broker handed this engine a message: deliver it when its turn comes."""
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
            else:
                # Durable subscribers' queues are named as the reference's builtin
                # adapter names them: "{topic}::{function_id}".
                queue = _Queue(key, display_name(key), self.defaults, topic=True)
            self.queues[key] = queue
        return queue

    # -- delivery --------------------------------------------------------------------

    def _pump(self, queue):
        """
        Start as many deliveries as the queue's limits allow. Re-entrant calls (a
        delivery that ends at once, a broker that hands out the next message at
        once) make the running pump look again rather than nest.
        """
        if not self.running:
            return
        if queue.pumping:
            queue.pump_again = True
            return
        queue.pumping = True
        try:
            self._pump_once(queue)
            while queue.pump_again and queue.waiting:
                queue.pump_again = False
                self._pump_once(queue)
            queue.pump_again = False
        finally:
            queue.pumping = False

    def _pump_once(self, queue):
        functions = self.engine.functions
        waiting = queue.waiting
        fifo = queue.fifo
        parked = False
        i = 0
        while i < len(waiting) and len(queue.inflight) < queue.concurrency:
            job = waiting[i]
            if fifo and job.group in queue.busy_groups:
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
                if function_id not in functions:
                    # Not here (yet): back to the broker, for another engine or for
                    # later, without spending an attempt.
                    del waiting[i]
                    self._settle(self.broker.requeue(job, queue.settings.poll_interval_ms))
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
        queue.busy_groups.discard(job.group)
        if subscription is not None:
            subscription.inflight -= 1
        return subscription

    def _settle(self, d):
        d.addErrback(self._settle_failed)

    def _settle_failed(self, failure):
        self._log.warn("queue: recording what became of a message failed (it is "
                       "delivered again later): {error}", error=failure.getErrorMessage())

    def _delivered(self, result, queue, job):
        self._finish(queue, job)
        self._settle(self.broker.ack(job))
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
            self._log.warn(
                "queue {queue}: message {job_id} dead-lettered after {attempts} "
                "attempt(s): {error}", queue=queue.name, job_id=job.id,
                attempts=job.attempts, error=error)
            self._settle(self.broker.dead(job, error, self._now_ms()))
        else:
            delay_ms = settings.backoff_ms
            if not settings.fixed_backoff:
                delay_ms *= 2 ** (job.attempts - 1)
            self._log.info(
                "queue {queue}: message {job_id} failed (attempt {attempts}), retry in "
                "{delay_ms} ms: {error}", queue=queue.name, job_id=job.id,
                attempts=job.attempts, delay_ms=delay_ms, error=error)
            # The broker holds it during the backoff (and its FIFO group with it).
            self._settle(self.broker.retry(job, delay_ms))
        self._pump(queue)

    def _maybe_forget(self, queue):
        if queue.topic and queue.idle() and self.queues.get(queue.key) is queue \
                and not any(self.broker.local_counts(queue.key).values()):
            del self.queues[queue.key]

    def _now_ms(self):
        return int(self.clock.seconds() * 1000)

    # -- ITriggerProvider: `queue` and `durable:subscriber` triggers ------------------

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
        if trigger.trigger_type == DURABLE_SUBSCRIBER:
            # Durable publishes (on every engine, with a shared broker) copy messages
            # to this function: the trigger is live once the broker has recorded it.
            recorded = self.broker.add_fanout(trigger.config["topic"], key).addErrback(
                lambda f: self._log.warn(
                    "queue: recording durable subscriber {key} failed: {error}",
                    key=key, error=f.getErrorMessage()))
        if self.running:
            self.broker.consume(queue.key, queue.concurrency, queue.fifo)
        self._pump(queue)
        return recorded

    def _subscription(self, trigger):
        """@return: (queue key, L{_Subscription}); @raise TriggerError: a bad config."""
        key, concurrency, fifo, settings = subscription_config(trigger, self.defaults)
        return key, _Subscription(trigger, concurrency, fifo, settings)

    def unregister_trigger(self, trigger):
        """Stop consuming for C{trigger}. @return: Deferred firing with None."""
        topic = trigger.config.get("topic") if isinstance(trigger.config, dict) else None
        key = topic
        if isinstance(topic, str) and trigger.trigger_type == DURABLE_SUBSCRIBER:
            key = durable_key(topic, trigger.function_id)
        queue = self.queues.get(key) if isinstance(key, str) else None
        if queue is not None and queue.subscriptions.pop(trigger.id, None) is not None:
            if queue.subscriptions:
                if self.running:
                    self.broker.consume(queue.key, queue.concurrency, queue.fifo)
            else:
                self.broker.stop_consuming(queue.key)
                if trigger.trigger_type == DURABLE_SUBSCRIBER:
                    self.broker.remove_fanout(topic, key).addErrback(
                        lambda f: self._log.warn(
                            "queue: forgetting durable subscriber {key} failed: {error}",
                            key=key, error=f.getErrorMessage()))
                if queue.poll is not None:
                    queue.poll.cancel()
                    queue.poll = None
            self._maybe_forget(queue)
        return succeed(None)

