"""
Python iii-sdk 0.10.0 accepts frames up to 1 MiB (its websockets library's default),
while the engine accepts 16 MiB. Reported: a 1 MiB + 100 byte call, HTTP body or
state::set echo killed that worker's connection and every call on it, and the log said
only "disconnected". Now the one call fails with message_too_large and the worker
carries on.
"""

import json
import urllib.error
import urllib.request

import pytest

from engine_process import HEAD, LISTEN, REST_API, STATE_MEMORY, v010_config, wait_until
from test_state_sdk import call

CONFIG = v010_config(STATE_MEMORY, REST_API)

BIG = "x" * (1024 * 1024 + 100)


def _error_of(worker, function_id, payload):
    with pytest.raises(Exception) as e:
        call(worker, function_id, payload)
    return str(e.value)


def test_oversized_echo_call_and_http_body_fail_one_call_only(start_engine, sdk_worker):
    engine = start_engine(CONFIG, http=True)
    worker = sdk_worker(engine.url, "small-frames")
    worker.register_function({"id": "py::echo"}, lambda data: {"len": len(json.dumps(data))})
    worker.register_trigger({"type": "http", "function_id": "py::echo",
                             "config": {"api_path": "echo", "http_method": "POST"}})
    other = sdk_worker(engine.url, "caller")
    wait_until(lambda: "py::echo" in [f.function_id for f in other.list_functions()],
               what="py::echo")

    # The state::set echo (old_value/new_value) is larger than the worker accepts.
    error = _error_of(worker, "state::set", {"scope": "s", "key": "k", "value": BIG})
    assert "message_too_large" in error
    assert "the result of state::set was not delivered (the call itself completed)" in error
    assert call(worker, "state::get", {"scope": "s", "key": "small"}) is None  # alive

    # A call carrying more than the worker accepts.
    error = _error_of(other, "py::echo", {"blob": BIG})
    assert "message_too_large" in error and "call of py::echo not forwarded" in error
    assert "len" in call(other, "py::echo", {"blob": "ok"})  # the same worker, still there

    # An HTTP body the function's worker could not receive: 413, worker still fine.
    request = urllib.request.Request(
        "http://127.0.0.1:{}/echo".format(engine.ports["http"]),
        data=json.dumps({"blob": BIG}).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=20)
    assert e.value.code == 413
    assert "accepts WebSocket frames up to 1048576 bytes" in json.loads(e.value.read())["error"]
    assert "len" in call(other, "py::echo", {"blob": "still here"})

    log = engine.log()
    assert 'worker "small-frames" (python 0.10.0' in log
    assert "over the 1048576 bytes it accepts" in log
    assert "disconnected" not in log  # nobody was killed


SMALL_LIMIT_CONFIG = HEAD + "max_message_size: 200000\n"


def test_oversized_call_from_a_0_10_worker_is_answered(start_engine, sdk_worker):
    """
    Python iii-sdk 0.10.0 writes invocation_id after data: a call over the engine's
    max_message_size is still answered (message_too_large), not left to time out.
    """
    import time

    engine = start_engine(SMALL_LIMIT_CONFIG)
    worker = sdk_worker(engine.url, "big-sender")
    worker.register_function({"id": "py::sink"}, lambda data: {"ok": True})
    wait_until(lambda: "py::sink" in [f.function_id for f in worker.list_functions()],
               what="py::sink")
    started = time.monotonic()
    error = _error_of(worker, "py::sink", {"blob": "y" * 300000})
    assert "message_too_large" in error
    assert time.monotonic() - started < 10  # answered, not the 20 s timeout
    assert call(worker, "py::sink", {"blob": "small"}) == {"ok": True}


def test_large_binary_frame_reaches_a_python_channel_reader(start_engine, sdk_worker):
    """
    A writer (here a plain WebSocket client, as a Node or custom writer may be) sends
    one 3 MiB binary frame; the Python SDK's ChannelReader (1 MiB frames) reads all of
    it, because the engine splits it into frames the reader accepts.
    """
    import asyncio

    from iii.channels import ChannelReader
    from websockets.sync.client import connect

    engine = start_engine(LISTEN)
    worker = sdk_worker(engine.url, "channel-reader")
    refs = call(worker, "engine::channels::create", {})
    blob = bytes(range(256)) * (3 * 1024 * 1024 // 256)
    writer_url = "{}/ws/channels/{}?key={}&dir=write".format(
        engine.url, refs["writer"]["channel_id"], refs["writer"]["access_key"])
    with connect(writer_url, max_size=None) as ws:
        ws.send(blob)

    class Ref:
        channel_id = refs["reader"]["channel_id"]
        access_key = refs["reader"]["access_key"]

    reader = ChannelReader(engine.url, Ref)
    data = asyncio.run(asyncio.wait_for(reader.read_all(), 20))
    assert data == blob
