"""The queue module: named and topic queues, retries, DLQ, durability (task.Clock)."""

import os
import shutil
import tempfile

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from iii_twisted.adapters.queue_journal import JournalQueueStore, MemoryQueueStore
from iii_twisted.config import ConfigError
from iii_twisted.interfaces import IQueueStore, TriggerError
from iii_twisted.modules.queue import QueueModule
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, make_engine

CONFIG = {
    "queue_configs": {
        "orders": {"max_retries": 3, "concurrency": 2, "backoff_ms": 100},
        "one": {"max_retries": 1, "concurrency": 1},
        "zero": {"max_retries": 0},
        "seq": {"concurrency": 1, "backoff_ms": 1000},
        "groups": {"type": "fifo", "message_group_field": "g", "concurrency": 2,
                   "backoff_ms": 100},
    },
}


def temp_path(case):
    """@return: a fresh path in a temporary directory removed after the test."""
    base = tempfile.mkdtemp(prefix="iii-queue-test-")
    case.addCleanup(shutil.rmtree, base, True)
    return os.path.join(base, "store")


def sync_runner(f, *args):
    return maybeDeferred(f, *args)


class Consumer:
    """An in-process function that records its calls; can fail or hold them."""

    def __init__(self, engine, function_id, failures=0, hold=False):
        self.calls = []
        self.pending = []
        self.failures = failures
        self.hold = hold
        engine.register_function(function_id, self)

    def __call__(self, data):
        self.calls.append(data)
        if self.hold:
            d = Deferred()
            self.pending.append(d)
            return d
        if self.failures:
            self.failures -= 1
            raise InvocationError("boom", "failed on purpose")
        return None


def make(config=CONFIG, store=None, start=True):
    engine, clock = make_engine(invocation_timeout=0)
    module = QueueModule(engine, config, clock, store=store)
    if start:
        module.startService()
    return engine, clock, module


def enqueue(engine, queue, function_id, data):
    return engine.call(function_id, data, {"type": "enqueue", "queue": queue})


class NamedQueueTests(SynchronousTestCase):
    def test_enqueue_answers_with_receipt_then_delivers_data_unchanged(self):
        """The caller gets a receipt id; the function gets exactly the data."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c")
        result = self.successResultOf(enqueue(engine, "orders", "c", {"n": 1, "x": [1.5]}))
        assert isinstance(result["messageReceiptId"], str)
        assert consumer.calls == [{"n": 1, "x": [1.5]}]
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_worker_gets_receipt_over_the_wire_without_caller_id(self):
        """A worker's enqueue action is answered at once; no _caller_worker_id is added."""
        engine, clock, module = make()
        conn = FakeWorkerConnection.connect(engine)
        consumer = Consumer(engine, "c", hold=True)
        conn.receive({"type": "invokefunction", "invocation_id": "i1", "function_id": "c",
                      "data": {"a": 1}, "action": {"type": "enqueue", "queue": "orders"}})
        [answer] = conn.sent_of_type("invocationresult")
        assert answer["invocation_id"] == "i1"
        assert set(answer["result"]) == {"messageReceiptId"}
        assert consumer.calls == [{"a": 1}]
        consumer.pending[0].callback(None)
        module.stopService()

    def test_unknown_queue_is_enqueue_error(self):
        """An unknown queue name fails with enqueue_error naming the queue."""
        engine, clock, module = make()
        failure = self.failureResultOf(enqueue(engine, "nope", "c", {}), InvocationError)
        assert failure.value.code == "enqueue_error"
        assert failure.value.message == "Queue 'nope' not found"

    def test_fifo_needs_its_group_field(self):
        """A FIFO message without its group field, or with null, is refused."""
        engine, clock, module = make()
        f = self.failureResultOf(enqueue(engine, "groups", "c", {"x": 1}), InvocationError)
        assert f.value.message == ("FIFO queue 'groups' requires field 'g' in data, but "
                                   "it was not found")
        f = self.failureResultOf(enqueue(engine, "groups", "c", {"g": None}), InvocationError)
        assert f.value.message == "FIFO queue 'groups': field 'g' must not be null"
        f = self.failureResultOf(enqueue(engine, "groups", "c", [1]), InvocationError)
        assert f.value.code == "enqueue_error"

    def test_retries_with_exponential_backoff_then_dead_letter(self):
        """max_retries is the total number of attempts; delays double; then the DLQ."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c", failures=10)
        self.successResultOf(enqueue(engine, "orders", "c", {"n": 1}))
        assert len(consumer.calls) == 1
        clock.advance(0.099)
        assert len(consumer.calls) == 1
        clock.advance(0.001)
        assert len(consumer.calls) == 2
        clock.advance(0.199)
        assert len(consumer.calls) == 2
        clock.advance(0.001)
        assert len(consumer.calls) == 3
        assert clock.getDelayedCalls() == []
        [dead] = self.successResultOf(engine.call("engine::queue::dlq_messages",
                                                  {"topic": "orders"}))
        assert dead["payload"] == {"n": 1}
        assert dead["retries"] == 3
        assert "failed on purpose" in dead["error"]
        stats = self.successResultOf(engine.call("engine::queue::topic_stats",
                                                 {"topic": "orders"}))
        assert (stats["depth"], stats["dlq_depth"]) == (0, 1)
        module.stopService()

    def test_success_after_a_retry_is_acknowledged(self):
        """A failure then a success: two calls, nothing dead-lettered."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c", failures=1)
        self.successResultOf(enqueue(engine, "orders", "c", {}))
        clock.advance(0.1)
        assert len(consumer.calls) == 2
        assert self.successResultOf(engine.call("engine::queue::dlq_topics", {})) == []
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_max_retries_zero_is_one_call(self):
        """max_retries 0: one call, then the DLQ."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c", failures=1)
        self.successResultOf(enqueue(engine, "zero", "c", {}))
        assert len(consumer.calls) == 1
        assert self.successResultOf(engine.call("engine::queue::dlq_topics", {})) == [
            {"topic": "zero", "broker_type": "function_queue", "message_count": 1}]

    def test_concurrency_bounds_in_flight_deliveries(self):
        """No more than `concurrency` calls run at once; the next starts when one ends."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c", hold=True)
        for i in range(5):
            self.successResultOf(enqueue(engine, "orders", "c", {"i": i}))
        assert [c["i"] for c in consumer.calls] == [0, 1]
        consumer.pending[0].callback(None)
        assert [c["i"] for c in consumer.calls] == [0, 1, 2]
        for d in consumer.pending[1:]:
            d.callback({"ok": True})
        # Each completion starts the next one.
        while len(consumer.pending) < 5:
            consumer.pending[-1].callback(None)
        consumer.pending[-1].callback(None)
        assert [c["i"] for c in consumer.calls] == [0, 1, 2, 3, 4]
        module.stopService()

    def test_depths_count_waiting_and_backoff_not_in_flight(self):
        """depths() (read by observability) counts ready and backing-off messages."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c", hold=True)
        # Every configured queue is reported, empty or not.
        assert module.depths() == {"orders": 0, "one": 0, "zero": 0, "seq": 0, "groups": 0}
        for i in range(5):
            self.successResultOf(enqueue(engine, "orders", "c", {"i": i}))
        # concurrency 2: two in flight, three waiting.
        assert module.depths()["orders"] == 3
        consumer.pending[0].errback(InvocationError("boom", "retry me"))
        # The failed one waits out its backoff; the next waiting one went out.
        assert module.depths()["orders"] == 3
        while [d for d in consumer.pending if not d.called]:
            for d in [d for d in consumer.pending if not d.called]:
                d.callback(None)
        assert module.depths()["orders"] == 1  # only the one in backoff is left
        clock.advance(100)
        consumer.pending[-1].callback(None)
        assert len(consumer.calls) == 6
        assert module.depths()["orders"] == 0
        module.stopService()

    def test_concurrency_one_keeps_order(self):
        """A standard queue with concurrency 1 delivers in enqueue order."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c", hold=True)
        for i in range(4):
            self.successResultOf(enqueue(engine, "seq", "c", {"i": i}))
        while len(consumer.calls) < 4:
            assert len([d for d in consumer.pending if not d.called]) == 1
            consumer.pending[-1].callback(None)
        consumer.pending[-1].callback(None)
        assert [c["i"] for c in consumer.calls] == [0, 1, 2, 3]

    def test_fifo_keeps_order_per_group_through_retries(self):
        """A group waits for its head's retry; other groups go on meanwhile."""
        engine, clock, module = make()
        calls = []

        def handler(data):
            calls.append(data["n"])
            if data["n"] == "a1" and calls.count("a1") == 1:
                raise InvocationError("boom", "first try fails")

        engine.register_function("f", handler)
        for g, n in [("a", "a1"), ("a", "a2"), ("b", "b1"), ("b", "b2")]:
            self.successResultOf(enqueue(engine, "groups", "f", {"g": g, "n": n}))
        # a1 failed and is in backoff: a2 must wait; b goes on.
        assert calls == ["a1", "b1", "b2"]
        clock.advance(0.1)
        assert calls == ["a1", "b1", "b2", "a1", "a2"]
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_fifo_runs_groups_in_parallel_up_to_concurrency(self):
        """Two groups in flight at once (concurrency 2), one message per group."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c", hold=True)
        for g, n in [("a", 1), ("a", 2), ("b", 3), ("c", 4)]:
            self.successResultOf(enqueue(engine, "groups", "c", {"g": g, "n": n}))
        assert [c["n"] for c in consumer.calls] == [1, 3]
        consumer.pending[0].callback(None)
        assert [c["n"] for c in consumer.calls] == [1, 3, 2]

    def test_message_for_unregistered_function_waits_for_it(self):
        """No function yet: the message waits (no attempt used) and goes once it exists."""
        engine, clock, module = make()
        self.successResultOf(enqueue(engine, "one", "later", {"k": 1}))
        clock.advance(5)
        consumer = Consumer(engine, "later")
        clock.advance(0.1)
        assert consumer.calls == [{"k": 1}]
        assert self.successResultOf(engine.call("engine::queue::dlq_topics", {})) == []
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_worker_disconnect_mid_delivery_is_a_failed_attempt(self):
        """A consumer that goes away mid-call: invocation_stopped, retried later."""
        engine, clock, module = make()
        conn = FakeWorkerConnection.connect(engine)
        conn.receive({"type": "registerfunction", "id": "w"})
        self.successResultOf(enqueue(engine, "orders", "w", {"z": 1}))
        [call] = conn.sent_of_type("invokefunction")
        assert call["data"] == {"z": 1}
        conn.disconnect()
        conn2 = FakeWorkerConnection.connect(engine)
        conn2.receive({"type": "registerfunction", "id": "w"})
        clock.advance(0.1)
        [again] = conn2.sent_of_type("invokefunction")
        conn2.receive({"type": "invocationresult", "invocation_id": again["invocation_id"],
                       "function_id": "w"})
        stats = self.successResultOf(engine.call("engine::queue::topic_stats",
                                                 {"topic": "orders"}))
        assert stats["depth"] == stats["in_flight"] == stats["dlq_depth"] == 0
        module.stopService()
        engine.stop()
        assert clock.getDelayedCalls() == []


class DeadLetterTests(SynchronousTestCase):
    def _dead(self, count=2):
        engine, clock, module = make()
        consumer = Consumer(engine, "c", failures=count)
        ids = [self.successResultOf(enqueue(engine, "zero", "c", {"i": i}))["messageReceiptId"]
               for i in range(count)]
        return engine, clock, module, consumer, ids

    def test_dlq_messages_newest_first_with_paging(self):
        """dlq_messages lists newest first and honours offset/limit."""
        engine, clock, module, consumer, ids = self._dead(3)
        listed = self.successResultOf(engine.call("engine::queue::dlq_messages",
                                                  {"topic": "zero"}))
        assert [m["id"] for m in listed] == list(reversed(ids))
        page = self.successResultOf(engine.call("engine::queue::dlq_messages",
                                                {"topic": "zero", "offset": 1, "limit": 1}))
        assert [m["id"] for m in page] == [ids[1]]

    def test_redrive_all(self):
        """redrive moves every dead message back; they are delivered again."""
        engine, clock, module, consumer, ids = self._dead()
        result = self.successResultOf(engine.call("iii::queue::redrive", {"queue": "zero"}))
        assert result == {"queue": "zero", "redriven": 2}
        assert consumer.calls == [{"i": 0}, {"i": 1}, {"i": 0}, {"i": 1}]
        assert self.successResultOf(engine.call("engine::queue::dlq_topics", {})) == []

    def test_redrive_and_discard_one_message(self):
        """redrive_message / discard_message act on one message id (the receipt id)."""
        engine, clock, module, consumer, ids = self._dead()
        result = self.successResultOf(engine.call(
            "iii::queue::redrive_message", {"queue": "zero", "message_id": ids[0]}))
        assert result == {"queue": "zero", "message_id": ids[0], "redriven": 1}
        assert consumer.calls[-1] == {"i": 0}
        result = self.successResultOf(engine.call(
            "iii::queue::discard_message", {"queue": "zero", "message_id": ids[1]}))
        assert result["discarded"] == 1
        result = self.successResultOf(engine.call(
            "iii::queue::discard_message", {"queue": "zero", "message_id": ids[1]}))
        assert result["discarded"] == 0
        assert self.successResultOf(engine.call("engine::queue::dlq_topics", {})) == []

    def test_discard_all(self):
        """discard drops every dead message of a queue."""
        engine, clock, module, consumer, ids = self._dead()
        result = self.successResultOf(engine.call("iii::queue::discard", {"queue": "zero"}))
        assert result == {"queue": "zero", "discarded": 2}

    def test_missing_arguments(self):
        """Clear codes for a missing queue or message id."""
        engine, clock, module = make()
        f = self.failureResultOf(engine.call("iii::queue::redrive", {}), InvocationError)
        assert f.value.code == "queue_not_set"
        f = self.failureResultOf(engine.call("iii::queue::discard_message",
                                             {"queue": "zero"}), InvocationError)
        assert f.value.code == "message_id_not_set"
        f = self.failureResultOf(engine.call("engine::queue::topic_stats", {}),
                                 InvocationError)
        assert f.value.code == "topic_required"
        f = self.failureResultOf(engine.call("iii::queue::redrive", None), InvocationError)
        assert f.value.code == "deserialization_error"


class TopicQueueTests(SynchronousTestCase):
    def _trigger(self, engine, trigger_id, topic, function_id, **extra):
        config = dict({"topic": topic}, **extra)
        return engine.register_trigger(trigger_id, "queue", function_id, config)

    def test_enqueue_without_subscriber_waits_then_delivers(self):
        """`enqueue` succeeds with nobody subscribed; the first subscriber gets it."""
        engine, clock, module = make()
        assert self.successResultOf(engine.call("enqueue", {"topic": "t", "data": {"a": 1}})) is None
        consumer = Consumer(engine, "c")
        self.successResultOf(self._trigger(engine, "tr", "t", "c"))
        assert consumer.calls == [{"a": 1}]
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_competing_consumers_each_message_once(self):
        """Two subscriptions share the topic's messages: each goes to one of them."""
        engine, clock, module = make()
        a, b = Consumer(engine, "a"), Consumer(engine, "b")
        self.successResultOf(self._trigger(engine, "ta", "t", "a"))
        self.successResultOf(self._trigger(engine, "tb", "t", "b"))
        for i in range(6):
            self.successResultOf(engine.call("enqueue", {"topic": "t", "data": i}))
        assert sorted(a.calls + b.calls) == list(range(6))
        assert a.calls and b.calls

    def test_topics_are_isolated(self):
        """A message on one topic never reaches another topic's consumer."""
        engine, clock, module = make()
        a, b = Consumer(engine, "a"), Consumer(engine, "b")
        self.successResultOf(self._trigger(engine, "ta", "ta", "a"))
        self.successResultOf(self._trigger(engine, "tb", "tb", "b"))
        self.successResultOf(engine.call("enqueue", {"topic": "ta", "data": "x"}))
        assert (a.calls, b.calls) == (["x"], [])

    def test_condition_false_drops_the_message(self):
        """A condition that returns false acknowledges the message without a call."""
        engine, clock, module = make()
        engine.register_function("cond", lambda data: data != "skip")
        consumer = Consumer(engine, "c")
        self.successResultOf(self._trigger(engine, "t1", "t", "c",
                                           condition_function_id="cond"))
        self.successResultOf(engine.call("enqueue", {"topic": "t", "data": "skip"}))
        self.successResultOf(engine.call("enqueue", {"topic": "t", "data": "go"}))
        assert consumer.calls == ["go"]
        assert module.queues["t"].waiting == type(module.queues["t"].waiting)()

    def test_unsubscribed_topic_stops_delivering(self):
        """After its trigger is removed, a consumer gets nothing; messages wait."""
        engine, clock, module = make()
        consumer = Consumer(engine, "c")
        self.successResultOf(self._trigger(engine, "tr", "t", "c"))
        engine.unregister_trigger("tr")
        self.successResultOf(engine.call("enqueue", {"topic": "t", "data": 1}))
        assert consumer.calls == []
        stats = self.successResultOf(engine.call("engine::queue::topic_stats", {"topic": "t"}))
        assert stats["depth"] == 1 and stats["consumer_count"] == 0
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_topic_not_set(self):
        """`enqueue` without a topic fails with topic_not_set."""
        engine, clock, module = make()
        f = self.failureResultOf(engine.call("enqueue", {"data": 1}), InvocationError)
        assert (f.value.code, f.value.message) == ("topic_not_set", "Topic is not set")
        f = self.failureResultOf(engine.call("enqueue", {"topic": "__fn_queue::orders"}),
                                 InvocationError)
        assert f.value.code == "deserialization_error"

    def test_bad_trigger_configs_are_refused_and_the_worker_told(self):
        """No topic, a bad type, a bad concurrency: TriggerError; the worker hears of it."""
        engine, clock, module = make()
        for config in [{}, {"topic": ""}, {"topic": "t", "queue_config": {"type": "lifo"}},
                       {"topic": "t", "queue_config": {"concurrency": 0}}, "t",
                       {"topic": "__fn_queue::orders"}]:
            self.failureResultOf(engine.register_trigger("x", "queue", "c", config),
                                 TriggerError)
        conn = FakeWorkerConnection.connect(engine)
        conn.receive({"type": "registertrigger", "id": "w1", "trigger_type": "queue",
                      "function_id": "c", "config": {"queue_config": {}}})
        [answer] = conn.sent_of_type("triggerregistrationresult")
        assert "topic" in answer["error"]["message"]
        assert "w1" not in engine.triggers

    def test_fifo_subscription_is_serial_with_blocking_retries(self):
        """A fifo subscription delivers one at a time; a retry holds the line."""
        engine, clock, module = make({"adapter": {"config": {"backoff_ms": 50}}})
        calls = []

        def handler(data):
            calls.append(data)
            if data == 1 and calls.count(1) == 1:
                raise InvocationError("boom", "once")

        engine.register_function("f", handler)
        self.successResultOf(engine.register_trigger(
            "tr", "queue", "f", {"topic": "t", "queue_config": {"type": "fifo"}}))
        for i in range(1, 4):
            self.successResultOf(engine.call("enqueue", {"topic": "t", "data": i}))
        assert calls == [1]
        clock.advance(0.05)
        assert calls == [1, 1, 2, 3]

    def test_list_topics(self):
        """list_topics shows named queues and live topics."""
        engine, clock, module = make({"queue_configs": {"q": {"concurrency": 3}}})
        Consumer(engine, "c")
        self.successResultOf(self._trigger(engine, "tr", "t", "c"))
        topics = self.successResultOf(engine.call("engine::queue::list_topics", {}))
        assert {"name": "q", "broker_type": "function_queue", "subscriber_count": 3} in topics
        assert {"name": "t", "broker_type": "builtin", "subscriber_count": 1} in topics


class ConfigTests(SynchronousTestCase):
    def _error(self, config):
        engine, clock = make_engine()
        with pytest.raises(ConfigError) as info:
            QueueModule(engine, config, clock)
        return info.value

    def test_fifo_without_group_field(self):
        e = self._error({"queue_configs": {"p": {"type": "fifo"}}})
        assert e.key == "queue_configs.p.message_group_field"

    def test_bad_type(self):
        e = self._error({"queue_configs": {"p": {"type": "priority"}}})
        assert e.key == "queue_configs.p.type" and "priority" in e.message

    def test_bad_numbers(self):
        assert self._error({"queue_configs": {"p": {"concurrency": 0}}}).key == \
            "queue_configs.p.concurrency"
        assert self._error({"queue_configs": {"p": {"max_retries": "3"}}}).key == \
            "queue_configs.p.max_retries"

    def test_unknown_adapter(self):
        e = self._error({"adapter": {"class": "modules::queue::Nope"}})
        assert e.key == "adapter.class"
        assert "BuiltinQueueAdapter" in e.message

    def test_bad_store_method(self):
        e = self._error({"adapter": {"config": {"store_method": "disk"}}})
        assert e.key == "adapter.config.store_method"

    def test_store_directory_that_cannot_be_made(self):
        path = temp_path(self)
        with open(path, "w"):
            pass  # a file where the directory should be
        e = self._error({"adapter": {"config": {"store_method": "file_based",
                                                "file_path": os.path.join(path, "q")}}})
        assert e.key == "adapter.config.file_path"
        assert "cannot create" in e.message

    def test_unknown_keys_are_ignored(self):
        """Lenient like the reference: unknown keys load (with a warning)."""
        engine, clock = make_engine()
        QueueModule(engine, {"extra": 1, "queue_configs": {"q": {"foo": 2}}}, clock)

    def test_enqueuer_is_set(self):
        engine, clock, module = make()
        assert engine.enqueuer is module


class DurabilityTests(SynchronousTestCase):
    def setUp(self):
        self.dir = temp_path(self)

    def store(self, **kw):
        return JournalQueueStore(self.dir, sync_runner, **kw)

    def test_undelivered_messages_survive_a_crash(self):
        """Stored but undelivered messages are delivered by the next process."""
        engine, clock, module = make(store=self.store())
        self.successResultOf(enqueue(engine, "orders", "absent", {"n": 1}))
        self.successResultOf(engine.call("enqueue", {"topic": "t", "data": {"n": 2}}))
        # "Crash": no stopService, a new engine opens the same journal.
        engine2, clock2, module2 = make(store=self.store())
        c = Consumer(engine2, "absent")
        t = Consumer(engine2, "tc")
        self.successResultOf(engine2.register_trigger("tr", "queue", "tc", {"topic": "t"}))
        clock2.advance(0.1)
        assert c.calls == [{"n": 1}] and t.calls == [{"n": 2}]
        module.stopService()
        module2.stopService()
        assert clock.getDelayedCalls() == clock2.getDelayedCalls() == []

    def test_acknowledged_messages_are_not_redelivered(self):
        """A message acked before the restart is gone; attempts and the DLQ persist."""
        engine, clock, module = make(store=self.store())
        Consumer(engine, "ok")
        Consumer(engine, "bad", failures=10)
        self.successResultOf(enqueue(engine, "orders", "ok", {"n": 1}))
        self.successResultOf(enqueue(engine, "one", "bad", {"n": 2}))
        self.successResultOf(enqueue(engine, "orders", "bad", {"n": 3}))
        module.stopService()
        engine2, clock2, module2 = make(store=self.store())
        assert self.successResultOf(engine2.call("engine::queue::dlq_topics", {})) == [
            {"topic": "one", "broker_type": "function_queue", "message_count": 1}]
        bad = Consumer(engine2, "bad", failures=10)
        Consumer(engine2, "ok")
        clock2.advance(0.1)
        # Attempt 1 happened before the restart: two are left.
        clock2.advance(1)
        assert bad.calls == [{"n": 3}, {"n": 3}]
        module2.stopService()

    def test_redrive_and_discard_survive_a_restart(self):
        """DLQ operations are journaled too."""
        engine, clock, module = make(store=self.store())
        Consumer(engine, "bad", failures=2)
        ids = [self.successResultOf(enqueue(engine, "zero", "bad", {"i": i}))["messageReceiptId"]
               for i in range(2)]
        self.successResultOf(engine.call("iii::queue::discard_message",
                                         {"queue": "zero", "message_id": ids[0]}))
        engine2, clock2, module2 = make(store=self.store())
        dead = self.successResultOf(engine2.call("engine::queue::dlq_messages",
                                                 {"topic": "zero"}))
        assert [m["id"] for m in dead] == [ids[1]]

    def test_delivery_ending_after_stop_is_delivered_again(self):
        """A call still running at shutdown is not acknowledged: at-least-once."""
        engine, clock, module = make(store=self.store())
        consumer = Consumer(engine, "c", hold=True)
        self.successResultOf(enqueue(engine, "orders", "c", {"n": 1}))
        self.successResultOf(module.stopService())
        consumer.pending[0].callback(None)
        assert clock.getDelayedCalls() == []
        engine2, clock2, module2 = make(store=self.store())
        again = Consumer(engine2, "c")
        clock2.advance(0.1)
        assert again.calls == [{"n": 1}]

    def test_torn_tail_is_cut(self):
        """A half-written last record is cut off; the records before it are kept."""
        engine, clock, module = make(store=self.store())
        self.successResultOf(enqueue(engine, "orders", "absent", {"n": 1}))
        self.successResultOf(enqueue(engine, "orders", "absent", {"n": 2}))
        path = os.path.join(self.dir, "queue.journal")
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size - 3)
        engine2, clock2, module2 = make(store=self.store())
        c = Consumer(engine2, "absent")
        clock2.advance(0.1)
        assert c.calls == [{"n": 1}]
        assert os.path.getsize(path) < size - 3  # the torn frame was truncated away
        self.successResultOf(enqueue(engine2, "orders", "absent2", {"n": 3}))
        engine3, clock3, module3 = make(store=self.store())
        c3 = Consumer(engine3, "absent2")
        clock3.advance(0.1)
        assert c3.calls == [{"n": 3}]  # appends after the cut replay fine

    def test_corrupt_record_stops_replay_there(self):
        """A record whose checksum does not match ends the replay at that point."""
        engine, clock, module = make(store=self.store())
        self.successResultOf(enqueue(engine, "orders", "absent", {"n": 1}))
        path = os.path.join(self.dir, "queue.journal")
        good = os.path.getsize(path)
        self.successResultOf(enqueue(engine, "orders", "absent", {"n": 2}))
        with open(path, "r+b") as f:
            f.seek(good + 10)
            byte = f.read(1)
            f.seek(good + 10)
            f.write(bytes([byte[0] ^ 0xFF]))
        engine2, clock2, module2 = make(store=self.store())
        assert os.path.getsize(path) == good
        c = Consumer(engine2, "absent")
        clock2.advance(0.1)
        assert c.calls == [{"n": 1}]

    def test_compaction_keeps_only_live_state(self):
        """After many acks the journal is rewritten with the live messages only."""
        store = self.store(compact_min_records=20)
        engine, clock, module = make(store=store)
        Consumer(engine, "ok")
        for i in range(30):
            self.successResultOf(enqueue(engine, "orders", "ok", {"i": i}))
        self.successResultOf(enqueue(engine, "orders", "absent", {"keep": 1}))
        Consumer(engine, "bad", failures=1)
        self.successResultOf(enqueue(engine, "zero", "bad", {"dead": 1}))
        assert store.compactions >= 1
        assert not os.path.exists(store.path + ".tmp")
        engine2, clock2, module2 = make(store=self.store())
        c = Consumer(engine2, "absent")
        clock2.advance(0.1)
        assert c.calls == [{"keep": 1}]
        dead = self.successResultOf(engine2.call("engine::queue::dlq_messages",
                                                 {"topic": "zero"}))
        assert [m["payload"] for m in dead] == [{"dead": 1}]

    def test_compaction_keeps_a_message_still_being_stored(self):
        """The message whose append triggers a compaction is in the new journal."""
        store = self.store(compact_min_records=1)
        engine, clock, module = make(store=store)
        for i in range(6):
            self.successResultOf(enqueue(engine, "orders", "absent", {"i": i}))
        assert store.compactions >= 1
        engine2, clock2, module2 = make(store=self.store())
        c = Consumer(engine2, "absent")
        clock2.advance(0.1)
        assert sorted(x["i"] for x in c.calls) == list(range(6))

    def test_concurrent_appends_share_one_write(self):
        """Appends made while a write is under way go out together in the next one."""
        jobs = []

        def manual(f, *args):
            d = Deferred()
            jobs.append((f, args, d))
            return d

        store = JournalQueueStore(self.dir, manual)
        engine, clock, module = make(store=store)
        receipts = [enqueue(engine, "orders", "absent", {"i": i}) for i in range(5)]
        assert len(jobs) == 1  # the first write is under way, four are waiting
        f, args, d = jobs.pop()
        d.callback(f(*args))
        assert receipts[0].called and not receipts[1].called
        assert len(jobs) == 1  # the other four in one batch
        f, args, d = jobs.pop()
        d.callback(f(*args))
        assert all(r.called for r in receipts)

    def test_write_failure_fails_the_enqueue(self):
        """A store that cannot write refuses the message: enqueue_error."""

        def broken(f, *args):
            return maybeDeferred(_raise, OSError(28, "No space left on device"))

        engine, clock, module = make(store=JournalQueueStore(self.dir, broken))
        f = self.failureResultOf(enqueue(engine, "orders", "c", {}), InvocationError)
        assert f.value.code == "enqueue_error"
        assert "No space left" in f.value.message
        assert self.successResultOf(engine.call("engine::queue::topic_stats",
                                                {"topic": "orders"}))["depth"] == 0

    def test_memory_store_is_not_durable(self):
        assert MemoryQueueStore().durable is False

    def test_close_waits_for_pending_writes(self):
        """close() fires only after what was appended is written; later appends fail."""
        jobs = []

        def manual(f, *args):
            d = Deferred()
            jobs.append((f, args, d))
            return d

        store = JournalQueueStore(self.dir, manual)
        store.open(list)
        first = store.append([{"op": "ack", "id": "a"}])
        second = store.append([{"op": "ack", "id": "b"}])
        closed = store.close()
        assert not closed.called
        while jobs:
            f, args, d = jobs.pop()
            d.callback(f(*args))
        assert first.called and second.called and closed.called
        self.failureResultOf(store.append([{"op": "ack", "id": "c"}]), OSError)
        reopened = JournalQueueStore(self.dir, sync_runner)
        assert reopened.open(list) == [{"op": "ack", "id": "a"}, {"op": "ack", "id": "b"}]
        self.successResultOf(reopened.close())

    def test_close_of_a_store_never_opened(self):
        self.successResultOf(JournalQueueStore(self.dir, sync_runner).close())


class StoreContract:
    """What every IQueueStore does; subclasses give make_store()."""

    def test_provides_the_interface(self):
        verifyObject(IQueueStore, self.make_store())

    def test_append_then_close(self):
        store = self.make_store()
        assert store.open(list) == []
        self.successResultOf(store.append([{"op": "ack", "id": "x"}]))
        self.successResultOf(store.close())


class MemoryStoreContractTests(StoreContract, SynchronousTestCase):
    def make_store(self):
        return MemoryQueueStore()


class JournalStoreContractTests(StoreContract, SynchronousTestCase):
    def make_store(self):
        return JournalQueueStore(temp_path(self), sync_runner)


def _raise(e):
    raise e


class CurrentQueueApiTests(SynchronousTestCase):
    """durable:subscriber, iii::durable::publish, engine::queue::enqueue (0.11 / 0.21.5)."""

    def test_every_subscribed_function_gets_a_copy_and_replicas_compete(self):
        engine, clock, module = make()
        seen = []
        engine.register_function("a", lambda d: seen.append(("a", d)))
        engine.register_function("b", lambda d: seen.append(("b", d)))
        engine.register_function("other", lambda d: seen.append(("other", d)))
        for trigger_id, fn, topic in (("ta1", "a", "orders"), ("ta2", "a", "orders"),
                                      ("tb", "b", "orders"), ("to", "other", "refunds")):
            self.successResultOf(engine.register_trigger(
                trigger_id, "durable:subscriber", fn, {"topic": "orders"
                                                       if topic == "orders" else topic}))
        for n in range(3):
            assert self.successResultOf(engine.call(
                "iii::durable::publish", {"topic": "orders", "data": n})) is None
        assert sorted(seen) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
        names = {q["name"] for q in self.successResultOf(
            engine.call("engine::queue::list_topics", {}))}
        assert {"orders::a", "orders::b"} <= names
        # Unsubscribing b stops its copies; a keeps getting them.
        engine.unregister_trigger("tb")
        self.successResultOf(engine.call("iii::durable::publish",
                                         {"topic": "orders", "data": 9}))
        assert seen[-1] == ("a", 9) and ("b", 9) not in seen
        # Nobody subscribed: nothing stored, success.
        self.successResultOf(engine.call("iii::durable::publish", {"topic": "none", "data": 1}))
        f = self.failureResultOf(engine.call("iii::durable::publish", {"data": 1}))
        assert f.value.code == "topic_not_set"

    def test_durable_max_retries_counts_retries(self):
        """durable:subscriber maxRetries: 1 is two attempts (reference 0.11+), then DLQ."""
        engine, clock, module = make()
        calls = []

        def fails(data):
            calls.append(data)
            raise InvocationError("boom", "always")
        engine.register_function("f", fails)
        self.successResultOf(engine.register_trigger(
            "t", "durable:subscriber", "f",
            {"topic": "t", "queue_config": {"maxRetries": 1, "backoffDelayMs": 50}}))
        self.successResultOf(engine.call("iii::durable::publish", {"topic": "t", "data": 1}))
        assert calls == [1]
        clock.advance(0.05)
        assert calls == [1, 1]
        clock.advance(10)
        assert calls == [1, 1]
        [dead] = self.successResultOf(engine.call("engine::queue::dlq_topics", {}))
        assert (dead["topic"], dead["message_count"]) == ("t::f", 1)

    def test_queue_trigger_settings_take_effect(self):
        """`queue` maxRetries: 1 is one attempt (v0.10), backoffDelayMs and fixed backoff apply."""
        engine, clock, module = make()
        calls = []

        def fails(data):
            calls.append((data, clock.seconds()))
            raise InvocationError("boom", "always")
        engine.register_function("f", fails)
        engine.register_function("g", fails)
        self.successResultOf(engine.register_trigger(
            "tf", "queue", "f", {"topic": "once", "queue_config": {
                "maxRetries": 1, "backoffDelayMs": 50}}))
        self.successResultOf(engine.register_trigger(
            "tg", "queue", "g", {"topic": "fixed", "queue_config": {
                "maxRetries": 3, "backoffDelayMs": 100, "backoffType": "fixed"}}))
        self.successResultOf(engine.call("enqueue", {"topic": "once", "data": "o"}))
        clock.advance(60)
        assert [c[0] for c in calls] == ["o"]
        del calls[:]
        start = clock.seconds()
        self.successResultOf(engine.call("enqueue", {"topic": "fixed", "data": "x"}))
        for _ in range(5):
            clock.advance(0.1)
        assert [round(t - start, 3) for _, t in calls] == [0, 0.1, 0.2]
        topics = {d["topic"] for d in self.successResultOf(
            engine.call("engine::queue::dlq_topics", {}))}
        assert topics == {"once", "fixed"}

    def test_unsupported_settings_are_refused_loudly(self):
        """visibilityTimeout, delaySeconds, maxPriority and bad values: refused, worker told."""
        engine, clock, module = make()
        for kind in ("queue", "durable:subscriber"):
            for bad in ({"visibilityTimeout": 30}, {"delaySeconds": 5}, {"maxPriority": 3},
                        {"maxRetries": -1}, {"maxRetries": "2"}, {"backoffDelayMs": 1.5},
                        {"backoffType": "linear"}):
                f = self.failureResultOf(engine.register_trigger(
                    "x", kind, "c", {"topic": "t", "queue_config": bad}), TriggerError)
                assert list(bad)[0] in f.value.message
        conn = FakeWorkerConnection.connect(engine)
        conn.receive({"type": "registertrigger", "id": "w1", "trigger_type": "durable:subscriber",
                      "function_id": "c", "config": {"topic": "t", "queue_config": {
                          "visibilityTimeout": 30}}})
        [answer] = conn.sent_of_type("triggerregistrationresult")
        assert "visibilityTimeout is not supported" in answer["error"]["message"]

    def test_engine_queue_enqueue(self):
        """engine::queue::enqueue puts on a named queue; the receipt is the engine's."""
        engine, clock, module = make()
        got = []
        engine.register_function("worker::job", got.append)
        answer = self.successResultOf(engine.call("engine::queue::enqueue", {
            "queue": "orders", "function_id": "worker::job", "data": {"n": 1},
            "messageReceiptId": "caller-chosen"}))
        assert answer["messageReceiptId"] != "caller-chosen"
        assert got == [{"n": 1}]
        f = self.failureResultOf(engine.call("engine::queue::enqueue", {
            "queue": "nope", "function_id": "worker::job", "data": 1}))
        assert f.value.code == "enqueue_error"
        f = self.failureResultOf(engine.call("engine::queue::enqueue", {"queue": "orders"}))
        assert f.value.code == "deserialization_error"
