"""
The bridge over real sockets: two of our engines in this process (on the reactor
pytest-twisted runs), engine A with ``modules::bridge_client::BridgeClientModule`` and
a state ``Bridge`` adapter pointing at engine B, and official ``iii-sdk`` 0.10.0
workers on each. The SDK runs its own thread; its blocking calls go through
C{deferToThread} so the reactor (and both engines) keep running. Every wait is bounded.
"""

import threading

import pytest_twisted
from iii import InitOptions, register_worker
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from engine_process import free_port
from iii_twisted.modules.bridge_client import BridgeClientModule
from iii_twisted.modules.state import StateModule
from iii_twisted.service import EngineService
from iii_twisted.wsclient import CONNECTED


async def wait_for(predicate, timeout=15.0, what="condition"):
    """Wait on the reactor until C{predicate()} holds, or fail after C{timeout} s."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out after {}s waiting for {}".format(timeout, what))
        await task.deferLater(reactor, 0.02, lambda: None)


def b_config(port):
    return {"listen": "tcp:{}:interface=127.0.0.1".format(port),
            "invocation_timeout_ms": 20000, "modules": [
                {"class": "modules::state::StateModule"},
                {"class": "modules::pubsub::PubSubModule"}]}


def a_config(port_b):
    url = "ws://127.0.0.1:{}".format(port_b)
    return {"listen": "tcp:0:interface=127.0.0.1", "invocation_timeout_ms": 20000,
            "modules": [
                {"class": "modules::bridge_client::BridgeClientModule", "config": {
                    "url": url,
                    "expose": [{"local_function": "a::greet",
                                "remote_function": "from_a::greet"}],
                    "forward": [
                        {"local_function": "remote::echo", "remote_function": "b::echo",
                         "timeout_ms": 10000},
                        {"local_function": "remote::slow", "remote_function": "b::slow",
                         "timeout_ms": 300}]}},
                {"class": "modules::state::StateModule", "config": {"adapter": {
                    "class": "modules::state::adapters::Bridge",
                    "config": {"bridge_url": url}}}}]}


def module_of(service, cls):
    return next(m for m in service.modules if isinstance(m, cls))


class Pair:
    """Engine B on a fixed port (so it can restart there), engine A bridged to it."""

    def __init__(self):
        self.port_b = free_port()
        self.b = self.a = None
        self.workers = []

    def start_b(self):
        self.b = EngineService(b_config(self.port_b))
        self.b.startService()
        return self.b.listening()

    async def start(self):
        await self.start_b()
        self.a = EngineService(a_config(self.port_b))
        self.a.startService()
        self.port_a = (await self.a.listening()).getHost().port
        self.bridge = module_of(self.a, BridgeClientModule)
        await wait_for(lambda: self.bridge.client.state == CONNECTED, what="the bridge")

    async def worker(self, port, name):
        worker = await deferToThread(register_worker, "ws://127.0.0.1:{}".format(port),
                                     InitOptions(worker_name=name, otel={"enabled": False}))
        self.workers.append(worker)
        return worker

    async def stop(self):
        for worker in self.workers:
            if worker._thread.is_alive():
                await deferToThread(worker.shutdown)
        for service in (self.a, self.b):
            if service is not None and service.running:
                await service.stopService()


def bridge_links(service):
    """@return: the names of the workers connected to C{service}."""
    return sorted(w.name for w in service.engine.workers.values() if w.name)


@pytest_twisted.ensureDeferred
async def test_forward_invoke_expose_timeout_and_restart():
    """The whole life of a bridge: calls both ways, a timeout, B down, B back."""
    pair = Pair()
    try:
        await pair.start()
        on_b = await pair.worker(pair.port_b, "on-b")
        on_b.register_function({"id": "b::echo"}, lambda data: {"echo": data})
        on_b.register_function({"id": "b::fails"}, _fails)
        release = threading.Event()
        # Answers only once released (bounded): longer than the forward's 300 ms.
        on_b.register_function({"id": "b::slow"}, lambda data: release.wait(10))
        on_a = await pair.worker(pair.port_a, "on-a")
        pair.a.engine.register_function("a::greet", lambda data: {"hello": data["name"]})
        await wait_for(lambda: "b::echo" in pair.b.engine.functions and
                       "from_a::greet" in pair.b.engine.functions, what="registrations on B")
        # The bridge is a worker on B under the reference's name.
        assert "iii-bridge-client" in bridge_links(pair.b)

        # forward: a worker on A calls B's function under the local id.
        result = await deferToThread(on_a.trigger, {"function_id": "remote::echo",
                                                    "payload": {"n": 1}})
        assert result["echo"]["n"] == 1
        # bridge.invoke: any remote function by id, the raw result back.
        result = await deferToThread(on_a.trigger, {"function_id": "bridge.invoke",
                                                    "payload": {"function_id": "b::echo",
                                                                "data": {"n": 2}}})
        assert result["echo"]["n"] == 2
        # bridge.invoke_async: no result; the remote function runs.
        invoked = []
        on_b.register_function({"id": "b::record"}, lambda data: invoked.append(data))
        await wait_for(lambda: "b::record" in pair.b.engine.functions, what="b::record")
        assert await deferToThread(on_a.trigger, {
            "function_id": "bridge.invoke_async",
            "payload": {"function_id": "b::record", "data": {"n": 3}}}) is None
        await wait_for(lambda: invoked, what="the void call on B")
        assert invoked[0]["n"] == 3
        # expose: B's worker calls A's function through the bridge.
        assert await deferToThread(on_b.trigger, {"function_id": "from_a::greet",
                                                  "payload": {"name": "bo"}}) == {
            "hello": "bo"}

        # A remote error comes back as bridge_error naming the remote code.
        error = await _sdk_error(on_a, "bridge.invoke", {"function_id": "b::fails"})
        assert "bridge_error" in error and "remote error (invocation_failed)" in error
        error = await _sdk_error(on_a, "bridge.invoke", {"function_id": "nope::x"})
        assert "bridge_error" in error and "function_not_found" in error
        # Bad input: deserialization_error, as the reference.
        error = await _sdk_error(on_a, "bridge.invoke", {"data": 1})
        assert "deserialization_error" in error
        # Timeout (forward timeout_ms 300): bridge_error, not a hang.
        started = reactor.seconds()
        error = await _sdk_error(on_a, "remote::slow", {"n": 4})
        assert "bridge_error" in error and "invocation timed out" in error
        assert reactor.seconds() - started < 5
        release.set()

        # B stops: calls fail at once with bridge_error.
        await pair.b.stopService()
        await wait_for(lambda: pair.bridge.client.state != CONNECTED, what="link down")
        started = reactor.seconds()
        for function_id, payload in [
                ("remote::echo", {"n": 5}),
                ("bridge.invoke", {"function_id": "b::echo"}),
                ("bridge.invoke_async", {"function_id": "b::echo"}),
                ("state::set", {"scope": "s", "key": "k", "value": 1})]:
            error = await _sdk_error(on_a, function_id, payload)
            assert "iii is not connected" in error, (function_id, error)
        assert reactor.seconds() - started < 5
        assert module_of(pair.a, BridgeClientModule).health() is not None

        # B restarts on the same port: the bridge reconnects and registers again.
        connects = pair.bridge.client.connects
        await pair.start_b()
        await wait_for(lambda: pair.bridge.client.connects > connects, timeout=20,
                       what="the reconnect")
        await wait_for(lambda: "from_a::greet" in pair.b.engine.functions,
                       what="expose registered again")
        on_b2 = await pair.worker(pair.port_b, "on-b2")
        on_b2.register_function({"id": "b::echo"}, lambda data: {"echo2": data})
        await wait_for(lambda: "b::echo" in pair.b.engine.functions, what="b::echo again")
        result = await deferToThread(on_a.trigger, {"function_id": "remote::echo",
                                                    "payload": {"n": 6}})
        assert result["echo2"]["n"] == 6
        assert await deferToThread(on_b2.trigger, {"function_id": "from_a::greet",
                                                   "payload": {"name": "again"}}) == {
            "hello": "again"}
        assert module_of(pair.a, BridgeClientModule).health() is None
    finally:
        await pair.stop()


@pytest_twisted.ensureDeferred
async def test_state_bridge_adapter_stores_on_the_remote_engine():
    """state::set on A is stored on B (B's own workers read it); triggers fire on A."""
    pair = Pair()
    try:
        await pair.start()
        store = module_of(pair.a, StateModule).store
        await wait_for(lambda: store.client.state == CONNECTED, what="the state link")
        assert "iii-state-bridge" in bridge_links(pair.b)
        on_a = await pair.worker(pair.port_a, "on-a")
        on_b = await pair.worker(pair.port_b, "on-b")
        assert await deferToThread(on_a.trigger, {"function_id": "state::set", "payload": {
            "scope": "orders", "key": "o1", "value": {"n": 1}}}) == {
            "old_value": None, "new_value": {"n": 1}}
        # Read on B, by B's own worker: the value lives there.
        assert await deferToThread(on_b.trigger, {"function_id": "state::get", "payload": {
            "scope": "orders", "key": "o1"}}) == {"n": 1}
        b_store = module_of(pair.b, StateModule).store
        assert await b_store.get("orders", "o1") == {"n": 1}
        result = await deferToThread(on_a.trigger, {"function_id": "state::update",
                                                    "payload": {
            "scope": "orders", "key": "o1",
            "ops": [{"type": "increment", "path": "n", "by": 2}]}})
        assert result == {"old_value": {"n": 1}, "new_value": {"n": 3}}
        assert await deferToThread(on_a.trigger, {"function_id": "state::list_groups",
                                                  "payload": {}}) == {"groups": ["orders"]}
        assert await deferToThread(on_a.trigger, {"function_id": "state::delete",
                                                  "payload": {"scope": "orders",
                                                              "key": "o1"}}) == {"n": 3}
        assert await b_store.get("orders", "o1") is None
    finally:
        await pair.stop()


def _fails(data):
    raise RuntimeError("b says no")


async def _sdk_error(worker, function_id, payload):
    """@return: the text of the error an SDK call failed with."""
    try:
        result = await deferToThread(worker.trigger, {"function_id": function_id,
                                                      "payload": payload})
    except Exception as e:
        return str(e)
    raise AssertionError("{} succeeded with {!r}".format(function_id, result))


@pytest_twisted.ensureDeferred
async def test_bridge_to_an_engine_with_auth_uses_the_url_token():
    """A hub whose port needs a token: the bridge's ?token= gets in; a wrong one not."""
    port = free_port()
    hub = EngineService({"listen": "tcp:{}:interface=127.0.0.1".format(port),
                         "auth": {"tokens": [{"name": "bridge", "token": "s3cret"}]},
                         "modules": []})
    hub.startService()
    await hub.listening()
    hub.engine.register_function("hub::echo", lambda data: {"echo": data})
    engines = []
    try:
        for token, works in [("s3cret", True), ("wrong", False)]:
            a = EngineService({"listen": "tcp:0:interface=127.0.0.1", "modules": [
                {"class": "modules::bridge_client::BridgeClientModule", "config": {
                    "url": "ws://127.0.0.1:{}/?token={}".format(port, token)}}]})
            a.startService()
            engines.append(a)
            bridge = module_of(a, BridgeClientModule)
            await wait_for(lambda: bridge.client.state not in ("idle", "connecting"),
                           what="the first attempt")
            if works:
                assert bridge.client.state == CONNECTED
                assert (await a.engine.call("bridge.invoke", {
                    "function_id": "hub::echo", "data": 1}))["echo"] == 1
            else:
                assert bridge.client.state == "disconnected"
                try:
                    await a.engine.call("bridge.invoke", {"function_id": "hub::echo"})
                except Exception as e:
                    assert "iii is not connected" in str(e)
                else:
                    raise AssertionError("a refused bridge could call")
    finally:
        for service in engines + [hub]:
            await service.stopService()
