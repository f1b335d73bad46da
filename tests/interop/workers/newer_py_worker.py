"""
A newer official PyPI ``iii-sdk`` (0.2x) worker driven line by line, for the interop
tests. It runs under the interpreter of its own virtualenv (that SDK cannot share a
venv with 0.10.0) and uses the SDK unmodified, through its public API:

    <newer-venv>/bin/python newer_py_worker.py <engine-url> <worker-name>

The line protocol is node/worker.mjs's (see there and ../sdk_process.py): commands
``{"id", "op", ...}`` on stdin, one ``{"reply": id, "ok": ...}`` line each, and
``{"event": ...}`` lines on stdout. The namespace, when the test wants one, comes
from the SDK's own ``III_NAMESPACE`` environment variable.
"""

import json
import logging
import sys
import threading
from importlib.metadata import version

from iii import InitOptions, register_worker
from iii.triggers import TriggerHandler

SDK_VERSION = version("iii-sdk")
_print_lock = threading.Lock()


def emit(line):
    with _print_lock:
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


def main(url, name):
    # The SDK's telemetry socket says where it connected (and any retry) at debug level.
    telemetry_log = logging.getLogger("iii.telemetry_exporters")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[telemetry] %(message)s"))
    telemetry_log.addHandler(handler)
    telemetry_log.setLevel(logging.DEBUG)
    # The SDK's own warnings and errors (a trigger registration the engine reports
    # failed, a registration it rejected).
    sdk_log = logging.getLogger("iii.iii")
    sdk_handler = logging.StreamHandler(sys.stdout)
    sdk_handler.setFormatter(logging.Formatter("[iii-%(levelname)s] %(message)s"))
    sdk_handler.setLevel(logging.WARNING)
    sdk_log.addHandler(sdk_handler)
    worker = register_worker(url, InitOptions(worker_name=name))
    triggers = []
    provided = {}  # trigger id -> {type_id, function_id, config}
    function_refs = {}

    def make_handler(function_id, http=False, fail=False):
        # A handler that declares ``metadata`` is given the invocation metadata.
        def handler(data, metadata=None):
            if fail:  # a handler that always fails (queue retries)
                emit({"event": "invoked", "function_id": function_id, "data": data,
                      "metadata": metadata})
                raise RuntimeError("always fails")
            if http:  # the request's body and response channels are not JSON
                data = {k: data.get(k) for k in ("method", "path_params", "body")}
            emit({"event": "invoked", "function_id": function_id, "data": data,
                  "metadata": metadata})
            result = {"handled_by": name, "sdk": SDK_VERSION, "data": data}
            if isinstance(data, dict) and data.get("call"):
                result["nested"] = worker.trigger({
                    "function_id": data["call"]["function_id"],
                    "payload": data["call"]["payload"],
                })
            return {"status_code": 201, "body": result} if http else result
        return handler

    class Provider(TriggerHandler):
        def __init__(self, type_id, refuse=None):
            self.type_id = type_id
            self.refuse = refuse

        async def register_trigger(self, config):
            if self.refuse:
                raise ValueError(self.refuse)
            provided[config.id] = {"type_id": self.type_id,
                                   "function_id": config.function_id,
                                   "config": config.config}
            emit({"event": "trigger_registered", "type_id": self.type_id,
                  "id": config.id, "function_id": config.function_id,
                  "config": config.config, "metadata": config.metadata})

        async def unregister_trigger(self, config):
            provided.pop(config.id, None)
            emit({"event": "trigger_unregistered", "type_id": self.type_id,
                  "id": config.id, "function_id": config.function_id})

    def list_via(function_id, key, payload=None):
        return {"result": worker.trigger({"function_id": function_id,
                                          "payload": payload or {}})[key]}

    ops = {
        "register_function": lambda c: function_refs.__setitem__(
            c["function_id"], worker.register_function(
                c["function_id"], make_handler(c["function_id"], c.get("http", False),
                                               c.get("fail", False)),
                description=c.get("description"))) or {},
        # A function answering {"size", "echo"} for data {"blob": str}, silently (the
        # blob may be tens of MiB), and a call sending such a blob: frame sizes.
        "register_big_echo": lambda c: function_refs.__setitem__(
            c["function_id"], worker.register_function(
                c["function_id"], lambda data: {"size": len(data["blob"]),
                                                "echo": data["blob"]})) or {},
        "call_big": lambda c: (lambda r: {"size": r["size"], "echo_size": len(r["echo"]),
                                          "intact": r["echo"] == "x" * c["size"]})(
            worker.trigger({"function_id": c["function_id"],
                            "payload": {"blob": "x" * c["size"]},
                            "timeout_ms": 60000})),
        "unregister_function": lambda c: function_refs.pop(c["function_id"]).unregister() or {},
        "call": lambda c: {"result": worker.trigger(dict(
            {"function_id": c["function_id"], "payload": c.get("payload")},
            **({"action": {"type": "void"}} if c.get("void") else {}),
            **({"action": {"type": "enqueue", "queue": c["enqueue"]}}
               if c.get("enqueue") else {}),
            **({"metadata": c["metadata"]} if "metadata" in c else {}),
            **({"namespace": c["namespace"]} if "namespace" in c else {})))},
        "register_trigger": lambda c: triggers.append(worker.register_trigger(dict({
            "type": c["type"], "function_id": c["function_id"],
            "config": c.get("config")},
            **({"metadata": c["metadata"]} if "metadata" in c else {})))) or {
                "trigger_id": len(triggers) - 1},
        "unregister_trigger": lambda c: triggers[c["trigger_id"]].unregister() or {},
        "register_trigger_type": lambda c: worker.register_trigger_type(
            {"id": c["type_id"], "description": c["description"]},
            Provider(c["type_id"], c.get("refuse"))) and {},
        "fire": lambda c: {"results": [
            {"trigger_id": trigger_id,
             "result": worker.trigger({"function_id": t["function_id"],
                                       "payload": c.get("payload")})}
            for trigger_id, t in list(provided.items()) if t["type_id"] == c["type_id"]]},
        "list_functions": lambda c: list_via("engine::functions::list", "functions"),
        "list_workers": lambda c: list_via("engine::workers::list", "workers"),
        "list_triggers": lambda c: list_via(
            "engine::triggers::list", "triggers",
            {"include_internal": c.get("include_internal", False)}),
        "list_trigger_types": lambda c: list_via(
            "engine::trigger-types::list", "trigger_types",
            {"include_internal": c.get("include_internal", False)}),
        "worker_id": lambda c: {"worker_id": worker.worker_id},
        "shutdown": lambda c: worker.shutdown() or {},
    }

    emit({"event": "started", "sdk": SDK_VERSION, "name": name})
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        try:
            reply = dict(ops[command["op"]](command), reply=command["id"], ok=True)
        except Exception as e:
            error = {"message": str(e)}
            for key in ("code", "function_id"):
                if getattr(e, key, None) is not None:
                    error[key] = getattr(e, key)
            reply = {"reply": command["id"], "ok": False, "error": error}
        emit(reply)
        if command["op"] == "shutdown":
            return
    worker.shutdown()  # stdin closed: the test went away


if __name__ == "__main__":
    main(*sys.argv[1:3])
