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
