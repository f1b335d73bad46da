"""
Engine lifecycle with real processes: start-up errors, a worker killed mid-call,
discovery and engine events seen by official SDK workers, bad input on a real socket.
"""

import os
import subprocess
import sys
import threading
import time

import pytest
from websockets.sync.client import connect as ws_connect

from engine_process import TWISTD, Waiter, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))


def function_ids(client):
    return {f.function_id for f in client.list_functions()}


def run_twistd(config_text, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(config_text)
    return subprocess.run([TWISTD, "-n", "--pidfile=", "iii", "--config", str(path)],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("config_text, expected", [
    ("port: [oops\n", "invalid YAML"),
    ("modules:\n  - class: modules::nope::Nope\n", "key modules[0].class: unknown module class"),
    ("port: not-a-port\n", "key port: must be an integer"),
    ("port: ${III_TEST_SURELY_UNSET}\n", "key port: environment variable III_TEST_SURELY_UNSET"),
])
def test_unusable_config_exits_non_zero(tmp_path, config_text, expected):
    """twistd iii stops with a non-zero code and a message naming the file and key."""
    result = run_twistd(config_text, tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "bad.yaml" in output and expected in output


def test_port_taken_exits_non_zero(tmp_path):
    """A worker port that is already bound stops the engine with an error."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd("port: {}\nhost: 127.0.0.1\n".format(port), tmp_path)
    assert result.returncode != 0
    assert "iii: error: port {} is in use (iii-worker-manager listener)".format(port) in \
        result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_port_taken_in_daemon_mode(tmp_path):
    """A daemonised engine whose HTTP port is taken says which port and listener."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "c.yaml"
        path.write_text("port: 0\nlisten: tcp:0:interface=127.0.0.1\nmodules:\n"
                        "  - class: modules::api::RestApiModule\n"
                        "    config: {{host: 127.0.0.1, port: {}}}\n".format(port))
        result = subprocess.run(
            [TWISTD, "--pidfile", str(tmp_path / "e.pid"), "--logfile",
             str(tmp_path / "e.log"), "iii", "--config", str(path)],
            cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "port {} is in use (iii-http listener)".format(port) in result.stderr
    assert not (tmp_path / "e.pid").exists()


def test_config_error_is_one_line(tmp_path):
    """A config mistake is one line on stderr naming file, key and the likely key."""
    result = run_twistd("modules:\n  - class: modules::api::RestApiModule\n"
                        "    config: {prot: 3111}\n", tmp_path)
    assert result.returncode == 1
    assert result.stderr == ("iii: error: {}, key modules[0].config.prot: unknown key "
                             "'prot'; did you mean 'port'?\n".format(tmp_path / "bad.yaml"))
    assert result.stdout == ""


def test_worker_killed_mid_call(engine, sdk_worker):
    """Killing the worker running a call fails that call with invocation_stopped at once."""
    worker = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "workers", "hanging_worker.py"), engine.url],
        stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "READY"
        caller = sdk_worker(engine.url, "caller")
        wait_until(lambda: "hang::forever" in function_ids(caller), what="hang::forever")
        outcome = Waiter()

        def call():
            try:
                outcome.add(("result", caller.trigger(
                    {"function_id": "hang::forever", "payload": {"n": 1}, "timeout_ms": 20000})))
            except Exception as e:
                outcome.add(("error", str(e)))

        threading.Thread(target=call, daemon=True).start()
        assert worker.stdout.readline().strip() == "STARTED 1"
        started = time.monotonic()
        worker.kill()
        [(kind, text)] = outcome.wait_for(timeout=10)
        assert kind == "error" and "invocation_stopped" in text
        assert time.monotonic() - started < 5
        wait_until(lambda: "hang::forever" not in function_ids(caller), what="cleanup")
    finally:
        worker.kill()
        worker.wait()


def test_discovery_and_worker_events(engine, sdk_worker):
    """Workers see each other's metadata, and engine::workers-available events fire."""
    watcher = sdk_worker(engine.url, "watcher")
    events = Waiter()
    watcher.register_function({"id": "watch::workers"}, lambda data: events.add(data))
    watcher.register_trigger({"type": "engine::workers-available",
                              "function_id": "watch::workers", "config": {}})
    wait_until(lambda: any(t.function_id == "watch::workers"
                           for t in watcher.list_triggers()), what="trigger")
    other = sdk_worker(engine.url, "other-worker")
    other_id = other.worker_id or wait_until(lambda: other.worker_id, what="worker id")
    events.wait_for(lambda values: any(
        v.get("event") == "worker_metadata_updated" and v.get("worker_id") == other_id
        for v in values))
    [info] = [w for w in watcher.list_workers() if w.id == other_id]
    assert info.name == "other-worker" and info.runtime == "python" and info.version == "0.10.0"
    other.shutdown()
    events.wait_for(lambda values: {"event": "worker_disconnected", "worker_id": other_id}
                    in [{k: v.get(k) for k in ("event", "worker_id")} for v in values])


def test_custom_trigger_type_registered_before_provider(engine, sdk_worker):
    """A trigger on a type nobody provides yet reaches the provider when it arrives."""
    from iii.triggers import TriggerHandler

    user = sdk_worker(engine.url, "user")
    user.register_function({"id": "hooks::github"}, lambda data: None)
    user.register_trigger({"type": "webhook", "function_id": "hooks::github",
                           "config": {"path": "/gh"}})
    received = Waiter()

    class Webhooks(TriggerHandler):
        async def register_trigger(self, config):
            received.add(("register", config.function_id, config.config))

        async def unregister_trigger(self, config):
            received.add(("unregister", config.function_id))

    provider = sdk_worker(engine.url, "provider")
    provider.register_trigger_type({"id": "webhook", "description": "hooks"}, Webhooks())
    assert received.wait_for()[0] == ("register", "hooks::github", {"path": "/gh"})


def test_functions_available_callback(engine, sdk_worker):
    """on_functions_available tells a worker when another registers a function."""
    watcher = sdk_worker(engine.url, "watcher")
    seen = Waiter()
    watcher.on_functions_available(lambda functions: seen.add({f.function_id for f in functions}))
    wait_until(lambda: any(t.trigger_type == "engine::functions-available"
                           for t in watcher.list_triggers(include_internal=True)),
               what="functions-available trigger")
    other = sdk_worker(engine.url, "other")
    other.register_function({"id": "fresh::fn"}, lambda data: 1)
    seen.wait_for(lambda values: any("fresh::fn" in v for v in values))


def test_garbage_on_a_real_socket_harms_nobody(engine, sdk_worker):
    """Bad frames on one connection leave it open, and other workers unaffected."""
    host = sdk_worker(engine.url, "host")
    host.register_function({"id": "svc::echo"}, lambda data: data["v"])
    with ws_connect(engine.url) as rogue:
        rogue.recv(timeout=5)  # workerregistered
        for frame in ["{nope", "[]", '{"type":"nope"}', '{"type":"registerfunction","id":5}',
                      '{"type":"invokefunction","function_id":"svc::echo","invocation_id":"r1"}']:
            rogue.send(frame)
        rogue.send(b"\x00\x01binary junk")
        answer = rogue.recv(timeout=5)  # the well-formed invoke (data null) is answered
        assert '"invocation_id":"r1"' in answer
        rogue.send('{"type":"ping"}')
        assert rogue.recv(timeout=5) == '{"type":"pong"}'
    caller = sdk_worker(engine.url, "caller")
    wait_until(lambda: "svc::echo" in function_ids(caller), what="svc::echo")
    assert caller.trigger({"function_id": "svc::echo", "payload": {"v": 7}}) == 7
