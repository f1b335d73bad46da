"""Queues driven by the official Python SDK (iii-sdk 0.10.0), over loopback."""


import pytest
from iii import TriggerAction

from engine_process import Waiter, otel, queue_module, v010_config, wait_until

QUEUE_CONFIG = v010_config(queue_module(
    {"jobs": {"max_retries": 3, "concurrency": 2, "backoff_ms": 100},
     "flaky": {"max_retries": 2, "concurrency": 1, "backoff_ms": 50},
     "ordered": {"type": "fifo", "message_group_field": "account", "concurrency": 4}},
    adapter={"class": "modules::queue::BuiltinQueueAdapter",
             "config": {"store_method": "file_based", "file_path": "./queue_store"}}))


def enqueue(worker, queue, function_id, payload):
    return worker.trigger({"function_id": function_id, "payload": payload,
                           "action": TriggerAction.Enqueue(queue=queue)})


def test_enqueue_action_delivers_to_another_worker(start_engine, sdk_worker):
    """The caller gets a receipt at once; the consumer on another worker gets the data."""
    engine = start_engine(QUEUE_CONFIG)
    consumer = sdk_worker(engine.url, "consumer")
    producer = sdk_worker(engine.url, "producer")
    seen = Waiter()
    consumer.register_function({"id": "orders::process"}, seen.add)
    result = enqueue(producer, "jobs", "orders::process", {"order": "pizza", "qty": 2})
    assert set(result) == {"messageReceiptId"}
    assert seen.wait_for()[0] == {"order": "pizza", "qty": 2}


def test_unknown_queue_is_refused(start_engine, sdk_worker):
    engine = start_engine(QUEUE_CONFIG)
    producer = sdk_worker(engine.url, "producer")
    with pytest.raises(Exception, match="enqueue_error.*Queue 'nope' not found|Queue 'nope' not found"):
        enqueue(producer, "nope", "x", {})


def test_fifo_group_field_is_required(start_engine, sdk_worker):
    engine = start_engine(QUEUE_CONFIG)
    producer = sdk_worker(engine.url, "producer")
    with pytest.raises(Exception, match="requires field 'account'"):
        enqueue(producer, "ordered", "x", {"amount": 1})


def test_fifo_keeps_order_within_each_group(start_engine, sdk_worker):
    """Messages of one group arrive in the order they were enqueued."""
    engine = start_engine(QUEUE_CONFIG)
    worker = sdk_worker(engine.url, "fifo")
    seen = Waiter()
    worker.register_function({"id": "ledger::apply"}, seen.add)
    for i in range(12):
        enqueue(worker, "ordered", "ledger::apply", {"account": "ab"[i % 2], "seq": i})
    values = seen.wait_for(lambda v: len(v) == 12)
    for account in "ab":
        seqs = [v["seq"] for v in values if v["account"] == account]
        assert seqs == sorted(seqs)


def test_topic_queue_with_queue_trigger(start_engine, sdk_worker):
    """`enqueue {topic, data}` reaches the function of a `queue` trigger on that topic."""
    engine = start_engine(QUEUE_CONFIG)
    worker = sdk_worker(engine.url, "topic")
    seen = Waiter()
    worker.register_function({"id": "topic::consumer"}, seen.add)
    # Enqueued before anyone subscribes: it waits for the subscriber.
    assert worker.trigger({"function_id": "enqueue",
                           "payload": {"topic": "signups", "data": {"user": 1}}}) is None
    worker.register_trigger({"type": "queue", "function_id": "topic::consumer",
                             "config": {"topic": "signups"}})
    worker.trigger({"function_id": "enqueue", "payload": {"topic": "signups", "data": {"user": 2}}})
    values = seen.wait_for(lambda v: len(v) == 2)
    assert sorted(v["user"] for v in values) == [1, 2]


def test_retries_then_dead_letter_then_redrive(start_engine, sdk_worker):
    """A failing handler is retried max_retries times, dead-lettered, then redriven."""
    engine = start_engine(QUEUE_CONFIG)
    worker = sdk_worker(engine.url, "flaky")
    attempts = Waiter()
    state = {"fail": True}

    def handler(data):
        attempts.add(data)
        if state["fail"]:
            raise RuntimeError("not today")
        return {"ok": True}

    worker.register_function({"id": "flaky::fn"}, handler)
    receipt = enqueue(worker, "flaky", "flaky::fn", {"n": 7})["messageReceiptId"]
    attempts.wait_for(lambda v: len(v) == 2)
    dead = wait_until(lambda: worker.trigger({"function_id": "engine::queue::dlq_messages",
                                         "payload": {"topic": "flaky"}}))
    assert [(m["id"], m["payload"], m["retries"]) for m in dead] == [(receipt, {"n": 7}, 2)]
    assert "not today" in dead[0]["error"]
    state["fail"] = False
    result = worker.trigger({"function_id": "iii::queue::redrive", "payload": {"queue": "flaky"}})
    assert result == {"queue": "flaky", "redriven": 1}
    assert attempts.wait_for(lambda v: len(v) == 3)[2] == {"n": 7}
    stats = wait_until(lambda: (lambda s: s if s["in_flight"] == 0 else None)(worker.trigger(
        {"function_id": "engine::queue::topic_stats", "payload": {"topic": "flaky"}})))
    assert (stats["depth"], stats["dlq_depth"]) == (0, 0)


def test_queued_messages_survive_kill_9(start_engine, sdk_worker):
    """Accepted, undelivered messages are delivered after the engine is killed (-9)."""
    engine = start_engine(QUEUE_CONFIG)
    producer = sdk_worker(engine.url, "producer")
    for i in range(5):
        assert "messageReceiptId" in enqueue(producer, "jobs", "durable::consumer", {"n": i})
    producer.trigger({"function_id": "enqueue",
                      "payload": {"topic": "durable-topic", "data": {"t": 1}}})
    engine.kill()
    engine.start()
    consumer = sdk_worker(engine.url, "consumer")
    seen = Waiter()
    consumer.register_function({"id": "durable::consumer"}, seen.add)
    consumer.register_function({"id": "durable::topic"}, seen.add)
    consumer.register_trigger({"type": "queue", "function_id": "durable::topic",
                               "config": {"topic": "durable-topic"}})
    values = seen.wait_for(lambda v: len(v) == 6, timeout=15)
    assert sorted(v["n"] for v in values if "n" in v) == [0, 1, 2, 3, 4]
    assert {"t": 1} in values
    assert "restored 6 message(s)" in engine.log()


def test_message_in_flight_at_kill_9_is_delivered_again(start_engine, sdk_worker):
    """At-least-once: a delivery that never finished is made again after a crash (the
    worker reconnects by itself and gets it)."""
    engine = start_engine(QUEUE_CONFIG)
    worker = sdk_worker(engine.url, "slow")
    calls = Waiter()
    release = Waiter()

    def handler(data):
        calls.add(data)
        if len(calls.values) == 1:
            release.wait_for(timeout=30)  # the first delivery never finishes: crash

    worker.register_function({"id": "slow::fn"}, handler)
    enqueue(worker, "jobs", "slow::fn", {"once": True})
    calls.wait_for()
    engine.kill()
    engine.start()
    assert calls.wait_for(lambda v: len(v) == 2, timeout=20)[1] == {"once": True}
    release.add(True)


def test_concurrent_enqueues_all_survive_kill_9(start_engine, sdk_worker):
    """Many producers at once (their appends share fsyncs): every acknowledged message
    is delivered after a kill -9, each at least once."""
    from concurrent.futures import ThreadPoolExecutor

    engine = start_engine(QUEUE_CONFIG)
    producers = [sdk_worker(engine.url, "producer-{}".format(i)) for i in range(4)]

    def produce(index):
        worker = producers[index % 4]
        return enqueue(worker, "jobs", "bulk::consumer", {"n": index})["messageReceiptId"]

    with ThreadPoolExecutor(8) as pool:
        receipts = list(pool.map(produce, range(200)))
    assert len(set(receipts)) == 200
    engine.kill()
    engine.start()
    consumer = sdk_worker(engine.url, "bulk-consumer")
    seen = Waiter()
    consumer.register_function({"id": "bulk::consumer"}, seen.add)
    values = seen.wait_for(lambda v: len({x["n"] for x in v}) == 200, timeout=30)
    assert {x["n"] for x in values} == set(range(200))


DEPTH_CONFIG = v010_config(queue_module({"slow": {"concurrency": 1}}), otel(service_name=None))


def test_queue_depth_in_engine_metrics(start_engine, sdk_worker):
    """Messages waiting behind a busy consumer show as the queue's depth."""
    import threading

    engine = start_engine(DEPTH_CONFIG)
    consumer = sdk_worker(engine.url, "slow-consumer")
    producer = sdk_worker(engine.url, "producer")
    release = threading.Event()
    seen = Waiter()

    def handle(data):
        seen.add(data)
        release.wait(20)  # holds the queue's one slot until the test lets go

    consumer.register_function({"id": "slow::work"}, handle)
    try:
        for n in range(4):
            enqueue(producer, "slow", "slow::work", {"n": n})
        seen.wait_for()

        def depth():
            metrics = producer.trigger({"function_id": "engine::metrics::list",
                                        "payload": {}})
            return metrics["engine_metrics"]["queues"].get("slow")

        assert wait_until(lambda: depth() == 3, what="a depth of 3")
    finally:
        release.set()
    assert [d["n"] for d in seen.wait_for(lambda v: len(v) == 4)] == [0, 1, 2, 3]
    assert wait_until(lambda: depth() == 0, what="the queue to drain")
