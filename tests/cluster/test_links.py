"""
Cluster links: two and three engines in one process (one reactor, real sockets on
loopback, a MemoryDirectory), workers on real WebSockets.
"""

import pytest_twisted
from twisted.internet import defer, reactor, task

from iii_twisted.protocol import InvocationError

from cluster_helpers import offered, wait_for


async def failure_of(d):
    try:
        await d
    except InvocationError as e:
        return e
    raise AssertionError("the call succeeded")


@pytest_twisted.ensureDeferred
async def test_a_call_crosses_to_the_member_hosting_the_function(cluster):
    """Payload, result, traceparent, baggage and metadata cross unchanged."""
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::echo", lambda m: {"got": m["data"]})
    await offered(a, "svc::echo")
    caller = await cluster.worker(a, "caller")
    data = {"n": 1, "list": [1, "two", None], "nested": {"x": 1.5}}
    result = await caller.call("svc::echo", data,
                               traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                               baggage="k=v,a=b", metadata={"m": 1})
    # The engine tells a function its caller, as for a local call.
    assert result["got"].pop("_caller_worker_id") == caller.protocol.worker_id
    assert result == {"got": data}
    seen = host.invocations[-1]
    assert seen["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert seen["baggage"] == "k=v,a=b"
    assert seen["metadata"] == {"m": 1}


@pytest_twisted.ensureDeferred
async def test_an_error_crosses_unchanged(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    host = await cluster.worker(b, "host")

    def boom(message):
        raise InvocationError("my_code", "it broke", "Traceback: here")
    host.register("svc::boom", boom)
    await offered(a, "svc::boom")
    caller = await cluster.worker(a, "caller")
    error = await failure_of(caller.call("svc::boom", {}))
    assert (error.code, error.message, error.stacktrace) == \
        ("my_code", "it broke", "Traceback: here")


@pytest_twisted.ensureDeferred
async def test_void_crosses(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::note")
    await offered(a, "svc::note")
    caller = await cluster.worker(a, "caller")
    assert await caller.call("svc::note", {"v": 7}, action={"type": "void"}) is None
    await wait_for(lambda: host.invocations, what="the void call")
    assert host.invocations[0]["data"]["v"] == 7


@pytest_twisted.ensureDeferred
async def test_enqueue_runs_on_the_member_hosting_the_function(cluster):
    queue = {"class": "modules::queue::QueueModule",
             "config": {"queue_configs": {"default": {}}}}
    a, b = cluster.start("a", [queue]), cluster.start("b", [queue])
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::job")
    await offered(a, "svc::job")
    caller = await cluster.worker(a, "caller")
    receipt = await caller.call("svc::job", {"job": 1},
                                action={"type": "enqueue", "queue": "default"})
    assert "messageReceiptId" in receipt
    await wait_for(lambda: host.invocations, what="the queued call")
    assert host.invocations[0]["data"] == {"job": 1}


@pytest_twisted.ensureDeferred
async def test_remote_hosts_rank_after_local_ones_and_take_the_overflow(cluster):
    """Replicas across members: idle local first; under load the remote one helps."""
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    local = await cluster.worker(a, "local")
    remote = await cluster.worker(b, "remote")
    held = []

    def slow(message):
        d = defer.Deferred()
        held.append(d)
        return d
    local.register("svc::r", lambda m: "local")
    remote.register("svc::r", lambda m: "remote")
    await wait_for(lambda: a.engine.replicas.host_count("svc::r") == 2, what="2 hosts")
    caller = await cluster.worker(a, "caller")
    for _ in range(5):
        assert await caller.call("svc::r") == "local"
    local.functions["svc::r"] = slow
    remote.functions["svc::r"] = slow
    calls = [caller.call("svc::r") for _ in range(6)]
    await wait_for(lambda: len(held) == 6, what="6 calls held")
    assert len(local.invocations) - 5 == 3 and len(remote.invocations) == 3
    for d in held:
        d.callback("done")
    assert await defer.gatherResults(calls) == ["done"] * 6


@pytest_twisted.ensureDeferred
async def test_discovery_shows_the_whole_cluster(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    host = await cluster.worker(b, "host-b")
    host.register("svc::b", description="on b")
    host.trigger("t-b", "my-type", "svc::b", {"x": 1})
    mine = await cluster.worker(a, "host-a")
    mine.register("svc::a")
    await offered(a, "svc::b")
    await wait_for(lambda: any(r.get("name") == "host-b" for p in a.cluster.peers.values()
                               for r in p.cluster_peer.workers), what="b's view")
    functions = (await a.engine.call("engine::functions::list", {}))["functions"]
    by_id = {f["function_id"]: f for f in functions}
    assert by_id["svc::b"]["engine_name"] == "b"
    assert by_id["svc::b"]["engine_id"] == b.cluster.engine_id
    assert by_id["svc::b"]["worker_name"] == "host-b"
    assert by_id["svc::b"]["description"] == "on b"
    assert by_id["svc::a"]["engine_name"] == "a"
    workers = (await a.engine.call("engine::workers::list", {}))["workers"]
    names = {(w["name"], w["engine_name"]) for w in workers}
    assert ("host-b", "b") in names and ("host-a", "a") in names
    assert not any("cluster link" in (w["name"] or "") for w in workers)
    remote_row = next(w for w in workers if w["name"] == "host-b")
    assert "svc::b" in remote_row["functions"]
    triggers = (await a.engine.call("engine::triggers::list", {}))["triggers"]
    assert [(t["id"], t["engine_name"]) for t in triggers if t["id"] == "t-b"] == \
        [("t-b", "b")]


@pytest_twisted.ensureDeferred
async def test_a_call_crosses_at_most_one_link(cluster):
    """Three members: what B offers A is not offered on to C (no chains, no loops)."""
    a, b, c = cluster.start("a"), cluster.start("b"), cluster.start("c")
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::only-b", lambda m: "b")
    await offered(a, "svc::only-b")
    await offered(c, "svc::only-b")
    for service in (a, c):
        entry = service.engine.functions["svc::only-b"]
        assert entry.owner.connection.cluster_peer.engine_id == b.cluster.engine_id
        assert service.engine.replicas.host_count("svc::only-b") == 1
    caller = await cluster.worker(c, "caller")
    assert await caller.call("svc::only-b") == "b"
    host.unregister("svc::only-b")
    await wait_for(lambda: "svc::only-b" not in a.engine.functions
                   and "svc::only-b" not in c.engine.functions, what="unregistered")
