#!/usr/bin/env python3
"""
What one open web console costs the engine under load.

Starts the engine (``twistd -n iii``: queue, observability in memory, the console) and
the benchmark's load generator (bench/loadgen.py: lean iii workers and closed-loop
callers over the wire protocol), then measures calls/s, latency and the engine's CPU
per call with no console open and with one console page open and pushing (an
EventSource-style client reading ``/api/events``, as a browser tab does), in
interleaved rounds. Prints a Markdown report and writes it to bench/console.md.

    python bench/console.py              # 3 rounds of 3 s per cell, about a minute
    python bench/console.py --rounds 5 --duration 5

Run it with the Python environment the engine is installed in (``pip install -e .``).
"""

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from ports import free_port, wait_port

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

CONFIG = """
port: {port}
host: 127.0.0.1
modules:
  - class: modules::queue::QueueModule
    config:
      queue_configs:
        jobs: {{max_retries: 1}}
  - class: modules::observability::ObservabilityModule
    config: {{exporter: memory}}
  - class: modules::console::ConsoleModule
    config: {{port: {console}, push_interval: {push_interval}}}
"""


class ConsoleTab:
    """One open console page: reads its event stream, as a browser's EventSource."""

    def __init__(self, port, page):
        self.port = port
        self.page = page
        self.events = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._connection = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.request("GET", "/api/session", headers={"Host": "127.0.0.1"})
        response = connection.getresponse()
        response.read()
        cookie = self.cookie = response.getheader("Set-Cookie").split(";")[0]
        self.stats_before = self.stats()
        self.opened = time.monotonic()
        self._connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        self._connection.request("GET", "/api/events?page=" + self.page,
                                 headers={"Host": "127.0.0.1", "Cookie": cookie,
                                          "Accept": "text/event-stream"})
        self._response = self._connection.getresponse()
        assert self._response.status == 200, self._response.status
        self._thread.start()
        return self

    def stats(self):
        """@return: the console's own counters (GET /api/stats)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.request("GET", "/api/stats", headers={"Host": "127.0.0.1",
                                                         "Cookie": self.cookie})
        stats = json.loads(connection.getresponse().read())
        connection.close()
        return stats

    def cost(self):
        """@return: (render ms per computation, share of one core) while open."""
        after = self.stats()
        renders = after["renders"] - self.stats_before["renders"]
        seconds = after["render_seconds"] - self.stats_before["render_seconds"]
        return (seconds / renders * 1000 if renders else 0.0,
                seconds / (time.monotonic() - self.opened))

    def _run(self):
        try:
            while not self._stop.is_set():
                line = self._response.fp.readline()
                if not line:
                    return
                self.bytes += len(line)
                if line.startswith(b"data: "):
                    self.events += 1
        except (OSError, ValueError):
            return

    def stop(self):
        self._stop.set()
        try:
            self._connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._connection.close()
        self._thread.join(5)


class LoadGen:
    def __init__(self, workdir):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "loadgen.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "loadgen.log"), "ab"))

    def run(self, cmd):
        self.process.stdin.write((json.dumps(cmd) + "\n").encode())
        self.process.stdin.flush()
        result = json.loads(self.process.stdout.readline())
        if "error" in result:
            raise RuntimeError(result["error"])
        return result

    def close(self):
        self.process.stdin.close()
        self.process.wait(10)


def spread(values, fmt="{:.0f}"):
    if not values:
        return "–"
    median = statistics.median(values)
    return (fmt + " ({}–{})").format(median, fmt.format(min(values)), fmt.format(max(values)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--push-interval", type=float, default=1.0)
    parser.add_argument("--pages", default="overview,functions,traces")
    parser.add_argument("--out", default=os.path.join(HERE, "console.md"))
    args = parser.parse_args()
    pages = [p for p in args.pages.split(",") if p]
    cells = ["none"] + pages

    with tempfile.TemporaryDirectory() as workdir:
        port, console = free_port(), free_port()
        config = os.path.join(workdir, "iii-config.yaml")
        with open(config, "w") as f:
            f.write(CONFIG.format(port=port, console=console,
                                  push_interval=args.push_interval))
        env = dict(os.environ, PYTHONPATH=CHECKOUT + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        engine = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "iii", "--config", config], cwd=workdir, env=env,
            stdout=open(os.path.join(workdir, "engine.log"), "ab"),
            stderr=subprocess.STDOUT, start_new_session=True)
        loadgen = None
        try:
            wait_port(port, engine)
            wait_port(console, engine)
            loadgen = LoadGen(workdir)
            results = {cell: [] for cell in cells}
            for round_index in range(args.rounds):
                # Rotate the order so that drift over the run does not favour one cell.
                order = cells[round_index % len(cells):] + cells[:round_index % len(cells)]
                for cell in order:
                    tab = ConsoleTab(console, cell).start() if cell != "none" else None
                    try:
                        result = loadgen.run({
                            "op": "calls", "target": "iii", "port": port,
                            "callers": args.callers, "workers": args.workers,
                            "payload": 64, "warmup": args.warmup,
                            "duration": args.duration, "cpu_pids": [engine.pid]})
                        render_ms, share = tab.cost() if tab else (0.0, 0.0)
                    finally:
                        if tab is not None:
                            tab.stop()
                    result["render_ms"], result["share"] = render_ms, share
                    result["events"] = tab.events if tab else 0
                    result["event_bytes"] = tab.bytes if tab else 0
                    results[cell].append(result)
                    sys.stderr.write("round {} {}: {:.0f} calls/s\n".format(
                        round_index + 1, cell, result["rate"]))
        finally:
            if loadgen is not None:
                loadgen.close()
            os.killpg(engine.pid, signal.SIGTERM)
            engine.wait(10)

    args.load = os.getloadavg()
    report = render(results, cells, args)
    print(report)
    with open(args.out, "w") as f:
        f.write(report)


def render(results, cells, args):
    base = statistics.median(r["rate"] for r in results["none"])
    base_cpu = statistics.median(r["server_cpu_s"] / r["calls"] * 1e6 for r in results["none"])
    lines = [
        "# One open console under load",
        "",
        "`python bench/console.py --rounds {} --duration {}` on {} ({} cores), Python {}."
        .format(args.rounds, args.duration, platform.machine(), os.cpu_count(),
                platform.python_version()),
        "Engine: queue, observability (memory), console (push every {} s). Load: {} "
        "closed-loop callers, {} lean workers, 64-byte payloads (bench/loadgen.py). "
        "A console page is one EventSource-style client on `/api/events?page=...`. "
        "Median (min–max) over rounds; cells interleaved. Load average at the end: "
        "{:.1f} (the machine is shared: calls/s and latency move with it; the last two "
        "columns, timed inside the engine, do not).".format(
            args.push_interval, args.callers, args.workers, args.load[0]),
        "",
        "| console open | calls/s | vs none | p50 µs | p99 µs | engine CPU µs/call "
        "| pushes/s | push KiB/s | ms per page computation | console's share of a core |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        rows = results[cell]
        rate = statistics.median(r["rate"] for r in rows)
        cpu = [r["server_cpu_s"] / r["calls"] * 1e6 for r in rows]
        seconds = [r["seconds"] + args.warmup for r in rows]
        lines.append("| {} | {} | {:+.1f} % | {} | {} | {} | {} | {} | {} | {} |".format(
            cell, spread([r["rate"] for r in rows]), (rate / base - 1) * 100,
            spread([r["p50_us"] for r in rows]), spread([r["p99_us"] for r in rows]),
            spread(cpu, "{:.1f}"),
            spread([r["events"] / s for r, s in zip(rows, seconds)], "{:.2f}"),
            spread([r["event_bytes"] / 1024 / s for r, s in zip(rows, seconds)], "{:.1f}"),
            spread([r["render_ms"] for r in rows], "{:.2f}"),
            spread([r["share"] * 100 for r in rows], "{:.2f} %")))
    lines += ["", "Engine CPU per call with no console: {:.1f} µs.".format(base_cpu), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
