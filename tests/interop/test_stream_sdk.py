"""
The stream module driven by the official Python SDK (iii-sdk 0.10.0) and by plain
WebSocket clients (the ``websockets`` sync client) on the stream port.
"""

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from engine_process import STREAM, Waiter, v010_config
from test_state_sdk import call, wait_for_trigger

CONFIG = v010_config(STREAM)

AUTH_CONFIG = CONFIG + """      auth_function: test::auth
"""

FILE_CONFIG = CONFIG + """      adapter:
        class: modules::stream::adapters::KvStore
        config:
          store_method: file_based
          file_path: ./data/stream_store
"""


def client_url(engine, query=""):
    return "ws://127.0.0.1:{}/{}".format(engine.ports["stream"], query)


def join(ws, sub, group, item=None, name="s", kind="join"):
    data = {"subscriptionId": sub, "streamName": name, "groupId": group}
    if item is not None:
        data["id"] = item
    ws.send(json.dumps({"type": kind, "data": data}))


def receive(ws, timeout=10.0):
    return json.loads(ws.recv(timeout=timeout))


def test_client_gets_sync_and_pushes(start_engine, sdk_worker):
    """A joined client gets a sync, then every change of its group, then nothing after leave."""
    engine = start_engine(CONFIG, stream=True)
    w = sdk_worker(engine.url, "stream-writer")
    call(w, "stream::set", {"stream_name": "s", "group_id": "g", "item_id": "a", "data": 1})
    with connect(client_url(engine)) as ws:
        join(ws, "sub-1", "g")
        sync = receive(ws)
        assert sync["type"] == "stream" and sync["event"] == {"type": "sync", "data": [1]}
        assert (sync["streamName"], sync["groupId"], sync["id"]) == ("s", "g", None)
        call(w, "stream::set", {"stream_name": "s", "group_id": "g", "item_id": "b",
                                "data": {"x": 1}})
        assert receive(ws)["event"] == {"type": "create", "data": {"x": 1}}
        call(w, "stream::update", {"stream_name": "s", "group_id": "g", "item_id": "b",
                                   "ops": [{"type": "increment", "path": "x", "by": 1}]})
        assert receive(ws)["event"] == {"type": "update", "data": {"x": 2}}
        call(w, "stream::send", {"stream_name": "s", "group_id": "g", "type": "ping",
                                 "data": [1]})
        message = receive(ws)
        assert message["event"] == {"type": "event", "event": {"type": "ping", "data": [1]}}
        call(w, "stream::delete", {"stream_name": "s", "group_id": "g", "item_id": "a"})
        assert receive(ws)["event"] == {"type": "delete", "data": 1}
        join(ws, "sub-1", "g", kind="leave")
        join(ws, "sub-2", "h", item="only")
        assert receive(ws)["event"] == {"type": "sync", "data": None}
        call(w, "stream::set", {"stream_name": "s", "group_id": "g", "item_id": "c", "data": 3})
        call(w, "stream::set", {"stream_name": "s", "group_id": "h", "item_id": "only",
                                "data": 4})
        # The left group's change never arrives: the next push is the other subscription's.
        message = receive(ws)
        assert (message["groupId"], message["id"], message["event"]) == \
            ("h", "only", {"type": "create", "data": 4})


def test_join_and_leave_triggers(start_engine, sdk_worker):
    """stream:join handlers can refuse a join; stream:leave handlers hear about closes."""
    engine = start_engine(CONFIG, stream=True)
    w = sdk_worker(engine.url, "stream-guard")
    joins, leaves = Waiter(), Waiter()

    def on_join(event):
        joins.add(event)
        return {"unauthorized": event["group_id"] == "secret"}
    w.register_function({"id": "test::join"}, on_join)
    w.register_function({"id": "test::leave"}, leaves.add)
    w.register_trigger({"type": "stream:join", "function_id": "test::join", "config": {}})
    w.register_trigger({"type": "stream:leave", "function_id": "test::leave", "config": {}})
    wait_for_trigger(w, "test::join")
    wait_for_trigger(w, "test::leave")
    with connect(client_url(engine)) as ws:
        join(ws, "a", "secret")
        assert receive(ws)["event"] == {"type": "unauthorized"}
        join(ws, "b", "public", item="i")
        assert receive(ws)["event"] == {"type": "sync", "data": None}
    assert joins.values[1] == {"subscription_id": "b", "stream_name": "s",
                               "group_id": "public", "id": "i", "context": None}
    [leave] = leaves.wait_for()
    assert leave["subscription_id"] == "b"


def test_stream_trigger(start_engine, sdk_worker):
    """A stream trigger gets the event wrapper of its stream's changes."""
    engine = start_engine(CONFIG, stream=True)
    w = sdk_worker(engine.url, "stream-watch")
    seen = Waiter()
    w.register_function({"id": "test::watch"}, seen.add)
    w.register_trigger({"type": "stream", "function_id": "test::watch",
                        "config": {"stream_name": "s", "group_id": "g"}})
    wait_for_trigger(w, "test::watch")
    call(w, "stream::set", {"stream_name": "s", "group_id": "other", "item_id": "i", "data": 0})
    call(w, "stream::set", {"stream_name": "s", "group_id": "g", "item_id": "i", "data": 1})
    [event] = seen.wait_for()
    assert event["type"] == "stream" and event["streamName"] == "s"
    assert (event["groupId"], event["id"], event["event"]) == \
        ("g", "i", {"type": "create", "data": 1})


def test_custom_stream_serves_clients(start_engine, sdk_worker):
    """A worker's create_stream implementation answers stream::* and client syncs."""
    from iii.stream import IStream, StreamDeleteResult, StreamSetResult

    engine = start_engine(CONFIG, stream=True)
    host = sdk_worker(engine.url, "stream-host")
    items = {}

    class Custom(IStream):
        async def get(self, input):
            return items.get(input.item_id)

        async def set(self, input):
            old = items.get(input.item_id)
            items[input.item_id] = input.data
            return StreamSetResult(old_value=old, new_value=input.data)

        async def delete(self, input):
            return StreamDeleteResult(old_value=items.pop(input.item_id, None))

        async def list(self, input):
            return list(items.values())

        async def list_groups(self, input):
            return ["only-group"]

        async def update(self, input):
            raise NotImplementedError

    host.create_stream("custom", Custom())
    user = sdk_worker(engine.url, "stream-user")
    deadline = time.monotonic() + 10
    while not any(f.function_id == "stream::list_groups(custom)" for f in user.list_functions()):
        assert time.monotonic() < deadline, "custom stream never registered"
    with connect(client_url(engine)) as ws:
        assert call(user, "stream::set", {"stream_name": "custom", "group_id": "g",
                                          "item_id": "i", "data": 7}) == \
            {"old_value": None, "new_value": 7}
        assert items == {"i": 7}
        join(ws, "sub", "g", name="custom")
        assert receive(ws)["event"] == {"type": "sync", "data": [7]}
        assert call(user, "stream::list_groups", {"stream_name": "custom"}) == ["only-group"]
        assert call(user, "stream::delete", {"stream_name": "custom", "group_id": "g",
                                             "item_id": "i"}) == {"old_value": 7}
        assert receive(ws)["event"] == {"type": "delete", "data": 7}


def test_auth_function(start_engine, sdk_worker):
    """auth_function refuses clients it does not accept, and its context reaches joins."""
    engine = start_engine(AUTH_CONFIG, stream=True)
    w = sdk_worker(engine.url, "stream-auth")
    joins = Waiter()

    def auth(request):
        if request["query_params"].get("token") == ["good"]:
            return {"context": {"user": "ann"}}
        return {"unauthorized": True}
    w.register_function({"id": "test::auth"}, auth)
    w.register_function({"id": "test::join"}, joins.add)
    w.register_trigger({"type": "stream:join", "function_id": "test::join", "config": {}})
    wait_for_trigger(w, "test::join")
    with pytest.raises(InvalidStatus) as info:
        connect(client_url(engine, "?token=bad"))
    assert info.value.response.status_code == 401
    with connect(client_url(engine, "?token=good")) as ws:
        join(ws, "sub", "g")
        assert receive(ws)["event"]["type"] == "sync"
    assert joins.values[0]["context"] == {"user": "ann"}


def test_client_that_never_reads_is_dropped(start_engine, sdk_worker):
    """Pushes to a client that stops reading pile up only to a bound; then it is dropped."""
    engine = start_engine(CONFIG, stream=True)
    w = sdk_worker(engine.url, "stream-flood")
    big = "x" * (256 * 1024)
    with connect(client_url(engine), max_queue=1) as ws:
        join(ws, "sub", "g")
        receive(ws)
        for i in range(120):  # 30 MiB: more than socket buffers and the engine's bound
            call(w, "stream::set", {"stream_name": "s", "group_id": "g", "item_id": str(i),
                                    "data": big})
        with pytest.raises(ConnectionClosed):
            for _ in range(200):
                ws.recv(timeout=10)
    assert "does not read" in engine.log()
    # The engine carries on serving others.
    with connect(client_url(engine)) as other:
        join(other, "sub", "g", item="0")
        assert receive(other)["event"]["data"] == big


def test_flooding_client_does_not_stop_the_engine(start_engine, sdk_worker):
    """A client sending a message over the limit is closed (1009); others are unaffected."""
    engine = start_engine(CONFIG, stream=True)
    w = sdk_worker(engine.url, "stream-flood-in")
    with connect(client_url(engine)) as ws:
        ws.send("x" * (100 * 1024))
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 1009
    with connect(client_url(engine)) as ws:
        for i in range(500):
            join(ws, "sub-{}".format(i), "g")
        for i in range(500):
            assert receive(ws)["event"]["type"] == "sync"
    assert call(w, "stream::list", {"stream_name": "s", "group_id": "g"}) == []


def test_file_stream_survives_kill_9(start_engine, sdk_worker):
    """Acknowledged file-based stream writes survive kill -9 and a restart."""
    engine = start_engine(FILE_CONFIG, stream=True)
    w = sdk_worker(engine.url, "stream-durable")
    for i in range(30):
        call(w, "stream::set", {"stream_name": "s", "group_id": "g", "item_id": str(i),
                                "data": i})
    call(w, "stream::delete", {"stream_name": "s", "group_id": "g", "item_id": "0"})
    engine.kill()
    engine.start()
    reader = sdk_worker(engine.url, "stream-reader")
    assert call(reader, "stream::list", {"stream_name": "s", "group_id": "g"}) == \
        list(range(1, 30))
    assert call(reader, "stream::list_groups", {"stream_name": "s"}) == ["g"]


def test_update_ops_at_a_path(start_engine, sdk_worker):
    """stream::update has the same ops as state::update: nested merge, append, errors."""
    engine = start_engine(CONFIG, stream=True)
    w = sdk_worker(engine.url, "stream-ops")
    call(w, "stream::set", {"stream_name": "s", "group_id": "g", "item_id": "a",
                            "data": {"sess": {"a": 1}, "other": 1}})
    result = call(w, "stream::update", {"stream_name": "s", "group_id": "g", "item_id": "a",
                                        "ops": [
        {"type": "merge", "path": "sess", "value": {"b": 2}},
        {"type": "append", "path": ["sess", "seen"], "value": 1},
        {"type": "increment", "path": "other", "by": 2},
        {"type": "set", "path": "constructor", "value": 1},
    ]})
    assert result["new_value"] == {"sess": {"a": 1, "b": 2, "seen": [1]}, "other": 3}
    assert [(e["op_index"], e["code"]) for e in result["errors"]] == [
        (3, "set.path.proto_polluted")]
