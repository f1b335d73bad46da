"""
The queue module's engine functions (../shared/spec/modules.md §7): ``enqueue``,
``iii::durable::publish``, ``engine::queue::enqueue``, the dead-letter functions
(``iii::queue::redrive``/``redrive_message``/``discard_message``/``discard``) and the
listings (``engine::queue::list_topics``/``topic_stats``/``dlq_topics``/
``dlq_messages``). They read and change messages through the module's broker only, so
they answer the same on every L{IQueueBroker} (a shared broker's counts and dead
letters are those of every engine).
"""

import json

from twisted.python.failure import Failure

from .. import protocol as P
from ..protocol import InvocationError
from .queue_config import DURABLE_PREFIX, FN_QUEUE_PREFIX, display_name, durable_key

FUNCTIONS = [
    ("enqueue", "_fn_enqueue", "Put a message {topic, data} on a topic queue"),
    ("iii::durable::publish", "_fn_durable_publish",
     "Put a copy of {data} in the queue of every function subscribed to {topic} "
     "(durable:subscriber)"),
    ("engine::queue::enqueue", "_fn_engine_enqueue",
     "Put {data} for {function_id} on the named queue {queue} "
     "(messageReceiptId optional); returns {messageReceiptId}"),
    ("iii::queue::redrive", "_fn_redrive",
     "Move every dead-lettered message of {queue} back to its queue"),
    ("iii::queue::redrive_message", "_fn_redrive_message",
     "Move one dead-lettered message {queue, message_id} back to its queue"),
    ("iii::queue::discard_message", "_fn_discard_message",
     "Drop one dead-lettered message {queue, message_id}"),
    ("iii::queue::discard", "_fn_discard", "Drop every dead-lettered message of {queue}"),
    ("engine::queue::list_topics", "_fn_list_topics", "List the named queues and topics"),
    ("engine::queue::topic_stats", "_fn_topic_stats",
     "Depth, consumers and DLQ depth of {topic}"),
    ("engine::queue::dlq_topics", "_fn_dlq_topics",
     "List the queues that have dead-lettered messages"),
    ("engine::queue::dlq_messages", "_fn_dlq_messages",
     "List the dead-lettered messages of {topic, offset, limit}, newest first"),
]


class QueueFunctions:
    """
    The engine functions, mixed into L{iii_twisted.modules.queue.QueueModule}: they use
    its C{engine}, C{broker}, C{named}, C{queues}, C{enqueue}, C{_new_job},
    C{_accept}, C{_publish_failed} and C{_maybe_forget}.
    """

    def _register_functions(self):
        for function_id, method, description in FUNCTIONS:
            self.engine.register_function(function_id, getattr(self, method), description)

    def _fn_enqueue(self, data):
        topic = _input(data, "enqueue").get("topic")
        if topic is None or topic == "":
            raise InvocationError("topic_not_set", "Topic is not set")
        if not isinstance(topic, str):
            raise bad_input("enqueue", "topic must be a string")
        if topic.startswith(FN_QUEUE_PREFIX):
            raise bad_input("enqueue", "topic names may not start with {}".format(
                FN_QUEUE_PREFIX))
        job = self._new_job(topic, None, data.get("data"))
        return self._accept(job)

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
            raise bad_input(fid, "topic must be a string")
        # The broker knows the subscribers (of every engine, for a shared one).
        job = self._new_job(durable_key(topic, ""), None, data.get("data"))
        return self.broker.publish_fanout(topic, job).addCallbacks(
            lambda _: None, self._publish_failed, errbackArgs=(job,))

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
                raise bad_input(fid, "{} must be a non-empty string".format(key))
            else:
                values[key] = value
        d = self.enqueue(values["queue"], values["function_id"], data.get("data"),
                         values["traceparent"], values["baggage"])
        return d.addCallback(lambda receipt: {"messageReceiptId": receipt})

    def _resolve(self, data, function_id, key="queue", code="queue_not_set",
                 message="Queue is not set"):
        """
        @return: (the name given, the queue key it names): a named queue, else a
            topic, else a durable subscriber's queue (``TOPIC::FUNCTION_ID``, as the
            listings show it) this engine knows.
        """
        name = _input(data, function_id).get(key)
        if name is None or name == "":
            raise InvocationError(code, message)
        if not isinstance(name, str):
            raise bad_input(function_id, "{} must be a string".format(key))
        if name in self.named:
            return name, FN_QUEUE_PREFIX + name
        if name not in self.queues and DURABLE_PREFIX + name in self.queues:
            return name, DURABLE_PREFIX + name
        return name, name

    def _message_id(self, data, function_id):
        message_id = data.get("message_id")
        if message_id is None or message_id == "":
            raise InvocationError("message_id_not_set", "Message id is not set")
        if not isinstance(message_id, str):
            raise bad_input(function_id, "message_id must be a string")
        return message_id

    def _fn_redrive(self, data):
        name, key = self._resolve(data, "iii::queue::redrive")
        return self.broker.redrive(key, None).addCallbacks(
            lambda ids: {"queue": name, "redriven": len(ids)}, _as_error("redrive_failed"))

    def _fn_redrive_message(self, data):
        name, key = self._resolve(data, "iii::queue::redrive_message")
        message_id = self._message_id(data, "iii::queue::redrive_message")
        return self.broker.redrive(key, [message_id]).addCallbacks(
            lambda ids: {"queue": name, "message_id": message_id, "redriven": len(ids)},
            _as_error("redrive_message_failed"))

    def _discarded(self, ids, key):
        queue = self.queues.get(key)
        if queue is not None:
            self._maybe_forget(queue)
        return ids

    def _fn_discard_message(self, data):
        name, key = self._resolve(data, "iii::queue::discard_message")
        message_id = self._message_id(data, "iii::queue::discard_message")
        # "redriven" is the reference's key for this count; "discarded" says what it is.
        d = self.broker.discard(key, [message_id]).addCallback(self._discarded, key)
        return d.addCallbacks(
            lambda ids: {"queue": name, "message_id": message_id, "redriven": len(ids),
                         "discarded": len(ids)},
            _as_error("discard_message_failed"))

    def _fn_discard(self, data):
        name, key = self._resolve(data, "iii::queue::discard")
        d = self.broker.discard(key, None).addCallback(self._discarded, key)
        return d.addCallbacks(lambda ids: {"queue": name, "discarded": len(ids)},
                              _as_error("discard_failed"))

    def _fn_list_topics(self, data):
        result = []
        for queue in self.queues.values():
            if queue.topic:
                result.append({"name": queue.name, "broker_type": self.broker.broker_type,
                               "subscriber_count": len(queue.subscriptions)})
            else:
                result.append({"name": queue.name, "broker_type": "function_queue",
                               "subscriber_count": queue.settings.concurrency})
        return result

    def _fn_topic_stats(self, data):
        name, key = self._resolve(data, "engine::queue::topic_stats", "topic",
                                  "topic_required", "Topic is required")
        queue = self.queues.get(key)

        def answer(stats):
            # Handed to this engine but waiting for a function: waiting, not in flight.
            parked = len(queue.waiting) if queue is not None else 0
            return {
                "depth": stats["ready"] + stats["delayed"] + parked,
                "consumer_count": 0 if queue is None else (
                    len(queue.subscriptions) if queue.topic
                    else queue.settings.concurrency),
                "dlq_depth": stats["dlq"],
                "in_flight": max(0, stats["in_flight"] - parked),
                "config": None if queue is None or queue.topic else queue.settings.info(),
            }
        return self.broker.stats(key).addCallbacks(answer, _as_error("stats_failed"))

    def _fn_dlq_topics(self, data):
        def listed(counts):
            return [{"topic": display_name(key),
                     "broker_type": ("function_queue" if key.startswith(FN_QUEUE_PREFIX)
                                     else self.broker.broker_type),
                     "message_count": count} for key, count in counts.items()]
        return self.broker.dlq_queues().addCallbacks(listed, _as_error("dlq_failed"))

    def _fn_dlq_messages(self, data):
        name, key = self._resolve(data, "engine::queue::dlq_messages", "topic",
                                  "topic_required", "Topic is required")
        offset = data.get("offset", 0)
        limit = data.get("limit", 50)
        for field, value in (("offset", offset), ("limit", limit)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad_input("engine::queue::dlq_messages",
                                 "{} must be a non-negative integer".format(field))
        d = self.broker.dlq_messages(key)
        return d.addCallbacks(lambda dead: _dlq_page(list(reversed(dead)), offset, limit),
                              _as_error("dlq_failed"))


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


def _input(data, function_id):
    if not isinstance(data, dict):
        raise bad_input(function_id, "expected an object")
    return data


def bad_input(function_id, why):
    """@return: the InvocationError for input the function cannot read."""
    return InvocationError(P.DESERIALIZATION_ERROR,
                           "Failed to deserialize input for {}: {}".format(function_id, why))




def _as_error(code):
    def convert(failure):
        if failure.check(InvocationError):
            return failure
        return Failure(InvocationError(code, failure.getErrorMessage()))
    return convert
