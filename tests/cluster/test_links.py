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


def rest_api():
    return {"class": "modules::api::RestApiModule",
            "config": {"port": 0, "host": "127.0.0.1"}}


def state_module():
    return {"class": "modules::state::StateModule", "config": {}}


async def rest_port(service):
    from iii_twisted.listeners import listeners_of
    from iii_twisted.modules.rest_api import RestApiModule

    module = next(m for m in service.modules if isinstance(m, RestApiModule))
    listener = listeners_of(module)[0]
    return (await listener._waitingForPort).getHost().port


@pytest_twisted.ensureDeferred
async def test_an_http_route_of_one_member_is_served_by_every_member(cluster):
    import treq

    a, b = cluster.start("a", [rest_api()]), cluster.start("b", [rest_api()])
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::hello", lambda m: {"status_code": 200,
                                           "body": {"hello": m["data"]["query_params"]}})
    host.trigger("route-hello", "http", "svc::hello",
                 {"api_path": "hello", "http_method": "GET"})
    await wait_for(lambda: "route-hello" in a.engine.triggers, what="the route on a")
    for service in (a, b):
        response = await treq.get("http://127.0.0.1:{}/hello?who=x".format(
            await rest_port(service)))
        assert response.code == 200
        assert (await response.json())["hello"] == {"who": "x"}
    host.close()
    await wait_for(lambda: "route-hello" not in a.engine.triggers, what="route gone")
    response = await treq.get("http://127.0.0.1:{}/hello".format(await rest_port(a)))
    assert response.code == 404
    await response.content()


@pytest_twisted.ensureDeferred
async def test_a_state_change_on_one_member_fires_the_trigger_of_another(cluster):
    a, b = cluster.start("a", [state_module()]), cluster.start("b", [state_module()])
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::on-change")
    host.trigger("watch", "state", "svc::on-change", {"scope": "orders"})
    await wait_for(lambda: "watch" in a.engine.triggers, what="the trigger on a")
    await a.engine.call("state::set", {"scope": "orders", "key": "o1", "value": 5})
    await wait_for(lambda: host.invocations, what="the trigger to fire")
    event = host.invocations[0]["data"]
    assert (event["scope"], event["key"], event["new_value"]) == ("orders", "o1", 5)
    await b.engine.call("state::set", {"scope": "orders", "key": "o2", "value": 6})
    await wait_for(lambda: len(host.invocations) == 2, what="the local trigger")
    await task.deferLater(reactor, 0.2, lambda: None)
    assert len(host.invocations) == 2  # each change fires once


@pytest_twisted.ensureDeferred
async def test_a_member_dying_mid_call_fails_its_calls_and_leaves_the_registry(cluster):
    """Its link drops (TCP reset): calls fail with invocation_stopped in under 2 s."""
    a, b = cluster.start("a", [rest_api()]), cluster.start("b", [rest_api()])
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::stuck", lambda m: defer.Deferred())
    host.trigger("route-stuck", "http", "svc::stuck", {"api_path": "stuck"})
    await wait_for(lambda: "route-stuck" in a.engine.triggers, what="the route on a")
    caller = await cluster.worker(a, "caller")
    call = caller.call("svc::stuck", {})
    await wait_for(lambda: host.invocations, what="the call to arrive")
    started = reactor.seconds()
    # b "crashes": its sockets are reset, it says nothing.
    b.cluster.links[a.cluster.engine_id].protocol.transport.abortConnection()
    a.cluster.peers[b.cluster.engine_id].transport.abortConnection()
    error = await failure_of(call)
    assert error.code == "invocation_stopped"
    assert reactor.seconds() - started < 2.0
    assert "svc::stuck" not in a.engine.functions
    assert "route-stuck" not in a.engine.triggers
    workers = (await a.engine.call("engine::workers::list", {}))["workers"]
    assert [w["name"] for w in workers] == ["caller"]


@pytest_twisted.ensureDeferred
async def test_a_member_the_directory_drops_leaves_and_is_not_redialed(cluster):
    """Its links may still be open (a half-open socket): they are closed at once."""
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::x", lambda m: defer.Deferred())
    await offered(a, "svc::x")
    caller = await cluster.worker(a, "caller")
    call = caller.call("svc::x", {})
    await wait_for(lambda: host.invocations, what="the call to arrive")
    started = reactor.seconds()
    cluster.registry.expire(b.cluster.engine_id)  # its heartbeat ran out
    error = await failure_of(call)
    assert error.code == "invocation_stopped"
    assert reactor.seconds() - started < 2.0
    assert "svc::x" not in a.engine.functions
    assert b.cluster.engine_id not in a.cluster.links


@pytest_twisted.ensureDeferred
async def test_a_dropped_link_is_dialed_again_while_the_member_is_listed(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::x", lambda m: "ok")
    await offered(a, "svc::x")
    a.cluster.peers[b.cluster.engine_id].dropConnection(abort=True)
    await wait_for(lambda: "svc::x" not in a.engine.functions, 2.0, "svc::x to go")
    await offered(a, "svc::x", timeout=5.0)  # b dialed a again
    caller = await cluster.worker(a, "caller")
    assert await caller.call("svc::x") == "ok"


@pytest_twisted.ensureDeferred
async def test_a_member_without_the_secret_is_refused(cluster):
    import treq

    a = cluster.start("a", member_ttl_ms=500, heartbeat_ms=100)
    intruder = cluster.start("intruder", secret="wrong")
    await wait_for(lambda: a.cluster.refused_links >= 1, what="the refusal")
    # Health says so: the member the directory lists, that no link reaches, past the
    # member TTL; and engine::health::check is degraded.
    await wait_for(lambda: a.cluster.unlinked_members() == ["intruder"],
                   what="intruder listed as unlinked")
    ready, answer = await a.engine.health.ready()
    assert answer["cluster"] == {"directory": "ok", "members": 1,
                                 "unlinked": ["intruder"]}
    host = await cluster.worker(intruder, "host")
    host.register("svc::evil")
    await task.deferLater(reactor, 0.3, lambda: None)
    assert "svc::evil" not in a.engine.functions
    assert intruder.cluster.engine_id not in a.cluster.peers
    link_port = a.cluster.listener.bound_port()
    url = "http://127.0.0.1:{}/iii/cluster/link".format(link_port)
    upgrade = {"Upgrade": ["websocket"], "Connection": ["Upgrade"],
               "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ=="],
               "Sec-WebSocket-Version": ["13"], "X-III-Engine-Id": ["x"]}
    response = await treq.get(url, headers=upgrade)
    assert response.code == 401
    await response.content()
    response = await treq.get(url, headers=dict(upgrade, Authorization=["Bearer nope"]))
    assert response.code == 401
    await response.content()


@pytest_twisted.ensureDeferred
async def test_bad_frames_from_a_peer_are_dropped_and_the_link_survives(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::x", lambda m: "ok")
    await offered(a, "svc::x")
    link = b.cluster.links[a.cluster.engine_id].protocol
    link.sendMessage(b"not json", False)
    link.sendMessage(b'{"type": "clusterview", "workers": 3}', False)
    link.sendMessage(b'{"type": "registerfunction"}', False)
    # And the other way: what the accepting end sends the dialing one.
    accepted = a.cluster.peers[b.cluster.engine_id]
    accepted.sendMessage(b"[1, 2]", False)
    accepted.sendMessage(b'{"type": "invokefunction", "invocation_id": "x", '
                         b'"function_id": 7}', False)
    caller = await cluster.worker(a, "caller")
    assert await caller.call("svc::x") == "ok"
    assert b.cluster.engine_id in a.cluster.peers
    assert b.cluster.links[a.cluster.engine_id].protocol is link


def self_signed(directory):
    """Write a key and a self-signed certificate for "localhost" into C{directory}."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    roots = directory / "roots"
    roots.mkdir()
    (roots / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / "key.pem", directory / "cert.pem", roots


@pytest_twisted.ensureDeferred
async def test_links_over_tls(cluster, tmp_path):
    """ssl: listeners and tls: addresses (Twisted endpoint strings) carry the links."""
    from cluster_helpers import free_port

    key, cert, roots = self_signed(tmp_path)
    members = []
    for name in ("a", "b"):
        port = free_port()
        members.append(cluster.start(
            name, listen="ssl:{}:interface=127.0.0.1:privateKey={}:certKey={}".format(
                port, key, cert),
            advertise="tls:localhost:{}:trustRoots={}".format(port, roots)))
    a, b = members
    await cluster.linked()
    host = await cluster.worker(b, "host")
    host.register("svc::tls", lambda m: "over tls")
    await offered(a, "svc::tls")
    caller = await cluster.worker(a, "caller")
    assert await caller.call("svc::tls") == "over tls"
    from twisted.internet.interfaces import ISSLTransport
    assert ISSLTransport.providedBy(a.cluster.peers[b.cluster.engine_id].transport)


@pytest_twisted.ensureDeferred
async def test_members_host_one_id_side_by_side_under_auth_and_last_wins(cluster):
    """
    Another member's offer never takes over a local worker's function, nor is it
    refused as another principal's, whatever auth and function_replicas say.
    """
    b_config = {"function_replicas": "last_wins",
                "auth": {"tokens": [{"name": "team", "token": "team-token"}]}}
    a, b = cluster.start("a"), cluster.start("b", top=b_config)
    await cluster.linked()
    on_b = await cluster.worker(b, "on-b", {"Authorization": "Bearer team-token"})
    on_b.register("svc::both", lambda m: "b")
    await wait_for(lambda: "svc::both" in b.engine.functions, what="b's own")
    on_a = await cluster.worker(a, "on-a")
    on_a.register("svc::both", lambda m: "a")
    await wait_for(lambda: b.engine.replicas.host_count("svc::both") == 2,
                   what="two hosts on b")
    assert not [f for f in on_b.frames if f.get("type") == "registrationrejected"]
    caller = await cluster.worker(b, "caller", {"Authorization": "Bearer team-token"})
    assert await caller.call("svc::both") == "b"  # local first
    on_b.close()
    await wait_for(lambda: b.engine.replicas.host_count("svc::both") == 1
                   and "svc::both" in b.engine.functions, what="a's host to remain")
    assert await caller.call("svc::both") == "a"


@pytest_twisted.ensureDeferred
async def test_current_shape_discovery_names_the_member(cluster):
    a, b = cluster.start("a"), cluster.start("b")
    await cluster.linked()
    host = await cluster.worker(b, "host-b")
    host.register("svc::b")
    host.trigger("route", "http", "svc::b", {"api_path": "x"})
    await wait_for(lambda: "route" in a.engine.triggers, what="the route on a")
    await wait_for(lambda: any(p.cluster_peer.worker_of for p in a.cluster.peers.values()),
                   what="b's view")
    [row] = (await a.engine.call("engine::registered-triggers::list", {}))[
        "registered_triggers"]
    assert (row["id"], row["engine_name"], row["worker_name"]) == ("route", "b", "host-b")
    detail = await a.engine.call("engine::functions::info", {"function_id": "svc::b"})
    assert (detail["engine_name"], detail["worker_name"]) == ("b", "host-b")


@pytest_twisted.ensureDeferred
async def test_replicas_of_a_worker_with_the_same_trigger_fire_once_per_change(cluster):
    """Each member's replica registers the same state trigger: one call per change."""
    a, b = cluster.start("a", [state_module()]), cluster.start("b", [state_module()])
    await cluster.linked()
    replicas = [await cluster.worker(a, "rep-a"), await cluster.worker(b, "rep-b")]
    for i, replica in enumerate(replicas):
        replica.register("svc::on-change")
        replica.trigger("watch-{}".format(i), "state", "svc::on-change", {"scope": "s"})
    await wait_for(lambda: all(s.engine.replicas.host_count("svc::on-change") == 2
                               for s in (a, b)), what="two hosts on each member")
    await wait_for(lambda: all(len(s.cluster.shared_triggers.offered) == 1
                               and s.cluster._sync_call is None for s in (a, b)),
                   what="each member to have placed the other's offer")
    for service in (a, b):
        in_force = [t for t in service.engine.triggers.values()
                    if t.trigger_type == "state"]
        assert len(in_force) == 1  # its own worker's; the other member's copy waits

    def calls():
        return sum(len(r.invocations) for r in replicas)
    for n, service in enumerate((a, b, a, b), 1):
        await service.engine.call("state::set", {"scope": "s", "key": "k", "value": n})
        await wait_for(lambda: calls() >= n, what="change {} to fire".format(n))
    await task.deferLater(reactor, 0.2, lambda: None)
    assert calls() == 4


@pytest_twisted.ensureDeferred
async def test_another_members_copy_takes_over_when_the_one_in_force_goes(cluster):
    members = [cluster.start(name, [state_module()]) for name in ("a", "b", "c")]
    a, b, c = members
    await cluster.linked()
    on_a, on_c = await cluster.worker(a, "on-a"), await cluster.worker(c, "on-c")
    for i, worker in enumerate((on_a, on_c)):
        worker.register("svc::f")
        worker.trigger("t-{}".format(i), "state", "svc::f", {"scope": "x"})

    def state_triggers():
        return [t for t in b.engine.triggers.values() if t.trigger_type == "state"]
    await wait_for(lambda: len(state_triggers()) == 1
                   and len(b.cluster.shared_triggers.offered) == 2, what="one in force on b")
    first = state_triggers()[0].owner.connection.cluster_peer.name
    gone, stays = (a, c) if first == "a" else (c, a)
    gone.cluster.links[b.cluster.engine_id].protocol.transport.abortConnection()
    b.cluster.peers[gone.cluster.engine_id].transport.abortConnection()
    await wait_for(lambda: [t.owner.connection.cluster_peer.name
                            for t in state_triggers()] == [stays.cluster.name],
                   what="the other copy in force")
    await b.engine.call("state::set", {"scope": "x", "key": "k", "value": 1})
    host = on_c if stays is c else on_a
    await wait_for(lambda: host.invocations, what="the change to fire on the other")


@pytest_twisted.ensureDeferred
async def test_an_offered_trigger_whose_id_is_taken_here_goes_in_under_another(cluster):
    a, b = cluster.start("a", [state_module()]), cluster.start("b", [state_module()])
    await cluster.linked()
    on_a, on_b = await cluster.worker(a, "on-a"), await cluster.worker(b, "on-b")
    on_a.register("svc::fa")
    on_b.register("svc::fb")
    on_a.trigger("same-id", "state", "svc::fa", {"scope": "one"})
    on_b.trigger("same-id", "state", "svc::fb", {"scope": "two"})
    await wait_for(lambda: "same-id@" + b.cluster.engine_id in a.engine.triggers,
                   what="b's trigger on a")
    assert a.engine.triggers["same-id"].owner.connection is not None
    assert a.engine.triggers["same-id"].function_id == "svc::fa"
    await a.engine.call("state::set", {"scope": "two", "key": "k", "value": 1})
    await wait_for(lambda: on_b.invocations, what="b's trigger to fire from a")
    assert on_a.invocations == []
