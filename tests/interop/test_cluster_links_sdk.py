"""
Two ``twistd iii`` cluster members (one real Redis for the membership, started by the
test) driven by official SDK workers: PyPI ``iii-sdk`` 0.10.0 in this process, npm
``iii-sdk`` 0.11.2 under Node and PyPI ``iii-sdk`` 0.25 in its own virtualenv. A worker on either member calls a function hosted
on the other, an HTTP route registered on one is served by both, discovery shows the
whole cluster, and ``kill -9`` of a member fails the calls waiting on it and takes
what it offered out of the other's registry.
"""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from engine_process import wait_until
from test_newer_python_sdk import NEWER_VERSION, newer_python, newer_worker  # noqa: F401
from test_node_sdk import node_sdks, node_worker  # noqa: F401 (fixtures)

MEMBER_CONFIG = """
port: {{port}}
host: 127.0.0.1
invocation_timeout_ms: 20000
modules:
  - class: modules::api::RestApiModule
    config:
      host: 127.0.0.1
      port: {{http}}
      default_timeout: 10000
cluster:
  redis_url: {redis_url}
  secret: interop-cluster-secret
  name: {name}
  heartbeat_ms: 500
  member_ttl_ms: 1500
"""


@pytest.fixture
def members(redis_url, start_engine):
    """Two members, "member-a" and "member-b", of one cluster."""
    return [start_engine(MEMBER_CONFIG.format(redis_url=redis_url, name=name), http=True)
            for name in ("member-a", "member-b")]


@pytest.fixture
def py_worker(sdk_worker):
    """C{connect(url, name)}: an iii-sdk 0.10.0 worker (conftest's sdk_worker)."""
    return sdk_worker


def function_ids(worker):
    listed = worker.trigger({"function_id": "engine::functions::list", "payload": {}})
    return {f["function_id"]: f for f in listed["functions"]}


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_workers_on_two_members_call_each_other(members, py_worker, node_worker):  # noqa: F811
    a, b = members
    py = py_worker(a.url, "py-on-a")
    py.register_function({"id": "py::echo", "description": "echo on a"},
                         lambda data: {"handled_by": "py-on-a", "data": data})
    py.register_function({"id": "py::route"}, lambda request: {
        "status_code": 200, "body": {"handled_by": "py-on-a",
                                     "query": request["query_params"]}})
    py.register_trigger({"type": "http", "function_id": "py::route",
                         "config": {"api_path": "py-echo", "http_method": "GET"}})
    node = node_worker("iii-sdk-011", b.url, "node-on-b")
    node.request("register_function", function_id="node::echo", description="echo on b")

    # Each member learns the other's functions (the link offers them).
    listed = wait_until(lambda: (lambda f: f if "node::echo" in f else None)(
        function_ids(py)), what="node::echo on member-a")
    assert (listed["node::echo"]["engine_name"], listed["node::echo"]["worker_name"]) \
        == ("member-b", "node-on-b")
    assert listed["py::echo"]["engine_name"] == "member-a"
    wait_until(lambda: any(f["function_id"] == "py::echo" for f in
                           node.request("list_functions")["result"]),
               what="py::echo on member-b")

    # Python on a -> Node on b, and Node on b -> Python on a.
    result = py.trigger({"function_id": "node::echo", "payload": {"n": 1}})
    assert (result["handled_by"], result["sdk"], result["data"]["n"]) == \
        ("node-on-b", "0.11.2", 1)
    result = node.request("call", function_id="py::echo", payload={"n": 2})["result"]
    assert result["handled_by"] == "py-on-a" and result["data"]["n"] == 2
    # Fire and forget crosses too.
    assert node.request("call", function_id="py::echo", payload={"n": 3},
                        void=True)["result"] is None
    # A Node handler's error reaches the Python caller on the other member.
    node.request("register_function", function_id="node::fails", fail=True)
    wait_until(lambda: "node::fails" in function_ids(py), what="node::fails on a")
    with pytest.raises(Exception) as failed:
        py.trigger({"function_id": "node::fails", "payload": {}})
    assert "always fails" in str(failed.value)

    # The route registered on a is served by b's REST API too.
    for member in (a, b):
        status, body = get("http://127.0.0.1:{}/py-echo?x=1".format(member.ports["http"]))
        assert (status, body) == (200, {"handled_by": "py-on-a", "query": {"x": "1"}})

    # The 0.10.0 SDK's own models read the rows (they ignore the engine keys).
    assert {"py-on-a", "node-on-b"} <= {w.name for w in py.list_workers()}
    assert {"py::echo", "node::echo"} <= {f.function_id for f in py.list_functions()}
    assert "py-echo" in {t.config.get("api_path") for t in py.list_triggers()}

    # Discovery on b shows the worker on a, as a worker of member-a.
    workers = node.request("list_workers")["result"]
    by_name = {w["name"]: w for w in workers if w.get("name")}
    assert by_name["py-on-a"]["engine_name"] == "member-a"
    assert by_name["node-on-b"]["engine_name"] == "member-b"
    assert "py::echo" in by_name["py-on-a"]["functions"]


def test_kill_9_of_a_member(members, py_worker):
    """Calls waiting on it fail within 2 s; what it offered leaves the other member."""
    a, b = members
    caller = py_worker(a.url, "caller-on-a")
    host = py_worker(b.url, "host-on-b")
    release = threading.Event()
    arrived = threading.Event()

    def stuck(data):
        arrived.set()
        release.wait(30)
        return "late"
    host.register_function({"id": "b::stuck"}, stuck)
    host.register_trigger({"type": "http", "function_id": "b::stuck",
                           "config": {"api_path": "stuck"}})
    wait_until(lambda: "b::stuck" in function_ids(caller), what="b::stuck on a")
    outcome = {}

    def call():
        try:
            outcome["result"] = caller.trigger({"function_id": "b::stuck", "payload": {}})
        except Exception as e:
            outcome["error"] = e
        outcome["at"] = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    assert arrived.wait(10)
    killed_at = time.monotonic()
    b.kill()
    thread.join(10)
    release.set()
    assert "invocation_stopped" in str(outcome.get("error")), outcome
    assert outcome["at"] - killed_at < 2.0
    wait_until(lambda: "b::stuck" not in function_ids(caller), timeout=5,
               what="b::stuck to leave member-a")
    status, _ = get("http://127.0.0.1:{}/stuck".format(a.ports["http"]))
    assert status == 404
    with pytest.raises(Exception) as failed:
        caller.trigger({"function_id": "b::stuck", "payload": {}})
    assert "function_not_found" in str(failed.value) or "not found" in str(failed.value)


def test_an_engine_with_another_secret_does_not_join(redis_url, start_engine, py_worker):
    a = start_engine(MEMBER_CONFIG.format(redis_url=redis_url, name="member-a"), http=True)
    other = start_engine(MEMBER_CONFIG.format(redis_url=redis_url, name="intruder")
                         .replace("interop-cluster-secret", "wrong-secret"), http=True)
    intruder = py_worker(other.url, "intruder-worker")
    intruder.register_function({"id": "evil::fn"}, lambda data: "evil")
    listener = py_worker(a.url, "listener")
    wait_until(lambda: "refused a cluster link" in a.log(), what="the refusal in a's log")
    assert "evil::fn" not in function_ids(listener)
    with pytest.raises(Exception):
        listener.trigger({"function_id": "evil::fn", "payload": {}})


def test_a_current_sdk_worker_across_members(members, py_worker, newer_worker):  # noqa: F811
    """iii-sdk 0.25 (current discovery shapes) on one member, 0.10.0 on the other."""
    a, b = members
    old = py_worker(a.url, "old-on-a")
    old.register_function({"id": "old::echo"},
                          lambda data: {"handled_by": "old-on-a", "data": data})
    new = newer_worker(b.url, "new-on-b")
    new.request("register_function", function_id="new::echo", description="0.25 on b")
    wait_until(lambda: "new::echo" in function_ids(old), what="new::echo on member-a")
    result = old.trigger({"function_id": "new::echo", "payload": {"n": 1}})
    assert (result["handled_by"], result["sdk"]) == ("new-on-b", NEWER_VERSION)
    wait_until(lambda: any(f["function_id"] == "old::echo" for f in
                           new.request("list_functions")["result"]),
               what="old::echo on member-b")
    result = new.request("call", function_id="old::echo", payload={"n": 2})["result"]
    assert result["handled_by"] == "old-on-a" and result["data"]["n"] == 2
    workers = {w["name"]: w for w in new.request("list_workers")["result"] if w["name"]}
    assert workers["old-on-a"]["engine_name"] == "member-a"
    assert workers["new-on-b"]["engine_name"] == "member-b"
