"""The engine embedded in an existing Twisted application (examples/embedded.tac)."""

import os
import subprocess

from iii import InitOptions, register_worker

from engine_process import TWISTD, free_port, wait_for_port

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "embedded.tac")


def test_embedded_engine_serves_workers(tmp_path):
    """Workers call the app's functions, and the app calls a worker's function."""
    port = free_port()
    with open(tmp_path / "embedded.log", "wb") as log:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-y", os.path.abspath(EXAMPLE)], cwd=str(tmp_path),
            env=dict(os.environ, III_PORT=str(port)), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    worker = None
    try:
        wait_for_port(port, process=process)
        worker = register_worker("ws://127.0.0.1:{}".format(port),
                                 InitOptions(worker_name="w", otel={"enabled": False}))
        worker.register_function({"id": "shout::upper"}, lambda data: data["text"].upper())
        assert worker.trigger({"function_id": "app::greet", "payload": {"name": "ann"}}) == {
            "greeting": "hello ann"}
        assert worker.trigger({"function_id": "app::shout", "payload": {"text": "hi"}}) == {
            "shouted": "HI"}
    finally:
        if worker is not None:
            worker.shutdown()
        process.terminate()
        process.wait(10)
