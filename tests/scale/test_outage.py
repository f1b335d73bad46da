"""
Redis restarted under two running engines: calls made while it is down fail with a
clear error within the client's timeout (never hang), and state, pub/sub, cron and
stream pushes resume by themselves once it is back, without an engine restart.
"""

import pytest
import pytest_twisted
from twisted.internet import reactor

from engines import (
    AutoWorker, module_of, other_pool, rabbitmq_queue_module, redis_modules,
    redis_queue_module, stream_client, stream_port, wait_for,
)
from iii_twisted.modules.queue import QueueModule
from iii_twisted.protocol import InvocationError

ALL = ("state", "stream", "pubsub", "cron")


async def eventually(call, timeout=10.0):
    """@return: the result of C{call()} once it stops failing (bounded by C{timeout})."""
    from twisted.internet import task

    deadline = reactor.seconds() + timeout
    while True:
        try:
            return await call()
        except InvocationError:
            if reactor.seconds() > deadline:
                raise
            await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_everything_resumes_after_a_redis_restart(engines, own_redis):
    a = engines.start(redis_modules(own_redis.url, *ALL)
                      + [redis_queue_module(own_redis.url, {"q": {}})])
    b = engines.start(redis_modules(other_pool(own_redis.url), *ALL)
                      + [redis_queue_module(other_pool(own_redis.url), {"q": {}})])
    on_a = AutoWorker(a.engine, "sub::a", "job::tick", "q::work")
    on_b = AutoWorker(b.engine, "sub::b", "job::tick")
    on_a.trigger("ta", "subscribe", "sub::a", {"topic": "news"})
    on_b.trigger("tb", "subscribe", "sub::b", {"topic": "news"})
    on_a.trigger("ca", "cron", "job::tick", {"expression": "* * * * * *"})
    on_b.trigger("cb", "cron", "job::tick", {"expression": "* * * * * *"})
    client = await stream_client(await stream_port(b))
    client.join("s1", "s", "g")
    await a.engine.call("state::set", {"scope": "s", "key": "k", "value": 1})
    await wait_for(lambda: client.events("sync") and on_a.calls + on_b.calls,
                   what="a sync and a cron run")

    own_redis.stop()
    started = reactor.seconds()
    with pytest.raises(InvocationError) as info:
        await a.engine.call("state::get", {"scope": "s", "key": "k"})
    assert "Redis" in info.value.message
    assert reactor.seconds() - started < 8  # the client's 5 s timeout, not a hang
    with pytest.raises(InvocationError) as info:
        await b.engine.call("publish", {"topic": "news", "data": "lost"})
    assert info.value.code == "publish_failed" and "Redis" in info.value.message

    own_redis.start()  # same port, empty (no persistence)
    restarted = reactor.seconds()
    await eventually(lambda: a.engine.call("state::set",
                                           {"scope": "s", "key": "k", "value": 2}))
    assert await b.engine.call("state::get", {"scope": "s", "key": "k"}) == 2

    def ticks():
        return len(on_a.data_of("job::tick") + on_b.data_of("job::tick"))
    ticks_before = ticks()
    # Subscriptions come back: publish until both engines' subscribers hear one.
    async def heard():
        await a.engine.call("publish", {"topic": "news", "data": "back"})
        if not ("back" in on_a.data_of("sub::a") and "back" in on_b.data_of("sub::b")):
            raise InvocationError("not_yet", "not heard yet")
    await eventually(heard)
    async def pushed():
        await a.engine.call("stream::set", {"stream_name": "s", "group_id": "g",
                                            "item_id": "i", "data": "back"})
        if not client.events("create") and not client.events("update"):
            raise InvocationError("not_yet", "no push yet")
    await eventually(pushed)
    await wait_for(lambda: ticks() >= ticks_before + 2, what="cron firing again")
    # Queues: consumers resume by themselves.
    await eventually(lambda: module_of(b, QueueModule).enqueue("q", "q::work", "back"))
    await wait_for(lambda: "back" in on_a.data_of("q::work"), what="a queued message")
    assert reactor.seconds() - restarted < 10
    assert "lost" not in on_a.data_of("sub::a") + on_b.data_of("sub::b")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_rabbitmq_restart_keeps_messages_and_consumers_resume(engines):
    import brokers

    server = brokers.start_rabbitmq()
    try:
        a = engines.start([rabbitmq_queue_module(server.url, {"q": {}})])
        queue = module_of(a, QueueModule)
        # No engine has the function yet: the message waits, durably, in RabbitMQ.
        await queue.enqueue("q", "q::late", {"n": 1})
        server.stop()
        started = reactor.seconds()
        with pytest.raises(InvocationError) as info:
            await queue.enqueue("q", "q::late", {"n": 2})
        assert info.value.code == "enqueue_error" and "RabbitMQ" in info.value.message
        assert reactor.seconds() - started < 8
        # Same ports and data: durable queues and messages are kept. (A node can fail
        # to boot on a busy machine; its ports must stay the engines', so try again.)
        for attempt in range(3):
            try:
                server.start()
                break
            except RuntimeError:
                server.stop()
                if attempt == 2:
                    raise
        await eventually(lambda: queue.enqueue("q", "q::late", {"n": 3}), timeout=30)
        worker = AutoWorker(a.engine, "q::late")
        await wait_for(lambda: sorted(d["n"] for d in worker.data_of("q::late")) == [1, 3],
                       timeout=20, what="the kept message and the new one")
    finally:
        await engines.stop_all()
        server.close()
