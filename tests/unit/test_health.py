"""
Liveness and readiness (iii_twisted.health) on the REST and Prometheus ports, and the
metrics that were missing: unknown ids, error codes, calls in flight, build info,
uptime, RSS, open descriptors, HTTP statuses, dead-letter depth.
"""

import json
import shutil

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from iii_twisted.health import render
from iii_twisted.observability.metrics import PrometheusResource, prometheus_text
from iii_twisted.protocol import InvocationError
from iii_twisted.service import EngineService
from iii_twisted.testing import FakeWorkerConnection

from test_http_api import Api, _body, _response
from test_observability import call, make


def _ready(service):
    request = DummyRequest([b"ready"])
    out = []
    render(request, service.engine.health, "ready").addCallback(out.append)
    return request.responseCode, json.loads(out[0])


def test_readiness_follows_start_stop_and_the_store(tmp_path):
    state_dir = tmp_path / "state"
    service = EngineService({"port": 0, "modules": [
        {"class": "modules::state::StateModule", "config": {"adapter": {
            "class": "modules::state::adapters::KvStore",
            "config": {"store_method": "file_based", "file_path": str(state_dir)}}}}]},
        reactor=MemoryReactorClock())
    assert _ready(service) == (503, {"status": "starting",
                                     "checks": {"StateModule.store": "ok"}})
    service.privilegedStartService()
    service.startService()
    assert _ready(service) == (200, {"status": "ready",
                                     "checks": {"StateModule.store": "ok"}})
    shutil.rmtree(str(state_dir))  # the disk under the store goes away
    code, body = _ready(service)
    assert code == 503 and body["status"] == "unready"
    assert "is gone or not writable" in body["checks"]["StateModule.store"]
    state_dir.mkdir()
    assert _ready(service)[0] == 200
    service.stopService()
    assert _ready(service)[1]["status"] == "stopped"


def test_a_failing_or_hanging_check_is_unready():
    clock = MemoryReactorClock()
    service = EngineService({"port": 0}, reactor=clock)
    service.engine.health.state = "running"

    class Broken:
        def health(self):
            raise OSError("connection refused")

    class Hanging:
        health_name = "redis"

        def health(self):
            return Deferred()

    service.modules = [Broken()]
    assert _ready(service) == (503, {"status": "unready", "checks": {
        "Broken": "check failed: connection refused"}})
    service.modules = [Hanging()]
    request = DummyRequest([b"ready"])
    out = []
    render(request, service.engine.health, "ready").addCallback(out.append)
    assert out == []
    clock.advance(2.1)
    assert request.responseCode == 503
    assert json.loads(out[0])["checks"]["redis"].startswith("check failed")


def test_rest_port_serves_live_and_ready():
    api = Api()
    for which in ("live", "ready"):
        response = _response(api.request("GET", "/_iii/health/" + which))
        assert response.code == 200
        body = json.loads(_body(api.treq, response))
        assert body["status"] in ("alive", "ready")
    assert _response(api.request("GET", "/_iii/health/other")).code == 404
    assert api.invocations() == []


def test_prometheus_port_serves_live_and_ready():
    engine, clock, module = make()
    resource = PrometheusResource(module.metrics)
    request = DummyRequest([b"health", b"live"])
    request.path = b"/health/live"
    body = resource.render_GET(request)
    assert json.loads(body)["status"] == "alive"
    request = DummyRequest([b"health", b"ready"])
    request.path = b"/health/ready"
    resource.render_GET(request)
    assert request.finished and json.loads(b"".join(request.written))["status"] == "ready"


def test_metrics_that_were_missing():
    engine, clock, module = make()
    engine.register_function("app::bad", lambda d: (_ for _ in ()).throw(
        InvocationError("E_BAD", "no")))
    held = Deferred()
    engine.register_function("app::slow", lambda d: held)
    engine.call("nobody::here", {}).addErrback(lambda f: None)
    engine.call("nobody::here", {}).addErrback(lambda f: None)
    engine.call("app::bad", {}).addErrback(lambda f: None)
    engine.call("app::slow", {})
    FakeWorkerConnection.connect(engine)
    text = prometheus_text(module.metrics).decode()
    assert "iii_invocations_not_found_total 2" in text
    assert 'iii_invocation_errors_total{function_id="app::bad",code="E_BAD"} 1' in text
    assert "iii_invocations_in_flight 1" in text
    assert 'iii_build_info{version="' in text and 'python="' in text
    assert "iii_uptime_seconds " in text and "process_start_time_seconds " in text
    assert "process_resident_memory_bytes " in text
    assert "process_open_fds " in text
    held.callback(1)
    assert "iii_invocations_in_flight 0" in prometheus_text(module.metrics).decode()


def test_error_code_labels_are_bounded():
    engine, clock, module = make()
    codes = iter(range(100))
    engine.register_function("app::many", lambda d: (_ for _ in ()).throw(
        InvocationError("code{}".format(next(codes)), "no")))
    for _ in range(40):
        engine.call("app::many", {}).addErrback(lambda f: None)
    stats = module.metrics.functions["app::many"]
    assert len(stats.codes) == 17 and stats.codes["other"] == 24


def test_http_status_counts_and_dlq_depth():
    api = Api()
    api.route("f", {"api_path": "x", "http_method": "GET"})
    from test_http_api import _channel
    protocol, transport = _channel(api)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    [call_] = api.invocations()
    api.answer(call_, {"status_code": 201})
    protocol.dataReceived(b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n")
    assert api.engine.http_responses == {("GET", 201): 1, ("GET", 404): 1}

    from iii_twisted.modules.observability import OtelModule  # noqa: F401
    from iii_twisted.modules import build_module
    module = build_module("modules::observability::OtelModule", api.engine,
                          {"exporter": "memory"}, api.clock)

    class Enqueuer:
        def depths(self):
            return {"mail": 1}

        def dlq_depths(self):
            return {"mail": 4}
    api.engine.enqueuer = Enqueuer()
    text = prometheus_text(module.metrics).decode()
    assert 'iii_http_responses_total{method="GET",status="201"} 1' in text
    assert 'iii_http_responses_total{method="GET",status="404"} 1' in text
    assert 'iii_queue_dlq_depth{queue="mail"} 4' in text


def test_queue_module_reports_dlq_depths():
    from iii_twisted.modules.queue import QueueModule
    engine, clock, _ = make()
    queues = QueueModule(engine, {"queue_configs": {"mail": {"max_retries": 1,
                                                              "backoff_ms": 1}}}, clock)
    queues.startService()
    engine.register_function("app::fail", lambda d: (_ for _ in ()).throw(
        InvocationError("E", "no")))
    engine.call("app::fail", {}, {"type": "enqueue", "queue": "mail"})
    clock.advance(10)
    clock.advance(10)
    assert queues.dlq_depths() == {"mail": 1}


def test_rabbitmq_broker_is_unready_without_its_connection():
    pytest = __import__("pytest")
    pytest.importorskip("pika")
    from iii_twisted.adapters.rabbitmq_queue import RabbitMQBroker

    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:1/%2F", MemoryReactorClock(),
                            lambda record: record)
    assert broker.health() == "no connection to RabbitMQ at amqp://127.0.0.1:1/"

    class Module:
        iii_class = "modules::queue::QueueModule"
        store = None

    module = Module()
    module.broker = broker
    clock = MemoryReactorClock()
    service = EngineService({"port": 0}, reactor=clock)
    service.engine.health.state = "running"
    service.modules = [module]
    code, body = _ready(service)
    assert code == 503
    assert body["checks"] == {"QueueModule.broker": "no connection to RabbitMQ at "
                                                    "amqp://127.0.0.1:1/"}


class _Cluster:
    """What the cluster: section hangs on the engine (C{engine.cluster.directory})."""

    def __init__(self, directory):
        self.directory = directory


def _member_directories():
    from iii_twisted.cluster.directory import MemoryDirectory, MemoryRegistry, Member

    registry = MemoryRegistry()
    mine, other = MemoryDirectory(registry), MemoryDirectory(registry)
    mine.join(Member("e1", "tcp:127.0.0.1:1"), _Quiet())
    other.join(Member("e2", "tcp:127.0.0.1:2"), _Quiet())
    return mine


class _Quiet:
    def member_joined(self, member):
        pass

    def member_left(self, member):
        pass


def test_ready_reports_the_cluster_directory_and_stays_ready_without_redis():
    """A cluster member's readiness says whether its directory answers and how many
    members it knows; an unreachable directory keeps the engine ready (it still
    serves its own workers)."""
    service = EngineService({"port": 0}, reactor=MemoryReactorClock())
    service.engine.health.state = "running"
    assert "cluster" not in _ready(service)[1]  # not a cluster member
    directory = _member_directories()
    service.engine.cluster = _Cluster(directory)
    assert _ready(service) == (200, {"status": "ready", "checks": {},
                                     "cluster": {"directory": "ok", "members": 1}})
    directory.healthy = False  # what the Redis directory says while Redis is down
    assert _ready(service) == (200, {"status": "ready", "checks": {},
                                     "cluster": {"directory": "unreachable", "members": 1}})


def test_observability_health_check_has_the_cluster():
    engine, clock, module = make()
    directory = _member_directories()
    engine.cluster = _Cluster(directory)
    health = call(engine, "engine::health::check", {})
    assert health["status"] == "healthy"
    assert health["components"]["cluster"] == {
        "status": "healthy", "details": {"directory": "ok", "members": 1}}
    directory.healthy = False
    health = call(engine, "engine::health::check", {})
    assert health["status"] == "degraded"
    assert health["components"]["cluster"] == {
        "status": "degraded", "details": {"directory": "unreachable", "members": 1}}


def test_prometheus_has_the_cluster_gauges():
    engine, clock, module = make()
    assert "iii_cluster_" not in prometheus_text(module.metrics).decode()
    directory = _member_directories()
    engine.cluster = _Cluster(directory)
    text = prometheus_text(module.metrics).decode()
    assert "iii_cluster_directory_up 1\n" in text and "iii_cluster_members 1\n" in text
    directory.healthy = False
    assert "iii_cluster_directory_up 0\n" in prometheus_text(module.metrics).decode()
