"""
Fixtures for interop tests: a real engine process on loopback, and official
``iii-sdk`` (PyPI 0.10.0) workers connected to it.
"""

import pytest
from iii import InitOptions, register_worker

from engine_process import EngineProcess

CORE_CONFIG = """
port: {port}
host: 127.0.0.1
invocation_timeout_ms: 20000
modules: []
"""


@pytest.fixture
def start_engine(tmp_path):
    """
    @return: a function C{start(config_text=CORE_CONFIG, **ports)} that starts an
        engine (ports named in the template are chosen free) and stops it after the
        test.
    """
    engines = []

    def start(config_text=CORE_CONFIG, env=None, **ports):
        engine = EngineProcess(config_text, tmp_path, env=env, **ports)
        engines.append(engine)
        return engine.start()

    yield start
    for engine in engines:
        engine.stop()


@pytest.fixture
def engine(start_engine):
    """A running engine with the core only."""
    return start_engine()


@pytest.fixture
def sdk_worker():
    """
    @return: a function C{connect(url, name)} giving a connected official SDK worker,
        shut down after the test.
    """
    workers = []

    def connect(url, name):
        # The SDK would otherwise turn OpenTelemetry on for the whole process, aimed at
        # III_URL or ws://localhost:49134 rather than this engine; telemetry has its
        # own tests (test_observability_sdk.py, with a worker subprocess).
        worker = register_worker(url, InitOptions(worker_name=name, otel={"enabled": False}))
        workers.append(worker)
        return worker

    yield connect
    for worker in workers:
        # III.shutdown() on a client already shut down waits forever on its stopped
        # loop (iii-sdk 0.10.0), so skip those a test shut down itself.
        if worker._thread.is_alive():
            worker.shutdown()
