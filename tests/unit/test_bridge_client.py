"""
The bridge module (iii_twisted.modules.bridge_client) with its link to a remote engine
in memory (test_wsclient.Remote): its functions, forward/expose, bridge_error and
deserialization_error as the reference words them, config and health.
"""

import pytest
from twisted.internet.defer import Deferred

from iii_twisted.config import ConfigError
from iii_twisted.engine import Engine
from iii_twisted.modules import WORKER_NAMES, build_module
from iii_twisted.modules.bridge_client import BridgeClientModule
from iii_twisted.protocol import InvocationError
from iii_twisted.wsclient import WorkerClient

from test_wsclient import Remote

CLASS = "modules::bridge_client::BridgeClientModule"


class Setup:
    def __init__(self, config, start=True):
        self.remote = Remote()
        self.engine = Engine(self.remote.reactor, invocation_timeout=60)
        client = WorkerClient("ws://hub:49134", self.remote.reactor, "iii-bridge-client",
                              connector=self.remote.connector, random=lambda: 0.5)
        self.module = BridgeClientModule(self.engine, config, self.remote.reactor,
                                         client=client)
        if start:
            self.module.startService()
            self.remote.flush()

    def call(self, function_id, data):
        """@return: the result, or the InvocationError, of a local call."""
        d = self.engine.call(function_id, data)
        self.remote.flush()
        result = []
        d.addBoth(result.append)
        if hasattr(result[0], "value"):
            return result[0].value
        return result[0]


CONFIG = {
    "expose": [{"local_function": "edge::greet", "remote_function": "hub::greet_edge"},
               {"local_function": "edge::same"}],
    "forward": [{"local_function": "remote::echo", "remote_function": "hub::echo"},
                {"local_function": "remote::hang", "remote_function": "hub::hang",
                 "timeout_ms": 500}],
    "service_id": "edge",
}


@pytest.fixture
def setup():
    s = Setup(CONFIG)
    s.remote.engine.register_function("hub::echo", lambda data: {"echo": data})
    s.remote.engine.register_function("hub::hang", lambda data: Deferred())
    yield s
    s.module.stopService()


def test_registered_in_the_module_registry():
    assert WORKER_NAMES["iii-bridge"] == CLASS
    remote = Remote()
    module = build_module(CLASS, Engine(remote.reactor), {"url": "ws://127.0.0.1:1"},
                          remote.reactor)
    assert isinstance(module, BridgeClientModule) and module.iii_class == CLASS


def test_functions(setup):
    """bridge.invoke, bridge.invoke_async and each forward are local functions."""
    for function_id in ("bridge.invoke", "bridge.invoke_async", "remote::echo",
                        "remote::hang"):
        assert function_id in setup.engine.functions
    assert setup.engine.functions["remote::echo"].description == \
        "Forward to remote function hub::echo"
    # expose: registered on the remote (remote_function defaults to local_function),
    # with the service.
    assert "hub::greet_edge" in setup.remote.engine.functions
    assert "edge::same" in setup.remote.engine.functions
    assert "edge" in setup.remote.engine.services


def test_forward_and_invoke(setup):
    assert setup.call("remote::echo", {"n": 1})["echo"]["n"] == 1
    assert setup.call("bridge.invoke", {"function_id": "hub::echo",
                                        "data": [1, 2]}) == {"echo": [1, 2]}
    seen = []
    setup.remote.engine.register_function("hub::record", seen.append)
    assert setup.call("bridge.invoke_async", {"function_id": "hub::record",
                                              "data": {"n": 3}}) is None
    setup.remote.flush()
    assert seen[0]["n"] == 3


def test_expose_runs_the_local_function(setup):
    setup.engine.register_function("edge::greet", lambda data: {"hello": data["name"]})
    setup.engine.register_function("edge::same", lambda data: None)
    d = setup.remote.engine.call("hub::greet_edge", {"name": "ann"})
    setup.remote.flush()
    assert d.result["hello"] == "ann"
    d = setup.remote.engine.call("edge::same", {})
    setup.remote.flush()
    assert d.result is None


def test_expose_forwards_local_errors(setup):
    def refuses(data):
        raise InvocationError("NOPE", "not here", "trace")
    setup.engine.register_function("edge::greet", refuses)
    d = setup.remote.engine.call("hub::greet_edge", {})
    setup.remote.flush()
    error = d.result.value
    d.addErrback(lambda f: None)
    assert (error.code, error.message, error.stacktrace) == ("NOPE", "not here", "trace")
    d = setup.remote.engine.call("edge::same", {})  # not registered locally
    setup.remote.flush()
    assert d.result.value.code == "function_not_found"
    d.addErrback(lambda f: None)


def test_remote_error_is_a_bridge_error(setup):
    error = setup.call("bridge.invoke", {"function_id": "hub::missing"})
    assert error.code == "bridge_error"
    assert error.message == "remote error (function_not_found): Function hub::missing not found"


def test_timeout_is_a_bridge_error(setup):
    d = setup.engine.call("remote::hang", {})
    setup.remote.flush()
    setup.remote.reactor.advance(0.5)
    error = d.result.value
    d.addErrback(lambda f: None)
    assert (error.code, error.message) == ("bridge_error", "invocation timed out")
    d = setup.engine.call("bridge.invoke", {"function_id": "hub::hang", "timeout_ms": 100})
    setup.remote.flush()
    setup.remote.reactor.advance(0.1)
    assert d.result.value.message == "invocation timed out"
    d.addErrback(lambda f: None)


@pytest.mark.parametrize("data, reason", [
    (None, "expected an object with function_id, got null"),
    ({"data": 1}, "missing field `function_id`"),
    ({"function_id": 3}, "field `function_id` must be a string"),
    ({"function_id": "x", "timeout_ms": -1}, "non-negative integer"),
    ({"function_id": "x", "timeout_ms": "5"}, "non-negative integer"),
])
def test_bad_input_is_a_deserialization_error(setup, data, reason):
    for function_id in ("bridge.invoke", "bridge.invoke_async"):
        error = setup.call(function_id, data)
        assert error.code == "deserialization_error"
        assert error.message.startswith("Failed to parse invoke input: ")
        assert reason in error.message


def test_link_down_fails_at_once(setup):
    """While the remote is down every call fails with bridge_error, without waiting."""
    setup.remote.go_down()
    assert setup.module.health() == "bridge to ws://hub:49134 is disconnected"
    for function_id, data in [("remote::echo", {}),
                              ("bridge.invoke", {"function_id": "hub::echo"}),
                              ("bridge.invoke_async", {"function_id": "hub::echo"})]:
        d = setup.engine.call(function_id, data)
        error = d.result.value  # already failed: nothing advanced the clock
        d.addErrback(lambda f: None)
        assert (error.code, error.message) == ("bridge_error", "iii is not connected")
    setup.remote.restart()
    setup.remote.reactor.advance(1.0)
    setup.remote.flush()
    assert setup.module.health() is None
    assert "hub::greet_edge" in setup.remote.engine.functions
    setup.remote.engine.register_function("hub::echo", lambda data: "back")
    assert setup.call("remote::echo", {}) == "back"


def test_url_from_environment(monkeypatch):
    remote = Remote()
    monkeypatch.setenv("III_URL", "ws://from-env:1234")
    module = BridgeClientModule(Engine(remote.reactor), {}, remote.reactor)
    assert module.url == "ws://from-env:1234"
    monkeypatch.delenv("III_URL")
    module = BridgeClientModule(Engine(remote.reactor), {}, remote.reactor)
    assert module.url == "ws://0.0.0.0:49134"  # the reference's default
    monkeypatch.setenv("III_URL", "http://nope")
    with pytest.raises(ConfigError) as info:
        BridgeClientModule(Engine(remote.reactor), {}, remote.reactor)
    assert info.value.key == "url" and "III_URL" in str(info.value)
