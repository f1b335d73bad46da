"""
A smaller check with the official Python SDK (PyPI ``iii-sdk`` 0.10.0) against our
engine: one SDK worker hosting an echo function, SDK callers calling it with
``trigger()``; sequential latency, then throughput with 1 and 4 caller threads.

Usage: ``python bench/sdk_check.py WS_URL CALLS DURATION [ENGINE_PID]``; prints one
JSON object.
"""

import json
import statistics
import sys
import threading
import time

from iii import InitOptions, register_worker

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from loadgen import cpu_seconds, payload_data  # noqa: E402


def main(url, calls, duration, pids):
    worker = register_worker(url, InitOptions(worker_name="bench-sdk-worker"))
    worker.register_function({"id": "bench::sdk::echo"}, lambda data: data)
    callers = [register_worker(url, InitOptions(worker_name="bench-sdk-caller-{}".format(i)))
               for i in range(4)]
    data = payload_data(70)
    request = {"function_id": "bench::sdk::echo", "payload": data, "timeout_ms": 10000}
    deadline = time.monotonic() + 10
    while True:  # the registration travels on another connection: wait for it
        try:
            callers[0].trigger(request)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        latencies = []
        for _ in range(calls):
            started = time.perf_counter()
            callers[0].trigger(request)
            latencies.append(time.perf_counter() - started)
        latencies.sort()
        result = {
            "sequential_calls": calls,
            "p50_us": latencies[len(latencies) // 2] * 1e6,
            "p99_us": latencies[min(int(len(latencies) * 0.99), len(latencies) - 1)] * 1e6,
            "mean_us": statistics.mean(latencies) * 1e6,
        }
        for threads in (1, 4):
            result["threads_{}".format(threads)] = throughput(
                callers[:threads], request, duration, pids)
        return result
    finally:
        for client in callers + [worker]:
            client.shutdown()


def throughput(clients, request, duration, pids):
    counts = [0] * len(clients)
    stop = threading.Event()

    def loop(i):
        while not stop.is_set():
            clients[i].trigger(request)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(clients))]
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join()
    seconds, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
    total = sum(counts)
    return {"calls": total, "rate": total / seconds,
            "server_cpu_us_per_call": cpu / total * 1e6 if total else None}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
                          [int(p) for p in sys.argv[4:]])))
