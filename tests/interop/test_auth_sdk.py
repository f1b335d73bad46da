"""
Worker authentication with official SDKs (docs/security.rst): PyPI ``iii-sdk`` 0.10.0
presents its token as ``?token=`` in the engine URL (it cannot set headers), 0.25.0
sends ``Authorization: Bearer $III_TOKEN``, npm 0.11.2 sends the header through its
``headers`` option. Each is refused without a token, works with one, gets
``FORBIDDEN`` outside its grants, and discovers only what it may call.
"""

import json
import socket

import pytest
from iii import InitOptions
from iii.iii import III

from engine_process import HEAD, http_request, rest_api, v010_config, wait_until
from sdk_process import SdkProcess, WorkerFailed
from test_newer_python_sdk import WORKER as NEWER_WORKER
from test_newer_python_sdk import newer_python, newer_worker  # noqa: F401 (fixtures)
from test_node_sdk import WORKER as NODE_WORKER, node_sdks, node_worker  # noqa: F401

BACKEND = "backend-token-" + "b" * 32
WEB = "web-token-" + "w" * 32
TOKENS = {"III_TEST_BACKEND_TOKEN": BACKEND, "III_TEST_WEB_TOKEN": WEB}

AUTH_CONFIG = v010_config(head=HEAD + """\
auth:
  tokens:
    - name: backend
      token: ${{III_TEST_BACKEND_TOKEN}}
    - name: web
      token: ${{III_TEST_WEB_TOKEN}}
      allowed_functions: ["public::*", "engine::functions::list"]
      allow_function_registration: false
""")

REFUSED = "refused a connection to {} on iii-worker-manager from 127.0.0.1: {}"


@pytest.fixture
def auth_engine(start_engine):
    return start_engine(AUTH_CONFIG, env=TOKENS)


@pytest.fixture
def backend(auth_engine, sdk_worker):
    """A 0.10.0 worker with the backend token, hosting public::echo and private::secret."""
    worker = sdk_worker(auth_engine.url + "/?token=" + BACKEND, "backend")
    for function_id in ("public::echo", "private::secret"):
        worker.register_function(
            {"id": function_id},
            lambda data, function_id=function_id: {"from": function_id, "data": data})
    listed = worker.trigger({"function_id": "engine::functions::list", "payload": {}})
    assert {"public::echo", "private::secret"} <= {f["function_id"] for f in listed["functions"]}
    return worker


def _worker_names(backend):
    listed = backend.trigger({"function_id": "engine::workers::list", "payload": {}})
    return sorted(w["name"] or "" for w in listed["workers"])


@pytest.fixture
def unconnected_010():
    """
    @return: C{start(url, name)} giving a 0.10.0 client that tries to connect in the
        background (register_worker would wait 30 s for a refused connection).
    """
    clients = []

    def start(url, name):
        client = III(url, InitOptions(worker_name=name, otel={"enabled": False}))
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.shutdown()


def test_python_010_with_query_token(auth_engine, backend, sdk_worker, unconnected_010):
    """0.10.0: refused without a token; with ?token= it calls, is refused, discovers."""
    anonymous = unconnected_010(auth_engine.url, "anonymous")
    wrong = unconnected_010(auth_engine.url + "/?token=wrong", "wrong")
    wait_until(lambda: REFUSED.format("/", "no credentials") in auth_engine.log(),
               what="the anonymous worker's refusal")
    wait_until(lambda: REFUSED.format("/", "wrong token") in auth_engine.log(),
               what="the wrong token's refusal")
    assert anonymous._connection_state != "connected"
    assert wrong._connection_state != "connected"

    web = sdk_worker(auth_engine.url + "/?token=" + WEB, "web")
    result = web.trigger({"function_id": "public::echo", "payload": {"n": 1}})
    assert (result["from"], result["data"]["n"]) == ("public::echo", 1)
    with pytest.raises(Exception) as denied:
        web.trigger({"function_id": "private::secret", "payload": {}})
    assert "FORBIDDEN" in str(denied.value)
    assert "function 'private::secret' not allowed" in str(denied.value)
    with pytest.raises(Exception) as denied:
        web.trigger({"function_id": "engine::workers::list", "payload": {}})
    assert "FORBIDDEN" in str(denied.value)
    listed = web.trigger({"function_id": "engine::functions::list", "payload": {}})
    assert [f["function_id"] for f in listed["functions"]] == ["public::echo"]

    # Its registration is refused (allow_function_registration: false), not ignored.
    web.register_function({"id": "public::mine"}, lambda data: data)
    wait_until(lambda: "may not register public::mine" in auth_engine.log(),
               what="the refused registration")
    listed = backend.trigger({"function_id": "engine::functions::list", "payload": {}})
    assert "public::mine" not in {f["function_id"] for f in listed["functions"]}
    assert _worker_names(backend) == ["backend", "web"]


def test_python_025_with_iii_token(auth_engine, backend, newer_worker, newer_python):  # noqa: F811
    """0.25.0 turns III_TOKEN into Authorization: Bearer on its sockets."""
    # register_worker blocks until it is connected: this one never says "started".
    refused = SdkProcess([newer_python, NEWER_WORKER, auth_engine.url, "anonymous-025"])
    try:
        refused.wait_line("server rejected WebSocket connection: HTTP 401", timeout=30)
    finally:
        refused.stop()

    web = newer_worker(auth_engine.url, "web-025", env={"III_TOKEN": WEB})
    result = web.request("call", function_id="public::echo", payload={"n": 2})["result"]
    assert (result["from"], result["data"]["n"]) == ("public::echo", 2)
    with pytest.raises(WorkerFailed) as denied:
        web.request("call", function_id="private::secret", payload={})
    assert "FORBIDDEN" in json.dumps(denied.value.error)
    assert [f["function_id"] for f in web.request("list_functions")["result"]] == [
        "public::echo"]
    # Its telemetry socket presents the token too and is accepted.
    web.wait_line("[telemetry] OTel WS connected to {}/otel".format(auth_engine.url))

    full = newer_worker(auth_engine.url, "backend-025", env={"III_TOKEN": BACKEND})
    full.request("register_function", function_id="private::new")
    # Its own list is the barrier: its registration is in when the list is answered.
    assert "private::new" in {f["function_id"] for f in full.request("list_functions")["result"]}
    assert backend.trigger({"function_id": "private::new", "payload": {"n": 3}})[
        "handled_by"] == "backend-025"
    assert "anonymous-025" not in _worker_names(backend)


def test_node_0112_with_headers(auth_engine, backend, node_worker, node_sdks):  # noqa: F811
    """npm 0.11.2 sends the token through its headers option."""
    anonymous = SdkProcess(["node", NODE_WORKER, "iii-sdk-011", auth_engine.url, "anon-node"],
                           cwd=node_sdks)
    try:
        wait_until(lambda: auth_engine.log().count(REFUSED.format("/", "no credentials")) >= 1,
                   what="the anonymous node worker's refusal")
    finally:
        anonymous.stop()

    headers = json.dumps({"Authorization": "Bearer " + WEB})
    web = node_worker("iii-sdk-011", auth_engine.url, "web-node",
                      env={"III_TEST_HEADERS": headers})
    result = web.request("call", function_id="public::echo", payload={"n": 4})["result"]
    assert (result["from"], result["data"]["n"]) == ("public::echo", 4)
    with pytest.raises(WorkerFailed) as denied:
        web.request("call", function_id="private::secret", payload={})
    assert "FORBIDDEN" in json.dumps(denied.value.error)
    assert [f["function_id"] for f in web.request("list_functions")["result"]] == [
        "public::echo"]
    assert "anon-node" not in _worker_names(backend)


def test_many_failed_attempts_leave_the_engine_serving(auth_engine, backend):
    """A burst of bad handshakes: each refused with 401, logged at a bounded rate."""
    port = int(auth_engine.url.rsplit(":", 1)[1])
    for i in range(200):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(("GET /?token=bad{} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n").format(i).encode("ascii"))
            assert s.recv(64).startswith(b"HTTP/1.1 401")
    assert backend.trigger({"function_id": "public::echo", "payload": 1})["data"] == 1
    assert auth_engine.log().count("refused a connection") <= 12
    logged = [line for line in auth_engine.log().splitlines() if "refused a connection" in line]
    assert logged and "from 127.0.0.1: wrong token" in logged[0]



RBAC_CONFIG = """
invocation_timeout_ms: 20000
listeners:
  - name: trusted
    listen: tcp:{trusted}:interface=127.0.0.1
  - name: public
    listen: tcp:{port}:interface=127.0.0.1
    auth:
      auth_function_id: my::auth
      auth_timeout_ms: 5000
      expose_functions: ['match("public::*")', {{metadata: {{open: true}}}}]
      middleware_function_id: mw::audit
      on_function_registration_function_id: hook::functions
modules: []
"""


def test_rbac_auth_function_on_a_trusted_listener(start_engine, sdk_worker, unconnected_010):
    """
    Two listeners: a trusted one (no auth) hosting the auth function and the
    middleware, and a public one whose sessions come from that auth function, as the
    reference's RBAC: exposed functions, prefixed registrations, middleware on every
    call, refused when the auth function throws.
    """
    engine = start_engine(RBAC_CONFIG, trusted=True)
    trusted_url = "ws://127.0.0.1:{}".format(engine.ports["trusted"])
    trusted = sdk_worker(trusted_url, "trusted")
    asked = []

    def authenticate(data):
        asked.append(data)
        if data["query_params"].get("user") != ["alice"]:
            raise ValueError("unknown user")
        return {"allowed_functions": ["alice::*"], "context": {"user": "alice"},
                "function_registration_prefix": "alice"}

    audited = []

    async def audit(data):
        audited.append(data)
        result = await trusted.trigger_async({"function_id": data["function_id"],
                                              "payload": data["payload"]})
        return {"audited": True, "result": result}

    hooked = []

    def registration_hook(data):
        hooked.append(data)
        if data["function_id"] == "refused":
            return None
        return {"description": "checked by the hook"}

    trusted.register_function({"id": "hook::functions"}, registration_hook)
    trusted.register_function({"id": "my::auth"}, authenticate)
    trusted.register_function({"id": "mw::audit"}, audit)
    trusted.register_function({"id": "public::hello"}, lambda data: "hello")
    trusted.register_function({"id": "open::meta", "metadata": {"open": True}},
                              lambda data: "meta")
    trusted.register_function({"id": "private::x"}, lambda data: "secret")
    listed = trusted.trigger({"function_id": "engine::functions::list", "payload": {}})
    assert "my::auth" in {f["function_id"] for f in listed["functions"]}

    stranger = unconnected_010(engine.url + "/?user=mallory", "mallory")
    wait_until(lambda: "auth function my::auth failed" in engine.log(),
               what="the auth function's refusal")
    assert stranger._connection_state != "connected"

    alice = sdk_worker(engine.url + "/?user=alice", "alice")
    assert asked[-1]["query_params"] == {"user": ["alice"]}
    assert asked[-1]["ip_address"] == "127.0.0.1"
    assert alice.trigger({"function_id": "public::hello", "payload": {}}) == {
        "audited": True, "result": "hello"}
    assert alice.trigger({"function_id": "open::meta", "payload": {}})["result"] == "meta"
    assert audited[0]["function_id"] == "public::hello"
    assert audited[0]["context"] == {"user": "alice"}
    with pytest.raises(Exception) as denied:
        alice.trigger({"function_id": "private::x", "payload": {}})
    assert "function 'private::x' not allowed (add to rbac.expose_functions)" in str(
        denied.value)

    # Registered under its prefix; the engine calls it by the id it registered.
    alice.register_function({"id": "echo"}, lambda data: {"alice": data["n"]})
    alice.register_function({"id": "refused"}, lambda data: None)
    alice.register_function({"id": "barrier"}, lambda data: None)
    wait_until(lambda: "alice::barrier" in {f["function_id"] for f in trusted.trigger(
        {"function_id": "engine::functions::list", "payload": {}})["functions"]},
        what="alice's registrations")
    # The reference's registration hook saw each (with alice's context) and decided.
    functions = {f["function_id"]: f for f in trusted.trigger(
        {"function_id": "engine::functions::list", "payload": {}})["functions"]}
    assert functions["alice::echo"]["description"] == "checked by the hook"
    assert "alice::refused" not in functions
    assert [h["function_id"] for h in hooked] == ["echo", "refused", "barrier"]
    assert hooked[0]["context"] == {"user": "alice"}
    assert trusted.trigger({"function_id": "alice::echo", "payload": {"n": 5}}) == {
        "alice": 5}


HTTP_AUTH_CONFIG = v010_config(rest_api(default_timeout=10000, more="""\
      auth:
        tokens:
          - {{name: web, token: "${{III_TEST_WEB_TOKEN}}", allowed_functions: ["public::*"]}}
          - {{name: admin, token: "${{III_TEST_BACKEND_TOKEN}}"}}
      middleware:
        - {{function_id: "mw::tenant", priority: 1}}
"""))


def test_rest_api_tokens_and_middleware_with_a_real_worker(start_engine, sdk_worker):
    """
    The REST API with auth: and a global middleware hosted by a 0.10.0 worker: 401
    without a token, 403 for a route outside the token's grants, the middleware's own
    answer, and the routes' answers.
    """
    engine = start_engine(HTTP_AUTH_CONFIG, env=TOKENS, http=True)
    base = "http://127.0.0.1:{}".format(engine.ports["http"])
    worker = sdk_worker(engine.url, "http-auth")
    seen = []

    def tenant(data):
        seen.append(data)
        if data["request"]["headers"].get("x-tenant") == "blocked":
            return {"action": "respond",
                    "response": {"status_code": 429, "body": {"error": "slow down"}}}
        return {"action": "continue"}

    worker.register_function({"id": "mw::tenant"}, tenant)
    worker.register_function({"id": "public::hello"},
                             lambda data: {"status_code": 200, "body": {"hi": 1}})
    worker.register_function({"id": "admin::stats"},
                             lambda data: {"status_code": 200, "body": {"stats": 2}})
    worker.register_trigger({"type": "http", "function_id": "public::hello",
                             "config": {"api_path": "hello"}})
    worker.register_trigger({"type": "http", "function_id": "admin::stats",
                             "config": {"api_path": "stats"}})
    web = {"Authorization": "Bearer " + WEB}
    wait_until(lambda: http_request(base + "/stats", headers=web)[0] == 403, what="the routes")

    assert http_request(base + "/hello")[0] == 401
    assert http_request(base + "/hello", headers={"Authorization": "Bearer nope"})[0] == 401
    status, _, body = http_request(base + "/hello", headers=web)
    assert (status, json.loads(body)) == (200, {"hi": 1})
    assert http_request(base + "/hello?token=" + WEB)[0] == 200
    status, _, body = http_request(base + "/stats",
                                   headers={"Authorization": "Bearer " + BACKEND})
    assert (status, json.loads(body)) == (200, {"stats": 2})
    status, _, body = http_request(base + "/hello", headers=dict(web, **{"X-Tenant": "blocked"}))
    assert (status, json.loads(body)) == (429, {"error": "slow down"})
    assert seen[-1]["phase"] == "preHandler" and seen[-1]["request"]["method"] == "GET"
    assert "refused a connection to /hello on iii-http from 127.0.0.1" in engine.log()
