"""
What today's SDKs (PyPI ``iii-sdk`` 0.25.0, npm ``iii-sdk`` 0.22.1) rely on since the
reference's v0.11, each with a real worker of both: invocation and trigger metadata,
capabilities, the trigger lifecycle, discovery, the current queue API and namespaces
(../shared/spec/current-reference.md §1, §2; docs/sdk-compatibility.rst).

The workers are the same line-driven scripts as test_newer_python_sdk.py and
test_node_sdk.py (whose fixtures are reused here).
"""

import json
import urllib.error
import urllib.request

import pytest

from engine_process import LISTEN, REST_API, queue_module, v010_config
from sdk_process import WorkerFailed
from test_newer_python_sdk import newer_python, newer_worker  # noqa: F401 (fixtures)
from test_node_sdk import node_sdks, node_worker  # noqa: F401 (fixtures)

NODE = "iii-sdk-022"

HTTP_CONFIG = v010_config(REST_API)


def _post(engine, path, body):
    request = urllib.request.Request(
        "http://127.0.0.1:{}/{}".format(engine.ports["http"], path),
        data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.status, json.loads(response.read())


def _invoked(worker, function_id, n):
    return worker.wait_event(lambda l: l.get("event") == "invoked"
                             and l["function_id"] == function_id
                             and (l["data"] or {}).get("n", (l["data"] or {}).get("body", {}).get("n")) == n)


def test_invocation_and_trigger_metadata(start_engine, newer_worker, node_worker):
    """
    ``metadata`` on a call reaches the handler beside ``data`` both ways between
    py 0.25 and npm 0.22.1 (sync and void); a trigger's ``metadata`` reaches its
    handler on every fire.
    """
    engine = start_engine(HTTP_CONFIG, http=True)
    py = newer_worker(engine.url, "py-meta")
    node = node_worker(NODE, engine.url, "node-meta")
    py.request("register_function", function_id="py::meta")
    node.request("register_function", function_id="node::meta")
    py.request("list_functions")
    node.request("list_functions")

    # npm -> py, sync and void; py -> npm.
    result = node.request("call", function_id="py::meta", payload={"n": 1},
                          metadata={"tenant": "acme"})["result"]
    # The reference, too, adds the caller's id to object data; metadata is not folded in.
    assert result["data"]["n"] == 1 and "tenant" not in result["data"]
    assert _invoked(py, "py::meta", 1)["metadata"] == {"tenant": "acme"}
    node.request("call", function_id="py::meta", payload={"n": 2}, void=True,
                 metadata={"tenant": "void"})
    assert _invoked(py, "py::meta", 2)["metadata"] == {"tenant": "void"}
    py.request("call", function_id="node::meta", payload={"n": 3},
               metadata={"session_id": "s_1"})
    assert _invoked(node, "node::meta", 3)["metadata"] == {"session_id": "s_1"}
    # Without metadata the handler gets none.
    py.request("call", function_id="node::meta", payload={"n": 4})
    assert _invoked(node, "node::meta", 4)["metadata"] is None

    # Trigger metadata, each fire, from each SDK's registration.
    py.request("register_function", function_id="py::route", http=True)
    py.request("register_trigger", type="http", function_id="py::route",
               config={"api_path": "py/route", "http_method": "POST"},
               metadata={"route": "py"})
    node.request("register_function", function_id="node::route", http=True)
    node.request("register_trigger", type="http", function_id="node::route",
                 config={"api_path": "node/route", "http_method": "POST"},
                 metadata={"route": "node"})
    py.request("list_functions")
    node.request("list_functions")
    for n in (10, 11):
        assert _post(engine, "py/route", {"n": n})[0] == 201
        assert _invoked(py, "py::route", n)["metadata"] == {"route": "py"}
        assert _post(engine, "node/route", {"n": n})[0] == 201
        assert _invoked(node, "node::route", n)["metadata"] == {"route": "node"}


def _call(worker, function_id, payload=None):
    return worker.request("call", function_id=function_id, payload=payload or {})["result"]


def test_trigger_lifecycle(start_engine, sdk_worker, newer_worker, node_worker):
    """
    A provider's refusal reaches the SDK that registered the trigger (each SDK logs
    it); a trigger on a type nobody provides yet is kept without error and handed
    to the provider when one registers; a provider that comes back gets its
    bindings replayed; ``engine::register_trigger`` bindings outlive their caller.
    """
    engine = start_engine(HTTP_CONFIG, http=True)
    py = newer_worker(engine.url, "py-life")
    node = node_worker(NODE, engine.url, "node-life")
    py.request("register_function", function_id="py::fn")
    node.request("register_function", function_id="node::fn")
    node.request("register_trigger_type", type_id="node-strict", description="refuses",
                 refuse="node says no")
    py.request("register_trigger_type", type_id="py-strict", description="refuses",
               refuse="py says no")
    node.request("list_functions")
    py.request("list_functions")

    py.request("register_trigger", type="node-strict", function_id="py::fn", config={})
    py.wait_event(lambda l: "Trigger registration failed" in l.get("line", "")
                  and "node says no" in l["line"])
    node.request("register_trigger", type="py-strict", function_id="node::fn", config={})
    node.wait_event(lambda l: "Trigger registration failed" in l.get("line", "")
                    and "py says no" in l["line"])

    # Parked, then handed over; then replayed to the provider's next connection.
    py.request("register_trigger", type="later-hook", function_id="py::fn",
               config={"k": 1}, metadata={"m": 1})
    rows = _call(py, "engine::registered-triggers::list", {"trigger_type": "later-hook"})
    [row] = rows["registered_triggers"]
    assert (row["status"], row["worker_name"]) == ("pending", "py-life")
    assert "Trigger registration failed" not in py.text().split("node says no")[-1]
    node.request("register_trigger_type", type_id="later-hook", description="late")
    handed = node.wait_event(lambda l: l.get("event") == "trigger_registered"
                             and l["type_id"] == "later-hook")
    assert (handed["id"], handed["config"], handed["metadata"]) == (row["id"], {"k": 1}, {"m": 1})
    node.stop()
    again = node_worker(NODE, engine.url, "node-life-2")
    again.request("register_trigger_type", type_id="later-hook", description="late")
    replayed = again.wait_event(lambda l: l.get("event") == "trigger_registered")
    assert replayed["id"] == row["id"]

    # An engine-owned binding made by a short-lived caller, with metadata.
    py.request("register_function", function_id="py::route", http=True)
    caller = node_worker(NODE, engine.url, "node-cli")
    made = caller.request("call", function_id="engine::register_trigger", payload={
        "trigger_type": "http", "function_id": "py::route",
        "config": {"api_path": "durable", "http_method": "POST"},
        "metadata": {"via": "engine"}})["result"]
    caller.stop()
    assert _post(engine, "durable", {"n": 7})[0] == 201
    assert _invoked(py, "py::route", 7)["metadata"] == {"via": "engine"}
    assert _call(py, "engine::unregister_trigger", {"id": made["id"]}) == {"removed": True}
    with pytest.raises(urllib.error.HTTPError) as gone:
        _post(engine, "durable", {"n": 8})
    assert gone.value.code == 404


def test_discovery_per_generation(start_engine, sdk_worker, newer_worker, node_worker):
    """
    ``engine::triggers::list`` lists instances to a 0.10.0 worker and types to py
    0.25 and npm 0.22.1; the 0.13 functions answer both current SDKs.
    """
    engine = start_engine(HTTP_CONFIG, http=True)
    old = sdk_worker(engine.url, "old-disc")
    py = newer_worker(engine.url, "py-disc")
    node = node_worker(NODE, engine.url, "node-disc")
    py.request("register_function", function_id="py::listed", description="listed")
    py.request("register_trigger", type="http", function_id="py::listed",
               config={"api_path": "listed", "http_method": "GET"})
    py.request("list_functions")

    instances = old.trigger({"function_id": "engine::triggers::list", "payload": {}})
    assert [(t["trigger_type"], t["function_id"]) for t in instances["triggers"]] == [
        ("http", "py::listed")]
    for current in (py, node):
        types = _call(current, "engine::triggers::list")["triggers"]
        assert {"id": "http", "namespace": "default", "worker_name": "http",
                "description": types[0]["description"]} in types
        rows = _call(current, "engine::registered-triggers::list")["registered_triggers"]
        assert [(r["function_id"], r["worker_name"], r["config_summary"]) for r in rows] == [
            ("py::listed", "py-disc", '{"api_path":"listed","http_method":"GET"}')]
        batch = _call(current, "engine::functions::info",
                      {"function_ids": ["py::listed", "nope::x"]})["functions"]
        assert batch[0]["description"] == "listed"
        assert batch[0]["registered_triggers"][0]["trigger_type"] == "http"
        assert batch[1] == {"function_id": "nope::x", "error": "not_found"}
        info = _call(current, "engine::workers::info", {"name": "py-disc"})
        assert info["worker"]["runtime"] == "python" and info["worker"]["version"] == "0.25.0"
        assert [f["function_id"] for f in info["functions"]] == ["py::listed"]
        kind = _call(current, "engine::triggers::info", {"id": "http"})
        assert kind["instance_count"] == 1
        listed = _call(current, "engine::functions::list", {"search": "listed"})["functions"]
        assert [(f["function_id"], f["worker_name"]) for f in listed] == [("py::listed", "py-disc")]
    workers = {w["name"]: w for w in _call(node, "engine::workers::list")["workers"]}
    assert workers["node-disc"]["runtime"] == "node"
    assert workers["node-disc"]["namespace"] == "default"


LARGE_CONFIG = v010_config(head=LISTEN + """\
invocation_timeout_ms: 60000
max_message_size: 67108864
""")


def test_large_messages_when_configured(start_engine, newer_worker):
    """
    With ``max_message_size: 67108864`` (64 MiB, what py 0.25 sends and reads) a
    40 MiB call and its 40 MiB result pass between two py 0.25 workers (the SDK
    sends it in 16 MiB fragments); with the default 16 MiB the call fails at
    once with ``message_too_large``.
    """
    size = 40 * 1024 * 1024
    engine = start_engine(LARGE_CONFIG)
    host = newer_worker(engine.url, "py-big-host")
    caller = newer_worker(engine.url, "py-big-caller")
    host.request("register_big_echo", function_id="big::echo")
    host.request("list_functions")
    answer = caller.request("call_big", timeout=120, function_id="big::echo", size=size)
    assert (answer["size"], answer["echo_size"], answer["intact"]) == (size, size, True)

    small = start_engine()
    host = newer_worker(small.url, "py-big-host-2")
    caller = newer_worker(small.url, "py-big-caller-2")
    host.request("register_big_echo", function_id="big::echo")
    host.request("list_functions")
    with pytest.raises(WorkerFailed) as refused:
        caller.request("call_big", timeout=60, function_id="big::echo", size=size)
    assert refused.value.error["code"] == "message_too_large"


QUEUE_CONFIG = v010_config(queue_module(
    {"jobs": {"max_retries": 3, "concurrency": 2, "backoff_ms": 50}},
    adapter={"class": "modules::queue::BuiltinQueueAdapter", "config": {"backoff_ms": 1000}}))


def test_current_queue_api(start_engine, newer_worker, node_worker):
    """
    ``durable:subscriber`` + ``iii::durable::publish`` (every subscribed function
    gets a copy; replicas of one compete), the ``enqueue`` action and
    ``engine::queue::enqueue`` on the named queues, and per-trigger ``queue_config``
    retries taking effect: ``{maxRetries: 1, backoffDelayMs: 50}`` on a ``queue``
    trigger is one attempt (v0.10's meaning), on a ``durable:subscriber`` two (one
    retry, the reference's since 0.11), not the module's 3, then the DLQ; a setting
    the queue does not implement is refused to the registering SDK.
    """
    engine = start_engine(QUEUE_CONFIG)
    py = newer_worker(engine.url, "py-queue")
    node = node_worker(NODE, engine.url, "node-queue")
    replica = node_worker(NODE, engine.url, "node-queue-replica")
    py.request("register_function", function_id="py::orders")
    node.request("register_function", function_id="node::orders")
    replica.request("register_function", function_id="node::orders")  # same id
    py.request("register_trigger", type="durable:subscriber", function_id="py::orders",
               config={"topic": "orders"})
    node.request("register_trigger", type="durable:subscriber", function_id="node::orders",
                 config={"topic": "orders"})
    py.request("list_functions")
    node.request("list_functions")
    for n in range(4):
        node.request("call", function_id="iii::durable::publish",
                     payload={"topic": "orders", "data": {"n": n}})
    for n in range(4):
        _invoked(py, "py::orders", n)
    node_got = lambda: sorted(e["data"]["n"] for w in (node, replica)  # noqa: E731
                              for e in w.events("invoked") if e["function_id"] == "node::orders")
    from engine_process import wait_until
    wait_until(lambda: node_got() == [0, 1, 2, 3], 15, "node copies")

    # The enqueue action and engine::queue::enqueue, on the named queue "jobs".
    receipt = py.request("call", function_id="node::orders", payload={"n": 10},
                         enqueue="jobs")["result"]
    assert receipt["messageReceiptId"]
    answer = py.request("call", function_id="engine::queue::enqueue", payload={
        "queue": "jobs", "function_id": "node::orders", "data": {"n": 11}})["result"]
    assert answer["messageReceiptId"]
    wait_until(lambda: {10, 11} <= set(node_got()), 15, "named-queue deliveries")

    # Per-trigger retries.
    py.request("register_function", function_id="py::fails", fail=True)
    py.request("register_trigger", type="queue", function_id="py::fails",
               config={"topic": "legacy", "queue_config": {"maxRetries": 1,
                                                           "backoffDelayMs": 50}})
    node.request("register_function", function_id="node::fails", fail=True)
    node.request("register_trigger", type="durable:subscriber", function_id="node::fails",
                 config={"topic": "current", "queue_config": {"maxRetries": 1,
                                                              "backoffDelayMs": 50}})
    py.request("list_functions")
    node.request("list_functions")
    py.request("call", function_id="enqueue", payload={"topic": "legacy", "data": {"n": 20}})
    py.request("call", function_id="iii::durable::publish",
               payload={"topic": "current", "data": {"n": 21}})

    def dead():
        topics = _call(py, "engine::queue::dlq_topics")
        return {t["topic"]: t["message_count"] for t in topics}
    wait_until(lambda: dead() == {"legacy": 1, "current::node::fails": 1}, 15, "DLQ")
    attempts = lambda w, fid: len([e for e in w.events("invoked")  # noqa: E731
                                   if e["function_id"] == fid])
    assert attempts(py, "py::fails") == 1
    assert attempts(node, "node::fails") == 2
    [message] = _call(py, "engine::queue::dlq_messages", {"topic": "legacy"})
    assert message["payload"] == {"n": 20} and message["retries"] == 1

    # Refused loudly: the SDK that registered it logs the engine's error.
    py.request("register_trigger", type="durable:subscriber", function_id="py::orders",
               config={"topic": "late", "queue_config": {"delaySeconds": 5}})
    py.wait_event(lambda l: "Trigger registration failed" in l.get("line", "")
                  and "delaySeconds is not supported" in l["line"])


def test_namespaces(start_engine, sdk_worker, newer_worker, node_worker):
    """
    py 0.25 workers with ``III_NAMESPACE`` register into their namespace (their
    registrations arrive before ``engine::workers::register`` names it) and call
    within it; callers that name no namespace (0.10.0, npm 0.22.1) stay in
    ``default``, where the same id is another function; a conflict in a namespace
    is ``registrationrejected``.
    """
    engine = start_engine()
    old = sdk_worker(engine.url, "old-ns")
    old.register_function({"id": "svc::who"}, lambda data: {"who": "default-old"})
    team = newer_worker(engine.url, "py-team", env={"III_NAMESPACE": "team-a"})
    team.request("register_function", function_id="svc::who")
    team.request("list_functions")
    node = node_worker(NODE, engine.url, "node-ns")

    # No namespace: default's function, for every SDK generation.
    assert old.trigger({"function_id": "svc::who", "payload": {}}) == {"who": "default-old"}
    assert _call(node, "svc::who") == {"who": "default-old"}
    # A team-a worker's call stays in team-a unless it names default.
    mine = team.request("call", function_id="svc::who", payload={"n": 1})["result"]
    assert mine["handled_by"] == "py-team"
    theirs = team.request("call", function_id="svc::who", payload={},
                          namespace="default")["result"]
    assert theirs == {"who": "default-old"}
    # A miss names where the id lives.
    team.request("register_function", function_id="team::only")
    team.request("list_functions")
    with pytest.raises(WorkerFailed) as missed:
        node.request("call", function_id="team::only", payload={})
    assert "registered in namespace(s): team-a" in missed.value.error["message"]

    rows = {(f["function_id"], f["namespace"], f["worker_name"])
            for f in _call(node, "engine::functions::list")["functions"]}
    assert {("svc::who", "default", "old-ns"), ("svc::who", "team-a", "py-team"),
            ("team::only", "team-a", "py-team")} <= rows
    workers = {w["name"]: w["namespace"] for w in _call(node, "engine::workers::list")["workers"]}
    assert (workers["py-team"], workers["node-ns"], workers["old-ns"]) == (
        "team-a", "default", "default")

    # A second live owner of team-a's svc::who is refused (py 0.25 logs a warning).
    rival = newer_worker(engine.url, "py-rival", env={"III_NAMESPACE": "team-a"})
    rival.request("register_function", function_id="svc::who")
    rejected = rival.wait_line("Function registration rejected (FUNCTION_NAMESPACE_CONFLICT)")
    assert "'svc::who'" in rejected and "'team-a'" in rejected
    again = team.request("call", function_id="svc::who", payload={"n": 2})["result"]
    assert again["handled_by"] == "py-team"
