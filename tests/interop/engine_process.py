"""
Start the engine as a real process for interop tests: ``twistd -n iii --config FILE``
on loopback, on free ports, waited for until it accepts TCP and stopped (process group
killed) afterwards.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

#: The Python that runs the engine: this one, or the one named by III_ENGINE_PYTHON
#: (e.g. a PyPy venv's bin/python), so that tests driving it with official SDK workers,
#: which need CPython >= 3.10, check the engine on PyPy (README, "Running on PyPy").
ENGINE_PYTHON = os.environ.get("III_ENGINE_PYTHON") or sys.executable
TWISTD = os.path.join(os.path.dirname(ENGINE_PYTHON), "twistd")


def free_port():
    """@return: a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout=20.0, process=None):
    """Wait until 127.0.0.1:port accepts TCP; raise if it does not within C{timeout}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError("engine exited with code {}".format(process.returncode))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a port for readiness, not waiting out a race
    raise TimeoutError("nothing listening on port {} after {}s".format(port, timeout))


def wait_until(predicate, timeout=10.0, what="condition"):
    """
    Poll C{predicate} until it returns something true, for state a test can only see
    by asking (discovery, a read function, a route table).

    @return: that true value.
    @raise AssertionError: if none comes within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after {}s waiting for {}".format(timeout, what))
        time.sleep(0.05)  # polling, bounded by the deadline


class EngineProcess:
    """
    One engine process.

    @ivar port: the worker WebSocket port.
    @ivar url: ``ws://127.0.0.1:<port>``.
    @ivar ports: every named port in the config's template (e.g. ``http``).
    @ivar log_path: the engine's combined stdout/stderr.
    """

    def __init__(self, config_text, workdir, env=None, **ports):
        self.port = free_port()
        self.ports = {name: free_port() for name in ports} if ports else {}
        self.url = "ws://127.0.0.1:{}".format(self.port)
        self.workdir = str(workdir)
        self.config_path = os.path.join(self.workdir, "iii-config.yaml")
        with open(self.config_path, "w") as f:
            f.write(config_text.format(port=self.port, **self.ports))
        self.log_path = os.path.join(self.workdir, "engine.log")
        self.env = dict(os.environ, **(env or {}))
        self.process = None

    def start(self, timeout=20.0, preexec_fn=None):
        """
        Start the process and wait for its worker port.

        @param preexec_fn: run in the child before twistd (e.g. to lower a limit).
        @return: self.
        """
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "iii", "--config", self.config_path],
            cwd=self.workdir, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=preexec_fn,
        )
        wait_for_port(self.port, timeout, self.process)
        for port in self.ports.values():
            wait_for_port(port, timeout, self.process)
        return self

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Stop the process (its whole group); SIGKILL if it does not exit in time."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        self.process = None
        self._log.close()

    def kill(self):
        """kill -9 the engine, as a crash would."""
        self.stop(signal.SIGKILL)

    def log(self):
        """@return: what the engine logged so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


class Waiter:
    """Collects values from SDK threads; wait for them with a bounded timeout."""

    def __init__(self):
        self._cond = threading.Condition()
        self.values = []

    def add(self, value):
        with self._cond:
            self.values.append(value)
            self._cond.notify_all()

    def wait_for(self, predicate=lambda values: values, timeout=10.0):
        """
        @return: the collected values once C{predicate(values)} is true.
        @raise AssertionError: if it is not within C{timeout} seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.values), timeout):
                raise AssertionError("timed out waiting; got {!r}".format(self.values))
            return list(self.values)
