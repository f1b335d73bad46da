"""
The benchmark's load generator: one asyncio process driving every system under test.

It reads one JSON command per line on stdin and answers each with one JSON line on
stdout (``bench/run.py`` drives it). Clients:

- iii (our engine, the minimal relay, the echo floor): a lean WebSocket client on
  asyncio's Protocol API (RFC 6455 framing written here, no library in the path)
  speaking the iii wire protocol directly: a worker sends ``registerfunction`` and
  answers each ``invokefunction`` with an ``invocationresult`` carrying the call's
  data back; a caller sends ``invokefunction`` with an ``invocation_id`` and sends the
  next one when the answer arrives (closed loop, one call in flight per caller).
  Client frames use an all-zero masking key: valid framing that every server unmasks
  as usual, and no XOR pass in the client;
- Crossbar: Autobahn's asyncio WAMP client (``register`` / ``call``, JSON
  serializer), the same closed loop;
- HTTP: a lean HTTP/1.1 keep-alive client, one request in flight per connection.

Call ``j`` of caller ``i`` goes to worker ``(i + j) % workers`` (a distinct function
or procedure per worker: iii has no shared registrations), so every worker is used.

Commands: ``{"op": "calls", "target": "iii"|"iii-pypy"|"echo"|"relay"|"crossbar",
"port", "callers", "workers", "inflight" (calls in flight per caller, default 1),
"payload" (bytes of JSON data), "warmup", "duration", "cpu_pids"}``,
``{"op": "http", "target": "iii"|"iii-pypy"|"crossbar"|"floor", "port", "ws_port",
"connections", "payload", "warmup", "duration", "cpu_pids"}`` and ``{"op": "scale",
"port", "steps", "idle_seconds", "warmup", "duration", "cpu_pids"}`` (see
L{run_scale}). Each calls/http answer has ``calls``, ``seconds``, ``rate`` (calls/s),
``p50_us``, ``p99_us``, ``server_cpu_s`` (CPU time of ``cpu_pids`` and their children
in the window), ``server_rss_kib`` (their RSS at its end), ``client_cpu_s`` and
``errors``; or ``error``.
"""

import asyncio
import base64
import itertools
import json
import os
import socket
import sys
import time
from time import perf_counter_ns

_ids = itertools.count(1)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- CPU accounting ---------------------------------------------------------------

def _children(pid):
    try:
        with open("/proc/{}/task/{}/children".format(pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _tree(pids):
    """Yield C{pids} and all their descendants, each once."""
    seen = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            yield pid
            todo.extend(_children(pid))


def cpu_seconds(pids, system_only=False):
    """
    @return: user+system CPU seconds of C{pids} and all their descendants (system
        time only with C{system_only}: the kernel's share, syscalls mostly).
    """
    total = 0
    for pid in _tree(pids):
        try:
            with open("/proc/{}/stat".format(pid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime (fields 14, 15)
        total += int(fields[12]) if system_only else int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_kib(pids):
    """@return: resident set size (VmRSS, KiB) of C{pids} and their descendants."""
    total = 0
    for pid in _tree(pids):
        try:
            with open("/proc/{}/status".format(pid)) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def payload_data(size):
    """@return: a JSON-able dict whose compact encoding is C{size} bytes (>= 20)."""
    base = len(json.dumps({"pad": ""}, separators=(",", ":")))
    return {"pad": "x" * max(size - base, 0)}


def dumps(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


# -- a lean WebSocket client ------------------------------------------------------

class WSClient(asyncio.Protocol):
    """
    A minimal RFC 6455 client: handshake, unfragmented or fragmented frames, pings
    answered, close handshake. C{on_message(payload_bytes)} gets each message.
    """

    def __init__(self, host, port, path, on_message, protocol=None):
        loop = asyncio.get_running_loop()
        self.request = (
            "GET {} HTTP/1.1\r\nHost: {}:{}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\n{}"
            "Sec-WebSocket-Version: 13\r\n\r\n".format(
                path, host, port, base64.b64encode(os.urandom(16)).decode(),
                "Sec-WebSocket-Protocol: {}\r\n".format(protocol) if protocol else "",
            )).encode()
        self.on_message = on_message
        self.buf = bytearray()
        self.handshaken = False
        self.fragments = None
        self.opened = loop.create_future()
        self.lost = loop.create_future()
        self.transport = None

    @classmethod
    async def connect(cls, port, path, on_message, host="127.0.0.1", protocol=None):
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(
            lambda: cls(host, port, path, on_message, protocol), host, port)
        await asyncio.wait_for(proto.opened, 10)
        return proto

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)

    def connection_lost(self, exc):
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data):
        buf = self.buf
        buf += data
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:buf.find(b"\r\n")])
            del buf[:end + 4]
            if b" 101 " not in status:
                self.opened.set_exception(ConnectionError(status.decode("latin-1")))
                self.transport.close()
                return
            self.handshaken = True
            self.opened.set_result(self)
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            mask = None
            if b1 & 0x80:
                mask, head = bytes(buf[pos + head:pos + head + 4]), head + 4
            if n - pos < head + length:
                break
            payload = bytes(buf[pos + head:pos + head + length])
            pos += head + length
            if mask:
                payload = _unmask(payload, mask)
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
        if pos:
            del buf[:pos]

    def _frame(self, fin, opcode, payload):
        if opcode in (1, 2):
            if fin:
                self.on_message(payload)
            else:
                self.fragments = [payload]
        elif opcode == 0 and self.fragments is not None:
            self.fragments.append(payload)
            if fin:
                message, self.fragments = b"".join(self.fragments), None
                self.on_message(message)
        elif opcode == 9:
            self.send(payload, 10)
        elif opcode == 8:
            self.send(payload[:2], 8)
            self.transport.close()

    def send(self, payload, opcode=1):
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + payload)  # zero mask: no XOR needed

    async def close(self):
        if not self.lost.done():
            try:
                self.send((1000).to_bytes(2, "big"), 8)
            except Exception:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(self.lost), 5)
            except asyncio.TimeoutError:
                self.transport.close()


def _unmask(payload, mask):
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


# -- the measurement window -------------------------------------------------------

class Window:
    """Counts calls and records latencies between L{begin} and L{end}."""

    def __init__(self, cpu_pids):
        self.cpu_pids = cpu_pids
        self.recording = False
        self.stopping = False
        self.count = 0
        self.errors = 0
        self.latencies = []
        self.in_flight = 0
        self.idle = None

    def begin(self):
        self.t0 = time.perf_counter()
        self.server0 = cpu_seconds(self.cpu_pids)
        self.server_sys0 = cpu_seconds(self.cpu_pids, True)
        self.client0 = time.process_time()
        self.count = 0
        self.errors = 0
        self.latencies = []
        self.recording = True

    def end(self):
        self.recording = False
        seconds = time.perf_counter() - self.t0
        server = cpu_seconds(self.cpu_pids) - self.server0
        server_sys = cpu_seconds(self.cpu_pids, True) - self.server_sys0
        client = time.process_time() - self.client0
        lat = sorted(self.latencies)
        pick = (lambda q: lat[min(int(q * len(lat)), len(lat) - 1)] / 1000.0) if lat else (
            lambda q: None)
        return {
            "calls": self.count, "seconds": seconds, "rate": self.count / seconds,
            "p50_us": pick(0.5), "p99_us": pick(0.99), "server_cpu_s": server,
            "server_sys_s": server_sys,
            "client_cpu_s": client, "errors": self.errors,
            "server_rss_kib": rss_kib(self.cpu_pids) if self.cpu_pids else None,
        }

    def done(self, started_ns, error=False):
        if self.recording:
            self.count += 1
            self.latencies.append(perf_counter_ns() - started_ns)
            if error:
                self.errors += 1

    async def drain(self, timeout=10.0):
        self.stopping = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


# -- iii: workers and callers -----------------------------------------------------

class IIIWorker:
    """A lean iii worker hosting one function that returns its data."""

    def __init__(self, function_id, http_path=None):
        self.function_id = function_id
        self.http_path = http_path
        self.ws = None
        self.barrier = None

    async def start(self, port, path="/", register=True):
        loop = asyncio.get_running_loop()
        self.ws = await WSClient.connect(port, path, self.on_message)
        if not register:
            return self
        self.barrier = loop.create_future()
        self.ws.send(dumps({"type": "registerfunction", "id": self.function_id}))
        if self.http_path:
            self.ws.send(dumps({
                "type": "registertrigger", "id": "trigger-" + self.function_id,
                "trigger_type": "http", "function_id": self.function_id,
                "config": {"api_path": self.http_path, "http_method": "POST"}}))
        # Frames of one connection are handled in order: once this call is answered,
        # the registration is in force.
        self.ws.send(dumps({"type": "invokefunction", "invocation_id": "barrier",
                            "function_id": "engine::functions::list", "data": {}}))
        await asyncio.wait_for(self.barrier, 10)
        return self

    def on_message(self, payload):
        message = json.loads(payload)
        kind = message.get("type")
        if kind == "invokefunction":
            data = message.get("data")
            result = {"status_code": 200, "body": data.get("body")} if self.http_path \
                else data
            self.ws.send(dumps({
                "type": "invocationresult", "invocation_id": message["invocation_id"],
                "function_id": message["function_id"], "result": result}))
        elif kind == "invocationresult" and message.get("invocation_id") == "barrier":
            if not self.barrier.done():
                self.barrier.set_result(None)


class IIICaller:
    """
    A lean closed-loop caller keeping C{inflight} calls in flight: the next
    invokefunction goes out when one returns.
    """

    def __init__(self, index, function_ids, data_json, window, inflight=1):
        self.index = index
        self.function_ids = [f.encode() for f in function_ids]
        self.data_json = data_json
        self.window = window
        self.inflight = inflight
        self.sent = 0
        self.sent_at = {}  # invocation id (bytes) -> perf_counter_ns
        self.ws = None

    async def start(self, port, path="/"):
        self.ws = await WSClient.connect(port, path, self.on_message)
        return self

    def go(self):
        self.window.in_flight += self.inflight
        for _ in range(self.inflight):
            self._send()

    def _send(self):
        j = self.sent
        self.sent += 1
        function_id = self.function_ids[(self.index + j) % len(self.function_ids)]
        invocation_id = str(next(_ids)).encode()
        frame = b"".join((
            b'{"type":"invokefunction","invocation_id":"', invocation_id,
            b'","function_id":"', function_id, b'","data":', self.data_json, b"}"))
        self.sent_at[invocation_id] = perf_counter_ns()
        self.ws.send(frame)

    def on_message(self, payload):
        # The answer (the engine's invocationresult, the relayed worker frame, or the
        # echoed call) names the invocation.
        i = payload.find(b'"invocation_id":"')
        if i < 0:
            return  # workerregistered and the like
        i += 17
        started = self.sent_at.pop(payload[i:payload.index(b'"', i)], None)
        if started is None:
            return
        self.window.done(started, b'"error":{' in payload[:300])
        if self.window.stopping:
            self.window.in_flight -= 1
        else:
            self._send()


async def run_iii_calls(cmd, window):
    target, port = engine_kind(cmd["target"]), cmd["port"]
    tag = "bench{}".format(next(_ids))
    workers = []
    function_ids = ["{}::echo::{}".format(tag, k) for k in range(cmd["workers"])]
    if target == "echo":
        function_ids = function_ids[:1]
    else:
        path = "/worker" if target == "relay" else "/"
        workers = await asyncio.gather(*[
            IIIWorker(f).start(port, path, register=target == "iii") for f in function_ids])
    data_json = dumps(payload_data(cmd["payload"]))
    callers = [IIICaller(i, function_ids, data_json, window, cmd.get("inflight", 1))
               for i in range(cmd["callers"])]
    await asyncio.gather(*[c.start(port) for c in callers])
    try:
        for c in callers:
            c.go()
        return await measure(cmd, window)
    finally:
        await window.drain()
        await asyncio.gather(*[x.ws.close() for x in callers + workers])


async def measure(cmd, window):
    await asyncio.sleep(cmd["warmup"])
    window.begin()
    await asyncio.sleep(cmd["duration"])
    return window.end()


# -- Crossbar: a lean WAMP client (same framing code as the iii client) ----------

# WAMP message codes (WAMP v2 basic profile).
HELLO, WELCOME, ABORT, GOODBYE = 1, 2, 3, 6
ERROR, CALL, RESULT, REGISTER, REGISTERED, INVOCATION, YIELD = 8, 48, 50, 64, 65, 68, 70


class LeanWamp:
    """
    A lean WAMP session over L{WSClient} (``wamp.2.json``): HELLO/WELCOME, REGISTER,
    INVOCATION answered with YIELD of the call's arguments, and a closed-loop caller.
    """

    def __init__(self, window=None):
        self.window = window
        self.ws = None
        self.pending = {}  # request id -> future (join, register)
        self.joined = None
        # caller state
        self.procedures = None
        self.index = 0
        self.calls = 0
        self.sent_at = {}  # CALL request id -> perf_counter_ns
        self.args_json = None

    async def start(self, port, realm="realm1"):
        loop = asyncio.get_running_loop()
        self.joined = loop.create_future()
        self.ws = await WSClient.connect(port, "/", self.on_message, protocol="wamp.2.json")
        self.ws.send(dumps([HELLO, realm, {"roles": {"caller": {}, "callee": {}}}]))
        await asyncio.wait_for(self.joined, 10)
        return self

    async def register(self, procedure):
        request = next(_ids)
        future = self.pending[request] = asyncio.get_running_loop().create_future()
        self.ws.send(dumps([REGISTER, request, {}, procedure]))
        await asyncio.wait_for(future, 10)

    def on_message(self, payload):
        message = json.loads(payload)
        code = message[0]
        if code == INVOCATION:
            self.ws.send(dumps([YIELD, message[1], {}, message[4] if len(message) > 4 else []]))
        elif code == RESULT:
            self.window.done(self.sent_at.pop(message[1]))
            self._next()
        elif code == ERROR and message[1] == CALL:
            self.window.done(self.sent_at.pop(message[2]), True)
            self._next()
        elif code == WELCOME:
            self.joined.set_result(message[1])
        elif code == REGISTERED or code == ERROR:
            future = self.pending.pop(message[1] if code == REGISTERED else message[2], None)
            if future is not None:
                if code == REGISTERED:
                    future.set_result(message[2])
                else:
                    future.set_exception(RuntimeError(str(message)))
        elif code in (ABORT, GOODBYE):
            if not self.joined.done():
                self.joined.set_exception(RuntimeError(str(message)))

    def go(self, index, procedures, data, inflight=1):
        self.index, self.procedures = index, [p.encode() for p in procedures]
        self.args_json = dumps([data])
        self.window.in_flight += inflight
        for _ in range(inflight):
            self._send()

    def _next(self):
        if self.window.stopping:
            self.window.in_flight -= 1
        else:
            self._send()

    def _send(self):
        procedure = self.procedures[(self.index + self.calls) % len(self.procedures)]
        self.calls += 1
        request = next(_ids)
        frame = b"".join((b"[48,", str(request).encode(), b',{},"', procedure, b'",',
                          self.args_json, b"]"))
        self.sent_at[request] = perf_counter_ns()
        self.ws.send(frame)


async def run_crossbar_lean_calls(cmd, window):
    port = cmd["port"]
    tag = "bench{}".format(next(_ids))
    procedures = ["{}.echo.{}".format(tag, k) for k in range(cmd["workers"])]
    workers = await asyncio.gather(*[LeanWamp().start(port) for _ in procedures])
    await asyncio.gather(*[w.register(p) for w, p in zip(workers, procedures)])
    callers = await asyncio.gather(*[LeanWamp(window).start(port)
                                     for _ in range(cmd["callers"])])
    data = payload_data(cmd["payload"])
    try:
        for i, c in enumerate(callers):
            c.go(i, procedures, data, cmd.get("inflight", 1))
        return await measure(cmd, window)
    finally:
        await window.drain()
        await asyncio.gather(*[x.ws.close() for x in callers + workers])


# -- Crossbar: Autobahn WAMP ------------------------------------------------------

async def wamp_session(port, realm="realm1"):
    """@return: a joined Autobahn asyncio ApplicationSession (JSON serializer)."""
    import txaio
    txaio.use_asyncio()
    from autobahn.asyncio.wamp import ApplicationSession
    from autobahn.asyncio.websocket import WampWebSocketClientFactory
    from autobahn.wamp.serializer import JsonSerializer
    from autobahn.wamp.types import ComponentConfig

    loop = asyncio.get_running_loop()
    txaio.config.loop = loop
    joined, left = loop.create_future(), loop.create_future()

    class Session(ApplicationSession):
        def onJoin(self, details):
            if not joined.done():
                joined.set_result(self)

        def onDisconnect(self):
            if not left.done():
                left.set_result(None)

    factory = WampWebSocketClientFactory(
        lambda: Session(ComponentConfig(realm=realm)),
        url="ws://127.0.0.1:{}/".format(port), serializers=[JsonSerializer()])
    await loop.create_connection(factory, "127.0.0.1", port)
    session = await asyncio.wait_for(joined, 10)
    session.bench_left = left
    return session


async def wamp_close(session):
    try:
        if session.is_attached():
            session.leave()
        await asyncio.wait_for(asyncio.shield(session.bench_left), 5)
    except Exception:
        pass


async def run_crossbar_calls(cmd, window):
    port = cmd["port"]
    tag = "bench{}".format(next(_ids))
    procedures = ["{}.echo.{}".format(tag, k) for k in range(cmd["workers"])]
    workers = await asyncio.gather(*[wamp_session(port) for _ in procedures])
    await asyncio.gather(*[w.register(_echo, p) for w, p in zip(workers, procedures)])
    callers = await asyncio.gather(*[wamp_session(port) for _ in range(cmd["callers"])])
    data = payload_data(cmd["payload"])

    async def loop_calls(i, session):
        window.in_flight += 1
        j = 0
        try:
            while not window.stopping:
                started = perf_counter_ns()
                try:
                    await session.call(procedures[(i + j) % len(procedures)], data)
                    window.done(started)
                except Exception:
                    window.done(started, True)
                j += 1
        finally:
            window.in_flight -= 1

    tasks = [asyncio.ensure_future(loop_calls(i, s)) for i, s in enumerate(callers)]
    try:
        return await measure(cmd, window)
    finally:
        await window.drain()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*[wamp_close(s) for s in callers + workers])


def _echo(data):
    return data


# -- HTTP ---------------------------------------------------------------------------

class HTTPClient(asyncio.Protocol):
    """Keep-alive HTTP/1.1, one request in flight: Content-Length or chunked bodies."""

    def __init__(self, request, window):
        self.request = request
        self.window = window
        self.buf = bytearray()
        self.sent_at = 0
        self.transport = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(None)

    def go(self):
        self.window.in_flight += 1
        self._send()

    def _send(self):
        self.sent_at = perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data):
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            status = head[9:12]
            body_start = end + 4
            if b"transfer-encoding: chunked" in head:
                pos, size = body_start, None
                while True:
                    line_end = buf.find(b"\r\n", pos)
                    if line_end < 0:
                        return
                    size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
                    if len(buf) < line_end + 2 + size + 2:
                        return
                    pos = line_end + 2 + size + 2
                    if size == 0:
                        break
                total = pos
            else:
                i = head.find(b"content-length:")
                length = int(head[i + 15:head.find(b"\r\n", i) if head.find(
                    b"\r\n", i) > 0 else len(head)]) if i >= 0 else 0
                total = body_start + length
                if len(buf) < total:
                    return
            error = status != b"200" or b'"error":' in buf[body_start:body_start + 32]
            del buf[:total]
            self.window.done(self.sent_at, error)
            if self.window.stopping:
                self.window.in_flight -= 1
            else:
                self._send()


async def run_http(cmd, window):
    target, port = engine_kind(cmd["target"]), cmd["port"]
    tag = "bench{}".format(next(_ids))
    data = payload_data(cmd["payload"])
    cleanup = []
    if target == "iii":
        path = "/{}/echo".format(tag)
        worker = await IIIWorker(tag + "::http", http_path=path[1:]).start(cmd["ws_port"])
        cleanup.append(worker.ws.close)
        body = dumps(data)
    elif target == "crossbar":
        path = "/call"
        procedure = tag + ".http"
        session = await LeanWamp().start(cmd["ws_port"])
        await session.register(procedure)
        cleanup.append(session.ws.close)
        body = dumps({"procedure": procedure, "args": [data]})
    else:
        path = "/"
        body = dumps(data)
    request = (
        "POST {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n"
        "Content-Length: {}\r\n\r\n".format(path, port, len(body))).encode() + body
    loop = asyncio.get_running_loop()
    if target == "iii":
        await wait_for_route(loop, port, request)
    clients = []
    for _ in range(cmd["connections"]):
        _, client = await loop.create_connection(
            lambda: HTTPClient(request, window), "127.0.0.1", port)
        clients.append(client)
    try:
        for c in clients:
            c.go()
        return await measure(cmd, window)
    finally:
        await window.drain()
        for c in clients:
            c.transport.close()
        for close in cleanup:
            await close()


async def wait_for_route(loop, port, request, timeout=10.0):
    """Send C{request} until it is answered 200 (the http trigger is registered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n",
                                     1))
        response = await reader.read()
        writer.close()
        if response.startswith(b"HTTP/1.1 200"):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the http route never answered 200")


# -- scale: idle workers and registered functions ---------------------------------------

async def run_scale(cmd, window):
    """
    Grow the engine step by step (``steps``: ``{"idle": N, "functions": F}``, both
    cumulative): N connected idle workers, each hosting one function, and F more
    functions registered by one extra worker. At each step: the engine's RSS, its CPU
    while nothing is called (``idle_seconds``), then a sequential call and a
    pipelined load (4 callers x 16 in flight) to one more worker, each
    ``duration`` seconds after ``warmup``.

    @return: ``{"steps": [...]}``, one dict per step.
    """
    port, pids = cmd["port"], cmd["cpu_pids"]
    tag = "scale{}".format(next(_ids))
    active = [await IIIWorker("{}::echo::{}".format(tag, k)).start(port) for k in range(4)]
    function_ids = [w.function_id for w in active]
    idle, registrar, registered = [], None, 0
    data_json = dumps(payload_data(cmd.get("payload", 70)))
    steps = []
    try:
        for step in cmd["steps"]:
            while len(idle) < step.get("idle", 0):
                batch = min(50, step["idle"] - len(idle))
                idle += await asyncio.gather(*[
                    IIIWorker("{}::idle::{}".format(tag, len(idle) + k)).start(port)
                    for k in range(batch)])
            wanted = step.get("functions", 0)
            if wanted > registered:
                if registrar is None:
                    registrar = await IIIWorker(tag + "::many::0").start(port)
                # It registered many::0 itself: F in all, within the engine's default
                # max_functions_per_worker (10,000).
                for k in range(max(registered, 1), wanted):
                    registrar.ws.send(dumps({"type": "registerfunction",
                                             "id": "{}::many::{}".format(tag, k)}))
                registered = wanted
                registrar.barrier = asyncio.get_running_loop().create_future()
                registrar.ws.send(dumps({"type": "invokefunction", "invocation_id": "barrier",
                                         "function_id": "engine::functions::list",
                                         "data": {}}))
                await asyncio.wait_for(registrar.barrier, 60)
            await asyncio.sleep(0.3)
            cpu0, t0 = cpu_seconds(pids), time.perf_counter()
            await asyncio.sleep(cmd["idle_seconds"])
            idle_cpu = (cpu_seconds(pids) - cpu0) / (time.perf_counter() - t0)
            row = {"idle": len(idle), "functions": registered, "rss_kib": rss_kib(pids),
                   "idle_cpu": idle_cpu}
            for name, callers, inflight in (("sequential", 1, 1), ("pipelined", 4, 16)):
                w = Window(pids)
                group = [IIICaller(i, function_ids, data_json, w, inflight)
                         for i in range(callers)]
                await asyncio.gather(*[c.start(port) for c in group])
                try:
                    for c in group:
                        c.go()
                    row[name] = await measure(cmd, w)
                finally:
                    await w.drain()
                    await asyncio.gather(*[c.ws.close() for c in group])
            row["rss_after_kib"] = rss_kib(pids)
            steps.append(row)
    finally:
        others = active + idle + ([registrar] if registrar else [])
        for k in range(0, len(others), 100):
            await asyncio.gather(*[x.ws.close() for x in others[k:k + 100]])
    return {"steps": steps}


# -- the command loop -----------------------------------------------------------------

def engine_kind(target):
    """Our engine on any Python (``iii``, ``iii-pypy``) is driven the same way."""
    return "iii" if target.startswith("iii") else target


async def handle(cmd):
    window = Window(cmd.get("cpu_pids", []))
    if cmd["op"] == "calls":
        if cmd["target"] == "crossbar":
            return await run_crossbar_lean_calls(cmd, window)
        if cmd["target"] == "crossbar-autobahn":
            return await run_crossbar_calls(cmd, window)
        return await run_iii_calls(cmd, window)
    if cmd["op"] == "http":
        return await run_http(cmd, window)
    if cmd["op"] == "scale":
        return await run_scale(cmd, window)
    raise ValueError("unknown op {!r}".format(cmd["op"]))


async def main():
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        cmd = json.loads(line)
        try:
            result = await asyncio.wait_for(handle(cmd), cmd.get("timeout", 120))
        except Exception as e:
            result = {"error": "{}: {}".format(type(e).__name__, e)}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
