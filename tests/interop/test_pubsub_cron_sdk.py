"""Pub/sub and cron driven by the official Python SDK (iii-sdk 0.10.0), over loopback."""

from datetime import datetime

from engine_process import Waiter, wait_until

CONFIG = """
port: {port}
host: 127.0.0.1
invocation_timeout_ms: 20000
modules:
  - class: modules::pubsub::PubSubModule
    config:
      adapter:
        class: modules::pubsub::LocalAdapter
  - class: modules::cron::CronModule
    config:
      adapter:
        class: modules::cron::KvCronAdapter
"""


def triggers_of(worker, function_id):
    """@return: the engine's triggers bound to C{function_id}."""
    listed = worker.trigger({"function_id": "engine::triggers::list",
                             "payload": {"include_internal": True}})
    return [t for t in listed["triggers"] if t["function_id"] == function_id]


def wait_for_trigger(worker, function_id, present=True, timeout=10.0):
    """
    Wait until a trigger for C{function_id} is live (listed ``active``: its provider,
    e.g. a Redis subscription, confirmed it), or no longer registered.
    """
    found = []

    def settled():
        found[:] = triggers_of(worker, function_id)
        if not present:
            return not found
        return bool(found) and all(t.get("status") == "active" for t in found)

    wait_until(settled, timeout, "trigger of {} to {}".format(
        function_id, "appear" if present else "go away"))
    return found


def test_publish_reaches_subscribers_of_that_topic(start_engine, sdk_worker):
    """Every subscriber of the topic gets the data; removing one keeps the other."""
    engine = start_engine(CONFIG)
    a = sdk_worker(engine.url, "sub-a")
    b = sdk_worker(engine.url, "sub-b")
    publisher = sdk_worker(engine.url, "publisher")
    seen_a, seen_b, seen_other = Waiter(), Waiter(), Waiter()
    a.register_function({"id": "news::a"}, seen_a.add)
    b.register_function({"id": "news::b"}, seen_b.add)
    b.register_function({"id": "sports::b"}, seen_other.add)
    trigger_a = a.register_trigger({"type": "subscribe", "function_id": "news::a",
                                    "config": {"topic": "news"}})
    b.register_trigger({"type": "subscribe", "function_id": "news::b",
                        "config": {"topic": "news"}})
    b.register_trigger({"type": "subscribe", "function_id": "sports::b",
                        "config": {"topic": "sports"}})
    for function_id in ("news::a", "news::b", "sports::b"):
        wait_for_trigger(publisher, function_id)
    assert publisher.trigger({"function_id": "publish",
                              "payload": {"topic": "news", "data": {"headline": 1}}}) is None
    assert seen_a.wait_for() == [{"headline": 1}]
    assert seen_b.wait_for() == [{"headline": 1}]
    trigger_a.unregister()
    wait_for_trigger(publisher, "news::a", present=False)
    publisher.trigger({"function_id": "publish",
                       "payload": {"topic": "news", "data": {"headline": 2}}})
    assert seen_b.wait_for(lambda v: len(v) == 2)[1] == {"headline": 2}
    assert seen_a.values == [{"headline": 1}]
    assert seen_other.values == []


def test_cron_trigger_fires_with_payload(start_engine, sdk_worker):
    """A seconds-first expression fires every second with the cron payload."""
    engine = start_engine(CONFIG)
    worker = sdk_worker(engine.url, "cron")
    ticks = Waiter()
    worker.register_function({"id": "cron::tick"}, ticks.add)
    trigger = worker.register_trigger({"type": "cron", "function_id": "cron::tick",
                                       "config": {"expression": "* * * * * *"}})
    values = ticks.wait_for(lambda v: len(v) >= 2, timeout=5)
    first, second = values[:2]
    [registered] = triggers_of(worker, "cron::tick")
    assert first["trigger"] == "cron" and first["job_id"] == registered["id"]
    t1 = datetime.fromisoformat(first["scheduled_time"])
    t2 = datetime.fromisoformat(second["scheduled_time"])
    assert t1.utcoffset().total_seconds() == 0 and t1.microsecond == 0
    assert (t2 - t1).total_seconds() >= 1
    assert datetime.fromisoformat(first["actual_time"]) >= t1
    trigger.unregister()


def test_invalid_cron_expression_is_refused(start_engine, sdk_worker):
    """A 5-field or Sunday=0 expression is not kept, and the engine says why."""
    engine = start_engine(CONFIG)
    worker = sdk_worker(engine.url, "cron-bad")
    worker.register_function({"id": "cron::never"}, lambda data: None)
    worker.register_function({"id": "cron::yearly"}, lambda data: None)
    worker.register_trigger({"type": "cron", "function_id": "cron::never",
                             "config": {"expression": "*/5 * * * *"}})
    worker.register_trigger({"type": "cron", "function_id": "cron::yearly",
                             "config": {"expression": "0 0 0 1 1 *"}})
    # Registrations are handled in order: once the second is in, the first was refused.
    wait_for_trigger(worker, "cron::yearly")
    assert triggers_of(worker, "cron::never") == []
    assert "Invalid cron expression '*/5 * * * *': expected 6 or 7 fields" in engine.log()
