"""
Limits (issue 14): non-finite numbers in any spelling, nesting depth of kept values,
per-connection quotas, services and channels not outliving their worker, the
descriptor limit, and their config keys.
"""

import json
import os

import pytest

from iii_twisted import protocol as P
from iii_twisted.adapters.file import LOG_NAME, FileKvStore, frame
from iii_twisted.channels import install_channels
from iii_twisted.config import ConfigError, parse_config
from iii_twisted.limits import SETTINGS, Limits, raise_nofile_limit, too_deep
from iii_twisted.modules import build_module
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, log_lines, logged_failures, make_engine


def nested(depth, leaf=1):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def frame_of(message):
    return json.dumps(message).encode("utf-8")


def call(engine, function_id, data, caller=None):
    d = engine.call(function_id, data, caller=caller)
    results = []
    d.addBoth(results.append)
    assert results, "the call did not finish at once"
    return results[0]


# -- non-finite numbers in every spelling ------------------------------------------------


@pytest.mark.parametrize("spelling", [
    b"1e999", b"-1e999", b"1E400", b"123456789e999", b"1.5e+999", b"NaN", b"Infinity",
    b"-Infinity",
])
def test_non_finite_numbers_in_any_spelling_are_refused_in_frames(spelling):
    """The issue's frame: 1e999 in a registration's metadata is refused at the frame."""
    payload = b'{"type": "registerfunction", "id": "f", "metadata": {"x": ' + spelling + b"}}"
    with pytest.raises(P.ProtocolError, match="NaN and Infinity"):
        P.decode(payload)
    with pytest.raises(ValueError):
        P.loads(payload)


def test_large_but_finite_and_tiny_numbers_are_kept():
    value = P.loads(b'{"a": 1.7e308, "b": 1e-999, "c": 123456789012345678901234567890}')
    assert value == {"a": 1.7e308, "b": 0.0, "c": 123456789012345678901234567890}
    message = P.decode(b'{"type": "invocationresult", "invocation_id": "i", "result": 1e999}')
    assert message["result"] == float("inf")  # a result: the caller gets an error


def test_discovery_stays_readable_after_a_1e999_registration():
    """Before: engine::functions::list failed for every caller until the worker left."""
    engine, clock = make_engine()
    conn = FakeWorkerConnection.connect(engine)
    payload = frame_of({"type": "registerfunction", "id": "ok::f"})[:-1] + \
        b', "metadata": {"x": 1e999}}'
    with pytest.raises(P.ProtocolError):
        P.decode(payload)
    conn.receive({"type": "registerfunction", "id": "ok::g"})
    with logged_failures() as failures:
        for function_id in ("engine::functions::list", "engine::triggers::list",
                            "engine::trigger-types::list"):
            result = call(engine, function_id, {})
            P.encode(result)  # writable
    assert failures == []
    ids = [f["function_id"] for f in call(engine, "engine::functions::list", {})["functions"]]
    assert "ok::g" in ids and "ok::f" not in ids


def test_http_function_answers_refuse_1e999():
    """An HTTP function's 200 answer holding 1e999 is an invalid response, not a
    result no caller can be sent."""
    from iii_twisted.modules.http_functions import _map_response
    with pytest.raises(InvocationError) as error:
        _map_response(200, b'{"x": 1e999}')
    assert "not JSON" in error.value.message
    assert _map_response(200, b'{"x": 1e300}') == {"x": 1e300}


# -- nesting depth -----------------------------------------------------------------------


def test_too_deep_measures_depth_without_recursion():
    assert not too_deep(1, 0)
    assert not too_deep(nested(64), 64)
    assert too_deep(nested(65), 64)
    assert too_deep({"a": [1, {"b": nested(63)}]}, 64)
    assert too_deep(nested(100000), 64)  # far past the recursion limit


def test_state_refuses_values_nested_past_max_value_depth_and_keeps_the_rest():
    engine, clock = make_engine()
    build_module("modules::state::StateModule", engine, {}, clock)
    limit = engine.limits.value_depth
    ok = call(engine, "state::set", {"scope": "s", "key": "ok", "value": nested(limit - 1)})
    assert ok["new_value"] == nested(limit - 1)
    refused = call(engine, "state::set", {"scope": "s", "key": "deep", "value": nested(960)})
    assert refused.value.code == "limit_exceeded"
    assert "max_value_depth" in refused.value.message
    assert call(engine, "state::get", {"scope": "s", "key": "deep"}) is None
    refused = call(engine, "state::update", {"scope": "s", "key": "ok", "ops": [
        {"type": "set", "path": "x", "value": nested(960)}]})
    assert refused.value.code == "limit_exceeded"


def test_stream_refuses_values_nested_past_max_value_depth():
    engine, clock = make_engine()
    build_module("modules::stream::StreamModule", engine, {"port": 0}, clock)
    refused = call(engine, "stream::set", {"stream_name": "s", "group_id": "g",
                                           "item_id": "i", "data": nested(200)})
    assert refused.value.code == "limit_exceeded"


def test_registrations_nested_past_max_value_depth_are_refused():
    engine, clock = make_engine()
    conn = FakeWorkerConnection.connect(engine)
    conn.receive({"type": "registerfunction", "id": "a::deep", "metadata": nested(200)})
    conn.receive({"type": "registerfunction", "id": "a::ok", "metadata": nested(10)})
    assert "a::deep" not in engine.functions and "a::ok" in engine.functions
    conn.receive({"type": "registertrigger", "id": "t1", "trigger_type": "x",
                  "function_id": "a::ok", "config": nested(200)})
    assert "t1" not in engine.triggers
    [answer] = conn.sent_of_type("triggerregistrationresult")
    assert answer["error"]["code"] == "limit_exceeded"
    failure = call(engine, "a::deep", {})
    assert failure.value.code == "function_not_found"
    assert "max_value_depth" in failure.value.message


def test_enqueue_refuses_values_nested_past_max_value_depth():
    engine, clock = make_engine()

    class Enqueuer:
        def enqueue(self, *args):
            raise AssertionError("must not be reached")
    engine.enqueuer = Enqueuer()
    d = engine.call("x::y", nested(500), {"type": "enqueue", "queue": "q"})
    failure = []
    d.addErrback(failure.append)
    assert failure[0].value.code == "limit_exceeded"


def test_file_store_replay_skips_a_record_too_deep_to_read(tmp_path):
    """A record stored by an older engine and deeper than the interpreter reads is
    skipped; what follows it still replays."""
    path = str(tmp_path / "store")
    store = FileKvStore(path, None, run_in_thread=_run_now)
    store.set("g", "a", 1)
    store.close()
    with open(os.path.join(path, LOG_NAME), "ab") as f:
        deep = b'["s","g","deep",' + b"[" * 100000 + b"]" * 100000 + b"]"
        f.write(frame(deep) + frame(b'["s","g","b",2]'))
    store = FileKvStore(path, None, run_in_thread=_run_now)
    try:
        items = []
        store.items("g").addCallback(items.append)
        assert sorted(items[0]) == [("a", 1), ("b", 2)]
    finally:
        store.close()


def _run_now(f, *args):
    from twisted.internet.defer import maybeDeferred
    return maybeDeferred(f, *args)


# -- quotas ------------------------------------------------------------------------------


def test_functions_per_worker_quota_refuses_with_a_reason_and_others_carry_on():
    engine, clock = make_engine()
    engine.limits = Limits(functions_per_worker=5)
    greedy = FakeWorkerConnection.connect(engine)
    other = FakeWorkerConnection.connect(engine)
    for i in range(20):
        greedy.receive({"type": "registerfunction", "id": "g::f{}".format(i)})
    assert len(greedy.worker.functions) == 5
    greedy.receive({"type": "registerfunction", "id": "g::f0", "description": "again"})
    assert engine.functions["g::f0"].description == "again"  # re-registering is fine
    failure = call(engine, "g::f7", {})
    assert failure.value.code == "function_not_found"
    assert "max_functions_per_worker" in failure.value.message
    other.receive({"type": "registerfunction", "id": "o::f"})
    assert "o::f" in engine.functions
    assert engine.limits.counters["quota_refused"] == 15


def test_a_quota_refusal_names_the_worker_as_the_log_names_it_everywhere():
    """A quota refusal says which worker: its name, runtime, pid, address and id."""
    engine, clock = make_engine()
    engine.limits = Limits(functions_per_worker=1)
    greedy = FakeWorkerConnection.connect(engine)
    greedy.worker.name, greedy.worker.runtime, greedy.worker.pid = "greedy", "node", 42
    with log_lines() as lines:
        greedy.receive({"type": "registerfunction", "id": "g::one"})
        greedy.receive({"type": "registerfunction", "id": "g::two"})
    text = "\n".join(lines)
    assert 'refused function g::two from worker "greedy" (node, pid 42, 127.0.0.1, id ' \
        in text


def test_sizes_of_ids_descriptions_metadata_and_configs_are_bounded():
    engine, clock = make_engine()
    limits = engine.limits
    conn = FakeWorkerConnection.connect(engine)
    conn.receive({"type": "registerfunction", "id": "x" * (1024 * 1024)})
    conn.receive({"type": "registerfunction", "id": "a::desc",
                  "description": "d" * (limits.description_length + 1)})
    conn.receive({"type": "registerfunction", "id": "a::meta",
                  "metadata": {"blob": "m" * limits.metadata_size}})
    conn.receive({"type": "registerfunction", "id": "a::fmt",
                  "request_format": {"blob": "m" * limits.metadata_size}})
    conn.receive({"type": "registertriggertype", "id": "tt" * 1000})
    conn.receive({"type": "registertrigger", "id": "t", "trigger_type": "cron",
                  "function_id": "a::ok", "config": {"c": "c" * limits.trigger_config_size}})
    conn.receive({"type": "registerservice", "id": "s" * 2000})
    assert [f for f in engine.functions if not f.startswith("engine::")] == []
    assert len(engine.trigger_types) == 2  # the engine's own
    assert engine.triggers == {}
    assert list(engine.services) == ["engine"]
    [answer] = conn.sent_of_type("triggerregistrationresult")
    assert "max_trigger_config_size" in answer["error"]["message"]
    conn.receive({"type": "registerfunction", "id": "a::ok", "description": "fine",
                  "metadata": {"blob": "m" * 1000}})
    assert "a::ok" in engine.functions


def test_trigger_and_trigger_type_quotas():
    engine, clock = make_engine()
    engine.limits = Limits(triggers_per_worker=3, trigger_types_per_worker=2)
    conn = FakeWorkerConnection.connect(engine)
    for i in range(5):
        conn.receive({"type": "registertriggertype", "id": "tt{}".format(i)})
        conn.receive({"type": "registertrigger", "id": "t{}".format(i),
                      "trigger_type": "tt0", "function_id": "f"})
    assert sorted(conn.worker.trigger_types) == ["tt0", "tt1"]
    assert sorted(conn.worker.triggers) == ["t0", "t1", "t2"]
    refusals = [m for m in conn.sent_of_type("triggerregistrationresult")
                if m.get("error")]
    assert [m["id"] for m in refusals] == ["t3", "t4"]
    assert "max_triggers_per_worker" in refusals[0]["error"]["message"]


def test_services_go_with_their_worker():
    """Before: 100,000 registerservice left ~55 MB that was never freed."""
    engine, clock = make_engine()
    for round_ in range(3):
        conn = FakeWorkerConnection.connect(engine)
        for i in range(200):
            conn.receive({"type": "registerservice", "id": "svc{}".format(i),
                          "name": "svc{}-{}".format(round_, i)})
        assert len(engine.services) == 201  # and the engine's own
        conn.disconnect()
        assert list(engine.services) == ["engine"]
        assert engine._services_by_worker == {}


def test_services_per_worker_quota():
    engine, clock = make_engine()
    engine.limits = Limits(services_per_worker=3)
    conn = FakeWorkerConnection.connect(engine)
    for i in range(10):
        conn.receive({"type": "registerservice", "id": "s{}".format(i)})
    conn.receive({"type": "registerservice", "id": "s0", "description": "again"})
    assert sorted(engine.services) == ["engine", "s0", "s1", "s2"]


def test_one_worker_cannot_take_the_channel_pool():
    """Before: one worker creating 100,000 channels left none for HTTP or others."""
    engine, clock = make_engine()
    engine.limits = Limits(channels_per_worker=50)
    manager = install_channels(engine, clock)
    greedy = FakeWorkerConnection.connect(engine)
    other = FakeWorkerConnection.connect(engine)
    for i in range(60):
        greedy.receive({"type": "invokefunction", "invocation_id": "c{}".format(i),
                        "function_id": "engine::channels::create", "data": {}})
    answers = greedy.sent_of_type("invocationresult")
    assert len(answers) == 60
    errors = [a["error"] for a in answers if a.get("error")]
    assert len(errors) == 10 and errors[0]["code"] == "limit_exceeded"
    assert "max_channels_per_worker" in errors[0]["message"]
    # Leaving the object out is no way around the quota: such callers share one.
    for i in range(60):
        greedy.receive({"type": "invokefunction", "invocation_id": "n{}".format(i),
                        "function_id": "engine::channels::create"})
    assert len(manager) == 100
    other.receive({"type": "invokefunction", "invocation_id": "o",
                   "function_id": "engine::channels::create", "data": {}})
    [answer] = other.sent_of_type("invocationresult")
    assert "result" in answer and "error" not in answer
    # In-process creators (the REST API) are not counted against any worker.
    manager.create(4)
    # A channel that goes frees its place.
    channel = next(c for c in manager.channels.values() if c.owner == greedy.worker_id)
    manager.remove(channel)
    greedy.receive({"type": "invokefunction", "invocation_id": "again",
                    "function_id": "engine::channels::create", "data": {}})
    assert "result" in greedy.sent_of_type("invocationresult")[-1]


# -- config ------------------------------------------------------------------------------


def test_limits_config_keys_defaults_and_errors():
    config = parse_config("limits:\n  max_functions_per_worker: 7\n"
                          "  send_buffer_soft: 1024\n  send_buffer_hard: 2048\n")
    assert config.limits.functions_per_worker == 7
    assert config.limits.send_buffer_hard == 2048
    assert parse_config("port: 1\n").limits.value_depth == SETTINGS["max_value_depth"][2]
    for text, key in [("limits: 3\n", "limits"),
                      ("limits:\n  max_bananas: 1\n", "limits.max_bananas"),
                      ("limits:\n  max_id_length: long\n", "limits.max_id_length"),
                      ("limits:\n  max_id_length: 0\n", "limits.max_id_length"),
                      ("limits:\n  max_value_depth: true\n", "limits.max_value_depth"),
                      ("limits:\n  send_buffer_hard: 10\n", "limits.send_buffer_hard")]:
        with pytest.raises(ConfigError) as error:
            parse_config(text)
        assert error.value.key == key, text


def test_default_depth_is_well_below_the_recursion_limit():
    import sys
    assert Limits().value_depth * 4 < sys.getrecursionlimit()


# -- descriptors -------------------------------------------------------------------------


def test_soft_descriptor_limit_is_raised_to_the_hard_limit_and_logged():
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 1024) - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        new_soft, old, new_hard = raise_nofile_limit()
        assert new_hard == hard and old == lowered
        assert new_soft == (hard if hard != resource.RLIM_INFINITY else 1048576)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (new_soft, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- metrics -----------------------------------------------------------------------------


def test_limit_events_reach_engine_metrics_and_prometheus():
    from iii_twisted.observability.metrics import prometheus_text
    engine, clock = make_engine()
    module = build_module("modules::observability::OtelModule", engine, {}, clock)
    engine.limits = Limits(functions_per_worker=1)
    conn = FakeWorkerConnection.connect(engine)
    for i in range(3):
        conn.receive({"type": "registerfunction", "id": "a::f{}".format(i)})
    metrics = call(engine, "engine::metrics::list", {})["engine_metrics"]
    assert metrics["limits"]["quota_refused"] == 2
    text = prometheus_text(module.metrics).decode()
    assert 'iii_limit_events_total{event="quota_refused"} 2' in text
    assert 'iii_limit_events_total{event="peers_dropped_slow"} 0' in text


def test_docs_list_every_limit():
    """docs/limits.rst names every config key of the limits, with its default."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "limits.rst")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for key in SETTINGS:
        assert "``{}``".format(key) in text or "``limits.{}``".format(key) in text, key
    for event in Limits().counters:
        assert "``{}``".format(event) in text, event


def test_engine_service_raises_the_descriptor_limit_and_reports_both():
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import formatEvent, globalLogPublisher

    from iii_twisted.service import EngineService
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    events = []
    globalLogPublisher.addObserver(events.append)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard, 1024) - 1, hard))
    try:
        service = EngineService({"port": 0, "limits": {"max_value_depth": 32}},
                                reactor=MemoryReactorClock())
        assert service.engine.limits.value_depth == 32
        service.privilegedStartService()
        service.startService()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == \
            (hard if hard != resource.RLIM_INFINITY else 1048576)
        lines = [formatEvent(e) for e in events]
        assert "open-file limit: soft {} (was {}), hard {}".format(
            service.nofile_limit[0], min(soft, hard, 1024) - 1, hard) in lines
        service.stopService()
    finally:
        globalLogPublisher.removeObserver(events.append)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_redis_pubsub_and_stream_messages_with_1e999_are_dropped():
    """Anyone with access to Redis may publish: a message the engine could not write
    back is dropped like one that is not JSON."""
    from twisted.internet.defer import succeed

    from iii_twisted.adapters.redis_pubsub import RedisPubSubAdapter
    from iii_twisted.adapters.redis_stream import RedisStreamBus

    class Client:
        def subscribe(self, channel, callback):
            return succeed(None)

    delivered = []
    adapter = RedisPubSubAdapter(Client(), lambda f, data: delivered.append(data))
    adapter.subscribe("t", "s1", "app::f")
    adapter._message("t", '{"x": 1e999}')
    adapter._message("t", '{"x": 1.5}')
    assert delivered == [{"x": 1.5}]
    pushed = []
    bus = RedisStreamBus.__new__(RedisStreamBus)
    bus._push_local = lambda *args: pushed.append(args)
    bus._message("stream::events", '{"streamName": "s", "groupId": "g", "x": -1E400}')
    bus._message("stream::events", '{"streamName": "s", "groupId": "g", "id": "i"}')
    assert [p[:3] for p in pushed] == [("s", "g", "i")]
