#!/usr/bin/env python3
"""
The engine's hot path without sockets: CPU time per routed call, on this Python.

A real L{iii_twisted.worker.WorkerFactory} (Autobahn's WebSocket protocol, our
decoding, routing and encoding) on in-memory transports: one caller and one worker
connection, WebSocket frames fed in as bytes (masked, as a client sends them) and the
engine's output read back. Each routed call is the caller's ``invokefunction`` frame
in, the engine's ``invokefunction`` to the worker out, the worker's
``invocationresult`` in and the engine's answer to the caller out: what one call costs
the engine minus the kernel. CPU time (``time.process_time``) only, so the figure
holds on a machine others are loading, which wall-clock rates do not.

    python bench/hotpath.py                 # 3 rounds of 20,000 calls after warm-up
    python bench/hotpath.py --profile       # cProfile of one round, top 30 by tottime
    python bench/hotpath.py --idle-workers 1000 --functions 10000   # the same, grown
    python bench/hotpath.py --replicas 2    # bench::echo hosted by 2 workers (replicas.py)
    AUTOBAHN_USE_NVX=0 python bench/hotpath.py   # Autobahn's pure-Python masker

Prints one JSON line: ``{"python", "us_per_call": [per round], "median", "warmup"}``.
"""

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from iii_twisted.testing import make_engine  # noqa: E402
from iii_twisted.worker import WorkerFactory  # noqa: E402

MASK = b"\x12\x34\x56\x78"


def frame(payload, mask=MASK):
    """@return: one masked text frame carrying C{payload} (bytes), as a client sends."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, 0x80 | n))
    elif n < 65536:
        head = bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 0xFF)) + n.to_bytes(8, "big")
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return head + mask + (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def unframe(data):
    """@return: the payloads of the unmasked server frames in C{data}."""
    out, pos = [], 0
    while pos < len(data):
        n, head = data[pos + 1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
        out.append(data[pos + head:pos + head + n])
        pos += head + n
    return out


class Peer:
    """One client connection to the factory, on a StringTransport."""

    def __init__(self, factory, port):
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self.protocol = factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self.protocol.dataReceived((
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".format(key)).encode())
        response = self.transport.value()
        assert b" 101 " in response.split(b"\r\n", 1)[0], response[:200]
        self.transport.clear()

    def send(self, payload):
        self.protocol.dataReceived(frame(payload))

    def received(self):
        data = self.transport.value()
        self.transport.clear()
        return unframe(data)


def setup(payload_size, idle_workers=0, functions=0, replicas=1):
    engine, clock = make_engine(invocation_timeout=30.0)
    factory = WorkerFactory(engine, clock, ping_interval=0)
    idle = [Peer(factory, 41000 + k) for k in range(idle_workers)]
    for k, peer in enumerate(idle):
        peer.send('{{"type":"registerfunction","id":"idle::{}"}}'.format(k).encode())
    if functions:
        many = Peer(factory, 40003)
        for k in range(functions):
            many.send('{{"type":"registerfunction","id":"many::{}"}}'.format(k).encode())
        idle.append(many)
    clock.advance(1)  # engine::functions-available and the like, once
    workers = [Peer(factory, 40100 + k) for k in range(replicas)]
    caller = Peer(factory, 40002)
    for worker in workers:
        worker.send(b'{"type":"registerfunction","id":"bench::echo"}')
        worker.received()
    caller.received()
    pad = "x" * max(payload_size - 10, 0)
    call = frame(json.dumps({"type": "invokefunction", "invocation_id": "1",
                             "function_id": "bench::echo", "data": {"pad": pad}},
                            separators=(",", ":")).encode())
    result_head = b'{"type":"invocationresult","invocation_id":"'
    result_tail = ('","function_id":"bench::echo","result":' + json.dumps(
        {"pad": pad}, separators=(",", ":")) + "}").encode()
    caller_protocol, caller_transport = caller.protocol, caller.transport
    hosts = [(w.protocol, w.transport) for w in workers]

    def one_call():
        caller_protocol.dataReceived(call)
        for worker_protocol, worker_transport in hosts:  # the one the router picked
            out = worker_transport.value()
            if out:
                break
        worker_transport.clear()
        i = out.index(b'"invocation_id":"') + 17
        invocation_id = out[i:out.index(b'"', i)]
        worker_protocol.dataReceived(frame(result_head + invocation_id + result_tail))
        answer = caller_transport.value()
        caller_transport.clear()
        if b'"result"' not in answer:
            raise AssertionError(answer[:300])
    return one_call


def harness_cost(n, payload_size):
    """CPU µs per call of what L{one_call} does besides the engine (framing, parsing)."""
    pad = b"x" * max(payload_size - 10, 0)
    started = time.process_time()
    for i in range(n):
        frame(b'{"type":"invocationresult","invocation_id":"' + str(i).encode() + pad)
        b'"invocation_id":"abc"'.index(b'"invocation_id":"')
    return (time.process_time() - started) / n * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30000, help="calls before measuring")
    parser.add_argument("--payload", type=int, default=70)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--idle-workers", type=int, default=0,
                        help="connected workers, each hosting one function, never called")
    parser.add_argument("--functions", type=int, default=0,
                        help="more functions, registered by one more worker")
    parser.add_argument("--replicas", type=int, default=1,
                        help="workers hosting bench::echo (calls spread across them)")
    args = parser.parse_args()
    one_call = setup(args.payload, args.idle_workers, args.functions, args.replicas)
    started = time.process_time()
    for _ in range(args.warmup):
        one_call()
    warmup = time.process_time() - started
    if args.profile:
        import cProfile
        import pstats
        profile = cProfile.Profile()
        profile.runcall(lambda: [one_call() for _ in range(args.calls)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        return
    rounds = []
    for _ in range(args.rounds):
        started = time.process_time()
        for _ in range(args.calls):
            one_call()
        rounds.append((time.process_time() - started) / args.calls * 1e6)
    print(json.dumps({
        "python": "{} {}".format(platform.python_implementation(), platform.python_version()),
        "autobahn_use_nvx": os.environ.get("AUTOBAHN_USE_NVX"),
        "payload": args.payload, "idle_workers": args.idle_workers,
        "functions": args.functions, "replicas": args.replicas, "us_per_call": [round(r, 2) for r in rounds],
        "median": round(statistics.median(rounds), 2),
        "harness_us_per_call": round(harness_cost(args.calls, args.payload), 2),
        "warmup_calls": args.warmup, "warmup_us_per_call": round(
            warmup / max(args.warmup, 1) * 1e6, 2)}))


if __name__ == "__main__":
    main()
