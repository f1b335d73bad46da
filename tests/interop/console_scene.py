"""
An engine with the web console and a real ``iii-sdk`` 0.10.0 worker that gives every
console page something to show: functions (one that fails on demand), an HTTP trigger
and a refused one, a named queue with retries and a dead-letter queue, state and a
stream. Used by the browser tests (test_console_browser.py) and by the script that
takes the documentation's screenshots (docs/console_screenshots.py).
"""

import threading
import time

from iii import InitOptions, TriggerAction, register_worker

from engine_process import EngineProcess, wait_until

CONSOLE_CONFIG = """
port: {port}
host: 127.0.0.1
invocation_timeout_ms: 20000
{auth}modules:
  - class: modules::rest_api::RestApiModule
    config: {{port: {http}, host: 127.0.0.1}}
  - class: modules::state::StateModule
  - class: modules::stream::StreamModule
    config: {{port: {streams}, host: 127.0.0.1}}
  - class: modules::queue::QueueModule
    config:
      queue_configs:
        jobs: {{max_retries: 1, concurrency: 2, backoff_ms: 10}}
  - class: modules::observability::ObservabilityModule
    config: {{exporter: memory}}
  - class: modules::console::ConsoleModule
    config: {{port: {console}, push_interval: 0.5, sample_interval: 1}}
"""

# The engine's auth: (issue 13) for the sign-in tests: the worker uses the first token.
WORKER_TOKEN = "worker-token-0123456789abcdef"
OPS_TOKEN = "ops-token-0123456789abcdef"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
AUTH_CONFIG = """auth:
  tokens:
    - {{name: worker, token: %s}}
    - {{name: ops, token: %s}}
    - name: viewer
      token: %s
      allowed_functions: ["engine::workers::list", "engine::functions::list",
                          "engine::triggers::list", "engine::metrics::list",
                          "demo::greet"]
""" % (WORKER_TOKEN, OPS_TOKEN, VIEWER_TOKEN)

# Text a worker controls, written into the page: it must show as text, never as markup.
HOSTILE = "<img src=x id=injected onerror=window.__pwned=1>"


class Scene:
    """
    The engine process, its console URL, and the worker.

    @ivar broken: while set, ``demo::flaky`` fails (with an error text holding markup).
    @ivar flaky_calls: the payloads ``demo::flaky`` was called with.
    """

    def __init__(self, workdir, auth=False):
        self.auth = auth
        config = CONSOLE_CONFIG.replace("{auth}", AUTH_CONFIG if auth else "")
        self.engine = EngineProcess(config, workdir, http=None, streams=None,
                                    console=None)
        self.broken = threading.Event()
        self.broken.set()
        self.flaky_calls = []
        self.worker = None

    @property
    def console_url(self):
        return "http://127.0.0.1:{}/".format(self.engine.ports["console"])

    def start(self):
        self.engine.start()
        url = self.engine.url + ("/?token=" + WORKER_TOKEN if self.auth else "")
        self.worker = register_worker(url, InitOptions(
            worker_name="orders-worker", otel={"enabled": False}))
        worker = self.worker
        worker.register_function(
            {"id": "demo::greet", "description": "Say hello to {name}"},
            lambda data: {"greeting": "Hello, {}!".format((data or {}).get("name"))})
        worker.register_function(
            {"id": "demo::slow", "description": "Takes 0.2 s"},
            lambda data: time.sleep(0.2) or {"done": data})
        worker.register_function(
            {"id": "demo::flaky", "description": "Fails while the scene is broken " + HOSTILE},
            self._flaky)
        worker.register_trigger({"type": "http", "function_id": "demo::greet",
                                 "config": {"api_path": "greet", "http_method": "POST"}})
        # Pending: no provider has this type.
        worker.register_trigger({"type": "nightly-report", "function_id": "demo::greet",
                                 "config": {"at": "02:00"}})
        # Refused by the REST API module: not a method.
        worker.register_trigger({"type": "http", "function_id": "demo::flaky",
                                 "config": {"api_path": "flaky", "http_method": "FETCH"}})
        wait_until(lambda: self.call("engine::functions::list", {}) and any(
            f["function_id"] == "demo::flaky"
            for f in self.call("engine::functions::list", {})["functions"]),
            what="the worker's functions")
        return self

    def _flaky(self, data):
        self.flaky_calls.append(data)
        if self.broken.is_set():
            raise RuntimeError("card declined " + HOSTILE)
        return {"charged": data}

    def call(self, function_id, data):
        return self.worker.trigger({"function_id": function_id, "payload": data})

    def enqueue(self, function_id, data):
        return self.worker.trigger({"function_id": function_id, "payload": data,
                                    "action": TriggerAction.Enqueue(queue="jobs")})

    def fill(self):
        """Some calls, state and stream items for the pages to show."""
        for name in ("Ada", "Grace", "Linus"):
            self.call("demo::greet", {"name": name})
        self.call("state::set", {"scope": "users", "key": "ada",
                                 "value": {"name": "Ada", "role": "admin"}})
        self.call("state::set", {"scope": "users", "key": "grace",
                                 "value": {"name": "Grace", "role": "dev"}})
        self.call("stream::set", {"stream_name": "chat", "group_id": "room-1",
                                  "item_id": "m1", "data": {"text": "hi " + HOSTILE}})

    def stop(self):
        if self.worker is not None and self.worker._thread.is_alive():
            self.worker.shutdown()
        self.engine.stop()
