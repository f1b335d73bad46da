"""
Several engine processes on one machine (issue 12, point 6): ``twistd iii --config X
--processes N``.

The ``twistd`` process becomes a supervisor (L{EngineProcesses}): it runs N engine
processes (``python -m twisted iii --config X``, each told its number in
``$III_PROCESS``), relays their log lines into its own log tagged ``iii#K:PID``,
restarts one that dies (after 1 s, doubling up to 30 s while it keeps dying young), and
on SIGTERM stops them all (SIGTERM, then SIGKILL after the config's
``shutdown_timeout`` plus 5 s).

How the ports are shared: each engine process opens every listener with a fixed
``tcp:`` or ``ssl:`` port itself, with ``SO_REUSEPORT`` (L{ReusePortEndpoint}), and the
kernel spreads new connections over them. Chosen over a supervisor that opens the
sockets and hands them down by descriptor because each process then starts, binds and
restarts exactly like a lone engine (no descriptor plumbing, no list of ports the
supervisor would have to work out from every module's config), and the kernel balances
the accepts instead of waking every process for each one. The costs: Linux (3.9+)
only, and connections still queued on a process that is killed are reset (SDK workers
reconnect). A listener on port 0 (the cluster link listener by default) is one per
process; other endpoint types (``unix:``) cannot be shared and are refused.

The processes form a cluster among themselves, so a ``cluster:`` section with
``redis_url`` is required, with a link listener on port 0 and no ``advertise``
(each process needs its own link address; L{check_options}).
"""

import os
import signal
import socket
import sys

from twisted.application.service import Service
from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.task import LoopingCall
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from zope.interface import implementer

ENV = "III_PROCESS"  # "K/N" in engine process K (1-based) of N
SUPERVISOR_ENV = "III_SUPERVISOR_PID"

RESTART_FIRST = 1.0
RESTART_MAX = 30.0
# A process that ran this long before dying starts over at RESTART_FIRST.
STEADY = 30.0
KILL_GRACE = 5.0
PARENT_CHECK = 1.0
# Bytes of one output line kept before it is relayed unfinished.
MAX_LINE = 1024 * 1024

_log = Logger()


# -- the engine process side -----------------------------------------------------------


def process_number(environ=None):
    """@return: C{(k, n)} when this is engine process k of n (``$III_PROCESS``), else None."""
    value = (os.environ if environ is None else environ).get(ENV)
    if not value:
        return None
    try:
        k, n = (int(part) for part in value.split("/"))
    except ValueError:
        return None
    return k, n


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP (or TLS) server endpoint whose socket is opened with C{SO_REUSEPORT}, so that
    several processes listen on the same port and the kernel spreads the connections.
    """

    def __init__(self, reactor, port, interface="", backlog=50, tls=None):
        """
        @param tls: an C{IOpenSSLContextFactory} for an ``ssl:`` listener, or None.
        """
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog
        self._tls = tls

    def listen(self, factory):
        """
        @return: Deferred firing with the C{IListeningPort}; failing with
            C{CannotListenError} when the port cannot be bound.
        """
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface, self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            if self._tls is not None:
                from twisted.protocols.tls import TLSMemoryBIOFactory
                factory = TLSMemoryBIOFactory(self._tls, False, factory)
            port = self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            return defer.fail(error.CannotListenError(self._interface, self._port, e))
        finally:
            sock.close()  # the reactor holds its own duplicate
        return defer.succeed(port)


def shared_endpoint(reactor, description):
    """
    @return: the endpoint for C{description} in an engine process of several: a
        L{ReusePortEndpoint} for a ``tcp:``/``ssl:`` listener with a fixed port, the
        ordinary one for port 0 (one per process).
    @raise ValueError: for another endpoint type, which cannot be shared.
    """
    endpoint = endpoints.serverFromString(reactor, description)
    tcp = (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint,
           endpoints.SSL4ServerEndpoint)
    if not isinstance(endpoint, tcp):
        raise ValueError("{} cannot be shared by several engine processes (only tcp: "
                         "and ssl: ports can)".format(description))
    if endpoint._port == 0:
        return endpoint
    return ReusePortEndpoint(reactor, endpoint._port, endpoint._interface,
                             endpoint._backlog,
                             getattr(endpoint, "_sslContextFactory", None))


class ParentWatch(Service):
    """
    Stops this engine process when its supervisor is gone (it was killed: its
    children are handed to another parent). Checked every L{PARENT_CHECK} seconds.
    """

    def __init__(self, reactor, parent_pid=None):
        """
        @param parent_pid: the supervisor's pid; default ``$III_SUPERVISOR_PID`` (so
            that a supervisor gone before this process got here is noticed too), else
            this process's parent now.
        """
        self.reactor = reactor
        if parent_pid is None:
            try:
                parent_pid = int(os.environ.get(SUPERVISOR_ENV, ""))
            except ValueError:
                parent_pid = os.getppid()
        self.parent_pid = parent_pid
        self._loop = None

    def startService(self):
        Service.startService(self)
        self._loop = LoopingCall(self._check)
        self._loop.clock = self.reactor
        self._loop.start(PARENT_CHECK, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return Service.stopService(self)

    def _check(self):
        if os.getppid() != self.parent_pid:
            _log.warn("the supervising twistd (pid {pid}) is gone; this engine process "
                      "stops", pid=self.parent_pid)
            self._loop.stop()
            self.reactor.stop()


def prepare_engine_process(config, number):
    """
    Before the engine of process C{number} (C{(k, n)}) is built: its fixed ports are
    shared (L{shared_endpoint}) and its cluster member's name ends in C{#k}.
    """
    from . import listeners

    listeners.shared_ports = True
    cluster = getattr(config, "cluster", None)
    if cluster is not None:
        cluster.name = "{}#{}".format(cluster.name, number[0])


def become_engine_process(service, reactor):
    """Once the engine C{service} is built: it stops when its supervisor is gone."""
    try:
        # Our own process group: a Ctrl-C at the terminal reaches the supervisor only,
        # which stops us in order (not twice).
        os.setpgid(0, 0)
    except OSError:
        pass
    ParentWatch(reactor).setServiceParent(service)


# -- the supervisor side -----------------------------------------------------------------


def check_options(config, count):
    """
    @return: None when C{count} engine processes can run C{config}, else why not (one
        line naming the key).
    """
    if count < 1:
        return "--processes must be 1 or more, not {}".format(count)
    if count == 1:
        return None
    if not hasattr(socket, "SO_REUSEPORT"):
        return "--processes needs SO_REUSEPORT (Linux), which this system lacks"
    cluster = getattr(config, "cluster", None)
    if cluster is None or not getattr(cluster, "redis_url", None):
        return ("--processes {} needs a cluster: section with redis_url: the engine "
                "processes form a cluster among themselves".format(count))
    listen = cluster.listen or ""
    try:
        port = endpoints.serverFromString(_NoReactor(), listen)._port
    except Exception:
        port = None
    if port != 0:
        return ("cluster.listen is {!r}: with --processes each engine process needs a "
                "link listener of its own; use port 0 (tcp:0:interface=...)".format(listen))
    if cluster.advertise:
        return ("cluster.advertise cannot be used with --processes: each engine process "
                "advertises its own link port")
    return None


class _NoReactor:
    """Enough of a reactor to parse an endpoint string (nothing is opened)."""


class _EngineProcess(protocol.ProcessProtocol):
    """One engine process: its output relayed to the log, its end told to the supervisor."""

    def __init__(self, supervisor, number):
        self.supervisor = supervisor
        self.number = number
        self.pid = None
        self.started_at = None
        self.ended = defer.Deferred()
        self._buffers = {1: b"", 2: b""}

    @property
    def tag(self):
        return "iii#{}:{}".format(self.number, self.pid)

    def connectionMade(self):
        self.pid = self.transport.pid
        self.started_at = self.supervisor.reactor.seconds()
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        buffered = self._buffers.get(fd, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LINE:  # no end of line in sight: relay what came
            lines.append(rest)
            rest = b""
        self._buffers[fd] = rest
        for line in lines:
            self._relay(fd, line)

    def _relay(self, fd, line):
        text = line.decode("utf-8", "replace").lstrip("\x1e").rstrip("\r")
        if not text.strip():
            return
        event = None
        if text.startswith("{"):
            try:
                event = eventFromJSON(text)
            except (ValueError, TypeError):
                event = None
        if not isinstance(event, dict) or "log_level" not in event:
            # Plain output (a start-up error before logging began, a stray print).
            event = {"log_format": "{line}", "line": text,
                     "log_level": LogLevel.warn if fd == 2 else LogLevel.info,
                     "log_namespace": "iii.process",
                     "log_time": self.supervisor.reactor.seconds()}
        event["log_system"] = self.tag
        globalLogPublisher(event)

    def processEnded(self, reason):
        for fd in (1, 2):
            if self._buffers[fd]:
                self._relay(fd, self._buffers[fd])
                self._buffers[fd] = b""
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class EngineProcesses(Service):
    """
    The supervisor of C{count} engine processes (see the module docstring).

    @ivar processes: engine process number -> its L{_EngineProcess} while it runs.
    @ivar restarts: how many times each was restarted.
    """

    name = "iii-processes"

    def __init__(self, count, argv, reactor, stop_timeout=30.0, environ=None,
                 executable=None):
        """
        @param argv: the arguments after the interpreter that start one engine process
            (C{["-m", "twisted", ..., "iii", "--config", PATH]}).
        @param stop_timeout: seconds an engine process gets to stop on SIGTERM before
            it is killed (plus L{KILL_GRACE}).
        """
        self.count = count
        self.argv = list(argv)
        self.reactor = reactor
        self.stop_timeout = stop_timeout
        self.environ = dict(os.environ if environ is None else environ)
        self.executable = executable or sys.executable
        self.processes = {}
        self.restarts = {k: 0 for k in range(1, count + 1)}
        self._failures = {k: 0 for k in range(1, count + 1)}
        self._pending = {}
        self._stopping = False
        self._previous_sighup = None

    def startService(self):
        Service.startService(self)
        _log.info("starting {count} engine processes sharing the ports (supervisor pid "
                  "{pid})", count=self.count, pid=os.getpid())
        if hasattr(signal, "SIGHUP"):
            # SIGHUP rereads the config: in every engine process.
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._forward_hup))
        for k in range(1, self.count + 1):
            self._spawn(k)

    def _forward_hup(self):
        for child in list(self.processes.values()):
            _signal(child, "HUP")

    def _spawn(self, number):
        self._pending.pop(number, None)
        if self._stopping:
            return
        env = dict(self.environ)
        env[ENV] = "{}/{}".format(number, self.count)
        env[SUPERVISOR_ENV] = str(os.getpid())
        child = _EngineProcess(self, number)
        self.reactor.spawnProcess(child, self.executable, [self.executable] + self.argv,
                                  env=env, childFDs={0: "w", 1: "r", 2: "r"})
        self.processes[number] = child
        _log.info("engine process {number} started (pid {pid})", number=number,
                  pid=child.pid)

    def _ended(self, child, reason):
        if self.processes.get(child.number) is child:
            del self.processes[child.number]
        how = _how_it_ended(reason)
        if self._stopping:
            _log.info("engine process {number} (pid {pid}) stopped{how}",
                      number=child.number, pid=child.pid,
                      how="" if how == "killed by SIGTERM" else " ({})".format(how))
            return
        lived = self.reactor.seconds() - (child.started_at or self.reactor.seconds())
        if lived >= STEADY:
            self._failures[child.number] = 0
        delay = min(RESTART_MAX, RESTART_FIRST * 2 ** self._failures[child.number])
        self._failures[child.number] += 1
        self.restarts[child.number] += 1
        _log.warn("engine process {number} (pid {pid}) exited ({how}) after {lived:.1f} s; "
                  "restarting it in {delay:g} s", number=child.number, pid=child.pid,
                  how=how, lived=lived, delay=delay)
        self._pending[child.number] = self.reactor.callLater(delay, self._spawn,
                                                             child.number)

    def stopService(self):
        """
        SIGTERM every engine process; SIGKILL those still running after
        C{stop_timeout + KILL_GRACE} seconds.

        @return: Deferred firing once every engine process has exited.
        """
        Service.stopService(self)
        self._stopping = True
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        children = list(self.processes.values())
        for child in children:
            _signal(child, "TERM")
        if not children:
            return defer.succeed(None)
        done = defer.DeferredList([c.ended for c in children])

        def kill():
            for child in children:
                if not child.ended.called:
                    _log.warn("engine process {number} (pid {pid}) did not stop in time; "
                              "killing it", number=child.number, pid=child.pid)
                    _signal(child, "KILL")
        timer = self.reactor.callLater(self.stop_timeout + KILL_GRACE, kill)
        done.addBoth(lambda _: timer.active() and timer.cancel())
        return done.addCallback(lambda _: None)

    def status(self):
        """@return: C{{number: {"pid": P, "restarts": R}}} of the running processes."""
        return {k: {"pid": c.pid, "restarts": self.restarts[k]}
                for k, c in sorted(self.processes.items())}


def _signal(child, name):
    try:
        child.transport.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


def _how_it_ended(reason):
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            return "killed by {}".format(signal.Signals(sig).name)
        except ValueError:
            return "killed by signal {}".format(sig)
    code = getattr(value, "exitCode", None)
    return "exit status {}".format(code)


def engine_argv(options, config_path):
    """
    @return: the interpreter arguments that start one engine process for C{options}:
        ``twist`` writing JSON log events (the supervisor reads them) at the config's
        level.
    """
    argv = ["-m", "twisted", "--log-format=json"]
    argv += ["iii", "--config", os.path.abspath(config_path)]
    if options.get("debug"):
        argv.append("--debug")
    return argv

