"""
Defaults and hints (issue 15, point 10): a call or trigger that needs a module not in
the config says which module; the start-up report gives each store's absolute path and
whether it is new; SIGTERM drains the calls in flight before stopping.
"""

import os

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from iii_twisted.protocol import InvocationError
from iii_twisted.report import startup_report
from iii_twisted.service import EngineService
from iii_twisted.testing import FakeWorkerConnection, make_engine


def _error(d):
    out = []
    d.addErrback(out.append)
    return out[0].value


def test_missing_module_is_named_in_function_not_found():
    """Reported: with the root config, publish answered only "Function publish not found"."""
    engine, clock = make_engine()
    error = _error(engine.call("publish", {"topic": "t", "data": 1}))
    assert error.code == "function_not_found"
    assert error.message == ("Function publish not found (publish is provided by "
                             "modules::pubsub::PubSubModule (iii-pubsub), which is not in "
                             "the config)")
    assert "modules::state::StateModule" in _error(engine.call("state::get", {})).message
    assert "OtelModule" in _error(engine.call("engine::traces::list", {})).message
    assert _error(engine.call("app::nothing", {})).message == "Function app::nothing not found"


def test_trigger_waiting_for_a_module_is_a_warning_naming_it():
    """Reported: a cron trigger without the cron module waited for ever at info level."""
    engine, clock = make_engine()
    worker = FakeWorkerConnection.connect(engine)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        worker.receive({"type": "registertrigger", "id": "t1", "trigger_type": "cron",
                        "function_id": "app::tick",
                        "config": {"expression": "* * * * * *"}})
        worker.receive({"type": "registertrigger", "id": "t2", "trigger_type": "custom",
                        "function_id": "app::x", "config": {}})
    finally:
        globalLogPublisher.removeObserver(events.append)
    [cron] = [e for e in events if e.get("trigger_id") == "t1"]
    assert cron["log_level"].name == "warn"
    assert formatEvent(cron) == ("trigger t1 (app::tick) waits: trigger type cron is "
                                 "provided by modules::cron::CronModule (iii-cron), which "
                                 "is not in the config")
    [custom] = [e for e in events if e.get("trigger_id") == "t2"]
    assert custom["log_level"].name == "info"
    assert "no worker provides trigger type custom yet" in formatEvent(custom)


def _state_service(path):
    return EngineService({"port": 0, "modules": [
        {"class": "modules::state::StateModule", "config": {"adapter": {
            "class": "modules::state::adapters::KvStore",
            "config": {"store_method": "file_based", "file_path": path}}}},
        {"class": "modules::queue::QueueModule", "config": {"adapter": {
            "class": "modules::queue::BuiltinQueueAdapter",
            "config": {"store_method": "file_based", "file_path": path + "-queue"}}}}]},
        reactor=MemoryReactorClock())


def test_report_gives_absolute_data_paths_and_new_or_existing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    service = _state_service("./data/state")
    service.modules[1].store.open(lambda: [])  # the queue opens its journal at start
    lines = "\n".join(startup_report(service))
    assert "data in {} (new store)".format(tmp_path / "data" / "state") in lines
    assert "data in {} (new journal)".format(tmp_path / "data" / "state-queue") in lines
    service.modules[0].store.close()
    service.modules[1].store.close()
    from twisted.internet.defer import maybeDeferred

    from iii_twisted.adapters.file import FileKvStore
    writer = FileKvStore(str(tmp_path / "data" / "state"), None,
                         run_in_thread=lambda f, *args: maybeDeferred(f, *args))
    writer.set("g", "k", 1)
    writer.close()
    service = _state_service("./data/state")
    service.modules[1].store.open(lambda: [])
    again = "\n".join(startup_report(service))
    assert "(existing store: 1 keys, " in again
    assert "(existing journal: " in again


def _engine_with_call(drain):
    clock = MemoryReactorClock()
    service = EngineService({"port": 0}, reactor=clock)
    service.drain_timeout = drain
    service.privilegedStartService()
    service.startService()
    host = FakeWorkerConnection.connect(service.engine)
    host.receive({"type": "registerfunction", "id": "slow::fn"})
    results = []
    service.engine.call("slow::fn", {}).addBoth(results.append)
    [invoke] = host.sent_of_type("invokefunction")
    return clock, service, host, invoke, results


def test_sigterm_drain_lets_calls_in_flight_finish():
    clock, service, host, invoke, results = _engine_with_call(5.0)
    stopped = []
    service.stopService().addBoth(stopped.append)
    assert stopped == [] and service.engine.health.state == "draining"
    clock.advance(1)
    host.receive({"type": "invocationresult", "invocation_id": invoke["invocation_id"],
                  "function_id": "slow::fn", "result": {"done": True}})
    clock.advance(0.1)
    assert results == [{"done": True}]
    assert len(stopped) == 1 and not hasattr(stopped[0], 'raiseException')
    assert host.closed == (1001, "engine shutting down")
    assert service.engine.health.state == "stopped"


def test_sigterm_drain_gives_up_after_the_timeout():
    clock, service, host, invoke, results = _engine_with_call(2.0)
    stopped = []
    service.stopService().addBoth(stopped.append)
    clock.advance(1.9)
    assert stopped == []
    clock.advance(0.2)
    assert len(stopped) == 1 and not hasattr(stopped[0], 'raiseException')
    assert isinstance(results[0].value, InvocationError)
    assert results[0].value.code == "invocation_stopped"


def test_without_drain_stop_is_immediate():
    clock, service, host, invoke, results = _engine_with_call(None)
    stopped = []
    service.stopService().addBoth(stopped.append)
    assert len(stopped) == 1 and not hasattr(stopped[0], 'raiseException')
