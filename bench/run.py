#!/usr/bin/env python3
"""
The iii-twisted benchmark: our engine side by side with the Crossbar.io router, a
minimal Autobahn relay and a bare Autobahn echo, in one run. See bench/README.rst.

    python bench/run.py            # full run (~6 min on 2 cores)
    python bench/run.py --quick    # ~1 min

Run it with the Python environment the engine is installed in (its ``twistd`` is
used; the checkout comes first on the engine's PYTHONPATH). Crossbar, the load
generator's WAMP client, the official SDK and matplotlib live in a venv of their own,
``bench/.venv-crossbar``, created on the first run.
"""

import argparse
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv-crossbar")
# crossbar pinned for comparable runs; numpy<2 because crossbar's bjdata wheel is
# built against NumPy 1.
BENCH_REQUIREMENTS = ["crossbar==26.10.1", "numpy<2", "matplotlib", "iii-sdk==0.10.0"]

TARGET_NAMES = {
    "iii": "ours (iii-twisted)",
    "crossbar": "Crossbar.io",
    "crossbar-autobahn": "Crossbar.io, Autobahn client",
    "relay": "minimal relay",
    "echo": "Autobahn echo",
    "floor": "twisted.web echo",
}


def log(message):
    sys.stderr.write("\r\033[K" + message + "\n")
    sys.stderr.flush()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, process, timeout=60.0, what="server"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("{} exited with code {}".format(what, process.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)  # polling a port for readiness
    raise RuntimeError("{} did not listen on {} within {:.0f}s".format(what, port, timeout))


# -- the bench venv ------------------------------------------------------------------

def ensure_venv():
    """Create bench/.venv-crossbar with BENCH_REQUIREMENTS unless it is up to date."""
    python = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, ".bench-stamp")
    wanted = "\n".join(BENCH_REQUIREMENTS)
    if os.path.exists(stamp) and open(stamp).read() == wanted:
        return python
    log("creating {} ({}); this takes a minute or two".format(
        VENV, " ".join(BENCH_REQUIREMENTS)))
    if os.path.exists(VENV):
        shutil.rmtree(VENV)
    subprocess.check_call([sys.executable, "-m", "venv", VENV])
    with tempfile.TemporaryFile() as out:
        rc = subprocess.call([python, "-m", "pip", "install", "-q",
                              "--disable-pip-version-check"] + BENCH_REQUIREMENTS,
                             stdout=out, stderr=subprocess.STDOUT)
        if rc != 0:
            out.seek(0)
            sys.stderr.write(out.read().decode(errors="replace")[-3000:])
            raise SystemExit("installing the bench venv failed")
    with open(stamp, "w") as f:
        f.write(wanted)
    return python


# -- the systems under test ----------------------------------------------------------

class Servers:
    """Starts, holds and stops every server process (each in its own process group)."""

    def __init__(self, workdir, venv_python):
        self.workdir = workdir
        self.venv_python = venv_python
        self.processes = {}
        self.ports = {}
        self.has_rest_api = rest_api_available()

    def _spawn(self, name, cmd, env=None, cwd=None):
        out = open(os.path.join(self.workdir, name + ".log"), "ab")
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env,
                                   cwd=cwd or self.workdir, start_new_session=True)
        self.processes[name] = process
        return process

    def start(self):
        ports = self.ports
        ports.update(iii=free_port(), iii_http=free_port(), relay=free_port(),
                     echo=free_port(), floor=free_port(), crossbar=free_port(),
                     crossbar_http=free_port())
        modules = ""
        if self.has_rest_api:
            modules = ("\n  - class: modules::api::RestApiModule\n    config:\n"
                       "      host: 127.0.0.1\n      port: {}\n      default_timeout: 30000"
                       .format(ports["iii_http"]))
        config = os.path.join(self.workdir, "iii-config.yaml")
        with open(config, "w") as f:
            f.write("port: {}\nhost: 127.0.0.1\ninvocation_timeout_ms: 30000\nmodules:{}\n"
                    .format(ports["iii"], modules or " []"))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [CHECKOUT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self._spawn("iii", [twistd, "-n", "--pidfile=", "iii", "--config", config], env)
        servers = os.path.join(HERE, "servers.py")
        for kind in ("relay", "echo", "floor"):
            self._spawn(kind, [sys.executable, servers,
                               "http" if kind == "floor" else kind, str(ports[kind])])
        cbdir = os.path.join(self.workdir, "crossbar")
        os.makedirs(cbdir)
        with open(os.path.join(cbdir, "config.json"), "w") as f:
            json.dump(crossbar_config(ports["crossbar"], ports["crossbar_http"], cbdir), f)
        self._spawn("crossbar", [os.path.join(VENV, "bin", "crossbar"), "start",
                                 "--cbdir", cbdir, "--loglevel", "warn"], cwd=cbdir)
        waits = [("iii", "iii"), ("relay", "relay"), ("echo", "echo"), ("floor", "floor"),
                 ("crossbar", "crossbar"), ("crossbar", "crossbar_http")]
        if self.has_rest_api:
            waits.append(("iii", "iii_http"))
        for name, port in waits:
            wait_port(ports[port], self.processes[name], what=name)

    def pids(self, target):
        name = {"crossbar-autobahn": "crossbar"}.get(target, target)
        return [self.processes[name].pid]

    def check_alive(self):
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError("{} exited (code {}); see {}".format(
                    name, process.returncode, os.path.join(self.workdir, name + ".log")))

    def stop(self):
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def rest_api_available():
    sys.path.insert(0, CHECKOUT)
    try:
        from iii_twisted.modules import MODULE_CLASSES, load_module_factory
        load_module_factory("modules::api::RestApiModule")
        return "modules::api::RestApiModule" in MODULE_CLASSES
    except Exception:
        return False
    finally:
        sys.path.remove(CHECKOUT)


def crossbar_config(ws_port, http_port, cbdir):
    """One router worker: realm1 open to anonymous, a WAMP-over-WebSocket transport
    (JSON, no compression, as our engine) and a web transport with the HTTP caller."""
    return {
        "version": 2,
        "controller": {},
        "workers": [{
            "type": "router",
            "realms": [{"name": "realm1", "roles": [{"name": "anonymous", "permissions": [{
                "uri": "", "match": "prefix",
                "allow": {"call": True, "register": True, "publish": True,
                          "subscribe": True},
                "disclose": {"caller": False, "publisher": False}, "cache": True}]}]}],
            "transports": [
                {"type": "websocket",
                 "endpoint": {"type": "tcp", "port": ws_port, "interface": "127.0.0.1"},
                 "serializers": ["json"],
                 "options": {"auto_ping_interval": 0}},
                {"type": "web",
                 "endpoint": {"type": "tcp", "port": http_port, "interface": "127.0.0.1"},
                 "paths": {"/": {"type": "static", "directory": cbdir},
                           "call": {"type": "caller", "realm": "realm1",
                                    "role": "anonymous"}}},
            ],
        }],
    }


# -- the load generator ----------------------------------------------------------------

class Agent:
    """bench/loadgen.py in the bench venv, one JSON command per line."""

    def __init__(self, venv_python, workdir):
        self.cmd = [venv_python, os.path.join(HERE, "loadgen.py")]
        self.log = open(os.path.join(workdir, "loadgen.log"), "ab")
        self.process = None

    def _start(self):
        self.process = subprocess.Popen(self.cmd, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.log,
                                        start_new_session=True)

    def run(self, command, timeout):
        if self.process is None or self.process.poll() is not None:
            self._start()
        command = dict(command, timeout=timeout)
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout + 15)
        if not ready:
            self.stop()
            return {"error": "load generator did not answer within {}s".format(timeout)}
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            return {"error": "load generator exited"}
        return json.loads(line)

    def stop(self):
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            self.process = None


# -- the plan --------------------------------------------------------------------------

def plan(args, has_rest_api):
    """
    @return: (sections, cells): cells is a list of (section, key, target, command)
        for one round.
    """
    quick = args.quick
    window = {"warmup": 0.2 if quick else 0.3, "duration": 0.5 if quick else 1.5}
    cells = []

    def calls(section, key, targets, callers, workers, payload, duration=None):
        for target in targets:
            cmd = dict(window, op="calls", target=target, callers=callers,
                       workers=workers, payload=payload)
            if duration:
                cmd["duration"] = duration
            cells.append((section, key, target, cmd))

    routed = ["iii", "crossbar", "relay"]
    calls("latency", "1x1", routed + ["crossbar-autobahn", "echo"], 1, 1, 70,
          0.7 if quick else 2.0)
    matrix = [(1, 1), (4, 4), (16, 16)] if quick else [
        (c, w) for c in (1, 4, 16) for w in (1, 4, 16)]
    for c, w in matrix:
        calls("throughput", "{}x{}".format(c, w), routed, c, w, 70)
        if (c, w) in ((1, 1), (4, 4), (16, 16)):
            calls("throughput", "{}x{}".format(c, w), ["crossbar-autobahn"], c, w, 70)
    for c in (1, 4, 16):  # the echo has no workers: one cell per number of callers
        calls("throughput", "{}x*".format(c), ["echo"], c, 1, 70)
    for size in (1024, 10240, 102400):
        calls("payload", str(size), routed + ["echo"], 4, 4, size)
    for n in (1, 16, 64):
        for target in (["iii"] if has_rest_api else []) + ["crossbar", "floor"]:
            cells.append(("http", str(n), target, dict(
                window, op="http", target=target, connections=n, payload=70)))
    return cells


def port_for(servers, target, op):
    ports = servers.ports
    if op == "http":
        return {"iii": (ports["iii_http"], ports["iii"]),
                "crossbar": (ports["crossbar_http"], ports["crossbar"]),
                "floor": (ports["floor"], None)}[target]
    return {"iii": ports["iii"], "crossbar": ports["crossbar"],
            "crossbar-autobahn": ports["crossbar"], "relay": ports["relay"],
            "echo": ports["echo"]}[target], None


def interleave(cells, round_index):
    """Rotate the order of targets within each group of cells by the round number."""
    groups, order = {}, []
    for cell in cells:
        key = (cell[0], cell[1])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(cell)
    result = []
    for key in order:
        group = groups[key]
        shift = round_index % len(group)
        result.extend(group[shift:] + group[:shift])
    return result


def fmt_duration(seconds):
    return "{}m{:02d}s".format(int(seconds // 60), int(seconds % 60))


def run_rounds(args, servers, agent):
    cells = plan(args, servers.has_rest_api)
    results = {}
    total = len(cells) * args.rounds
    done = 0
    started = time.monotonic()
    for r in range(args.rounds):
        for section, key, target, cmd in interleave(cells, r):
            servers.check_alive()
            elapsed = time.monotonic() - started
            eta = elapsed / done * (total - done) if done else 0
            sys.stderr.write("\r\033[K[{:3d}/{}] round {}/{}  {:<10} {:<6} {:<18} "
                             "elapsed {}  eta {}".format(
                                 done + 1, total, r + 1, args.rounds, section, key, target,
                                 fmt_duration(elapsed), fmt_duration(eta)))
            sys.stderr.flush()
            port, ws_port = port_for(servers, target, cmd["op"])
            command = dict(cmd, port=port, ws_port=ws_port, cpu_pids=servers.pids(
                {"floor": "floor"}.get(target, target)))
            result = agent.run(command, timeout=cmd["warmup"] + cmd["duration"] + 30)
            if "error" in result:
                log("{} {} {}: {}".format(section, key, target, result["error"]))
            results.setdefault(section, {}).setdefault(key, {}).setdefault(
                target, []).append(result)
            done += 1
    sys.stderr.write("\r\033[K")
    return results


def run_sdk_check(args, servers, venv_python):
    sys.stderr.write("\r\033[Kofficial SDK check ...")
    sys.stderr.flush()
    cmd = [venv_python, os.path.join(HERE, "sdk_check.py"),
           "ws://127.0.0.1:{}".format(servers.ports["iii"]),
           str(200 if args.quick else 1000), str(0.5 if args.quick else 2.0),
           str(servers.processes["iii"].pid)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=120, text=True)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    sys.stderr.write("\r\033[K")
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the report ------------------------------------------------------------------------

def values(results, section, key, target, field):
    runs = results.get(section, {}).get(key, {}).get(target, [])
    return [r[field] for r in runs if "error" not in r and r.get(field) is not None]


def med(xs):
    return statistics.median(xs) if xs else None


def cpu_per_call(results, section, key, target):
    runs = [r for r in results.get(section, {}).get(key, {}).get(target, [])
            if "error" not in r and r["calls"]]
    return [r["server_cpu_s"] / r["calls"] * 1e6 for r in runs]


def cell(xs, digits=0):
    """median (min-max) of a list, or a dash."""
    if not xs:
        return "–"
    f = "{:,.%df}" % digits
    text = f.format(med(xs))
    if len(xs) > 1:
        text += " ({}–{})".format(f.format(min(xs)), f.format(max(xs)))
    return text


def ratio(a, b, digits=2):
    if not a or not b:
        return "–"
    return "{:.{}f}×".format(med(a) / med(b), digits)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def versions(venv_python):
    import autobahn
    import twisted
    try:
        crossbar = subprocess.run(
            [venv_python, "-c", "import crossbar; print(crossbar.__version__)"],
            capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:
        crossbar = "?"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"python": platform.python_version(), "twisted": twisted.__version__,
            "autobahn": autobahn.__version__, "crossbar": crossbar, "cpu": cpu,
            "cores": os.cpu_count()}


def report(args, results, sdk, info, has_rest_api):
    r = results
    lines = ["# iii-twisted benchmark", ""]
    lines.append(
        "{} on {} ({} cores); Python {}, Twisted {}, Autobahn {}, Crossbar.io {}. "
        "{} round(s), interleaved; each cell {:.1f} s after a {:.1f} s warm-up. "
        "Values: median over rounds (min–max). Loopback only.".format(
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), info["cpu"],
            info["cores"], info["python"], info["twisted"], info["autobahn"],
            info["crossbar"], args.rounds, 0.5 if args.quick else 1.5,
            0.2 if args.quick else 0.3))
    lines += ["", "Systems: **ours** = iii-twisted (`twistd iii`, core + REST API module); "
              "**Crossbar** = Crossbar.io router (WAMP RPC, JSON serializer; lean WAMP "
              "client unless marked *Autobahn client*); **relay** = bare Autobahn server "
              "forwarding each frame to a worker and back, no parsing (the cost of carrying "
              "a call in Python); **echo** = bare Autobahn echo (one frame each way: the "
              "floor of a round trip). Same load generator for all (bench/loadgen.py).", ""]

    # targets
    lat = values(r, "latency", "1x1", "iii", "p50_us")
    ours4 = values(r, "throughput", "4x4", "iii", "rate")
    xb4 = values(r, "throughput", "4x4", "crossbar", "rate")
    cpu_ours = cpu_per_call(r, "throughput", "4x4", "iii")
    cpu_relay = cpu_per_call(r, "throughput", "4x4", "relay")
    lines += ["## Targets", "", table(["target", "measured", "met"], [
        ["sequential p50 < 1 ms", "{} µs".format(cell(lat)),
         "yes" if lat and med(lat) < 1000 else "no"],
        ["throughput, 4 callers × 4 workers ≥ 1.5× Crossbar",
         ratio(ours4, xb4), "yes" if ours4 and xb4 and med(ours4) >= 1.5 * med(xb4)
         else "no"],
        ["engine CPU per routed call ≤ 2× minimal relay (4 × 4)",
         "{} vs {} µs = {}".format(cell(cpu_ours), cell(cpu_relay),
                                    ratio(cpu_ours, cpu_relay)),
         "yes" if cpu_ours and cpu_relay and med(cpu_ours) <= 2 * med(cpu_relay)
         else "no"],
    ]), ""]

    # latency
    rows = []
    for t in ("iii", "crossbar", "crossbar-autobahn", "relay", "echo"):
        rows.append([TARGET_NAMES[t], cell(values(r, "latency", "1x1", t, "p50_us")),
                     cell(values(r, "latency", "1x1", t, "p99_us")),
                     cell(values(r, "latency", "1x1", t, "rate"))])
    lines += ["## Sequential call latency (1 caller, 1 worker, 70 B)", "",
              table(["system", "p50 µs", "p99 µs", "calls/s"], rows), "",
              "p50 ours ÷ Crossbar: {}; ours ÷ echo: {}.".format(
                  ratio(lat, values(r, "latency", "1x1", "crossbar", "p50_us")),
                  ratio(lat, values(r, "latency", "1x1", "echo", "p50_us"))), ""]

    # throughput
    rows = []
    for key in r.get("throughput", {}):
        if key.endswith("*"):
            continue
        c = key.split("x")[0]
        ours = values(r, "throughput", key, "iii", "rate")
        xb = values(r, "throughput", key, "crossbar", "rate")
        relay = values(r, "throughput", key, "relay", "rate")
        echo = values(r, "throughput", c + "x*", "echo", "rate")
        rows.append([key.replace("x", " × "), cell(ours), cell(xb),
                     cell(values(r, "throughput", key, "crossbar-autobahn", "rate")),
                     cell(relay), cell(echo), ratio(ours, xb), ratio(ours, relay),
                     ratio(ours, echo)])
    lines += ["## Throughput, calls/s (70 B; callers × workers, one call in flight per "
              "caller)", "",
              table(["callers × workers", "ours", "Crossbar", "Crossbar (Autobahn client)",
                     "relay", "echo (callers only)", "ours ÷ Crossbar", "ours ÷ relay",
                     "ours ÷ echo"], rows), ""]

    # CPU per call
    rows = []
    for key in r.get("throughput", {}):
        if key.endswith("*"):
            continue
        c = key.split("x")[0]
        ours = cpu_per_call(r, "throughput", key, "iii")
        rows.append([key.replace("x", " × "), cell(ours),
                     cell(cpu_per_call(r, "throughput", key, "crossbar")),
                     cell(cpu_per_call(r, "throughput", key, "relay")),
                     cell(cpu_per_call(r, "throughput", c + "x*", "echo")),
                     ratio(ours, cpu_per_call(r, "throughput", key, "relay")),
                     ratio(ours, cpu_per_call(r, "throughput", key, "crossbar"))])
    lines += ["## Server CPU per routed call, µs (from /proc/<pid>/stat, whole process "
              "tree)", "",
              table(["callers × workers", "ours", "Crossbar router", "relay",
                     "echo (per round trip)", "ours ÷ relay", "ours ÷ Crossbar"], rows), ""]

    # payloads
    rows = []
    for size, key in [(70, "4x4")] + [(s, str(s)) for s in (1024, 10240, 102400)]:
        section = "throughput" if size == 70 else "payload"
        ours = values(r, section, key, "iii", "rate")
        xb = values(r, section, key, "crossbar", "rate")
        echo_key = "4x*" if size == 70 else key
        echo = values(r, section, echo_key, "echo", "rate")
        rows.append(["{:,} B".format(size), cell(ours), cell(xb),
                     cell(values(r, section, key, "relay", "rate")), cell(echo),
                     ratio(ours, xb), ratio(ours, echo),
                     cell(cpu_per_call(r, section, key, "iii"))])
    lines += ["## Payload size (4 callers × 4 workers), calls/s", "",
              table(["payload", "ours", "Crossbar", "relay", "echo", "ours ÷ Crossbar",
                     "ours ÷ echo", "ours CPU µs/call"], rows), ""]

    # http
    lines += ["## HTTP request to function (70 B JSON POST, keep-alive, one request in "
              "flight per connection), requests/s", ""]
    if not has_rest_api:
        lines += ["*Skipped for our engine: `modules::api::RestApiModule` is not in this "
                  "checkout yet.*", ""]
    rows = []
    for n in (1, 16, 64):
        key = str(n)
        ours = values(r, "http", key, "iii", "rate")
        xb = values(r, "http", key, "crossbar", "rate")
        floor = values(r, "http", key, "floor", "rate")
        rows.append([n, cell(ours), cell(values(r, "http", key, "iii", "p50_us")),
                     cell(xb), cell(floor), ratio(ours, xb), ratio(ours, floor)])
    lines += [table(["connections", "ours", "ours p50 µs", "Crossbar HTTP caller",
                     "twisted.web echo", "ours ÷ Crossbar", "ours ÷ floor"], rows), ""]

    # sdk
    lines += ["## Official Python SDK (iii-sdk 0.10.0) against our engine", ""]
    if "error" in sdk:
        lines += ["Failed: {}".format(sdk["error"]), ""]
    else:
        lines += [table(["measure", "value"], [
            ["sequential p50 / p99 µs ({} calls)".format(sdk["sequential_calls"]),
             "{:,.0f} / {:,.0f}".format(sdk["p50_us"], sdk["p99_us"])],
            ["calls/s, 1 caller", "{:,.0f}".format(sdk["threads_1"]["rate"])],
            ["calls/s, 4 callers (threads, one process)",
             "{:,.0f}".format(sdk["threads_4"]["rate"])],
            ["engine CPU µs per call, 4 callers", "{:,.0f}".format(
                sdk["threads_4"]["server_cpu_us_per_call"] or 0)],
        ]), "", "The SDK client (threads, GIL) is the bottleneck here; the lean "
            "load generator above measures the engine.", ""]

    # errors and client load
    errors = sum(x.get("errors", 0) for s in r.values() for k in s.values()
                 for t in k.values() for x in t)
    failed = [(sec, key, t, x["error"]) for sec, s in r.items() for key, k in s.items()
              for t, xs in k.items() for x in xs if "error" in x]
    client = [x["client_cpu_s"] / x["seconds"] for s in r.values() for k in s.values()
              for t in k.values() for x in t if "error" not in x]
    lines += ["## Run health", "",
              "Call errors: {}. Failed cells: {}. Load generator CPU: median {:.0%}, "
              "max {:.0%} of one core.".format(
                  errors, len(failed), med(client) or 0, max(client) if client else 0)]
    for sec, key, t, e in failed:
        lines.append("- {} {} {}: {}".format(sec, key, t, e))
    lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (~1 min)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "report.md"),
                        help="Markdown report (a .png plot is written beside it)")
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    # Before the run, not after it: a report path that cannot be written loses nothing.
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    started = time.monotonic()
    venv_python = ensure_venv()
    workdir = tempfile.mkdtemp(prefix="iii-bench.")
    servers = Servers(workdir, venv_python)
    agent = Agent(venv_python, workdir)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    try:
        if not servers.has_rest_api:
            log("note: modules::api::RestApiModule is not available: the HTTP section "
                "runs without our engine")
        log("starting servers (logs in {})".format(workdir))
        servers.start()
        results = run_rounds(args, servers, agent)
        sdk = run_sdk_check(args, servers, venv_python)
    finally:
        agent.stop()
        servers.stop()
    info = versions(venv_python)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    raw = os.path.join(HERE, "results", "latest.json")
    with open(raw, "w") as f:
        json.dump({"results": results, "sdk": sdk, "info": info, "quick": args.quick,
                   "rounds": args.rounds}, f, indent=1)
    text = report(args, results, sdk, info, servers.has_rest_api)
    png = os.path.splitext(args.out)[0] + ".png"
    plot = subprocess.run([venv_python, os.path.join(HERE, "plot.py"), raw, png],
                          capture_output=True, text=True)
    if plot.returncode == 0:
        text += "\n![benchmark]({})\n".format(os.path.basename(png))
    else:
        log("plot failed: {}".format(plot.stderr.strip()[-500:]))
    with open(args.out, "w") as f:
        f.write(text)
    shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    log("report: {} (raw results {}) in {}".format(
        args.out, raw, fmt_duration(time.monotonic() - started)))


if __name__ == "__main__":
    main()
