"""
The cluster as the issue tests it (docs/cluster.rst): real ``twistd iii`` processes
with a real redis-server (tests/brokers.py), official iii-sdk 0.10.0 and npm iii-sdk
0.11.2 workers.

- Two members: workers on each call each other's functions; a member is killed with
  -9 mid-call: the caller on the other member gets an error within 2 s, the dead
  member's functions and workers leave the survivor's discovery within the member TTL
  plus a heartbeat, and a worker that was on the dead member reconnects to the
  survivor (through a failover load balancer, tcp_balancer.py), registers again and is
  called there.
- ``twistd iii --processes 2``: both engine processes take workers on the one shared
  port and route each other's calls; an engine process killed with -9 is restarted by
  the supervisor while the other keeps serving; SIGTERM stops everything.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from engine_process import TWISTD, EngineProcess, free_port, wait_for_port, wait_until
from tcp_balancer import Balancer
from test_node_sdk import node_sdks, node_worker  # noqa: F401 (fixtures)

HEARTBEAT_MS = 500
TTL_MS = 1500

MEMBER_CONFIG = """
port: {{port}}
host: 127.0.0.1
invocation_timeout_ms: 20000
modules:
  - class: modules::api::RestApiModule
    config:
      host: 127.0.0.1
      port: {{http}}
cluster:
  redis_url: {redis_url}
  secret: interop-secret
  name: {name}
  heartbeat_ms: {heartbeat}
  member_ttl_ms: {ttl}
"""


@pytest.fixture
def workers(sdk_worker):
    """C{connect(url, name)}: an iii-sdk 0.10.0 worker (conftest's sdk_worker)."""
    return sdk_worker


@pytest.fixture
def members(tmp_path, redis_url):
    """C{start(name)}: a cluster member (twistd iii) on the test's Redis, stopped after."""
    started = []

    def start(name, redis=redis_url):
        workdir = tmp_path / name
        workdir.mkdir()
        engine = EngineProcess(MEMBER_CONFIG.format(
            redis_url=redis, name=name, heartbeat=HEARTBEAT_MS, ttl=TTL_MS), workdir,
            http=True)
        started.append(engine)
        return engine.start()

    yield start
    for engine in started:
        engine.stop()


def health(port):
    """@return: (status code, body) of the readiness endpoint on REST port C{port}."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:{}/_iii/health/ready".format(port),
                                    timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def functions_of(worker):
    rows = worker.trigger({"function_id": "engine::functions::list", "payload": {}})
    return {row["function_id"]: row for row in rows["functions"]}


def workers_of(worker):
    rows = worker.trigger({"function_id": "engine::workers::list", "payload": {}})
    return rows["workers"]


def test_two_members_calls_and_a_member_killed_mid_call(members, workers, node_worker):
    a = members("member-a")
    b = members("member-b")
    balancer = Balancer([a.port, b.port])  # A while it lives, then B
    try:
        _two_members(a, b, balancer, workers, node_worker)
    finally:
        balancer.close()


def test_a_frozen_member_leaves_by_its_ttl_and_comes_back(members, workers):
    """A member that stops answering without its connections closing (SIGSTOP: a hung
    process, a machine gone off the network) leaves the other's registry within the
    member TTL plus a heartbeat; once it runs again it rejoins and is called again."""
    a = members("member-a")
    b = members("member-b")
    wait_until(lambda: "linked to cluster member member-b" in a.log()
               and "linked to cluster member member-a" in b.log(), timeout=20,
               what="the members to link")
    on_a = workers(a.url, "py-on-a")
    on_a.register_function({"id": "a::echo"}, lambda data: {"a": data})
    on_b = workers(b.url, "py-on-b")
    wait_until(lambda: "a::echo" in functions_of(on_b), what="a::echo on B")
    os.kill(a.process.pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        gone_at = wait_until(lambda: "a::echo" not in functions_of(on_b)
                             and time.monotonic(), timeout=15, what="A to leave B")
        bound = (TTL_MS + HEARTBEAT_MS) / 1000.0
        assert gone_at - stopped_at <= bound + 0.5, gone_at - stopped_at
        assert "cluster member member-a" in b.log() and " left" in b.log()
    finally:
        os.kill(a.process.pid, signal.SIGCONT)
    # Its key is written again: B's directory reports it joined (the same engine id:
    # it was dropped for silence, not for leaving), and the links are made again.
    wait_until(lambda: len(re.findall(r"cluster member member-a \(\S+\) joined",
                                      b.log())) == 2, timeout=20, what="A to rejoin B")
    wait_until(lambda: "a::echo" in functions_of(on_b), timeout=20,
               what="A back in B's registry")
    assert on_b.trigger({"function_id": "a::echo", "payload": 1}) == {"a": 1}


def test_a_member_that_loses_redis_keeps_serving(members, workers, own_redis):
    """Redis goes away: each member says so in its log and health, stays ready, and
    its workers (and the link already open) keep working; Redis back: ok again."""
    a = members("member-a", redis=own_redis.url)
    b = members("member-b", redis=own_redis.url)
    wait_until(lambda: "linked to cluster member member-b" in a.log()
               and "linked to cluster member member-a" in b.log(), timeout=20,
               what="the members to link")
    on_a = workers(a.url, "py-on-a")
    on_a.register_function({"id": "a::echo"}, lambda data: {"a": data})
    on_b = workers(b.url, "py-on-b")
    on_b.register_function({"id": "b::echo"}, lambda data: {"b": data})
    wait_until(lambda: "a::echo" in functions_of(on_b), what="a::echo on B")
    for engine in (a, b):
        assert health(engine.ports["http"]) == (200, {
            "status": "ready", "checks": {},
            "cluster": {"directory": "ok", "members": 1, "unlinked": []}})

    own_redis.stop()
    for engine in (a, b):
        wait_until(lambda: health(engine.ports["http"])[1]["cluster"]["directory"]
                   == "unreachable", timeout=10, what="the health to say so")
        code, body = health(engine.ports["http"])
        assert code == 200 and body["cluster"] == {"directory": "unreachable",
                                                   "members": 1, "unlinked": []}
        assert "keeps serving its own workers" in engine.log()
        # The image's HEALTHCHECK probe passes, and says it.
        probe = subprocess.run(
            [sys.executable, "-m", "iii_twisted.healthcheck",
             "http://127.0.0.1:{}/_iii/health/ready".format(engine.ports["http"])],
            capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0
        assert "cluster directory unreachable, 1 other members known" in probe.stdout
    assert on_a.trigger({"function_id": "b::echo", "payload": 1}) == {"b": 1}
    assert on_b.trigger({"function_id": "a::echo", "payload": 2}) == {"a": 2}
    assert on_a.trigger({"function_id": "a::echo", "payload": 3}) == {"a": 3}

    own_redis.start()
    for engine in (a, b):
        wait_until(lambda: health(engine.ports["http"])[1]["cluster"]
                   == {"directory": "ok", "members": 1, "unlinked": []}, timeout=15,
                   what="the health to be ok again")
        assert "answers again" in engine.log()
    assert on_b.trigger({"function_id": "a::echo", "payload": 4}) == {"a": 4}


def _two_members(a, b, balancer, workers, node_worker):
    wait_until(lambda: "linked to cluster member member-b" in a.log()
               and "linked to cluster member member-a" in b.log(), timeout=20,
               what="the members to link")
    started = threading.Event()

    def slow(data):
        started.set()
        time.sleep(30)  # until its member is killed under it
        return "never"

    on_a = workers(balancer.url, "py-on-a")
    on_a.register_function({"id": "a::echo"}, lambda data: {"a": data})
    on_a.register_function({"id": "a::slow"}, slow)
    on_b = workers(b.url, "py-on-b")
    on_b.register_function({"id": "b::echo"}, lambda data: {"b": data})
    node_a = node_worker("iii-sdk-011", a.url, "node-on-a")
    node_a.request("register_function", function_id="nodea::echo")
    assert balancer.routed == [a.port]

    # Every function is callable from both members, across the link.
    wait_until(lambda: {"a::echo", "a::slow", "nodea::echo"} <= set(functions_of(on_b)),
               what="A's functions on B")
    wait_until(lambda: "b::echo" in functions_of(on_a), what="B's function on A")
    assert on_b.trigger({"function_id": "a::echo", "payload": 1}) == {"a": 1}
    assert on_a.trigger({"function_id": "b::echo", "payload": 2}) == {"b": 2}
    assert node_a.request("call", function_id="b::echo", payload=3)["result"] == {"b": 3}
    result = on_b.trigger({"function_id": "nodea::echo", "payload": 4})
    assert result["handled_by"] == "node-on-a" and result["data"] == 4
    rows = functions_of(on_b)
    assert rows["a::echo"]["engine_name"] == "member-a"
    assert rows["b::echo"]["engine_name"] == "member-b"
    names = {(w.get("name"), w.get("engine_name")) for w in workers_of(on_b)}
    assert {("py-on-a", "member-a"), ("py-on-b", "member-b"),
            ("node-on-a", "member-a")} <= names

    # kill -9 of member A while B's worker waits on A's function.
    outcome = {}

    def call_slow():
        try:
            outcome["result"] = on_b.trigger({"function_id": "a::slow", "payload": {},
                                              "timeout_ms": 20000})
        except Exception as e:
            outcome["error"] = e
        outcome["at"] = time.monotonic()
    caller = threading.Thread(target=call_slow, daemon=True)
    caller.start()
    assert started.wait(10), "a::slow never started on A's worker"
    killed_at = time.monotonic()
    a.kill()
    caller.join(10)
    assert "error" in outcome, outcome
    assert outcome["at"] - killed_at < 2.0, outcome["at"] - killed_at

    def a_gone():
        functions = functions_of(on_b)
        return (not {"a::echo", "a::slow", "nodea::echo"} & set(functions)
                and all(w.get("engine_name") != "member-a" for w in workers_of(on_b))
                and time.monotonic())
    gone_at = wait_until(a_gone, timeout=10, what="A's functions and workers to leave B")
    bound = (TTL_MS + HEARTBEAT_MS) / 1000.0
    assert gone_at - killed_at <= bound + 0.5, gone_at - killed_at  # + one poll of ours

    # The worker that was on A reconnects through the balancer to B, registers
    # again, and is called there.
    wait_until(lambda: b.port in balancer.routed[1:], timeout=30,
               what="the SDK worker to reconnect through the balancer")
    wait_until(lambda: "a::echo" in functions_of(on_b), timeout=20,
               what="a::echo registered again on B")
    assert on_b.trigger({"function_id": "a::echo", "payload": 5}) == {"a": 5}
    assert functions_of(on_b)["a::echo"]["engine_name"] == "member-b"


# -- twistd iii --processes 2 -----------------------------------------------------------

PROCESSES_CONFIG = """
port: {port}
host: 127.0.0.1
invocation_timeout_ms: 20000
modules:
  - class: modules::api::RestApiModule
    config:
      host: 127.0.0.1
      port: {http}
cluster:
  redis_url: {redis_url}
  secret: processes-secret
  name: box
  heartbeat_ms: 500
  member_ttl_ms: 1500
"""


class Supervisor:
    """``twistd -n iii --processes N`` in its own session, its log in a file."""

    def __init__(self, tmp_path, redis_url, count=2):
        self.port, self.http = free_port(), free_port()
        self.url = "ws://127.0.0.1:{}".format(self.port)
        self.config = tmp_path / "iii-config.yaml"
        self.config.write_text(PROCESSES_CONFIG.format(
            port=self.port, http=self.http, redis_url=redis_url))
        self.log_path = tmp_path / "supervisor.log"
        self._log = open(str(self.log_path), "wb")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "iii", "--config", str(self.config),
             "--processes", str(count)],
            cwd=str(tmp_path), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def pids(self):
        """@return: {process number: pid} of the latest start of each."""
        found = {}
        for number, pid in re.findall(r"engine process (\d+) started \(pid (\d+)\)",
                                      self.log()):
            found[int(number)] = int(pid)
        return found

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not serving: /proc says.
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_processes_share_the_port_and_survive_a_killed_one(tmp_path, redis_url, workers):
    supervisor = Supervisor(tmp_path, redis_url)
    try:
        _processes(supervisor, workers)
    finally:
        pids = list(supervisor.pids().values())
        supervisor.stop()
    # twistd ends by the signal it was stopped with, once it has shut down cleanly.
    assert supervisor.process.returncode == -signal.SIGTERM, supervisor.log()[-3000:]
    assert "Server Shut Down." in supervisor.log()
    assert not any(alive(pid) for pid in pids), "engine processes outlived the supervisor"
    # Each process stopped by the supervisor's SIGTERM is logged as stopped, not killed.
    assert len(re.findall(r"engine process \d \(pid \d+\) stopped\n", supervisor.log())) == 2


def _processes(supervisor, workers):
    wait_for_port(supervisor.port, timeout=30, process=supervisor.process)
    wait_until(lambda: supervisor.log().count("linked to cluster member box") >= 2,
               timeout=30, what="the two engine processes to link")
    first = supervisor.pids()
    assert sorted(first) == [1, 2]
    # Whichever process answers the shared REST port knows the other.
    assert health(supervisor.http)[1]["cluster"] == {"directory": "ok", "members": 1,
                                                     "unlinked": []}

    # Workers on the shared port land on both processes (the kernel spreads them).
    made = [workers(supervisor.url, "w{}".format(i)) for i in range(8)]
    for i, worker in enumerate(made):
        worker.register_function({"id": "p::w{}".format(i)},
                                 lambda data, i=i: {"w": i, "data": data})

    def engines_serving():
        rows = [w for w in workers_of(made[0]) if str(w.get("name", "")).startswith("w")]
        return len(rows) == 8 and {w["engine_name"] for w in rows}
    engines = wait_until(engines_serving, timeout=20, what="8 workers in discovery")
    assert engines == {"box#1", "box#2"}, engines
    log = supervisor.log()
    for number in (1, 2):
        assert re.search(r"\[iii#{}:{}\] worker .* connected from".format(
            number, first[number]), log), "process {} took no worker".format(number)

    # Each worker's function is callable from every worker, whichever process.
    wait_until(lambda: all({"p::w{}".format(i) for i in range(8)} <= set(functions_of(w))
                           for w in (made[0], made[-1])), what="every function everywhere")
    for caller in (made[0], made[-1]):
        for i in range(8):
            assert caller.trigger({"function_id": "p::w{}".format(i),
                                   "payload": i})["w"] == i

    # kill -9 of engine process 1: the supervisor restarts it; the other serves on.
    os.kill(first[1], signal.SIGKILL)
    wait_until(lambda: supervisor.pids().get(1) not in (None, first[1]), timeout=20,
               what="engine process 1 restarted")
    assert re.search(r"engine process 1 \(pid {}\) exited \(killed by SIGKILL\)".format(
        first[1]), supervisor.log())
    assert alive(first[2]) and supervisor.pids()[2] == first[2]
    # Workers that were on it reconnect through the shared port and register again:
    # every function is callable once more.
    def all_callable():
        try:
            return all(made[-1].trigger({"function_id": "p::w{}".format(i), "payload": 0,
                                         "timeout_ms": 3000})["w"] == i for i in range(8))
        except Exception:
            return False
    wait_until(all_callable, timeout=30, what="every function callable after the restart")


@pytest.mark.parametrize("extra, error", [
    ("  listen: tcp:7000:interface=127.0.0.1\n",
     "cluster.listen is 'tcp:7000:interface=127.0.0.1': with --processes each engine "
     "process needs a link listener of its own; use port 0 (tcp:0:interface=...)"),
    ("  advertise: tcp:10.0.0.5:7000\n",
     "cluster.advertise cannot be used with --processes: each engine process "
     "advertises its own link port"),
])
def test_processes_refuses_a_shared_link_address(tmp_path, extra, error):
    config = tmp_path / "iii-config.yaml"
    config.write_text("port: {}\nmodules: []\ncluster:\n  redis_url: redis://127.0.0.1:1\n"
                      "  secret: s\n{}".format(free_port(), extra))
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "iii", "--config", str(config),
                             "--processes", "2"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == "iii: error: " + error
