"""
The engine's own functions: discovery (``engine::functions::list``,
``engine::workers::list``, ``engine::triggers::list``, ``engine::trigger-types::list``)
and ``engine::workers::register``, which SDKs call on every connect with their metadata.

Result shapes follow ../shared/spec/engine-core.md §6.1; Python ``iii-sdk`` 0.10.0's
pydantic models require the WorkerInfo keys listed there.
"""

import time
from twisted.logger import Logger

from . import discovery_current as current
from .oplog import describe_worker
from .protocol import DESERIALIZATION_ERROR, InvocationError

_log = Logger()

_INCLUDE_INTERNAL = {
    "type": "object",
    "properties": {"include_internal": {"type": "boolean", "default": False}},
}
_LIST_FUNCTIONS = {
    "type": "object",
    "properties": {"include_internal": {"type": "boolean", "default": False},
                   "include_host": {"type": "boolean", "default": False}},
}
_LIST_TRIGGERS = {
    "type": "object",
    "properties": {"include_internal": {"type": "boolean", "default": False},
                   "include_refused": {"type": "boolean", "default": False}},
}


def _input(function_id, data):
    """
    @return: the call's input object ({} for null, which SDKs send when there is no
        payload).
    @raise InvocationError: ``deserialization_error`` for a non-object input.
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvocationError(
            DESERIALIZATION_ERROR,
            "Failed to deserialize input for {}: expected an object, got {}".format(
                function_id, type(data).__name__),
        )
    return data


def _flag(function_id, data, key):
    value = _input(function_id, data).get(key, False)
    if not isinstance(value, bool) and value is not None:
        raise InvocationError(DESERIALIZATION_ERROR, "Failed to deserialize input for "
                              "{}: {} must be a boolean".format(function_id, key))
    return bool(value)


def register_engine_functions(engine):
    """Register the ``engine::*`` discovery and worker functions on C{engine}."""

    # Discovery answers only what the calling session may call (engine.current_session;
    # None = every grant), as the reference's session-filtered lists.
    def visible(function_id, metadata=None):
        session = engine.current_session
        return session is None or session.may_call(function_id, metadata)

    def list_functions(data):
        internal = _flag("engine::functions::list", data, "include_internal")
        data = _input("engine::functions::list", data)
        host = _flag("engine::functions::list", data, "include_host")
        shape = current.current_shape(engine, data)
        rows = []
        for function_id, entry in engine.functions.items():
            if (internal or not function_id.startswith("engine::")
                    or (shape and function_id.startswith("engine::queue::"))) \
                    and visible(function_id, entry.metadata):
                row = current.function_row(engine, entry)
                # How many workers host it (iii_twisted.replicas); SDKs ignore the key.
                row["host_count"] = engine.replicas.host_count(function_id)
                if host:
                    _add_host(row, entry)
                if engine.cluster is not None:  # which member holds it
                    engine.cluster.function_row(row, entry)
                rows.append(row)
        return {"functions": current.filter_functions(rows, data, shape)}

    def list_workers(data):
        wanted = _input("engine::workers::list", data).get("worker_id")
        if engine.cluster is not None:  # every member's workers, not the links
            rows = engine.cluster.worker_rows(
                lambda w: current.worker_row(engine, w, _worker_info(engine, w)))
            if wanted is not None:
                rows = [row for row in rows if row.get("id") == wanted]
        else:
            workers = engine.workers.values()
            if wanted is not None:
                workers = [w for w in workers if w.id == wanted]
            rows = [current.worker_row(engine, w, _worker_info(engine, w))
                    for w in workers]
        if engine.current_session is not None:
            for row in rows:
                if isinstance(row.get("functions"), list):
                    row["functions"] = [f for f in row["functions"]
                                        if not isinstance(f, str) or visible(f)]
                    if "function_count" in row:
                        row["function_count"] = len(row["functions"])
        return {
            "workers": current.filter_workers(rows, _input("engine::workers::list", data)),
            "timestamp": int(time.time() * 1000),
        }

    def list_triggers(data):
        internal = _flag("engine::triggers::list", data, "include_internal")
        data = _input("engine::triggers::list", data)
        if current.current_shape(engine, data):
            # Since reference 0.13 this name lists trigger types (instances moved to
            # engine::registered-triggers::list): see discovery_current.
            listed = current.list_trigger_types(engine, data)
            session = engine.current_session
            if session is not None:
                listed["triggers"] = [t for t in listed["triggers"]
                                      if session.may_register_trigger(t["id"])]
            return listed
        if engine.cluster is not None:  # every member's triggers
            rows = engine.cluster.trigger_rows(
                (trigger, trigger.info()) for trigger in engine.triggers.values())
        else:
            rows = [trigger.info() for trigger in engine.triggers.values()]
        result = {"triggers": [
            row for row in rows
            if (internal or not str(row.get("function_id")).startswith("engine::"))
            and visible(row.get("function_id"))
        ]}
        if _flag("engine::triggers::list", data, "include_refused"):
            result["refused"] = [t for t in engine.refused_triggers
                                 if visible(t["function_id"])]
        return result

    def list_trigger_types(data):
        internal = _flag("engine::trigger-types::list", data, "include_internal")
        types = []
        session = engine.current_session
        for trigger_type in engine.trigger_types.values():
            if not internal and trigger_type.id.startswith("engine::"):
                continue
            if session is not None and not session.may_register_trigger(trigger_type.id):
                continue
            info = {"id": trigger_type.id, "description": trigger_type.description}
            if trigger_type.trigger_request_format is not None:
                info["trigger_request_format"] = trigger_type.trigger_request_format
            if trigger_type.call_request_format is not None:
                info["call_request_format"] = trigger_type.call_request_format
            types.append(info)
        return {"trigger_types": types}

    def register_worker(data):
        data = _input("engine::workers::register", data)
        worker_id = data.get("_caller_worker_id")
        if not isinstance(worker_id, str):
            raise InvocationError(
                DESERIALIZATION_ERROR, "Failed to deserialize input for "
                "engine::workers::register: missing field `_caller_worker_id`")
        worker = engine.workers.get(worker_id)
        if worker is None:
            _log.info("engine::workers::register for unknown worker {worker_id}",
                      worker_id=worker_id)
        else:
            first = worker.runtime is None
            _update_worker(worker, data)
            current.record_declaration(worker, data)
            # Reference 0.23: the connection's namespace (see namespaces.py).
            if not engine.namespaces.declare(worker, data):
                return {"success": False}
            if engine.frame_limits is not None:
                engine.frame_limits.learn(worker)
            if first:
                # The line that names a worker: its connect line had only an id.
                _log.info("{worker} registered", worker=describe_worker(worker),
                          worker_id=worker.id)
        engine.fire_triggers("engine::workers-available",
                             {"event": "worker_metadata_updated", "worker_id": worker_id})
        if engine.registry_watchers:
            engine.registry_changed()  # a cluster's peers show its name
        return {"success": True}

    engine.register_function(
        "engine::functions::list", list_functions,
        "List registered functions (engine::* ones only with include_internal; with "
        "include_host, each says where it runs: host worker|in-process|http, worker_id)",
        _LIST_FUNCTIONS,
        {"type": "object", "properties": {"functions": {"type": "array"}}},
    )
    engine.register_function(
        "engine::workers::list", list_workers,
        "List connected workers, optionally only the one with worker_id",
        {"type": "object", "properties": {"worker_id": {"type": ["string", "null"]}}},
        {"type": "object", "properties": {"workers": {"type": "array"},
                                          "timestamp": {"type": "integer"}}},
    )
    engine.register_function(
        "engine::triggers::list", list_triggers,
        "List registered triggers (those bound to engine::* functions only with "
        "include_internal; with include_refused, also the latest refused ones and why)",
        _LIST_TRIGGERS,
        {"type": "object", "properties": {"triggers": {"type": "array"}}},
    )
    engine.register_function(
        "engine::trigger-types::list", list_trigger_types,
        "List trigger types (engine::* ones only with include_internal)",
        _INCLUDE_INTERNAL,
        {"type": "object", "properties": {"trigger_types": {"type": "array"}}},
    )
    current.register_current_functions(engine, _input, _worker_info)
    engine.register_function(
        "engine::workers::register", register_worker,
        "Record the calling worker's metadata (sent by the SDKs on connect)",
        {"type": "object", "properties": {
            "runtime": {"type": "string"}, "version": {"type": "string"},
            "name": {"type": "string"}, "os": {"type": "string"},
            "pid": {"type": "integer"}, "telemetry": {"type": "object"}}},
        {"type": "object", "properties": {"success": {"type": "boolean"}}},
    )


def _add_host(info, entry):
    """Say where a function runs: ``host`` (worker, in-process, http) and ``worker_id``."""
    info["host"] = getattr(entry.host, "host_kind", "in-process")
    info["worker_id"] = entry.owner.id if entry.owner is not None else None


def _update_worker(worker, data):
    runtime = data.get("runtime")
    worker.runtime = runtime if isinstance(runtime, str) else "unknown"
    version = data.get("version")
    worker.version = version if isinstance(version, str) else None
    telemetry = data.get("telemetry")
    worker.telemetry = telemetry if isinstance(telemetry, dict) else None
    for key in ("name", "os"):
        value = data.get(key)
        if isinstance(value, str):
            setattr(worker, key, value)
    pid = data.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool):
        worker.pid = pid


def _worker_info(engine, worker):
    info = {
        "id": worker.id,
        "name": worker.name,
        "runtime": worker.runtime,
        "version": worker.version,
        "os": worker.os,
        "ip_address": worker.ip_address,
        "status": "connected",
        "connected_at_ms": worker.connected_at_ms,
        "function_count": len(worker.functions),
        "functions": sorted(worker.functions),
        "active_invocations": worker.active_calls + engine.tracker.count_for(worker),
        "latest_metrics": (engine.worker_metrics.latest(worker)
                           if engine.worker_metrics is not None else None),
    }
    if worker.pid is not None:
        info["pid"] = worker.pid
    return info
