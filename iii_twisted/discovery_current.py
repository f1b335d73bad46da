"""
The engine functions the reference added after v0.10, and the row shapes current SDKs
and the reference's console read (reference ``engine/src/workers/engine_fn/mod.rs``,
tags ``iii/v0.13.0`` .. ``iii/v0.23.0-rc.4``; ../shared/spec/current-reference.md
§1.5):

- ``engine::functions::info`` ``{function_id}`` -> one FunctionDetail, or
  ``{function_ids: [...]}`` (at most 32) -> ``{"functions": [detail or
  {"function_id", "error": "not_found"}]}``;
- ``engine::workers::info`` ``{name, namespace?}`` -> ``{worker, functions,
  trigger_types, registered_triggers}``;
- ``engine::triggers::info`` ``{id, namespace?}`` -> a TriggerTypeDetail;
- ``engine::registered-triggers::list`` -> ``{"registered_triggers": [...]}`` and
  ``engine::registered-triggers::info`` ``{id}``;
- ``engine::register_trigger`` ``{trigger_type, function_id, config?, metadata?}``
  -> ``{id}`` and ``engine::unregister_trigger`` ``{id}`` -> ``{removed}``: bindings
  owned by the engine, not by the calling connection, so they outlive it.

One name means two things across the generations: ``engine::triggers::list`` lists
trigger *instances* in v0.10 and trigger *types* since 0.13. The engine answers each
caller in the shape its SDK expects, decided from the SDK ``version`` the connection
declared in ``engine::workers::register`` (0.13 or later, or any declared
``features``: the current shape); a connection that declared nothing, or an
in-process caller, gets the v0.10 shape (L{current_shape}).

Errors are the reference's: ``NOT_FOUND`` and ``INVALID_ARGUMENTS`` with its
messages, ``deserialization_error`` for input of the wrong type.
"""

import json
import re
from uuid import uuid4

from . import namespaces
from .interfaces import TriggerError
from .protocol import DESERIALIZATION_ERROR, TRIGGER_REGISTRATION_FAILED, InvocationError

DEFAULT_NAMESPACE = "default"
FUNCTION_INFO_BATCH_MAX = 32  # reference FUNCTION_INFO_BATCH_MAX
CONFIG_SUMMARY_MAX_LEN = 80  # reference CONFIG_SUMMARY_MAX_LEN
NOT_FOUND = "NOT_FOUND"
INVALID_ARGUMENTS = "INVALID_ARGUMENTS"

# SDK releases from this one on read engine::triggers::list as trigger types.
CURRENT_SHAPE_SINCE = (0, 13)
_VERSION = re.compile(r"^\s*v?(\d+)\.(\d+)")


# -- what a worker declares --------------------------------------------------------

def record_declaration(worker, data):
    """
    Keep what a worker declared in ``engine::workers::register`` beyond the v0.10
    keys: ``description`` and ``isolation`` (strings, shown by discovery),
    ``features`` (a list of strings: py 0.25 sends ``observe.v1``,
    ``local-dispatch.v1``, ``large-messages.v1``). Values of the wrong type are
    ignored, as unknown keys are.
    """
    declared = {}
    for key in ("description", "isolation"):
        value = data.get(key)
        if isinstance(value, str):
            declared[key] = value
    features = data.get("features")
    if isinstance(features, list):
        declared["features"] = tuple(f for f in features if isinstance(f, str))
    worker.declared.update(declared)


def _sdk_version(worker):
    match = _VERSION.match(worker.version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def current_shape(engine, data):
    """
    @param data: the input of a discovery call (its ``_caller_worker_id`` names the
        calling connection).
    @return: True when the caller's SDK reads the discovery shapes of 0.13 and later
        (it declared an SDK ``version`` >= 0.13, or capability ``features``), False
        for the v0.10 shapes (the default: nothing declared, an older SDK, or an
        in-process caller).
    """
    caller = data.get("_caller_worker_id") if isinstance(data, dict) else None
    worker = engine.workers.get(caller) if isinstance(caller, str) else None
    if worker is None:
        return False
    if worker.declared.get("features"):
        return True
    version = _sdk_version(worker)
    return version is not None and version >= CURRENT_SHAPE_SINCE


# -- rows ----------------------------------------------------------------------------

namespace_of = namespaces.of


def _first_segment(name):
    return name.split("::", 1)[0]


def function_worker_name(engine, function_id):
    """
    @return: the name of the worker hosting C{function_id}, or (for the engine's own
        functions, an unnamed worker or an unknown id) the id's first ``::`` segment,
        as the reference does.
    """
    entry = engine.functions.get(function_id)
    owner = entry.owner if entry is not None else None
    if owner is not None and owner.name:
        peer = getattr(owner.connection, "cluster_peer", None)
        if peer is not None:  # another cluster member's: its worker's name there
            held = peer.worker_of.get(function_id)
            if held is not None:
                return held[1]
        return owner.name
    return _first_segment(namespaces.plain(function_id))


def _type_worker_name(trigger_type):
    owner = trigger_type.owner
    if owner is not None and owner.name:
        return owner.name
    return _first_segment(trigger_type.id)


def function_row(engine, entry):
    """
    @return: an ``engine::functions::list`` row: the v0.10 FunctionInfo keys (0.10
        SDKs require them) plus the reference's FunctionSummary keys ``namespace`` and
        ``worker_name``.
    """
    row = entry.info()
    row["namespace"] = namespaces.split(entry.function_id)[0]
    row["worker_name"] = function_worker_name(engine, entry.function_id)
    return row


def _contains(needle, *haystacks):
    needle = needle.lower()
    return any(needle in (h or "").lower() for h in haystacks)


def _optional_str(function_id, data, key):
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise InvocationError(DESERIALIZATION_ERROR, "Failed to deserialize input for "
                              "{}: {} must be a string".format(function_id, key))
    return value


def _required_str(function_id, data, key):
    value = data.get(key)
    if not isinstance(value, str):
        raise InvocationError(DESERIALIZATION_ERROR, "Failed to deserialize input for "
                              "{}: missing field `{}`".format(function_id, key))
    return value


def filter_functions(rows, data, current):
    """
    Apply the reference's ``engine::functions::list`` filters (``search``: a
    case-insensitive substring of the id or description, ranked id hits first;
    ``prefix``; ``worker``/``workers``: worker names). A current-shape caller also
    sees the public ``engine::queue::*`` functions the reference lists by default.
    """
    fid = "engine::functions::list"
    search = _optional_str(fid, data, "search")
    prefix = _optional_str(fid, data, "prefix")
    worker = _optional_str(fid, data, "worker")
    workers = data.get("workers")
    if workers is not None and not (isinstance(workers, list)
                                    and all(isinstance(w, str) for w in workers)):
        raise InvocationError(DESERIALIZATION_ERROR, "Failed to deserialize input for "
                              "{}: workers must be a list of strings".format(fid))
    if prefix:
        rows = [r for r in rows if r["function_id"].startswith(prefix)]
    if worker is not None or workers:
        names = set(workers or ()) | ({worker} if worker is not None else set())
        rows = [r for r in rows if r["worker_name"] in names]
    if search:
        rows = [r for r in rows if _contains(search, r["function_id"], r["description"])]
        needle = search.lower()

        def rank(row):
            fn = row["function_id"].lower()
            if fn.startswith(needle) or needle in fn.split("::"):
                return (0, fn)
            return (1 if needle in fn else 2, fn)
        return sorted(rows, key=rank)
    return sorted(rows, key=lambda r: r["function_id"]) if current else rows


def worker_row(engine, worker, base):
    """
    @param base: the v0.10 WorkerInfo dict of the worker.
    @return: C{base} plus the reference's WorkerSummary keys ``description``,
        ``namespace`` and ``isolation``.
    """
    row = dict(base)
    row["description"] = worker.declared.get("description")
    row["namespace"] = namespace_of(worker)
    row["isolation"] = worker.declared.get("isolation")
    return row


def filter_workers(rows, data):
    """The reference's ``engine::workers::list`` filters: runtime, status, search."""
    fid = "engine::workers::list"
    runtime = _optional_str(fid, data, "runtime")
    status = _optional_str(fid, data, "status")
    search = _optional_str(fid, data, "search")
    if runtime is not None:
        rows = [r for r in rows if r["runtime"] == runtime]
    if status is not None:
        rows = [r for r in rows if r["status"] == status]
    if search:
        rows = [r for r in rows if _contains(search, r["name"])]
    return rows


def trigger_type_summary(trigger_type):
    """@return: the reference's TriggerTypeSummary of a L{TriggerType}."""
    return {
        "id": trigger_type.id,
        "namespace": namespace_of(trigger_type.owner),
        "worker_name": _type_worker_name(trigger_type),
        "description": trigger_type.description or "",
    }


def trigger_type_detail(engine, trigger_type):
    """@return: the reference's TriggerTypeDetail (with ``instance_count``)."""
    detail = trigger_type_summary(trigger_type)
    if trigger_type.trigger_request_format is not None:
        detail["configuration_schema"] = trigger_type.trigger_request_format
    if trigger_type.call_request_format is not None:
        detail["request_schema"] = trigger_type.call_request_format
    detail["instance_count"] = sum(
        1 for t in engine.triggers.values() if t.trigger_type == trigger_type.id)
    return detail


def config_summary(config):
    """@return: the config as compact JSON, cut at 80 characters with an ellipsis."""
    try:
        raw = json.dumps(config, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        raw = "{}"
    if len(raw) <= CONFIG_SUMMARY_MAX_LEN:
        return raw
    return raw[:CONFIG_SUMMARY_MAX_LEN] + "\u2026"


def registered_trigger_summary(engine, trigger):
    """
    @return: the reference's RegisteredTriggerSummary of a L{Trigger}, plus our
        ``status`` (``pending``/``active``/``failed``) and ``error`` when failed.
    """
    namespace, function_id = namespaces.split(trigger.function_id)
    row = {
        "id": trigger.id,
        "trigger_type": trigger.trigger_type,
        "function_id": function_id,
        "namespace": namespace,
        "worker_name": function_worker_name(engine, trigger.function_id),
        "config": trigger.config,
        "config_summary": config_summary(trigger.config),
        "status": trigger.status,
    }
    if trigger.error is not None:
        row["error"] = trigger.error
    if engine.cluster is not None:
        row["engine_id"], row["engine_name"] = engine.cluster.engine_of(trigger.owner)
    return row


def function_detail(engine, entry):
    """@return: the reference's FunctionDetail of a L{FunctionEntry}."""
    namespace, function_id = namespaces.split(entry.function_id)
    detail = {
        "function_id": function_id,
        "namespace": namespace,
        "worker_name": function_worker_name(engine, entry.function_id),
    }
    for key, value in (("description", entry.description),
                       ("request_schema", entry.request_format),
                       ("response_schema", entry.response_format),
                       ("metadata", entry.metadata)):
        if value is not None:
            detail[key] = value
    detail["registered_triggers"] = [
        {"id": t.id, "trigger_type": t.trigger_type, "config": t.config}
        for t in engine.triggers.values() if t.function_id == entry.function_id]
    if engine.cluster is not None:
        detail["engine_id"], detail["engine_name"] = engine.cluster.engine_of(entry.owner)
    return detail


def _function_summary(engine, entry):
    namespace, function_id = namespaces.split(entry.function_id)
    row = {"function_id": function_id, "namespace": namespace,
           "worker_name": function_worker_name(engine, entry.function_id)}
    if entry.description is not None:
        row["description"] = entry.description
    if entry.metadata is not None:
        row["metadata"] = entry.metadata
    return row


def _not_found(message):
    return InvocationError(NOT_FOUND, message)


def _invalid(message):
    return InvocationError(INVALID_ARGUMENTS, message)


# -- the functions ------------------------------------------------------------------

def register_current_functions(engine, input_of, worker_info):
    """
    Register the engine functions added since v0.10 on C{engine}.

    @param input_of: C{(function_id, data) -> dict}, the discovery input reader.
    @param worker_info: C{(engine, worker) -> dict}, the v0.10 WorkerInfo row.
    """
    durable = set()  # ids of the bindings engine::register_trigger made

    # What the calling session may see (iii_twisted.auth; None: every grant).
    def visible(function_id):
        session = engine.current_session
        if session is None:
            return True
        entry = engine.functions.get(function_id)
        return session.may_call(function_id, entry.metadata if entry is not None else None)

    def resolve(function_id, namespace):
        # As the reference's introspection: an explicit namespace is strict; else
        # default wins, and an id in exactly one other namespace resolves.
        if namespace is not None:
            return engine.functions.get(namespaces.key(namespace, function_id))
        entry = engine.functions.get(function_id)
        if entry is None:
            found = engine.namespaces.namespaces_for(function_id)
            if len(found) == 1:
                entry = engine.functions.get(namespaces.key(found[0], function_id))
        return entry

    def functions_info(data):
        fid = "engine::functions::info"
        data = input_of(fid, data)
        single = data.get("function_id")
        batch = data.get("function_ids")
        namespace = _optional_str(fid, data, "namespace")
        if single is not None and batch is not None:
            raise _invalid("pass either `function_id` or `function_ids`, not both")
        if single is None and batch is None:
            raise _invalid("missing field `function_id` (or `function_ids` for a batch)")
        if single is not None:
            single = _required_str(fid, data, "function_id")
            entry = resolve(single, namespace)
            if entry is not None and not visible(entry.function_id):
                raise InvocationError("FORBIDDEN", "Function '{}' is not visible to this "
                                      "session.".format(single))
            if entry is None:
                raise _not_found("Function '{}' is not registered.".format(single))
            return function_detail(engine, entry)
        if not isinstance(batch, list) or not all(isinstance(i, str) for i in batch):
            raise InvocationError(DESERIALIZATION_ERROR, "Failed to deserialize input "
                                  "for {}: function_ids must be a list of strings".format(fid))
        ids = []
        for function_id in batch:
            if function_id not in ids:
                ids.append(function_id)
        if not ids:
            raise _invalid("`function_ids` must be a non-empty array of function ids")
        if len(ids) > FUNCTION_INFO_BATCH_MAX:
            raise _invalid("too many function_ids (max {})".format(FUNCTION_INFO_BATCH_MAX))
        functions = []
        for function_id in ids:
            entry = resolve(function_id, namespace)
            if entry is not None and not visible(entry.function_id):
                functions.append({"function_id": function_id, "error": "forbidden"})
                continue
            functions.append(
                function_detail(engine, entry) if entry is not None
                else {"function_id": function_id, "error": "not_found"})
        return {"functions": functions}

    def triggers_info(data):
        fid = "engine::triggers::info"
        data = input_of(fid, data)
        type_id = _required_str(fid, data, "id")
        namespace = _optional_str(fid, data, "namespace") or DEFAULT_NAMESPACE
        trigger_type = engine.trigger_types.get(type_id)
        if trigger_type is None or namespace_of(trigger_type.owner) != namespace:
            raise _not_found("Trigger type '{}' is not registered in namespace '{}'."
                             .format(type_id, namespace))
        return trigger_type_detail(engine, trigger_type)

    def registered_triggers_list(data):
        fid = "engine::registered-triggers::list"
        data = input_of(fid, data)
        internal = data.get("include_internal") is True
        trigger_type = _optional_str(fid, data, "trigger_type")
        function_id = _optional_str(fid, data, "function_id")
        worker = _optional_str(fid, data, "worker")
        search = _optional_str(fid, data, "search")
        rows = [registered_trigger_summary(engine, t) for t in engine.triggers.values()
                if (internal or not t.function_id.startswith("engine::"))
                and visible(t.function_id)]
        if trigger_type is not None:
            rows = [r for r in rows if r["trigger_type"] == trigger_type]
        if function_id is not None:
            rows = [r for r in rows if r["function_id"] == function_id]
        if worker is not None:
            rows = [r for r in rows if r["worker_name"] == worker]
        if search:
            rows = [r for r in rows
                    if _contains(search, r["id"], r["trigger_type"], r["function_id"])]
        return {"registered_triggers": sorted(rows, key=lambda r: r["id"])}

    def registered_triggers_info(data):
        fid = "engine::registered-triggers::info"
        trigger_id = _required_str(fid, input_of(fid, data), "id")
        trigger = engine.triggers.get(trigger_id)
        if trigger is None or not visible(trigger.function_id):
            raise _not_found("Registered trigger '{}' was not found.".format(trigger_id))
        detail = registered_trigger_summary(engine, trigger)
        del detail["config_summary"]
        if trigger.metadata is not None:
            detail["metadata"] = trigger.metadata
        trigger_type = engine.trigger_types.get(trigger.trigger_type)
        detail["trigger"] = (trigger_type_detail(engine, trigger_type)
                             if trigger_type is not None else None)
        entry = engine.functions.get(trigger.function_id)
        detail["function"] = function_detail(engine, entry) if entry is not None else None
        return detail

    def workers_info(data):
        fid = "engine::workers::info"
        data = input_of(fid, data)
        name = _required_str(fid, data, "name")
        namespace = _optional_str(fid, data, "namespace")
        matches = [w for w in engine.workers.values() if w.name == name
                   and (namespace is None or namespace_of(w) == namespace)]
        if namespace is None and len(matches) > 1:
            # As the reference: a name in `default` wins; else it must be unique.
            in_default = [w for w in matches if namespace_of(w) == DEFAULT_NAMESPACE]
            if in_default:
                matches = in_default[-1:]
        if not matches:
            raise _not_found("Worker '{}' is not connected.".format(name))
        worker = matches[-1]  # the newest connection of that name
        envelope = worker_row(engine, worker, worker_info(engine, worker))
        envelope.pop("functions", None)
        envelope["internal"] = False
        functions = sorted((engine.functions[f] for f in worker.functions
                            if f in engine.functions and visible(f)),
                           key=lambda e: e.function_id)
        types = sorted((engine.trigger_types[t] for t in worker.trigger_types
                        if t in engine.trigger_types), key=lambda t: t.id)
        mine = set(worker.functions)
        bound = sorted((t for t in engine.triggers.values()
                        if t.function_id in mine and visible(t.function_id)),
                       key=lambda t: t.id)
        return {
            "worker": envelope,
            "functions": [_function_summary(engine, e) for e in functions],
            "trigger_types": [trigger_type_summary(t) for t in types],
            "registered_triggers": [registered_trigger_summary(engine, t) for t in bound],
        }

    def register_trigger(data):
        fid = "engine::register_trigger"
        data = input_of(fid, data)
        trigger_type = _required_str(fid, data, "trigger_type")
        function_id = _required_str(fid, data, "function_id")
        session = engine.current_session
        if session is not None:
            # As a registertrigger from that session (iii_twisted.auth): its type must
            # be allowed, its function one it may call, under its prefix.
            function_id = session.registration_id(function_id)
            if not session.may_register_trigger(trigger_type):
                raise InvocationError("FORBIDDEN", "Trigger type '{}' is not allowed for "
                                      "this session.".format(trigger_type))
            if not visible(function_id):
                raise session.denial(function_id)
        trigger_id = str(uuid4())
        durable.add(trigger_id)
        # owner=None: the binding is the engine's, not the calling connection's, so
        # the caller's disconnect does not remove it (reference 0.21.3). A type with
        # no provider yet parks it, and the call succeeds.
        d = engine.register_trigger(trigger_id, trigger_type, function_id,
                                    data.get("config"), None, data.get("metadata"))

        def refused(failure):
            durable.discard(trigger_id)
            failure.trap(TriggerError)
            raise InvocationError(TRIGGER_REGISTRATION_FAILED, failure.value.message)
        return d.addCallbacks(lambda _: {"id": trigger_id}, refused)

    def unregister_trigger(data):
        fid = "engine::unregister_trigger"
        trigger_id = _required_str(fid, input_of(fid, data), "id")
        # Only bindings made through engine::register_trigger: a worker's own
        # triggers are removed by that worker (deviation: the reference removes any).
        trigger = engine.triggers.get(trigger_id)
        removed = (trigger_id in durable and trigger is not None and trigger.owner is None
                   and engine.unregister_trigger(trigger_id) is not None)
        durable.discard(trigger_id)
        return {"removed": removed}

    obj = {"type": "object"}
    engine.register_function(
        "engine::functions::info", functions_info,
        "Inspect functions: schemas, owner, and registered triggers. Single "
        "`function_id`, or `function_ids: [...]` (max 32)", obj, obj)
    engine.register_function(
        "engine::workers::info", workers_info,
        "Inspect one connected worker: functions, trigger types, registered triggers",
        obj, obj)
    engine.register_function(
        "engine::triggers::info", triggers_info,
        "Inspect one trigger type: schemas, owner, and live instance count", obj, obj)
    engine.register_function(
        "engine::registered-triggers::list", registered_triggers_list,
        "List registered trigger instances (subscriber rows)", obj, obj)
    engine.register_function(
        "engine::registered-triggers::info", registered_triggers_info,
        "Inspect one registered trigger instance with its trigger type and function",
        obj, obj)
    engine.register_function(
        "engine::register_trigger", register_trigger,
        "Register a trigger owned by the engine (it outlives the caller's "
        "connection); `metadata` reaches the handler on every fire. Returns {id}",
        obj, obj)
    engine.register_function(
        "engine::unregister_trigger", unregister_trigger,
        "Unregister a trigger engine::register_trigger made. Returns {removed}",
        obj, obj)


def list_trigger_types(engine, data):
    """
    ``engine::triggers::list`` in the current shape: trigger types,
    ``{"triggers": [TriggerTypeSummary]}`` sorted by id, with the reference's
    ``include_internal``, ``prefix``, ``worker`` and ``search`` filters.
    """
    fid = "engine::triggers::list"
    internal = data.get("include_internal") is True
    prefix = _optional_str(fid, data, "prefix")
    worker = _optional_str(fid, data, "worker")
    search = _optional_str(fid, data, "search")
    rows = [trigger_type_summary(t) for t in engine.trigger_types.values()
            if internal or not t.id.startswith("engine::")]
    if prefix:
        rows = [r for r in rows if r["id"].startswith(prefix)]
    if worker is not None:
        rows = [r for r in rows if r["worker_name"] == worker]
    if search:
        rows = [r for r in rows if _contains(search, r["id"], r["description"])]
    return {"triggers": sorted(rows, key=lambda r: r["id"])}

