"""
Issue 14 on loopback, against a real engine process: a client that never reads its
answers, many large frames at once, 1,000 slow connections with the engine started
at a soft limit of 1,024 descriptors. Each test asserts the bound (the engine's memory
read from /proc, its peak included) and that a well-behaved official SDK worker is
still served meanwhile. Loops are bounded; the whole file runs in well under a minute.
"""

import resource
import socket
import threading
import time
import urllib.request

import pytest

from engine_process import HEAD, LISTEN, STATE_MEMORY, rest_api, v010_config, wait_until
from rawws import RawClient, frame, handshake_bytes, rss_bytes

MiB = 1024 * 1024

STATE_CONFIG = v010_config(STATE_MEMORY, head=HEAD + """\
# The raw clients here receive any frame size (the default for an unknown peer is 1 MiB).
worker_max_frame_size: 16777216
limits:
  send_buffer_soft: 4194304
  send_buffer_hard: 33554432
  send_stall_timeout_ms: 3000
""")


@pytest.fixture
def engines(start_engine):
    """C{start_engine}, with the engine's memory measurable on PyPy too."""
    def start(config_text, preexec_fn=None, **ports):
        # On PyPy (III_ENGINE_PYTHON), RSS also holds garbage until the next major
        # collection, which by default waits for the heap to grow by up to 82%: tens
        # of MiB that say nothing about what the engine keeps. PYPY_GC_MAX_DELTA makes
        # it collect after 8 MB of growth; CPython ignores it.
        return start_engine(config_text, env={"PYPY_GC_MAX_DELTA": "8MB"},
                            preexec_fn=preexec_fn, **ports)

    return start


def invoke(invocation_id, function_id, data):
    return {"type": "invokefunction", "invocation_id": invocation_id,
            "function_id": function_id, "data": data}


def test_a_client_that_never_reads_cannot_grow_the_engine(engines, sdk_worker):
    """Before: 3,000 state::get of a 1 MiB value, never read, took the engine from
    63 MB to 3 GB. Now it stops reading that client past send_buffer_soft and drops it
    after send_stall_timeout_ms; another worker's calls are answered meanwhile."""
    engine = engines(STATE_CONFIG)
    writer = RawClient(engine.port)
    assert writer.read_message()["type"] == "workerregistered"
    writer.send(invoke("set", "state::set", {"scope": "s", "key": "big", "value": "v" * MiB}))
    assert writer.read_message()["invocation_id"] == "set"
    other = sdk_worker(engine.url, "well-behaved")
    assert other.trigger({"function_id": "state::set", "payload": {
        "scope": "s", "key": "small", "value": 1}})["new_value"] == 1
    baseline = rss_bytes(engine.process.pid, "VmHWM")

    slow = RawClient(engine.port, rcvbuf=64 * 1024)
    flood = b"".join(frame(
        b'{"type":"invokefunction","invocation_id":"g%d","function_id":"state::get",'
        b'"data":{"scope":"s","key":"big"}}' % i) for i in range(3000))
    sent = threading.Thread(target=_send_until_refused, args=(slow.sock, flood), daemon=True)
    sent.start()
    # While it is held, other workers are served.
    for i in range(20):
        assert other.trigger({"function_id": "state::get", "payload": {
            "scope": "s", "key": "small"}}) == 1
    wait_until(lambda: "it does not read" in engine.log(), 30, "the slow client dropped")
    sent.join(10)
    growth = rss_bytes(engine.process.pid, "VmHWM") - baseline
    assert growth < 64 * MiB, "peak memory grew by {} MiB".format(growth // MiB)
    # What was accepted before is intact. (Read by the raw client: a 0.10.0 Python
    # worker cannot receive a frame over 1 MiB.)
    writer.send(invoke("get", "state::get", {"scope": "s", "key": "big"}))
    assert writer.read_message()["result"] == "v" * MiB
    slow.close()
    writer.close()


def test_calls_to_a_worker_that_stopped_reading_are_refused_not_piled_up(engines):
    """Before: a worker stopped with SIGSTOP while others kept calling it grew the
    engine by about 140 MB. A worker that does not read (stopped, or just never
    reading) gets no more calls past send_buffer_soft: they fail at once with
    limit_exceeded, and the engine's memory stays flat."""
    engine = engines(STATE_CONFIG)
    stopped = RawClient(engine.port, rcvbuf=64 * 1024)
    assert stopped.read_message()["type"] == "workerregistered"
    stopped.send({"type": "registerfunction", "id": "stopped::f"})
    caller = RawClient(engine.port)
    assert caller.read_message()["type"] == "workerregistered"
    caller.send(invoke("list", "engine::functions::list", {}))
    wait_until(lambda: any(f["function_id"] == "stopped::f"
                           for f in caller.read_message()["result"]["functions"]), 10,
               "stopped::f registered")
    baseline = rss_bytes(engine.process.pid, "VmHWM")
    data = {"blob": "b" * 100000}
    calls = 1000  # 100 MB of calls if all were kept
    threading.Thread(target=lambda: [caller.send(invoke("c{}".format(i), "stopped::f", data))
                                     for i in range(calls)], daemon=True).start()
    codes = {}
    for i in range(calls):  # every call is answered
        code = caller.read_message().get("error", {}).get("code")
        codes[code] = codes.get(code, 0) + 1
    # The first calls filled the kernel's buffers and send_buffer_soft; the rest were
    # refused, not kept (limit_exceeded), until the worker was dropped after
    # send_stall_timeout_ms: the calls it held then failed (invocation_stopped) and
    # later ones found no function.
    assert set(codes) <= {"limit_exceeded", "invocation_stopped", "function_not_found"}
    assert codes.get("limit_exceeded", 0) > 0
    assert codes.get("invocation_stopped", 0) < 200, codes
    assert "it does not read" in engine.log()
    growth = rss_bytes(engine.process.pid, "VmHWM") - baseline
    # Half of what keeping them would take (the margin is for PyPy's collector).
    assert growth < 50 * MiB, "peak memory grew by {} MiB".format(growth // MiB)
    caller.send(invoke("after", "state::set", {"scope": "s", "key": "k", "value": 1}))
    assert caller.read_message()["result"]["new_value"] == 1
    stopped.close()
    caller.close()


def _send_until_refused(sock, data):
    try:
        sock.settimeout(30)
        sock.sendall(data)
    except OSError:
        pass  # the engine stopped reading, then dropped the connection


HTTP_CONFIG = v010_config(rest_api(), head=LISTEN)


def test_an_http_client_that_never_reads_cannot_grow_the_engine(engines, sdk_worker):
    """HTTP has backpressure too: 400 pipelined requests for a 500 kB answer on one
    connection that is never read. The engine answers one request at a time and stops
    reading the connection while an answer waits for the client."""
    engine = engines(HTTP_CONFIG, http=True)
    worker = sdk_worker(engine.url, "big-answers")
    worker.register_function({"id": "app::big"}, lambda data: {"body": "x" * 500000})
    worker.register_trigger({"type": "http", "function_id": "app::big",
                             "config": {"api_path": "big", "http_method": "GET"}})
    url = "http://127.0.0.1:{}/big".format(engine.ports["http"])
    wait_until(lambda: _get(url), 30, "the route to answer")
    baseline = rss_bytes(engine.process.pid, "VmHWM")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    slow.connect(("127.0.0.1", engine.ports["http"]))
    request = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
    threading.Thread(target=_send_until_refused, args=(slow, request * 400),
                     daemon=True).start()
    for _ in range(10):  # others are served meanwhile
        assert len(_get(url)) > 500000
    growth = rss_bytes(engine.process.pid, "VmHWM") - baseline
    # Unbounded, 400 answers of 500 kB would be 200 MB.
    assert growth < 40 * MiB, "peak memory grew by {} MiB".format(growth // MiB)
    slow.close()


FRAMES_CONFIG = v010_config(head=LISTEN + """\
max_message_size: 4194304
limits:
  large_frame_size: 1048576
  frames_in_flight_budget: 8388608
""")


def test_large_frames_at_once_wait_for_the_budget(engines, sdk_worker):
    """Before: 40 connections each sending a 60 MiB frame at once held 2.4 GB. Now
    the frames being received at once are bounded by frames_in_flight_budget; the
    others wait, and every one is answered."""
    engine = engines(FRAMES_CONFIG)
    count, size = 32, 4 * MiB - 1024
    clients = [RawClient(engine.port, timeout=30) for _ in range(count)]
    for client in clients:
        assert client.read_message()["type"] == "workerregistered"
    baseline = rss_bytes(engine.process.pid, "VmHWM")
    head = b'{"type":"ping","pad":"'
    payload = frame(head + b"p" * (size - len(head) - 2) + b'"}')
    threads = [threading.Thread(target=c.sock.sendall, args=(payload,), daemon=True)
               for c in clients]
    for thread in threads:
        thread.start()
    other = sdk_worker(engine.url, "well-behaved")
    other.register_function({"id": "app::echo"}, lambda data: data)
    for thread in threads:
        thread.join(60)
    assert [c.read_message()["type"] for c in clients] == ["pong"] * count
    growth = rss_bytes(engine.process.pid, "VmHWM") - baseline
    # Without the budget: 32 x 4 MiB received at once (128 MiB), and more in copies;
    # with it, 8 MiB at a time (the margin is for PyPy's collector).
    assert growth < 64 * MiB, "peak memory grew by {} MiB".format(growth // MiB)
    assert other.trigger({"function_id": "app::echo", "payload": {"x": 1}})["x"] == 1
    for client in clients:
        client.close()


SLOW_CONFIG = v010_config(rest_api(), head=LISTEN + """\
handshake_timeout_ms: 60000
limits:
  http_header_timeout_ms: 60000
  max_connections_per_address: 300
""")


def _lower_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


def _slow_connection(port, source, first_bytes):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(first_bytes)
    return sock


def test_slow_connections_leave_room_for_new_workers_and_requests(engines, sdk_worker):
    """Before: at the default soft limit of 1,024 descriptors, 1,030 slow HTTP
    connections left none for a new worker or request. Now the engine raises its soft
    limit to the hard one at start (and logs both), slow handshakes are cut off after
    handshake_timeout_ms (http_header_timeout_ms on HTTP), and connections per
    address are capped."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.fail("this test needs a hard descriptor limit of at least 4096 "
                    "(ulimit -Hn), not {}".format(hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds 2,100
    held = []
    try:
        engine = engines(SLOW_CONFIG, preexec_fn=_lower_nofile, http=True)
        wait_until(lambda: "open-file limit: soft {} (was {}), hard {}".format(
            hard, min(1024, hard), hard) in engine.log(), 10, "the open-file limit line")
        http = engine.ports["http"]
        # 1,000 slow connections on each port, from four loopback addresses (250 each,
        # under the per-address cap): handshakes and headers never finished.
        for i in range(1000):
            source = "127.0.0.{}".format(2 + i % 4)
            held.append(_slow_connection(engine.port, source, handshake_bytes(engine.port)[:20]))
            held.append(_slow_connection(http, source, b"GET /slow HTTP/1.1\r\nHo"))
        # A new official SDK worker registers and serves an HTTP route.
        worker = sdk_worker(engine.url, "newcomer")
        worker.register_function({"id": "app::hello"}, lambda data: {"body": {"hi": 1}})
        worker.register_trigger({"type": "http", "function_id": "app::hello",
                                 "config": {"api_path": "hello", "http_method": "GET"}})
        url = "http://127.0.0.1:{}/hello".format(http)
        body = wait_until(lambda: _get(url), 30, "the route to answer")
        assert b'"hi"' in body
        # The per-address cap: a 301st connection from one address is closed at once.
        crowd = [_slow_connection(engine.port, "127.0.0.6", b"GET") for _ in range(300)]
        held.extend(crowd)
        extra = _slow_connection(engine.port, "127.0.0.6", b"GET")
        held.append(extra)
        assert _closed_by_engine(extra)
        assert worker.trigger({"function_id": "engine::functions::list",
                               "payload": {}})["functions"]
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _closed_by_engine(sock):
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read() if response.status == 200 else None
    except OSError:
        return None


HANDSHAKE_CONFIG = v010_config(rest_api(), head=LISTEN + """\
handshake_timeout_ms: 1500
limits:
  http_header_timeout_ms: 1500
""")


def test_slow_handshakes_are_cut_off_at_the_timeout(engines):
    engine = engines(HANDSHAKE_CONFIG, http=True)
    worker_port = _slow_connection(engine.port, "127.0.0.1", handshake_bytes(engine.port)[:30])
    http_port = _slow_connection(engine.ports["http"], "127.0.0.1", b"GET / HTTP/1.1\r\nHo")
    started = time.monotonic()
    for sock in (worker_port, http_port):
        sock.settimeout(10)
        assert _closed_by_engine(sock)
        sock.close()
    assert 1.0 < time.monotonic() - started < 8
