"""
The worker-protocol client (iii_twisted.wsclient) against a real engine's worker socket
over in-memory transports (twisted.test.iosim) on a MemoryReactorClock: what it sends,
calls both ways, errors, timeouts, the backoff and re-registration after a reconnect.
"""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from iii_twisted.engine import Engine
from iii_twisted.protocol import InvocationError
from iii_twisted.worker import WorkerFactory
from iii_twisted.wsclient import (
    CONNECTED, DOWN, FIRST, STOPPED_STATE, LinkError, WorkerClient)


class Remote:
    """A remote engine reachable in memory; C{up} says whether it accepts connections."""

    def __init__(self):
        self.reactor = MemoryReactorClock()
        self.restart()
        self.pumps = []
        self.attempts = 0

    def restart(self):
        self.engine = Engine(self.reactor, invocation_timeout=30)
        self.factory = WorkerFactory(self.engine, self.reactor, ping_interval=0)
        self.up = True
        self.servers = []

    def connector(self, client_factory):
        self.attempts += 1
        if not self.up:
            return fail(ConnectionRefusedError("refused"))
        addr = IPv4Address("TCP", "127.0.0.1", 49134)
        server = self.factory.buildProtocol(addr)
        client = client_factory.buildProtocol(addr)
        server_transport = iosim.FakeTransport(
            server, isServer=True, hostAddress=addr,
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + len(self.pumps)))
        client_transport = iosim.FakeTransport(client, isServer=False)
        self.pumps.append(iosim.connect(server, server_transport, client, client_transport,
                                        greet=False))
        self.servers.append(server)
        return succeed(client)

    def flush(self):
        for _ in range(8):
            for pump in self.pumps:
                pump.flush()

    def go_down(self):
        """The remote engine dies: its connections drop, new ones are refused."""
        self.up = False
        for server in self.servers:
            server.transport.loseConnection()
        self.flush()

    def worker(self, name):
        return next(w for w in self.engine.workers.values() if w.name == name)


@pytest.fixture
def remote():
    return Remote()


def make_client(remote, **kwargs):
    kwargs.setdefault("random", lambda: 0.5)  # no jitter
    return WorkerClient("ws://127.0.0.1:49134", remote.reactor, "link-test",
                        connector=remote.connector, **kwargs)


def connected(remote, **kwargs):
    client = make_client(remote, **kwargs)
    client.start()
    remote.flush()
    assert client.state == CONNECTED
    return client


def test_registers_as_a_worker_with_its_functions(remote):
    """On connect: functions, a service, triggers, then engine::workers::register."""
    client = make_client(remote)
    client.register_function("edge::hello", lambda data: {"hi": data})
    client.register_service("edge", "Edge")
    assert client.state == "idle"
    client.start()
    remote.flush()
    assert client.state == CONNECTED and client.connects == 1
    assert "edge::hello" in remote.engine.functions
    worker = remote.worker("link-test")
    assert worker.runtime == "python"
    assert client.worker_id == worker.id


def test_calls_both_ways(remote):
    """A call to the remote gets its result; the remote's call to ours gets ours."""
    client = connected(remote)
    remote.engine.register_function("hub::echo", lambda data: {"echo": data})
    d = client.call("hub::echo", {"n": 1})
    remote.flush()
    # The remote engine marks who called, as for any worker (engine-core.md §4.1).
    assert d.result == {"echo": {"n": 1, "_caller_worker_id": client.worker_id}}

    client.register_function("edge::double", lambda data: data["n"] * 2)
    remote.flush()
    d = remote.engine.call("edge::double", {"n": 21})
    remote.flush()
    assert d.result == 42


def test_remote_errors_keep_code_and_message(remote):
    """The remote's error comes back as an InvocationError with its code."""
    client = connected(remote)
    d = client.call("nope::x", {})
    remote.flush()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(InvocationError)
    assert failure.value.code == "function_not_found"

    def boom(data):
        raise ValueError("edge broke")
    client.register_function("edge::boom", boom)
    client.register_function("edge::refuses", lambda data: (_ for _ in ()).throw(
        InvocationError("NOPE", "not today")))
    remote.flush()
    for function_id, code, text in [("edge::boom", "invocation_failed", "edge broke"),
                                    ("edge::refuses", "NOPE", "not today")]:
        d = remote.engine.call(function_id, {})
        remote.flush()
        failure = d.result
        d.addErrback(lambda f: None)
        assert failure.value.code == code and text in failure.value.message
    d = remote.engine.call("edge::boom", {})
    remote.flush()
    assert "Traceback" in d.result.value.stacktrace
    d.addErrback(lambda f: None)


def test_void_call_sends_no_invocation_id(remote):
    """call_void fires at once with None; the remote function still runs."""
    client = connected(remote)
    seen = []
    remote.engine.register_function("hub::record", seen.append)
    d = client.call_void("hub::record", {"n": 2})
    assert d.result is None
    remote.flush()
    assert seen and seen[0]["n"] == 2


def test_timeout(remote):
    """A call with no answer fails with 'invocation timed out' after timeout_ms."""
    client = connected(remote)
    client.register_function("edge::never", lambda data: None)
    from twisted.internet.defer import Deferred
    remote.engine.register_function("hub::hang", lambda data: Deferred())
    d = client.call("hub::hang", {}, timeout_ms=250)
    remote.flush()
    remote.reactor.advance(0.2)
    assert not d.called
    remote.reactor.advance(0.1)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(LinkError) and str(failure.value) == "invocation timed out"


def test_non_json_data_refused_before_sending(remote):
    client = connected(remote)
    d = client.call("hub::x", {"bad": object()})
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(LinkError) and "not JSON" in str(failure.value)


def test_first_attempt_is_waited_for_then_calls_fail_at_once(remote):
    """Calls made while the first attempt runs wait for it; once it failed, they fail."""
    remote.up = False
    client = make_client(remote)
    pending = []
    real = remote.connector

    def slow_connector(factory):
        from twisted.internet.defer import Deferred
        d = Deferred()
        pending.append((d, factory))
        return d
    client._connector = slow_connector
    client.start()
    assert client.state == FIRST
    waiting = client.call("hub::x", {})
    assert not waiting.called
    pending[0][0].errback(ConnectionRefusedError("refused"))
    failure = waiting.result
    waiting.addErrback(lambda f: None)
    assert str(failure.value) == "iii is not connected"
    assert client.state == DOWN
    d = client.call("hub::x", {})
    assert str(d.result.value) == "iii is not connected"
    d.addErrback(lambda f: None)
    client._connector = real
    client.stop()


def test_backoff_doubles_up_to_the_cap_and_resets(remote):
    """Retries at 1, 2, 4, ... s capped at max_delay; the count resets on connect."""
    remote.up = False
    client = make_client(remote, initial_delay=1.0, max_delay=8.0)
    client.start()
    assert remote.attempts == 1
    times = []
    for _ in range(6):
        before = remote.attempts
        waited = 0.0
        while remote.attempts == before:
            remote.reactor.advance(0.5)
            waited += 0.5
        times.append(waited)
    assert times == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    remote.up = True
    remote.reactor.advance(8.0)
    remote.flush()
    assert client.state == CONNECTED
    remote.go_down()
    assert client.state == DOWN
    before = remote.attempts
    remote.reactor.advance(1.0)
    assert remote.attempts == before + 1  # back to the initial delay
    client.stop()


def test_jitter_stays_within_thirty_percent(remote):
    remote.up = False
    for value, expected in [(0.0, 0.7), (1.0, 1.3)]:
        client = make_client(remote, random=lambda: value)
        client.start()
        before = remote.attempts
        remote.reactor.advance(expected - 0.01)
        assert remote.attempts == before
        remote.reactor.advance(0.02)
        assert remote.attempts == before + 1
        client.stop()


def test_lost_link_fails_calls_and_reregisters_after_restart(remote):
    """Calls in flight fail when the link drops; a restarted remote learns ours again."""
    client = connected(remote)
    client.register_function("edge::hello", lambda data: "hi")
    trigger_id = client.register_trigger("engine::workers-available", "edge::hello", {})
    from twisted.internet.defer import Deferred
    remote.engine.register_function("hub::hang", lambda data: Deferred())
    in_flight = client.call("hub::hang", {})
    remote.flush()
    remote.go_down()
    failure = in_flight.result
    in_flight.addErrback(lambda f: None)
    assert str(failure.value) == "the link was lost before the result came"
    assert client.state == DOWN
    d = client.call("hub::hang", {})
    assert str(d.result.value) == "iii is not connected"
    d.addErrback(lambda f: None)

    remote.restart()  # a new engine, empty registries, same address
    remote.reactor.advance(1.0)
    remote.flush()
    assert client.state == CONNECTED and client.connects == 2
    assert "edge::hello" in remote.engine.functions
    assert trigger_id in remote.engine.triggers
    d = remote.engine.call("edge::hello", {})
    remote.flush()
    assert d.result == "hi"


def test_stop_fails_pending_and_stops_reconnecting(remote):
    client = connected(remote)
    from twisted.internet.defer import Deferred
    remote.engine.register_function("hub::hang", lambda data: Deferred())
    in_flight = client.call("hub::hang", {})
    remote.flush()
    stopped = client.stop()
    remote.flush()
    assert stopped.called
    assert str(in_flight.result.value) == "the link is stopped"
    in_flight.addErrback(lambda f: None)
    assert client.state == STOPPED_STATE
    attempts = remote.attempts
    remote.reactor.advance(60)
    assert remote.attempts == attempts
    d = client.call("hub::x", {})
    assert str(d.result.value) == "the link is stopped"
    d.addErrback(lambda f: None)


def test_bad_frames_are_dropped(remote):
    """Undecodable or non-object frames and unknown types leave the link up."""
    client = connected(remote)
    protocol = client._protocol
    for payload in [b"{nope", b"[1]", b'{"type": "mystery"}',
                    b'{"type": "invocationresult", "invocation_id": "unknown"}']:
        client._received(protocol, payload)
    assert client.state == CONNECTED


def test_bad_url_refused():
    with pytest.raises(ValueError, match="ws:// or wss://"):
        WorkerClient("http://x", MemoryReactorClock(), "n")


def test_logs_once_per_state_change(remote):
    """Many failed attempts log one warning; the connect and the loss one line each."""
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        remote.up = False
        client = make_client(remote)
        client.start()
        for delay in (1, 2, 4, 8):
            remote.reactor.advance(delay)
        assert remote.attempts == 5
        remote.up = True
        remote.reactor.advance(16)
        remote.flush()
        assert client.state == CONNECTED
        remote.go_down()
        for delay in (1, 2, 4):
            remote.reactor.advance(delay)
        assert remote.attempts == 9
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if e.get("name") == "link-test"
            and e["log_level"].name in ("info", "warn")]
    texts = [e["log_format"].split(" {url}")[0].split("{name} ")[1] for e in ours]
    assert texts == ["cannot connect to", "connected to", "to", "cannot connect to"]
    client.stop()
