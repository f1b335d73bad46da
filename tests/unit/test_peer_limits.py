"""
The engine never sends a peer a frame it knows the peer will refuse (iii_twisted.
peer_limits): a Python iii-sdk (websockets, 1 MiB) worker was killed by a 1 MiB + 100
byte call or state::set echo, with every call in flight on it; the log said only
"disconnected". Real Autobahn server and client protocols over iosim.
"""

import json

import pytest
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet.address import IPv4Address
from twisted.test import iosim

from iii_twisted.config import ConfigError, from_dict
from iii_twisted.peer_limits import MIB, PeerFrameLimits
from iii_twisted.testing import FakeWorkerConnection, log_lines, make_engine

from socket_harness import Client, Harness

PYTHON_UA = "Python/3.11 websockets/13.1"
BIG = "x" * (MIB + 100)


def connect(harness, useragent=None, max_payload=None):
    server = harness.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
    client_factory = WebSocketClientFactory("ws://127.0.0.1:49134/", reactor=harness.reactor,
                                            useragent=useragent)
    if max_payload is not None:
        # As Python websockets does: a close frame with 1009, not a dropped socket.
        client_factory.setProtocolOptions(maxMessagePayloadSize=max_payload,
                                          maxFramePayloadSize=max_payload, failByDrop=False)
    client_factory.protocol = Client
    client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
    pump = iosim.connect(
        server, iosim.FakeTransport(server, isServer=True,
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 49134),
                                    peerAddress=IPv4Address("TCP", "10.1.2.3", 40000)),
        client, iosim.FakeTransport(client, isServer=False), greet=False)
    harness.pumps.append(pump)
    harness.flush()
    return client, server


def register(client, runtime, name="w", version="1.0"):
    client.send({"type": "invokefunction", "function_id": "engine::workers::register",
                 "data": {"runtime": runtime, "version": version, "name": name, "pid": 7},
                 "action": {"type": "void"}})


def test_limit_from_user_agent_then_from_the_declared_runtime():
    harness = Harness()
    python, python_server = connect(harness, useragent=PYTHON_UA)
    other, other_server = connect(harness)
    assert python_server.max_frame_size == MIB
    assert other_server.max_frame_size == MIB  # the configurable default for strangers
    register(other, "node")
    register(python, "python")
    harness.flush()
    assert other_server.max_frame_size == 100 * MIB
    assert python_server.max_frame_size == MIB


def test_oversized_call_to_a_python_worker_fails_that_call_only():
    """Reported: a 1 MiB + 100 byte call killed the worker and every call on it."""
    harness = Harness()
    host, host_server = connect(harness, useragent=PYTHON_UA)
    caller, _ = connect(harness)
    register(caller, "node")
    register(host, "python", name="math")
    host.send({"type": "registerfunction", "id": "math::echo"})
    harness.flush()
    caller.send({"type": "invokefunction", "invocation_id": "small-1",
                 "function_id": "math::echo", "data": {"v": 1}})
    caller.send({"type": "invokefunction", "invocation_id": "big-1",
                 "function_id": "math::echo", "data": {"v": BIG}})
    harness.flush()
    [answer] = caller.of_type("invocationresult")
    assert answer["invocation_id"] == "big-1"
    assert answer["error"]["code"] == "message_too_large"
    assert "accepts WebSocket frames up to 1048576 bytes" in answer["error"]["message"]
    assert 'worker "math" (python 1.0' in answer["error"]["message"]
    # The host was sent only the small call, is still connected, and can answer it.
    [forwarded] = host.of_type("invokefunction")
    assert forwarded["data"]["v"] == 1
    host.send({"type": "invocationresult", "invocation_id": forwarded["invocation_id"],
               "function_id": "math::echo", "result": {"v": 2}})
    harness.flush()
    assert host.closed_with is None
    assert caller.of_type("invocationresult")[1]["result"] == {"v": 2}


def test_oversized_result_to_a_python_caller_is_an_error_not_a_dead_socket():
    """Reported: the echo of a 1 MiB + 100 byte state::set killed the caller."""
    harness = Harness()
    store = {}
    harness.engine.register_function("kv::set", lambda data: store.update(data) or
                                     {"old_value": None, "new_value": data["value"]})
    caller, caller_server = connect(harness, useragent=PYTHON_UA)
    caller.send({"type": "invokefunction", "invocation_id": "set-1",
                 "function_id": "kv::set", "data": {"value": BIG}})
    harness.flush()
    [answer] = caller.of_type("invocationresult")
    assert answer["error"]["code"] == "message_too_large"
    assert "the result of kv::set was not delivered (the call itself completed)" in \
        answer["error"]["message"]
    assert store["value"] == BIG
    assert caller.closed_with is None
    caller.send({"type": "ping"})
    harness.flush()
    assert caller.of_type("pong")


def test_every_disconnect_is_logged_with_close_code_reason_and_name():
    harness = Harness(frame_limits=PeerFrameLimits(default=64 * MIB))
    with log_lines() as lines:
        # A peer whose real limit is below what the engine assumed: it refuses the
        # frame (1009), and the log says so.
        client, server = connect(harness, max_payload=1000)
        register(client, "go", name="billing", version="2.1")
        client.send({"type": "registerfunction", "id": "billing::f"})
        harness.flush()
        harness.engine.call("billing::f", {"x": "y" * 5000}).addErrback(lambda f: None)
        harness.flush()
        # A peer that says goodbye.
        polite, _ = connect(harness)
        register(polite, "node", name="web")
        harness.flush()
        polite.sendClose(1000, "bye")
        harness.flush()
    text = "\n".join(lines)
    assert "worker " in text and "connected from 10.1.2.3" in text
    assert 'worker "billing" (go 2.1, pid 7, 10.1.2.3, id ' in text
    assert "disconnected: code 1009 (message too big)" in text
    assert "1 calls in flight failed" in text
    assert 'worker "web" (node 1.0, pid 7, 10.1.2.3, id ' in text
    assert "disconnected: code 1000 (normal closure): bye" in text


def test_a_dropped_connection_is_logged_as_1006_with_the_reason():
    harness = Harness()
    with log_lines() as lines:
        client, server = connect(harness)
        harness.flush()
        client.transport.loseConnection()
        harness.flush()
    assert any("disconnected: code 1006 (connection lost without a close frame): "
               "connection was closed uncleanly" in line for line in lines), lines


def test_discovery_answer_too_big_for_the_caller_is_refused_clearly():
    """14.5: engine::functions::list larger than the caller accepts is a clear error."""
    engine, clock = make_engine()
    for i in range(200):
        engine.register_function("big::f{}".format(i), lambda data: None,
                                 description="d" * 2000)
    caller = FakeWorkerConnection.connect(engine)
    caller.max_frame_size = 100000
    caller.receive({"type": "invokefunction", "invocation_id": "list-1",
                    "function_id": "engine::functions::list", "data": {}})
    [answer] = caller.sent_of_type("invocationresult")
    assert answer["error"]["code"] == "message_too_large"
    assert "the result of engine::functions::list was not delivered" in \
        answer["error"]["message"]
    assert "up to 100000 bytes" in answer["error"]["message"]


@pytest.mark.parametrize("config, key", [
    ({"worker_max_frame_size": 0}, "worker_max_frame_size"),
    ({"worker_max_frame_size": "1MB"}, "worker_max_frame_size"),
    ({"worker_max_frame_sizes": [1]}, "worker_max_frame_sizes"),
    ({"worker_max_frame_sizes": {"python": True}}, "worker_max_frame_sizes.python"),
])
def test_config_errors_name_the_key(config, key):
    with pytest.raises(ConfigError) as e:
        from_dict(config)
    assert key in str(e.value)


def test_config_sets_the_table():
    limits = from_dict({"worker_max_frame_size": 5000,
                        "worker_max_frame_sizes": {"python": 2 * MIB}}).frame_limits
    assert limits.for_runtime("python") == 2 * MIB
    assert limits.for_runtime("node") == 100 * MIB
    assert limits.for_runtime("elixir") == 5000
    assert limits.for_runtime(None) == 5000
    assert limits.for_user_agent(PYTHON_UA) == 2 * MIB


def test_large_messages_capability_raises_the_limit_to_64_mib():
    """py 0.25 declares large-messages.v1: it reads 64 MiB, so the engine may send it that."""
    harness = Harness()
    client, server = connect(harness, useragent=PYTHON_UA)
    client.send({"type": "invokefunction", "function_id": "engine::workers::register",
                 "data": {"runtime": "python", "version": "0.25.0", "name": "w",
                          "features": ["observe.v1", "large-messages.v1"]},
                 "action": {"type": "void"}})
    harness.flush()
    assert server.max_frame_size == 64 * MIB


def _channel_end(harness, ref, useragent):
    from test_channels import Client as ChannelClient

    server = harness.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
    client_factory = WebSocketClientFactory(
        "ws://127.0.0.1:49134/ws/channels/{}?key={}&dir={}".format(
            ref["channel_id"], ref["access_key"], ref["direction"]),
        reactor=harness.reactor, useragent=useragent)
    client_factory.protocol = ChannelClient
    client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
    harness.pumps.append(iosim.connect(
        server, iosim.FakeTransport(server, isServer=True), client,
        iosim.FakeTransport(client, isServer=False), greet=False))
    harness.flush()
    return client, server


def test_channel_frames_fit_a_python_reader():
    """Binary frames over a Python reader's 1 MiB are split; a text one ends the channel."""
    from test_channels import Harness as ChannelHarness, _result

    harness = ChannelHarness()
    refs = _result(harness.engine.call("engine::channels::create", {}))
    writer, _ = _channel_end(harness, refs["writer"], "node")
    reader, reader_server = _channel_end(harness, refs["reader"], PYTHON_UA)
    assert reader_server.max_frame_size == MIB
    blob = bytes(range(256)) * (MIB // 256 * 2 + 3)  # 2 MiB + 768 bytes
    writer.sendMessage(blob, isBinary=True)
    writer.sendMessage(b'{"small": true}', isBinary=False)
    harness.flush()
    sizes = [len(p) for p, binary in reader.frames if binary]
    assert sizes == [MIB, MIB, 768]
    assert b"".join(p for p, binary in reader.frames if binary) == blob
    assert (b'{"small": true}', False) in reader.frames
    with log_lines() as lines:
        writer.sendMessage(b'"' + b"t" * MIB + b'"', isBinary=False)
        harness.flush()
    assert reader.closed_with == (True, 4005)
    assert any("over the 1048576 bytes its reader accepts" in line for line in lines)


def test_channel_end_of_unknown_library_is_not_limited():
    from test_channels import Harness as ChannelHarness, _result

    harness = ChannelHarness()
    refs = _result(harness.engine.call("engine::channels::create", {}))
    _, reader_server = _channel_end(harness, refs["reader"], "node")
    assert reader_server.max_frame_size is None
