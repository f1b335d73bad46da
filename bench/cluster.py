#!/usr/bin/env python3
"""
The cluster benchmark: one engine against a two-process cluster (docs/cluster.rst).

Starts a redis-server of its own (the membership), engines as ``twistd -n iii``
processes on loopback, and drives them with bench/loadgen.py's lean iii workers and
closed-loop callers (in this process, on asyncio). Scenarios, each measured in
``--rounds`` interleaved rounds:

- ``single``: one engine; every caller and worker on it;
- ``cluster-local``: two members; half the callers and workers on each, each caller
  calling the functions of its own member's workers (no call crosses);
- ``cluster-crossing``: two members; each caller calls only the functions of the
  *other* member's workers (every call crosses one link);
- ``latency-local`` / ``latency-crossing``: one caller, one call in flight: p50/p99 of
  a call on one engine, and of a call crossing members.

The scaling factor is the cluster-local rate over the single rate. Every figure is
wall-clock on a shared machine: the report gives the load average before and after.

    python bench/cluster.py                       # 3 rounds, 5 s windows
    python bench/cluster.py --rounds 5 --duration 10 --callers 8 --workers 4
"""

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import loadgen  # noqa: E402
from loadgen import IIICaller, IIIWorker, Window, WSClient, dumps, payload_data  # noqa: E402
from ports import free_port, wait_port  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

ENGINE_CONFIG = """\
port: {port}
host: 127.0.0.1
invocation_timeout_ms: 30000
modules: []
"""
CLUSTER = """\
cluster:
  redis_url: {redis_url}
  secret: bench-cluster-secret
  name: {name}
"""


class Engine:
    """One ``twistd -n iii`` process."""

    def __init__(self, workdir, name, redis_url=None):
        self.name = name
        self.port = free_port()
        directory = os.path.join(workdir, name)
        os.makedirs(directory)
        config = ENGINE_CONFIG.format(port=self.port)
        if redis_url:
            config += CLUSTER.format(redis_url=redis_url, name=name)
        path = os.path.join(directory, "iii-config.yaml")
        with open(path, "w") as f:
            f.write(config)
        self.log = open(os.path.join(directory, "engine.log"), "ab")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "iii", "--config", path], cwd=directory,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, self.process)

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()


async def list_functions(port):
    """@return: the function ids the engine on C{port} lists."""
    loop = asyncio.get_running_loop()
    answer = loop.create_future()

    def on_message(payload):
        message = json.loads(payload)
        if message.get("invocation_id") == "list" and not answer.done():
            answer.set_result(message)
    ws = await WSClient.connect(port, "/", on_message)
    ws.send(dumps({"type": "invokefunction", "invocation_id": "list",
                   "function_id": "engine::functions::list", "data": {}}))
    message = await asyncio.wait_for(answer, 10)
    await ws.close()
    return {f["function_id"] for f in message["result"]["functions"]}


async def wait_offered(port, function_ids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not set(function_ids) <= await list_functions(port):
        if time.monotonic() > deadline:
            raise TimeoutError("functions not offered to port {}".format(port))
        await asyncio.sleep(0.05)


async def run_window(placements, window, warmup, duration):
    """
    @param placements: [(engine port, [function ids it calls], callers, inflight)].
    @return: the window's figures.
    """
    data_json = dumps(payload_data(64))
    callers = []
    for port, function_ids, count, inflight in placements:
        for i in range(count):
            caller = IIICaller(i, function_ids, data_json, window, inflight)
            await caller.start(port)
            callers.append(caller)
    try:
        for caller in callers:
            caller.go()
        await asyncio.sleep(warmup)
        window.begin()
        await asyncio.sleep(duration)
        return window.end()
    finally:
        await window.drain()
        await asyncio.gather(*[c.ws.close() for c in callers])


async def start_workers(port, tag, count):
    ids = ["{}::echo::{}".format(tag, k) for k in range(count)]
    workers = await asyncio.gather(*[IIIWorker(f).start(port) for f in ids])
    return ids, workers


async def bench(args):
    from brokers import start_redis

    report = {"python": "{} {}".format(platform.python_implementation(),
                                       platform.python_version()),
              "loadavg_before": os.getloadavg(), "args": vars(args), "rounds": {}}
    workdir = tempfile.mkdtemp(prefix="iii-bench-cluster-")
    redis = start_redis()
    engines = []
    try:
        single = Engine(workdir, "single")
        a = Engine(workdir, "member-a", redis.url)
        b = Engine(workdir, "member-b", redis.url)
        engines = [single, a, b]
        half = max(args.workers // 2, 1)
        s_ids, s_workers = await start_workers(single.port, "s", args.workers)
        a_ids, a_workers = await start_workers(a.port, "a", half)
        b_ids, b_workers = await start_workers(b.port, "b", half)
        await wait_offered(a.port, b_ids)
        await wait_offered(b.port, a_ids)
        callers = args.callers
        per = max(callers // 2, 1)
        inflight = args.inflight
        scenarios = {
            "single": ([single], [(single.port, s_ids, callers, inflight)]),
            "cluster-local": ([a, b], [(a.port, a_ids, per, inflight),
                                       (b.port, b_ids, per, inflight)]),
            "cluster-crossing": ([a, b], [(a.port, b_ids, per, inflight),
                                          (b.port, a_ids, per, inflight)]),
            "latency-local": ([single], [(single.port, s_ids[:1], 1, 1)]),
            "latency-crossing": ([a, b], [(a.port, b_ids[:1], 1, 1)]),
        }
        for round_index in range(args.rounds):
            names = list(scenarios)
            # Interleaved, and rotated per round, so drift of the machine's load
            # touches every scenario alike.
            names = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in names:
                members, placements = scenarios[name]
                window = Window([e.process.pid for e in members])
                result = await run_window(placements, window, args.warmup, args.duration)
                report["rounds"].setdefault(name, []).append(result)
                print("round {} {}: {:.0f} calls/s, p50 {} us, p99 {} us, engine CPU "
                      "{:.0f} us/call, errors {}".format(
                          round_index + 1, name, result["rate"], _us(result["p50_us"]),
                          _us(result["p99_us"]),
                          result["server_cpu_s"] * 1e6 / max(result["calls"], 1),
                          result["errors"]), file=sys.stderr)
        for worker in s_workers + a_workers + b_workers:
            await worker.ws.close()
    finally:
        for engine in engines:
            engine.stop()
        redis.close()
    report["loadavg_after"] = os.getloadavg()
    report["summary"] = summarize(report["rounds"])
    return report


def _us(value):
    return None if value is None else int(value)


def summarize(rounds):
    summary = {}
    for name, results in rounds.items():
        rates = [r["rate"] for r in results]
        summary[name] = {
            "rate_median": statistics.median(rates), "rate_min": min(rates),
            "rate_max": max(rates),
            "p50_us_median": statistics.median(r["p50_us"] for r in results),
            "p99_us_median": statistics.median(r["p99_us"] for r in results),
            "errors": sum(r["errors"] for r in results),
            # Engine CPU (all its processes) per call: what a call costs wherever
            # it runs, which the load of a shared machine does not change much.
            "server_cpu_us_per_call": statistics.median(
                r["server_cpu_s"] * 1e6 / r["calls"] for r in results if r["calls"]),
        }
    if "single" in summary and "cluster-local" in summary:
        summary["scaling_factor_local"] = (summary["cluster-local"]["rate_median"]
                                           / summary["single"]["rate_median"])
        summary["scaling_factor_crossing"] = (summary["cluster-crossing"]["rate_median"]
                                              / summary["single"]["rate_median"])
    return summary


def markdown(report):
    s = report["summary"]
    lines = ["| scenario | calls/s median (min-max) | p50 us | p99 us | engine CPU us/call "
             "| errors |", "|---|---|---|---|---|---|"]
    for name in ("single", "cluster-local", "cluster-crossing", "latency-local",
                 "latency-crossing"):
        r = s[name]
        lines.append("| {} | {:.0f} ({:.0f}-{:.0f}) | {:.0f} | {:.0f} | {:.0f} | {} |".format(
            name, r["rate_median"], r["rate_min"], r["rate_max"], r["p50_us_median"],
            r["p99_us_median"], r["server_cpu_us_per_call"], r["errors"]))
    lines.append("")
    lines.append("Scaling factor (cluster-local / single): {:.2f}; cluster-crossing / "
                 "single: {:.2f}. Load average before {} after {}; {}; {} CPUs.".format(
                     s["scaling_factor_local"], s["scaling_factor_crossing"],
                     " ".join("{:.2f}".format(x) for x in report["loadavg_before"]),
                     " ".join("{:.2f}".format(x) for x in report["loadavg_after"]),
                     report["python"], os.cpu_count()))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--callers", type=int, default=8, help="in total")
    parser.add_argument("--workers", type=int, default=4, help="in total")
    parser.add_argument("--inflight", type=int, default=1, help="calls per caller")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    report = asyncio.run(bench(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(markdown(report))


if __name__ == "__main__":
    main()
