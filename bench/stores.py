#!/usr/bin/env python3
"""
Storage benchmark: state operations per second on each IKvStore (memory, file,
Redis), and queue messages per second from enqueue to processed on each queue broker
(builtin on its file journal, builtin in memory, Redis, RabbitMQ), each with p50/p99
latency, over several interleaved rounds.

    python bench/stores.py                 # 3 rounds of 1.5 s per cell
    python bench/stores.py --quick         # 1 round of 0.5 s
    python bench/stores.py --rounds 5 --concurrency 16
    python bench/stores.py --queue-only --no-redis --no-rabbitmq --rounds 7

Redis is a redis-server started for the run from the installed binary on a free
loopback port (skipped, with a note, when there is none). Each cell keeps
C{concurrency} operations in flight on one key space (``set``, ``get``) or on a few
hot keys (``update``: increments, so contention is part of the number). Prints a
Markdown table; the spread is the lowest and highest round.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_cell(store, op, seconds, concurrency, reactor):
    from twisted.internet import defer

    latencies = []
    deadline = reactor.seconds() + seconds
    counter = [0]

    async def loop(worker):
        while reactor.seconds() < deadline:
            counter[0] += 1
            n = counter[0]
            started = time.perf_counter()
            if op == "set":
                await store.set("bench", "k{}".format(n % 1000), {"n": n, "s": "x" * 64})
            elif op == "get":
                await store.get("bench", "k{}".format(n % 1000))
            else:
                await store.update("bench", "hot{}".format(worker % 4),
                                   [{"type": "increment", "path": "n", "by": 1}])
            latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(loop(i))
                               for i in range(concurrency)])
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)


def make_stores(reactor, redis_url, tmp):
    from iii_twisted.adapters.file import FileKvStore
    from iii_twisted.adapters.memory import MemoryKvStore

    stores = {"memory": lambda: MemoryKvStore(),
              "file": lambda: FileKvStore(os.path.join(tmp, "kv-{}".format(time.time())),
                                          reactor)}
    if redis_url:
        from iii_twisted import redis_client
        from iii_twisted.adapters.redis_kv import RedisKvStore
        stores["redis"] = lambda: RedisKvStore(redis_client.acquire(redis_url, reactor))
    return stores


async def run_queue(adapter, messages, reactor, name="bench"):
    """
    Enqueue C{messages} on the named queue C{name} (64 in flight) of a fresh engine
    whose function answers at once (a new name each round: a shared broker keeps what
    a round left, such as a message redelivered after its engine stopped).

    @return: (messages/s enqueue to processed, p50, p99 s).
    """
    from twisted.internet import defer

    from iii_twisted.modules.queue import QueueModule
    from iii_twisted.service import EngineService

    service = EngineService({"listen": "tcp:0:interface=127.0.0.1", "modules": [
        {"class": "modules::queue::QueueModule", "config": {
            "adapter": adapter, "queue_configs": {name: {"concurrency": 32}}}}]})
    service.startService()
    module = next(m for m in service.modules if isinstance(m, QueueModule))
    started = {}
    latencies = []
    done = defer.Deferred()

    def handle(data):
        if data["n"] not in started:
            return None  # not this round's
        latencies.append(time.perf_counter() - started.pop(data["n"]))
        if len(latencies) == messages:
            done.callback(None)
        return None
    service.engine.register_function("bench::handle", handle)
    t0 = time.perf_counter()
    sem = defer.DeferredSemaphore(64)

    def send(n):
        started[n] = time.perf_counter()
        return module.enqueue(name, "bench::handle", {"n": n, "pad": "x" * 64})
    await defer.gatherResults([sem.run(send, n) for n in range(messages)])
    await done
    elapsed = time.perf_counter() - t0
    await service.stopService()
    return messages / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99)


async def main(reactor, args):
    import brokers

    redis = rabbit = None
    if shutil.which("redis-server") and not args.no_redis:
        redis = brokers.RedisServer(shutil.which("redis-server")).start()
    if os.path.exists(brokers.RABBITMQ_SERVER) and not args.no_rabbitmq:
        rabbit = brokers.RabbitMQServer().start()
    tmp = tempfile.mkdtemp(prefix="iii-bench-")
    results = {}
    queue_results = {}
    try:
        stores = {} if args.queue_only else make_stores(
            reactor, redis.url if redis else None, tmp)
        for round_no in range(args.rounds):
            for name, make in stores.items():
                store = make()
                for op in ("set", "get", "update"):
                    sys.stderr.write("\rround {} {} {}      ".format(round_no + 1, name, op))
                    cell = await run_cell(store, op, args.seconds, args.concurrency, reactor)
                    results.setdefault((name, op), []).append(cell)
                await store.close()
            adapters = {"builtin file": {
                "class": "modules::queue::BuiltinQueueAdapter",
                "config": {"store_method": "file_based",
                           "file_path": os.path.join(tmp, "q{}".format(round_no))}},
                "builtin memory": {"class": "modules::queue::BuiltinQueueAdapter"}}
            if redis:
                adapters["redis"] = {"class": "modules::queue::RedisAdapter",
                                     "config": {"redis_url": redis.url}}
            if rabbit:
                adapters["rabbitmq"] = {"class": "modules::queue::RabbitMQAdapter",
                                        "config": {"amqp_url": rabbit.url}}
            for name, adapter in adapters.items():
                sys.stderr.write("\rround {} queue {}      ".format(round_no + 1, name))
                queue_results.setdefault(name, []).append(
                    await run_queue(adapter, args.messages, reactor,
                                    "bench{}".format(round_no)))
    finally:
        if rabbit is not None:
            rabbit.close()
        if redis is not None:
            redis.close()
        shutil.rmtree(tmp, ignore_errors=True)
    sys.stderr.write("\n")
    if results:
        print_stores(args, results)
    print("\nQueue messages, enqueue to processed ({} per round, {} round(s), 64 "
          "enqueues in flight, concurrency 32)\n".format(args.messages, args.rounds))
    print("| broker | msgs/s (median, spread) | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, cells in queue_results.items():
        rates = [c[0] for c in cells]
        print("| {} | {:.0f} ({:.0f}-{:.0f}) | {:.1f} | {:.1f} |".format(
            name, statistics.median(rates), min(rates), max(rates),
            statistics.median(c[1] for c in cells) * 1000,
            statistics.median(c[2] for c in cells) * 1000))
    if redis is None:
        print("\n(Redis not measured: redis-server not installed, or --no-redis)")
    if rabbit is None:
        print("(RabbitMQ not measured: not installed, or --no-rabbitmq)")


def print_stores(args, results):
    print("State store operations ({} in flight, {} round(s) of {} s)\n".format(
        args.concurrency, args.rounds, args.seconds))
    print("| store | op | ops/s (median, spread) | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for (name, op), cells in results.items():
        rates = [c[0] for c in cells]
        print("| {} | {} | {:.0f} ({:.0f}-{:.0f}) | {:.2f} | {:.2f} |".format(
            name, op, statistics.median(rates), min(rates), max(rates),
            statistics.median(c[1] for c in cells) * 1000,
            statistics.median(c[2] for c in cells) * 1000))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--no-rabbitmq", action="store_true")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--queue-only", action="store_true",
                        help="measure the queue brokers only, not the state stores")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.messages = 1, 0.5, 500
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
