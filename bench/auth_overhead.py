"""
What a session costs on the hot path: calls from one worker to an in-process function,
through the engine's real message handling (frame decoded, routed, answered), with

- no session (a listener without auth: today's path),
- a token's session with no lists (``restricted`` is false: one attribute read),
- a restricted session (``allowed_functions`` patterns: the grant check per call),
- a restricted session with a middleware (an extra in-process call per call).

In process, no sockets: it measures the engine's own work, not the network. Prints the
median and spread of calls per second over rounds::

    python bench/auth_overhead.py [--rounds 5] [--calls 20000]
"""

import argparse
import statistics
import time

from twisted.internet.task import Clock

from iii_twisted.auth import Session
from iii_twisted.engine import Engine
from iii_twisted.protocol import decode, encode
from iii_twisted.testing import FakeWorkerConnection


class Sink(FakeWorkerConnection):
    """Keeps nothing: the benchmark measures routing, not the test double's list."""

    def send(self, message):
        encode(message)
        return True


def rate(session, calls, middleware=False):
    engine = Engine(Clock())
    engine.register_function("public::echo", lambda data: data)
    engine.register_function("mw::pass", lambda data: data["payload"])
    if middleware:
        session.middleware_function_id = "mw::pass"
        session.restricted = True
    conn = Sink(engine)
    conn.worker = engine.attach(conn, session)
    frames = [encode({"type": "invokefunction", "invocation_id": str(i),
                      "function_id": "public::echo", "data": {"n": i}})
              for i in range(calls)]
    start = time.perf_counter()
    for frame in frames:
        engine.handle_message(conn.worker, decode(frame))
    return calls / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    cases = [
        ("no session (no auth)", lambda: None, False),
        ("token, no lists", lambda: Session(name="backend"), False),
        ("allowed_functions: [a::*, b::*, public::*]",
         lambda: Session(name="web", allowed_functions=["a::*", "b::*", "public::*"]), False),
        ("same + middleware", lambda: Session(name="web", allowed_functions=["public::*"]),
         True),
    ]
    results = {name: [] for name, _, _ in cases}
    for _ in range(args.rounds):  # interleaved, so drift hits every case alike
        for name, make, middleware in cases:
            results[name].append(rate(make(), args.calls, middleware))
    print("calls/s, {} rounds of {} calls (median, min-max)".format(args.rounds, args.calls))
    base = statistics.median(results[cases[0][0]])
    for name, values in results.items():
        median = statistics.median(values)
        print("{:45} {:9.0f}  ({:.0f}-{:.0f})  {:+.1f}%".format(
            name, median, min(values), max(values), (median / base - 1) * 100))


if __name__ == "__main__":
    main()
