"""
Real Redis (and RabbitMQ) servers for tests: started from the installed binary on a
free loopback port, with a temporary directory, and stopped by PID.

Never the machine's own services on the default ports. When the binary is missing the
test is skipped with a reason saying how to install it, except under ``CI=true`` (or
``IIITW_REQUIRE_BROKERS=1``), where a missing server is a failure.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

HOW_TO = ("install Debian's redis-server and rabbitmq-server (apt-get install "
          "redis-server rabbitmq-server) to run it; .ci/run does")


def brokers_required():
    return (os.environ.get("CI", "").lower() == "true"
            or os.environ.get("IIITW_REQUIRE_BROKERS") == "1")


def missing(what):
    """Skip (or, in CI, fail) a test that needs C{what}."""
    message = "{} is not installed: {}".format(what, HOW_TO)
    if brokers_required():
        pytest.fail(message)
    pytest.skip(message)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_command(port, *args, timeout=5.0):
    """
    Send one command to a Redis server with a plain socket (RESP), for fixtures.

    @return: the reply's first line (decoded), e.g. ``+PONG``.
    """
    payload = "*{}\r\n".format(len(args)) + "".join(
        "${}\r\n{}\r\n".format(len(str(a).encode()), a) for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload.encode())
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").strip()


class RedisServer:
    """
    One ``redis-server`` process (no persistence) on 127.0.0.1.

    @ivar port: its port (kept across L{restart}).
    @ivar url: ``redis://127.0.0.1:PORT/0``.
    """

    def __init__(self, binary, extra_args=(), tls_files=None):
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="iii-redis-")
        self.extra_args = list(extra_args)
        self.process = None
        self.tls_files = tls_files

    @property
    def url(self):
        return "redis://127.0.0.1:{}/0".format(self.port)

    def start(self, timeout=10.0):
        if self.tls_files:
            cert, key = self.tls_files
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                     "--tls-key-file", key, "--tls-ca-cert-file", cert,
                     "--tls-auth-clients", "no"]
        else:
            ports = ["--port", str(self.port)]
        self.process = subprocess.Popen(
            [self.binary] + ports + ["--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", self.dir]
            + self.extra_args,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("redis-server exited with code {}".format(
                    self.process.returncode))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not listen on {}".format(self.port))
                time.sleep(0.02)  # polling the port for readiness

    def stop(self):
        """Stop it (SIGKILL, as a crash would) and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def restart(self):
        self.stop()
        return self.start()

    def command(self, *args):
        return redis_command(self.port, *args)

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(**kwargs):
    """@return: a started L{RedisServer}, or skip/fail when redis-server is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server")
    return RedisServer(binary, **kwargs).start()


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


class RabbitMQServer:
    """
    One RabbitMQ node on 127.0.0.1 (AMQP, Erlang distribution and epmd on free
    ports), with its own HOME (cookie), data and logs in a temporary directory.

    The ``epmd`` a node would spawn outlives it, so one is started first on a port of
    its own and stopped by PID. Started as the current user through the broker's own
    script (not the /usr/sbin wrapper, which switches to the rabbitmq user).

    @ivar url: ``amqp://guest:guest@127.0.0.1:PORT/%2F``.
    """

    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="iii-rabbit-")
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.process = None
        self.epmd = None
        plugins = os.path.join(self.dir, "enabled_plugins")
        with open(plugins, "w") as f:
            f.write("[].\n")
        # Our own config and env files: the system's (/etc/rabbitmq) would put the
        # listener on the default port.
        config = os.path.join(self.dir, "rabbitmq.conf")
        with open(config, "w") as f:
            f.write("listeners.tcp.default = 127.0.0.1:{}\nloopback_users = none\n"
                    .format(self.port))
        env_file = os.path.join(self.dir, "rabbitmq-env.conf")
        open(env_file, "w").close()
        self.env = dict(
            os.environ, HOME=self.dir, RABBITMQ_NODENAME="rabbit@localhost",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port), ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_MNESIA_BASE=os.path.join(self.dir, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.dir, "log"),
            RABBITMQ_PID_FILE=os.path.join(self.dir, "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=plugins, RABBITMQ_CONFIG_FILE=config,
            RABBITMQ_CONF_ENV_FILE=env_file,
            ERL_CRASH_DUMP=os.path.join(self.dir, "erl_crash.dump"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )

    @property
    def url(self):
        return "amqp://guest:guest@127.0.0.1:{}/%2F".format(self.port)

    def start(self, timeout=60.0):
        if self.epmd is None:
            self.epmd = subprocess.Popen(  # noqa: the node's own would outlive it
                ["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)],
                env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        # The node must find our epmd listening, or it starts one of its own.
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.epmd_port), timeout=0.5):
                    break
            except OSError:
                if self.epmd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("epmd did not listen on {}".format(self.epmd_port))
                time.sleep(0.05)  # polling the port for readiness
        # A fresh distribution port on every start: after a kill the old one may still
        # be held (the restart tests saw dist_port_already_used); AMQP keeps its port,
        # which the clients reconnect to.
        self.dist_port = free_port()
        self.env["RABBITMQ_DIST_PORT"] = str(self.dist_port)
        self.process = subprocess.Popen(
            [RABBITMQ_SERVER], env=self.env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("rabbitmq-server exited with code {}: {}".format(
                    self.process.returncode, self._log_tail()))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("rabbitmq-server did not listen on {}".format(
                        self.port))
                time.sleep(0.1)  # polling the port for readiness

    def _log_tail(self, lines=15):
        """The last lines of the node's logs, for an error message (the directory goes)."""
        log_dir = os.path.join(self.dir, "log")
        text = []
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else ():
            with open(os.path.join(log_dir, name), errors="replace") as f:
                text.extend("{}: {}".format(name, line.rstrip()) for line in f)
        return "\n".join(text[-lines:]) or "no log written"

    def stop(self):
        """Kill the node (its whole process group) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(20)
        self.process = None

    def restart(self):
        self.stop()
        return self.start()

    def close(self):
        self.stop()
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_rabbitmq():
    """@return: a started L{RabbitMQServer}, or skip/fail when RabbitMQ is missing."""
    if not (os.path.exists(RABBITMQ_SERVER) and shutil.which("epmd")):
        missing("rabbitmq-server")
    # Two tries: the free ports are picked before the node binds them, so another
    # process (another test run on the machine) can take one in between.
    for attempt in (1, 2):
        server = RabbitMQServer()
        try:
            return server.start()
        except Exception:
            server.close()
            if attempt == 2:
                raise
