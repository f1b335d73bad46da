"""
Start the engine as a real process for interop tests: ``twistd -n iii --config FILE``
on loopback, on free ports, waited for until it accepts TCP and stopped (process group
killed) afterwards.

Config templates are built from the pieces below: a head (top-level keys) and the
``modules:`` entries a test needs, e.g. C{v010_config(STATE_MEMORY, REST_API)}. They
are C{str.format} templates: EngineProcess fills ``{port}`` and named ports such as
``{http}``; literal braces are doubled.
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import yaml

#: The Python that runs the engine: this one, or the one named by III_ENGINE_PYTHON
#: (e.g. a PyPy venv's bin/python), so that tests driving it with official SDK workers,
#: which need CPython >= 3.10, check the engine on PyPy (README, "Running on PyPy").
ENGINE_PYTHON = os.environ.get("III_ENGINE_PYTHON") or sys.executable
TWISTD = os.path.join(os.path.dirname(ENGINE_PYTHON), "twistd")

# -- config templates ------------------------------------------------------------

#: The worker port, on loopback.
LISTEN = """\
port: {port}
host: 127.0.0.1
"""

#: The usual head: L{LISTEN} and a call timeout long enough for a loaded machine.
HEAD = LISTEN + "invocation_timeout_ms: 20000\n"


def v010_config(*modules, head=HEAD):
    """
    @param modules: ``modules:`` entries (the texts below), in order; none gives
        ``modules: []`` (the core only).
    @param head: the top-level keys before ``modules:``.
    @return: a config template in the v0.10 form (``modules:`` of ``class:`` entries).
    """
    if not modules:
        return head + "modules: []\n"
    return head + "modules:\n" + "".join(modules)


def module(cls, config=None):
    """
    @param config: the module's config (plain data, rendered as YAML; it holds no
        placeholders, so its braces are doubled for the template).
    @return: a ``modules:`` entry for a config of the test's own.
    """
    entry = "  - class: {}\n".format(cls)
    if config is not None:
        body = yaml.safe_dump({"config": config}, sort_keys=False, default_flow_style=False)
        entry += textwrap.indent(body, "    ").replace("{", "{{").replace("}", "}}")
    return entry


def queue_module(queue_configs=None, adapter=None):
    """
    @param queue_configs: {queue name: its settings}, e.g. C{{"jobs": {"max_retries": 3}}}.
    @param adapter: the adapter (C{{"class": ..., "config": {...}}}), or None for the
        built-in one in memory.
    @return: the queue module's entry.
    """
    config = {}
    if queue_configs is not None:
        config["queue_configs"] = queue_configs
    if adapter is not None:
        config["adapter"] = adapter
    return module("modules::queue::QueueModule", config)


def with_adapter(module_class, adapter_class, adapter_config=None):
    """@return: the entry of module C{module_class} on adapter C{adapter_class}."""
    adapter = {"class": adapter_class}
    if adapter_config is not None:
        adapter["config"] = adapter_config
    return module(module_class, {"adapter": adapter})


STATE_MEMORY = with_adapter("modules::state::StateModule", "modules::state::adapters::KvStore",
                            {"store_method": "in_memory"})


def state_file(file_path):
    """@return: the state module on the KV store, saved to C{file_path}."""
    return with_adapter("modules::state::StateModule", "modules::state::adapters::KvStore",
                        {"store_method": "file_based", "file_path": file_path})


def state_redis(redis_url):
    return with_adapter("modules::state::StateModule", "modules::state::adapters::RedisAdapter",
                        {"redis_url": redis_url})


def rest_api(default_timeout=None, more=""):
    """
    @param default_timeout: the ``default_timeout`` (ms) of HTTP-triggered calls, or
        None for the module's default.
    @param more: further lines of the module's config (indented 6).
    @return: the REST API module on loopback, on the named port ``{http}``.
    """
    timeout = "" if default_timeout is None else (
        "      default_timeout: {}\n".format(default_timeout))
    return """\
  - class: modules::api::RestApiModule
    config:
      host: 127.0.0.1
      port: {http}
""" + timeout + more


#: The REST API with a 10 s default timeout for HTTP-triggered calls.
REST_API = rest_api(default_timeout=10000)

PUBSUB_LOCAL = with_adapter("modules::pubsub::PubSubModule", "modules::pubsub::LocalAdapter")


def pubsub_redis(redis_url):
    return with_adapter("modules::pubsub::PubSubModule", "modules::pubsub::RedisAdapter",
                        {"redis_url": redis_url})


CRON_KV = with_adapter("modules::cron::CronModule", "modules::cron::KvCronAdapter")


def cron_redis(redis_url):
    return with_adapter("modules::cron::CronModule", "modules::cron::RedisCronAdapter",
                        {"redis_url": redis_url})


#: The stream module's WebSocket on loopback, on the named port ``{stream}``.
STREAM = """\
  - class: modules::stream::StreamModule
    config:
      port: {stream}
      host: 127.0.0.1
"""


def stream_redis(redis_url):
    return STREAM + """\
      adapter:
        class: modules::stream::adapters::RedisAdapter
        config:
          redis_url: "{}"
""".format(redis_url)


def http_functions(url_allowlist):
    """
    @param url_allowlist: the hosts HTTP functions may call.
    @return: the HTTP functions module, let call loopback over plain HTTP.
    """
    return module("modules::http_functions::HttpFunctionsModule", {"security": {
        "url_allowlist": url_allowlist, "require_https": False, "block_private_ips": False}})


def otel(service_name="iii-test"):
    """
    @param service_name: the ``service_name``, or None for the module's default.
    @return: the OpenTelemetry module keeping spans, logs and metrics in memory
        (readable with the engine's functions), not printing logs.
    """
    config = {} if service_name is None else {"service_name": service_name}
    config.update(exporter="memory", logs_console_output=False)
    return module("modules::observability::OtelModule", config)


OTEL = otel()


# -- processes -------------------------------------------------------------------

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


def http_request(url, data=None, method=None, headers=None, timeout=20):
    """
    One HTTP request; an error status is an answer like any other.

    @return: (status, headers, body bytes).
    @raise OSError: when no answer comes (refused, reset, timed out).
    """
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def wait_or_kill(process, timeout):
    """Wait for C{process} to exit; past C{timeout} seconds, SIGKILL its group."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


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
            wait_or_kill(self.process, timeout)
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
