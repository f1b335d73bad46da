"""
The queue module on a shared broker (Redis, RabbitMQ): two engines in one process
sharing one server.
"""

import pytest
import pytest_twisted
from twisted.internet import defer

from engines import (
    AutoWorker, module_of, other_pool, rabbitmq_queue_module, redis_queue_module, wait_for,
)
from iii_twisted.modules.queue import QueueModule
from iii_twisted.protocol import InvocationError

QUEUES = {"orders": {"max_retries": 3, "backoff_ms": 100, "concurrency": 5},
          "once": {"max_retries": 1, "backoff_ms": 50}}


class Failing(AutoWorker):
    """A worker whose calls fail (as a handler raising would)."""

    def _answer(self, message):
        if self.conn.closed is None:
            self.conn.receive({"type": "invocationresult",
                               "invocation_id": message["invocation_id"],
                               "function_id": message["function_id"],
                               "error": {"code": "boom", "message": "it failed"}})


class Holding(AutoWorker):
    """A worker that answers nothing until L{release}, then everything at once."""

    held = None

    def _answer(self, message):
        if self.held is None:
            AutoWorker._answer(self, message)
        else:
            self.held.append(message)

    def hold(self):
        self.held = []

    def release(self):
        held, self.held = self.held, None
        for message in held:
            AutoWorker._answer(self, message)


@pytest.fixture(params=["redis", "rabbitmq"])
def shared(request):
    """@return: (module entry factory, URL for engine A, URL for engine B)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return redis_queue_module, url, other_pool(url)
    url = request.getfixturevalue("rabbitmq_server").url
    return rabbitmq_queue_module, url, url


def two(engines, shared, **kwargs):
    module, url_a, url_b = shared
    a = engines.start([module(url_a, QUEUES, **kwargs)])
    b = engines.start([module(url_b, QUEUES, **kwargs)])
    return a, b, module_of(a, QueueModule), module_of(b, QueueModule)


@pytest_twisted.ensureDeferred
async def test_200_messages_across_two_engines_each_processed_once(engines, shared):
    a, b, qa, qb = two(engines, shared)
    on_a = Holding(a.engine, "orders::handle")
    on_b = Holding(b.engine, "orders::handle")
    # Both engines consume: with answers held, one engine takes at most its
    # concurrency (5), so the other must take messages too; then all is let go.
    on_a.hold()
    on_b.hold()
    receipts = await defer.gatherResults(
        [(qa if i % 2 else qb).enqueue("orders", "orders::handle", {"n": i})
         for i in range(200)])
    assert len(set(receipts)) == 200
    await wait_for(lambda: on_a.held and on_b.held, what="both engines to take messages")
    assert len(on_a.held) <= 5 and len(on_b.held) <= 5
    on_a.release()
    on_b.release()

    def seen():
        return [d["n"] for w in (on_a, on_b) for d in w.data_of("orders::handle")]
    await wait_for(lambda: len(seen()) >= 200, what="200 messages")
    assert sorted(seen()) == list(range(200))
    stats = await a.engine.call("engine::queue::topic_stats", {"topic": "orders"})
    assert stats["dlq_depth"] == 0 and stats["depth"] == 0


@pytest_twisted.ensureDeferred
async def test_a_message_waits_for_the_engine_that_has_its_function(engines, shared):
    a, b, qa, qb = two(engines, shared)
    AutoWorker(a.engine, "other::fn")  # A consumes the queue but lacks the function
    await qa.enqueue("once", "only::on_b", {"x": 1})
    on_b = AutoWorker(b.engine, "only::on_b")
    await wait_for(lambda: on_b.data_of("only::on_b"), what="B to process it")
    assert on_b.data_of("only::on_b") == [{"x": 1}]
    # max_retries is 1: had A spent an attempt, it would be dead-lettered, not run.
    assert await b.engine.call("engine::queue::dlq_topics", {}) == []


@pytest_twisted.ensureDeferred
async def test_retries_then_dead_letter_seen_and_redriven_from_either_engine(
        engines, shared):
    a, b, qa, qb = two(engines, shared)
    failing = Failing(a.engine, "orders::handle")
    receipt = await qb.enqueue("orders", "orders::handle", {"n": 1})
    await wait_for(lambda: len(failing.data_of("orders::handle")) == 3, what="3 attempts")

    async def dlq():
        return await b.engine.call("engine::queue::dlq_messages", {"topic": "orders"})
    await wait_for_async(lambda: dlq(), what="the dead letter")
    [dead] = await dlq()
    assert dead["id"] == receipt and dead["retries"] == 3
    assert dead["error"] == "boom: it failed" and dead["payload"] == {"n": 1}
    assert await a.engine.call("engine::queue::dlq_topics", {}) == [
        {"topic": "orders", "broker_type": "function_queue", "message_count": 1}]

    failing.conn.disconnect()
    ok = AutoWorker(b.engine, "orders::handle")
    assert (await a.engine.call("iii::queue::redrive", {"queue": "orders"}))["redriven"] == 1
    await wait_for(lambda: ok.data_of("orders::handle") == [{"n": 1}], what="redelivery")
    assert await dlq() == []


async def wait_for_async(check, timeout=10.0, what="condition"):
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + timeout
    while not await check():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting for {}".format(what))
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_topic_queue_competing_consumers_on_both_engines(engines, shared):
    a, b, qa, qb = two(engines, shared)
    on_a = AutoWorker(a.engine, "t::consume")
    on_b = AutoWorker(b.engine, "t::consume")
    on_a.trigger("qa", "queue", "t::consume", {"topic": "jobs"})
    on_b.trigger("qb", "queue", "t::consume", {"topic": "jobs"})
    for i in range(40):
        await (a if i % 2 else b).engine.call("enqueue", {"topic": "jobs", "data": i})
    seen = lambda: on_a.data_of("t::consume") + on_b.data_of("t::consume")  # noqa: E731
    await wait_for(lambda: len(seen()) >= 40, what="40 messages")
    assert sorted(seen()) == list(range(40))


@pytest_twisted.ensureDeferred
async def test_enqueue_fails_clearly_when_redis_is_down(engines, own_redis):
    a = engines.start([redis_queue_module(own_redis.url, QUEUES)])
    qa = module_of(a, QueueModule)
    await qa.enqueue("orders", "f", {})
    own_redis.stop()
    try:
        await qa.enqueue("orders", "f", {})
    except InvocationError as e:
        assert e.code == "enqueue_error" and "Redis" in e.message
    else:
        raise AssertionError("enqueue succeeded with Redis down")


@pytest_twisted.ensureDeferred
async def test_durable_publish_reaches_subscribers_on_every_engine(engines, shared):
    a, b, qa, qb = two(engines, shared)
    on_a = AutoWorker(a.engine, "audit::log", "mail::send")
    on_b = AutoWorker(b.engine, "mail::send", "stats::count")
    # Registered as a worker would, awaiting each until its provider has it live
    # (recorded in the broker).
    for service, worker, trigger_id, function_id in [
            (a, on_a, "d1", "audit::log"), (a, on_a, "d2", "mail::send"),
            (b, on_b, "d3", "mail::send"), (b, on_b, "d4", "stats::count")]:
        await service.engine.register_trigger(
            trigger_id, "durable:subscriber", function_id, {"topic": "signup"},
            owner=worker.conn.worker)
    await a.engine.call("iii::durable::publish", {"topic": "signup", "data": {"u": 1}})
    await a.engine.call("iii::durable::publish", {"topic": "signup", "data": "end"})

    def copies(fid):
        return on_a.data_of(fid) + on_b.data_of(fid)
    await wait_for(lambda: all("end" in copies(f) for f in
                               ("audit::log", "mail::send", "stats::count")),
                   what="both messages for each function")
    # One copy per function (the two replicas of mail::send compete for theirs).
    for function_id in ("audit::log", "mail::send", "stats::count"):
        assert sorted(map(str, copies(function_id))) == sorted(map(str, [{"u": 1}, "end"]))
