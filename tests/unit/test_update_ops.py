"""
iii_twisted.adapters.ops: the update ops of the current reference as one pure function
(engine/src/update_ops.rs). The store contract (tests/contract/test_kv_store.py) runs
the same ops through every adapter; state and stream tests run them through the modules.
"""

import copy

import pytest

from iii_twisted.adapters.ops import ABSENT, apply_update_ops, validate_ops
from iii_twisted.interfaces import InvalidUpdateOp


def run(current, *ops):
    validate_ops(list(ops))
    before = copy.deepcopy(current)
    value, errors = apply_update_ops(current, list(ops))
    assert current == before or current is ABSENT, "the stored value was mutated"
    return value, [(e["op_index"], e["code"]) for e in errors]


def test_reported_merge_at_path():
    assert run({"sess": {"a": 1}, "other": 1},
               {"type": "merge", "path": "sess", "value": {"b": 2}}) == (
        {"sess": {"a": 1, "b": 2}, "other": 1}, [])


def test_nested_merge_does_not_mutate_shared_nested_objects():
    stored = {"a": {"b": {"c": 1}}, "keep": {"k": 1}}
    value, errors = run(stored, {"type": "merge", "path": ["a", "b"], "value": {"d": 2}},
                        {"type": "merge", "path": ["a", "b"], "value": {"e": 3}})
    assert value == {"a": {"b": {"c": 1, "d": 2, "e": 3}}, "keep": {"k": 1}}
    assert value["keep"] is stored["keep"]  # untouched branches are shared, not copied
    assert errors == []


def test_dots_are_literal_and_non_objects_on_the_way_become_objects():
    assert run({"a": 5}, {"type": "merge", "path": ["a", "b.c"], "value": {"x": 1}}) == (
        {"a": {"b.c": {"x": 1}}}, [])
    assert run({}, {"type": "set", "path": "a.b", "value": 1}) == ({"a.b": 1}, [])


def test_absent_key_root_ops():
    assert run(ABSENT, {"type": "increment", "path": "", "by": 3}) == (3, [])
    assert run(ABSENT, {"type": "decrement", "path": "", "by": 3}) == (-3, [])
    assert run(ABSENT, {"type": "append", "value": "s"}) == ("s", [])
    assert run(ABSENT, {"type": "append", "path": [], "value": 1}) == ([1], [])
    assert run(ABSENT) == ({}, [])
    # An absent key is {} once any op touched it.
    assert run(ABSENT, {"type": "set", "path": "a", "value": 1},
               {"type": "increment", "path": "", "by": 1}) == (
        {"a": 1}, [(1, "increment.not_number")])


def test_root_ops_on_existing_values():
    assert run([1], {"type": "append", "value": 2}) == ([1, 2], [])
    assert run("ab", {"type": "append", "path": "", "value": "c"}) == ("abc", [])
    assert run(None, {"type": "append", "value": {"x": 1}}) == ([{"x": 1}], [])
    assert run(1.5, {"type": "increment", "path": "", "by": 1}) == (2.5, [])
    assert run({"a": 1}, {"type": "remove", "path": ""}) == (None, [])
    assert run({"a": 1}, {"type": "set", "path": ""}) == (None, [])
    assert run(3, {"type": "merge", "value": {"a": 1}}) == (3, [(0, "merge.target_not_object")])
    assert run(3, {"type": "merge", "path": "p", "value": {"a": 1}}) == ({"p": {"a": 1}}, [])
    assert run(3, {"type": "remove", "path": "x"}) == (3, [(0, "remove.target_not_object")])
    assert run(3, {"type": "set", "path": "x", "value": 1}) == (3, [(0, "set.target_not_object")])
    assert run(3, {"type": "append", "path": "x", "value": 1}) == (
        3, [(0, "append.target_not_object")])
    assert run(True, {"type": "increment", "path": "", "by": 1}) == (
        True, [(0, "increment.not_number")])


@pytest.mark.parametrize("segment", ["__proto__", "constructor", "prototype"])
def test_proto_segments_refused_in_every_op(segment):
    ops = [{"type": "set", "path": segment, "value": 1},
           {"type": "increment", "path": segment, "by": 1},
           {"type": "decrement", "path": segment, "by": 1},
           {"type": "remove", "path": segment},
           {"type": "merge", "path": ["ok", segment], "value": {}},
           {"type": "append", "path": [segment], "value": 1},
           {"type": "merge", "value": {segment: {"x": 1}}}]
    value, errors = run({"ok": {}}, *ops)
    assert value == {"ok": {}}
    assert [code for _, code in errors] == [
        "set.path.proto_polluted", "increment.path.proto_polluted",
        "decrement.path.proto_polluted", "remove.path.proto_polluted",
        "merge.path.proto_polluted", "append.path.proto_polluted",
        "merge.value.proto_polluted"]


def test_limits():
    assert run({}, {"type": "merge", "path": ["x" * 257], "value": {}})[1] == [
        (0, "merge.path.segment_too_long")]
    assert run({}, {"type": "set", "path": "é" * 129, "value": 1})[1] == [
        (0, "set.path.segment_too_long")]  # bytes, not characters
    deep = {}
    node = deep
    for _ in range(16):
        node["n"] = {}
        node = node["n"]
    assert run({}, {"type": "merge", "value": deep})[1] == [(0, "merge.value.too_deep")]
    assert run({}, {"type": "merge", "value": {str(i): i for i in range(1025)}})[1] == [
        (0, "merge.value.too_many_keys")]
    assert run({}, {"type": "merge", "path": ["x"] * 32, "value": {}})[1] == []


@pytest.mark.parametrize("ops, text", [
    ([{"type": "merge", "path": 3, "value": {}}], "merge path must be a string, a list"),
    ([{"type": "append", "path": ["a", 1], "value": 1}], "append path must be"),
    ([{"type": "increment", "path": "n", "by": 2 ** 63}], "integer 'by'"),
    ([{"type": "Merge", "value": {}}], "unknown update op type 'Merge'"),
])
def test_malformed_ops_are_refused_whole(ops, text):
    with pytest.raises(InvalidUpdateOp) as e:
        validate_ops(ops)
    assert text in e.value.message
