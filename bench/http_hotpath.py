#!/usr/bin/env python3
"""
The HTTP-to-function path without sockets: CPU time per HTTP request, on this Python.

The REST API module's real C{Site} (twisted.web's C{HTTPChannel}, our request class,
the route lookup, the exchange and its channels) on an in-memory transport, and a
worker on a real L{iii_twisted.worker.WorkerFactory} connection (Autobahn's WebSocket
protocol) on another: each request is a keep-alive ``POST /bench/echo`` with a 70 B
JSON body in, the engine's ``invokefunction`` to the worker out, the worker's
``invocationresult`` (``{"status_code": 200, "body": ...}``, as bench/loadgen.py's
worker answers) in and the HTTP response out. CPU time (``time.process_time``), so the
figure holds on a machine others are loading; ``--profile`` prints a cProfile.

    python bench/http_hotpath.py                  # 3 rounds of 10,000 requests
    python bench/http_hotpath.py --profile        # cProfile of one round
    .venv-pypy/bin/python bench/http_hotpath.py --warmup 30000

Prints one JSON line: ``{"python", "us_per_request": [per round], "median", ...}``.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from hotpath import Peer, frame  # noqa: E402
from iii_twisted.modules.rest_api import RestApiModule  # noqa: E402
from iii_twisted.testing import make_engine  # noqa: E402
from iii_twisted.worker import WorkerFactory  # noqa: E402


def setup(payload_size, config=None):
    engine, clock = make_engine(invocation_timeout=30.0)
    module = RestApiModule(engine, dict({"port": 0}, **(config or {})), clock)
    factory = WorkerFactory(engine, clock, ping_interval=0)
    worker = Peer(factory, 40100)
    worker.send(b'{"type":"registerfunction","id":"bench::http"}')
    worker.send(json.dumps({
        "type": "registertrigger", "id": "t1", "trigger_type": "http",
        "function_id": "bench::http",
        "config": {"api_path": "bench/echo", "http_method": "POST"}}).encode())
    clock.advance(1)
    worker.received()
    body = json.dumps({"pad": "x" * max(payload_size - 10, 0)},
                      separators=(",", ":")).encode()
    request = ("POST /bench/echo HTTP/1.1\r\nHost: 127.0.0.1:3111\r\n"
               "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n".format(
                   len(body))).encode() + body
    http_transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
    channel = module.site.buildProtocol(http_transport.getPeer())
    channel.makeConnection(http_transport)
    result_head = b'{"type":"invocationresult","invocation_id":"'
    result_tail = (b'","function_id":"bench::http","result":{"status_code":200,"body":'
                   + body + b"}}")
    worker_protocol, worker_transport = worker.protocol, worker.transport

    def one_request():
        channel.dataReceived(request)
        out = worker_transport.value()
        worker_transport.clear()
        i = out.index(b'"invocation_id":"') + 17
        invocation_id = out[i:out.index(b'"', i)]
        worker_protocol.dataReceived(frame(result_head + invocation_id + result_tail))
        answer = http_transport.value()
        http_transport.clear()
        if not answer.startswith(b"HTTP/1.1 200"):
            raise AssertionError(answer[:300])
    return one_request, clock


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3000, help="requests before measuring")
    parser.add_argument("--payload", type=int, default=70)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key")
    parser.add_argument("--lines", type=int, default=40)
    args = parser.parse_args()
    one_request, clock = setup(args.payload)
    started = time.process_time()
    for _ in range(args.warmup):
        one_request()
    warmup = time.process_time() - started
    if args.profile:
        import cProfile
        import pstats
        profile = cProfile.Profile()
        profile.runcall(lambda: [one_request() for _ in range(args.requests)])
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.lines)
        return
    rounds = []
    for _ in range(args.rounds):
        started = time.process_time()
        for _ in range(args.requests):
            one_request()
        rounds.append((time.process_time() - started) / args.requests * 1e6)
    print(json.dumps({
        "python": "{} {}".format(platform.python_implementation(), platform.python_version()),
        "payload": args.payload, "us_per_request": [round(r, 2) for r in rounds],
        "median": round(statistics.median(rounds), 2), "warmup_requests": args.warmup,
        "warmup_us_per_request": round(warmup / max(args.warmup, 1) * 1e6, 2)}))


if __name__ == "__main__":
    main()
