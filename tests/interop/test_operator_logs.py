"""
What an operator sees in the log of a real engine process, run as Docker and systemd
run it: ``twist iii`` with its output not a terminal. Reported: raw JSON events,
``Starting factory <... at 0x...>`` lines, worker lines with a UUID and no name,
every Prometheus scrape logged, no log level setting.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.request

from engine_process import (
    LISTEN, TWISTD, EngineProcess, http_request, queue_module, state_file, state_redis,
    v010_config, wait_for_port, wait_until)

TWIST = os.path.join(os.path.dirname(TWISTD), "twist")

#: The REST API under its other class name (modules::rest_api), the module's default timeout.
HTTP_API = """\
  - class: modules::rest_api::RestApiModule
    config: {{host: 127.0.0.1, port: {http}}}
"""

#: Metrics in memory, and the Prometheus endpoint on the named port ``{prom}``.
PROMETHEUS = """\
  - class: modules::observability::ObservabilityModule
    config:
      exporter: memory
      prometheus: {{port: {prom}, host: 127.0.0.1}}
"""

CONFIG = v010_config("""\
  - class: modules::rest_api::RestApiModule
    config:
      host: 127.0.0.1
      port: {http}
      access_log: true
""", PROMETHEUS, head=LISTEN + "log_level: {level}\n")


class TwistEngine(EngineProcess):
    """The engine under ``twist`` (not twistd), stdout to a file as under systemd."""

    def start(self, timeout=20.0):
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [TWIST, "iii", "--config", self.config_path], cwd=self.workdir, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        for port in [self.port] + list(self.ports.values()):
            wait_for_port(port, timeout, self.process)
        return self


def _run(tmp_path, level, sdk_worker):
    template = CONFIG.replace("{level}", level)
    engine = TwistEngine(template, tmp_path, http=True, prom=True)
    engine.start()
    try:
        worker = sdk_worker(engine.url, "billing")
        worker.register_function({"id": "billing::hi"},
                                 lambda data: {"status_code": 200, "body": {"hi": 1}})
        worker.register_trigger({"type": "http", "function_id": "billing::hi",
                                 "config": {"api_path": "hi", "http_method": "GET"}})
        base = "http://127.0.0.1:{}".format(engine.ports["http"])

        def route_up():
            try:
                with urllib.request.urlopen(base + "/hi", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until(route_up, what="the /hi route")
        for _ in range(3):
            with urllib.request.urlopen("http://127.0.0.1:{}/metrics".format(
                    engine.ports["prom"]), timeout=5) as r:
                assert b"iii_" in r.read()
        if level == "info":
            wait_until(lambda: 'worker "billing"' in engine.log(), what="the name line")
        worker.shutdown()
        if level == "info":
            wait_until(lambda: "disconnected" in engine.log(), what="the disconnect line")
    finally:
        engine.stop()
    return engine.log()


def test_twist_logs_text_with_names_and_no_noise(tmp_path, sdk_worker):
    log = _run(tmp_path, "info", sdk_worker)
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines
    # Text, not JSON events.
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            continue
        raise AssertionError("a JSON event in the log: " + line)
    assert "Starting factory" not in log and "Stopping factory" not in log
    assert " at 0x" not in log
    # The worker by name, runtime and address; its disconnect with the close code.
    assert 'worker "billing" (python 0.10.0, pid ' in log
    assert "127.0.0.1, id " in log
    assert "disconnected: code 1000 (normal closure)" in log
    # The access log (switched on here) has the request; no scrape is logged.
    assert '"GET /hi HTTP/1.1" 200' in log
    assert "/metrics" not in log


def test_log_level_warn_keeps_only_warnings(tmp_path, sdk_worker):
    log = _run(tmp_path, "warn", sdk_worker)
    assert "billing" not in log and "GET /hi" not in log
    for line in log.splitlines():
        if line.strip():
            assert any(tag in line for tag in ("#warn]", "#error]", "#critical]")), line


HEALTH_CONFIG = v010_config(HTTP_API, state_file("./data/state"), PROMETHEUS, head=LISTEN)


def _get(url):
    status, _, body = http_request(url, timeout=5)
    return status, body


def test_health_endpoints_and_metrics_of_a_real_engine(start_engine, sdk_worker):
    import shutil

    engine = start_engine(HEALTH_CONFIG, http=True, prom=True)
    rest = "http://127.0.0.1:{}/_iii/health/".format(engine.ports["http"])
    prom = "http://127.0.0.1:{}/health/".format(engine.ports["prom"])
    for base in (rest, prom):
        status, body = _get(base + "live")
        assert status == 200 and json.loads(body)["status"] == "alive"
        status, body = _get(base + "ready")
        assert status == 200 and json.loads(body)["status"] == "ready", body
    worker = sdk_worker(engine.url, "metrics")
    try:
        worker.trigger({"function_id": "no::such", "payload": {}})
    except Exception:
        pass
    _get("http://127.0.0.1:{}/nothing".format(engine.ports["http"]))
    status, text = _get("http://127.0.0.1:{}/metrics".format(engine.ports["prom"]))
    text = text.decode()
    assert "iii_invocations_not_found_total 1" in text
    assert 'iii_http_responses_total{method="GET",status="404"} 1' in text
    assert "iii_build_info{" in text and "process_resident_memory_bytes" in text
    assert "process_open_fds" in text
    # The store's directory disappears: not ready, on both ports.
    shutil.rmtree(os.path.join(engine.workdir, "data", "state"))
    for base in (rest, prom):
        status, body = _get(base + "ready")
        assert status == 503
        assert json.loads(body)["status"] == "unready"
    status, _ = _get(rest + "live")
    assert status == 200
    # The image's HEALTHCHECK command says the same.
    probe = [sys.executable, "-m", "iii_twisted.healthcheck", rest + "ready"]
    result = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "503" in result.stdout
    os.makedirs(os.path.join(engine.workdir, "data", "state"))
    result = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout


def test_sigterm_drains_calls_in_flight(start_engine, sdk_worker):
    """
    SIGTERM: the call in flight finishes (up to shutdown_timeout_ms), then the process
    ends as twistd ends on SIGTERM (it re-raises the signal, which systemd counts as a
    clean stop).
    """
    import threading
    import time

    from engine_process import Waiter

    engine = start_engine(LISTEN + "shutdown_timeout_ms: 8000\n")
    host = sdk_worker(engine.url, "slow")
    started = threading.Event()

    def slow(data):
        started.set()
        time.sleep(1.5)
        return {"done": data["n"]}
    host.register_function({"id": "slow::fn"}, slow)
    caller = sdk_worker(engine.url, "caller")
    wait_until(lambda: "slow::fn" in [f.function_id for f in caller.list_functions()],
               what="slow::fn")
    outcome = Waiter()
    threading.Thread(target=lambda: outcome.add(caller.trigger(
        {"function_id": "slow::fn", "payload": {"n": 7}})), daemon=True).start()
    assert started.wait(10)
    engine.process.send_signal(signal.SIGTERM)
    assert outcome.wait_for() == [{"done": 7}]
    assert engine.process.wait(15) in (0, -signal.SIGTERM)
    log = engine.log()
    assert "shutting down: waiting up to 8.0s for 1 calls in flight" in log
    assert "shutting down: calls in flight finished" in log


def test_not_ready_while_redis_is_down(start_engine, own_redis):
    """Readiness is false while a required store (Redis) is unreachable, and comes back."""
    engine = start_engine(v010_config(
        HTTP_API, state_redis(own_redis.url),
        queue_module(adapter={"class": "modules::queue::RedisAdapter",
                              "config": {"redis_url": own_redis.url}}),
        head=LISTEN), http=True)
    ready = "http://127.0.0.1:{}/_iii/health/ready".format(engine.ports["http"])
    wait_until(lambda: _get(ready)[0] == 200, what="ready with Redis up")
    own_redis.stop()
    status, body = _get(ready)
    assert status == 503
    checks = json.loads(body)["checks"]
    assert checks["StateModule.store"].startswith("check failed"), checks
    assert checks["QueueModule.broker"].startswith("check failed"), checks
    assert _get(ready.replace("ready", "live"))[0] == 200
    own_redis.start()
    wait_until(lambda: _get(ready)[0] == 200, timeout=30, what="ready again")
