"""EngineService, the MultiService an application embeds (no sockets)."""

from twisted.internet.testing import MemoryReactorClock

from iii_twisted.config import EngineConfig
from iii_twisted.service import EngineService
from iii_twisted.testing import FakeWorkerConnection


def test_service_lifecycle_leaves_nothing_behind():
    """Start binds the worker port; stop disconnects workers and leaves no timer."""
    reactor = MemoryReactorClock()
    service = EngineService(EngineConfig(port=4321, host="127.0.0.1"), reactor=reactor)
    service.privilegedStartService()
    service.startService()
    assert [(p, i) for p, f, b, i in reactor.tcpServers] == [(4321, "127.0.0.1")]
    engine = service.engine
    conn = FakeWorkerConnection.connect(engine)
    conn.receive({"type": "registerfunction", "id": "w::fn"})
    d = engine.call("w::fn", {})
    service.stopService()
    assert conn.closed == (1001, "engine shutting down")
    assert engine.workers == {} and "w::fn" not in engine.functions
    assert d.result.value.code == "invocation_stopped"
    d.addErrback(lambda f: None)
    assert reactor.getDelayedCalls() == []


def test_service_from_dict():
    """A config dict shaped like iii-config.yaml is accepted."""
    service = EngineService({"port": 4000, "modules": [{"class": "modules::worker::WorkerModule"}]},
                            reactor=MemoryReactorClock())
    assert service.config.port == 4000
    assert [m.iii_class for m in service.modules] == ["modules::worker::WorkerModule"]


def test_in_process_function_and_call():
    """An embedding app registers a function and calls it through the engine."""
    service = EngineService(reactor=MemoryReactorClock())
    service.engine.register_function("app::add", lambda data: data["a"] + data["b"])
    d = service.engine.call("app::add", {"a": 1, "b": 2})
    assert d.result == 3
