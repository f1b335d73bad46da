"""
Live reload of a real engine process with a real iii-sdk 0.10.0 worker connected: the
worker keeps its connection and its registrations across three reloads (SIGHUP with a
new REST API port, a file edit seen by ``watch: true``, a broken file refused).
"""

import json
import os
import signal
import urllib.error
import urllib.request

from engine_process import free_port, wait_until

CONFIG = """\
watch: {watch}
watch_interval_ms: 200
invocation_timeout_ms: 20000
workers:
  - name: iii-worker-manager
    config: {{host: 127.0.0.1, port: {port}}}
  - name: http
    config: {{host: 127.0.0.1, port: {http}}}
  - name: state
    config:
      adapter:
        name: kv
        config: {{store_method: file_based, file_path: ./data/state, save_interval_ms: {save}}}
"""


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:
        return None, None


def _reloads(engine, words):
    return engine.log().count(words)


def test_worker_keeps_working_across_three_reloads(start_engine, sdk_worker):
    """Connection, functions, triggers and stored state all survive three reloads."""
    engine = start_engine(CONFIG.replace("{watch}", "false").replace("{save}", "5000"),
                          http=True)
    text = open(engine.config_path).read()
    old_http = engine.ports["http"]
    worker = sdk_worker(engine.url, "reload-worker")
    worker.register_function({"id": "reload::hello"},
                             lambda data: {"status_code": 200, "body": {"hi": True}})
    worker.register_trigger({"type": "http", "function_id": "reload::hello",
                             "config": {"api_path": "hello", "http_method": "GET"}})
    base = "http://127.0.0.1:{}/hello"
    wait_until(lambda: _get(base.format(old_http))[0] == 200, 10, "route")
    worker.trigger({"function_id": "state::set",
                    "payload": {"scope": "s", "key": "k", "value": 42}})

    def workers():
        return worker.trigger({"function_id": "engine::workers::list", "payload": {}})

    [before] = [w for w in workers()["workers"] if w.get("name") == "reload-worker"]

    def still_the_same_worker():
        [now] = [w for w in workers()["workers"] if w.get("name") == "reload-worker"]
        assert now["id"] == before["id"]  # not a reconnection
        assert "reload::hello" in {f.function_id for f in worker.list_functions()}
        assert worker.trigger({"function_id": "reload::hello", "payload": {}}) == \
            {"status_code": 200, "body": {"hi": True}}
        assert worker.trigger({"function_id": "state::get",
                               "payload": {"scope": "s", "key": "k"}}) == 42

    # 1. SIGHUP after moving the REST API to another port.
    new_http = free_port()
    text = text.replace("port: {}}}".format(old_http), "port: {}}}".format(new_http))
    text = text.replace("watch: false", "watch: true")
    with open(engine.config_path, "w") as f:
        f.write(text)
    os.killpg(engine.process.pid, signal.SIGHUP)
    wait_until(lambda: _reloads(engine, "config reloaded") == 1, 10, "first reload")
    assert "restarted iii-http" in engine.log()
    assert _get(base.format(new_http)) == (200, {"hi": True})
    assert _get(base.format(old_http))[0] is None  # the old port is closed
    still_the_same_worker()

    # 2. A file edit, seen by watch: true: the state module restarts on its file store.
    with open(engine.config_path, "w") as f:
        f.write(text.replace("save_interval_ms: 5000", "save_interval_ms: 1000"))
    wait_until(lambda: _reloads(engine, "config reloaded") == 2, 10, "second reload")
    assert "restarted iii-state" in engine.log()
    still_the_same_worker()
    assert _get(base.format(new_http)) == (200, {"hi": True})

    # 3. A broken file: refused, logged, the running config kept.
    with open(engine.config_path, "w") as f:
        f.write(text.replace("name: http", "name: htp"))
    wait_until(lambda: "reload refused, running config kept" in engine.log(), 10,
               "third reload refused")
    assert "did you mean http?" in engine.log()
    still_the_same_worker()
    assert _get(base.format(new_http)) == (200, {"hi": True})
    assert engine.process.poll() is None
