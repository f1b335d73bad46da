"""
Every contract between the engine core, its transports and its modules.

Methods are declared without ``self`` (zope.interface convention; ``verifyObject``
rejects correct implementations otherwise). Methods that may touch I/O return
Deferreds, even when an implementation can answer at once.
"""

from twisted.internet.defer import Deferred  # noqa: F401  (named in the annotations)
from zope.interface import Attribute, Interface


class IWorkerConnection(Interface):
    """
    One worker's connection, as the engine core sees it.

    Implemented by the Autobahn protocol (L{iii_twisted.worker.WorkerProtocol}) and by
    L{iii_twisted.testing.FakeWorkerConnection}; the core never touches a socket.
    """

    peer_address = Attribute("The peer's IP address as a string, or None.")
    congested = Attribute(
        "True while the peer does not read what it was sent (over "
        "limits.send_buffer_soft): the engine forwards it no calls then.")

    def send(message: dict) -> bool:
        """
        Send one message (a JSON object) to the worker.

        Never raises: a message to a connection that is closing is dropped, because the
        engine's disconnect cleanup is already on its way.

        @return: False if the message holds a value JSON cannot carry (it is dropped and
            logged), or a falsy L{iii_twisted.peer_limits.NotSent} saying why it was not
            sent (a frame larger than the peer accepts), so that the engine can answer
            the call with an error instead; True otherwise.
        """

    def disconnect(code: int, reason: str) -> None:
        """Close the connection; the engine's detach runs when it has closed."""


class IFunctionHost(Interface):
    """Something that can run a registered function: a worker, a Python callable, a URL."""

    def invoke(function_id: str, invocation_id: str, data, traceparent, baggage,
               metadata=None):
        """
        Run the function once.

        @param metadata: the call's invocation metadata (any JSON value, reference
            0.21.3: sent beside ``data``, never merged into it), or None. Hosts that
            cannot pass it on ignore it.

        @return: Deferred firing with the result (any JSON value), or failing with
            L{iii_twisted.protocol.InvocationError}.
        """


class ITriggerProvider(Interface):
    """
    Provides one or more trigger types: a module in-process, or a worker that sent
    ``registertriggertype`` (wrapped by the engine).
    """

    def register_trigger(trigger) -> "Deferred":
        """
        Start firing C{trigger} (an L{iii_twisted.engine.Trigger}).

        @return: Deferred firing with None once the trigger is live, or failing with
            L{TriggerError} when its config is refused.
        """

    def unregister_trigger(trigger) -> "Deferred":
        """
        Stop firing C{trigger}.

        @return: Deferred firing with None.
        """


class TriggerError(Exception):
    """
    A provider refused a trigger (for example a malformed config).

    @ivar code: an error code for the ErrorBody sent back to the registering worker.
    """

    def __init__(self, message, code="trigger_registration_failed"):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


class IModule(Interface):
    """
    An engine module loaded from ``iii-config.yaml`` (``modules: [{class, config}]``).

    A module is also an C{IService}: L{iii_twisted.service.EngineService} adds it as a
    child, so it starts after the engine exists and stops before it goes. Modules are
    built by a factory registered in L{iii_twisted.modules.MODULE_CLASSES}:
    C{factory(engine, config, reactor)}, which validates C{config} and raises
    L{iii_twisted.config.ConfigError} for a bad value, and registers the module's
    functions and trigger types on C{engine} synchronously.
    """

    iii_class = Attribute("The iii class name the module was loaded under.")


class IEnqueuer(Interface):
    """
    Where ``invokefunction`` with ``action: {"type": "enqueue", "queue": Q}`` goes.

    Provided by the queue module; the engine answers ``enqueue_error`` while none is
    loaded.
    """

    def enqueue(queue: str, function_id: str, data, traceparent, baggage) -> "Deferred":
        """
        Accept one message for C{function_id} on the named queue.

        @return: Deferred firing with the message receipt id (a string) once the
            message is accepted (durably, when the queue is persistent), or failing with
            L{iii_twisted.protocol.InvocationError} (``enqueue_error``) for an unknown
            queue or an invalid message.
        """


class ITelemetrySink(Interface):
    """Receives the binary telemetry frames workers send (``OTLP``/``LOGS``/``MTRC``)."""

    def ingest(kind: str, payload: bytes, worker_id) -> None:
        """
        Take one frame's body (the OTLP JSON after the 4-byte prefix).

        @param kind: ``"OTLP"`` (traces), ``"LOGS"`` or ``"MTRC"`` (metrics).
        @param worker_id: the sending worker's id, or None for the ``/otel`` socket.
        Must not raise: a bad frame is counted and dropped by the sink.
        """


class IWorkerMetricsSource(Interface):
    """
    Knows the resource gauges workers report about themselves (memory, CPU, event loop
    lag, uptime), for the ``latest_metrics`` of ``engine::workers::list``.
    """

    def latest(worker) -> "dict | None":
        """
        @param worker: a connected L{iii_twisted.engine.WorkerRecord}.
        @return: a WorkerMetrics dict (engine-core.md §3: the gauges known, plus
            ``timestamp_ms`` and ``runtime``) built from recent reports, or None when
            there are none.
        """


class ICallObserver(Interface):
    """
    Sees every call that goes through ``Engine.call`` (observability hooks here).

    Only called when at least one observer is registered, so the hot path pays nothing
    otherwise.
    """

    def call_started(call) -> "callable or None":
        """
        A call is about to run. C{call} is an L{iii_twisted.engine.CallInfo}; an
        observer may replace C{call.traceparent}/C{call.baggage} to pass its own trace
        context on to the target.

        @return: None, or a callable taking (result, error) that the engine calls once
            when the call ends: C{error} is an InvocationError or None.
        """


class IKvStore(Interface):
    """
    A key-value store of JSON values, in groups: (group, key) -> value.

    Used by the state module (group = scope), the stream module (group = stream and
    group id) and open to any module that needs small durable records (queues, cron
    locks). Within a group, keys keep their insertion order (overwriting a key keeps
    its place). Writes take effect in memory in call order, so a read issued after a
    write sees it; a write's Deferred fires once the write is durable (for the
    file-based store: on disk and fsynced).

    Stored values must never be mutated in place by callers: a value passed to
    C{set} belongs to the store, and a value returned by C{get}/C{list} must be
    treated as read-only (copy it to change it).
    """

    def get(group: str, key: str) -> "Deferred":
        """
        @return: Deferred firing with the value, or None when there is none.
        """

    def set(group: str, key: str, value) -> "Deferred":
        """
        Store C{value} (any JSON value) under C{key}.

        @return: Deferred firing with C{{"old_value": previous or None, "new_value":
            value}} once the write is durable; failing with L{KvStoreError} when it
            cannot be stored (a value that is not JSON, an I/O error).
        """

    def delete(group: str, key: str) -> "Deferred":
        """
        Remove C{key} (a missing key is not an error).

        @return: Deferred firing with C{{"old_value": previous or None}} once the
            removal is durable; failing with L{KvStoreError}.
        """

    def update(group: str, key: str, ops: list) -> "Deferred":
        """
        Apply update ops (``set``/``merge``/``append``/``increment``/``decrement``/
        ``remove``, nested paths for merge and append; see L{iii_twisted.adapters.ops},
        whose C{apply_update_ops} every adapter uses) atomically. An absent key starts
        as ``{}`` and is created even when C{ops} is empty.

        @return: Deferred firing with C{{"old_value": previous or None, "new_value":
            result}} once durable, plus C{"errors": [{"op_index", "code", "message"}]}
            when some ops could not apply (the others did); failing with
            L{InvalidUpdateOp} (nothing changed) for a malformed op, or
            L{KvStoreError}.
        """

    def list(group: str) -> "Deferred":
        """
        @return: Deferred firing with the list of the group's values in key insertion
            order (C{[]} for an unknown group).
        """

    def items(group: str) -> "Deferred":
        """
        @return: Deferred firing with the list of the group's (key, value) pairs in
            insertion order (C{[]} for an unknown group).
        """

    def list_groups() -> "Deferred":
        """
        @return: Deferred firing with the sorted list of group names that hold at
            least one key.
        """

    def close() -> "Deferred":
        """
        Finish pending writes and release the store's resources (files, locks).
        Further writes fail with L{KvStoreError}.

        @return: Deferred firing with None once everything is written.
        """


class KvStoreError(Exception):
    """A key-value store could not do what was asked (I/O error, unencodable value)."""


class InvalidUpdateOp(KvStoreError):
    """
    An update op is malformed (unknown type, missing or wrong-typed field).

    @ivar index: the op's position in the list.
    @ivar op: the offending op as given.
    """

    def __init__(self, message, index=None, op=None):
        KvStoreError.__init__(self, message)
        self.message = message
        self.index = index
        self.op = op


class IQueueStore(Interface):
    """
    Where the builtin queue broker (L{iii_twisted.adapters.queue_builtin}) makes its
    messages durable: an append-only journal of JSON records (``enq``/``ack``/``nack``/
    ``dlq``/``redrive``/``discard`` events) that is replayed on start.

    The broker keeps the live state in memory; the store only makes it durable.
    """

    durable = Attribute("True when appended records survive a restart of the process.")

    def open(snapshot) -> "list":
        """
        Open the store and replay it. Called once, at start-up, before any delivery.

        @param snapshot: a callable returning the live state as a list of records (used
            when the store compacts itself).
        @return: the records appended so far (oldest first), for the module to replay.
        @raise OSError: when an existing store cannot be read.
        """

    def append(records: list) -> "Deferred":
        """
        Record events, in order.

        @return: Deferred firing with None once the records are durable (fsync'd for a
            file store), or failing with OSError when they could not be written.
        """

    def close() -> "Deferred":
        """
        Write what is pending and close.

        @return: Deferred firing with None when done.
        """


class IQueueBroker(Interface):
    """
    Where the queue module's messages live: storage, hand-out to consumers, retry
    delays and the dead-letter queue. The builtin broker
    (``modules::queue::BuiltinQueueAdapter``) holds them in this process, made durable
    by an L{IQueueStore}; the shared ones (``modules::queue::RedisAdapter``,
    ``modules::queue::RabbitMQAdapter``) on a server every engine uses. The module
    keeps the delivery logic (which function, conditions, concurrency, FIFO groups, the
    backoff schedule, the wait for a missing function) and tells the broker what
    became of each message it was handed.

    Jobs are L{iii_twisted.modules.queue.Job}s; a queue is named by its key
    (``__fn_queue::NAME`` for a named queue, the topic for a topic queue,
    ``__durable::TOPIC::FUNCTION`` for a durable subscriber's queue). Every message
    handed out must be settled exactly once with L{ack}, L{retry}, L{requeue} or
    L{dead}; one that is not (the engine died) is handed out again (at-least-once).
    """

    broker_type = Attribute("What engine::queue::list_topics reports: builtin, redis, "
                            "rabbitmq.")

    def start(arrived) -> "Deferred":
        """
        Connect (the builtin broker: open and replay its store). From now on,
        C{arrived(job)} is called for each message handed to this engine by a queue it
        L{consume}s; it may settle the message before it returns.

        @return: Deferred firing with None; one that has already failed when the
            broker cannot be used at all (a journal that cannot be read), which stops
            the engine's start-up.
        """

    def consume(queue: str, prefetch: int, fifo: bool) -> None:
        """
        Hand this engine up to C{prefetch} unsettled messages of C{queue} at a time
        (called again to change C{prefetch}). With C{fifo}, messages of one group
        (L{Job.group}; messages without one are one group) are handed out one at a
        time, in order, across engines, and a message in L{retry} keeps its group.
        """

    def stop_consuming(queue: str) -> None:
        """Hand out no more of C{queue} (messages already handed out stay so)."""

    def publish(job) -> "Deferred":
        """
        @return: Deferred firing with None once the broker holds the message durably
            (as durably as the broker is configured), failing when it cannot.
        """

    def add_fanout(topic: str, queue: str) -> "Deferred":
        """
        From now on, and for every engine, L{publish_fanout} of C{topic} puts a copy
        in C{queue} (``durable:subscriber``: one queue per subscribed function). The
        record outlives this engine, as a durable subscription does.

        @return: Deferred firing with None.
        """

    def publish_fanout(topic: str, job) -> "Deferred":
        """
        Publish C{job} once to every queue added with L{add_fanout} for C{topic} on any
        engine (each copy's C{queue} is its own; its id is C{job}'s, or its own where
        ids must be unique across queues, as in the builtin broker's journal).

        @return: Deferred firing once every copy is held durably.
        """

    def remove_fanout(topic: str, queue: str) -> "Deferred":
        """
        This engine no longer subscribes C{queue} to C{topic} (its last
        ``durable:subscriber`` trigger for it went). A shared broker keeps the record:
        another engine may still subscribe it, and a durable subscription collects
        messages while its subscriber is away. The builtin broker, whose subscriptions
        are this engine's alone, drops it: copies stop, as when nobody subscribed.

        @return: Deferred firing with None.
        """

    def ack(job) -> "Deferred":
        """The message was processed: forget it. @return: Deferred."""

    def retry(job, delay_ms: int) -> "Deferred":
        """
        Hand the message (with its C{attempts} already counted) out again after
        C{delay_ms}; atomic with settling this delivery, so it cannot be lost.
        @return: Deferred.
        """

    def requeue(job, delay_ms: int) -> "Deferred":
        """
        As L{retry} without spending an attempt: the function is not registered on
        this engine. @return: Deferred.
        """

    def dead(job, error: str, failed_at: int) -> "Deferred":
        """Move the message to the queue's dead-letter queue. @return: Deferred."""

    def dlq_messages(queue: str) -> "Deferred":
        """
        @return: Deferred firing with the dead letters as (job, error, failed_at ms),
            oldest first.
        """

    def redrive(queue: str, ids) -> "Deferred":
        """
        Move dead letters (C{ids}, or all when None) back to the queue with their
        attempts reset. @return: Deferred firing with the ids moved.
        """

    def discard(queue: str, ids) -> "Deferred":
        """
        Drop dead letters (C{ids}, or all when None). @return: Deferred firing with
        the ids dropped.
        """

    def stats(queue: str) -> "Deferred":
        """
        @return: Deferred firing with C{{"ready", "delayed", "in_flight", "dlq"}}
            message counts, across every engine.
        """

    def dlq_queues() -> "Deferred":
        """@return: Deferred firing with C{{queue: dead letters}} for queues with any."""

    def local_queues() -> list:
        """
        @return: the keys of the queues whose messages this process itself holds,
            without I/O: for the builtin broker, what its journal replayed and what
            was published since; a shared broker, whose messages are on its server,
            returns [].
        """

    def local_counts(queue: str) -> dict:
        """
        @return: C{{"ready", "delayed", "dlq"}}: how many of C{queue}'s messages this
            process itself holds, without I/O (zeros from a shared broker; L{stats}
            asks its server). The module's synchronous depth hooks read it.
        """

    def stop() -> "Deferred":
        """
        Stop handing out messages and disconnect; unsettled messages are handed out
        again later. @return: Deferred.
        """


class IPubSubAdapter(Interface):
    """Fan-out of ``publish`` to the functions subscribed to a topic."""

    def subscribe(topic: str, subscription_id: str, function_id: str) -> "Deferred":
        """
        Add one subscription.

        @return: Deferred firing with None.
        """

    def unsubscribe(topic: str, subscription_id: str) -> "Deferred":
        """
        Remove that one subscription (the topic's others stay).

        @return: Deferred firing with None.
        """

    def publish(topic: str, data) -> "Deferred":
        """
        Deliver C{data} to every subscription of C{topic}, fire and forget.

        @return: Deferred firing with the number of subscriptions it was sent to.
        """


class ICronLock(Interface):
    """
    Makes a cron job fire once per tick, even when several engines share a store.
    """

    def acquire(job_id: str, tick: int) -> "Deferred":
        """
        Claim the run of C{job_id} scheduled at C{tick} (epoch seconds).

        @return: Deferred firing with True for the one claimant of that tick, False
            for everyone else.
        """

    def release(job_id: str) -> "Deferred":
        """
        Forget the job's claims (the job was unregistered).

        @return: Deferred firing with None.
        """


class IChannelWriterEnd(Interface):
    """
    The writer end of a data channel, as the channel sees it (L{iii_twisted.channels}):
    a WebSocket, or an in-process writer such as the REST API's request-body pump.
    The end feeds the channel with C{channel.write(payload, is_binary)} and
    C{channel.writer_closed()}.
    """

    def pause() -> None:
        """The channel is full: stop writing until L{resume}."""

    def resume() -> None:
        """The reader has drained the channel: writing may go on (even re-entrantly)."""

    def abort(code: int, reason) -> None:
        """The channel is gone: close (a socket end sends a Close frame with C{code})."""


class IChannelReaderEnd(Interface):
    """
    The reader end of a data channel: a WebSocket, or an in-process reader such as the
    REST API's response streamer. It sets C{ready} false to hold frames back and calls
    C{channel.pump()} when it is ready again, and C{channel.reader_closed()} when gone.
    """

    ready = Attribute("True while the end accepts frames.")

    def deliver(payload: bytes, is_binary: bool) -> None:
        """Take one frame, in order."""

    def finish() -> None:
        """The writer has finished and every frame was delivered: end of stream."""

    def abort(code: int, reason) -> None:
        """The channel is gone before the end of the stream."""


class IWorkerClientHandler(Interface):
    """
    What a worker-protocol *client* connection (L{iii_twisted.cluster.client}: this
    engine connected to another engine as a worker) tells its owner: a cluster link
    (L{iii_twisted.cluster.links.PeerLink}), a bridge.
    """

    def opened(protocol) -> None:
        """The server sent ``workerregistered``: register what is offered now."""

    def invoke(protocol, message: dict):
        """
        The server calls a function (an ``invokefunction`` message, optional keys
        present as None).

        @return: the result, or a Deferred firing with it; raise or fail with
            L{iii_twisted.protocol.InvocationError} to answer an error.
        """

    def closed(protocol, code: int, reason) -> None:
        """The connection closed (1006 without a close frame), or never opened."""

    def frame(protocol, message: dict) -> None:
        """Any other frame (``triggerregistrationresult``, ``registrationrejected``)."""
