"""
Streams through the ``Bridge`` adapter: engine A keeps its stream items on engine B
(the hub) and its pushes go through B's pub/sub; two engines in this process, real
sockets, no Redis.
"""

import pytest_twisted

from engines import module_of, stream_client, stream_port, wait_for
from iii_twisted.modules.stream import StreamModule
from iii_twisted.wsclient import CONNECTED


@pytest_twisted.ensureDeferred
async def test_items_live_on_the_hub_and_pushes_reach_clients_on_both(engines):
    hub = engines.start([
        {"class": "modules::stream::StreamModule",
         "config": {"port": 0, "host": "127.0.0.1"}},
        {"class": "modules::pubsub::PubSubModule"}])
    hub_port = (await hub.listening()).getHost().port
    a = engines.start([{"class": "modules::stream::StreamModule", "config": {
        "port": 0, "host": "127.0.0.1", "adapter": {
            "class": "modules::stream::adapters::Bridge",
            "config": {"bridge_url": "ws://127.0.0.1:{}".format(hub_port)}}}}])
    store = module_of(a, StreamModule).store
    await wait_for(lambda: store.client.state == CONNECTED, what="the stream link")
    # The link is a worker on the hub, with its push subscription.
    await wait_for(lambda: any(t.trigger_type == "subscribe"
                               for t in hub.engine.triggers.values()),
                   what="the subscription on the hub")

    on_a = await stream_client(await stream_port(a))
    on_hub = await stream_client(await stream_port(hub))
    for client in (on_a, on_hub):
        client.join("sub-1", "chat", "room")
    await wait_for(lambda: on_a.events("sync") and on_hub.events("sync"),
                   what="the joins' syncs")

    for i in range(20):
        await a.engine.call("stream::set", {"stream_name": "chat", "group_id": "room",
                                            "item_id": "m{}".format(i), "data": {"n": i}})
    await a.engine.call("stream::send", {"stream_name": "chat", "group_id": "room",
                                         "type": "typing", "data": {"who": "ann"}})
    await wait_for(lambda: on_a.events("event"), what="the custom event on A")
    await wait_for(lambda: len(on_hub.events("create")) == 20, what="pushes on the hub")
    # Once each, in order, on both engines' clients.
    assert [e["data"]["n"] for e in on_a.events("create")] == list(range(20))
    assert [e["data"]["n"] for e in on_hub.events("create")] == list(range(20))
    # The items are on the hub; A reads them from there.
    items = await hub.engine.call("stream::list", {"stream_name": "chat", "group_id": "room"})
    assert [item["n"] for item in items] == list(range(20))
    assert await a.engine.call("stream::get", {"stream_name": "chat", "group_id": "room",
                                               "item_id": "m3"}) == {"n": 3}
    assert await a.engine.call("stream::list_groups", {"stream_name": "chat"}) == ["room"]
    # As the reference's Bridge adapter: list_all through a bridge lists nothing.
    assert await a.engine.call("stream::list_all", {}) == {"stream": [], "count": 0}
    assert await a.engine.call("stream::delete", {"stream_name": "chat", "group_id": "room",
                                                  "item_id": "m0"}) == {"old_value": {"n": 0}}
    await wait_for(lambda: on_a.events("delete"), what="the delete push on A")
    assert await hub.engine.call("stream::get", {"stream_name": "chat", "group_id": "room",
                                                 "item_id": "m0"}) is None
    await on_a.close()
    await on_hub.close()
