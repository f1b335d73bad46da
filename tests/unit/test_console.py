"""
The console's server side (iii_twisted.modules.console): its Klein resource through
treq's StubTreq on an engine with a MemoryReactorClock; the pages computed by its views;
the event stream on a DummyRequest. The browser side is tested in a real browser
(tests/interop/test_console_browser.py).
"""

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from iii_twisted.config import ConfigError
from iii_twisted.engine import Engine
from iii_twisted.modules import build_module
from iii_twisted.modules.console import ConsoleModule
from iii_twisted.modules.console.auth import AllGrants, access_for
from iii_twisted.modules.console.views import History, merged_quantiles
from iii_twisted.modules.console.web import COOKIE, EventStream
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection, result_of

BASE = "http://127.0.0.1:3113"


class Grants:
    def __init__(self, allowed):
        self.allowed = set(allowed)

    def allows(self, function_id):
        return function_id in self.allowed


class TokenAccess:
    """An access policy with named tokens and their grants (auth.py's seam)."""

    auth_required = True

    def __init__(self, tokens):
        self.tokens = tokens

    def authenticate(self, token, ip_address=None):
        allowed = self.tokens.get(token)
        return succeed(None if allowed is None else Grants(allowed))


class Console:
    def __init__(self, config=None, auth=None):
        self.clock = MemoryReactorClock()
        self.engine = Engine(self.clock, invocation_timeout=60)
        self.calls = []
        self.engine.register_function("app::echo", self._echo)
        self.module = ConsoleModule(self.engine, config or {}, self.clock)
        if auth is not None:
            self.module.web.set_access(auth)

    def _echo(self, data):
        self.calls.append(data)
        return {"echo": data}

    def request(self, method, path, **kwargs):
        # A fresh client each time: its cookie jar would carry the session otherwise.
        self.treq = StubTreq(self.module.web.resource)
        d = self.treq.request(method, BASE + path, **kwargs)
        self.treq.flush()
        return result_of(d)

    def session(self):
        """@return: (cookies, csrf token) of a new browser session."""
        response = self.request("GET", "/api/session")
        cookies = {COOKIE: response.cookies()[COOKIE]}
        return cookies, body(self, response)["csrf_token"]

    def post(self, path, payload, cookies=None, token=None, headers=None):
        all_headers = {"Content-Type": "application/json"}
        if token is not None:
            all_headers["X-CSRF-Token"] = token
        all_headers.update(headers or {})
        return self.request("POST", path, data=json.dumps(payload).encode(),
                            headers=all_headers, cookies=cookies)


def body(console, response):
    d = response.content()
    console.treq.flush()
    return json.loads(result_of(d))


def render(console, page, grants=None, params=None):
    grants = grants if grants is not None else AllGrants()
    return result_of(ensureDeferred(console.module.views.render(page, grants, params or {})))


# -- config ------------------------------------------------------------------------------


def test_defaults_listen_on_loopback_3113():
    console = Console()
    assert console.module.listen == "tcp:3113:interface=127.0.0.1"
    assert console.module.web.loopback_only
    assert console.module.web.push_interval == 1.0


def test_loaded_by_class_name():
    clock = MemoryReactorClock()
    module = build_module("modules::console::ConsoleModule", Engine(clock), {"port": 0},
                          clock)
    assert module.iii_class == "modules::console::ConsoleModule"


@pytest.mark.parametrize("config, key", [
    ({"port": "3113"}, "port"),
    ({"port": 70000}, "port"),
    ({"host": 127}, "host"),
    ({"listen": 3113}, "listen"),
    ({"push_interval": "fast"}, "push_interval"),
    ({"push_interval": 0}, "push_interval"),
    ({"sample_interval": -1}, "sample_interval"),
    ({"history": 1}, "history"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_config_names_the_key(config, key):
    with pytest.raises(ConfigError) as raised:
        Console(config)
    assert raised.value.key == key


def test_not_loopback_when_configured_so():
    console = Console({"host": "0.0.0.0"})
    assert not console.module.web.loopback_only


# -- CSRF and sessions -------------------------------------------------------------------


def test_page_sets_a_strict_httponly_session_cookie_and_a_csp():
    console = Console()
    response = console.request("GET", "/")
    assert response.code == 200
    cookie = response.headers.getRawHeaders("set-cookie")[0]
    assert cookie.startswith(COOKIE + "=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    csp = response.headers.getRawHeaders("content-security-policy")[0]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_a_call_with_session_and_token_is_made():
    console = Console()
    cookies, token = console.session()
    response = console.post("/api/call", {"function_id": "app::echo", "payload": {"x": 1}},
                            cookies, token)
    assert body(console, response) == {"ok": True, "result": {"echo": {"x": 1}}}
    assert console.calls == [{"x": 1}]


@pytest.mark.parametrize("case", ["no session", "no token", "wrong token", "form",
                                  "other origin", "null origin"])
def test_csrf_refusals(case):
    console = Console()
    cookies, token = console.session()
    headers = {}
    if case == "no session":
        cookies = None
    elif case == "no token":
        token = None
    elif case == "wrong token":
        token = token[:-1] + ("A" if token[-1] != "A" else "B")
    elif case == "form":
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif case == "other origin":
        headers["Origin"] = "http://evil.example"
    elif case == "null origin":
        headers["Origin"] = "null"
    response = console.post("/api/call", {"function_id": "app::echo", "payload": 1},
                            cookies, token, headers)
    assert response.code in (403, 415)
    assert body(console, response)["error"]["code"] == "csrf"
    assert console.calls == []


def test_same_origin_is_accepted():
    console = Console()
    cookies, token = console.session()
    response = console.post("/api/call", {"function_id": "app::echo", "payload": 2},
                            cookies, token, {"Origin": BASE})
    assert body(console, response)["ok"]


def test_a_token_of_another_session_is_refused():
    console = Console()
    cookies, _ = console.session()
    _, other_token = console.session()
    response = console.post("/api/call", {"function_id": "app::echo"}, cookies, other_token)
    assert response.code == 403


def test_wrong_host_is_refused_on_loopback():
    """A DNS-rebinding page reaches us with its own host name: it gets nothing."""
    console = Console()
    response = console.request("GET", "/api/session", headers={"Host": "evil.example"})
    assert response.code == 421
    assert console.module.web.sessions.__len__() == 0


def test_bad_bodies_are_400():
    console = Console()
    cookies, token = console.session()
    for data in (b"not json", b"[1]", b'{"function_id": 3}',
                 b'{"function_id": "app::echo", "payload": {"x": 1e999}}',
                 b"[" * 100000):
        response = console.request("POST", "/api/call", data=data, cookies=cookies,
                                   headers={"Content-Type": "application/json",
                                            "X-CSRF-Token": token})
        assert response.code == 400


def test_function_errors_come_back_as_errors():
    console = Console()
    cookies, token = console.session()
    response = console.post("/api/call", {"function_id": "nope::nope"}, cookies, token)
    answer = body(console, response)
    assert answer["ok"] is False and answer["error"]["code"] == "function_not_found"


def test_sessions_are_bounded():
    console = Console()
    console.module.web.sessions.limit = 3
    first, _ = console.session()
    for _ in range(3):
        console.session()
    assert len(console.module.web.sessions) == 3
    assert console.module.web.sessions.get(first[COOKIE]) is None


def test_static_serves_only_shipped_assets():
    console = Console()
    assert console.request("GET", "/static/app.js").headers.getRawHeaders(
        "content-type")[0].startswith("text/javascript")
    for path in ("/static/..%2f__init__.py", "/static/web.py", "/static/nope.js"):
        assert console.request("GET", path).code == 404


# -- grants ------------------------------------------------------------------------------


def test_open_console_when_no_auth():
    clock = MemoryReactorClock()
    assert not access_for(Engine(clock), None, clock).auth_required
    console = Console()
    console.module.startService()
    assert not console.module.web.access.auth_required
    console.module.stopService()


def test_with_auth_a_token_is_asked_and_its_grants_apply():
    console = Console(auth=TokenAccess({"reader": ["engine::workers::list"],
                                        "caller": ["app::echo"]}))
    cookies, token = console.session()
    info = body(console, console.request("GET", "/api/session", cookies=cookies))
    assert info["auth_required"] and not info["authenticated"]
    # Nothing before a token.
    response = console.post("/api/call", {"function_id": "app::echo"}, cookies, token)
    assert body(console, response)["error"]["code"] == "unauthenticated"
    assert console.request("GET", "/api/events?page=workers", cookies=cookies).code == 401
    # A wrong token is refused.
    assert console.post("/api/login", {"token": "guess"}, cookies, token).code == 401
    # The reader may read workers, not call app::echo.
    assert body(console, console.post("/api/login", {"token": "reader"}, cookies, token)) \
        == {"authenticated": True}
    response = console.post("/api/call", {"function_id": "app::echo"}, cookies, token)
    assert body(console, response)["error"]["code"] == "FORBIDDEN"
    assert console.calls == []
    session = console.module.web.sessions.get(cookies[COOKIE])
    assert "workers" in render(console, "workers", session.grants)
    functions = render(console, "functions", session.grants)
    assert functions["error"]["code"] == "FORBIDDEN"


def test_login_needs_the_csrf_token_too():
    console = Console(auth=TokenAccess({"caller": ["app::echo"]}))
    cookies, _ = console.session()
    assert console.post("/api/login", {"token": "caller"}, cookies).code == 403


def test_forbidden_parts_leave_the_rest_of_the_page():
    console = Console()
    page = render(console, "overview", Grants(["engine::workers::list"]))
    assert page["workers"] == {"count": 0, "names": []}
    assert page["engine"]["error"]["code"] == "FORBIDDEN"
    assert page["calls"]["error"]["code"] == "FORBIDDEN"
    assert page["queues"]["error"]["code"] == "FORBIDDEN"


# -- views -------------------------------------------------------------------------------


def test_functions_page_says_where_each_runs_and_its_triggers():
    console = Console()
    worker = FakeWorkerConnection.connect(console.engine)
    worker.receive({"type": "registerfunction", "id": "w::f", "description": "<b>x</b>"})
    worker.receive({"type": "registertriggertype", "id": "tick", "description": "ticks"})
    worker.receive({"type": "registertrigger", "id": "t1", "trigger_type": "tick",
                    "function_id": "w::f", "config": {}})
    rows = {f["function_id"]: f for f in render(console, "functions")["functions"]}
    assert rows["w::f"]["host"] == "worker"
    assert rows["w::f"]["worker_id"] == worker.worker_id
    assert rows["w::f"]["description"] == "<b>x</b>"  # escaped by the page, not here
    assert rows["w::f"]["triggers"] == [{"id": "t1", "trigger_type": "tick"}]
    assert rows["app::echo"]["host"] == "in-process"


def test_triggers_page_lists_refused_triggers_with_the_reason():
    console = Console()
    worker = FakeWorkerConnection.connect(console.engine)
    worker.receive({"type": "registerfunction", "id": "w::f"})
    worker.receive({"type": "registertriggertype", "id": "tick"})
    worker.receive({"type": "registertrigger", "id": "t1", "trigger_type": "tick",
                    "function_id": "w::f", "config": {"every": "never"}})
    assert [t["id"] for t in render(console, "triggers")["triggers"]["triggers"]] == ["t1"]
    worker.receive({"type": "triggerregistrationresult", "id": "t1", "trigger_type": "tick",
                    "function_id": "w::f",
                    "error": {"code": "bad_config", "message": "every: not a duration"}})
    # A worker provider's refusal keeps the trigger, failed, with the reason.
    [failed] = render(console, "triggers")["triggers"]["triggers"]
    assert failed["status"] == "failed"
    assert failed["error"]["message"] == "every: not a duration"


def test_triggers_page_lists_triggers_a_module_refused_with_the_reason():
    from iii_twisted.modules.rest_api import RestApiModule
    console = Console()
    RestApiModule(console.engine, {"port": 0}, console.clock)
    worker = FakeWorkerConnection.connect(console.engine)
    worker.receive({"type": "registerfunction", "id": "w::f"})
    worker.receive({"type": "registertrigger", "id": "t2", "trigger_type": "http",
                    "function_id": "w::f", "config": {"api_path": "x",
                                                      "http_method": "FETCH"}})
    page = render(console, "triggers")
    assert page["triggers"]["triggers"] == []
    [refused] = page["triggers"]["refused"]
    assert refused["id"] == "t2" and refused["status"] == "refused"
    assert "http_method must be one of" in refused["error"]["message"]
    assert refused["refused_at_ms"] > 0


def test_pages_of_missing_modules_say_so():
    console = Console()
    for name in ("traces", "logs"):
        page = render(console, name)
        part = page["list"] if name == "traces" else page
        assert part["error"]["code"] == "function_not_found"
    assert render(console, "queues")["error"]["code"] == "function_not_found"


def test_modules_list_without_a_service():
    console = Console()
    info = result_of(console.engine.call("engine::modules::list", {}))
    assert info["modules"] == [] and info["version"]


def test_history_rates():
    history = History(size=3)
    assert history.rates() == (None, None)
    history.add({"t": 0, "calls": 10, "errors": 0, "depths": {}})
    history.add({"t": 2000, "calls": 30, "errors": 5, "depths": {}})
    assert history.rates() == (10.0, 0.25)


def test_sample_counts_user_calls_only():
    console = Console()
    console.engine.register_function("engine::metrics::list", lambda data: {
        "engine_metrics": {"invocations": {"by_function": {
            "app::a": {"calls": 4, "errors": 1}, "engine::workers::list": {"calls": 99,
                                                                          "errors": 0}}}}})
    sample = result_of(ensureDeferred(console.module.views.sample(Grants(
        ["engine::metrics::list"]))))
    assert (sample["calls"], sample["errors"]) == (4, 1)
    assert sample["depths"] == {}  # no queue module, and not granted


def test_merged_quantiles():
    bounds = [1.0, 2.0, 4.0]
    p50, p99 = merged_quantiles({"a": {"buckets": [10, 0, 0, 0]},
                                 "b": {"buckets": [0, 0, 10, 0]}}, bounds)
    assert p50 == 1.0 and 3.9 < p99 <= 4.0
    assert merged_quantiles({}, bounds) == (None, None)


# -- the event stream ----------------------------------------------------------------------


def test_event_stream_pushes_changes_only_and_keeps_framing():
    console = Console({"push_interval": 1})
    web = console.module.web
    worker = FakeWorkerConnection.connect(console.engine)
    console.engine.workers[worker.worker_id].name = "evil\n\ndata: {\"page\": \"x\"}"
    session = web.sessions.new()
    request = DummyRequest([b""])
    stream = EventStream(web, request, session, "workers", {})
    web.streams.add(stream)
    stream.start()
    frames = b"".join(request.written).split(b"\n\n")
    data = [f for f in frames if f.startswith(b"data: ")]
    assert len(data) == 1
    assert b"\n" not in data[0]  # a worker's newline cannot start an SSE field
    message = json.loads(data[0][len(b"data: "):])
    assert message["data"]["workers"][0]["name"].startswith("evil\n")
    console.clock.advance(1)
    assert len([f for f in b"".join(request.written).split(b"\n\n")
                if f.startswith(b"data: ")]) == 1  # unchanged: not sent again
    worker.disconnect()
    console.clock.advance(1)
    assert len([f for f in b"".join(request.written).split(b"\n\n")
                if f.startswith(b"data: ")]) == 2
    console.module.web.stop()  # what the module does when it stops
    assert not web.streams


def test_closed_browser_stops_the_stream():
    console = Console()
    web = console.module.web
    request = DummyRequest([b""])
    stream = EventStream(web, request, web.sessions.new(), "workers", {})
    web.streams.add(stream)
    stream.start()
    request.finish()
    assert not web.streams
    assert not stream.running
    assert not console.clock.getDelayedCalls()


def test_unknown_page_is_404():
    console = Console()
    cookies, _ = console.session()
    response = console.request("GET", "/api/events?page=secrets", cookies=cookies)
    assert response.code == 404


def test_check_raises_invocation_errors():
    from iii_twisted.modules.console.auth import check
    with pytest.raises(InvocationError) as raised:
        check(None, "x")
    assert raised.value.code == "unauthenticated"


def test_an_expensive_page_slows_itself_down():
    """A page that takes 0.5 s to compute is next computed 19 x 0.5 s later (5 %)."""
    console = Console({"push_interval": 1})
    web = console.module.web
    renders = []

    async def slow_render(page, grants, params):
        renders.append(console.clock.seconds())
        console.clock.advance(0.5)
        return {"n": len(renders)}

    web.views.render = slow_render
    request = DummyRequest([b""])
    stream = EventStream(web, request, web.sessions.new(), "workers", {})
    stream.start()
    [due] = console.clock.getDelayedCalls()
    assert due.getTime() == pytest.approx(0.5 + 9.5)
    console.clock.advance(9.4)
    assert len(renders) == 1
    console.clock.advance(0.2)
    assert len(renders) == 2
    stream.stop()
    assert not console.clock.getDelayedCalls()


# -- engine additions the console reads ------------------------------------------------


def test_functions_list_without_include_host_is_unchanged():
    console = Console()
    [echo] = [f for f in result_of(console.engine.call("engine::functions::list", {}))[
        "functions"] if f["function_id"] == "app::echo"]
    assert "host" not in echo and "worker_id" not in echo


def test_include_flags_must_be_booleans():
    console = Console()
    for function_id, flag in (("engine::functions::list", "include_host"),
                              ("engine::triggers::list", "include_refused")):
        with pytest.raises(InvocationError) as raised:
            result_of(console.engine.call(function_id, {flag: "yes"}))
        assert raised.value.code == "deserialization_error"


def test_refused_triggers_are_bounded():
    from iii_twisted.modules.rest_api import RestApiModule
    console = Console()
    RestApiModule(console.engine, {"port": 0}, console.clock)
    worker = FakeWorkerConnection.connect(console.engine)
    worker.receive({"type": "registerfunction", "id": "w::f"})
    for i in range(150):
        worker.receive({"type": "registertrigger", "id": "t{}".format(i),
                        "trigger_type": "http", "function_id": "w::f", "config": {}})
    refused = result_of(console.engine.call("engine::triggers::list",
                                          {"include_refused": True}))["refused"]
    assert len(refused) == 100 and refused[-1]["id"] == "t149"


def test_quantile_from_histogram():
    from iii_twisted.observability.metrics import BUCKETS, FunctionStats, quantile_ms
    stats = FunctionStats()
    assert stats.to_dict()["p50_duration_ms"] == 0
    counts = [0] * (len(BUCKETS) + 1)
    counts[BUCKETS.index(0.01)] = 100  # all between 5 and 10 ms
    assert 5.0 < quantile_ms(counts, 0.5) <= 10.0
    counts[-1] = 1000  # most over the last bound
    assert quantile_ms(counts, 0.99) == BUCKETS[-1] * 1000


def test_state_list_with_keys():
    from iii_twisted.modules.state import StateModule
    console = Console()
    StateModule(console.engine, {}, console.clock)
    result_of(console.engine.call("state::set", {"scope": "s", "key": "k", "value": 1}))
    assert result_of(console.engine.call("state::list", {"scope": "s"})) == [1]
    assert result_of(console.engine.call("state::list", {"scope": "s", "with_keys": True})) \
        == [{"key": "k", "value": 1}]
    page = render(console, "state", params={"scope": "s"})
    assert page["groups"] == {"groups": ["s"]}
    assert page["items"] == {"items": [{"key": "k", "value": 1}], "total": 1}


def test_stream_list_with_keys():
    from iii_twisted.modules.stream import StreamModule
    console = Console()
    StreamModule(console.engine, {"port": 0}, console.clock)
    result_of(console.engine.call("stream::set", {"stream_name": "chat", "group_id": "g",
                                                "item_id": "m1", "data": {"t": 1}}))
    page = render(console, "streams", params={"stream": "chat", "group": "g"})
    assert page["streams"]["stream"] == [{"id": "chat", "groups": ["g"]}]
    assert page["items"] == {"items": [{"key": "m1", "value": {"t": 1}}], "total": 1}


# -- both config formats --------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "modules:\n  - class: modules::console::ConsoleModule\n    config: {port: 0}\n",
    "workers:\n  - name: iii-console\n    config: {port: 0, push_interval: 0.5}\n",
])
def test_loads_in_both_config_formats(text):
    from iii_twisted.config import parse_config
    [(name, config, _)] = [m[:3] for m in parse_config(text).modules]
    assert name == "modules::console::ConsoleModule"
    assert config["port"] == 0


@pytest.mark.parametrize("text, key", [
    ("workers:\n  - name: iii-console\n    config: {push_interval: fast}\n",
     "push_interval"),
    ("workers:\n  - name: iii-console\n    config: {colour: blue}\n", "colour"),
])
def test_config_validation_names_the_key(text, key):
    from iii_twisted.config import parse_config
    with pytest.raises(ConfigError) as raised:
        parse_config(text)
    assert key in str(raised.value)


def test_metrics_without_sdk_metrics():
    console = Console()
    build_module("modules::observability::OtelModule", console.engine,
                 {"exporter": "memory"}, console.clock)
    answer = result_of(console.engine.call("engine::metrics::list",
                                         {"include_sdk_metrics": False}))
    assert answer["sdk_metrics"] == [] and "invocations" in answer["engine_metrics"]
    with pytest.raises(InvocationError):
        result_of(console.engine.call("engine::metrics::list", {"include_sdk_metrics": 1}))
    page = render(console, "functions")
    assert page["stats_error"] is None


# -- with the engine's auth (issue 13) --------------------------------------------------

AUTH = {"tokens": [
    {"name": "ops", "token": "ops-token-0123456789abcdef"},
    {"name": "viewer", "token": "viewer-token-0123456789abc",
     "allowed_functions": ["engine::workers::list", "engine::functions::list",
                           "engine::triggers::list", "app::*"],
     "forbidden_functions": ["app::echo"]},
]}


def console_with_engine_auth():
    from types import SimpleNamespace

    from iii_twisted.auth import parse_auth_config
    console = Console()
    console.engine.register_function("app::other", lambda data: "other")
    config = SimpleNamespace(auth=parse_auth_config(AUTH), listeners=[])
    console.module.web.set_access(access_for(console.engine, config, console.clock))
    return console


def login(console, token):
    cookies, csrf = console.session()
    response = console.post("/api/login", {"token": token}, cookies, csrf)
    return response, cookies, csrf


def test_engine_auth_asks_for_a_token():
    console = console_with_engine_auth()
    cookies, csrf = console.session()
    info = body(console, console.request("GET", "/api/session", cookies=cookies))
    assert info["auth_required"] and not info["authenticated"]
    assert login(console, "ops-token-wrong")[0].code == 401
    assert login(console, "")[0].code == 401
    response, cookies, csrf = login(console, "ops-token-0123456789abcdef")
    assert body(console, response) == {"authenticated": True}
    answer = body(console, console.post("/api/call", {"function_id": "app::echo",
                                                      "payload": 1}, cookies, csrf))
    assert answer == {"ok": True, "result": {"echo": 1}}


def test_engine_auth_grants_are_the_engines_checks():
    """A token's grants apply through Engine.call: denials and discovery filtering."""
    console = console_with_engine_auth()
    response, cookies, csrf = login(console, "viewer-token-0123456789abc")
    assert response.code == 200
    answer = body(console, console.post("/api/call", {"function_id": "app::echo"},
                                        cookies, csrf))
    assert answer["ok"] is False and answer["error"]["code"] == "FORBIDDEN"
    assert console.calls == []
    session = console.module.web.sessions.get(cookies[COOKIE])
    functions = render(console, "functions", session.grants)
    # Discovery lists only what the token may call (the engine filters it).
    assert [f["function_id"] for f in functions["functions"]] == ["app::other"]
    assert functions["stats_error"]["code"] == "FORBIDDEN"
    assert render(console, "queues", session.grants)["error"]["code"] in (
        "FORBIDDEN", "function_not_found")
    overview = render(console, "overview", session.grants)
    assert overview["workers"] == {"count": 0, "names": []}
    assert overview["calls"]["error"]["code"] == "FORBIDDEN"


def test_console_in_a_service_with_auth_requires_a_token():
    from iii_twisted.service import EngineService
    service = EngineService({
        "port": 0, "auth": AUTH,
        "modules": [{"class": "modules::console::ConsoleModule", "config": {"port": 0}}],
    }, reactor=MemoryReactorClock())
    [console] = [m for m in service.modules if m.iii_class.endswith("ConsoleModule")]
    service.startService()
    try:
        assert console.web.access.auth_required
        assert console._listener.authenticated
    finally:
        service.stopService()


def test_reload_moves_the_console_to_its_new_port():
    """A console config change restarts the console alone, on its new port."""
    from test_reload import Running, seed

    run = Running(seed(extra=[{"name": "iii-console", "config": {"port": 3113}}]))
    old = run.module("iii-console")
    assert "tcp:3113:interface=127.0.0.1" in run.ports()
    run.reload(seed(extra=[{"name": "iii-console", "config": {"port": 3114}}]))
    new = run.module("iii-console")
    assert new is not old and "tcp:3114:interface=127.0.0.1" in run.ports()
    info = result_of(run.engine.call("engine::modules::list", {}))
    assert [m["class"] for m in info["modules"]][-1] == "modules::console::ConsoleModule"
    assert run.engine.functions["engine::modules::list"].host._fn.__self__ is new
    run.stop()


def test_shipped_pages_never_parse_html():
    """
    The page writes text with textContent / text nodes only (the browser tests show a
    worker's markup staying text); no asset may use an HTML-parsing sink or inline
    script, which the Content-Security-Policy would block anyway.
    """
    import re

    from iii_twisted.modules.console.web import shipped_assets
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|"
                       r"\beval\(|new Function\(|createContextualFragment|srcdoc")
    assets = shipped_assets()
    assert {"index.html", "app.js", "dom.js", "pages.js", "style.css"} <= set(assets)
    for name, path in assets.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert not sinks.search(text), name
        if name.endswith(".html"):
            assert "<script>" not in text and " on" not in text.split("<body>")[1], name


def test_long_lists_are_capped_and_filtered_on_the_server():
    from iii_twisted.modules.console.views import MAX_ROWS
    console = Console()
    for i in range(MAX_ROWS + 50):
        console.engine.register_function("bulk::f{:04d}".format(i), lambda data: None)
    page = render(console, "functions")
    assert len(page["functions"]) == MAX_ROWS and page["total"] == MAX_ROWS + 51
    page = render(console, "functions", params={"filter": "F0249"})
    assert [f["function_id"] for f in page["functions"]] == ["bulk::f0249"]
    assert page["total"] == 1
