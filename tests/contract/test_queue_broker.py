"""
The L{IQueueBroker} contract, run against every broker: the builtin one (in memory,
and on a file journal) and the shared ones on a real server (tests/brokers.py):
messages handed out, settled, retried, dead-lettered, copied to durable subscribers'
queues, and handed out again when a consumer goes away.

The builtin broker serves one engine: where a case has "another engine" on the same
broker, for the builtin that is the same broker (L{Brokers.another}), and "the next
engine" after one stopped is the next process on the same journal
(L{Brokers.successor}); in memory nothing outlives the broker, and the two cases that
need it say so when they skip.
"""

import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from iii_twisted.interfaces import IQueueBroker
from iii_twisted.modules.queue import Job


async def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting for {}".format(what))
        await task.deferLater(reactor, 0.01, lambda: None)


class Brokers:
    """
    Makes brokers on one server (or journal); stops them after the test.

    @ivar shared: True when several engines share the broker (Redis, RabbitMQ).
    @ivar durable: True when what it holds outlives the broker instance.
    """

    def __init__(self, make, kind):
        self._make = make
        self.kind = kind
        self.shared = kind in ("redis", "rabbitmq")
        self.durable = kind != "memory"
        self.started = []

    async def start(self, **kwargs):
        broker = self._make(**kwargs)
        arrived = []
        broker.arrived = arrived
        await broker.start(arrived.append)
        self.started.append(broker)
        return broker

    async def stop(self, broker):
        if broker in self.started:
            self.started.remove(broker)
            await broker.stop()

    async def another(self, broker, **kwargs):
        """
        @return: a broker for a second engine at the same time: a new one on the same
            server, or, for the builtin broker (one engine's), C{broker} itself.
        """
        if self.shared:
            return await self.start(**kwargs)
        return broker

    async def successor(self, stopped, running=None, **kwargs):
        """
        @return: a broker that takes over after C{stopped} was stopped: C{running}
            (another engine on the shared server), or the next process on the
            builtin broker's journal.
        """
        if self.shared:
            return running
        assert self.durable and stopped not in self.started
        return await self.start(**kwargs)


@pytest.fixture(params=["memory", "file", "redis", "rabbitmq"])
def brokers(request):
    if request.param in ("memory", "file"):
        from iii_twisted.adapters.queue_builtin import BuiltinQueueBroker
        from iii_twisted.adapters.queue_journal import (
            JournalQueueStore, MemoryQueueStore, thread_runner,
        )

        directory = str(request.getfixturevalue("tmp_path") / "journal")

        def make(lease_ms=None):
            # No leases: one process holds the messages it handed out until settled.
            if request.param == "memory":
                return BuiltinQueueBroker(MemoryQueueStore(), reactor, Job.from_record)
            return BuiltinQueueBroker(JournalQueueStore(directory, thread_runner(reactor)),
                                      reactor, Job.from_record)
    elif request.param == "rabbitmq":
        from iii_twisted.adapters.rabbitmq_queue import RabbitMQBroker

        url = request.getfixturevalue("rabbitmq_server").url

        def make(lease_ms=None):
            # No leases: RabbitMQ gives a closed connection's messages back itself.
            return RabbitMQBroker(url, reactor, Job.from_record)
    else:
        from iii_twisted import redis_client
        from iii_twisted.adapters.redis_queue import RedisQueueBroker

        url = request.getfixturevalue("redis_url")

        def make(lease_ms=30000):
            return RedisQueueBroker(redis_client.acquire(url, reactor), reactor,
                                    Job.from_record, lease_ms=lease_ms, poll_interval_ms=20)
    made = Brokers(make, request.param)
    yield made
    pytest_twisted.blockon(defer.gatherResults([b.stop() for b in made.started]))


def job(queue, n, group=None, attempts=0):
    return Job(str(uuid.uuid4()), queue, "fn::x", {"n": n, "l": [], "big": 2 ** 60},
               attempts, 1000 + n, group, "00-trace-01", "k=v")


def queue_name():
    return "q-" + uuid.uuid4().hex[:8]


@pytest_twisted.ensureDeferred
async def test_interface(brokers):
    broker = await brokers.start()
    assert verifyObject(IQueueBroker, broker)


@pytest_twisted.ensureDeferred
async def test_publish_consume_ack(brokers):
    broker = await brokers.start()
    q = queue_name()
    sent = [job(q, i) for i in range(3)]
    for j in sent:
        await broker.publish(j)
    assert (await broker.stats(q))["ready"] == 3
    broker.consume(q, 10, False)
    await wait_for(lambda: len(broker.arrived) == 3, what="3 messages")
    assert [j.record() for j in broker.arrived] == [j.record() for j in sent]
    assert (await broker.stats(q))["in_flight"] == 3
    for j in broker.arrived:
        await broker.ack(j)
    assert await broker.stats(q) == {"ready": 0, "delayed": 0, "in_flight": 0, "dlq": 0}


@pytest_twisted.ensureDeferred
async def test_prefetch_bounds_what_is_handed_out(brokers):
    broker = await brokers.start()
    q = queue_name()
    for i in range(5):
        await broker.publish(job(q, i))
    broker.consume(q, 2, False)
    await wait_for(lambda: len(broker.arrived) == 2)
    await task.deferLater(reactor, 0.1, lambda: None)  # several polls: still 2
    assert len(broker.arrived) == 2
    await broker.ack(broker.arrived[0])
    await wait_for(lambda: len(broker.arrived) == 3, what="a third after an ack")
    assert [j.data["n"] for j in broker.arrived] == [0, 1, 2]


@pytest_twisted.ensureDeferred
async def test_retry_after_delay_and_requeue_keep_attempts(brokers):
    broker = await brokers.start()
    q = queue_name()
    await broker.publish(job(q, 1))
    broker.consume(q, 10, False)
    await wait_for(lambda: broker.arrived)
    first = broker.arrived[0]
    first.attempts = 1
    started = reactor.seconds()
    await broker.retry(first, 300)
    assert (await broker.stats(q))["delayed"] == 1
    await wait_for(lambda: len(broker.arrived) == 2, what="the retry")
    assert reactor.seconds() - started >= 0.25
    assert broker.arrived[1].attempts == 1 and broker.arrived[1].id == first.id
    await broker.requeue(broker.arrived[1], 0)
    await wait_for(lambda: len(broker.arrived) == 3, what="the requeue")
    assert broker.arrived[2].attempts == 1


@pytest_twisted.ensureDeferred
async def test_dead_letters_redrive_and_discard(brokers):
    a = await brokers.start()
    b = await brokers.another(a)
    q = queue_name()
    for i in range(3):
        await a.publish(job(q, i))
    a.consume(q, 10, False)
    await wait_for(lambda: len(a.arrived) == 3)
    for j in a.arrived:
        j.attempts = 3
        await a.dead(j, "boom: failed", 5000 + j.data["n"])
    dead = await b.dlq_messages(q)  # visible from any engine
    assert [(j.data["n"], j.attempts, error, at) for j, error, at in dead] == \
        [(0, 3, "boom: failed", 5000), (1, 3, "boom: failed", 5001),
         (2, 3, "boom: failed", 5002)]
    for _ in range(3):  # listing takes nothing away, even right after a listing
        assert [j.id for j, _, _ in await b.dlq_messages(q)] == [j.id for j, _, _ in dead]
    assert (await b.dlq_queues()).get(q) == 3
    assert await b.redrive(q, [dead[0][0].id]) == [dead[0][0].id]
    await wait_for(lambda: len(a.arrived) == 4, what="the redriven message")
    assert a.arrived[3].attempts == 0 and a.arrived[3].data["n"] == 0
    assert await b.discard(q, None) == [dead[1][0].id, dead[2][0].id]
    assert await b.dlq_messages(q) == []
    assert q not in await b.dlq_queues()


@pytest_twisted.ensureDeferred
async def test_fifo_hands_out_one_per_group_in_order_across_consumers(brokers):
    """
    Redis only: RabbitMQ's FIFO is one consumer at a time, prefetch 1, in publish
    order across all groups (docs/scale-out.rst); test_fifo_total_order and
    test_fifo_retry_keeps_its_place cover it.
    """
    if brokers.kind == "rabbitmq":
        pytest.skip("RabbitMQ FIFO is total order, not one message per group at once "
                    "(documented); see test_fifo_total_order")
    arrivals = []  # (broker, job) in the order they arrived, on either consumer
    a = await brokers.start()
    b = await brokers.another(a)
    a._arrived = lambda j: arrivals.append((a, j))
    b._arrived = lambda j: arrivals.append((b, j))
    q = queue_name()
    for n, group in [(1, "g"), (2, "g"), (3, "h"), (4, "g"), (5, "h")]:
        await a.publish(job(q, n, group))
    a.consume(q, 10, True)
    b.consume(q, 10, True)

    def numbers():
        return [(j.data["n"], j.attempts) for _, j in arrivals]

    async def settle(n, how, *args):
        broker, j = [(br, j) for br, j in arrivals if j.data["n"] == n][-1]
        await getattr(broker, how)(j, *args)

    await wait_for(lambda: len(arrivals) == 2, what="one message per group")
    await task.deferLater(reactor, 0.1, lambda: None)  # several polls on both
    assert sorted(numbers()) == [(1, 0), (3, 0)]
    # A retry keeps its group: 2 must not overtake 1.
    [(holder, one)] = [(br, j) for br, j in arrivals if j.data["n"] == 1]
    await holder.retry(Job.from_record(dict(one.record(), attempts=1)), 100)
    await settle(3, "ack")
    await wait_for(lambda: (1, 1) in numbers() and (5, 0) in numbers(),
                   what="1 retried and 5")
    assert 2 not in [n for n, _ in numbers()]
    await settle(1, "ack")
    await wait_for(lambda: 2 in [n for n, _ in numbers()], what="2")
    assert 4 not in [n for n, _ in numbers()]
    await settle(2, "ack")
    await settle(5, "ack")
    await wait_for(lambda: 4 in [n for n, _ in numbers()], what="4")
    await settle(4, "ack")
    groups = {}
    for _, j in arrivals:
        groups.setdefault(j.group, []).append(j.data["n"])
    assert groups == {"g": [1, 1, 2, 4], "h": [3, 5]}


def skip_unless_durable(brokers):
    if not brokers.durable:
        pytest.skip("store_method in_memory: nothing outlives the builtin broker (the "
                    "file journal runs this case)")


@pytest_twisted.ensureDeferred
async def test_unsettled_messages_go_to_another_consumer(brokers):
    skip_unless_durable(brokers)
    a = await brokers.start(lease_ms=300)
    b = await brokers.start(lease_ms=300) if brokers.shared else None
    q = queue_name()
    for i in range(4):
        await a.publish(job(q, i))
    a.consume(q, 10, False)
    await wait_for(lambda: len(a.arrived) == 4)
    await brokers.stop(a)  # as if killed: nothing settled
    b = await brokers.successor(a, b, lease_ms=300)
    b.consume(q, 10, False)
    await wait_for(lambda: len(b.arrived) == 4, what="the lapsed messages on b")
    assert sorted(j.data["n"] for j in b.arrived) == [0, 1, 2, 3]


@pytest_twisted.ensureDeferred
async def test_what_a_broker_holds_outlives_it(brokers):
    """Acks, attempts and dead letters are the next engine's to see."""
    skip_unless_durable(brokers)
    a = await brokers.start(lease_ms=300)
    b = await brokers.start(lease_ms=300) if brokers.shared else None
    q = queue_name()
    for i in range(4):
        await a.publish(job(q, i))
    a.consume(q, 10, False)
    await wait_for(lambda: len(a.arrived) == 4)
    acked, retried, dead, unsettled = a.arrived
    await a.ack(acked)
    retried.attempts = 1
    await a.retry(retried, 100)
    dead.attempts = 3
    await a.dead(dead, "boom: failed", 5000)
    await brokers.stop(a)  # the last one unsettled
    b = await brokers.successor(a, b, lease_ms=300)
    b.consume(q, 10, False)
    await wait_for(lambda: len(b.arrived) == 2, what="the retried and unsettled messages")
    assert sorted((j.data["n"], j.attempts) for j in b.arrived) == [(1, 1), (3, 0)]
    assert [(j.data["n"], j.attempts, error, at)
            for j, error, at in await b.dlq_messages(q)] == [(2, 3, "boom: failed", 5000)]
    for j in b.arrived:
        await b.ack(j)
    assert (await b.stats(q))["dlq"] == 1


@pytest_twisted.ensureDeferred
async def test_held_messages_are_not_handed_out_again(brokers):
    """
    A message held by a consumer is not handed out again while it holds it: a shared
    broker's lease is renewed meanwhile (several leases pass here); the builtin one
    has no leases.
    """
    a = await brokers.start(lease_ms=300)
    b = await brokers.another(a, lease_ms=300)
    q = queue_name()
    await a.publish(job(q, 1))
    a.consume(q, 10, False)
    await wait_for(lambda: a.arrived)
    b.consume(q, 10, False)
    await task.deferLater(reactor, 1.0, lambda: None)  # > 3 leases: a keeps renewing
    assert len(a.arrived) == 1
    assert b is a or b.arrived == []
    await a.ack(a.arrived[0])


@pytest_twisted.ensureDeferred
async def test_fanout_copies_to_every_subscribed_queue(brokers):
    """
    A durable publish puts one copy in each queue added for its topic. After
    remove_fanout, a shared broker keeps copying (another engine may subscribe the
    queue; a durable subscription collects while its subscriber is away); the
    builtin broker, whose subscriptions are its one engine's, stops.
    """
    broker = await brokers.start()
    topic, q1, q2 = queue_name(), queue_name(), queue_name()
    await broker.add_fanout(topic, q1)
    await broker.add_fanout(topic, q2)
    await broker.publish_fanout(topic, job("__durable::" + topic + "::", 1))
    broker.consume(q1, 10, False)
    broker.consume(q2, 10, False)
    await wait_for(lambda: len(broker.arrived) == 2, what="a copy in each queue")
    assert sorted((j.queue, j.data["n"]) for j in broker.arrived) == sorted(
        [(q1, 1), (q2, 1)])
    for j in broker.arrived:
        await broker.ack(j)
    await broker.remove_fanout(topic, q2)
    await broker.publish_fanout(topic, job("__durable::" + topic + "::", 2))
    expected = [(q1, 2), (q2, 2)] if brokers.shared else [(q1, 2)]
    await wait_for(lambda: len(broker.arrived) == 2 + len(expected), what="the copies")
    await task.deferLater(reactor, 0.1, lambda: None)  # and no more
    assert sorted((j.queue, j.data["n"]) for j in broker.arrived[2:]) == sorted(expected)
    for j in broker.arrived[2:]:
        await broker.ack(j)


@pytest_twisted.ensureDeferred
async def test_local_counts(brokers):
    """
    What this process holds, read without I/O: everything for the builtin broker
    (its counts agree with stats), nothing for a shared one.
    """
    broker = await brokers.start()
    q = queue_name()
    for i in range(3):
        await broker.publish(job(q, i))
    broker.consume(q, 2, False)
    await wait_for(lambda: len(broker.arrived) == 2)
    first, second = broker.arrived
    first.attempts = 1
    await broker.retry(first, 60000)
    second.attempts = 3
    await broker.dead(second, "boom", 5000)
    await wait_for(lambda: len(broker.arrived) == 3)
    stats = await broker.stats(q)
    if brokers.shared:
        assert broker.local_queues() == []
        assert broker.local_counts(q) == {"ready": 0, "delayed": 0, "dlq": 0}
    else:
        assert q in broker.local_queues()
        assert broker.local_counts(q) == {"ready": 0, "delayed": 1, "dlq": 1} == {
            key: stats[key] for key in ("ready", "delayed", "dlq")}
    await broker.ack(broker.arrived[2])


@pytest_twisted.ensureDeferred
async def test_fifo_total_order(brokers):
    """FIFO: one message at a time, in publish order, with consumers on two engines."""
    arrivals = []
    a = await brokers.start()
    b = await brokers.another(a)
    a._arrived = lambda j: arrivals.append((a, j))
    b._arrived = lambda j: arrivals.append((b, j))
    q = queue_name()
    for n in range(1, 6):
        await a.publish(job(q, n, "g"))
    a.consume(q, 1, True)
    b.consume(q, 1, True)
    for expected in range(1, 6):
        await wait_for(lambda: len(arrivals) == expected, what="message {}".format(expected))
        await task.deferLater(reactor, 0.05, lambda: None)
        assert len(arrivals) == expected  # one at a time
        broker, j = arrivals[-1]
        assert j.data["n"] == expected
        await broker.ack(j)


@pytest_twisted.ensureDeferred
async def test_fifo_retry_keeps_its_place(brokers):
    """In a FIFO queue, a message being retried is not overtaken by the next one."""
    arrivals = []
    a = await brokers.start()
    b = await brokers.another(a)
    a._arrived = lambda j: arrivals.append((a, j))
    b._arrived = lambda j: arrivals.append((b, j))
    q = queue_name()
    for n in (1, 2):
        await a.publish(job(q, n, "g"))
    a.consume(q, 1, True)
    b.consume(q, 1, True)
    await wait_for(lambda: len(arrivals) == 1, what="the first message")
    holder, first = arrivals[0]
    assert first.data["n"] == 1
    await holder.retry(Job.from_record(dict(first.record(), attempts=1)), 200)
    await wait_for(lambda: len(arrivals) == 2, what="the retry")
    assert [(j.data["n"], j.attempts) for _, j in arrivals] == [(1, 0), (1, 1)]
    broker, again = arrivals[1]
    await broker.ack(again)
    await wait_for(lambda: len(arrivals) == 3, what="the second message")
    assert arrivals[2][1].data["n"] == 2
    await arrivals[2][0].ack(arrivals[2][1])


@pytest_twisted.ensureDeferred
async def test_fifo_messages_without_a_group_are_one_group(brokers):
    """
    A FIFO topic queue's messages have no group: they are one group, handed out one
    at a time in order, a retry holding the line.
    """
    arrivals = []
    a = await brokers.start()
    b = await brokers.another(a)
    a._arrived = lambda j: arrivals.append((a, j))
    b._arrived = lambda j: arrivals.append((b, j))
    q = queue_name()
    for n in (1, 2, 3):
        await a.publish(job(q, n))
    a.consume(q, 5, True)
    b.consume(q, 5, True)
    await wait_for(lambda: len(arrivals) == 1, what="the first message")
    await task.deferLater(reactor, 0.1, lambda: None)
    assert len(arrivals) == 1
    holder, first = arrivals[0]
    await holder.retry(Job.from_record(dict(first.record(), attempts=1)), 100)
    for expected in [(1, 1), (2, 0), (3, 0)]:
        await wait_for(lambda: (arrivals[-1][1].data["n"],
                                arrivals[-1][1].attempts) == expected,
                       what="message {}".format(expected))
        await task.deferLater(reactor, 0.05, lambda: None)
        broker, j = arrivals[-1]
        assert (j.data["n"], j.attempts) == expected
        await broker.ack(j)
    assert [(j.data["n"], j.attempts) for _, j in arrivals] == [(1, 0), (1, 1), (2, 0),
                                                                (3, 0)]
