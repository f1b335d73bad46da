"""
The worker WebSocket (iii_twisted.worker) over in-memory transports: real Autobahn
server and client protocols joined by twisted.test.iosim, on a MemoryReactorClock.
"""

import pytest

from socket_harness import Harness


@pytest.fixture
def harness():
    return Harness()


def test_worker_gets_its_id_first(harness):
    """The first frame a worker receives is workerregistered with its id."""
    client, server = harness.connect()
    assert client.received[0]["type"] == "workerregistered"
    assert client.received[0]["worker_id"] in harness.engine.workers
    assert harness.engine.workers[client.received[0]["worker_id"]].ip_address == "127.0.0.1"


def test_unknown_path_is_refused(harness):
    """Paths other than /, /otel and channel paths get a 404 before the upgrade."""
    client, server = harness.connect("/nope")
    assert not client.opened
    assert harness.engine.workers == {}


def test_bad_frames_are_dropped_and_connection_stays(harness):
    """Malformed JSON, non-objects, unknown types and bad fields don't close the socket."""
    client, server = harness.connect()
    for payload in [b"{nope", b"[1,2]", b'"s"', b'{"type":"teleport"}', b'{"type":"registerfunction"}',
                    b"\xff\xfe", b"   ", b"[" * 100000 + b"]" * 100000]:
        client.sendMessage(payload)
    client.send({"type": "ping"})
    harness.flush()
    assert client.of_type("pong") == [{"type": "pong"}]
    assert client.closed_with is None
    assert len(harness.engine.workers) == 1


def test_malformed_invoke_with_id_is_answered(harness):
    """A malformed invokefunction that carries an invocation_id gets an error answer."""
    client, server = harness.connect()
    client.send({"type": "invokefunction", "invocation_id": "i-1", "function_id": 42})
    harness.flush()
    [answer] = client.of_type("invocationresult")
    assert answer["invocation_id"] == "i-1"
    assert answer["error"]["code"] == "invalid_message"


def test_oversized_frame_is_dropped_with_an_answer():
    """A frame over max_message_size is dropped; an invoke in it is answered; others carry on."""
    harness = Harness(max_message_size=1000)
    client, server = harness.connect()
    other, _ = harness.connect()
    client.send({"type": "invokefunction", "invocation_id": "big-1", "function_id": "x::y",
                 "data": "z" * 2000})
    harness.flush()
    [answer] = client.of_type("invocationresult")
    assert answer["error"]["code"] == "message_too_large"
    assert answer["function_id"] == "x::y"
    client.send({"type": "ping"})
    other.send({"type": "ping"})
    harness.flush()
    assert client.of_type("pong") and other.of_type("pong")


def test_oversized_invoke_with_ids_after_data_is_answered():
    """py 0.25 writes invocation_id, function_id and type after data: still answered."""
    harness = Harness(max_message_size=10000)
    client, server = harness.connect()
    client.send({"function_id": "x::y", "data": {"blob": "z" * 20000,
                                                  "inner": {"invocation_id": "decoy"}},
                 "invocation_id": "big-2", "type": "invokefunction"})
    harness.flush()
    [answer] = client.of_type("invocationresult")
    assert (answer["invocation_id"], answer["function_id"]) == ("big-2", "x::y")
    assert answer["error"]["code"] == "message_too_large"


def test_frame_past_hard_limit_closes_only_that_connection():
    """Past 4 x max_message_size Autobahn fails the connection (1009); other workers stay."""
    harness = Harness(max_message_size=1000)
    client, server = harness.connect()
    other, _ = harness.connect()
    client.sendMessage(b"x" * 5000)
    harness.flush()
    assert client.closed_with == 1009
    assert len(harness.engine.workers) == 1
    other.send({"type": "ping"})
    harness.flush()
    assert other.of_type("pong")


def test_telemetry_frames_go_to_the_sink(harness):
    """OTLP/LOGS/MTRC binary frames reach the sink; the worker connection carries on."""
    ingested = []

    class Sink:
        def ingest(self, kind, payload, worker_id):
            ingested.append((kind, payload, worker_id))

    client, server = harness.connect()
    worker_id = client.received[0]["worker_id"]
    client.sendMessage(b'OTLP{"resourceSpans":[]}', isBinary=True)
    harness.flush()
    assert ingested == []  # no sink loaded: dropped
    harness.engine.telemetry_sink = Sink()
    client.sendMessage(b'LOGS{"resourceLogs":[]}', isBinary=True)
    client.sendMessage(b'MTRC{}', isBinary=True)
    client.sendMessage(b'{"type":"ping"}', isBinary=True)  # binary JSON is a message too
    harness.flush()
    assert ingested == [("LOGS", b'{"resourceLogs":[]}', worker_id), ("MTRC", b"{}", worker_id)]
    assert client.of_type("pong")


def test_otel_path_takes_telemetry_without_a_worker(harness):
    """/otel (npm iii-sdk 0.11) accepts telemetry and registers no worker."""
    ingested = []

    class Sink:
        def ingest(self, kind, payload, worker_id):
            ingested.append((kind, worker_id))

    harness.engine.telemetry_sink = Sink()
    client, server = harness.connect("/otel")
    assert client.opened and client.received == []
    client.sendMessage(b"OTLP{}", isBinary=True)
    client.send({"type": "ping"})
    harness.flush()
    assert ingested == [("OTLP", None)]
    assert harness.engine.workers == {}
    assert client.received == []


def test_disconnect_runs_cleanup(harness):
    """Closing the socket detaches the worker: its functions go."""
    client, server = harness.connect()
    client.send({"type": "registerfunction", "id": "w::fn"})
    harness.flush()
    assert "w::fn" in harness.engine.functions
    client.sendClose(1000)
    harness.flush()
    assert "w::fn" not in harness.engine.functions
    assert harness.engine.workers == {}


def test_call_between_two_sockets(harness):
    """A call crosses from one socket to another and the answer comes back."""
    host, _ = harness.connect()
    caller, _ = harness.connect()
    host.send({"type": "registerfunction", "id": "w::echo"})
    caller.send({"type": "invokefunction", "invocation_id": "c-1", "function_id": "w::echo",
                 "data": {"v": 1}})
    harness.flush()
    [forwarded] = host.of_type("invokefunction")
    host.send({"type": "invocationresult", "invocation_id": forwarded["invocation_id"],
               "function_id": "w::echo", "result": {"v": 2}})
    harness.flush()
    assert caller.of_type("invocationresult")[0]["result"] == {"v": 2}


def test_dead_peer_is_detected_by_pings():
    """A worker that stops answering WebSocket pings is dropped and cleaned up."""
    harness = Harness(ping_interval=30, ping_timeout=10)
    client, server = harness.connect()
    client.send({"type": "registerfunction", "id": "w::fn"})
    harness.flush()
    harness.reactor.advance(30)  # ping sent ...
    harness.flush()  # ... and answered by a live client
    harness.reactor.advance(10)
    assert "w::fn" in harness.engine.functions
    harness.reactor.advance(20)  # next ping; the peer is now silent (no flushing)
    harness.reactor.advance(10)  # no pong in time: the engine starts closing ...
    harness.reactor.advance(5)  # ... and drops the peer when the close goes unanswered
    harness.flush()
    assert "w::fn" not in harness.engine.functions
    assert harness.engine.workers == {}


def test_random_frames_leave_the_connection_open(harness):
    """Seeded random text and binary frames (telemetry prefixes too) close nothing."""
    import random
    rng = random.Random(7)
    client, server = harness.connect()
    other, _ = harness.connect()
    for _ in range(500):
        prefix = rng.choice([b"", b"", b"OTLP", b"LOGS", b"MTRC", b"{", b'{"type":'])
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
        client.sendMessage(prefix + body, isBinary=rng.random() < 0.5)
    client.send({"type": "ping"})
    other.send({"type": "ping"})
    harness.flush()
    assert client.of_type("pong") == [{"type": "pong"}]
    assert other.of_type("pong") == [{"type": "pong"}]
    assert client.closed_with is None and other.closed_with is None
    assert len(harness.engine.workers) == 2


def test_result_json_cannot_carry_is_answered_with_an_error(harness):
    """On a real socket too: the caller gets invocation_failed, not silence."""
    harness.engine.register_function("app::set", lambda data: {1, 2})
    client, server = harness.connect()
    client.send({"type": "invokefunction", "invocation_id": "i-9", "function_id": "app::set",
                 "data": None})
    harness.flush()
    [answer] = client.of_type("invocationresult")
    assert answer["invocation_id"] == "i-9"
    assert answer["error"]["code"] == "invocation_failed"
    assert client.closed_with is None


def test_nan_from_a_worker_is_not_passed_on(harness):
    """
    Python's json writes NaN (not JSON) and the engine's decoder reads it; passed on,
    a Node caller's JSON.parse would throw. The caller gets invocation_failed instead.
    """
    worker, _ = harness.connect()
    caller, _ = harness.connect()
    worker.send({"type": "registerfunction", "id": "py::nan"})
    harness.flush()
    caller.send({"type": "invokefunction", "invocation_id": "c-1", "function_id": "py::nan",
                 "data": {}})
    harness.flush()
    [call] = worker.of_type("invokefunction")
    worker.sendMessage(b'{"type":"invocationresult","invocation_id":"%s","function_id":'
                       b'"py::nan","result":{"x":NaN}}' % call["invocation_id"].encode())
    harness.flush()
    [answer] = caller.of_type("invocationresult")
    assert answer["invocation_id"] == "c-1" and "result" not in answer
    assert answer["error"]["code"] == "invocation_failed"
    assert worker.closed_with is None and caller.closed_with is None


def test_nan_in_a_registration_is_refused_and_discovery_unharmed(harness):
    """Kept, it would make every engine::functions::list answer unencodable."""
    worker, _ = harness.connect()
    caller, _ = harness.connect()
    worker.sendMessage(b'{"type":"registerfunction","id":"py::f","metadata":{"w":NaN}}')
    worker.sendMessage(b'{"type":"invokefunction","invocation_id":"i-1",'
                       b'"function_id":"engine::functions::list","data":{"x":NaN}}')
    harness.flush()
    [refused] = worker.of_type("invocationresult")
    assert (refused["invocation_id"], refused["error"]["code"]) == ("i-1", "invalid_message")
    caller.send({"type": "invokefunction", "invocation_id": "l",
                 "function_id": "engine::functions::list", "data": {}})
    harness.flush()
    [listed] = caller.of_type("invocationresult")
    assert listed["result"] == {"functions": []}
    assert worker.closed_with is None


@pytest.mark.parametrize("code", [1001, 1008, 1000, 4000])
def test_disconnect_sends_protocol_close_codes(harness, code):
    """
    The engine closes with 1001 (going away) at shutdown: Autobahn's sendClose refuses
    that code (it raised, and shutdown logged an unhandled error); the peer must get it.
    """
    client, server = harness.connect()
    server.disconnect(code, "engine shutting down")
    harness.flush()
    assert client.closed_with == code
    assert harness.engine.workers == {}
