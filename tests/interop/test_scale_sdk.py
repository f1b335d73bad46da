"""
Two ``twistd iii`` processes sharing one redis-server (started by the test), with
official ``iii-sdk`` 0.10.0 workers on each: state, pub/sub, cron and streams are
shared; a direct call is not routed between engines (as in the reference).
"""

import threading

import pytest
from websockets.sync.client import connect

from engine_process import (
    Waiter, cron_redis, pubsub_redis, state_redis, stream_redis, v010_config, wait_until)
from test_pubsub_cron_sdk import wait_for_trigger


@pytest.fixture
def two_engines(start_engine, redis_url):
    config = v010_config(state_redis(redis_url), stream_redis(redis_url),
                         pubsub_redis(redis_url), cron_redis(redis_url))
    return [start_engine(config, workdir=name, stream=True) for name in ("a", "b")]


def call(worker, function_id, payload):
    return worker.trigger({"function_id": function_id, "payload": payload})


def test_two_engines_share_state_pubsub_cron_and_streams(two_engines, sdk_worker):
    a, b = two_engines
    wa = sdk_worker(a.url, "on-a")
    wb = sdk_worker(b.url, "on-b")

    # State: written via A, read via B; concurrent updates from both end exact.
    call(wa, "state::set", {"scope": "s", "key": "n", "value": {"n": 0, "l": []}})
    assert call(wb, "state::get", {"scope": "s", "key": "n"}) == {"n": 0, "l": []}
    op = {"scope": "s", "key": "n", "ops": [{"type": "increment", "path": "n", "by": 1}]}
    threads = [threading.Thread(target=lambda w=w: [call(w, "state::update", op)
                                                     for _ in range(100)])
               for w in (wa, wb)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert call(wa, "state::get", {"scope": "s", "key": "n"}) == {"n": 200, "l": []}

    # Pub/sub: a publish via A reaches the subscribers on A and on B once each.
    heard_a, heard_b = Waiter(), Waiter()
    wa.register_function({"id": "news::a"}, heard_a.add)
    wb.register_function({"id": "news::b"}, heard_b.add)
    wa.register_trigger({"type": "subscribe", "function_id": "news::a",
                         "config": {"topic": "news"}})
    wb.register_trigger({"type": "subscribe", "function_id": "news::b",
                         "config": {"topic": "news"}})
    wait_for_trigger(wa, "news::a")
    wait_for_trigger(wb, "news::b")
    call(wa, "publish", {"topic": "news", "data": {"headline": 1}})
    call(wa, "publish", {"topic": "news", "data": "end"})
    assert heard_a.wait_for(lambda v: "end" in v) == [{"headline": 1}, "end"]
    assert heard_b.wait_for(lambda v: "end" in v) == [{"headline": 1}, "end"]

    # Cron: replicas of one job on A and B fire once per tick between them.
    ticks = Waiter()
    for worker in (wa, wb):
        worker.register_function({"id": "job::tick"}, lambda d: ticks.add(d["scheduled_time"]))
        worker.register_trigger({"type": "cron", "function_id": "job::tick",
                                 "config": {"expression": "* * * * * *"}})
    values = ticks.wait_for(lambda v: len(v) >= 3, timeout=8)
    assert len(values) == len(set(values)), values

    # Streams: a client joined on B gets the change made via A.
    with connect("ws://127.0.0.1:{}/".format(b.ports["stream"])) as client:
        client.send('{"type":"join","data":{"subscriptionId":"x","streamName":"chat",'
                    '"groupId":"room"}}')
        assert '"sync"' in client.recv(timeout=10)
        call(wa, "stream::set", {"stream_name": "chat", "group_id": "room",
                                 "item_id": "m1", "data": {"text": "hi"}})
        assert '"text":"hi"' in client.recv(timeout=10)

    # A direct call to a function hosted only on B is not routed from A.
    wb.register_function({"id": "only::b"}, lambda d: "b")
    wait_until(lambda: any(f["function_id"] == "only::b" for f in call(
        wb, "engine::functions::list", {})["functions"]), 10, "only::b on B")
    with pytest.raises(Exception) as info:
        call(wa, "only::b", {})
    assert "not found" in str(info.value).lower() or "function_not_found" in str(info.value)
