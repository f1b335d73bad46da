"""The state module driven by the official Python SDK (iii-sdk 0.10.0), over loopback."""

import threading

import pytest

from engine_process import STATE_MEMORY, Waiter, state_file, v010_config, wait_until

CONFIG = v010_config(STATE_MEMORY)
FILE_CONFIG = v010_config(state_file("./data/state_store.db"))


def wait_for_trigger(worker, function_id, timeout=10.0):
    """Wait until a trigger bound to C{function_id} is registered."""
    wait_until(lambda: any(
        t["function_id"] == function_id for t in worker.trigger({
            "function_id": "engine::triggers::list",
            "payload": {"include_internal": True}})["triggers"]),
        timeout, "trigger of {}".format(function_id))


def call(worker, function_id, payload):
    return worker.trigger({"function_id": function_id, "payload": payload})


def test_state_functions(start_engine, sdk_worker):
    """Every state function answers with the reference's shapes."""
    engine = start_engine(CONFIG)
    w = sdk_worker(engine.url, "state-user")
    assert call(w, "state::set", {"scope": "s", "key": "a", "value": {"n": 1}}) == \
        {"old_value": None, "new_value": {"n": 1}}
    assert call(w, "state::update", {"scope": "s", "key": "a", "ops": [
        {"type": "increment", "path": "n", "by": 2},
        {"type": "set", "path": "tag", "value": "x"}]}) == \
        {"old_value": {"n": 1}, "new_value": {"n": 3, "tag": "x"}}
    assert call(w, "state::set", {"scope": "s", "key": "b", "value": 513.4}) == \
        {"old_value": None, "new_value": 513.4}
    assert call(w, "state::list", {"scope": "s"}) == [{"n": 3, "tag": "x"}, 513.4]
    assert call(w, "state::list", {"scope": "unknown"}) == []
    assert call(w, "state::get", {"scope": "unknown", "key": "a"}) is None
    assert call(w, "state::list_groups", {}) == {"groups": ["s"]}
    assert call(w, "state::delete", {"scope": "s", "key": "b"}) == 513.4
    assert call(w, "state::delete", {"scope": "s", "key": "b"}) is None


def test_malformed_update_op_is_a_clear_error(start_engine, sdk_worker):
    """A bad op fails the call at once with an error naming it; nothing is written."""
    engine = start_engine(CONFIG)
    w = sdk_worker(engine.url, "state-user")
    with pytest.raises(Exception) as info:
        call(w, "state::update", {"scope": "s", "key": "k", "ops": [
            {"type": "increment", "path": "n", "by": 1}, {"type": "square", "path": "n"}]})
    assert "ops[1]" in str(info.value) and "square" in str(info.value)
    assert call(w, "state::get", {"scope": "s", "key": "k"}) is None


def test_state_trigger_events(start_engine, sdk_worker):
    """A state trigger gets created/updated/deleted events of its scope, in order."""
    engine = start_engine(CONFIG)
    handler = sdk_worker(engine.url, "state-handler")
    writer = sdk_worker(engine.url, "state-writer")
    seen = Waiter()

    def on_change(event):
        seen.add(event)
        return {}
    handler.register_function({"id": "test::on_change"}, on_change)
    handler.register_trigger({"type": "state", "function_id": "test::on_change",
                              "config": {"scope": "watched"}})
    wait_for_trigger(writer, "test::on_change")
    call(writer, "state::set", {"scope": "other", "key": "k", "value": 0})
    call(writer, "state::set", {"scope": "watched", "key": "k", "value": 1})
    call(writer, "state::update", {"scope": "watched", "key": "k", "ops": [
        {"type": "set", "path": "", "value": {"v": 2}}]})
    call(writer, "state::delete", {"scope": "watched", "key": "k"})
    events = seen.wait_for(lambda values: len(values) >= 3)
    assert [(e["event_type"], e["old_value"], e["new_value"]) for e in events] == [
        ("state:created", None, 1),
        ("state:updated", 1, {"v": 2}),
        ("state:deleted", {"v": 2}, None),
    ]
    assert all(e["type"] == "state" and e["scope"] == "watched" and e["key"] == "k"
               for e in events)


def test_trigger_handler_may_write_state(start_engine, sdk_worker):
    """A handler that writes state from inside its own event does not deadlock."""
    engine = start_engine(CONFIG)
    w = sdk_worker(engine.url, "state-chain")
    done = Waiter()

    def copy(event):
        if event["event_type"] != "state:deleted":
            w.trigger({"function_id": "state::set", "payload": {
                "scope": "copies", "key": event["key"], "value": event["new_value"]}})
            done.add(event["key"])
        return None
    w.register_function({"id": "test::copy"}, copy)
    w.register_trigger({"type": "state", "function_id": "test::copy",
                        "config": {"scope": "originals"}})
    wait_for_trigger(w, "test::copy")
    call(w, "state::set", {"scope": "originals", "key": "k", "value": "v"})
    done.wait_for()
    assert call(w, "state::get", {"scope": "copies", "key": "k"}) == "v"


def test_file_state_survives_kill_9(start_engine, sdk_worker):
    """Every acknowledged file-based write is still there after kill -9 and a restart."""
    engine = start_engine(FILE_CONFIG)
    writers = [sdk_worker(engine.url, "writer-{}".format(i)) for i in range(4)]
    errors = []

    def write(worker, n):
        try:
            for i in range(40):
                key = "w{}-{}".format(n, i)
                result = call(worker, "state::set", {"scope": "durable", "key": key,
                                                     "value": {"n": n, "i": i}})
                assert result == {"old_value": None, "new_value": {"n": n, "i": i}}
        except Exception as e:  # reported by the main thread
            errors.append(e)
    threads = [threading.Thread(target=write, args=(w, n)) for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    w = writers[0]
    call(w, "state::update", {"scope": "durable", "key": "counter", "ops": [
        {"type": "increment", "path": "hits", "by": 5}]})
    call(w, "state::delete", {"scope": "durable", "key": "w0-0"})
    engine.kill()
    engine.start()
    reader = sdk_worker(engine.url, "reader")
    values = call(reader, "state::list", {"scope": "durable"})
    assert len(values) == 4 * 40 - 1 + 1
    assert call(reader, "state::get", {"scope": "durable", "key": "w0-0"}) is None
    assert call(reader, "state::get", {"scope": "durable", "key": "w3-39"}) == {"n": 3, "i": 39}
    assert call(reader, "state::get", {"scope": "durable", "key": "counter"}) == {"hits": 5}
    # And it keeps writing after the restart.
    assert call(reader, "state::set", {"scope": "durable", "key": "counter", "value": 1}) == \
        {"old_value": {"hits": 5}, "new_value": 1}


def test_kill_9_during_writes_keeps_every_acknowledged_write(start_engine, sdk_worker):
    """kill -9 while writes stream in: each acknowledged one is there after a restart."""
    engine = start_engine(FILE_CONFIG)
    writers = [sdk_worker(engine.url, "busy-{}".format(i)) for i in range(4)]
    acked = Waiter()
    stop = threading.Event()

    def write(worker, n):
        i = 0
        while not stop.is_set():
            key = "k{}-{}".format(n, i)
            try:
                worker.trigger({"function_id": "state::set", "timeout_ms": 2000, "payload": {
                    "scope": "busy", "key": key, "value": {"n": n, "i": i, "pad": "p" * 500}}})
            except Exception:
                return  # the engine is gone
            acked.add(key)
            i += 1
    threads = [threading.Thread(target=write, args=(w, n)) for n, w in enumerate(writers)]
    for t in threads:
        t.start()
    acked.wait_for(lambda values: len(values) >= 400, timeout=30)
    engine.kill()
    stop.set()
    for t in threads:
        t.join(10)
    survivors = set(acked.values)
    engine.start()
    reader = sdk_worker(engine.url, "reader")
    present = {"k{}-{}".format(v["n"], v["i"])
               for v in call(reader, "state::list", {"scope": "busy"})}
    assert len(survivors) >= 400 and survivors <= present


@pytest.mark.parametrize("config", [CONFIG, FILE_CONFIG], ids=["memory", "file"])
def test_update_ops_at_a_path_from_a_real_worker(start_engine, sdk_worker, config):
    """
    Reported: merge at path "sess" on {"sess": {"a": 1}, "other": 1} changed nothing and
    said nothing. Nested merge, append and per-op errors, over the wire, on each store.
    """
    engine = start_engine(config)
    w = sdk_worker(engine.url, "state-ops")
    call(w, "state::set", {"scope": "s", "key": "k", "value": {"sess": {"a": 1}, "other": 1}})
    result = call(w, "state::update", {"scope": "s", "key": "k", "ops": [
        {"type": "merge", "path": "sess", "value": {"b": 2}},
        {"type": "merge", "path": ["sess", "cart"], "value": {"n": 1}},
        {"type": "append", "path": "log", "value": "x"},
        {"type": "merge", "path": ["__proto__"], "value": {"bad": True}},
    ]})
    # A string appended to a missing field starts a string (the reference's rule).
    expected = {"sess": {"a": 1, "b": 2, "cart": {"n": 1}}, "other": 1, "log": "x"}
    assert result["new_value"] == expected
    assert [(e["op_index"], e["code"]) for e in result["errors"]] == [
        (3, "merge.path.proto_polluted")]
    assert call(w, "state::get", {"scope": "s", "key": "k"}) == expected
