"""
A newer official PyPI ``iii-sdk`` (0.25.0, newer_sdk_requirements.txt) against the
engine, next to 0.10.0 workers. It runs in a virtualenv of its own, built once and
cached beside pytest's temporary directories, as workers/newer_py_worker.py driven
through its stdin/stdout line protocol (sdk_process.py).

What it sends that 0.10.0 does not, and the engine must tolerate (engine-core.md
§11): ``namespace`` in its registrations and calls, ``metadata``/``features``/
``namespace`` in its worker description, a ``reattach`` message first after a
reconnect, and its OpenTelemetry socket on ``/otel``.
"""

import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from engine_process import PUBSUB_LOCAL, Waiter, rest_api, v010_config
from sdk_process import SdkProcess, WorkerFailed

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "newer_sdk_requirements.txt")
WORKER = os.path.join(HERE, "workers", "newer_py_worker.py")
NEWER_VERSION = "0.25.0"

PUBSUB_CONFIG = v010_config(PUBSUB_LOCAL, rest_api())


@pytest.fixture(scope="session")
def newer_python(tmp_path_factory):
    """
    A virtualenv with the newer SDK: built on first use into ``$III_INTEROP_CACHE``
    (.ci/run sets it to its scratch directory) or else pytest's temporary root,
    where later sessions reuse it (keyed by the requirements' hash), under a lock
    so that concurrent sessions build it once.

    @return: the path of its python.
    """
    with open(REQUIREMENTS, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    root = tmp_path_factory.getbasetemp().parent
    if os.environ.get("III_INTEROP_CACHE"):
        root = pathlib.Path(os.environ["III_INTEROP_CACHE"])
        root.mkdir(parents=True, exist_ok=True)
    venv = root / "iii-newer-sdk-{}".format(digest)
    python = venv / "bin" / "python"
    done = venv / "complete"
    with open(str(root / "iii-newer-sdk.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(str(venv), ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "-r", REQUIREMENTS], check=True, timeout=600)
            done.write_text(digest)
    return str(python)


@pytest.fixture
def newer_worker(newer_python):
    """
    @return: C{start(url, name, env=None)} giving a newer-SDK worker (an
        L{SdkProcess}) that has connected, stopped after the test.
    """
    workers = []

    def start(url, name, env=None):
        worker = SdkProcess([newer_python, WORKER, url, name], env=env)
        workers.append(worker)
        started = worker.wait_event(lambda l: l.get("event") == "started", timeout=30)
        assert started["sdk"] == NEWER_VERSION
        return worker

    yield start
    for worker in workers:
        worker.stop()


def _function_ids(worker):
    listed = worker.trigger({"function_id": "engine::functions::list", "payload": {}})
    return {f["function_id"] for f in listed["functions"]}


def test_newer_and_old_python_workers_call_each_other(engine, echo_peer, newer_worker):
    """
    Calls both ways, from inside a handler, fire-and-forget and to an unknown id.
    (With a worker namespace, calls are routed in it: test_current_sdks.py.)
    """
    old, seen = echo_peer(engine.url, "old-peer", "old::echo", "echo from 0.10.0")
    new = newer_worker(engine.url, "new-peer")
    new.request("register_function", function_id="new::echo", description="echo from 0.25")
    functions = {f["function_id"]: f for f in new.request("list_functions")["result"]}
    assert functions["new::echo"]["description"] == "echo from 0.25"
    assert "old::echo" in functions

    # 0.10.0 -> newer.
    result = old.trigger({"function_id": "new::echo", "payload": {"n": 1}})
    assert (result["handled_by"], result["sdk"], result["data"]["n"]) == (
        "new-peer", NEWER_VERSION, 1)
    # newer -> 0.10.0.
    result = new.request("call", function_id="old::echo", payload={"n": 2})["result"]
    assert result["handled_by"] == "old-peer" and result["data"]["n"] == 2
    # 0.10.0 -> newer, whose handler calls 0.10.0 while its own call is pending.
    result = old.trigger({"function_id": "new::echo", "payload": {
        "n": 3, "call": {"function_id": "old::echo", "payload": {"n": 30}}}})
    assert result["nested"]["handled_by"] == "old-peer" and result["nested"]["data"]["n"] == 30
    assert new.request("call", function_id="old::echo", payload={"n": 4}, void=True)["result"] is None
    assert seen.wait_for(lambda v: any(d["n"] == 4 for d in v))
    with pytest.raises(WorkerFailed) as failed:
        new.request("call", function_id="nope::missing", payload={})
    assert failed.value.error["code"] == "function_not_found"

    # Its telemetry socket is on /otel: accepted once, and not a worker.
    new.wait_line("[telemetry] OTel WS connected to {}/otel".format(engine.url))
    listed = new.request("list_workers")["result"]
    workers = {w["name"]: w for w in listed if w["name"]}
    assert (workers["new-peer"]["runtime"], workers["new-peer"]["version"]) == (
        "python", NEWER_VERSION)
    assert workers["new-peer"]["functions"] == ["new::echo"]
    assert (workers["old-peer"]["runtime"], workers["old-peer"]["version"]) == ("python", "0.10.0")
    assert [e["data"]["n"] for e in new.events("invoked")] == [1, 3]
    assert [w for w in listed if w["name"] is None] == []
    assert "OTel WS disconnected" not in new.text()


def test_newer_sdk_triggers(start_engine, echo_peer, newer_worker):
    """A module trigger type, and custom trigger types provided by either SDK."""
    engine = start_engine(PUBSUB_CONFIG, http=True)
    old, seen = echo_peer(engine.url, "old-peer", "old::echo", "echo from 0.10.0")
    new = newer_worker(engine.url, "new-triggers")
    new.request("register_function", function_id="new::news")
    new.request("register_trigger", type="subscribe", function_id="new::news",
                config={"topic": "news"})
    new.request("register_function", function_id="new::http", http=True)
    new.request("register_trigger", type="http", function_id="new::http",
                config={"api_path": "new/:id", "http_method": "POST"})
    new.request("register_trigger_type", type_id="new-hook", description="0.25 hooks")
    types = {t["id"]: t for t in new.request("list_trigger_types")["result"]}
    assert types["new-hook"]["description"] == "0.25 hooks" and "subscribe" in types

    # Its route answers (the list above ran after the route was bound).
    request = urllib.request.Request(
        "http://127.0.0.1:{}/new/9".format(engine.ports["http"]), data=b'{"q": 1}',
        method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        assert response.status == 201
        answer = json.loads(response.read())
    assert answer["handled_by"] == "new-triggers"
    assert (answer["data"]["path_params"], answer["data"]["body"]) == ({"id": "9"}, {"q": 1})

    # A 0.10.0 publish reaches the newer worker's subscription.
    old.trigger({"function_id": "publish", "payload": {"topic": "news", "data": {"h": 1}}})
    event = new.wait_event(lambda l: l.get("event") == "invoked"
                           and l["function_id"] == "new::news")
    assert event["data"] == {"h": 1}

    # 0.10.0 binds old::echo to the newer worker's type; the newer worker fires it.
    hook = old.register_trigger({"type": "new-hook", "function_id": "old::echo",
                                 "config": {"path": "/x"}})
    registered = new.wait_event(lambda l: l.get("event") == "trigger_registered")
    assert (registered["function_id"], registered["config"]) == ("old::echo", {"path": "/x"})
    results = new.request("fire", type_id="new-hook", payload={"n": 5})["results"]
    assert [r["result"]["data"]["n"] for r in results] == [5]
    assert any(d["n"] == 5 for d in seen.values)

    # The newer worker binds its function to a type a 0.10.0 worker provides.
    provided = Waiter()
    from iii.triggers import TriggerHandler

    class Provider(TriggerHandler):
        async def register_trigger(self, config):
            provided.add((config.id, config.function_id, config.config))

        async def unregister_trigger(self, config):
            pass

    old.register_trigger_type({"id": "old-hook", "description": "0.10 hooks"}, Provider())
    assert "old-hook" in {t["id"] for t in old.trigger(
        {"function_id": "engine::trigger-types::list", "payload": {}})["trigger_types"]}
    new.request("register_function", function_id="new::hooked")
    new.request("register_trigger", type="old-hook", function_id="new::hooked",
                config={"k": 1})
    [(trigger_id, function_id, config)] = provided.wait_for()
    assert (function_id, config) == ("new::hooked", {"k": 1})
    assert old.trigger({"function_id": function_id, "payload": {"k": 2}})["data"]["k"] == 2

    # Unlike 0.10.0, the newer SDK handles unregistertrigger: its provider is told.
    hook.unregister()
    removed = new.wait_event(lambda l: l.get("event") == "trigger_unregistered")
    assert removed["id"] == registered["id"]
    assert new.request("fire", type_id="new-hook", payload={})["results"] == []


def test_newer_sdk_reconnects_after_engine_restart(start_engine, sdk_worker, newer_worker):
    """
    After the engine restarts, the newer SDK reconnects, sends ``reattach`` with
    its previous worker id first, and replays its registrations: its function is
    callable again.
    """
    engine = start_engine()
    new = newer_worker(engine.url, "new-reconnect")
    new.request("register_function", function_id="new::again")
    new.request("list_functions")
    first_id = new.request("worker_id")["worker_id"]
    assert first_id

    engine.stop()
    engine.start()
    old = sdk_worker(engine.url, "old-after-restart")
    deadline = time.monotonic() + 30  # the SDK backs off 1 s, 2 s, ... between attempts
    while "new::again" not in _function_ids(old):
        assert time.monotonic() < deadline, "the newer worker never came back"
        time.sleep(0.1)  # polling the registry, bounded by the deadline
    result = old.trigger({"function_id": "new::again", "payload": {"n": 1}})
    assert result["handled_by"] == "new-reconnect"
    assert new.request("worker_id")["worker_id"] not in (None, first_id)
    assert "Traceback" not in engine.log()


class _CuttableProxy:
    """
    A TCP proxy on loopback to the engine whose client sides can be cut while the
    engine sides stay open: the engine then holds half-open worker connections, as
    after a network failure it has not noticed yet.
    """

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "ws://127.0.0.1:{}".format(self.listener.getsockname()[1])
        self.clients = []
        self.upstreams = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.clients.append(client)
            self.upstreams.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        # An end of either side stops this direction only: the engine's side is
        # never closed here.
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    return
                sink.sendall(data)
        except OSError:
            return

    def cut_clients(self):
        """Close the SDK side of every connection so far; keep the engine side."""
        for client in self.clients:
            client.shutdown(socket.SHUT_RDWR)
            client.close()

    def close(self):
        self.listener.close()
        for s in self.clients + self.upstreams:
            s.close()


def test_newer_sdk_reattach_retires_half_open_connection(engine, sdk_worker, newer_worker):
    """
    The newer SDK loses its socket while the engine still holds the other end: on
    reconnecting it sends ``reattach`` with the previous worker id and the token from
    ``workerregistered``, and the engine retires the old connection at once (without
    it, both would be listed until the ping timeout).
    """
    proxy = _CuttableProxy(engine.port)
    try:
        old = sdk_worker(engine.url, "observer")
        new = newer_worker(proxy.url, "new-reattach")
        new.request("register_function", function_id="new::fn")
        new.request("list_functions")
        first_id = new.request("worker_id")["worker_id"]

        def listed():
            workers = old.trigger({"function_id": "engine::workers::list", "payload": {}})
            return [w["id"] for w in workers["workers"] if w["name"] == "new-reattach"]

        assert listed() == [first_id]
        proxy.cut_clients()
        deadline = time.monotonic() + 20  # the SDK retries after about 1 s
        while True:
            ids = listed()
            if len(ids) == 1 and ids[0] != first_id:
                break
            assert time.monotonic() < deadline, "still listed: {}".format(ids)
            time.sleep(0.05)  # polling the registry, bounded by the deadline
        assert new.request("worker_id")["worker_id"] == ids[0]
        assert old.trigger({"function_id": "new::fn", "payload": {}})["handled_by"] == "new-reattach"
        assert "reattached: retiring {}".format(first_id) in engine.log()
    finally:
        proxy.close()
