"""
Update ops for ``state::update`` and ``stream::update``: one pure function over a JSON
value, shared by every store (memory, file, and any other adapter).

Behaviour and error codes follow the current reference (``engine/src/update_ops.rs``,
ops as in ``iii_helpers::stream::UpdateOp``; since v0.11.4). An op is a JSON object
with a lower-case ``type``::

    {"type": "set", "path": P, "value": V}          value may be omitted (null)
    {"type": "merge", "path": MP, "value": OBJECT}
    {"type": "append", "path": MP, "value": V}
    {"type": "increment", "path": P, "by": INT}
    {"type": "decrement", "path": P, "by": INT}
    {"type": "remove", "path": P}

``P`` is a string naming one **top-level** key (``"a.b"`` is a literal key); ``""``
is the whole value. ``MP`` is omitted, null, ``""`` (the whole value), a string (one
top-level key) or a list of strings (literal keys walked from the top:
``["sess", "cart"]`` is ``value["sess"]["cart"]``; missing or non-object steps become
``{}``, as in the reference).

Two kinds of failure:

- a **malformed** op (not an object, unknown ``type``, a ``path`` or ``by`` of the
  wrong JSON type): L{validate_ops} raises L{InvalidUpdateOp} and nothing changes
  (the reference's deserialization error);
- an op that **cannot apply** (``increment`` of a string, ``set`` on a value that is
  not an object, a ``__proto__``/``constructor``/``prototype`` segment, a path deeper
  than 32 or a segment over 256 bytes, a merge value that is not an object or has a
  forbidden key or more than 1024 keys or nesting over 16): that op is skipped and
  reported in ``errors``; the others apply. ``errors`` is a list of
  ``{"op_index", "code", "message"}`` with the reference's codes
  (``increment.not_number``, ``merge.path.proto_polluted``, ...); the update result
  carries it only when it is not empty (as the reference's ``StreamUpdateResult``).
"""

from ..interfaces import InvalidUpdateOp

OP_TYPES = ("set", "merge", "append", "increment", "decrement", "remove")

MAX_PATH_DEPTH = 32
MAX_SEGMENT_BYTES = 256
MAX_VALUE_DEPTH = 16
MAX_VALUE_KEYS = 1024
PROTO_POLLUTION_KEYS = frozenset(["__proto__", "constructor", "prototype"])
_I64 = (-2 ** 63, 2 ** 63 - 1)

_MISSING = object()


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_ops(ops):
    """
    Check the shape of a list of update ops (what the reference deserializes).

    @return: C{ops}, unchanged.
    @raise InvalidUpdateOp: naming the first malformed op (its index and what is wrong).
    """
    if not isinstance(ops, list):
        raise InvalidUpdateOp("ops must be a list of update ops, not {}".format(
            _kind(ops)), None, ops)
    for index, op in enumerate(ops):
        where = "ops[{}]".format(index)
        if not isinstance(op, dict):
            raise InvalidUpdateOp("{}: an update op must be an object, not {}".format(
                where, _kind(op)), index, op)
        kind = op.get("type")
        if kind not in OP_TYPES:
            raise InvalidUpdateOp(
                "{}: unknown update op type {!r}; expected one of {}".format(
                    where, kind, ", ".join(OP_TYPES)), index, op)
        path = op.get("path")
        if kind in ("merge", "append"):
            if not (path is None or isinstance(path, str) or (
                    isinstance(path, list) and all(isinstance(s, str) for s in path))):
                raise InvalidUpdateOp(
                    "{}: {} path must be a string, a list of strings or null, not {}"
                    .format(where, kind, _kind(path)), index, op)
            continue
        if not isinstance(path, str):
            raise InvalidUpdateOp("{}: {} needs a string 'path', got {}".format(
                where, kind, _kind(path)), index, op)
        if kind in ("increment", "decrement"):
            by = op.get("by")
            if not _is_int(by) or not _I64[0] <= by <= _I64[1]:
                raise InvalidUpdateOp("{}: {} needs an integer 'by', got {}".format(
                    where, kind, _describe(by)), index, op)
    return ops


def apply_update_ops(current, ops):
    """
    Compute the value after C{ops} (already checked with L{validate_ops}).

    @param current: the stored value, or L{ABSENT} when the key does not exist (it
        then starts as C{{}}).
    @return: C{(new_value, errors)}; C{errors} lists the ops that could not apply
        (see the module docstring). C{current} is never mutated: whatever changes is
        copied first.
    """
    state = _State(current)
    errors = []
    for index, op in enumerate(ops):
        error = _APPLY[op["type"]](state, op)
        if error is not None:
            code, message = error
            errors.append({"op_index": index, "code": code, "message": message})
    return state.value, errors


def apply_ops(current, ops):
    """The new value of L{apply_update_ops}, without its errors (older callers)."""
    return apply_update_ops(current, ops)[0]


def update_result(old_value, new_value, errors):
    """The ``state::update``/``stream::update`` result: errors only when there are some."""
    result = {"old_value": old_value, "new_value": new_value}
    if errors:
        result["errors"] = errors
    return result


class _State:
    """The value being updated, copied on first write (copy-on-write per container)."""

    def __init__(self, current):
        self.missing = current is ABSENT
        self.value = {} if self.missing else current
        # Containers this update made (and so may mutate), by id; _made holds them so
        # that no id is reused by another object while the update runs.
        self._own = set()
        self._made = []
        if self.missing:
            self.made(self.value)

    def made(self, container):
        self._own.add(id(container))
        self._made.append(container)
        return container

    def owned(self, container):
        """@return: C{container}, or a shallow copy of it that this update may mutate."""
        if id(container) in self._own:
            return container
        return self.made(dict(container) if isinstance(container, dict) else list(container))

    def root_object(self):
        """The root as a mutable object (the caller checked it is one)."""
        self.value = self.owned(self.value)
        return self.value

    def walk_or_create(self, segments):
        """
        The object at C{segments} from the root, made mutable, creating (or replacing
        non-objects with) C{{}} along the way, as the reference's ``walk_or_create``.
        """
        if not isinstance(self.value, dict):
            self.value = self.made({})
        node = self.root_object()
        for segment in segments:
            child = node.get(segment)
            child = self.owned(child) if isinstance(child, dict) else self.made({})
            node[segment] = child
            node = child
        return node

    def set_root(self, value):
        self.value = value
        self.missing = False


def _path_segments(path):
    """Segments of a ``set``/``increment``/``decrement``/``remove`` path."""
    return [] if path == "" else [path]


def _merge_segments(path):
    """Segments of a ``merge``/``append`` path (None, a string or a list)."""
    if path is None or path == "":
        return []
    if isinstance(path, str):
        return [path]
    return list(path)


def _check_path(kind, segments):
    """@return: None, or the (code, message) of a path the reference refuses."""
    if len(segments) > MAX_PATH_DEPTH:
        return ("{}.path.too_deep".format(kind), "Path depth {} exceeds maximum of {}"
                .format(len(segments), MAX_PATH_DEPTH))
    for segment in segments:
        if segment == "":
            return ("{}.path.empty_segment".format(kind), "Path contains an empty segment")
        size = len(segment.encode("utf-8"))
        if size > MAX_SEGMENT_BYTES:
            return ("{}.path.segment_too_long".format(kind),
                    "Path segment of {} bytes exceeds maximum of {}".format(
                        size, MAX_SEGMENT_BYTES))
        if segment in PROTO_POLLUTION_KEYS:
            return ("{}.path.proto_polluted".format(kind),
                    "Path segment '{}' is not allowed (prototype pollution).".format(
                        segment))
    return None


def _label(segments):
    return "root" if not segments else segments[0] if len(segments) == 1 else \
        "[{}]".format(", ".join(segments))


def _type_name(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), "value")


def _not_object(kind, segments, target):
    return ("{}.target_not_object".format(kind),
            "Cannot {} at path '{}': target is {}, expected object.".format(
                kind, _label(segments), _type_name(target)))


def _set(state, op):
    segments = _path_segments(op["path"])
    error = _check_path("set", segments)
    if error:
        return error
    value = op.get("value")
    if not segments:
        state.set_root(value)
    elif isinstance(state.value, dict):
        state.root_object()[segments[0]] = value
        state.missing = False
    else:
        return _not_object("set", segments, state.value)
    return None


def _json_depth(value):
    if isinstance(value, dict):
        return 1 + max((_json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_json_depth(v) for v in value), default=0)
    return 0


def _merge(state, op):
    segments = _merge_segments(op.get("path"))
    error = _check_path("merge", segments)
    if error:
        return error
    value = op.get("value")
    if not isinstance(value, dict):
        return "merge.value.not_an_object", "Merge value must be a JSON object"
    if len(value) > MAX_VALUE_KEYS:
        return ("merge.value.too_many_keys",
                "Merge value has {} top-level keys, exceeds maximum of {}".format(
                    len(value), MAX_VALUE_KEYS))
    for key in value:
        if key in PROTO_POLLUTION_KEYS:
            return ("merge.value.proto_polluted",
                    "Merge value top-level key {!r} is a prototype-pollution sink".format(key))
    depth = _json_depth(value)
    if depth > MAX_VALUE_DEPTH:
        return ("merge.value.too_deep",
                "Merge value JSON nesting depth {} exceeds maximum of {}".format(
                    depth, MAX_VALUE_DEPTH))
    if not segments:
        if not isinstance(state.value, dict):
            # The reference only logs a warning here; we report it (docs/deviations.rst).
            return _not_object("merge", segments, state.value)
        state.root_object().update(value)
    else:
        state.walk_or_create(segments).update(value)
    state.missing = False
    return None


def _count(kind, sign):
    def apply(state, op):
        segments = _path_segments(op["path"])
        error = _check_path(kind, segments)
        if error:
            return error
        by = op["by"]
        if not segments:
            if state.missing:
                state.set_root(sign * by)
                return None
            if not _is_number(state.value):
                return ("{}.not_number".format(kind), "Expected number at path 'root', "
                        "got {}.".format(_type_name(state.value)))
            state.set_root(state.value + sign * by)
            return None
        if not isinstance(state.value, dict):
            return _not_object(kind, segments, state.value)
        key = segments[0]
        present = state.value.get(key, _MISSING)
        if present is _MISSING:
            state.root_object()[key] = sign * by
        elif _is_number(present):
            state.root_object()[key] = present + sign * by
        else:
            return ("{}.not_number".format(kind), "Expected number at path '{}', got {}."
                    .format(key, _type_name(present)))
        state.missing = False
        return None
    return apply


def _initial_append(value):
    return value if isinstance(value, str) else [value]


def _appended(target, value, label):
    """@return: (new target, None) or (None, (code, message))."""
    if isinstance(target, list):
        return target + [value], None
    if isinstance(target, str):
        if isinstance(value, str):
            return target + value, None
        return None, ("append.type_mismatch", "Expected string append value at path "
                      "'{}', got {}.".format(label, _type_name(value)))
    if target is None:
        return _initial_append(value), None
    return None, ("append.type_mismatch", "Cannot append at path '{}': target is {}, "
                  "expected array, string, null, or missing field.".format(
                      label, _type_name(target)))


def _append(state, op):
    segments = _merge_segments(op.get("path"))
    error = _check_path("append", segments)
    if error:
        return error
    value = op.get("value")
    if not segments:
        new, error = _appended(None if state.missing else state.value, value, "root")
        if error:
            return error
        state.set_root(new)
        return None
    if not isinstance(state.value, dict):
        return _not_object("append", segments, state.value)
    parent = state.walk_or_create(segments[:-1]) if len(segments) > 1 \
        else state.root_object()
    leaf = segments[-1]
    if leaf in parent:
        new, error = _appended(parent[leaf], value, leaf)
        if error:
            return error
        parent[leaf] = new
    else:
        parent[leaf] = _initial_append(value) if len(segments) == 1 else [value]
    state.missing = False
    return None


def _remove(state, op):
    segments = _path_segments(op["path"])
    error = _check_path("remove", segments)
    if error:
        return error
    if not segments:
        state.set_root(None)
    elif isinstance(state.value, dict):
        if segments[0] in state.value:
            del state.root_object()[segments[0]]
        state.missing = False
    else:
        return _not_object("remove", segments, state.value)
    return None


_APPLY = {"set": _set, "merge": _merge, "append": _append, "remove": _remove,
          "increment": _count("increment", 1), "decrement": _count("decrement", -1)}


class _Absent:
    def __repr__(self):
        return "ABSENT"


ABSENT = _Absent()


def _kind(value):
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _describe(value):
    if value is None:
        return "nothing"
    return "{} ({!r})".format(_kind(value), value)
