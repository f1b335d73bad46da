"""
Several engine processes on one machine (iii_twisted/processes.py): ports shared with
SO_REUSEPORT, the supervisor relaying, restarting and stopping its engine processes,
and ``twistd iii --processes`` refusing what it cannot run.
"""

import os
import signal
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from engine_process import ENGINE_PYTHON, TWISTD, free_port, wait_for_port, wait_until
from rawws import RawClient

from iii_twisted import listeners, processes
from iii_twisted.listeners import Listener, ListenerError


def run_twistd(config_path, *args, timeout=30):
    return subprocess.run([TWISTD, "-n", "--pidfile=", "iii", "--config", config_path]
                          + list(args), capture_output=True, text=True, timeout=timeout)


def test_processes_refuses_without_a_cluster(tmp_path):
    config = tmp_path / "iii-config.yaml"
    config.write_text("port: {}\nmodules: []\n".format(free_port()))
    result = run_twistd(str(config), "--processes", "2")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "iii: error: --processes 2 needs a cluster: section with redis_url: the engine "
        "processes form a cluster among themselves")
    result = run_twistd(str(config), "--processes", "0")
    assert result.returncode == 1 and "--processes must be 1 or more" in result.stderr


class _Cluster:
    def __init__(self, listen, advertise=None, redis_url="redis://127.0.0.1:1"):
        self.listen, self.advertise, self.redis_url = listen, advertise, redis_url


class _Config:
    def __init__(self, cluster):
        self.cluster = cluster


def test_check_options():
    """What --processes N accepts: a cluster whose link listener is per process."""
    check = processes.check_options
    assert check(_Config(None), 1) is None  # one process: anything goes
    assert "needs a cluster" in check(_Config(None), 2)
    assert check(_Config(_Cluster("tcp:0:interface=127.0.0.1")), 4) is None
    assert "port 0" in check(_Config(_Cluster("tcp:7000")), 2)
    assert "advertise" in check(_Config(_Cluster("tcp:0", advertise="tcp:h:1")), 2)


@pytest.fixture
def shared_ports():
    listeners.shared_ports = True
    yield
    listeners.shared_ports = False


@pytest_twisted.ensureDeferred
async def test_shared_listeners_bind_one_port(shared_ports):
    """With shared ports, two listeners (two processes, in life) bind one fixed port
    and both accept; a listener without SO_REUSEPORT cannot take it; port 0 and
    unix: stay one per listener or are refused."""
    port = free_port()
    accepted = {"a": 0, "b": 0}

    def factory(name):
        class Count(Protocol):
            def connectionMade(self):
                accepted[name] += 1
                self.transport.loseConnection()
        return Factory.forProtocol(Count)

    a = Listener("tcp:{}:interface=127.0.0.1".format(port), factory("a"), reactor, "a")
    b = Listener("tcp:{}:interface=127.0.0.1".format(port), factory("b"), reactor, "b")
    for listener in (a, b):
        listener.privilegedStartService()
        listener.startService()
    try:
        assert a.bound_port() == b.bound_port() == port
        listeners.shared_ports = False
        stranger = Listener("tcp:{}:interface=127.0.0.1".format(port), factory("c"),
                            reactor, "stranger")
        with pytest.raises(ListenerError, match="in use"):
            stranger.privilegedStartService()
        listeners.shared_ports = True
        ephemeral = Listener("tcp:0:interface=127.0.0.1", factory("e"), reactor, "e")
        assert not isinstance(ephemeral.endpoint, processes.ReusePortEndpoint)
        with pytest.raises(ListenerError, match="cannot be shared"):
            Listener("unix:/tmp/iii-never.sock", factory("u"), reactor, "u")

        # The kernel spreads connections from different source ports over both.
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        for _ in range(32):
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                  Protocol())
        await wait(lambda: accepted["a"] + accepted["b"] == 32, "32 accepts")
        assert accepted["a"] > 0 and accepted["b"] > 0, accepted
    finally:
        await a.stopService()
        await b.stopService()


async def wait(predicate, what, timeout=10.0):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting for " + what)
        await task.deferLater(reactor, 0.01, lambda: None)


CHILD = r"""
import os, signal, sys, time
from twisted.logger import Logger, jsonFileLogObserver
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
def hup(*_):
    sys.stderr.write("got SIGHUP\n")
    sys.stderr.flush()
signal.signal(signal.SIGHUP, hup)
Logger(observer=jsonFileLogObserver(sys.stdout)).info(
    "child {n} up", n=os.environ["III_PROCESS"])
sys.stdout.flush()
sys.stderr.write("plain line\n")
sys.stderr.flush()
time.sleep(120)
"""


@pytest.fixture
def relayed():
    events = []

    def observe(event):
        if str(event.get("log_system", "")).startswith("iii#"):
            events.append(event)
    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_supervisor_relays_restarts_and_stops(relayed, monkeypatch):
    """Each process's log events come through structured and tagged iii#K:PID;
    SIGHUP is passed on; a process killed with -9 is restarted after the backoff;
    stopping ends them all."""
    monkeypatch.setattr(processes, "RESTART_FIRST", 0.2)
    supervisor = processes.EngineProcesses(2, ["-c", CHILD], reactor, stop_timeout=5)
    supervisor.startService()
    try:
        await wait(lambda: len([e for e in relayed if e.get("n")]) == 2, "both up")
        first = supervisor.status()
        assert sorted(first) == [1, 2]
        up = {e["log_system"]: e for e in relayed if e.get("n")}
        assert set(up) == {"iii#{}:{}".format(k, first[k]["pid"]) for k in (1, 2)}
        assert sorted(e["n"] for e in up.values()) == ["1/2", "2/2"]
        assert all(e["log_level"].name == "info" for e in up.values())
        await wait(lambda: len([e for e in relayed if e.get("line") == "plain line"]) == 2,
                   "the plain stderr lines")

        os.kill(os.getpid(), signal.SIGHUP)  # to the supervisor: passed on to each
        await wait(lambda: len([e for e in relayed if e.get("line") == "got SIGHUP"]) == 2,
                   "SIGHUP in both")

        os.kill(first[1]["pid"], signal.SIGKILL)
        await wait(lambda: supervisor.status().get(1, {}).get("pid") not in
                   (None, first[1]["pid"]), "process 1 restarted")
        assert supervisor.status()[1]["restarts"] == 1
        assert supervisor.status()[2] == first[2]  # the other one untouched
    finally:
        pids = [c["pid"] for c in supervisor.status().values()]
        await supervisor.stopService()
    assert supervisor.status() == {}
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest_twisted.ensureDeferred
async def test_supervisor_kills_what_ignores_sigterm(monkeypatch):
    monkeypatch.setattr(processes, "KILL_GRACE", 0.5)
    supervisor = processes.EngineProcesses(
        1, ["-c", CHILD], reactor, stop_timeout=0,
        environ=dict(os.environ, IGNORE_TERM="1"))
    supervisor.startService()
    await wait(lambda: supervisor.status(), "started")
    pid = supervisor.status()[1]["pid"]
    started = reactor.seconds()
    await supervisor.stopService()
    assert reactor.seconds() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


ENGINE_CONFIG = """
port: {port}
host: 127.0.0.1
modules: []
"""


def test_engine_processes_share_the_worker_port(tmp_path):
    """Two engine processes (as --processes starts them) on one worker port: both
    start, workers land on both, and when one is killed the other takes every new
    worker."""
    port = free_port()
    config = tmp_path / "iii-config.yaml"
    config.write_text(ENGINE_CONFIG.format(port=port))
    children = []
    try:
        for k in (1, 2):
            log = open(str(tmp_path / "engine{}.log".format(k)), "wb")
            children.append((subprocess.Popen(
                [ENGINE_PYTHON, "-m", "twisted", "iii", "--config", str(config)],
                cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                env=dict(os.environ, III_PROCESS="{}/2".format(k))), log))
        wait_for_port(port, process=children[0][0])

        def served(k):
            text = (tmp_path / "engine{}.log".format(k)).read_text(errors="replace")
            return text.count(" connected from ")

        def up(k):
            return "iii-worker-manager listens on" in (
                tmp_path / "engine{}.log".format(k)).read_text(errors="replace")
        wait_until(lambda: up(1) and up(2), what="both engines listening")
        clients = [RawClient(port) for _ in range(16)]
        wait_until(lambda: served(1) + served(2) == 16, what="16 workers accepted")
        assert served(1) > 0 and served(2) > 0, (served(1), served(2))

        children[0][0].kill()  # kill -9
        children[0][0].wait(10)
        before = served(2)
        more = [RawClient(port) for _ in range(8)]
        wait_until(lambda: served(2) == before + 8, what="the survivor takes them all")
        for client in clients + more:
            client.sock.close()
    finally:
        for process, log in children:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            log.close()


def test_an_engine_process_stops_when_its_supervisor_is_gone():
    """ParentWatch: once this process's parent is not the supervisor it was started
    by (that one was killed), the engine process stops its reactor."""
    from twisted.internet.task import Clock

    class Reactor(Clock):
        stopped = False

        def stop(self):
            self.stopped = True

    clock = Reactor()
    watch = processes.ParentWatch(clock, parent_pid=os.getppid())
    watch.startService()
    clock.advance(processes.PARENT_CHECK * 3)
    assert not clock.stopped  # our parent is still ours
    watch.parent_pid = -1  # as if the supervisor died and we were handed on
    clock.advance(processes.PARENT_CHECK)
    assert clock.stopped
    watch.stopService()
    assert clock.getDelayedCalls() == []


SUPERVISOR = r"""
import sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver
from iii_twisted.processes import EngineProcesses, engine_argv
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
supervisor = EngineProcesses(2, engine_argv({}, sys.argv[1]), reactor)
reactor.callWhenRunning(supervisor.startService)
reactor.run()
"""


def test_engine_processes_stop_when_the_supervisor_is_killed(tmp_path):
    """kill -9 of the supervisor: its engine processes notice and stop by themselves
    (they run in their own process group, so nothing else would stop them)."""
    import re

    port = free_port()
    config = tmp_path / "iii-config.yaml"
    config.write_text(ENGINE_CONFIG.format(port=port))
    log_path = tmp_path / "supervisor.log"
    with open(str(log_path), "wb") as log:
        supervisor = subprocess.Popen([ENGINE_PYTHON, "-c", SUPERVISOR, str(config)],
                                      cwd=str(tmp_path), stdout=log,
                                      stderr=subprocess.STDOUT)
    pids = []
    try:
        def started():
            found = re.findall(r"engine process \d started \(pid (\d+)\)",
                               log_path.read_text(errors="replace"))
            return len(found) == 2 and [int(p) for p in found]
        pids = wait_until(started, timeout=20, what="two engine processes")
        wait_for_port(port, process=supervisor)
        wait_until(lambda: log_path.read_text(errors="replace").count(
            "iii-worker-manager listens on") == 2, timeout=20, what="both listening")
        supervisor.kill()
        supervisor.wait(10)
        wait_until(lambda: not any(_running(pid) for pid in pids), timeout=10,
                   what="the engine processes to stop")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _running(pid):
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
