"""
Update ops for ``state::update`` and ``stream::update`` (../shared/spec/modules.md §2.2).

An op is a JSON object with a lower-case ``type``; ``path`` names a **top-level** key
only (``"a.b"`` is a literal key, as in the reference)::

    {"type": "set", "path": P, "value": V}          value may be omitted (null)
    {"type": "merge", "path": null|""|omitted, "value": OBJECT}
    {"type": "increment", "path": P, "by": INT}
    {"type": "decrement", "path": P, "by": INT}
    {"type": "remove", "path": P}

L{validate_ops} checks the whole list first, so a malformed op changes nothing;
L{apply_ops} then computes the new value with the reference KvStore's semantics.
"""

from ..interfaces import InvalidUpdateOp

OP_TYPES = ("set", "merge", "increment", "decrement", "remove")

_MISSING = object()


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validate_ops(ops):
    """
    Check a list of update ops.

    @return: C{ops}, unchanged.
    @raise InvalidUpdateOp: naming the first bad op (its index and what is wrong).
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
        if kind == "merge":
            if path is not None and not isinstance(path, str):
                raise InvalidUpdateOp("{}: merge path must be a string or null, not {}"
                                      .format(where, _kind(path)), index, op)
            continue
        if not isinstance(path, str):
            raise InvalidUpdateOp("{}: {} needs a string 'path', got {}".format(
                where, kind, _kind(path)), index, op)
        if kind in ("increment", "decrement") and not _is_int(op.get("by")):
            raise InvalidUpdateOp("{}: {} needs an integer 'by', got {}".format(
                where, kind, _describe(op.get("by"))), index, op)
    return ops


def apply_ops(current, ops):
    """
    Compute the value after C{ops} (already validated with L{validate_ops}).

    @param current: the stored value, or L{ABSENT} when the key does not exist (it
        then starts as C{{}}).
    @return: the new value. C{current} is never mutated: an object that changes is
        copied first.
    """
    value = {} if current is ABSENT else current
    copied = current is ABSENT
    for op in ops:
        kind = op["type"]
        if kind == "set":
            path, new = op["path"], op.get("value")
            if path == "" and new is not None:
                value, copied = new, False
                continue
            if isinstance(value, dict):
                if not copied:
                    value, copied = dict(value), True
                value[path] = new
        elif kind == "merge":
            path, new = op.get("path"), op.get("value")
            if (path is None or path == "") and isinstance(value, dict) \
                    and isinstance(new, dict):
                value = dict(value)
                value.update(new)
                copied = True
        elif isinstance(value, dict):
            if not copied:
                value, copied = dict(value), True
            path = op["path"]
            if kind == "remove":
                value.pop(path, None)
                continue
            by = op["by"]
            present = value.get(path, _MISSING)
            if kind == "increment":
                if _is_int(present):
                    value[path] = present + by
                else:
                    value[path] = by
            else:
                if _is_int(present):
                    value[path] = present - by
                elif present is _MISSING:
                    value[path] = -by
                else:
                    value[path] = 0
    return value


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
