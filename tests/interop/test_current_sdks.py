"""
What today's SDKs (PyPI ``iii-sdk`` 0.25.0, npm ``iii-sdk`` 0.22.1) rely on since the
reference's v0.11, each with a real worker of both: invocation and trigger metadata,
capabilities, the trigger lifecycle, discovery, the current queue API and namespaces
(../shared/spec/current-reference.md §1, §2; docs/sdk-compatibility.rst).

The workers are the same line-driven scripts as test_newer_python_sdk.py and
test_node_sdk.py (whose fixtures are reused here).
"""

import json
import urllib.request

import pytest

from test_newer_python_sdk import newer_python, newer_worker  # noqa: F401 (fixtures)
from test_node_sdk import node_sdks, node_worker  # noqa: F401 (fixtures)

NODE = "iii-sdk-022"

HTTP_CONFIG = """
port: {port}
host: 127.0.0.1
invocation_timeout_ms: 20000
modules:
  - class: modules::api::RestApiModule
    config:
      host: 127.0.0.1
      port: {http}
      default_timeout: 10000
"""


def _post(engine, path, body):
    request = urllib.request.Request(
        "http://127.0.0.1:{}/{}".format(engine.ports["http"], path),
        data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.status, json.loads(response.read())


def _invoked(worker, function_id, n):
    return worker.wait_event(lambda l: l.get("event") == "invoked"
                             and l["function_id"] == function_id
                             and (l["data"] or {}).get("n", (l["data"] or {}).get("body", {}).get("n")) == n)


def test_invocation_and_trigger_metadata(start_engine, newer_worker, node_worker):
    """
    ``metadata`` on a call reaches the handler beside ``data`` both ways between
    py 0.25 and npm 0.22.1 (sync and void); a trigger's ``metadata`` reaches its
    handler on every fire.
    """
    engine = start_engine(HTTP_CONFIG, http=True)
    py = newer_worker(engine.url, "py-meta")
    node = node_worker(NODE, engine.url, "node-meta")
    py.request("register_function", function_id="py::meta")
    node.request("register_function", function_id="node::meta")
    py.request("list_functions")
    node.request("list_functions")

    # npm -> py, sync and void; py -> npm.
    result = node.request("call", function_id="py::meta", payload={"n": 1},
                          metadata={"tenant": "acme"})["result"]
    # The reference, too, adds the caller's id to object data; metadata is not folded in.
    assert result["data"]["n"] == 1 and "tenant" not in result["data"]
    assert _invoked(py, "py::meta", 1)["metadata"] == {"tenant": "acme"}
    node.request("call", function_id="py::meta", payload={"n": 2}, void=True,
                 metadata={"tenant": "void"})
    assert _invoked(py, "py::meta", 2)["metadata"] == {"tenant": "void"}
    py.request("call", function_id="node::meta", payload={"n": 3},
               metadata={"session_id": "s_1"})
    assert _invoked(node, "node::meta", 3)["metadata"] == {"session_id": "s_1"}
    # Without metadata the handler gets none.
    py.request("call", function_id="node::meta", payload={"n": 4})
    assert _invoked(node, "node::meta", 4)["metadata"] is None

    # Trigger metadata, each fire, from each SDK's registration.
    py.request("register_function", function_id="py::route", http=True)
    py.request("register_trigger", type="http", function_id="py::route",
               config={"api_path": "py/route", "http_method": "POST"},
               metadata={"route": "py"})
    node.request("register_function", function_id="node::route", http=True)
    node.request("register_trigger", type="http", function_id="node::route",
                 config={"api_path": "node/route", "http_method": "POST"},
                 metadata={"route": "node"})
    py.request("list_functions")
    node.request("list_functions")
    for n in (10, 11):
        assert _post(engine, "py/route", {"n": n})[0] == 201
        assert _invoked(py, "py::route", n)["metadata"] == {"route": "py"}
        assert _post(engine, "node/route", {"n": n})[0] == 201
        assert _invoked(node, "node::route", n)["metadata"] == {"route": "node"}
