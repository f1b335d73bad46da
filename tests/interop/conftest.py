"""
Fixtures for interop tests: a real engine process on loopback, and official
``iii-sdk`` (PyPI 0.10.0) workers connected to it.
"""

import re
import sys

import pytest

from engine_process import EngineProcess, Waiter, v010_config

try:
    from iii import InitOptions, register_worker
except ImportError:
    if sys.version_info >= (3, 10):
        raise  # it installs here: a missing SDK is a broken environment, not a skip
    # PyPI iii-sdk 0.10.0 needs Python >= 3.10, so it cannot exist on PyPy 3.9: the
    # modules using it are skipped here, and run from the CPython pass with the engine
    # on PyPy (III_ENGINE_PYTHON, README "Running on PyPy"; .ci/run does both).
    InitOptions = register_worker = None

SDK_ON_CPYTHON = (
    "needs the official iii-sdk 0.10.0 (Python >= 3.10), which cannot install on this "
    "Python {}.{}: runs in the CPython pass, driving the engine on PyPy "
    "(III_ENGINE_PYTHON)".format(*sys.version_info[:2]))
USES_SDK = re.compile(r"^\s*(from iii[. ]|import iii\b)|\b(sdk_worker|echo_peer)\b", re.M)


class _SdkUnavailableModule(pytest.Module):
    """A test module that uses the Python SDK, on a Python the SDK cannot install on."""

    def _getobj(self):
        pytest.skip(SDK_ON_CPYTHON, allow_module_level=True)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    if register_worker is None and module_path.name.startswith("test_"):
        if USES_SDK.search(module_path.read_text(encoding="utf-8")):
            return _SdkUnavailableModule.from_parent(parent, path=module_path)
    return None

CORE_CONFIG = v010_config()


@pytest.fixture
def start_engine(tmp_path):
    """
    @return: a function C{start(config_text=CORE_CONFIG, env=None, workdir=None,
        preexec_fn=None, **ports)} that starts an engine (ports named in the template
        are chosen free; C{workdir}, a directory name under the test's tmp_path, for
        engines that must not share files) and stops it after the test.
    """
    engines = []

    def start(config_text=CORE_CONFIG, env=None, workdir=None, preexec_fn=None, **ports):
        directory = tmp_path
        if workdir is not None:
            directory = tmp_path / workdir
            directory.mkdir()
        engine = EngineProcess(config_text, directory, env=env, **ports)
        engines.append(engine)
        return engine.start(preexec_fn=preexec_fn)

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


@pytest.fixture
def echo_peer(sdk_worker):
    """
    @return: a function C{start(url, name, function_id, description)} giving a 0.10.0
        worker C{name} hosting C{function_id} (registered), which answers
        C{{"handled_by": name, "data": data}}, and a L{Waiter} of the data it was
        called with.
    """
    def start(url, name, function_id, description):
        worker = sdk_worker(url, name)
        seen = Waiter()

        def echo(data):
            seen.add(data)
            return {"handled_by": name, "data": data}

        worker.register_function({"id": function_id, "description": description}, echo)
        # Same connection: once listed, the registration is in force for every peer.
        listed = worker.trigger({"function_id": "engine::functions::list", "payload": {}})
        assert function_id in {f["function_id"] for f in listed["functions"]}
        return worker, seen

    return start
