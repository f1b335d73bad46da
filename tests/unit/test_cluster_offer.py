"""
What a member offers over its links and how a peer's call runs (cluster/links.py),
on task.Clock engines joined by an in-memory link; the redial backoff.
"""

from types import SimpleNamespace

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from iii_twisted.cluster.directory import Member
from iii_twisted.cluster.links import (
    CLUSTER_VIEW, REDIAL_MAX, REDIAL_MIN, Offer, PeerLink, PeerView,
)
from iii_twisted.cluster.settings import DEFAULT_TRIGGER_TYPES
from iii_twisted.testing import FakeWorkerConnection, make_engine


class PeerConnection(FakeWorkerConnection):
    """The accepting member's end of a link, in memory."""

    def __init__(self, engine, peer_address="127.0.0.1"):
        FakeWorkerConnection.__init__(self, engine, peer_address)
        self.cluster_peer = PeerView("engine-a", "a")


class MemoryLink:
    """The dialing member's end: what it sends goes into the other engine."""

    def __init__(self, far_end):
        self.far_end = far_end
        self.frames = []

    def send(self, message):
        self.frames.append(message)
        if message["type"] == CLUSTER_VIEW:
            self.far_end.cluster_peer.update(message)
        else:
            self.far_end.receive(message)
        return True


def linked():
    """@return: (a, b, link): engines a and b, and a's link to b, opened."""
    a, _ = make_engine()
    b, _ = make_engine()
    offer = Offer(a, frozenset(DEFAULT_TRIGGER_TYPES))
    a.registry_watchers.append(offer.changed)  # as the ClusterService does
    far_end = PeerConnection.connect(b)
    link = PeerLink(SimpleNamespace(offer=offer, name="a"),
                    Member("engine-b", "tcp:127.0.0.1:1", "b"), MemoryReactorClock())
    link.far_end = far_end
    link.opened(MemoryLink(far_end))
    return a, b, link


def resync(a, link):
    link.sync()  # the ClusterService does it once per burst of registry changes


def test_only_the_functions_of_local_workers_are_offered():
    a, b, link = linked()
    a.register_function("app::in-process", lambda data: data)
    worker = FakeWorkerConnection.connect(a)
    worker.receive({"type": "registerfunction", "id": "svc::w", "description": "d"})
    other_member = PeerConnection.connect(a)  # what a third member offers a
    other_member.receive({"type": "registerfunction", "id": "svc::c"})
    functions, _, _ = link.cluster.offer.current()
    assert set(functions) == {"svc::w"}
    assert functions["svc::w"] == {"type": "registerfunction", "id": "svc::w",
                                   "description": "d"}


def test_changes_are_sent_as_differences():
    a, b, link = linked()
    worker = FakeWorkerConnection.connect(a)
    worker.receive({"type": "registerfunction", "id": "svc::w"})
    resync(a, link)
    assert b.functions["svc::w"].owner is link.far_end.worker
    sent = len(link.protocol.frames)
    resync(a, link)
    assert len(link.protocol.frames) == sent  # nothing changed, nothing sent
    worker.receive({"type": "unregisterfunction", "id": "svc::w"})
    resync(a, link)
    assert "svc::w" not in b.functions
    assert link.protocol.frames[-2:][0] == {"type": "unregisterfunction", "id": "svc::w"}


def test_triggers_of_the_shared_types_only_and_the_view_lists_all():
    a, b, link = linked()
    worker = FakeWorkerConnection.connect(a)
    worker.receive({"type": "registerfunction", "id": "svc::w"})
    worker.receive({"type": "registertrigger", "id": "route", "trigger_type": "http",
                    "function_id": "svc::w", "config": {"api_path": "x"}})
    worker.receive({"type": "registertrigger", "id": "tick", "trigger_type": "cron",
                    "function_id": "svc::w", "config": {"expression": "* * * * * *"}})
    resync(a, link)
    assert set(b.triggers) == {"route"}
    assert b.triggers["route"].owner is link.far_end.worker
    view = link.far_end.cluster_peer
    assert {t["id"] for t in view.triggers} == {"route", "tick"}
    assert view.worker_of["svc::w"] == (worker.worker.id, worker.worker.id)  # unnamed


def test_a_peer_call_runs_on_a_local_host_and_answers_unchanged():
    a, b, link = linked()
    worker = FakeWorkerConnection.connect(a)
    worker.receive({"type": "registerfunction", "id": "svc::w"})
    resync(a, link)
    d = b.call("svc::w", {"x": 1}, traceparent="tp", baggage="bg", metadata={"m": 1})
    [invoke] = link.far_end.sent_of_type("invokefunction")
    answered = link.cluster.offer.run_local(invoke, "a")
    [forwarded] = worker.sent_of_type("invokefunction")
    assert (forwarded["data"], forwarded["traceparent"], forwarded["baggage"],
            forwarded["metadata"]) == ({"x": 1}, "tp", "bg", {"m": 1})
    worker.receive({"type": "invocationresult", "invocation_id": forwarded["invocation_id"],
                    "function_id": "svc::w", "error": {"code": "E", "message": "m",
                                                        "stacktrace": "s"}})
    failure = []
    answered.addErrback(failure.append)
    assert failure[0].value.to_body() == {"code": "E", "message": "m", "stacktrace": "s"}
    link.far_end.receive({"type": "invocationresult",
                          "invocation_id": invoke["invocation_id"],
                          "error": failure[0].value.to_body()})
    errors = []
    d.addErrback(errors.append)
    assert errors[0].value.code == "E"


def test_a_call_never_crosses_a_second_link():
    """A function only another member offers here is not found for a peer's call."""
    a, b, link = linked()
    other_member = PeerConnection.connect(a)
    other_member.receive({"type": "registerfunction", "id": "svc::c"})
    errors = []
    link.cluster.offer.run_local({"function_id": "svc::c", "data": None,
                                  "traceparent": None, "baggage": None,
                                  "metadata": None}, "a").addErrback(errors.append)
    assert errors[0].value.code == "function_not_found"
    assert "not found on engine a" in errors[0].value.message


def test_the_local_replica_takes_a_peer_call_when_a_peer_also_hosts_it():
    a, b, link = linked()
    other_member = PeerConnection.connect(a)
    other_member.receive({"type": "registerfunction", "id": "svc::r"})
    worker = FakeWorkerConnection.connect(a)
    worker.receive({"type": "registerfunction", "id": "svc::r"})
    assert a.replicas.host_count("svc::r") == 2
    for _ in range(3):
        link.cluster.offer.run_local({"function_id": "svc::r", "data": None,
                                      "traceparent": None, "baggage": None,
                                      "metadata": None}, "a")
    assert len(worker.sent_of_type("invokefunction")) == 3
    assert other_member.sent_of_type("invokefunction") == []


def test_redial_backs_off_and_stops_when_the_member_leaves():
    reactor = MemoryReactorClock()
    cluster = SimpleNamespace(offer=None, name="a", secret="s", engine_id="engine-a",
                              max_message_size=1024, heartbeat=1.0, member_ttl=3.0)
    link = PeerLink(cluster, Member("engine-b", "tcp:127.0.0.1:1", "b"), reactor)
    link.start()
    assert len(reactor.tcpClients) == 1
    delays = []
    for _ in range(7):
        link._not_connected(Failure(ConnectionRefusedError()))
        [call] = reactor.getDelayedCalls()
        delays.append(round(call.getTime() - reactor.seconds(), 3))
        reactor.advance(delays[-1])
    assert delays == [REDIAL_MIN, 0.2, 0.4, 0.8, 1.6, REDIAL_MAX, REDIAL_MAX]
    assert len(reactor.tcpClients) == 8
    link._not_connected(Failure(ConnectionRefusedError()))
    link.stop()
    assert reactor.getDelayedCalls() == []
    link._again()
    assert reactor.getDelayedCalls() == []


def test_a_peer_link_is_a_worker_client_handler():
    from zope.interface.verify import verifyObject

    from iii_twisted.interfaces import IWorkerClientHandler

    _, _, link = linked()
    assert verifyObject(IWorkerClientHandler, link)
