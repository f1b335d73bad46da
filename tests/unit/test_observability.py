"""
The observability module (iii_twisted.modules.observability) on a task.Clock: config,
OTLP JSON decoding, bounds, engine spans and trace propagation, read functions,
metrics, Prometheus text and the log trigger.
"""

import base64
import json

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogPublisher, Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from iii_twisted.config import ConfigError, parse_config
from iii_twisted.engine import VOID
from iii_twisted.interfaces import (
    ICallObserver, IModule, ITelemetrySink, ITriggerProvider, IWorkerMetricsSource,
)
from iii_twisted.modules import build_module
from iii_twisted.modules.observability import parse_config as parse_module_config
from iii_twisted.observability import otlp
from iii_twisted.observability.metrics import PrometheusResource, prometheus_text
from iii_twisted.observability.tracing import (
    Sampler, format_traceparent, parse_traceparent,
)
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, make_engine, result_of

OTEL = "modules::observability::OtelModule"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = "00-{}-{}-01".format(TRACE, PARENT)


def make(config=None, start=True, **engine_kwargs):
    engine, clock = make_engine(**engine_kwargs)
    clock.advance(1_000_000)
    module = build_module(OTEL, engine, {"exporter": "memory", **(config or {})}, clock)
    # The engine's own log lines are captured from this publisher, not the process's.
    module.log_publisher = LogPublisher()
    if start:
        module.startService()
    return engine, clock, module


def call(engine, function_id, data=None, **kwargs):
    return result_of(engine.call(function_id, data, **kwargs))


def span_json(trace_id=TRACE, span_id="1111111111111111", parent=None, name="work",
              start=1_000, end=3_000_000, status=1, attrs=None):
    span = {
        "traceId": trace_id, "spanId": span_id, "name": name, "kind": 2,
        "startTimeUnixNano": str(start), "endTimeUnixNano": str(end),
        "attributes": attrs or [{"key": "http.status", "value": {"intValue": "200"}},
                                {"key": "ok", "value": {"boolValue": True}}],
        "events": [{"name": "ev", "timeUnixNano": "5", "attributes": []}],
        "links": [],
        "status": {"code": status, "message": ""},
    }
    if parent:
        span["parentSpanId"] = parent
    return span


def traces_frame(*spans, service="worker-svc"):
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name",
                                     "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "iii-python-sdk", "version": "0.10.0"},
                        "spans": list(spans)}],
    }]}).encode()


def log_json(body="hello", severity=9, text="INFO", trace_id=None, span_id=None, ts=10):
    record = {"timeUnixNano": str(ts), "observedTimeUnixNano": str(ts),
              "severityNumber": severity, "severityText": text,
              "body": {"stringValue": body},
              "attributes": [{"key": "log.data", "value": {"kvlistValue": {"values": [
                  {"key": "order", "value": {"stringValue": "o-1"}}]}}}]}
    if trace_id:
        record["traceId"] = trace_id
    if span_id:
        record["spanId"] = span_id
    return record


def logs_frame(*records, service="worker-svc"):
    return json.dumps({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name",
                                     "value": {"stringValue": service}}]},
        "scopeLogs": [{"scope": {"name": "iii.logger", "version": ""},
                       "logRecords": list(records)}],
    }]}).encode()


def metrics_frame(ts=2_000_000_000_000_000):
    return json.dumps({"resourceMetrics": [{
        "resource": {"attributes": [{"key": "service.name",
                                     "value": {"stringValue": "node-worker"}}]},
        "scopeMetrics": [{"scope": {"name": "iii", "version": "1"}, "metrics": [
            {"name": "iii.worker.memory.rss", "unit": "By",
             "gauge": {"dataPoints": [{"attributes": [
                 {"key": "worker.id", "value": {"stringValue": "w1"}}],
                 "timeUnixNano": str(ts), "asInt": "1024"}]}},
            {"name": "requests", "sum": {"isMonotonic": True, "aggregationTemporality": 2,
                                         "dataPoints": [{"timeUnixNano": str(ts),
                                                         "asDouble": 3.5}]}},
            {"name": "latency", "histogram": {"dataPoints": [{
                "timeUnixNano": str(ts), "count": "3", "sum": 0.6,
                "bucketCounts": ["1", "2"], "explicitBounds": [0.1]}]}},
        ]}],
    }]}).encode()


# -- config ----------------------------------------------------------------------------


# The OtelModule entry of ../shared/spec/sdk-suite-config.yaml, verbatim.
SUITE_ENTRY = """
modules:
  - class: modules::observability::OtelModule
    config:
      enabled: ${OTEL_ENABLED:true}
      service_name: ${OTEL_SERVICE_NAME:iii-test}
      service_version: ${SERVICE_VERSION:0.2.0}
      exporter: ${OTEL_EXPORTER_TYPE:memory}
      endpoint: ${OTEL_EXPORTER_OTLP_ENDPOINT:http://localhost:4317}
      sampling_ratio: 1.0
      memory_max_spans: ${OTEL_MEMORY_MAX_SPANS:10000}
      metrics_enabled: true
      metrics_exporter: ${OTEL_METRICS_EXPORTER:memory}
      metrics_retention_seconds: 3600
      metrics_max_count: 10000
      logs_enabled: ${OTEL_LOGS_ENABLED:true}
      logs_exporter: ${OTEL_LOGS_EXPORTER:memory}
      logs_max_count: ${OTEL_LOGS_MAX_COUNT:1000}
      logs_retention_seconds: ${OTEL_LOGS_RETENTION_SECONDS:3600}
      logs_sampling_ratio: ${OTEL_LOGS_SAMPLING_RATIO:1.0}
      logs_console_output: ${OTEL_LOGS_CONSOLE_OUTPUT:false}
"""


def test_suite_config_loads_every_key():
    config = parse_config(SUITE_ENTRY, environ={})
    (name, module_config, _), = config.modules
    engine, clock = make_engine()
    module = build_module(name, engine, module_config, clock)
    o = module.options
    assert (o.service_name, o.exporter, o.memory_max_spans, o.logs_max_count) == (
        "iii-test", "memory", 10000, 1000)
    assert o.logs_console_output is False and o.enabled is True
    verifyObject(IModule, module)
    verifyObject(ITelemetrySink, module)
    verifyObject(ITriggerProvider, module)
    verifyObject(ICallObserver, module.tracer)


def test_seed_config_class_name_loads():
    engine, clock = make_engine()
    module = build_module("modules::observability::ObservabilityModule", engine,
                          {"exporter": "memory"}, clock)
    assert engine.telemetry_sink is module
    assert "engine::traces::list" in engine.functions
    assert "log" in engine.trigger_types


def test_all_documented_keys_load():
    parse_module_config({
        "enabled": True, "service_name": "s", "service_version": "1",
        "service_namespace": "ns", "exporter": "memory", "endpoint": "http://c:4318",
        "sampling_ratio": 0.5,
        "sampling": {"default": 0.25, "parent_based": False,
                     "rules": [{"operation": "orders::*", "rate": 1.0},
                               {"service": "iii*", "rate": 0.1}],
                     "rate_limit": {"max_traces_per_second": 100}},
        "memory_max_spans": 10, "metrics_enabled": True, "metrics_exporter": "memory",
        "metrics_retention_seconds": 60, "metrics_max_count": 10, "logs_enabled": True,
        "logs_exporter": "memory", "logs_max_count": 10, "logs_retention_seconds": 60,
        "logs_batch_size": 5, "logs_flush_interval_ms": 100, "logs_sampling_ratio": 1.0,
        "logs_console_output": False, "level": "debug", "log_level": "info",
        "format": "json",
        "alerts": [{"name": "errors", "metric": "invocations.error", "threshold": 5,
                    "operator": ">=", "window_seconds": 60, "cooldown_seconds": 60,
                    "enabled": True, "action": {"type": "webhook", "url": "http://x/"}}],
        "prometheus": {"port": 9464, "host": "127.0.0.1"}, "some_future_key": 1,
    })


@pytest.mark.parametrize("config, key", [
    ({"exporter": "zipkin"}, "exporter"),
    ({"sampling_ratio": 2}, "sampling_ratio"),
    ({"sampling_ratio": "x"}, "sampling_ratio"),
    ({"memory_max_spans": 0}, "memory_max_spans"),
    ({"logs_max_count": "many"}, "logs_max_count"),
    ({"enabled": "yes"}, "enabled"),
    ({"sampling": {"rules": [{"operation": "x"}]}}, "sampling.rules[0].rate"),
    ({"sampling": {"rules": [{"rate": 1.5}]}}, "sampling.rules[0].rate"),
    ({"alerts": [{"name": "a", "threshold": 1}]}, "alerts[0].metric"),
    ({"alerts": [{"name": "a", "metric": "m", "threshold": 1,
                  "action": {"type": "function"}}]}, "alerts[0].action.path"),
    ({"prometheus": 9464}, "prometheus"),
    ({"protocol": "thrift"}, "protocol"),
    ({"level": "loud"}, "level"),
])
def test_bad_config_names_the_key(config, key):
    with pytest.raises(ConfigError) as e:
        parse_module_config(config)
    assert e.value.key == key


def test_otlp_needing_a_missing_exporter_package_is_a_config_error():
    # The gRPC exporter is not installed (the otel extra ships the HTTP one).
    import opentelemetry.sdk  # noqa: F401  (the test extra installs it)
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
        pytest.fail("the gRPC exporter is installed; this test expects it not to be")
    except ImportError:
        pass
    with pytest.raises(ConfigError) as e:
        parse_module_config({"exporter": "otlp", "protocol": "grpc"})
    assert e.value.key == "exporter" and "grpc" in e.value.message


# -- traceparent and sampling ------------------------------------------------------------


def test_traceparent_parsing():
    assert parse_traceparent(TRACEPARENT) == (TRACE, PARENT, True)
    assert parse_traceparent("00-{}-{}-00".format(TRACE, PARENT)) == (TRACE, PARENT, False)
    for bad in (None, "", "garbage", "00-{}-{}".format(TRACE, PARENT),
                "ff-{}-{}-01".format(TRACE, PARENT), "00-{}-{}-01".format("0" * 32, PARENT),
                "00-{}-{}-01".format(TRACE, "0" * 16), TRACEPARENT + "-extra",
                "00-{}-{}-01".format(TRACE[:-1] + "g", PARENT)):
        assert parse_traceparent(bad) is None, bad
    assert format_traceparent(TRACE, PARENT, False) == "00-{}-{}-00".format(TRACE, PARENT)


def test_sampler_ratio_rules_parent_and_rate_limit():
    engine, clock = make_engine()
    low = "0" * 16 + "0" * 16       # lowest trace id half: always under the ratio
    high = "0" * 16 + "f" * 16
    s = Sampler(clock, default=0.5, rules=[{"operation": "orders::*", "service": None,
                                            "rate": 0.0}])
    assert s.should_sample("app::x", low, None) is True
    assert s.should_sample("app::x", high, None) is False
    assert s.should_sample("orders::create", low, None) is False
    assert s.should_sample("orders::create", low, True) is True  # parent based
    assert s.should_sample("app::x", high, False) is False
    limited = Sampler(clock, default=1.0, max_traces_per_second=2)
    assert [limited.should_sample("a", low, None) for _ in range(3)] == [True, True, False]
    clock.advance(0.5)
    assert limited.should_sample("a", low, None) is True
    assert limited.should_sample("a", low, True) is True  # children are not limited


# -- engine spans ------------------------------------------------------------------------


class EngineSpanTests(SynchronousTestCase):

    def setUp(self):
        self.engine, self.clock, self.module = make()
        self.worker = FakeWorkerConnection.connect(self.engine)
        self.worker.receive({"type": "registerfunction", "id": "app::work"})

    def test_engine_span_joins_caller_and_is_passed_on(self):
        caller = FakeWorkerConnection.connect(self.engine)
        caller.receive({"type": "invokefunction", "invocation_id": "i-1",
                        "function_id": "app::work", "data": {"x": 1},
                        "traceparent": TRACEPARENT})
        invoke, = self.worker.sent_of_type("invokefunction")
        trace_id, engine_span_id, sampled = parse_traceparent(invoke["traceparent"])
        self.assertEqual((trace_id, sampled), (TRACE, True))
        self.assertNotEqual(engine_span_id, PARENT)
        self.clock.advance(0.25)
        self.worker.receive({"type": "invocationresult", "invocation_id":
                             invoke["invocation_id"], "function_id": "app::work",
                             "result": {"ok": True}})
        spans = call(self.engine, "engine::traces::list", {})["spans"]
        self.assertEqual(len(spans), 1)
        span = spans[0]
        self.assertEqual((span["trace_id"], span["span_id"], span["parent_span_id"]),
                         (TRACE, engine_span_id, PARENT))
        self.assertEqual(span["status"], "ok")
        self.assertEqual(span["end_time_unix_nano"] - span["start_time_unix_nano"],
                         250_000_000)
        self.assertIn(["iii.caller_worker_id", caller.worker_id], span["attributes"])
        self.assertEqual(span["service_name"], "iii")

    def test_new_trace_without_or_with_bad_traceparent(self):
        for traceparent in (None, "not-a-traceparent"):
            self.engine.call("app::work", {}, traceparent=traceparent)
        invokes = self.worker.sent_of_type("invokefunction")
        contexts = [parse_traceparent(m["traceparent"]) for m in invokes]
        self.assertTrue(all(c is not None and c[2] for c in contexts))
        self.assertNotEqual(contexts[0][0], contexts[1][0])

    def test_unsampled_caller_is_followed_and_not_recorded(self):
        self.engine.call("app::work", {}, traceparent="00-{}-{}-00".format(TRACE, PARENT))
        invoke, = self.worker.sent_of_type("invokefunction")
        self.assertEqual(parse_traceparent(invoke["traceparent"])[::2], (TRACE, False))
        self.worker.receive({"type": "invocationresult", "invocation_id":
                             invoke["invocation_id"], "function_id": "app::work"})
        self.assertEqual(call(self.engine, "engine::traces::list", {})["total"], 0)
        # ...but the call is still counted
        self.assertEqual(self.module.metrics.functions["app::work"].calls, 1)

    def test_failed_call_gives_error_span_and_error_count(self):
        d = self.engine.call("app::work", {})
        invoke, = self.worker.sent_of_type("invokefunction")
        self.worker.receive({"type": "invocationresult", "invocation_id":
                             invoke["invocation_id"], "function_id": "app::work",
                             "error": {"code": "boom", "message": "it broke"}})
        self.failureResultOf(d, InvocationError)
        span, = call(self.engine, "engine::traces::list", {})["spans"]
        self.assertEqual((span["status"], span["status_description"]), ("error", "it broke"))
        self.assertIn(["error.type", "boom"], span["attributes"])
        stats = self.module.metrics.functions["app::work"]
        self.assertEqual((stats.calls, stats.errors), (1, 1))

    def test_engine_functions_are_not_traced_by_default(self):
        call(self.engine, "engine::traces::list", {})
        call(self.engine, "engine::logs::list", {})
        result = call(self.engine, "engine::traces::list", {"include_internal": True})
        self.assertEqual(result["total"], 0)

    def test_sampling_ratio_zero_records_nothing(self):
        engine, clock, module = make({"sampling_ratio": 0.0})
        engine.register_function("app::f", lambda d: 1)
        for _ in range(20):
            call(engine, "app::f")
        self.assertEqual(call(engine, "engine::traces::list", {})["total"], 0)
        self.assertEqual(module.metrics.functions["app::f"].calls, 20)

    def test_disabled_module_answers_memory_exporter_not_enabled(self):
        engine, clock, module = make({"enabled": False})
        self.assertIsNone(engine.telemetry_sink)
        f = self.failureResultOf(engine.call("engine::traces::list", {}), InvocationError)
        self.assertEqual(f.value.code, "memory_exporter_not_enabled")


# -- ingestion and decoding ----------------------------------------------------------------


def test_decode_sdk_spans_and_base64_ids():
    b64_trace = base64.b64encode(bytes.fromhex(TRACE)).decode()
    b64_span = base64.b64encode(bytes.fromhex(PARENT)).decode()
    decoded = otlp.decode_traces(traces_frame(
        span_json(), span_json(trace_id=b64_trace, span_id=b64_span, parent="1111111111111111",
                               status=2)))
    assert decoded.skipped == 0
    first, second = (r.to_dict() for r in decoded.records)
    assert first["attributes"] == [["http.status", "200"], ["ok", "true"]]
    assert first["service_name"] == "worker-svc"
    assert first["instrumentation_scope_name"] == "iii-python-sdk"
    assert first["events"][0]["name"] == "ev"
    assert (second["trace_id"], second["span_id"], second["status"]) == (TRACE, PARENT, "error")


def test_decode_logs_and_metrics():
    decoded = otlp.decode_logs(logs_frame(log_json(trace_id=TRACE, span_id=PARENT)), 99)
    log, = decoded.records
    assert (log["body"], log["severity_number"], log["severity_text"]) == ("hello", 9, "INFO")
    assert log["attributes"] == {"log.data": {"order": "o-1"}}
    assert (log["trace_id"], log["span_id"], log["service_name"]) == (TRACE, PARENT,
                                                                      "worker-svc")
    metrics = otlp.decode_metrics(metrics_frame()).records
    assert [(m["name"], m["metric_type"]) for m in metrics] == [
        ("iii.worker.memory.rss", "gauge"), ("requests", "sum"), ("latency", "histogram")]
    assert metrics[0]["data_points"][0]["value"] == 1024
    assert metrics[0]["data_points"][0]["attributes"] == {"worker.id": "w1"}
    assert metrics[2]["data_points"][0]["bucket_counts"] == [1, 2]


@pytest.mark.parametrize("kind, payload", [
    ("OTLP", b"\xff\xfe not utf-8"),
    ("OTLP", b"{not json"),
    ("OTLP", b"[" * 100000 + b"]" * 100000),
    ("MTRC", b'{"resourceMetrics": [], "x": NaN}'),
    ("OTLP", b"[1, 2]"),
    ("OTLP", b'{"resourceSpans": 5}'),
    ("OTLP", b'{"something": []}'),
    ("LOGS", b'"text"'),
    ("MTRC", b'{"resourceMetrics": {"a": 1}}'),
])
def test_invalid_frames_are_counted_and_dropped(kind, payload):
    engine, clock, module = make()
    engine.ingest_telemetry(kind, payload, "w-1")  # must not raise
    assert module.metrics.telemetry_invalid[kind] == 1
    assert len(module.spans) == len(module.logs) == len(module.sdk_metrics) == 0
    # and the sink still works afterwards
    engine.ingest_telemetry("OTLP", traces_frame(span_json()), "w-1")
    assert len(module.spans) == 1


def test_malformed_items_are_skipped_rest_kept():
    engine, clock, module = make()
    bad = dict(span_json(span_id="2222222222222222"), traceId="xyz")
    engine.ingest_telemetry("OTLP", traces_frame(span_json(), bad, "not a span"), "w")
    assert len(module.spans) == 1
    assert module.metrics.telemetry_skipped["OTLP"] == 2


def test_frame_over_max_frame_bytes_is_dropped():
    engine, clock, module = make({"max_frame_bytes": 100})
    engine.ingest_telemetry("OTLP", traces_frame(span_json()), "w")
    assert len(module.spans) == 0 and module.metrics.telemetry_invalid["OTLP"] == 1


def test_worker_spans_and_logs_are_readable():
    engine, clock, module = make()
    root = span_json(span_id="1111111111111111", name="client", start=1, end=10)
    child = span_json(span_id="2222222222222222", parent="1111111111111111",
                      name="call handler", start=2, end=9)
    grandchild = span_json(span_id="3333333333333333", parent="2222222222222222",
                           name="db", start=3, end=4, status=2)
    other = span_json(trace_id="a" * 32, span_id="4444444444444444", name="other",
                      start=50, end=5_000_000_000)
    engine.ingest_telemetry("OTLP", traces_frame(root, child, grandchild, other), "w")
    engine.ingest_telemetry("LOGS", logs_frame(
        log_json("one", trace_id=TRACE, span_id="2222222222222222"),
        log_json("two", severity=17, text="ERROR")), "w")
    listed = call(engine, "engine::traces::list", {})
    assert [s["name"] for s in listed["spans"]] == ["client", "other"]
    assert (listed["total"], listed["offset"], listed["limit"]) == (2, 0, 100)
    assert [s["name"] for s in call(engine, "engine::traces::list", {
        "sort_by": "duration", "sort_order": "desc"})["spans"]] == ["other", "client"]
    assert call(engine, "engine::traces::list", {"name": "db"})["total"] == 0
    assert [s["name"] for s in call(engine, "engine::traces::list", {
        "name": "db", "search_all_spans": True})["spans"]] == ["client"]
    assert call(engine, "engine::traces::list", {"min_duration_ms": 1000})["total"] == 1
    whole = call(engine, "engine::traces::list", {"trace_id": TRACE.upper()})
    assert whole["total"] == 3
    assert call(engine, "engine::traces::list", {
        "trace_id": TRACE, "status": "error"})["total"] == 1
    assert call(engine, "engine::traces::list", {
        "attributes": [["http.status", "200"]]})["total"] == 2
    assert call(engine, "engine::traces::list", {"limit": 1, "offset": 1})["spans"][0][
        "name"] == "other"
    tree = call(engine, "engine::traces::tree", {"trace_id": TRACE})["roots"]
    assert tree[0]["name"] == "client"
    assert tree[0]["children"][0]["name"] == "call handler"
    assert tree[0]["children"][0]["children"][0]["name"] == "db"
    logs = call(engine, "engine::logs::list", {})
    assert [l["body"] for l in logs["logs"]] == ["two", "one"] and logs["total"] == 2
    assert [l["body"] for l in call(engine, "engine::logs::list", {
        "severity_min": 13})["logs"]] == ["two"]
    assert [l["body"] for l in call(engine, "engine::logs::list", {
        "trace_id": TRACE})["logs"]] == ["one"]
    assert call(engine, "engine::logs::list", {"severity_text": "error"})["total"] == 1
    assert call(engine, "engine::traces::clear", {}) == {"success": True}
    assert call(engine, "engine::logs::clear", {}) == {"success": True}
    assert call(engine, "engine::traces::list", {})["total"] == 0
    assert call(engine, "engine::logs::list", {})["total"] == 0


def test_sdk_metrics_and_engine_metrics_shape():
    engine, clock, module = make()
    engine.register_function("app::f", lambda d: 1)
    call(engine, "app::f")
    engine.ingest_telemetry("MTRC", metrics_frame(), "w")
    result = call(engine, "engine::metrics::list", {})
    em = result["engine_metrics"]
    assert em["invocations"]["total"] == 1 and em["invocations"]["success"] == 1
    assert em["invocations"]["by_function"]["app::f"]["calls"] == 1
    assert set(em["workers"]) == {"spawns", "deaths", "active"}
    assert set(em["performance"]) == {"avg_duration_ms", "p50_duration_ms",
                                      "p95_duration_ms", "p99_duration_ms",
                                      "min_duration_ms", "max_duration_ms"}
    assert [m["name"] for m in result["sdk_metrics"]] == [
        "iii.worker.memory.rss", "requests", "latency"]
    only = call(engine, "engine::metrics::list", {"metric_name": "requests"})
    assert [m["name"] for m in only["sdk_metrics"]] == ["requests"]
    assert call(engine, "engine::metrics::list", {"end_time": 1})["sdk_metrics"] == []
    rollups = call(engine, "engine::rollups::list", {"level": 1})
    assert rollups["level"] == 1
    assert {r["metric_name"] for r in rollups["rollups"]} == {"iii.worker.memory.rss",
                                                               "requests"}
    assert rollups["histogram_rollups"][0]["count"] == 3


def test_worker_counts():
    engine, clock, module = make()
    a = FakeWorkerConnection.connect(engine)
    FakeWorkerConnection.connect(engine)
    a.disconnect()
    workers = call(engine, "engine::metrics::list", {})["engine_metrics"]["workers"]
    assert workers == {"spawns": 2, "deaths": 1, "active": 1}


# -- bounds ------------------------------------------------------------------------------


def test_span_store_bounded_by_count():
    engine, clock, module = make({"memory_max_spans": 5})
    for i in range(20):
        engine.ingest_telemetry("OTLP", traces_frame(span_json(
            trace_id="%032x" % (i + 1), span_id="%016x" % (i + 1), name="s%d" % i)), "w")
    names = [s["name"] for s in call(engine, "engine::traces::list", {})["spans"]]
    assert names == ["s15", "s16", "s17", "s18", "s19"]
    assert module.spans.evicted == 15


def test_stores_bounded_by_age_on_read_and_by_sweep():
    engine, clock, module = make({"traces_retention_seconds": 10,
                                  "logs_retention_seconds": 10,
                                  "metrics_retention_seconds": 10})
    engine.ingest_telemetry("OTLP", traces_frame(span_json()), "w")
    engine.ingest_telemetry("LOGS", logs_frame(log_json()), "w")
    engine.ingest_telemetry("MTRC", metrics_frame(), "w")
    clock.advance(5)
    engine.ingest_telemetry("LOGS", logs_frame(log_json("later")), "w")
    clock.advance(6)
    assert call(engine, "engine::traces::list", {})["total"] == 0
    assert [l["body"] for l in call(engine, "engine::logs::list", {})["logs"]] == ["later"]
    assert call(engine, "engine::metrics::list", {})["sdk_metrics"] == []
    # without any read, the periodic sweep frees them
    engine.ingest_telemetry("OTLP", traces_frame(span_json()), "w")
    assert len(module.spans) == 1
    clock.advance(61)
    assert len(module.spans) == 0 and len(module.logs) == 0


def test_flooding_worker_cannot_grow_memory_past_bounds():
    engine, clock, module = make({"memory_max_spans": 50, "logs_max_count": 30,
                                  "metrics_max_count": 20,
                                  "limits": {"attributes": 4, "string": 16}})
    many_attrs = [{"key": "k%d" % i, "value": {"stringValue": "v" * 1000}}
                  for i in range(100)]
    for i in range(200):
        engine.ingest_telemetry("OTLP", traces_frame(
            *[span_json(span_id="%016x" % (i * 10 + j + 1), attrs=many_attrs)
              for j in range(10)]), "w")
        engine.ingest_telemetry("LOGS", logs_frame(log_json("x" * 1000)), "w")
        engine.ingest_telemetry("MTRC", metrics_frame(), "w")
    assert (len(module.spans), len(module.logs), len(module.sdk_metrics)) == (50, 30, 20)
    span = module.spans.records()[-1]
    assert len(span.attributes) == 4 and all(len(v) == 16 for _, v in span.attributes)
    assert len(module.logs.records()[-1]["body"]) == 16


def test_function_table_is_bounded():
    engine, clock, module = make({"max_functions": 10})
    for i in range(50):
        engine.register_function("app::f%d" % i, lambda d: None)
        call(engine, "app::f%d" % i)
    assert len(module.metrics.functions) == 10
    assert list(module.metrics.functions)[-1] == "app::f49"
    assert module.metrics.total == 50


# -- logs ----------------------------------------------------------------------------------


class LogFunctionTests(SynchronousTestCase):

    def setUp(self):
        self.engine, self.clock, self.module = make()

    def test_engine_log_functions(self):
        for level, number in (("info", 9), ("warn", 13), ("error", 17), ("debug", 5),
                              ("trace", 1)):
            self.assertIsNone(call(self.engine, "engine::log::" + level, {
                "message": "m-" + level, "data": {"k": level}, "trace_id": TRACE,
                "service_name": "svc", "_caller_worker_id": "w"}))
        logs = call(self.engine, "engine::logs::list", {})["logs"]
        self.assertEqual([(l["severity_text"], l["severity_number"]) for l in logs],
                         [("TRACE", 1), ("DEBUG", 5), ("ERROR", 17), ("WARN", 13),
                          ("INFO", 9)])
        self.assertEqual(logs[0]["attributes"], {"k": "trace"})
        self.assertEqual((logs[0]["service_name"], logs[0]["trace_id"]), ("svc", TRACE))

    def test_bad_input_is_a_deserialization_error(self):
        for data in (None, {"data": {}}, {"message": 5}, "text"):
            f = self.failureResultOf(self.engine.call("engine::log::info", data),
                                     InvocationError)
            self.assertEqual(f.value.code, "deserialization_error")
        f = self.failureResultOf(self.engine.call("engine::traces::list", {"limit": "x"}),
                                 InvocationError)
        self.assertEqual(f.value.code, "deserialization_error")

    def test_log_trigger_fires_by_level(self):
        seen = []
        self.engine.register_function("app::on_error", seen.append)
        self.engine.register_function("app::on_all", lambda d: seen.append(("all", d)))
        result_of(self.engine.register_trigger("t1", "log", "app::on_error",
                                               {"level": "error"}))
        result_of(self.engine.register_trigger("t2", "log", "app::on_all", None))
        call(self.engine, "engine::log::info", {"message": "fine"})
        call(self.engine, "engine::log::error", {"message": "bad"})
        self.engine.ingest_telemetry("LOGS", logs_frame(log_json("remote", 17, "ERROR")), "w")
        self.assertEqual([d["body"] for d in seen if not isinstance(d, tuple)],
                         ["bad", "remote"])
        self.assertEqual([d[1]["body"] for d in seen if isinstance(d, tuple)],
                         ["fine", "bad", "remote"])

    def test_log_trigger_bad_level_is_refused(self):
        f = self.failureResultOf(self.engine.register_trigger(
            "t1", "log", "app::x", {"level": "loud"}))
        self.assertIn("level", f.getErrorMessage())
        self.assertNotIn("t1", self.engine.triggers)

    def test_other_functions_shapes(self):
        self.assertEqual(call(self.engine, "engine::baggage::get", {"key": "k"}),
                         {"value": None})
        self.assertTrue(call(self.engine, "engine::baggage::set",
                             {"key": "k", "value": "v"})["success"])
        self.assertEqual(call(self.engine, "engine::baggage::get_all", {}), {"baggage": {}})
        rules = call(self.engine, "engine::sampling::rules", {})
        self.assertEqual(rules["traces"]["default_ratio"], 1.0)
        self.assertEqual(rules["logs"], {"sampling_ratio": 1.0})
        health = call(self.engine, "engine::health::check", {})
        self.assertEqual(health["status"], "healthy")
        self.assertEqual(set(health["components"]), {"otel", "metrics", "logs", "spans"})
        self.assertEqual(call(self.engine, "engine::alerts::list", {})["alerts"], [])


def test_alerts_fire_function_action_with_cooldown():
    engine, clock, module = make({"alerts": [{
        "name": "too-many-errors", "metric": "invocations.error", "threshold": 1,
        "operator": ">=", "cooldown_seconds": 30,
        "action": {"type": "function", "path": "app::alert"}}]})
    fired = []
    engine.register_function("app::alert", fired.append)

    def boom(data):
        raise InvocationError("boom", "no")
    engine.register_function("app::boom", boom)
    assert call(engine, "engine::alerts::evaluate", {})["triggered_alerts"] == []
    engine.call("app::boom").addErrback(lambda f: None)
    result = call(engine, "engine::alerts::evaluate", {})
    assert [a["name"] for a in result["triggered_alerts"]] == ["too-many-errors"]
    assert call(engine, "engine::alerts::evaluate", {})["triggered_alerts"] == []  # cooldown
    clock.advance(31)  # the 10 s evaluation loop fires it again after the cooldown
    assert [a["name"] for a in fired] == ["too-many-errors", "too-many-errors"]
    listed = call(engine, "engine::alerts::list", {})
    assert listed["firing_count"] == 1 and listed["alerts"][0]["firing"] is True
    module.stopService()
    assert clock.getDelayedCalls() == []


# -- prometheus ----------------------------------------------------------------------------


class FakeEnqueuer:
    def enqueue(self, queue, function_id, data, traceparent, baggage):
        raise NotImplementedError

    def depths(self):
        return {"orders": 3, "mail": 0, "broken": "x"}


def test_prometheus_text():
    engine, clock, module = make()
    engine.enqueuer = FakeEnqueuer()
    engine.register_function('app::q"uote', lambda d: 1)
    clock_calls = [call(engine, 'app::q"uote') for _ in range(3)]
    assert clock_calls == [1, 1, 1]
    FakeWorkerConnection.connect(engine)
    text = prometheus_text(module.metrics).decode()
    assert '# TYPE iii_invocations_total counter' in text
    assert 'iii_invocations_total{function_id="app::q\\"uote",status="success"} 3' in text
    assert 'iii_invocation_duration_seconds_bucket{function_id="app::q\\"uote",le="+Inf"} 3' in text
    assert 'iii_invocation_duration_seconds_count{function_id="app::q\\"uote"} 3' in text
    assert "iii_workers_active 1" in text
    assert 'iii_queue_depth{queue="orders"} 3' in text and "broken" not in text
    request = DummyRequest([b"metrics"])
    body = PrometheusResource(module.metrics).render_GET(request)

    def steady(text):  # uptime, memory and descriptors move between two renderings
        return [line for line in text.splitlines()
                if not line.startswith(("iii_uptime", "process_"))]
    assert steady(body.decode()) == steady(text)
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")


def test_queue_module_depths_reach_the_metrics():
    """With the queue module loaded, its waiting messages show as iii_queue_depth."""
    from iii_twisted.modules.queue import QueueModule
    engine, clock, module = make()
    queues = QueueModule(engine, {"queue_configs": {"mail": {"concurrency": 1}}}, clock)
    queues.startService()
    held = []
    engine.register_function("app::send", lambda d: held.append(Deferred()) or held[-1])
    for i in range(3):
        engine.call("app::send", {"i": i}, {"type": "enqueue", "queue": "mail"})
    assert module.metrics.queue_depths() == {"mail": 2}
    assert 'iii_queue_depth{queue="mail"} 2' in prometheus_text(module.metrics).decode()
    while held and not held[-1].called:
        held[-1].callback(None)
    assert module.metrics.queue_depths() == {"mail": 0}
    queues.stopService()


def test_prometheus_listener_is_a_child_service():
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    engine, _ = make_engine()
    module = build_module(OTEL, engine, {"prometheus": {"port": 9464}}, reactor)
    module.startService()
    (port, factory, _, interface), = reactor.tcpServers
    assert (port, interface) == (9464, "127.0.0.1")
    module.stopService()
    assert reactor.getDelayedCalls() == []


def test_stop_leaves_no_timers():
    engine, clock, module = make()
    clock.advance(120)
    module.stopService()
    assert clock.getDelayedCalls() == []


def test_void_and_engine_calls_are_counted():
    engine, clock, module = make()
    engine.register_function("app::f", lambda d: None)
    call(engine, "app::f", action=VOID)
    assert module.metrics.functions["app::f"].calls == 1


# -- worker gauges: latest_metrics of engine::workers::list ------------------------------


def gauges_frame(worker_id, ts_s, values):
    """An MTRC frame as npm iii-sdk sends its worker gauges (time in seconds)."""
    return json.dumps({"resourceMetrics": [{
        "resource": {"attributes": []},
        "scopeMetrics": [{"scope": {"name": "iii-node"}, "metrics": [
            {"name": name, "gauge": {"dataPoints": [{
                "attributes": [{"key": "worker.id", "value": {"stringValue": worker_id}},
                               {"key": "worker.name", "value": {"stringValue": "n"}}],
                "timeUnixNano": str(int(ts_s * 1e9)),
                ("asInt" if isinstance(value, int) else "asDouble"): value}]}}
            for name, value in values.items()]}],
    }]}).encode()


def listed_metrics(engine, worker_id):
    [info] = call(engine, "engine::workers::list", {"worker_id": worker_id})["workers"]
    return info["latest_metrics"]


def test_worker_gauges_become_latest_metrics():
    """The newest value of each gauge, the newest report's time, and the runtime."""
    engine, clock, module = make()
    assert engine.worker_metrics is module.worker_gauges
    verifyObject(IWorkerMetricsSource, module.worker_gauges)
    conn = FakeWorkerConnection.connect(engine)
    wid = conn.worker_id
    assert listed_metrics(engine, wid) is None
    now = clock.seconds()
    engine.ingest_telemetry("MTRC", gauges_frame(wid, now - 2, {
        "iii.worker.memory.rss": 5000, "iii.worker.cpu.percent": 1.5,
        "iii.worker.uptime_seconds": 10}), None)
    engine.ingest_telemetry("MTRC", gauges_frame(wid, now - 1, {
        "iii.worker.memory.rss": 6000, "iii.worker.event_loop.lag_ms": 0.25}), None)
    # A report older than what is known does not replace it.
    engine.ingest_telemetry("MTRC", gauges_frame(wid, now - 30, {
        "iii.worker.memory.rss": 1}), None)
    assert listed_metrics(engine, wid) == {
        "memory_rss": 6000, "cpu_percent": 1.5, "uptime_seconds": 10,
        "event_loop_lag_ms": 0.25, "timestamp_ms": int((now - 1) * 1000),
        "runtime": "node"}
    # The runtime the worker registered wins over the default.
    call(engine, "engine::workers::register", {"_caller_worker_id": wid, "runtime": "bun"})
    assert listed_metrics(engine, wid)["runtime"] == "bun"
    # The gauges' own metric records are still stored for engine::metrics::list.
    assert len(call(engine, "engine::metrics::list", {})["sdk_metrics"]) == 6


def test_worker_gauges_older_than_120s_are_not_reported():
    engine, clock, module = make()
    conn = FakeWorkerConnection.connect(engine)
    now = clock.seconds()
    engine.ingest_telemetry("MTRC", gauges_frame(conn.worker_id, now, {
        "iii.worker.memory.rss": 5000}), None)
    engine.ingest_telemetry("MTRC", gauges_frame(conn.worker_id, now + 60, {
        "iii.worker.cpu.percent": 3.0}), None)
    clock.advance(120)
    assert listed_metrics(engine, conn.worker_id) == {
        "memory_rss": 5000, "cpu_percent": 3.0, "timestamp_ms": int((now + 60) * 1000),
        "runtime": "node"}
    clock.advance(1)
    assert listed_metrics(engine, conn.worker_id) == {
        "cpu_percent": 3.0, "timestamp_ms": int((now + 60) * 1000), "runtime": "node"}
    clock.advance(60)
    assert listed_metrics(engine, conn.worker_id) is None


def test_worker_gauges_only_for_connected_workers_and_forgotten_when_they_leave():
    """Unknown ids, other metrics and malformed points add nothing; a leaver's go."""
    engine, clock, module = make()
    conn = FakeWorkerConnection.connect(engine)
    now = clock.seconds()
    for worker_id in ("not-connected-{}".format(i) for i in range(100)):
        engine.ingest_telemetry("MTRC", gauges_frame(worker_id, now, {
            "iii.worker.memory.rss": 1}), None)
    engine.ingest_telemetry("MTRC", gauges_frame(conn.worker_id, now, {
        "some.other.gauge": 1}), None)
    engine.ingest_telemetry("MTRC", metrics_frame(), None)  # worker.id "w1": unknown
    assert module.worker_gauges._latest == {}
    assert listed_metrics(engine, conn.worker_id) is None
    engine.ingest_telemetry("MTRC", gauges_frame(conn.worker_id, now, {
        "iii.worker.memory.rss": 7}), None)
    assert listed_metrics(engine, conn.worker_id)["memory_rss"] == 7
    conn.disconnect()
    assert module.worker_gauges._latest == {}


@pytest.mark.parametrize("config", [{"enabled": False}, {"metrics_enabled": False}])
def test_no_latest_metrics_without_observability_metrics(config):
    engine, clock, module = make(config)
    conn = FakeWorkerConnection.connect(engine)
    engine.ingest_telemetry("MTRC", gauges_frame(conn.worker_id, clock.seconds(), {
        "iii.worker.memory.rss": 7}), None)
    assert engine.worker_metrics is None
    assert listed_metrics(engine, conn.worker_id) is None


# -- the engine's own logs ---------------------------------------------------------------


def engine_logger(module, namespace="iii_twisted.engine"):
    return Logger(namespace=namespace, observer=module.log_publisher)


def test_engine_log_lines_are_stored_with_the_engine_service():
    engine, clock, module = make({"service_name": "my-engine"})
    log = engine_logger(module)
    log.debug("not at the default level")
    log.info("worker {worker_id} connected", worker_id="w1")
    log.warn("something odd")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("handling a frame failed")
    logs = call(engine, "engine::logs::list", {})["logs"]
    assert [(l["severity_text"], l["body"]) for l in reversed(logs)] == [
        ("INFO", "worker w1 connected"),
        ("WARN", "something odd"),
        ("FATAL", "handling a frame failed: ZeroDivisionError: division by zero"),
    ]
    assert {l["service_name"] for l in logs} == {"my-engine"}
    assert logs[0]["attributes"] == {"log.namespace": "iii_twisted.engine"}
    assert logs[0]["trace_id"] is None
    module.stopService()
    log.warn("after stop")
    assert call(engine, "engine::logs::list", {})["total"] == 3


@pytest.mark.parametrize("config, expected", [
    ({"level": "warn"}, ["engine warn", "engine error", "other error"]),
    ({"log_level": "debug"}, ["engine debug", "engine info", "engine warn", "engine error",
                              "other error"]),
    ({"level": "error", "log_level": "debug"}, ["engine error", "other error"]),
    ({"level": "off"}, []),
    ({"logs_enabled": False}, []),
])
def test_engine_log_level_and_other_libraries(config, expected):
    """Below ERROR only the engine's namespaces count; ``level`` sets the threshold."""
    engine, clock, module = make(config)
    ours, other = engine_logger(module), engine_logger(module, "autobahn.websocket")
    for logger, who in ((ours, "engine"), (other, "other")):
        logger.debug(who + " debug")
        logger.info(who + " info")
        logger.warn(who + " warn")
        logger.error(who + " error")
    assert [l["body"] for l in module.logs.records()] == expected
    module.stopService()


def test_worker_log_echo_is_not_stored_twice_and_engine_logs_fire_no_trigger():
    engine, clock, module = make({"logs_console_output": True})
    # The echo of a worker log goes to the process's log output: capture it there.
    echoed = []
    module.log_publisher.addObserver(echoed.append)
    from iii_twisted.modules import observability as observability_module
    original = observability_module._log
    observability_module._log = Logger(namespace=original.namespace,
                                       observer=module.log_publisher)
    try:
        conn = FakeWorkerConnection.connect(engine)
        conn.receive({"type": "registerfunction", "id": "on::log"})
        conn.receive({"type": "registertrigger", "id": "t", "trigger_type": "log",
                      "function_id": "on::log", "config": {"level": "all"}})
        call(engine, "engine::log::info", {"message": "from a worker"})
        assert [e["body"] for e in echoed if "body" in e] == ["from a worker"]
        assert [l["body"] for l in call(engine, "engine::logs::list", {})["logs"]] == [
            "from a worker"]
        fired = [m for m in conn.pop_sent() if m.get("type") == "invokefunction"]
        assert [m["data"]["body"] for m in fired] == ["from a worker"]
        engine_logger(module).warn("engine line")
        assert [l["body"] for l in call(engine, "engine::logs::list", {})["logs"]] == [
            "engine line", "from a worker"]
        assert [m for m in conn.pop_sent() if m.get("type") == "invokefunction"] == []
    finally:
        observability_module._log = original
        module.stopService()


class ThreadReactor:
    """A clock whose callFromThread records what would run on the reactor thread."""

    def __init__(self, clock):
        self.clock = clock
        self.from_threads = []

    def seconds(self):
        return self.clock.seconds()

    def callFromThread(self, f, *args):
        self.from_threads.append((f, args))


def test_engine_log_from_another_thread_is_stored_on_the_reactor_thread():
    import threading
    from iii_twisted.observability.engine_logs import EngineLogCapture
    clock = make_engine()[1]
    reactor = ThreadReactor(clock)
    stored = []
    capture = EngineLogCapture(stored.append, reactor, "svc", 9)
    publisher = LogPublisher(capture)
    log = Logger(namespace="iii_twisted.observability.export", observer=publisher)
    thread = threading.Thread(target=lambda: log.error("OTLP flush failed"))
    thread.start()
    thread.join(10)
    assert stored == []
    [(store, (record,))] = reactor.from_threads
    store(record)
    assert [r["body"] for r in stored] == ["OTLP flush failed"]


def test_non_finite_doubles_are_stored_as_null_so_reads_stay_json():
    """OTLP JSON writes NaN and infinities as strings; JSON itself has no such values."""
    from iii_twisted.protocol import encode
    engine, clock, module = make()
    conn = FakeWorkerConnection.connect(engine)
    engine.ingest_telemetry("MTRC", gauges_frame(conn.worker_id, clock.seconds(), {
        "iii.worker.memory.rss": 5000}), None)
    frame = json.dumps({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "iii.worker.cpu.percent", "gauge": {"dataPoints": [{
            "attributes": [{"key": "worker.id", "value": {"stringValue": conn.worker_id}},
                           {"key": "ratio", "value": {"doubleValue": "Infinity"}}],
            "timeUnixNano": str(int(clock.seconds() * 1e9)), "asDouble": "NaN"}]}},
        {"name": "h", "histogram": {"dataPoints": [{
            "count": "1", "sum": "-Infinity", "explicitBounds": [1.0, "NaN"],
            "bucketCounts": ["1"], "min": "NaN", "max": 2.0}]}},
    ]}]}]}).encode()
    engine.ingest_telemetry("MTRC", frame, None)
    assert module.metrics.telemetry_invalid["MTRC"] == 0
    listed = call(engine, "engine::metrics::list", {})
    encode({"result": listed})  # no NaN or infinity left: this would raise
    gauge, histogram = listed["sdk_metrics"][-2:]
    assert gauge["data_points"][0]["value"] is None
    assert gauge["data_points"][0]["attributes"]["ratio"] is None
    point = histogram["data_points"][0]
    assert (point["sum"], point["explicit_bounds"], point["min"], point["max"]) == (
        None, [1.0, None], None, 2.0)
    # The gauge with no number is not a report: the worker's metrics are the others.
    assert listed_metrics(engine, conn.worker_id) == {
        "memory_rss": 5000, "timestamp_ms": int(clock.seconds() * 1000), "runtime": "node"}
