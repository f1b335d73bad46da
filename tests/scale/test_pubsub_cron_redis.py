"""Pub/sub and the cron lock on Redis: two engines in one process sharing one redis-server."""

import pytest_twisted

from engines import AutoWorker, wait_for


@pytest_twisted.ensureDeferred
async def test_publish_reaches_every_subscription_on_both_engines_once(engines, redis_url):
    a, b = engines.two_on_redis(redis_url, "pubsub")
    on_a = AutoWorker(a.engine, "sub::a1", "sub::a2")
    on_b = AutoWorker(b.engine, "sub::b1")
    # Registered as a worker's are, each awaited until its provider has it live (the
    # Redis subscription confirmed).
    for service, worker, trigger_id, function_id in [
            (a, on_a, "t1", "sub::a1"), (a, on_a, "t2", "sub::a2"),
            (b, on_b, "t3", "sub::b1")]:
        await service.engine.register_trigger(trigger_id, "subscribe", function_id,
                                              {"topic": "orders"}, owner=worker.conn.worker)

    await a.engine.call("publish", {"topic": "orders", "data": {"id": 1, "l": []}})
    await b.engine.call("publish", {"topic": "orders", "data": "marker"})
    everyone = [(on_a, "sub::a1"), (on_a, "sub::a2"), (on_b, "sub::b1")]
    await wait_for(lambda: all("marker" in w.data_of(f) for w, f in everyone),
                   what="the marker everywhere")
    for worker, function_id in everyone:
        assert worker.data_of(function_id) == [{"id": 1, "l": []}, "marker"]

    # Unsubscribing one keeps the others.
    on_a.conn.receive({"type": "unregistertrigger", "id": "t1"})
    await a.engine.call("publish", {"topic": "orders", "data": 2})
    await wait_for(lambda: 2 in on_b.data_of("sub::b1") and 2 in on_a.data_of("sub::a2"))
    assert 2 not in on_a.data_of("sub::a1")


@pytest_twisted.ensureDeferred
async def test_cron_fires_once_per_tick_across_engines_and_survives_one_stopping(
        engines, redis_url):
    a, b = engines.two_on_redis(redis_url, "cron")
    # Replicas of one worker on each engine: same function and expression, and
    # (as the SDKs do) a different random trigger id each.
    on_a = AutoWorker(a.engine, "job::tick")
    on_a.trigger("3f0c1d9e-a", "cron", "job::tick", {"expression": "* * * * * *"})
    on_b = AutoWorker(b.engine, "job::tick")
    on_b.trigger("77aa02b1-b", "cron", "job::tick", {"expression": "* * * * * *"})

    def ticks():
        return [d["scheduled_time"] for w in (on_a, on_b) for d in w.data_of("job::tick")]
    await wait_for(lambda: len(ticks()) >= 4, timeout=8, what="4 ticks")
    assert len(ticks()) == len(set(ticks())), ticks()  # no tick fired twice

    await engines.stop(a)
    before = len(on_b.data_of("job::tick"))
    await wait_for(lambda: len(on_b.data_of("job::tick")) >= before + 2, timeout=6,
                   what="B firing alone")
    assert len(ticks()) == len(set(ticks())), ticks()
