"""
Members that find each other through a real Redis (the RedisDirectory), in one test
process: links form, and what Redis already makes cluster-wide (pub/sub, the cron
lock) is not doubled by the links.
"""

import pytest_twisted
from twisted.internet import reactor, task

from cluster_helpers import offered, wait_for


def redis_module(kind, redis_url):
    adapter = {"redis_url": redis_url}
    return {
        "pubsub": {"class": "modules::pubsub::PubSubModule", "config": {"adapter": {
            "class": "modules::pubsub::RedisAdapter", "config": adapter}}},
        "cron": {"class": "modules::cron::CronModule", "config": {"adapter": {
            "class": "modules::cron::RedisCronAdapter", "config": adapter}}},
    }[kind]


def start_pair(cluster, redis_url, kind):
    # A second URL for the same Redis gives each member a pool of its own, as two
    # processes would have.
    other = redis_url.replace("127.0.0.1", "localhost")
    return (cluster.start("a", [redis_module(kind, redis_url)], redis_url=redis_url,
                          heartbeat_ms=200, member_ttl_ms=800),
            cluster.start("b", [redis_module(kind, other)], redis_url=other,
                          heartbeat_ms=200, member_ttl_ms=800))


@pytest_twisted.ensureDeferred
async def test_members_find_each_other_in_redis_and_a_leaving_one_goes(cluster, redis_url):
    a, b = start_pair(cluster, redis_url, "pubsub")
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::x", lambda m: "from b")
    await offered(a, "svc::x")
    caller = await cluster.worker(a, "caller")
    assert await caller.call("svc::x") == "from b"
    await cluster.stop(b)  # leaves the directory, closes its links
    await wait_for(lambda: "svc::x" not in a.engine.functions, 3.0, "svc::x to go")
    await wait_for(lambda: a.cluster.links == {} and a.cluster.peers == {}, 3.0,
                   "a to forget b")


@pytest_twisted.ensureDeferred
async def test_a_publish_reaches_each_subscription_once(cluster, redis_url):
    """Redis carries the publish to b's subscription; the links do not add a copy."""
    a, b = start_pair(cluster, redis_url, "pubsub")
    await cluster.linked()
    on_b = await cluster.worker(b, "subscriber")
    on_b.register("sub::orders")
    on_b.trigger("sub-1", "subscribe", "sub::orders", {"topic": "orders"})
    await offered(a, "sub::orders")
    assert "sub-1" not in a.engine.triggers  # subscribe triggers are not offered
    await wait_for(lambda: b.engine.triggers["sub-1"].status == "active",
                   what="the subscription")
    # Probes until the subscription is live in Redis (it confirms asynchronously).
    probes = 0
    while not on_b.invocations:
        probes += 1
        assert probes < 200, "the subscription never received a publish"
        await a.engine.call("publish", {"topic": "orders", "data": "probe-%d" % probes})
        await task.deferLater(reactor, 0.02, lambda: None)
    await a.engine.call("publish", {"topic": "orders", "data": 1})
    await a.engine.call("publish", {"topic": "orders", "data": "marker"})
    await wait_for(lambda: any(m["data"] == "marker" for m in on_b.invocations),
                   what="the marker")
    received = [m["data"] for m in on_b.invocations]
    assert received[-2:] == [1, "marker"]
    assert len(received) == len(set(received))  # nothing arrived twice


@pytest_twisted.ensureDeferred
async def test_cron_fires_once_per_tick_across_members(cluster, redis_url):
    """Replicas of a worker on both members register one job: one run per tick."""
    a, b = start_pair(cluster, redis_url, "cron")
    await cluster.linked()
    replicas = [await cluster.worker(a, "rep-a"), await cluster.worker(b, "rep-b")]
    for i, replica in enumerate(replicas):
        replica.register("job::tick")
        replica.trigger("cron-{}".format(i), "cron", "job::tick",
                        {"expression": "* * * * * *"})
    assert all(t.owner.connection is not None and
               getattr(t.owner.connection, "cluster_peer", None) is None
               for s in (a, b) for t in s.engine.triggers.values()
               if t.trigger_type == "cron")  # cron triggers are not offered

    def ticks():
        return [m["data"]["scheduled_time"] for r in replicas for m in r.invocations]
    await wait_for(lambda: len(ticks()) >= 4, timeout=8, what="4 ticks")
    assert len(ticks()) == len(set(ticks())), ticks()


@pytest_twisted.ensureDeferred
async def test_a_member_starting_without_redis_warns_and_logs_no_failure(cluster):
    """
    Redis down at start is expected input: the member says it is not announced yet and
    that the directory keeps trying; no failure (traceback) is logged.
    """
    import socket

    from iii_twisted.testing import log_lines, logged_failures

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with logged_failures() as failures, log_lines() as lines:
        lone = cluster.start("lone", redis_url="redis://127.0.0.1:{}".format(closed))
        await wait_for(lambda: any("not announced yet" in line for line in lines),
                       timeout=20, what="the warning")
        assert not lone.cluster.directory.healthy
    assert failures == [], [e.get("log_format") for e in failures]
    assert any("the directory keeps trying" in line for line in lines)
