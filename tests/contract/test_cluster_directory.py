"""
The L{IClusterDirectory} contract, run on L{MemoryDirectory} and on L{RedisDirectory}
(a real redis-server from tests/brokers.py; skipped without one, saying how to get it,
and failed under CI=true). Then what only the Redis directory has: TTLs on a real
clock, Redis outages and restarts, and bad data in Redis.
"""

import json
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from zope.interface.verify import verifyObject

from iii_twisted.cluster.directory import (
    IClusterDirectory, MemoryDirectory, MemoryRegistry, Member,
)
from iii_twisted.health import cluster_status
from iii_twisted.testing import wait_for

# Short, so that the tests wait little; the bound of a crashed member's detection is
# TTL + HEARTBEAT (plus the time one Redis round trip takes under load).
HEARTBEAT = 0.25
TTL = 1.0
ROUND_TRIP = 1.0


class Watcher:
    """An observer recording what the directory told it."""

    def __init__(self):
        self.joined = []
        self.left = []

    def member_joined(self, member):
        self.joined.append(member)

    def member_left(self, member):
        self.left.append(member)

    def joined_ids(self):
        return [m.engine_id for m in self.joined]

    def left_ids(self):
        return [m.engine_id for m in self.left]


def new_member(name):
    return Member(uuid.uuid4().hex, "tcp:127.0.0.1:{}".format(40000 + len(name)), name,
                  started_at_ms=1)


class MemoryCluster:
    """Makes L{MemoryDirectory}s sharing one registry."""

    crash_bound = 0.01  # expire() tells the others synchronously

    def __init__(self):
        self.registry = MemoryRegistry()

    def make(self):
        return MemoryDirectory(self.registry)

    async def crash(self, directory):
        self.registry.expire(directory.me.engine_id)


class RedisCluster:
    """Makes L{RedisDirectory}s on one redis-server."""

    crash_bound = TTL + HEARTBEAT + ROUND_TRIP

    def __init__(self, url):
        self.url = url

    def make(self, prefix="iii:cluster:", own_pool=False):
        """
        @param own_pool: reach Redis through a pool of its own (C{localhost} rather
            than C{127.0.0.1}), which reconnects on its own schedule as another
            process's would.
        """
        from iii_twisted.cluster.redis_directory import RedisDirectory

        url = self.url.replace("127.0.0.1", "localhost") if own_pool else self.url
        return RedisDirectory(url, reactor, heartbeat_interval=HEARTBEAT, ttl=TTL,
                              prefix=prefix)

    async def crash(self, directory):
        """Stop heartbeating without a word, as a kill -9 would."""
        if directory._beating is not None:
            await directory._beating
        directory._loop.stop()
        directory._loop = None
        client = directory._client
        client.unsubscribe(directory.channel, directory._event)
        directory.me = directory._observer = directory._client = None
        await client.release()


@pytest.fixture(params=["memory", "redis"])
def cluster(request):
    if request.param == "memory":
        made = MemoryCluster()
    else:
        made = RedisCluster(request.getfixturevalue("redis_url"))
    joined = []
    make = made.make

    def tracking_make(*args, **kwargs):
        directory = make(*args, **kwargs)
        joined.append(directory)
        return directory
    made.make = tracking_make
    yield made
    for directory in joined:
        pytest_twisted.blockon(directory.leave())


async def join(cluster, name, phase=0.0, **kwargs):
    """
    @param phase: seconds to wait first, so that this member's heartbeats fall between
        those of the members joined before it (as they do between machines), rather
        than at the same instant.
    @return: (directory, its member, its watcher), joined.
    """
    if phase:
        await task.deferLater(reactor, phase, lambda: None)
    directory = cluster.make(**kwargs)
    member, watcher = new_member(name), Watcher()
    await directory.join(member, watcher)
    return directory, member, watcher


@pytest_twisted.ensureDeferred
async def test_provides_interface(cluster):
    directory = cluster.make()
    assert verifyObject(IClusterDirectory, directory)
    assert directory.healthy
    assert directory.members() == {}


@pytest_twisted.ensureDeferred
async def test_join_and_leave_seen_by_the_others(cluster):
    """Each member hears of the others (those already there, those joining later),
    never of itself; a leave is heard by the rest."""
    a, ma, wa = await join(cluster, "a")
    assert a.members() == {} and wa.joined == []
    b, mb, wb = await join(cluster, "b")
    await wait_for(lambda: wa.joined_ids() == [mb.engine_id], what="a hears of b")
    assert wb.joined_ids() == [ma.engine_id]  # already there when b joined
    assert a.members() == {mb.engine_id: mb}
    assert b.members() == {ma.engine_id: ma}
    assert wa.joined[0].address == mb.address and wa.joined[0].name == "b"
    c, mc, wc = await join(cluster, "c")
    await wait_for(lambda: len(wa.joined) == 2 and len(wb.joined) == 2,
                   what="a and b hear of c")
    assert sorted(wc.joined_ids()) == sorted([ma.engine_id, mb.engine_id])
    assert set(c.members()) == {ma.engine_id, mb.engine_id}

    await b.leave()
    await wait_for(lambda: wa.left_ids() == [mb.engine_id] and wc.left_ids() == [mb.engine_id],
                   what="a and c hear b leave")
    assert set(a.members()) == {mc.engine_id}
    assert b.members() == {}
    assert wb.left == []  # a leaving member is told nothing more
    # Nobody was told twice, nobody heard of itself.
    assert sorted(wa.joined_ids()) == sorted([mb.engine_id, mc.engine_id])
    assert ma.engine_id not in wa.joined_ids() + wa.left_ids()


@pytest_twisted.ensureDeferred
async def test_leave_is_idempotent(cluster):
    a, ma, wa = await join(cluster, "a")
    b, mb, wb = await join(cluster, "b")
    await wait_for(lambda: wa.joined, what="a hears of b")
    await b.leave()
    await b.leave()
    await wait_for(lambda: wa.left, what="a hears b leave")
    assert wa.left_ids() == [mb.engine_id]
    never = cluster.make()
    await never.leave()  # never joined: nothing to do


@pytest_twisted.ensureDeferred
async def test_crashed_member_reported_left_within_ttl_and_heartbeat(cluster):
    """A member that stops heartbeating without leaving is reported gone within the
    bound (for Redis: its key's TTL plus one heartbeat of the listener)."""
    a, ma, wa = await join(cluster, "a")
    b, mb, wb = await join(cluster, "b")
    await wait_for(lambda: wa.joined, what="a hears of b")
    crashed_at = reactor.seconds()
    await cluster.crash(b)
    await wait_for(lambda: wa.left, timeout=cluster.crash_bound + 5,
                   what="a hears b is gone")
    elapsed = reactor.seconds() - crashed_at
    assert wa.left_ids() == [mb.engine_id]
    assert a.members() == {}
    assert elapsed <= cluster.crash_bound, elapsed


@pytest_twisted.ensureDeferred
async def test_restart_with_new_engine_id_is_a_new_member(cluster):
    a, ma, wa = await join(cluster, "a")
    b, mb, wb = await join(cluster, "b")
    await wait_for(lambda: wa.joined, what="a hears of b")
    await cluster.crash(b)
    await wait_for(lambda: wa.left, timeout=cluster.crash_bound + 5, what="b gone")
    again = Member(uuid.uuid4().hex, mb.address, "b", started_at_ms=2)
    b2 = cluster.make()
    await b2.join(again, Watcher())
    await wait_for(lambda: len(wa.joined) == 2, what="a hears of the new b")
    assert wa.joined_ids() == [mb.engine_id, again.engine_id]
    assert a.members() == {again.engine_id: again}


@pytest_twisted.ensureDeferred
async def test_a_failing_observer_does_not_stop_the_directory(cluster):
    class Broken(Watcher):
        def member_joined(self, member):
            Watcher.member_joined(self, member)
            raise RuntimeError("observer bug")

    a = cluster.make()
    broken = Broken()
    await a.join(new_member("a"), broken)
    b, mb, wb = await join(cluster, "b")
    c, mc, wc = await join(cluster, "c")
    await wait_for(lambda: len(broken.joined) == 2, what="a hears of b and c")
    await b.leave()
    await wait_for(lambda: broken.left_ids() == [mb.engine_id], what="a hears b leave")


# -- the Redis directory only ---------------------------------------------------------


@pytest.fixture
def redis_cluster(redis_url):
    made = RedisCluster(redis_url)
    made.directories = []
    make = made.make

    def tracking_make(*args, **kwargs):
        directory = make(*args, **kwargs)
        made.directories.append(directory)
        return directory
    made.make = tracking_make
    yield made
    for directory in made.directories:
        pytest_twisted.blockon(directory.leave())


@pytest.fixture
def own_cluster(own_redis):
    """A L{RedisCluster} on a redis-server of the test's own (to stop and restart)."""
    made = RedisCluster(own_redis.url)
    made.server = own_redis
    made.directories = []
    make = made.make

    def tracking_make(*args, **kwargs):
        directory = make(*args, **kwargs)
        made.directories.append(directory)
        return directory
    made.make = tracking_make
    yield made
    if own_redis.process is None:
        own_redis.start()  # so that leave() does not wait out the client's timeout
    for directory in made.directories:
        pytest_twisted.blockon(directory.leave())


def test_ttl_must_exceed_heartbeat():
    from iii_twisted.cluster.redis_directory import RedisDirectory

    with pytest.raises(ValueError, match="longer than the heartbeat"):
        RedisDirectory("redis://127.0.0.1:1", reactor, heartbeat_interval=3, ttl=3)
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisDirectory("http://x", reactor)


@pytest_twisted.ensureDeferred
async def test_key_has_ttl_and_leave_deletes_it(redis_cluster, redis_server):
    """The member is one key, SET with PX ttl and refreshed, and its id in the index
    set; leave deletes both."""
    a, ma, wa = await join(redis_cluster, "a")
    key = "iii:cluster:member:" + ma.engine_id
    stored = json.loads(await a._client.execute("GET", key))
    assert stored == ma.as_dict()
    assert await a._client.execute("SMEMBERS", "iii:cluster:members") == [ma.engine_id]
    pttl = await a._client.execute("PTTL", key)
    assert 0 < pttl <= TTL * 1000
    # Past several TTLs, the heartbeat keeps it there.
    await task.deferLater(reactor, TTL * 2, lambda: None)  # the TTL itself is under test
    assert await a._client.execute("EXISTS", key) == 1
    await a.leave()
    assert redis_server.command("EXISTS", key) == ":0"
    assert redis_server.command("SCARD", "iii:cluster:members") == ":0"


@pytest_twisted.ensureDeferred
async def test_prefixes_keep_clusters_apart(redis_cluster):
    a, ma, wa = await join(redis_cluster, "a", prefix="one:")
    b, mb, wb = await join(redis_cluster, "b", prefix="two:")
    c, mc, wc = await join(redis_cluster, "c", prefix="one:")
    await wait_for(lambda: wa.joined, what="a hears of c")
    await b.when_reconciled()
    await a.when_reconciled()
    assert a.members() == {mc.engine_id: mc}
    assert b.members() == {}


@pytest_twisted.ensureDeferred
async def test_missed_event_found_by_the_listing(redis_cluster):
    """A member whose join event was never heard (its key written directly) is found
    by the next listing, and reported gone once its key expires."""
    a, ma, wa = await join(redis_cluster, "a")
    ghost = new_member("ghost")
    await a._client.execute("SET", "iii:cluster:member:" + ghost.engine_id,
                            json.dumps(ghost.as_dict()), "PX", int(TTL * 1000))
    await a._client.execute("SADD", "iii:cluster:members", ghost.engine_id)
    await wait_for(lambda: wa.joined_ids() == [ghost.engine_id], timeout=HEARTBEAT + 5,
                   what="a lists the ghost")
    await wait_for(lambda: wa.left_ids() == [ghost.engine_id],
                   timeout=redis_cluster.crash_bound + 5, what="the ghost expires")
    # Whoever lists the index after the key expired takes the id out of it.
    assert await a._client.execute("SISMEMBER", "iii:cluster:members",
                                   ghost.engine_id) == 0


@pytest_twisted.ensureDeferred
async def test_bad_data_is_ignored(redis_cluster):
    """A malformed event or member key is logged and dropped; the rest carries on."""
    a, ma, wa = await join(redis_cluster, "a")
    await a._client.execute("SET", "iii:cluster:member:junk", "{not json")
    await a._client.execute("SET", "iii:cluster:member:partial", json.dumps({"x": 1}))
    await a._client.execute("SADD", "iii:cluster:members", "junk", "partial")
    for message in ("{not json", json.dumps({"event": "join"}),
                    json.dumps({"event": "dance", "member": new_member("z").as_dict()}),
                    json.dumps([1, 2])):
        await a._client.publish(a.channel, message)
    await a.when_reconciled()
    await a.when_reconciled()
    assert a.healthy and a.members() == {} and wa.joined == []
    b, mb, wb = await join(redis_cluster, "b")
    await wait_for(lambda: wa.joined_ids() == [mb.engine_id], what="a hears of b")


@pytest_twisted.ensureDeferred
async def test_data_loss_without_outage_reports_no_false_leave(redis_cluster, redis_server):
    """Redis loses every key between two heartbeats (FLUSHALL, a restart without
    persistence the connections did not notice): the members re-announce themselves
    and nobody is reported gone."""
    a, ma, wa = await join(redis_cluster, "a")
    b, mb, wb = await join(redis_cluster, "b", phase=HEARTBEAT / 2)
    await wait_for(lambda: wa.joined and wb.joined, what="a and b know each other")
    assert redis_server.command("FLUSHALL") == "+OK"
    await wait_for(lambda: a._grace_until and b._grace_until, timeout=5,
                   what="both noticed the data loss")
    await wait_for(lambda: reactor.seconds() > max(a._grace_until, b._grace_until),
                   timeout=10, what="the grace period to end")
    for _ in range(2):
        await a.when_reconciled()
        await b.when_reconciled()
    assert wa.left == [] and wb.left == []
    assert a.members() == {mb.engine_id: mb} and b.members() == {ma.engine_id: ma}
    assert redis_server.command("EXISTS", "iii:cluster:member:" + ma.engine_id) == ":1"


@pytest_twisted.ensureDeferred
async def test_redis_restart(own_cluster):
    """Redis dies: healthy goes False, nobody is dropped; a member crashes meanwhile.
    Redis comes back (empty): healthy goes True, the living are announced again and
    never reported gone, the crashed one is, and a newcomer is heard by all."""
    from twisted.logger import globalLogPublisher

    logged = []

    def observe(event):
        if event.get("log_namespace", "").endswith("RedisDirectory"):
            logged.append(event)
    globalLogPublisher.addObserver(observe)
    try:
        await _redis_restart(own_cluster, logged)
    finally:
        globalLogPublisher.removeObserver(observe)


async def _redis_restart(own_cluster, logged):
    a, ma, wa = await join(own_cluster, "a")
    b, mb, wb = await join(own_cluster, "b", phase=HEARTBEAT / 3, own_pool=True)
    d, md, wd = await join(own_cluster, "d", phase=HEARTBEAT / 3)
    await wait_for(lambda: len(wa.joined) == 2 and len(wb.joined) == 2,
                   what="everyone knows everyone")
    assert cluster_status(a) == {"directory": "ok", "members": 2}

    own_cluster.server.stop()
    await wait_for(lambda: not a.healthy and not b.healthy, timeout=HEARTBEAT + 5,
                   what="a and b see Redis gone")
    assert cluster_status(a) == {"directory": "unreachable", "members": 2}
    await own_cluster.crash(d)
    # Several TTLs pass with Redis down: the members known stay known.
    await task.deferLater(reactor, TTL * 2, lambda: None)  # the outage itself is under test
    assert set(a.members()) == {mb.engine_id, md.engine_id} and wa.left == []

    own_cluster.server.start()  # same port, no data
    await wait_for(lambda: a.healthy and b.healthy, timeout=10,
                   what="a and b see Redis back")
    c, mc, wc = await join(own_cluster, "c")
    await wait_for(lambda: mc.engine_id in a.members() and mc.engine_id in b.members(),
                   what="a and b hear of c")
    assert sorted(wc.joined_ids()) == sorted([ma.engine_id, mb.engine_id])
    await wait_for(lambda: wa.left_ids() == [md.engine_id] and wb.left_ids() == [md.engine_id],
                   timeout=TTL + HEARTBEAT + 2.0 + 10, what="the crashed d reported gone")
    assert set(a.members()) == {mb.engine_id, mc.engine_id}
    assert set(b.members()) == {ma.engine_id, mc.engine_id}
    assert wa.left_ids() == [md.engine_id] and wb.left_ids() == [md.engine_id]
    # Said once each way, in words an operator can act on.
    about_a = [e for e in logged if e.get("engine_id") == ma.engine_id]
    assert [e["log_level"].name for e in about_a] == ["warn", "info"], about_a
    assert "keeps serving its own workers" in about_a[0]["log_format"]
    assert "answers again" in about_a[1]["log_format"]


@pytest_twisted.ensureDeferred
async def test_join_while_redis_is_down(own_cluster):
    """join fails with RedisUnavailable, the directory is unhealthy and keeps trying:
    once Redis is up the member is announced and heard by the others."""
    from iii_twisted.redis_client import RedisUnavailable

    own_cluster.server.stop()
    a = own_cluster.make()
    ma, wa = new_member("a"), Watcher()
    joining = a.join(ma, wa)
    # Unhealthy from the first heartbeat, not only once the client's timeout is out.
    await wait_for(lambda: not a.healthy, timeout=HEARTBEAT + 1.0,
                   what="a to see Redis unreachable")
    assert not joining.called
    with pytest.raises(RedisUnavailable):
        await joining
    assert not a.healthy
    own_cluster.server.start()
    await wait_for(lambda: a.healthy, timeout=10, what="a reaches Redis")
    b, mb, wb = await join(own_cluster, "b")
    await wait_for(lambda: wa.joined_ids() == [mb.engine_id], what="a hears of b")
    assert wb.joined_ids() == [ma.engine_id]
