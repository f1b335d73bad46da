"""
Backpressure and the frame budget on the worker socket (issue 14), over in-memory
transports: real Autobahn server and client protocols joined by twisted.test.iosim on a
MemoryReactorClock.

iosim's transport never fills, so a test says when the server's transport would have
called the L{SendGate}'s C{pauseProducing} (its write buffer over 64 KiB) and
C{resumeProducing} (drained), as a real TCP transport does; the loopback tests in
tests/interop/test_limits_loopback.py show the same with real sockets.
"""

import json

from iii_twisted.limits import Limits

from socket_harness import Harness


def invoke(client, invocation_id, function_id, data=None):
    client.send({"type": "invokefunction", "invocation_id": invocation_id,
                 "function_id": function_id, "data": data})


def test_a_peer_that_does_not_read_is_not_read_and_gets_no_calls_until_it_drains():
    """The issue's slow consumer: many calls with large answers, never read. The
    engine stops reading it once the unread answers pass send_buffer_soft; nothing it
    sent is lost: every call is answered once it drains."""
    h = Harness(Limits(send_buffer_soft=20000, send_buffer_hard=1000000),
                max_message_size=1024 * 1024)
    h.engine.register_function("app::big", lambda data: "x" * 5000)
    slow, server = h.connect()
    other, _ = h.connect()
    other.send({"type": "registerfunction", "id": "other::f"})
    slow.send({"type": "registerfunction", "id": "slow::f"})
    h.flush()
    server._gate.pauseProducing()  # the kernel and transport buffers are full
    for i in range(200):
        invoke(slow, "c{}".format(i), "app::big")
    h.flush()
    answered = len(slow.of_type("invocationresult"))
    # Reading stopped right after the answers passed the soft bound.
    assert answered <= 20000 // 5000 + 1
    assert server.congested and h.engine.limits.counters["peers_paused"] == 1
    assert server._gate.pending <= 20000 + 5100
    # Calls to it are not forwarded while it does not read; other workers carry on.
    invoke(other, "to-slow", "slow::f")
    invoke(other, "to-big", "app::big")
    h.flush()
    answers = {m["invocation_id"]: m for m in other.of_type("invocationresult")}
    assert answers["to-slow"]["error"]["code"] == "limit_exceeded"
    assert "does not read" in answers["to-slow"]["error"]["message"]
    assert answers["to-big"]["result"] == "x" * 5000
    # It drains: the transport tells the gate, and every call is answered.
    server._gate.resumeProducing()
    h.flush()
    assert not server.congested
    assert sorted(m["invocation_id"] for m in slow.of_type("invocationresult")) == \
        sorted("c{}".format(i) for i in range(200))
    assert h.engine.limits.counters["peers_dropped_slow"] == 0


def test_a_peer_over_the_hard_bound_is_dropped_and_others_carry_on():
    h = Harness(Limits(send_buffer_soft=10000, send_buffer_hard=30000),
                max_message_size=1024 * 1024)
    h.engine.register_function("app::big", lambda data: "x" * 5000)
    slow, server = h.connect()
    other, _ = h.connect()
    slow.send({"type": "registerfunction", "id": "slow::f"})
    h.flush()
    server._gate.pauseProducing()
    # Calls already read still answer (they are counted); answers of in-flight calls
    # past the hard bound drop the peer.
    for i in range(3):
        invoke(slow, "c{}".format(i), "app::big")
    h.flush()
    assert server.congested and slow.closed_with is None
    for i in range(10):
        h.engine.call("app::big").addCallback(
            lambda result: server.send({"type": "invocationresult",
                                        "invocation_id": "x", "result": result}))
    h.flush()
    assert h.engine.limits.counters["peers_dropped_slow"] == 1
    assert server.state == server.STATE_CLOSED
    assert len(h.engine.workers) == 1 and "slow::f" not in h.engine.functions
    invoke(other, "o", "app::big")
    h.flush()
    assert other.of_type("invocationresult")[0]["result"] == "x" * 5000


def test_a_peer_congested_past_the_stall_timeout_is_dropped():
    h = Harness(Limits(send_buffer_soft=1000, send_stall_timeout_ms=5000),
                max_message_size=1024 * 1024)
    h.engine.register_function("app::big", lambda data: "x" * 5000)
    slow, server = h.connect()
    server._gate.pauseProducing()
    invoke(slow, "c", "app::big")
    h.flush()
    assert server.congested
    h.reactor.advance(4.9)
    assert server.state == server.STATE_OPEN
    h.reactor.advance(0.2)
    h.flush()
    assert server.state == server.STATE_CLOSED
    assert h.engine.limits.counters["peers_dropped_slow"] == 1


def ping_of(size):
    head = json.dumps({"type": "ping", "pad": ""}).encode("utf-8")
    return head[:-2] + b"p" * (size - len(head)) + b'"}'


def begin(client, size):
    payload = ping_of(size)
    client.beginMessage()
    client.beginMessageFrame(size)
    client.sendMessageFrameData(payload[:100])
    return payload[100:]


def test_large_frames_in_flight_wait_for_the_budget_and_all_arrive():
    """The issue's 40 connections each sending a large frame at once: past the budget
    the next frames wait (their connections are not read), none is lost."""
    h = Harness(Limits(large_frame_size=1000, frames_in_flight_budget=10000),
                max_message_size=1024 * 1024)
    budget = h.factory.frame_budget
    clients = [h.connect() for _ in range(5)]
    rests = [begin(client, 4000) for client, _ in clients]
    h.flush()
    assert budget.used == 8000  # two fit; three wait
    assert h.engine.limits.counters["frames_waited"] == 3
    assert [server._read_holds for _, server in clients] == [0, 0, 1, 1, 1]
    for (client, _), rest in zip(clients, rests):
        client.sendMessageFrameData(rest)
        client.endMessage()
    for _ in range(5):
        h.flush()
    assert budget.used == 0
    assert [len(client.of_type("pong")) for client, _ in clients] == [1] * 5


def test_a_frame_larger_than_the_whole_budget_is_refused():
    h = Harness(Limits(large_frame_size=1000, frames_in_flight_budget=5000),
                max_message_size=1024 * 1024)
    big, _ = h.connect()
    other, _ = h.connect()
    big.sendMessage(ping_of(6000))
    h.flush()
    assert big.closed_with == 1009
    assert h.engine.limits.counters["frames_refused_budget"] == 1
    other.sendMessage(ping_of(3000))
    h.flush()
    assert other.of_type("pong")


def test_a_partly_received_frame_is_freed_when_its_connection_closes():
    """Before: 1.3 GB of 2.4 GB of partly received frames stayed after the close."""
    h = Harness(Limits(large_frame_size=1000, frames_in_flight_budget=100000),
                max_message_size=1024 * 1024)
    client, server = h.connect()
    begin(client, 60000)
    client.sendMessageFrameData(b"p" * 30000)
    h.flush()
    assert h.factory.frame_budget.used == 60000
    held = sum(len(chunk) for chunk in server.frame_data or ())
    assert held >= 30000
    client.transport.loseConnection()
    h.flush()
    assert server.state == server.STATE_CLOSED
    assert not server.frame_data and not server.message_data and server.data == b""
    assert h.factory.frame_budget.used == 0
