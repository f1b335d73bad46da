"""
The builtin queue broker under the queue module (task.Clock): journal compatibility
with the code before the broker seam, and what the one delivery path does on it.
"""

import importlib.util
import os
import shutil

from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

import iii_twisted.adapters.queue_builtin as queue_builtin
import iii_twisted.modules.queue as queue_module
from iii_twisted.adapters.queue_journal import JournalQueueStore, decode_frames
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection

from test_queue import Consumer, enqueue, make, temp_path

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "queue-journal-b16d22a")


def _scenario():
    spec = importlib.util.spec_from_file_location(
        "make_journal", os.path.join(FIXTURE, "make_journal.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync_runner(f, *args):
    return maybeDeferred(f, *args)


def records_of(directory):
    with open(os.path.join(directory, "queue.journal"), "rb") as f:
        records, _ = decode_frames(f.read())
    return records


class JournalCompatibilityTests(SynchronousTestCase):
    def setUp(self):
        self.dir = temp_path(self)

    def test_same_records_as_before_the_broker_seam(self):
        """The scenario that wrote the fixture writes the same records today."""
        originals = (queue_module.uuid4, queue_builtin.uuid4)
        self.addCleanup(setattr, queue_module, "uuid4", originals[0])
        self.addCleanup(setattr, queue_builtin, "uuid4", originals[1])
        _scenario().write_journal(self.dir, [queue_module, queue_builtin])
        old = records_of(FIXTURE)
        new = records_of(self.dir)
        # Dead-letter records now carry the attempts (older code ignores the key).
        assert [r.pop("attempts") for r in new if r["op"] == "dlq"] == [1, 1, 1]
        assert new == old

    def test_a_journal_written_before_the_broker_seam_replays(self):
        """Every kind of record the old code wrote replays to the same state."""
        shutil.copytree(FIXTURE, self.dir)
        ids = {"pending": 2, "nacked": 3, "dead": 4, "redriven": 5, "discarded": 6}
        ids = {k: "00000000-0000-0000-0000-{:012x}".format(v) for k, v in ids.items()}
        config = {"queue_configs": _scenario().QUEUE_CONFIGS}
        engine, clock, module = make(config, store=JournalQueueStore(self.dir, sync_runner))
        call = engine.call
        [dead] = self.successResultOf(call("engine::queue::dlq_messages", {"topic": "zero"}))
        # No attempts in an old dlq record: at least one was made.
        assert (dead["id"], dead["payload"], dead["retries"], dead["error"],
                dead["failed_at"]) == (ids["dead"], {"n": "dead"}, 1,
                                       "boom: failed on purpose", 2)
        stats = self.successResultOf(call("engine::queue::topic_stats", {"topic": "orders"}))
        assert (stats["depth"], stats["dlq_depth"]) == (2, 0)
        assert module.depths() == {"orders": 2, "zero": 1, "groups": 2, "news": 1,
                                   "events::dur::a": 1, "events::dur::b": 1}
        absent = Consumer(engine, "absent")
        bad = Consumer(engine, "bad", failures=10)
        clock.advance(0.1)
        assert absent.calls == [{"n": "pending", "x": [1.5, None, True]},
                                {"g": "a", "n": "fifo1"}, {"g": "a", "n": "fifo2"}]
        # "nacked" had two attempts: its third is its last (max_retries 3).
        assert bad.calls == [{"n": "nacked"}, {"n": "redriven"}]
        orders = self.successResultOf(call("engine::queue::dlq_messages", {"topic": "orders"}))
        assert [(m["id"], m["retries"]) for m in orders] == [(ids["nacked"], 3)]
        seen = []
        engine.register_function("news::c", seen.append)
        engine.register_function("dur::a", lambda d: seen.append(("a", d)))
        engine.register_function("dur::b", lambda d: seen.append(("b", d)))
        for trigger_id, kind, function_id, topic in (
                ("n", "queue", "news::c", "news"),
                ("a", "durable:subscriber", "dur::a", "events"),
                ("b", "durable:subscriber", "dur::b", "events")):
            self.successResultOf(engine.register_trigger(trigger_id, kind, function_id,
                                                         {"topic": topic}))
        assert sorted(map(str, seen)) == sorted(map(str, [
            {"n": "topic"}, ("a", {"n": "durable"}), ("b", {"n": "durable"})]))
        self.successResultOf(module.stopService())
        assert clock.getDelayedCalls() == []


class BuiltinDeliveryTests(SynchronousTestCase):
    def test_dead_letter_attempts_survive_a_restart(self):
        """A dead letter's attempts are journaled with it."""
        directory = temp_path(self)
        engine, clock, module = make(store=JournalQueueStore(directory, sync_runner))
        Consumer(engine, "bad", failures=10)
        self.successResultOf(enqueue(engine, "orders", "bad", {"n": 1}))
        clock.advance(0.1)
        clock.advance(0.2)
        engine2, clock2, module2 = make(store=JournalQueueStore(directory, sync_runner))
        [dead] = self.successResultOf(engine2.call("engine::queue::dlq_messages",
                                                   {"topic": "orders"}))
        assert dead["retries"] == 3

    def test_missing_function_waits_in_its_fifo_group(self):
        """A message waiting for its function holds its group; other groups go on."""
        engine, clock, module = make()
        self.successResultOf(enqueue(engine, "groups", "later", {"g": "a", "n": 1}))
        present = Consumer(engine, "now")
        self.successResultOf(enqueue(engine, "groups", "now", {"g": "a", "n": 2}))
        self.successResultOf(enqueue(engine, "groups", "now", {"g": "b", "n": 3}))
        clock.advance(1)
        assert present.calls == [{"g": "b", "n": 3}]
        later = Consumer(engine, "later")
        clock.advance(0.1)
        assert later.calls == [{"g": "a", "n": 1}]
        assert present.calls == [{"g": "b", "n": 3}, {"g": "a", "n": 2}]
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_missing_function_does_not_hold_up_the_queue(self):
        """A standard queue delivers others' messages while one waits for its function."""
        engine, clock, module = make()
        present = Consumer(engine, "now")
        self.successResultOf(enqueue(engine, "one", "later", {"n": 1}))
        for n in range(2, 5):
            self.successResultOf(enqueue(engine, "one", "now", {"n": n}))
        assert [c["n"] for c in present.calls] == [2, 3, 4]
        stats = self.successResultOf(engine.call("engine::queue::topic_stats",
                                                 {"topic": "one"}))
        assert (stats["depth"], stats["in_flight"]) == (1, 0)
        module.stopService()
        assert clock.getDelayedCalls() == []

    def test_a_waiting_message_goes_before_later_ones_of_its_function(self):
        """
        The function registers between two enqueues: the first message, waiting for
        it, is still delivered first (concurrency 1 keeps enqueue order).
        """
        engine, clock, module = make()
        conn = FakeWorkerConnection.connect(engine)
        self.successResultOf(enqueue(engine, "seq", "w", {"n": 0}))
        conn.receive({"type": "registerfunction", "id": "w"})
        for n in (1, 2):
            self.successResultOf(enqueue(engine, "seq", "w", {"n": n}))
        for _ in range(3):
            [call] = [m for m in conn.sent_of_type("invokefunction")
                      if "answered" not in m]
            call["answered"] = True
            conn.receive({"type": "invocationresult", "function_id": "w",
                          "invocation_id": call["invocation_id"]})
        assert [m["data"]["n"] for m in conn.sent_of_type("invokefunction")] == [0, 1, 2]
        module.stopService()
        engine.stop()
        assert clock.getDelayedCalls() == []

    def test_a_handler_that_enqueues_does_not_nest_deliveries(self):
        """Deliveries that enqueue the next message at once run in a loop, not a stack."""
        engine, clock, module = make()
        calls = []

        def chain(data):
            calls.append(data)
            if data < 2000:
                enqueue(engine, "orders", "chain", data + 1)
        engine.register_function("chain", chain)
        self.successResultOf(enqueue(engine, "orders", "chain", 0))
        assert calls == list(range(2001))

    def test_dlq_functions_take_a_durable_queue_by_its_listed_name(self):
        """dlq_topics lists "topic::function"; the DLQ functions accept that name."""
        engine, clock, module = make()
        engine.register_function("f", lambda d: (_ for _ in ()).throw(
            InvocationError("boom", "no")))
        self.successResultOf(engine.register_trigger(
            "t", "durable:subscriber", "f", {"topic": "t", "queue_config": {"maxRetries": 0}}))
        self.successResultOf(engine.call("iii::durable::publish", {"topic": "t", "data": 1}))
        [listed] = self.successResultOf(engine.call("engine::queue::dlq_topics", {}))
        assert (listed["topic"], listed["broker_type"]) == ("t::f", "builtin")
        [dead] = self.successResultOf(engine.call("engine::queue::dlq_messages",
                                                  {"topic": "t::f"}))
        assert dead["payload"] == 1
        result = self.successResultOf(engine.call("iii::queue::discard", {"queue": "t::f"}))
        assert result == {"queue": "t::f", "discarded": 1}

    def test_an_unreadable_journal_stops_start_up(self):
        """A journal that cannot be read fails startService, as before the seam."""
        directory = temp_path(self)
        os.makedirs(os.path.join(directory, "queue.journal"))  # a directory: unreadable
        engine, clock, module = make(store=JournalQueueStore(directory, sync_runner),
                                     start=False)
        with self.assertRaises(OSError):
            module.startService()
        assert not module.running


class RequeueTests(SynchronousTestCase):
    """The builtin broker's requeue: messages of a missing function wait together."""

    def setUp(self):
        from twisted.internet.task import Clock

        from iii_twisted.adapters.queue_builtin import BuiltinQueueBroker
        from iii_twisted.adapters.queue_journal import MemoryQueueStore
        from iii_twisted.modules.queue import Job

        self.clock = Clock()
        self.broker = BuiltinQueueBroker(MemoryQueueStore(), self.clock, Job.from_record)
        self.arrived = []
        self.missing = True

        def arrived(job):
            # As the module does: a missing function's message goes back at once.
            self.arrived.append(job.data)
            if self.missing:
                self.broker.requeue(job, 100)
        self.successResultOf(self.broker.start(arrived))
        for n in range(5):
            self.successResultOf(self.broker.publish(
                Job(str(n), "q", "f", n, 0, 0)))

    def test_one_goes_round_per_delay_then_all_in_order(self):
        """While the function is missing one message per delay is handed out."""
        self.broker.consume("q", 10, False)
        assert self.arrived == [0, 1, 2, 3, 4]
        for _ in range(3):
            self.clock.advance(0.1)
        assert self.arrived == [0, 1, 2, 3, 4, 0, 0, 0]
        assert self.successResultOf(self.broker.stats("q"))["delayed"] == 5
        self.missing = False
        self.clock.advance(0.1)
        assert self.arrived[8:] == [0, 1, 2, 3, 4]
        assert self.successResultOf(self.broker.stats("q")) == {
            "ready": 0, "delayed": 0, "in_flight": 5, "dlq": 0}
        self.successResultOf(self.broker.stop())
        assert self.clock.getDelayedCalls() == []

    def test_stop_puts_parked_messages_first_in_line(self):
        """Parked messages are kept (and snapshot) at stop, in order."""
        self.broker.consume("q", 10, False)
        self.successResultOf(self.broker.stop())
        assert self.clock.getDelayedCalls() == []
        assert [r["job"]["data"] for r in self.broker._snapshot()] == [0, 1, 2, 3, 4]


class ManyWaitingTests(SynchronousTestCase):
    def test_many_messages_wait_for_their_function_then_go_in_order(self):
        """A backlog for a missing function waits cheaply and then goes, in order."""
        engine, clock, module = make()
        for n in range(1000):
            self.successResultOf(enqueue(engine, "orders", "later", n))
        clock.advance(5)
        stats = self.successResultOf(engine.call("engine::queue::topic_stats",
                                                 {"topic": "orders"}))
        assert (stats["depth"], stats["in_flight"]) == (1000, 0)
        later = Consumer(engine, "later")
        clock.advance(0.1)
        assert later.calls == list(range(1000))
        module.stopService()
        assert clock.getDelayedCalls() == []
