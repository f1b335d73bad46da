"""
Official npm ``iii-sdk`` workers (0.9.0, 0.11.2 and 0.22.1, installed side by side
from node/package-lock.json) against the engine, next to official PyPI ``iii-sdk``
0.10.0 workers: calls both ways and from inside handlers, module trigger types (``http``,
``subscribe``), custom trigger types provided by either SDK, the discovery functions,
and the telemetry socket (0.11.2 and 0.22.1 open it on ``/otel``).

Each Node worker is node/worker.mjs, driven through its stdin/stdout line protocol
(sdk_process.py). A registration followed by any call on the same worker connection
is in force when that call is handled (messages of one connection are handled in
order), so a worker's own ``list_*`` reply is the barrier before another worker
relies on what it registered.
"""

import fcntl
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request

import pytest
from iii.triggers import TriggerHandler

from engine_process import (
    LISTEN, OTEL, PUBSUB_LOCAL, REST_API, Waiter, http_functions, http_request, v010_config,
    wait_until)
from sdk_process import SdkProcess, WorkerFailed

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DIR = os.path.join(HERE, "node")
WORKER = os.path.join(NODE_DIR, "worker.mjs")

# npm alias (node/package.json) -> the iii-sdk version it must resolve to.
PACKAGES = {"iii-sdk-09": "0.9.0", "iii-sdk-011": "0.11.2", "iii-sdk-022": "0.22.1"}

JSON = {"content-type": "application/json"}

MODULES_CONFIG = v010_config(REST_API, PUBSUB_LOCAL, http_functions(["127.0.0.1"]))
OTEL_CONFIG = v010_config(OTEL, head=LISTEN)


def _installed_versions():
    versions = {}
    for alias in PACKAGES:
        try:
            with open(os.path.join(NODE_DIR, "node_modules", alias, "package.json")) as f:
                versions[alias] = json.load(f)["version"]
        except (OSError, ValueError, KeyError):
            versions[alias] = None
    return versions


@pytest.fixture(scope="session")
def node_sdks():
    """
    The npm SDKs of node/package-lock.json, installed (``npm ci``) if they are not
    yet (.ci/run installs them first).

    @return: the node project's directory.
    """
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise AssertionError("the Node interop tests need node and npm on PATH")
    with open(os.path.join(NODE_DIR, ".npm-ci.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be installing
        if _installed_versions() != PACKAGES:
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                           check=True, timeout=300)
    assert _installed_versions() == PACKAGES
    return NODE_DIR


@pytest.fixture
def node_worker(node_sdks):
    """
    @return: C{start(package, url, name, env=None)} giving a Node worker (an
        L{SdkProcess}) that the engine has registered, stopped after the test.
    """
    workers = []

    def start(package, url, name, env=None):
        worker = SdkProcess(["node", WORKER, package, url, name], cwd=node_sdks, env=env)
        workers.append(worker)
        worker.wait_line("[iii] Worker registered with ID:")
        return worker

    yield start
    for worker in workers:
        worker.stop()


def _function_ids(listed):
    return {f["function_id"] for f in listed}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_node_and_python_workers_call_each_other(package, engine, echo_peer, node_worker):
    version = PACKAGES[package]
    py, seen = echo_peer(engine.url, "py-peer", "py::echo", "echo from python")
    node = node_worker(package, engine.url, "node-peer")
    node.request("register_function", function_id="node::echo", description="echo from node")
    functions = {f["function_id"]: f for f in node.request("list_functions")["result"]}
    assert functions["node::echo"]["description"] == "echo from node"
    assert functions["py::echo"]["description"] == "echo from python"
    assert not [f for f in functions if f.startswith("engine::")]

    # Python -> Node.
    result = py.trigger({"function_id": "node::echo", "payload": {"n": 1}})
    assert (result["handled_by"], result["sdk"], result["data"]["n"]) == ("node-peer", version, 1)
    # Node -> Python.
    result = node.request("call", function_id="py::echo", payload={"n": 2})["result"]
    assert result["handled_by"] == "py-peer" and result["data"]["n"] == 2
    # Python -> Node, whose handler calls Python while its own call is pending.
    result = py.trigger({"function_id": "node::echo", "payload": {
        "n": 3, "call": {"function_id": "py::echo", "payload": {"n": 30}}}})
    assert result["handled_by"] == "node-peer"
    assert result["nested"]["handled_by"] == "py-peer" and result["nested"]["data"]["n"] == 30
    # Fire-and-forget from Node: nothing comes back, the call still arrives.
    assert node.request("call", function_id="py::echo", payload={"n": 4}, void=True)["result"] is None
    assert seen.wait_for(lambda v: any(d["n"] == 4 for d in v))
    # An unknown function fails at once with the engine's code.
    with pytest.raises(WorkerFailed) as failed:
        node.request("call", function_id="nope::missing", payload={})
    assert failed.value.error["code"] == "function_not_found"

    # Both workers described themselves (engine::workers::register).
    workers = node.request("list_workers")["result"]
    by_name = {w["name"]: w for w in workers if w["name"]}
    assert (by_name["node-peer"]["runtime"], by_name["node-peer"]["version"]) == ("node", version)
    assert by_name["node-peer"]["functions"] == ["node::echo"]
    assert (by_name["py-peer"]["runtime"], by_name["py-peer"]["version"]) == ("python", "0.10.0")
    assert [e["data"]["n"] for e in node.events("invoked")] == [1, 3]

    # Leaving removes what it registered.
    node.request("shutdown")
    node.stop()
    deadline = time.monotonic() + 10
    while "node::echo" in _function_ids(
            py.trigger({"function_id": "engine::functions::list", "payload": {}})["functions"]):
        assert time.monotonic() < deadline, "node::echo outlived its worker"
        time.sleep(0.05)  # polling the registry, bounded by the deadline


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_node_triggers_on_module_types(package, start_engine, sdk_worker, node_worker):
    """An ``http`` route and a ``subscribe`` trigger registered by a Node worker."""
    engine = start_engine(MODULES_CONFIG, http=True)
    base = "http://127.0.0.1:{}".format(engine.ports["http"])
    node = node_worker(package, engine.url, "node-modules")
    node.request("register_function", function_id="node::http", http=True)
    node.request("register_trigger", type="http", function_id="node::http",
                 config={"api_path": "node/orders/:id", "http_method": "POST"})
    node.request("register_function", function_id="node::news")
    node.request("register_trigger", type="subscribe", function_id="node::news",
                 config={"topic": "news"})
    triggers = {t["function_id"]: t for t in node.request("list_triggers")["result"]}
    assert triggers["node::http"]["trigger_type"] == "http"
    assert triggers["node::http"]["config"]["api_path"] == "node/orders/:id"
    assert triggers["node::news"]["trigger_type"] == "subscribe"
    assert triggers["node::news"]["config"] == {"topic": "news"}

    # The route answers with what the Node function returned. (The module binds a
    # route as soon as it registers the trigger: the list above ran after that.)
    status, _, body = http_request(base + "/node/orders/17", json.dumps({"qty": 2}).encode(),
                                   "POST", JSON)
    assert status == 201, body
    answer = json.loads(body)
    assert answer["handled_by"] == "node-modules" and answer["sdk"] == PACKAGES[package]
    assert answer["data"]["path_params"] == {"id": "17"}
    assert answer["data"]["body"] == {"qty": 2} and answer["data"]["method"] == "POST"

    # A publish from a Python worker and one from the Node worker itself.
    py = sdk_worker(engine.url, "py-publisher")
    assert py.trigger({"function_id": "publish",
                       "payload": {"topic": "news", "data": {"headline": 1}}}) is None
    node.request("call", function_id="publish",
                 payload={"topic": "news", "data": {"headline": 2}})
    node.wait_event(lambda l: l.get("event") == "invoked"
                    and l["function_id"] == "node::news" and l["data"] == {"headline": 2})
    news = [e["data"] for e in node.events("invoked") if e["function_id"] == "node::news"]
    assert sorted(d["headline"] for d in news) == [1, 2]

    # Unregistering the trigger takes the route away.
    node.request("unregister_trigger", trigger_id=0)
    node.request("list_triggers")  # barrier: the unregister is in force
    assert http_request(base + "/node/orders/17", b"{}", "POST", JSON)[0] == 404


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_custom_trigger_types_across_sdks(package, engine, echo_peer, node_worker):
    """A Node-provided trigger type used by Python, and a Python-provided one by Node."""
    py, seen = echo_peer(engine.url, "py-peer", "py::echo", "echo from python")
    node = node_worker(package, engine.url, "node-provider")
    node.request("register_trigger_type", type_id="node-hook", description="Node webhooks")
    node.request("list_functions")  # barrier: the type exists

    # Python binds py::echo to the Node type; Node is told and fires it.
    py.register_trigger({"type": "node-hook", "function_id": "py::echo",
                         "config": {"path": "/gh"}})
    registered = node.wait_event(lambda l: l.get("event") == "trigger_registered")
    assert (registered["type_id"], registered["function_id"], registered["config"]) == (
        "node-hook", "py::echo", {"path": "/gh"})
    results = node.request("fire", type_id="node-hook", payload={"n": 7})["results"]
    assert [(r["trigger_id"], r["result"]["data"]["n"]) for r in results] == [
        (registered["id"], 7)]
    assert any(d["n"] == 7 for d in seen.values)

    # Python provides a type; a Node trigger on it reaches the Python provider.
    provided = Waiter()

    class Provider(TriggerHandler):
        async def register_trigger(self, config):
            provided.add(("register", config.id, config.function_id, config.config))

        async def unregister_trigger(self, config):
            provided.add(("unregister", config.id, config.function_id, config.config))

    py.register_trigger_type({"id": "py-hook", "description": "Python hooks"}, Provider())
    py.trigger({"function_id": "engine::functions::list", "payload": {}})  # barrier
    node.request("register_function", function_id="node::hooked")
    node.request("register_trigger", type="py-hook", function_id="node::hooked",
                 config={"every": "tick"})
    [(kind, trigger_id, function_id, config)] = provided.wait_for()
    assert (kind, function_id, config) == ("register", "node::hooked", {"every": "tick"})
    result = py.trigger({"function_id": function_id, "payload": {"tick": 1}})
    assert result["handled_by"] == "node-provider" and result["data"]["tick"] == 1

    listed = {t["id"]: t for t in node.request("list_triggers")["result"]}
    assert listed[registered["id"]]["trigger_type"] == "node-hook"
    assert listed[trigger_id]["trigger_type"] == "py-hook"
    assert listed[trigger_id]["config"] == {"every": "tick"}

    # Node removes its trigger. (0.10.0 providers ignore the engine's
    # unregistertrigger, so only the registry shows it.)
    node.request("unregister_trigger", trigger_id=0)
    listed = {t["id"] for t in node.request("list_triggers")["result"]}
    assert trigger_id not in listed and registered["id"] in listed


def test_node_011_trigger_types_and_trigger_metadata(engine, sdk_worker, node_worker):
    """0.11.2: ``listTriggerTypes()`` (engine::trigger-types::list), trigger metadata."""
    node = node_worker("iii-sdk-011", engine.url, "node-011")
    node.request("register_trigger_type", type_id="node-hook", description="Node webhooks")
    types = {t["id"]: t for t in node.request("list_trigger_types")["result"]}
    assert types["node-hook"]["description"] == "Node webhooks"
    assert not [t for t in types if t.startswith("engine::")]
    internal = {t["id"] for t in node.request("list_trigger_types", include_internal=True)["result"]}
    assert {"node-hook", "engine::functions-available", "engine::workers-available"} <= internal

    # 0.11.2 sends metadata with a trigger; the provider receives it.
    node.request("register_function", function_id="node::target")
    node.request("register_trigger", type="node-hook", function_id="node::target",
                 config={"path": "/x"}, metadata={"team": "core"})
    registered = node.wait_event(lambda l: l.get("event") == "trigger_registered")
    assert (registered["config"], registered["metadata"]) == ({"path": "/x"}, {"team": "core"})


@pytest.mark.parametrize("package, otel_path", [("iii-sdk-09", ""), ("iii-sdk-011", "/otel"),
                                                ("iii-sdk-022", "/otel")])
def test_node_telemetry_socket(package, otel_path, start_engine, sdk_worker, node_worker):
    """
    The SDK's OpenTelemetry socket is accepted where that SDK opens it (0.11.2 on
    ``/otel``, 0.9.0 on ``/``, as a worker with no metadata) and its spans reach the
    observability module.
    """
    engine = start_engine(OTEL_CONFIG)
    reader = sdk_worker(engine.url, "reader")
    service = "node-{}-svc".format(package)
    node = node_worker(package, engine.url, "node-otel", env={"OTEL_SERVICE_NAME": service})
    node.wait_line("[OTel] Connected to engine at {}{}".format(engine.url, otel_path))
    node.request("register_function", function_id="node::traced")
    assert reader.trigger({"function_id": "node::traced", "payload": {"x": 1}})["data"]["x"] == 1

    workers = node.request("list_workers")["result"]
    ghosts = [w for w in workers if w["name"] is None]
    # 0.11.2's telemetry socket is not a worker; 0.9.0's is one, with no metadata.
    assert len(ghosts) == (0 if otel_path else 1), workers

    node.request("shutdown")  # flushes the SDK's spans over the telemetry socket
    node.stop()
    deadline = time.monotonic() + 15
    while True:
        listed = reader.trigger({"function_id": "engine::traces::list", "payload": {
            "name": "call node::traced", "search_all_spans": True}})
        if listed["total"]:
            break
        assert time.monotonic() < deadline, "the Node worker's span never arrived"
        time.sleep(0.05)  # polling a read function, bounded by the deadline
    [root] = listed["spans"]
    spans = reader.trigger({"function_id": "engine::traces::list",
                            "payload": {"trace_id": root["trace_id"]}})["spans"]
    # The engine's span of the call and, as its child, the Node handler's (named
    # "call node::traced" by 0.9/0.11, "execute node::traced" by 0.22).
    [engine_span] = [s for s in spans if s["service_name"] == "iii-test"]
    assert engine_span["name"] == "call node::traced"
    handler_spans = [s for s in spans if s["service_name"] == service
                     and s["name"].endswith(" node::traced")]
    assert [s["parent_span_id"] for s in handler_spans] == [engine_span["span_id"]], spans
    # No retry loop: the one telemetry connection was accepted and kept.
    assert "Reconnecting" not in node.text(), node.text()
    assert node.text().count("[OTel] Connected to engine") == 1


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_node_worker_gauges_are_its_latest_metrics(package, start_engine, sdk_worker,
                                                   node_worker):
    """
    The resource gauges a Node worker exports (MTRC frames over its telemetry socket)
    become its ``latest_metrics`` in ``engine::workers::list``.
    """
    engine = start_engine(OTEL_CONFIG)
    reader = sdk_worker(engine.url, "reader")
    node_worker(package, engine.url, "node-gauges",
                env={"III_TEST_METRICS_EXPORT_INTERVAL_MS": "200"})

    def node_metrics():
        listed = reader.trigger({"function_id": "engine::workers::list", "payload": {}})
        [mine] = [w for w in listed["workers"] if w["name"] == "node-gauges"]
        metrics = mine["latest_metrics"]
        return metrics if metrics and "memory_rss" in metrics else None

    metrics = wait_until(node_metrics, 15, "the Node worker's gauges")
    assert metrics["runtime"] == "node"
    assert metrics["memory_rss"] > 0 and metrics["memory_heap_used"] > 0
    assert metrics["uptime_seconds"] >= 0
    assert abs(metrics["timestamp_ms"] - time.time() * 1000) < 60_000
    # The reader (Python 0.10.0, no gauges) has none.
    listed = reader.trigger({"function_id": "engine::workers::list", "payload": {}})
    assert [w["latest_metrics"] for w in listed["workers"] if w["name"] == "reader"] == [None]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_data_channels_between_node_and_python(package, engine, sdk_worker, node_worker):
    """A Node worker streams to a Python reader and reads what a Python writer sends."""
    size = 1024 * 1024 + 5  # more than one 64 KiB frame, not a multiple of it
    expected = bytes(i % 251 for i in range(size))
    py = sdk_worker(engine.url, "py-channels")

    async def read_all(data):
        received = bytearray()
        async for chunk in data["reader"]:
            received.extend(chunk)
        return {"size": len(received), "sha256": hashlib.sha256(received).hexdigest()}

    async def write_all(data):
        await data["writer"].write(expected)
        await data["writer"].close_async()

    py.register_function({"id": "py::read_all"}, read_all)
    py.register_function({"id": "py::write_all"}, write_all)
    assert {"py::read_all", "py::write_all"} <= {f["function_id"] for f in py.trigger(
        {"function_id": "engine::functions::list", "payload": {}})["functions"]}
    node = node_worker(package, engine.url, "node-channels")

    sent = node.request("channel_send", function_id="py::read_all", size=size, timeout=30)
    assert sent["result"] == {"size": size, "sha256": hashlib.sha256(expected).hexdigest()}
    received = node.request("channel_receive", function_id="py::write_all", timeout=30)
    assert (received["size"], received["sha256"]) == (size, hashlib.sha256(expected).hexdigest())


class _Hook(http.server.BaseHTTPRequestHandler):
    """Answers a POSTed JSON object with {"doubled": 2 * n} and records the request."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.seen.add({"path": self.path, "body": body})
        answer = json.dumps({"doubled": 2 * body["n"]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture
def hook_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.seen = Waiter()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_node_http_invoked_function_and_functions_available(
        package, start_engine, sdk_worker, node_worker, hook_server):
    """
    A Node worker registers a function served by a URL (its own registerFunction
    signature in each version, one wire format), and hears of new functions through
    onFunctionsAvailable (an ``engine::functions-available`` trigger).
    """
    engine = start_engine(MODULES_CONFIG, http=True)
    node = node_worker(package, engine.url, "node-http-fn")
    node.request("watch_functions")
    url = "http://127.0.0.1:{}/double".format(hook_server.server_address[1])
    node.request("register_http_function", function_id="ext::double", url=url,
                 description="doubles n")
    functions = {f["function_id"]: f for f in node.request("list_functions")["result"]}
    assert functions["ext::double"]["description"] == "doubles n"

    py = sdk_worker(engine.url, "py-caller")
    assert py.trigger({"function_id": "ext::double", "payload": {"n": 21}}) == {"doubled": 42}
    [seen] = hook_server.seen.wait_for()
    assert seen["path"] == "/double" and seen["body"]["n"] == 21

    py.register_function({"id": "py::late"}, lambda data: None)
    notice = node.wait_event(lambda l: l.get("event") == "functions_available"
                             and "py::late" in l["function_ids"])
    assert "ext::double" in notice["function_ids"]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_node_http_responses_buffer_and_raw_text(package, start_engine, node_worker):
    """A Node handler's Buffer body goes out as bytes; a text/xml string goes out raw."""
    engine = start_engine(MODULES_CONFIG, http=True)
    base = "http://127.0.0.1:{}".format(engine.ports["http"])
    node = node_worker(package, engine.url, "node-shapes")
    for kind in ("buffer", "xml"):
        node.request("register_function", function_id="node::" + kind, http=kind)
        node.request("register_trigger", type="http", function_id="node::" + kind,
                     config={"api_path": "shapes/" + kind, "http_method": "GET"})
    node.request("list_triggers")  # barrier: the routes are bound
    request = urllib.request.Request(base + "/shapes/buffer")
    with urllib.request.urlopen(request, timeout=20) as response:
        assert response.headers["content-type"] == "image/png"
        assert response.read() == b"\x89PNG\r\n\x1a\n"
    with urllib.request.urlopen(base + "/shapes/xml", timeout=20) as response:
        assert response.headers["content-type"] == "text/xml"
        assert response.read() == b"<ok/>"
