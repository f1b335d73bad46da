"""
The read functions' parameters (engine::traces::list, engine::logs::list,
engine::metrics::list): every filter, sort key and order of the current reference
(engine/src/workers/observability/mod.rs) works, with its name; an unknown one is an
error naming it instead of a silently unfiltered answer.
"""

import pytest

from iii_twisted.observability.storage import SpanRecord
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection

from test_observability import call, make

MS = 1_000_000


def _span(trace, span_id, name, start_ms, duration_ms, service="svc", attributes=(),
          parent=None):
    return SpanRecord(trace * 32, span_id * 16, parent and parent * 16, name,
                      start_ms * MS, (start_ms + duration_ms) * MS,
                      attributes=[list(a) for a in attributes], service_name=service)


@pytest.fixture
def traced():
    engine, clock, module = make()
    for span in [
        _span("a", "1", "checkout", 1000, 30, "shop", [("tenant", "x")]),
        _span("b", "2", "login", 2000, 5, "auth", [("tenant", "y")]),
        _span("c", "3", "search", 3000, 300, "Catalog", [("tenant", "x"), ("hide", "1")]),
        _span("c", "4", "db.query", 3001, 200, "Catalog", parent="3"),
    ]:
        module.spans.add(span)
    return engine


def _names(engine, **query):
    return [s["name"] for s in call(engine, "engine::traces::list", query)["spans"]]


def test_every_sort_key_and_order(traced):
    assert _names(traced) == ["checkout", "login", "search"]
    assert _names(traced, sort_order="desc") == ["search", "login", "checkout"]
    assert _names(traced, sort_by="duration") == ["login", "checkout", "search"]
    assert _names(traced, sort_by="duration_ms", sort_order="desc") == [
        "search", "checkout", "login"]
    assert _names(traced, sort_by="service_name") == ["login", "search", "checkout"]
    assert _names(traced, sort_by="name") == ["checkout", "login", "search"]


def test_every_filter(traced):
    assert _names(traced, service_name="CATA") == ["search"]
    assert _names(traced, name="LOG") == ["login"]
    assert _names(traced, name="db.", search_all_spans=True) == ["search"]
    assert _names(traced, min_duration_ms=10, max_duration_ms=100) == ["checkout"]
    assert _names(traced, start_time=1500, end_time=2500) == ["login"]
    assert _names(traced, attributes=[["tenant", "x"]]) == ["checkout", "search"]
    assert _names(traced, exclude_attributes=[["hide", "1"], ["tenant", "y"]]) == [
        "checkout"]
    assert _names(traced, trace_ids=["B" * 32, "c" * 32]) == ["login", "search"]
    assert _names(traced, trace_id="c" * 32, trace_ids=["a" * 32]) == [
        "search", "db.query"]  # trace_ids is ignored when trace_id is set
    page = call(traced, "engine::traces::list", {"offset": 1, "limit": 1})
    assert [s["name"] for s in page["spans"]] == ["login"] and page["total"] == 3


@pytest.mark.parametrize("function_id, query, text", [
    ("engine::traces::list", {"sort": "name"}, "unknown field `sort`, did you mean `sort_by`?"),
    ("engine::traces::list", {"service": "x"}, "unknown field `service`"),
    ("engine::traces::list", {"sort_by": "size"}, "unknown sort_by `size`; expected one of "
     "start_time, duration, duration_ms, service_name, name"),
    ("engine::traces::list", {"sort_order": "descending"}, "unknown sort_order"),
    ("engine::traces::list", {"exclude_attributes": [["a"]]}, "exclude_attributes must be"),
    ("engine::traces::list", {"trace_ids": [1]}, "trace_ids must be a list of strings"),
    ("engine::logs::list", {"severity": "ERROR"}, "unknown field `severity`"),
    ("engine::logs::list", {"level": 3}, "unknown field `level`"),
    ("engine::metrics::list", {"name": "x"}, "unknown field `name`"),
    ("engine::metrics::list", {"interval": 60}, "did you mean `aggregate_interval`?"),
])
def test_unknown_parameters_are_errors(traced, function_id, query, text):
    with pytest.raises(InvocationError) as e:
        call(traced, function_id, query)
    assert e.value.code == "deserialization_error"
    assert text in e.value.message


def test_known_parameters_of_logs_and_metrics_pass(traced):
    call(traced, "engine::logs::list", {
        "start_time": 0, "end_time": 10, "trace_id": "a", "span_id": "b",
        "severity_min": 1, "severity_text": "INFO", "offset": 0, "limit": 5})
    call(traced, "engine::metrics::list", {
        "start_time": 0, "end_time": 10, "metric_name": "m", "aggregate_interval": 60})


def test_a_worker_call_passes_with_the_engine_added_caller_id(traced):
    """The engine adds _caller_worker_id to a worker's dict data: not an unknown key."""
    worker = FakeWorkerConnection.connect(traced)
    worker.receive({"type": "invokefunction", "invocation_id": "i1",
                    "function_id": "engine::traces::list", "data": {"sort_by": "name"}})
    [answer] = worker.sent_of_type("invocationresult")
    assert "error" not in answer, answer
    assert [s["name"] for s in answer["result"]["spans"]] == ["checkout", "login", "search"]
