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
import statistics
import subprocess
import sys
import tempfile
import time

from ports import free_port, wait_port

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv-crossbar")
# crossbar pinned for comparable runs; numpy<2 because crossbar's bjdata wheel is
# built against NumPy 1.
BENCH_REQUIREMENTS = ["crossbar==26.10.1", "numpy<2", "matplotlib", "iii-sdk==0.10.0"]

TARGET_NAMES = {
    "iii": "ours (iii-twisted), CPython",
    "iii-pypy": "ours on PyPy",
    "crossbar": "Crossbar.io",
    "crossbar-autobahn": "Crossbar.io, Autobahn client",
    "relay": "minimal relay",
    "echo": "Autobahn echo",
    "floor": "twisted.web echo",
}


def log(message):
    sys.stderr.write("\r\033[K" + message + "\n")
    sys.stderr.flush()


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
    _pip_install(python, BENCH_REQUIREMENTS, "installing the bench venv failed")
    with open(stamp, "w") as f:
        f.write(wanted)
    return python


def _pip_install(python, requirements, failure):
    """pip install C{requirements} with C{python}; on failure, show pip's output's end."""
    with tempfile.TemporaryFile() as out:
        rc = subprocess.call([python, "-m", "pip", "install", "-q",
                              "--disable-pip-version-check"] + requirements,
                             stdout=out, stderr=subprocess.STDOUT)
        if rc != 0:
            out.seek(0)
            sys.stderr.write(out.read().decode(errors="replace")[-3000:])
            raise SystemExit(failure)


PYPY_VENV = os.path.join(HERE, ".venv-pypy")


def ensure_pypy(requested):
    """
    @param requested: a PyPy venv's python, ``"none"``, or None for
        bench/.venv-pypy (created from Debian's ``pypy3`` with this checkout's
        dependencies when missing).
    @return: the python to run the engine on PyPy with, or None (with a note) when
        there is none.
    """
    if requested == "none":
        return None
    if requested:
        return requested
    python = os.path.join(PYPY_VENV, "bin", "python")
    stamp = os.path.join(PYPY_VENV, ".bench-stamp")
    with open(os.path.join(CHECKOUT, "setup.cfg")) as f:
        wanted = f.read()
    if os.path.exists(stamp) and open(stamp).read() == wanted:
        return python
    pypy3 = shutil.which("pypy3")
    if pypy3 is None:
        log("note: no pypy3 on PATH (apt-get install pypy3 pypy3-venv): PyPy not measured")
        return None
    log("creating {} from {}; a minute or two".format(PYPY_VENV, pypy3))
    if os.path.exists(PYPY_VENV):
        shutil.rmtree(PYPY_VENV)
    subprocess.check_call([pypy3, "-m", "venv", PYPY_VENV])
    _pip_install(python, [CHECKOUT], "installing the engine into the PyPy venv failed")
    with open(stamp, "w") as f:
        f.write(wanted)
    return python


# -- the systems under test ----------------------------------------------------------

class Servers:
    """Starts, holds and stops every server process (each in its own process group)."""

    def __init__(self, workdir, venv_python, pypy_python=None, systems=None):
        self.workdir = workdir
        self.venv_python = venv_python
        self.pypy_python = pypy_python
        self.systems = systems
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

    def wanted(self, name):
        return self.systems is None or name in self.systems

    def start(self):
        ports = self.ports
        ports.update(iii=free_port(), iii_http=free_port(), relay=free_port(),
                     echo=free_port(), floor=free_port(), crossbar=free_port(),
                     crossbar_http=free_port(), iii_pypy=free_port(),
                     iii_pypy_http=free_port())
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [CHECKOUT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        waits = []
        engines = [("iii", sys.executable, "iii", "iii_http")]
        if self.pypy_python:
            engines.append(("iii-pypy", self.pypy_python, "iii_pypy", "iii_pypy_http"))
        for name, python, ws, http in engines:
            if not self.wanted(name):
                continue
            modules = ""
            if self.has_rest_api:
                modules = ("\n  - class: modules::api::RestApiModule\n    config:\n"
                           "      host: 127.0.0.1\n      port: {}\n"
                           "      default_timeout: 30000".format(ports[http]))
            config = os.path.join(self.workdir, name + "-config.yaml")
            with open(config, "w") as f:
                # The scale section opens 1,000+ connections from 127.0.0.1 (the
                # default allows 512 per address).
                f.write("port: {}\nhost: 127.0.0.1\ninvocation_timeout_ms: 30000\n"
                        "limits:\n  max_connections_per_address: 4096\n"
                        "modules:{}\n".format(ports[ws], modules or " []"))
            twistd = os.path.join(os.path.dirname(python), "twistd")
            self._spawn(name, [twistd, "-n", "--pidfile=", "iii", "--config", config], env)
            waits.append((name, ws))
            if self.has_rest_api:
                waits.append((name, http))
        servers = os.path.join(HERE, "servers.py")
        for kind in ("relay", "echo", "floor"):
            if self.wanted(kind):
                self._spawn(kind, [sys.executable, servers,
                                   "http" if kind == "floor" else kind, str(ports[kind])])
                waits.append((kind, kind))
        if self.wanted("crossbar"):
            cbdir = os.path.join(self.workdir, "crossbar")
            os.makedirs(cbdir)
            with open(os.path.join(cbdir, "config.json"), "w") as f:
                json.dump(crossbar_config(ports["crossbar"], ports["crossbar_http"], cbdir), f)
            self._spawn("crossbar", [os.path.join(VENV, "bin", "crossbar"), "start",
                                     "--cbdir", cbdir, "--loglevel", "warn"], cwd=cbdir)
            waits += [("crossbar", "crossbar"), ("crossbar", "crossbar_http")]
        for name, port in waits:
            wait_port(ports[port], self.processes[name], timeout=60.0, what=name)

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

def plan(args, has_rest_api, systems):
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

    engines = [t for t in ("iii", "iii-pypy") if t in systems]
    routed = engines + [t for t in ("crossbar", "relay") if t in systems]
    calls("latency", "1x1", routed + [t for t in ("crossbar-autobahn", "echo")
                                      if t in systems], 1, 1, 70, 0.7 if quick else 2.0)
    # The routed-call throughput of the targets: 4 callers, 16 calls in flight each.
    for target in routed + [t for t in ("echo",) if t in systems]:
        cells.append(("pipelined", "4x4x16", target, dict(
            window, op="calls", target=target, callers=4, workers=4, payload=70,
            inflight=16)))
    matrix = [(1, 1), (4, 4), (16, 16)] if quick else [
        (c, w) for c in (1, 4, 16) for w in (1, 4, 16)]
    for c, w in matrix:
        calls("throughput", "{}x{}".format(c, w), routed, c, w, 70)
        if (c, w) in ((1, 1), (4, 4), (16, 16)) and "crossbar-autobahn" in systems:
            calls("throughput", "{}x{}".format(c, w), ["crossbar-autobahn"], c, w, 70)
    if "echo" in systems:
        for c in (1, 4, 16):  # the echo has no workers: one cell per number of callers
            calls("throughput", "{}x*".format(c), ["echo"], c, 1, 70)
    for size in (1024, 10240, 102400):
        calls("payload", str(size), routed + [t for t in ("echo",) if t in systems],
              4, 4, size)
    for n in (1, 16, 64):
        for target in (engines if has_rest_api else []) + [
                t for t in ("crossbar", "floor") if t in systems]:
            cells.append(("http", str(n), target, dict(
                window, op="http", target=target, connections=n, payload=70)))
    if args.sections:
        cells = [c for c in cells if c[0] in args.sections]
    return cells


def running_systems(servers):
    """@return: the targets whose server runs (crossbar counts for both clients)."""
    names = set(servers.processes)
    if "crossbar" in names:
        names.add("crossbar-autobahn")
    return names


def run_warmup(args, servers, agent):
    """
    Load each engine for C{args.jit_warmup} seconds before the rounds, in 1 s steps
    alternating pipelined calls (4 callers x 16 in flight) and HTTP (16 connections),
    so that PyPy's JIT has compiled the hot path before anything is measured (CPython
    gets the same, for fairness).

    @return: C{{target: {"calls": [rate per step], "http": [...]}}}.
    """
    warm = {}
    steps = max(1, int(round(args.jit_warmup / 2.0)))
    for target in ("iii", "iii-pypy"):
        if target not in servers.processes:
            continue
        rates = warm[target] = {"calls": [], "http": []}
        for i in range(steps):
            sys.stderr.write("\r\033[KJIT warm-up {} {}/{}".format(target, i + 1, steps))
            sys.stderr.flush()
            for op, key, extra in (("calls", "calls", dict(callers=4, workers=4, inflight=16)),
                                   ("http", "http", dict(connections=16))):
                if op == "http" and not servers.has_rest_api:
                    continue
                port, ws_port = port_for(servers, target, op)
                cmd = dict(extra, op=op, target=target, payload=70, warmup=0.0,
                           duration=1.0, port=port, ws_port=ws_port,
                           cpu_pids=servers.pids(target))
                result = agent.run(cmd, timeout=40)
                rates[key].append(result.get("rate"))
    sys.stderr.write("\r\033[K")
    return warm


SCALE_STEPS = [{"idle": 1}, {"idle": 100}, {"idle": 1000},
               {"idle": 1000, "functions": 10000}]


def run_scale(args, servers, agent):
    """
    Idle workers and registered functions against each engine (loadgen ``scale``).

    @return: C{{target: [step, ...]}} (or C{{target: {"error": ...}}}).
    """
    scale = {}
    for target in ("iii", "iii-pypy"):
        if target not in servers.processes:
            continue
        sys.stderr.write("\r\033[Kscale {} ...".format(target))
        sys.stderr.flush()
        cmd = dict(op="scale", target=target, port=port_for(servers, target, "calls")[0],
                   cpu_pids=servers.pids(target), steps=SCALE_STEPS,
                   idle_seconds=1.0 if args.quick else 2.0,
                   warmup=0.2, duration=0.5 if args.quick else 1.0, payload=70)
        result = agent.run(cmd, timeout=600)
        scale[target] = result.get("steps", result)
    sys.stderr.write("\r\033[K")
    return scale


def _each_python(pythons, what, script, arguments):
    """
    Run bench/C{script} on each engine's Python; its last output line is its JSON answer.

    @param pythons: C{{target: python}}.
    @param arguments: C{arguments(target)} gives the script's arguments.
    @return: C{{target: its JSON answer}} (or C{{"error": ...}}).
    """
    found = {}
    for target, python in pythons.items():
        sys.stderr.write("\r\033[K{}, {} ...".format(what, target))
        sys.stderr.flush()
        cmd = [python, os.path.join(HERE, script)] + arguments(target)
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            found[target] = json.loads(out.stdout.strip().splitlines()[-1]) \
                if out.returncode == 0 else {"error": out.stderr.strip()[-300:]}
        except Exception as e:
            found[target] = {"error": str(e)}
    sys.stderr.write("\r\033[K")
    return found


def run_hotpath(args, pythons):
    """bench/hotpath.py on each engine's Python: CPU per routed call without sockets."""
    return _each_python(pythons, "hot path without sockets", "hotpath.py", lambda target: [
        "--rounds", "3", "--calls", "5000" if args.quick else "20000",
        "--warmup", "30000" if "pypy" in target else "3000"])


def run_http_hotpath(args, pythons):
    """
    bench/http_hotpath.py on each engine's Python: CPU per HTTP request to a function
    without sockets.
    """
    return _each_python(pythons, "HTTP path without sockets", "http_hotpath.py", lambda target: [
        "--rounds", "3", "--requests", "3000" if args.quick else "10000",
        "--warmup", "20000" if "pypy" in target else "2000"])


def port_for(servers, target, op):
    ports = servers.ports
    if op == "http":
        return {"iii": (ports["iii_http"], ports["iii"]),
                "iii-pypy": (ports["iii_pypy_http"], ports["iii_pypy"]),
                "crossbar": (ports["crossbar_http"], ports["crossbar"]),
                "floor": (ports["floor"], None)}[target]
    return {"iii": ports["iii"], "iii-pypy": ports["iii_pypy"], "crossbar": ports["crossbar"],
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
    cells = plan(args, servers.has_rest_api, running_systems(servers))
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

def usable(run):
    """A cell that ran, and whose calls (nearly) all succeeded."""
    return "error" not in run and run.get("errors", 0) <= 0.01 * max(run.get("calls", 0), 1)


def values(results, section, key, target, field):
    runs = results.get(section, {}).get(key, {}).get(target, [])
    return [r[field] for r in runs if usable(r) and r.get(field) is not None]


def med(xs):
    return statistics.median(xs) if xs else None


def cpu_per_call(results, section, key, target):
    runs = [r for r in results.get(section, {}).get(key, {}).get(target, [])
            if usable(r) and r["calls"]]
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


def versions(venv_python, pypy_python=None):
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
    pypy = None
    if pypy_python:
        try:
            pypy = subprocess.run(
                [pypy_python, "-c", "import sys, platform, twisted, autobahn; print("
                 "'PyPy {} (Python {}), Twisted {}, Autobahn {}'.format('.'.join(map(str, "
                 "sys.pypy_version_info[:3])), platform.python_version(), "
                 "twisted.__version__, autobahn.__version__))"],
                capture_output=True, text=True, timeout=60).stdout.strip()
        except Exception:
            pypy = "?"
    return {"pypy": pypy, "python": platform.python_version(), "twisted": twisted.__version__,
            "autobahn": autobahn.__version__, "crossbar": crossbar, "cpu": cpu,
            "cores": os.cpu_count()}


def kib_cell(xs):
    return cell([x / 1024.0 for x in xs if x is not None], 0) + " MiB" if xs else "–"


def report(args, results, sdk, info, has_rest_api, warm=None, scale=None, hot=None,
           http_hot=None):
    r = results
    warm = warm or {}
    scale = scale or {}
    hot = hot or {}
    pypy = "iii-pypy" in info.get("systems", ())
    lines = ["# iii-twisted benchmark", ""]
    lines.append(
        "{} on {} ({} cores); Python {}, Twisted {}, Autobahn {}, Crossbar.io {}{}. "
        "{} round(s), interleaved; each cell {:.1f} s after a {:.1f} s warm-up. "
        "Values: median over rounds (min–max). Loopback only.".format(
            time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), info["cpu"],
            info["cores"], info["python"], info["twisted"], info["autobahn"],
            info["crossbar"],
            "; PyPy engine: {}".format(info["pypy"]) if pypy else "",
            args.rounds, 0.5 if args.quick else 1.5, 0.2 if args.quick else 0.3))
    load = info.get("loadavg")
    if load:
        lines += ["", "Machine load (1-minute load average, {} cores): {:.1f} at the start, "
                  "{:.1f} at the end.{}".format(
                      info["cores"], load[0], load[1],
                      " **The machine was shared with other jobs during this run: "
                      "absolute figures are disturbed; compare the ratios between "
                      "systems, measured in the same interleaved rounds.**"
                      if max(load) > 1.0 else "")]
    lines += ["", "Systems: **ours** = iii-twisted (`twistd iii`, core + REST API module) on "
              "CPython and, as **ours on PyPy**, the same checkout under PyPy; "
              "**Crossbar** = Crossbar.io router (WAMP RPC, JSON serializer; lean WAMP "
              "client unless marked *Autobahn client*); **relay** = bare Autobahn server "
              "forwarding each frame to a worker and back, no parsing (the cost of carrying "
              "a call in Python); **echo** = bare Autobahn echo (one frame each way: the "
              "floor of a round trip). Same load generator for all (bench/loadgen.py).", ""]

    # targets
    lat = values(r, "latency", "1x1", "iii", "p50_us")
    lat_pypy = values(r, "latency", "1x1", "iii-pypy", "p50_us")
    ours = values(r, "pipelined", "4x4x16", "iii", "rate")
    ours_pypy = values(r, "pipelined", "4x4x16", "iii-pypy", "rate")
    xb = values(r, "pipelined", "4x4x16", "crossbar", "rate")

    def met(ok):
        return "yes" if ok else "no"

    rows = [
        ["CPython: routed calls/s (4 callers × 16 in flight) ≥ 2× Crossbar",
         ratio(ours, xb), met(ours and xb and med(ours) >= 2 * med(xb))]]
    for n in (1, 16, 64):
        o = values(r, "http", str(n), "iii", "rate")
        x = values(r, "http", str(n), "crossbar", "rate")
        rows.append(["CPython: HTTP to function, {} connection(s) ≥ 1.5× Crossbar's HTTP "
                     "bridge".format(n), ratio(o, x), met(o and x and med(o) >= 1.5 * med(x))])
    if pypy:
        rows += [
            ["PyPy: routed calls/s ≥ 2× CPython's", ratio(ours_pypy, ours),
             met(ours_pypy and ours and med(ours_pypy) >= 2 * med(ours))],
            ["PyPy: sequential p50 < 300 µs", "{} µs".format(cell(lat_pypy)),
             met(lat_pypy and med(lat_pypy) < 300)]]
    rows.append(["sequential p50 < 1 ms (CPython)", "{} µs".format(cell(lat)),
                 met(lat and med(lat) < 1000)])
    lines += ["## Targets", "", table(["target", "measured", "met"], rows), ""]

    engines = ["iii"] + (["iii-pypy"] if pypy else [])

    # JIT warm-up
    if warm:
        rows = []
        for t in engines:
            w = warm.get(t, {})
            for key, label in (("calls", "calls/s, 4 callers × 16 in flight"),
                               ("http", "HTTP requests/s, 16 connections")):
                if w.get(key):
                    rows.append([TARGET_NAMES[t], label] + [
                        "{:,.0f}".format(x) if x else "–" for x in w[key]])
        n = max((len(w.get("calls", [])) for w in warm.values()), default=0)
        lines += ["## JIT warm-up (before the rounds)", "",
                  "Each engine was loaded for {} s before anything was measured, in 1 s "
                  "steps alternating pipelined calls and HTTP requests: the rate of each "
                  "step, in order. PyPy compiles the hot path during the first steps; the "
                  "rounds below start after the last one.".format(2 * n), "",
                  table(["system", "load"] + ["step {}".format(i + 1) for i in range(n)],
                        rows), ""]

    # latency
    rows = []
    for t in engines + ["crossbar", "crossbar-autobahn", "relay", "echo"]:
        rows.append([TARGET_NAMES[t], cell(values(r, "latency", "1x1", t, "p50_us")),
                     cell(values(r, "latency", "1x1", t, "p99_us")),
                     cell(values(r, "latency", "1x1", t, "rate"))])
    lines += ["## Sequential call latency (1 caller, 1 worker, 70 B)", "",
              table(["system", "p50 µs", "p99 µs", "calls/s"], rows), "",
              "p50 ours ÷ Crossbar: {}; ours ÷ echo: {}{}.".format(
                  ratio(lat, values(r, "latency", "1x1", "crossbar", "p50_us")),
                  ratio(lat, values(r, "latency", "1x1", "echo", "p50_us")),
                  "; ours on PyPy ÷ ours on CPython: {}".format(ratio(lat_pypy, lat))
                  if pypy else ""), ""]

    # pipelined
    rows = []
    for t in engines + ["crossbar", "relay", "echo"]:
        rate = values(r, "pipelined", "4x4x16", t, "rate")
        rows.append([TARGET_NAMES[t], cell(rate),
                     cell(values(r, "pipelined", "4x4x16", t, "p50_us")),
                     cell(values(r, "pipelined", "4x4x16", t, "p99_us")),
                     cell(cpu_per_call(r, "pipelined", "4x4x16", t)),
                     kib_cell(values(r, "pipelined", "4x4x16", t, "server_rss_kib")),
                     ratio(rate, ours)])
    lines += ["## Routed calls, 4 callers × 16 calls in flight (4 workers, 70 B)", "",
              table(["system", "calls/s", "p50 µs", "p99 µs", "server CPU µs/call",
                     "server RSS", "÷ ours on CPython"], rows), ""]

    # where the time goes
    if hot:
        rows = []
        for t in engines:
            h = hot.get(t)
            if not h:
                continue
            if "error" in h:
                rows.append([TARGET_NAMES[t], "failed: {}".format(h["error"]), "", "", ""])
                continue
            real = cpu_per_call(r, "pipelined", "4x4x16", t)
            relay = cpu_per_call(r, "pipelined", "4x4x16", "relay")
            rows.append([TARGET_NAMES[t], "{:.0f} ({:.0f}–{:.0f})".format(
                h["median"], min(h["us_per_call"]), max(h["us_per_call"])),
                cell(real), "{:.0f}".format(med(real) - h["median"]) if real else "–",
                cell(relay) if t == "iii" else "–"])
        lines += ["## Where a routed call's CPU goes", "",
                  "*Without sockets*: `bench/hotpath.py` on the engine's Python, CPU µs "
                  "per routed call through Autobahn's protocol and our routing on "
                  "in-memory transports (3 rounds). *Through sockets*: the server CPU "
                  "per call of the pipelined cell above. The difference is the reactor, "
                  "the socket reads and writes and the kernel; the minimal relay (on "
                  "CPython) pays that and framing, and no routing. bench/README.rst has "
                  "the profile and the upstream patches that would cut the rest.", "",
                  table(["system", "without sockets", "through sockets",
                         "difference (I/O, reactor)", "minimal relay"], rows), ""]

    # memory
    rows = []
    for t in engines + ["crossbar", "relay", "echo", "floor"]:
        rss = [x.get("server_rss_kib") for sec in r.values() for k in sec.values()
               for x in k.get(t, []) if "error" not in x and x.get("server_rss_kib")]
        if rss:
            rows.append([TARGET_NAMES[t], "{:,.0f} MiB".format(min(rss) / 1024.0),
                         "{:,.0f} MiB".format(med(rss) / 1024.0),
                         "{:,.0f} MiB".format(max(rss) / 1024.0)])
    lines += ["## Server memory (RSS of the process tree at the end of each cell)", "",
              table(["system", "min", "median", "max"], rows), ""]

    # throughput
    rows = []
    for key in r.get("throughput", {}):
        if key.endswith("*"):
            continue
        c = key.split("x")[0]
        o = values(r, "throughput", key, "iii", "rate")
        x = values(r, "throughput", key, "crossbar", "rate")
        relay = values(r, "throughput", key, "relay", "rate")
        echo = values(r, "throughput", c + "x*", "echo", "rate")
        p = values(r, "throughput", key, "iii-pypy", "rate")
        rows.append([key.replace("x", " × "), cell(o)] + ([cell(p)] if pypy else []) + [
            cell(x), cell(values(r, "throughput", key, "crossbar-autobahn", "rate")),
            cell(relay), cell(echo), ratio(o, x)] + ([ratio(p, x)] if pypy else []) + [
            ratio(o, relay), ratio(o, echo)])
    lines += ["## Throughput, calls/s (70 B; callers × workers, one call in flight per "
              "caller)", "",
              table(["callers × workers", "ours"] + (["ours on PyPy"] if pypy else []) + [
                     "Crossbar", "Crossbar (Autobahn client)", "relay",
                     "echo (callers only)", "ours ÷ Crossbar"] +
                    (["PyPy ÷ Crossbar"] if pypy else []) + ["ours ÷ relay", "ours ÷ echo"],
                    rows), ""]

    # CPU per call
    rows = []
    for key in r.get("throughput", {}):
        if key.endswith("*"):
            continue
        c = key.split("x")[0]
        o = cpu_per_call(r, "throughput", key, "iii")
        rows.append([key.replace("x", " × "), cell(o)] + (
            [cell(cpu_per_call(r, "throughput", key, "iii-pypy"))] if pypy else []) + [
            cell(cpu_per_call(r, "throughput", key, "crossbar")),
            cell(cpu_per_call(r, "throughput", key, "relay")),
            cell(cpu_per_call(r, "throughput", c + "x*", "echo")),
            ratio(o, cpu_per_call(r, "throughput", key, "relay")),
            ratio(o, cpu_per_call(r, "throughput", key, "crossbar"))])
    lines += ["## Server CPU per routed call, µs (from /proc/<pid>/stat, whole process "
              "tree)", "",
              table(["callers × workers", "ours"] + (["ours on PyPy"] if pypy else []) + [
                     "Crossbar router", "relay", "echo (per round trip)", "ours ÷ relay",
                     "ours ÷ Crossbar"], rows), ""]

    # payloads
    rows = []
    for size, key in [(70, "4x4")] + [(s, str(s)) for s in (1024, 10240, 102400)]:
        section = "throughput" if size == 70 else "payload"
        o = values(r, section, key, "iii", "rate")
        p = values(r, section, key, "iii-pypy", "rate")
        x = values(r, section, key, "crossbar", "rate")
        echo_key = "4x*" if size == 70 else key
        echo = values(r, section, echo_key, "echo", "rate")
        rows.append(["{:,} B".format(size), cell(o)] + ([cell(p)] if pypy else []) + [
            cell(x), cell(values(r, section, key, "relay", "rate")), cell(echo),
            ratio(o, x)] + ([ratio(p, x)] if pypy else []) + [
            ratio(o, echo), cell(cpu_per_call(r, section, key, "iii"))] + (
            [cell(cpu_per_call(r, section, key, "iii-pypy"))] if pypy else []))
    lines += ["## Payload size (4 callers × 4 workers), calls/s", "",
              table(["payload", "ours"] + (["ours on PyPy"] if pypy else []) + [
                     "Crossbar", "relay", "echo", "ours ÷ Crossbar"] +
                    (["PyPy ÷ Crossbar"] if pypy else []) + ["ours ÷ echo",
                     "ours CPU µs/call"] + (["PyPy CPU µs/call"] if pypy else []), rows), ""]

    # http
    lines += ["## HTTP request to function (70 B JSON POST, keep-alive, one request in "
              "flight per connection), requests/s", ""]
    if not has_rest_api:
        lines += ["*Skipped for our engine: `modules::api::RestApiModule` is not in this "
                  "checkout yet.*", ""]
    rows = []
    for n in (1, 16, 64):
        key = str(n)
        o = values(r, "http", key, "iii", "rate")
        p = values(r, "http", key, "iii-pypy", "rate")
        x = values(r, "http", key, "crossbar", "rate")
        floor = values(r, "http", key, "floor", "rate")
        rows.append([n, cell(o), cell(values(r, "http", key, "iii", "p50_us"))] + (
            [cell(p), cell(values(r, "http", key, "iii-pypy", "p50_us"))] if pypy else []) + [
            cell(x), cell(floor), ratio(o, x)] + ([ratio(p, x)] if pypy else []) + [
            ratio(o, floor), cell(cpu_per_call(r, "http", key, "iii"))] + (
            [cell(cpu_per_call(r, "http", key, "iii-pypy"))] if pypy else []))
    lines += [table(["connections", "ours", "ours p50 µs"] +
                    (["ours on PyPy", "PyPy p50 µs"] if pypy else []) +
                    ["Crossbar HTTP caller", "twisted.web echo", "ours ÷ Crossbar"] +
                    (["PyPy ÷ Crossbar"] if pypy else []) +
                    ["ours ÷ floor", "ours CPU µs/request"] +
                    (["PyPy CPU µs/request"] if pypy else []), rows), ""]
    if http_hot:
        rows = []
        for t in engines:
            h = http_hot.get(t)
            if not h:
                continue
            if "error" in h:
                rows.append([TARGET_NAMES[t], "failed: {}".format(h["error"]), "", ""])
                continue
            real = cpu_per_call(r, "http", "16", t)
            rows.append([TARGET_NAMES[t], "{:.0f} ({:.0f}–{:.0f})".format(
                h["median"], min(h["us_per_request"]), max(h["us_per_request"])),
                cell(real), "{:.0f}".format(med(real) - h["median"]) if real else "–"])
        lines += ["Where a request's CPU goes: *without sockets*, `bench/http_hotpath.py` on "
                  "the engine's Python (the REST port's twisted.web channel and a worker's "
                  "WebSocket on in-memory transports, CPU µs per request, 3 rounds); "
                  "*through sockets*, the server CPU per request with 16 connections above. "
                  "bench/README.rst has the profile.", "",
                  table(["system", "without sockets", "through sockets (16 connections)",
                         "difference (I/O, reactor)"], rows), ""]

    # scale
    if scale:
        lines += ["## Scale: idle workers and registered functions", "",
                  "One engine of each kind, after the rounds: N idle workers connect (each "
                  "hosting one function), then one more worker registers 10,000 "
                  "functions. At each step: the engine's RSS, its CPU while nothing is "
                  "called, and the cost of a call to one of 4 other workers (sequential; "
                  "and 4 callers × 16 in flight). One pass (no spread).", ""]
        rows = []
        for t in engines:
            steps = scale.get(t)
            if isinstance(steps, dict):
                rows.append([TARGET_NAMES[t], "failed: {}".format(steps.get("error"))]
                            + [""] * 7)
                continue
            for st in steps or []:
                seq, pipe = st.get("sequential", {}), st.get("pipelined", {})

                def num(v, f="{:,.0f}"):
                    return f.format(v) if v is not None else "–"
                rows.append([
                    TARGET_NAMES[t], "{:,}".format(st["idle"]), "{:,}".format(
                        st["idle"] + st["functions"] + 4),
                    "{:,.0f} MiB".format(st["rss_kib"] / 1024.0),
                    "{:.1%}".format(st["idle_cpu"]), num(seq.get("p50_us")),
                    num(seq.get("rate")), num(pipe.get("rate")),
                    num(pipe["server_cpu_s"] / pipe["calls"] * 1e6 if pipe.get("calls")
                        else None)])
        lines += [table(["system", "idle workers", "functions registered (all)", "RSS",
                         "idle CPU (of one core)", "sequential p50 µs", "sequential calls/s",
                         "calls/s, 4 × 16 in flight", "CPU µs/call, 4 × 16"], rows), ""]

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
    failed = [(sec, key, t, x["error"] if "error" in x else "{:,} of {:,} calls failed"
               .format(x["errors"], x["calls"]))
              for sec, s in r.items() for key, k in s.items()
              for t, xs in k.items() for x in xs if not usable(x)]
    client = [x["client_cpu_s"] / x["seconds"] for s in r.values() for k in s.values()
              for t in k.values() for x in t if "error" not in x]
    lines += ["## Run health", "",
              "Call errors: {}. Failed cells (left out of the tables): {}. Load generator CPU: median {:.0%}, "
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
    parser.add_argument("--pypy", default=None, metavar="PYTHON",
                        help="a PyPy venv's python with the engine's dependencies "
                             "(default: bench/.venv-pypy, made from pypy3 on first use); "
                             "'none' to leave PyPy out")
    parser.add_argument("--systems", default=None,
                        help="comma-separated subset of iii,iii-pypy,crossbar,relay,echo,"
                             "floor (default: all)")
    parser.add_argument("--jit-warmup", type=float, default=None, metavar="SECONDS",
                        help="load each engine this long before the rounds (default 20; "
                             "10 with --quick)")
    parser.add_argument("--sections", default=None,
                        help="comma-separated subset of latency,pipelined,throughput,"
                             "payload,http (default: all)")
    parser.add_argument("--no-scale", action="store_true",
                        help="leave out the idle-workers / 10,000-functions section")
    parser.add_argument("--no-sdk", action="store_true",
                        help="leave out the official SDK check")
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.jit_warmup is None:
        args.jit_warmup = 10.0 if args.quick else 20.0
    systems = set(args.systems.split(",")) if args.systems else None
    args.sections = set(args.sections.split(",")) if args.sections else None
    # Before the run, not after it: a report path that cannot be written loses nothing.
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    started = time.monotonic()
    venv_python = ensure_venv()
    pypy_python = None
    if systems is None or "iii-pypy" in systems:
        pypy_python = ensure_pypy(args.pypy)
    workdir = tempfile.mkdtemp(prefix="iii-bench.")
    servers = Servers(workdir, venv_python, pypy_python, systems)
    agent = Agent(venv_python, workdir)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    load_start = os.getloadavg()[0]
    warm, scale, sdk = {}, {}, {"error": "not run (--no-sdk)"}
    try:
        if not servers.has_rest_api:
            log("note: modules::api::RestApiModule is not available: the HTTP section "
                "runs without our engine")
        log("starting servers (logs in {})".format(workdir))
        servers.start()
        warm = run_warmup(args, servers, agent)
        results = run_rounds(args, servers, agent)
        if not args.no_scale:
            scale = run_scale(args, servers, agent)
        if not args.no_sdk and "iii" in servers.processes:
            sdk = run_sdk_check(args, servers, venv_python)
    finally:
        agent.stop()
        servers.stop()
    hot, http_hot = {}, {}
    engine_pythons = {t: p for t, p in (("iii", sys.executable), ("iii-pypy", pypy_python))
                      if p and t in servers.processes}
    if args.sections is None or "pipelined" in args.sections:
        hot = run_hotpath(args, engine_pythons)
    if servers.has_rest_api and (args.sections is None or "http" in args.sections):
        http_hot = run_http_hotpath(args, engine_pythons)
    info = versions(venv_python, pypy_python)
    info["systems"] = sorted(running_systems(servers))
    info["loadavg"] = [load_start, os.getloadavg()[0]]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    raw = os.path.join(HERE, "results", "latest.json")
    with open(raw, "w") as f:
        json.dump({"results": results, "sdk": sdk, "info": info, "quick": args.quick,
                   "rounds": args.rounds, "warmup": warm, "scale": scale, "hotpath": hot,
                   "http_hotpath": http_hot},
                  f, indent=1)
    text = report(args, results, sdk, info, servers.has_rest_api, warm, scale, hot,
                  http_hot)
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
