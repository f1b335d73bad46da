"""The engine core driven by the official Python SDK (iii-sdk 0.10.0) over loopback."""

import pytest

from engine_process import Waiter, wait_until


def test_worker_calls_function_of_another_worker(engine, sdk_worker):
    """A function registered by one SDK worker is called by another, with the result back."""
    host = sdk_worker(engine.url, "host")
    caller = sdk_worker(engine.url, "caller")
    seen = Waiter()

    def add(data):
        seen.add(data)
        return {"sum": data["a"] + data["b"]}

    host.register_function({"id": "math::add"}, add)
    _wait_for_function(caller, "math::add")
    assert caller.trigger({"function_id": "math::add", "payload": {"a": 2, "b": 3}}) == {"sum": 5}
    # The engine tells the target who called.
    assert seen.values[0]["_caller_worker_id"] == caller.worker_id


def test_unknown_function_fails_at_once(engine, sdk_worker):
    """Calling an id nobody registered is a prompt function_not_found, not a timeout."""
    caller = sdk_worker(engine.url, "caller")
    with pytest.raises(Exception, match="function_not_found"):
        caller.trigger({"function_id": "nope::missing", "payload": {}, "timeout_ms": 5000})


def _wait_for_function(client, function_id, timeout=10.0):
    wait_until(lambda: any(f.function_id == function_id for f in client.list_functions()),
               timeout, function_id)


def test_nan_result_fails_the_call_and_nan_registration_is_refused(engine, sdk_worker):
    """
    The Python SDK writes NaN (json's default); it is not JSON. A result holding one
    fails that call at once; a registration holding one is refused and discovery
    stays readable for every worker.
    """
    import time

    host = sdk_worker(engine.url, "nan-host")
    caller = sdk_worker(engine.url, "nan-caller")
    host.register_function({"id": "nan::result"}, lambda data: {"x": float("nan")})
    host.register_function({"id": "nan::meta", "metadata": {"w": float("nan")}},
                           lambda data: None)
    host.register_function({"id": "nan::after"}, lambda data: "ok")
    _wait_for_function(caller, "nan::after")
    started = time.monotonic()
    with pytest.raises(Exception, match="invocation_failed"):
        caller.trigger({"function_id": "nan::result", "payload": {}, "timeout_ms": 10000})
    assert time.monotonic() - started < 5  # at once, not at a timeout
    listed = {f.function_id for f in caller.list_functions()}
    assert {"nan::result", "nan::after"} <= listed and "nan::meta" not in listed
