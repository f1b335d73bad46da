"""
Observability against real clients: an official ``iii-sdk[otel]`` worker's spans and
logs become readable through ``engine::traces::*``/``engine::logs::list``, joined to
the engine's span of the call; the OTLP exporter really sends to a collector (a
stand-in HTTP server on loopback); the Prometheus endpoint answers; a bad telemetry
frame leaves the connection open.
"""

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from engine_process import LISTEN, OTEL, Waiter, v010_config

HERE = os.path.dirname(os.path.abspath(__file__))

OTEL_CONFIG = v010_config(OTEL, head=LISTEN)

EXPORT_CONFIG = v010_config("""\
  - class: modules::observability::OtelModule
    config:
      service_name: iii-export-test
      exporter: both
      endpoint: http://127.0.0.1:COLLECTOR_PORT
      export_interval_ms: 100
      logs_exporter: both
      logs_console_output: false
      metrics_exporter: both
      metrics_export_interval_ms: 200
      prometheus:
        port: {prom}
        host: 127.0.0.1
""", head=LISTEN)


@pytest.fixture
def reader(sdk_worker):
    """A plain SDK client (its own OTel off) for calling the read functions."""
    return lambda url: sdk_worker(url, "reader")


@pytest.fixture
def otel_worker():
    """Start tests/interop/otel_worker.py against an engine; stopped after the test."""
    processes = []

    def start(url):
        env = dict(os.environ, III_URL=url, OTEL_ENABLED="true",
                   OTEL_SERVICE_NAME="otel-worker-svc")
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "otel_worker.py"), url], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        processes.append(process)
        return _Worker(process)

    yield start
    for process in processes:
        if process.poll() is None:
            try:
                process.stdin.write("exit\n")
                process.stdin.flush()
                process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait(10)


class _Worker:
    def __init__(self, process):
        self.process = process
        self.lines = Waiter()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect()

    def _read(self):
        for line in self.process.stdout:
            self.lines.add(json.loads(line))

    def expect(self, count=None, timeout=30.0):
        count = count or len(self.lines.values) + 1
        return self.lines.wait_for(lambda v: len(v) >= count, timeout)[count - 1]

    def command(self, text):
        count = len(self.lines.values) + 1
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self.expect(count)


def _poll(fetch, predicate, timeout=15.0):
    """Call C{fetch()} until C{predicate(result)}; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    result = fetch()
    while not predicate(result):
        if time.monotonic() > deadline:
            raise AssertionError("timed out; last result {!r}".format(result)[:2000])
        time.sleep(0.05)  # polling a read function, not waiting out a race
        result = fetch()
    return result


def test_sdk_worker_spans_and_logs_are_readable(start_engine, reader, otel_worker):
    engine = start_engine(OTEL_CONFIG)
    client = reader(engine.url)
    worker = otel_worker(engine.url)
    called = worker.command("call")
    assert called["result"] == {"done": True, "n": 7}
    trace_id = called["trace_id"]
    assert worker.command("flush") == {"flushed": True}

    def spans():
        return client.trigger({"function_id": "engine::traces::list",
                               "payload": {"trace_id": trace_id}})

    listed = _poll(spans, lambda r: r["total"] >= 3)
    by_name = {s["name"]: s for s in listed["spans"]}
    assert listed["total"] == 3 and len(by_name) == 3, by_name
    root, engine_span = by_name.pop("client-root"), by_name.pop("call otel::work")
    # The SDK names its handler span "call <handler's __name__>" (its own wrapper's).
    (handler_name, handler), = by_name.items()
    assert handler_name.startswith("call ")
    # The engine span is the child of the caller's, and the worker's span its child.
    assert root["span_id"] == called["span_id"] and root["parent_span_id"] is None
    assert engine_span["parent_span_id"] == root["span_id"]
    assert handler["parent_span_id"] == engine_span["span_id"]
    assert engine_span["service_name"] == "iii-test"
    assert root["service_name"] == handler["service_name"] == "otel-worker-svc"
    assert engine_span["status"] == handler["status"] == "ok"

    # As a list of traces: one entry, the root.
    roots = client.trigger({"function_id": "engine::traces::list", "payload": {}})
    assert trace_id in [s["trace_id"] for s in roots["spans"]]
    assert all(s["name"] == "client-root" for s in roots["spans"]
               if s["trace_id"] == trace_id)
    tree = client.trigger({"function_id": "engine::traces::tree",
                           "payload": {"trace_id": trace_id}})["roots"]
    assert [n["name"] for n in tree] == ["client-root"]
    assert [n["name"] for n in tree[0]["children"]] == ["call otel::work"]
    assert [n["name"] for n in tree[0]["children"][0]["children"]] == [handler_name]

    def logs():
        return client.trigger({"function_id": "engine::logs::list",
                               "payload": {"trace_id": trace_id}})

    log, = _poll(logs, lambda r: r["total"] >= 1)["logs"]
    assert log["body"] == "handling work"
    assert (log["severity_text"], log["severity_number"]) == ("INFO", 9)
    assert log["span_id"] == handler["span_id"]
    assert log["service_name"] == "otel-worker-svc"

    metrics = client.trigger({"function_id": "engine::metrics::list", "payload": {}})
    assert metrics["engine_metrics"]["invocations"]["by_function"]["otel::work"]["calls"] == 1
    assert metrics["engine_metrics"]["telemetry"]["invalid_frames"] == {
        "OTLP": 0, "LOGS": 0, "MTRC": 0}


class _Collector(http.server.ThreadingHTTPServer):
    """A stand-in OpenTelemetry collector (OTLP/HTTP) on loopback."""

    def __init__(self):
        self.received = Waiter()
        http.server.ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0), _CollectorHandler)


class _CollectorHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.received.add((self.path, self.headers.get("content-type"), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_otlp_exporter_sends_to_collector_and_prometheus_serves(collector, start_engine,
                                                                 reader):
    # (collector first: fixtures stop in reverse, so it outlives the engine's last export)
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    config = EXPORT_CONFIG.replace("COLLECTOR_PORT", str(collector.server_address[1]))
    engine = start_engine(config, prom=True)
    client = reader(engine.url)
    client.register_function({"id": "app::ping"}, lambda data: {"pong": data})
    assert client.trigger({"function_id": "app::ping", "payload": 1}) == {"pong": 1}
    client.trigger({"function_id": "engine::log::warn",
                    "payload": {"message": "exported log", "service_name": "app"}})

    def span_names(received):
        names = set()
        for path, content_type, body in received:
            if path == "/v1/traces":
                assert content_type == "application/x-protobuf"
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    service = [a.value.string_value for a in rs.resource.attributes
                               if a.key == "service.name"]
                    for ss in rs.scope_spans:
                        names.update((service[0], s.name) for s in ss.spans)
        return names

    received = collector.received.wait_for(
        lambda r: ("iii-export-test", "call app::ping") in span_names(r), timeout=15)

    def log_bodies(received):
        bodies = []
        for path, _, body in received:
            if path == "/v1/logs":
                for rl in ExportLogsServiceRequest.FromString(body).resource_logs:
                    for sl in rl.scope_logs:
                        bodies.extend(r.body.string_value for r in sl.log_records)
        return bodies

    collector.received.wait_for(lambda r: "exported log" in log_bodies(r), timeout=15)

    def exported_calls(received):
        calls = {}
        for path, _, body in received:
            if path == "/v1/metrics":
                for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            if metric.name == "iii.invocations":
                                for point in metric.sum.data_points:
                                    fid = [a.value.string_value for a in point.attributes
                                           if a.key == "function_id"]
                                    calls[fid[0]] = point.as_int
        return calls

    collector.received.wait_for(lambda r: exported_calls(r).get("app::ping") == 1,
                                timeout=15)
    assert ("iii-export-test", "call app::ping") in span_names(received)

    # exporter: both keeps them in memory too
    listed = client.trigger({"function_id": "engine::traces::list",
                             "payload": {"name": "app::ping"}})
    assert listed["total"] == 1

    url = "http://127.0.0.1:{}/metrics".format(engine.ports["prom"])
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    assert 'iii_invocations_total{function_id="app::ping",status="success"} 1' in text
    assert 'iii_invocation_duration_seconds_count{function_id="app::ping"} 1' in text
    assert "iii_workers_active 1" in text


def test_bad_telemetry_frame_keeps_the_connection(start_engine):
    from websockets.sync.client import connect

    engine = start_engine(OTEL_CONFIG)
    with connect(engine.url) as ws:
        registered = json.loads(ws.recv(timeout=10))
        assert registered["type"] == "workerregistered"
        ws.send(b"OTLP{this is not json")
        ws.send(b"LOGS" + b"\xff\xfe")
        ws.send(b"MTRC[]")
        ws.send(json.dumps({"type": "invokefunction", "invocation_id": "i-1",
                            "function_id": "engine::metrics::list", "data": {}}))
        answer = json.loads(ws.recv(timeout=10))
    assert answer["type"] == "invocationresult" and answer["invocation_id"] == "i-1"
    assert answer["result"]["engine_metrics"]["telemetry"]["invalid_frames"] == {
        "OTLP": 1, "LOGS": 1, "MTRC": 1}


def test_engine_log_lines_are_readable(start_engine, reader):
    """The engine's own log lines (a worker connecting, a dropped frame) are stored."""
    from websockets.sync.client import connect

    engine = start_engine(OTEL_CONFIG)
    with connect(engine.url) as ws:
        worker_id = json.loads(ws.recv(timeout=10))["worker_id"]
        ws.send(b"OTLP{this is not json")
    client = reader(engine.url)

    def engine_logs():
        return client.trigger({"function_id": "engine::logs::list", "payload": {}})["logs"]

    def seen(logs):
        bodies = [(l["severity_text"], l["body"]) for l in logs
                  if l["service_name"] == "iii-test"]
        return (any(severity == "INFO" and _disconnect_line(body, worker_id)
                    for severity, body in bodies)
                and any(severity == "WARN" and "invalid OTLP telemetry frame" in body
                        for severity, body in bodies))

    logs = _poll(engine_logs, seen)
    line = [l for l in logs if _disconnect_line(l["body"], worker_id)][0]
    assert line["attributes"] == {"log.namespace": "iii_twisted.engine.Engine"}


def _disconnect_line(body, worker_id):
    """Is C{body} the engine's line for worker C{worker_id} leaving (iii_twisted.oplog)?"""
    return body.startswith("worker ") and "id {}) disconnected".format(worker_id) in body


def test_shutdown_with_collector_down_is_bounded(start_engine, reader):
    from engine_process import free_port

    config = EXPORT_CONFIG.replace("COLLECTOR_PORT", str(free_port())).replace(
        "export_interval_ms: 100", "export_interval_ms: 100\n      shutdown_timeout_ms: 1000")
    engine = start_engine(config, prom=True)
    client = reader(engine.url)
    client.register_function({"id": "app::ping"}, lambda data: data)
    assert client.trigger({"function_id": "app::ping", "payload": 2}) == 2
    # (the reader stays connected: the SDK's shutdown() must run once, in teardown)
    started = time.monotonic()
    process = engine.process
    engine.stop()
    # twistd shuts down cleanly and then ends itself with the signal it got (-15);
    # stop() would have used SIGKILL (-9) after 10 s.
    assert process.returncode == -15
    assert time.monotonic() - started < 5.0
    assert "did not finish within 1.0s" in engine.log()
    assert "Server Shut Down" in engine.log()
