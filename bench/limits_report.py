#!/usr/bin/env python3
"""
Engine memory under a slow consumer (issue 14), before and after the send bounds.

A client stores a 1 MiB value, then sends N ``state::get`` of it and never reads its
socket. The engine's resident memory is sampled from /proc while it does, in two
configurations of the same build:

before
    the send bounds set out of reach (``send_buffer_soft``/``send_buffer_hard`` 1 TiB,
    no stall timeout): the engine buffers every answer, as it did before issue 14;
after
    the default limits (``send_buffer_soft`` 8 MiB, ``send_buffer_hard`` 128 MiB,
    ``send_stall_timeout_ms`` 60000; here 5000 so that a round ends sooner).

    python bench/limits_report.py                 # 3 rounds of 400 calls (~1 min)
    python bench/limits_report.py --calls 3000    # the issue's case (needs ~3.5 GB free)

Prints a table (peak growth of resident memory over the idle engine, median and range
over the rounds; whether the client was dropped) and writes it to
``bench/limits_report.md`` with ``--out``. Run it with the Python environment the
engine is installed in; the checkout comes first on the engine's PYTHONPATH.
"""

import argparse
import base64
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from ports import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MiB = 1024 * 1024

CONFIG = """
port: {port}
host: 127.0.0.1
# The bench's client receives any frame size (an unknown peer's default is 1 MiB).
worker_max_frame_size: 16777216
limits:
{limits}
modules:
  - class: modules::state::StateModule
    config:
      adapter:
        class: modules::state::adapters::KvStore
        config:
          store_method: in_memory
"""

SCENARIOS = [
    ("before (bounds off)", {"send_buffer_soft": 1 << 40, "send_buffer_hard": 1 << 40,
                             "send_stall_timeout_ms": 10 ** 9}),
    ("after (default limits)", {"send_stall_timeout_ms": 5000}),
]


def status(pid, field):
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise LookupError(field)


def frame(payload):
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload  # a zero mask: no XOR needed


def connect(port, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").format(key).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    return sock


def read_message(sock):
    def exactly(n):
        data = bytearray()
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return bytes(data)
    while True:
        b0, b1 = exactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", exactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", exactly(8))[0]
        payload = exactly(n)
        if b0 & 0x0F == 1:
            return json.loads(payload)


def one_round(limits, calls, seconds):
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="iii-limits-bench-")
    path = os.path.join(workdir, "iii-config.yaml")
    with open(path, "w") as f:
        f.write(CONFIG.format(port=port, limits="\n".join(
            "  {}: {}".format(k, v) for k, v in limits.items())))
    env = dict(os.environ, PYTHONPATH=CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(os.path.join(workdir, "engine.log"), "wb")
    engine = subprocess.Popen([TWISTD, "-n", "--pidfile=", "iii", "--config", path],
                              cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or engine.poll() is not None:
                    raise RuntimeError("the engine did not start; see " + log.name)
                time.sleep(0.05)
        writer = connect(port)
        read_message(writer)
        writer.sendall(frame(json.dumps({
            "type": "invokefunction", "invocation_id": "set", "function_id": "state::set",
            "data": {"scope": "s", "key": "big", "value": "v" * MiB}}).encode()))
        read_message(writer)
        time.sleep(0.5)  # let the engine settle before the baseline
        baseline = status(engine.pid, "VmRSS")
        slow = connect(port, rcvbuf=64 * 1024)
        flood = b"".join(frame(json.dumps({
            "type": "invokefunction", "invocation_id": "g{}".format(i),
            "function_id": "state::get", "data": {"scope": "s", "key": "big"}}).encode())
            for i in range(calls))
        threading.Thread(target=_send, args=(slow, flood), daemon=True).start()
        peak = baseline
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            peak = max(peak, status(engine.pid, "VmRSS"))
            time.sleep(0.1)
        with open(log.name, encoding="utf-8", errors="replace") as f:
            dropped = "it does not read" in f.read()
        final = status(engine.pid, "VmRSS")
        slow.close()
        writer.close()
        return (peak - baseline) / MiB, (final - baseline) / MiB, baseline / MiB, dropped
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(10)
        log.close()


def _send(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="how long each round samples the engine")
    parser.add_argument("--out", help="also write the report to this Markdown file")
    args = parser.parse_args()
    rows = []
    for name, limits in SCENARIOS:
        results = []
        for r in range(args.rounds):
            sys.stderr.write("{} round {}/{}...\n".format(name, r + 1, args.rounds))
            results.append(one_round(limits, args.calls, args.seconds))
        peaks = [p for p, _, _, _ in results]
        finals = [f for _, f, _, _ in results]
        rows.append("| {} | {:.0f} | {:.0f} | {:.0f}–{:.0f} | {:.0f} | {} |".format(
            name, statistics.median(r[2] for r in results), statistics.median(peaks),
            min(peaks), max(peaks), statistics.median(finals),
            "{}/{}".format(sum(1 for r in results if r[3]), len(results))))
    report = "\n".join([
        "# Engine memory under a slow consumer",
        "",
        "{} `state::get` of a 1 MiB value sent by a client that never reads; engine "
        "RSS sampled every 0.1 s for {:.0f} s; {} rounds per row; MiB.".format(
            args.calls, args.seconds, args.rounds),
        "",
        "| engine | idle RSS | peak growth (median) | peak growth (range) | "
        "growth at the end | client dropped |",
        "|---|---|---|---|---|---|",
    ] + rows) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
