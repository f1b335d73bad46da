"""
Replicas (iii_twisted.replicas, issue 12 point 3): several workers hosting one function
id, on a task.Clock with fake worker connections.
"""

import pytest
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from iii_twisted.auth import Session
from iii_twisted.config import ConfigError, from_dict
from iii_twisted.engine import CallableHost, Engine, FunctionEntry
from iii_twisted.modules.rest_api import RestApiModule
from iii_twisted.protocol import INVOCATION_STOPPED, InvocationError
from iii_twisted.replicas import LAST_WINS, ReplicaSet, Replicas
from iii_twisted.testing import FakeWorkerConnection, make_engine
from test_engine import register


def invocations(conn):
    return [m for m in conn.pop_sent() if m.get("type") == "invokefunction"]


def answer(conn, invocation, result=None):
    conn.receive({"type": "invocationresult", "invocation_id": invocation["invocation_id"],
                  "function_id": invocation["function_id"], "result": result})


class SpreadTests(SynchronousTestCase):
    def setUp(self):
        self.engine, self.clock = make_engine()
        self.a = FakeWorkerConnection.connect(self.engine)
        self.b = FakeWorkerConnection.connect(self.engine)
        register(self.a, "svc::health")
        register(self.b, "svc::health")
        self.a.pop_sent()
        self.b.pop_sent()

    def test_both_registrations_are_hosts(self):
        """The second registration joins the first; neither is told it lost."""
        assert self.engine.replicas.host_count("svc::health") == 2
        assert "svc::health" in self.a.worker.functions
        assert "svc::health" in self.b.worker.functions
        assert self.engine.functions["svc::health"].owner is self.b.worker  # the latest

    def test_equally_loaded_hosts_take_turns(self):
        """Calls answered at once: round robin, each host gets half."""
        got = []
        for i in range(6):
            d = self.engine.call("svc::health", {"i": i})
            for conn in (self.a, self.b):
                for inv in invocations(conn):
                    got.append(conn)
                    answer(conn, inv, {"ok": i})
            assert self.successResultOf(d) == {"ok": i}
        assert got.count(self.a) == 3 and got.count(self.b) == 3
        assert all(got[i] is not got[i + 1] for i in range(5))  # alternating

    def test_the_least_loaded_host_gets_the_call(self):
        """A host with calls in flight is passed over until the other has as many."""
        first = self.engine.call("svc::health")
        on_a, on_b = invocations(self.a), invocations(self.b)
        assert len(on_a + on_b) == 1
        busy, idle = (self.a, self.b) if on_a else (self.b, self.a)
        for _ in range(3):  # the idle host answers at once: it stays the least loaded
            d = self.engine.call("svc::health")
            [inv] = invocations(idle)
            assert invocations(busy) == []
            answer(idle, inv, "idle")
            assert self.successResultOf(d) == "idle"
        self.engine.call("svc::health")  # the idle one again (0 in flight against 1)
        assert len(invocations(idle)) == 1
        self.engine.call("svc::health")  # 1 and 1: a tie, round robin goes on
        assert len(invocations(busy)) == 1
        assert self.engine.tracker.count_for(busy.worker) == 2
        self.assertNoResult(first)

    def test_a_congested_host_is_passed_over(self):
        """A host that does not read its socket gets no call while another can take it."""
        self.a.congested = True
        for i in range(3):
            d = self.engine.call("svc::health")
            [inv] = invocations(self.b)
            answer(self.b, inv, i)
            assert self.successResultOf(d) == i
        assert invocations(self.a) == []

    def test_a_leaving_host_hands_its_share_to_the_other(self):
        """B disconnects: the id stays, every later call goes to A."""
        self.b.disconnect()
        assert self.engine.functions["svc::health"].owner is self.a.worker
        assert self.engine.replicas.host_count("svc::health") == 1
        assert "svc::health" not in self.engine.replicas.sets
        for i in range(3):
            d = self.engine.call("svc::health")
            [inv] = invocations(self.a)
            answer(self.a, inv, i)
            assert self.successResultOf(d) == i

    def test_only_calls_forwarded_to_the_leaver_fail(self):
        """In flight on A and on B; B leaves: B's fail invocation_stopped, A's finish."""
        d1 = self.engine.call("svc::health")
        d2 = self.engine.call("svc::health")
        [on_a] = invocations(self.a)
        assert len(invocations(self.b)) == 1
        on_a_d = d1 if self.engine.tracker.by_id[on_a["invocation_id"]].deferred is d1 else d2
        on_b_d = d2 if on_a_d is d1 else d1
        self.b.disconnect()
        failure = self.failureResultOf(on_b_d, InvocationError)
        assert failure.value.code == INVOCATION_STOPPED
        self.assertNoResult(on_a_d)
        answer(self.a, on_a, "from a")
        assert self.successResultOf(on_a_d) == "from a"

    def test_unregistering_takes_only_that_host(self):
        """A's unregisterfunction leaves B hosting the id; B's then removes it."""
        self.a.receive({"type": "unregisterfunction", "id": "svc::health"})
        assert "svc::health" not in self.a.worker.functions
        assert self.engine.functions["svc::health"].owner is self.b.worker
        self.engine.call("svc::health")
        assert len(invocations(self.b)) == 1 and invocations(self.a) == []
        self.b.receive({"type": "unregisterfunction", "id": "svc::health"})
        assert "svc::health" not in self.engine.functions

    def test_the_last_host_leaving_removes_the_id(self):
        self.a.disconnect()
        self.b.disconnect()
        assert "svc::health" not in self.engine.functions
        assert self.engine.replicas.sets == {}
        failure = self.failureResultOf(self.engine.call("svc::health"), InvocationError)
        assert failure.value.code == "function_not_found"

    def test_registering_again_keeps_one_host_per_worker(self):
        """A re-registers (a reconnecting SDK replays): still two hosts, A now primary."""
        register(self.a, "svc::health", description="again")
        assert self.engine.replicas.host_count("svc::health") == 2
        primary = self.engine.functions["svc::health"]
        assert (primary.owner, primary.description) == (self.a.worker, "again")

    def test_an_in_process_registration_replaces_every_host(self):
        self.engine.register_function("svc::health", lambda data: "engine")
        assert self.engine.replicas.sets == {}
        assert "svc::health" not in self.a.worker.functions
        assert "svc::health" not in self.b.worker.functions
        assert self.successResultOf(self.engine.call("svc::health")) == "engine"
        self.b.disconnect()
        assert self.successResultOf(self.engine.call("svc::health")) == "engine"

    def test_an_http_invoked_registration_replaces_as_before(self):
        """A function a worker registers behind a URL is not a replica: the last wins."""
        c = FakeWorkerConnection.connect(self.engine)
        entry = FunctionEntry("svc::health", CallableHost(lambda data: "url"), c.worker)
        assert self.engine.add_function(entry) is entry
        assert self.engine.replicas.sets == {}
        assert "svc::health" not in self.a.worker.functions
        assert "svc::health" not in self.b.worker.functions
        assert self.successResultOf(self.engine.call("svc::health")) == "url"

    def test_discovery_lists_one_row_with_its_host_count(self):
        result = self.successResultOf(self.engine.call("engine::functions::list", {}))
        rows = [r for r in result["functions"] if r["function_id"] == "svc::health"]
        assert len(rows) == 1 and rows[0]["host_count"] == 2
        self.b.disconnect()
        result = self.successResultOf(self.engine.call("engine::functions::list", {}))
        [row] = [r for r in result["functions"] if r["function_id"] == "svc::health"]
        assert row["host_count"] == 1


class LastWinsTests(SynchronousTestCase):
    """function_replicas: last_wins: the reference's takeover."""

    def test_the_last_registration_replaces_and_its_departure_removes_the_id(self):
        engine, _ = make_engine(function_replicas=LAST_WINS)
        a = FakeWorkerConnection.connect(engine)
        b = FakeWorkerConnection.connect(engine)
        register(a, "svc::health")
        register(b, "svc::health")
        assert engine.replicas.sets == {}
        assert "svc::health" not in a.worker.functions
        d = engine.call("svc::health")
        assert invocations(a) == [] and len(invocations(b)) == 1
        b.disconnect()
        assert "svc::health" not in engine.functions
        assert self.failureResultOf(d, InvocationError).value.code == INVOCATION_STOPPED

    def test_switching_policy_at_reload_replaces_at_the_next_registration(self):
        engine, _ = make_engine()
        a, b, c = (FakeWorkerConnection.connect(engine) for _ in range(3))
        register(a, "f")
        register(b, "f")
        engine.replicas.set_policy(LAST_WINS)
        register(c, "f")
        assert engine.replicas.sets == {}
        assert engine.functions["f"].owner is c.worker
        assert "f" not in a.worker.functions and "f" not in b.worker.functions
        b.disconnect()
        assert engine.functions["f"].owner is c.worker


class AuthTests(SynchronousTestCase):
    """Replicas are registrations of the same principal when auth is on."""

    def connect(self, engine, session):
        conn = FakeWorkerConnection(engine)
        conn.worker = engine.attach(conn, session)
        return conn

    def test_another_principal_is_refused_not_added(self):
        engine, _ = make_engine()
        a = self.connect(engine, Session(name="a"))
        b = self.connect(engine, Session(name="b"))
        register(a, "shared::f")
        register(b, "shared::f")
        assert engine.replicas.sets == {}
        assert engine.functions["shared::f"].owner is a.worker
        assert b.sent_of_type("registrationrejected")[0]["code"] == \
            "FUNCTION_NAMESPACE_CONFLICT"

    def test_the_same_principal_adds_a_replica(self):
        engine, _ = make_engine()
        a1 = self.connect(engine, Session(name="a"))
        a2 = self.connect(engine, Session(name="a"))
        register(a1, "f")
        register(a2, "f")
        assert engine.replicas.host_count("f") == 2
        a2.disconnect()
        assert engine.functions["f"].owner is a1.worker


def test_reported_case_http_route_serves_from_a_after_b_leaves():
    """
    Workers A and B both register svc::health and an HTTP route for it; B registers
    last and leaves: the route and the id still serve, from A.
    """
    clock = MemoryReactorClock()
    engine = Engine(clock, invocation_timeout=60)
    api = RestApiModule(engine, {"port": 0}, clock)
    treq = StubTreq(api.resource)
    a = FakeWorkerConnection.connect(engine)
    b = FakeWorkerConnection.connect(engine)
    for conn, trigger_id in ((a, "a-route"), (b, "b-route")):
        register(conn, "svc::health")
        conn.receive({"type": "registertrigger", "id": trigger_id, "trigger_type": "http",
                      "function_id": "svc::health",
                      "config": {"api_path": "health", "http_method": "GET"}})
    b.disconnect()

    d = treq.get("http://api.test/health")
    treq.flush()
    [inv] = invocations(a)
    assert inv["function_id"] == "svc::health"
    answer(a, inv, {"status_code": 200, "body": {"ok": "a"}})
    treq.flush()
    response = []
    d.addCallback(response.append)
    assert response[0].code == 200
    body = []
    response[0].json().addCallback(body.append)
    treq.flush()
    assert body == [{"ok": "a"}]

    called = engine.call("svc::health", {})
    [inv] = invocations(a)
    answer(a, inv, "direct")
    assert called.result == "direct"


def test_pick_prefers_least_loaded_then_local_then_round_robin():
    class E:
        def __init__(self, name):
            self.owner = name

    x, y, z = E("x"), E("y"), E("z")
    replicas = ReplicaSet([x, y, z])
    loads = {x: 0, y: 0, z: 0}
    order = [replicas.pick(loads.get).owner for _ in range(6)]
    assert order == ["x", "y", "z", "x", "y", "z"]
    loads[y] = 2
    assert {replicas.pick(loads.get).owner for _ in range(4)} == {"x", "z"}
    remote = {x: 1, y: 0, z: 0}  # the cluster's seam: remote hosts rank after local
    loads = {x: 0, y: 0, z: 0}
    assert [replicas.pick(loads.get, remote.get).owner for _ in range(2)] == ["y", "z"]


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="function_replicas"):
        Replicas(None, "first_wins")


def test_config_key_function_replicas():
    assert from_dict({"modules": []}).function_replicas == "spread"
    assert from_dict({"modules": [], "function_replicas": "last_wins"}).function_replicas \
        == "last_wins"
    with pytest.raises(ConfigError, match="function_replicas"):
        from_dict({"modules": [], "function_replicas": "first"})
    with pytest.raises(ConfigError, match="function_replicas"):
        from_dict({"modules": [], "function_replicas": 3})


class NamespaceTests(SynchronousTestCase):
    """A replica whose connection then names a namespace (current SDKs) moves there."""

    def declare(self, conn, namespace):
        conn.receive({"type": "invokefunction", "function_id": "engine::workers::register",
                      "data": {"runtime": "python", "version": "0.25.0", "name": "w",
                               "namespace": namespace},
                      "action": {"type": "void"}})

    def test_the_moved_host_leaves_the_default_id_to_the_other(self):
        engine, _ = make_engine()
        a = FakeWorkerConnection.connect(engine)
        b = FakeWorkerConnection.connect(engine)
        register(a, "svc::fn")
        register(b, "svc::fn")
        self.declare(b, "team-a")
        assert engine.replicas.sets == {}
        assert engine.functions["svc::fn"].owner is a.worker
        assert "svc::fn" in a.worker.functions and "svc::fn" not in b.worker.functions
        moved = [key for key in engine.functions if key != "svc::fn"
                 and engine.functions[key].owner is b.worker]
        assert len(moved) == 1 and moved[0] in b.worker.functions
        b.disconnect()
        assert engine.functions["svc::fn"].owner is a.worker
