"""Streams on Redis: items and pushes shared by two engines in one process."""

import pytest_twisted

from engines import stream_client, stream_port, wait_for


@pytest_twisted.ensureDeferred
async def test_changes_on_a_reach_a_client_joined_on_b_in_order(engines, redis_url):
    a, b = engines.two_on_redis(redis_url, "stream")
    client = await stream_client(await stream_port(b))
    client.join("sub-1", "chat", "room")
    await wait_for(lambda: client.events("sync"), what="the join's sync")

    for i in range(100):
        await a.engine.call("stream::set", {"stream_name": "chat", "group_id": "room",
                                            "item_id": "m{}".format(i), "data": {"n": i}})
    await a.engine.call("stream::send", {"stream_name": "chat", "group_id": "room",
                                         "type": "typing", "data": {"who": "ann"}})
    await wait_for(lambda: client.events("event"), what="the custom event")
    assert [e["data"]["n"] for e in client.events("create")] == list(range(100))
    assert client.events("event") == [{"type": "event",
                                       "event": {"type": "typing", "data": {"who": "ann"}}}]
    # The items are shared too.
    items = await b.engine.call("stream::list", {"stream_name": "chat", "group_id": "room"})
    assert [item["n"] for item in items] == list(range(100))
    assert await b.engine.call("stream::list_groups", {"stream_name": "chat"}) == ["room"]
    listed = await b.engine.call("stream::list_all", {})
    assert listed == {"stream": [{"id": "chat", "groups": ["room"]}], "count": 1}
    await client.close()


@pytest_twisted.ensureDeferred
async def test_pushes_resume_after_redis_restarts(engines, own_redis):
    a, b = engines.two_on_redis(own_redis.url, "stream")
    client = await stream_client(await stream_port(b))
    client.join("sub-1", "s", "g")
    await wait_for(lambda: client.events("sync"), what="the join's sync")

    own_redis.restart()
    # The engines reconnect by themselves; writes succeed again within seconds.
    n = 0

    async def write():
        nonlocal n
        n += 1
        try:
            await a.engine.call("stream::set", {"stream_name": "s", "group_id": "g",
                                                "item_id": "x", "data": n})
        except Exception:
            pass
        return client.events("create") or client.events("update")
    deadline = 10.0
    from twisted.internet import reactor
    start = reactor.seconds()
    while not await write():
        assert reactor.seconds() - start < deadline, "no push within 10 s of the restart"
    await client.close()
