"""
The REST API's credentials and middleware (iii_twisted.modules.rest_auth), through
StubTreq on a memory reactor.
"""

import json

import pytest
from twisted.internet.defer import Deferred

from iii_twisted.config import ConfigError
from iii_twisted.modules.rest_auth import parse_middleware
from iii_twisted.protocol import InvocationError

from test_http_api import Api, _body, _response

WEB = "web-http-" + "x" * 30
ADMIN = "admin-http-" + "y" * 30
AUTH = {"tokens": [{"name": "web", "token": WEB, "allowed_functions": ["public::*"]},
                   {"name": "admin", "token": ADMIN}]}


def answered(api, d, result):
    [call] = api.invocations()
    api.answer(call, result=result)
    return _response(d)


def test_without_a_token_401():
    api = Api(auth=AUTH)
    api.route("public::hello", {"api_path": "hello"})
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + WEB}):
        response = _response(api.request("GET", "/hello", headers=headers))
        assert response.code == 401
        assert response.headers.getRawHeaders(b"www-authenticate") == [b"Bearer"]
    assert api.invocations() == []
    assert api.engine.auth_stats.refused == 3


def test_with_a_token_the_route_runs_with_its_session():
    api = Api(auth=AUTH)
    api.route("public::hello", {"api_path": "hello"})
    d = api.request("GET", "/hello", headers={"Authorization": "Bearer " + WEB})
    assert answered(api, d, {"status_code": 200, "body": {"hi": 1}}).code == 200
    d = api.request("GET", "/hello?token=" + ADMIN)
    assert answered(api, d, {"body": 2}).code == 200


def test_a_function_outside_the_tokens_grants_is_403():
    api = Api(auth=AUTH)
    api.route("private::admin", {"api_path": "admin"})
    response = _response(api.request("GET", "/admin",
                                      headers={"Authorization": "Bearer " + WEB}))
    assert response.code == 403
    assert json.loads(_body(api.treq, response)) == {"error": "forbidden"}
    assert api.invocations() == []
    d = api.request("GET", "/admin", headers={"Authorization": "Bearer " + ADMIN})
    assert answered(api, d, {"body": "ok"}).code == 200


def test_global_middleware_by_priority_then_route_middleware():
    seen = []

    def middleware(name, answer):
        def run(data):
            seen.append((name, data))
            return answer
        return run
    api = Api(middleware=[{"function_id": "mw::second", "priority": 10},
                          {"function_id": "mw::first", "priority": 1}])
    api.engine.register_function("mw::first", middleware("first", {"action": "continue"}))
    api.engine.register_function("mw::second", middleware("second", {"action": "continue"}))
    api.engine.register_function("mw::route", middleware("route", {
        "action": "respond", "response": {"status_code": 418, "body": {"tea": True},
                                          "headers": {"x-mw": "yes"}}}))
    api.route("f", {"api_path": "a"})
    api.route("g", {"api_path": "b", "middleware_function_ids": ["mw::route"]})
    d = api.request("GET", "/a?x=1", headers={"X-H": "v"})
    assert answered(api, d, {"body": 1}).code == 200
    assert [name for name, _ in seen] == ["first", "second"]
    request = seen[0][1]
    assert request["phase"] == "preHandler" and request["context"] == {}
    assert request["request"]["query_params"] == {"x": "1"}
    assert request["request"]["headers"]["x-h"] == "v"
    assert request["request"]["method"] == "GET"
    response = _response(api.request("GET", "/b"))
    assert response.code == 418
    assert response.headers.getRawHeaders(b"x-mw") == [b"yes"]
    assert json.loads(_body(api.treq, response)) == {"tea": True}
    assert api.invocations() == []


@pytest.mark.parametrize("answer", [None, "continue", {"action": "maybe"}, [],
                                    {"action": "respond", "response": {"status_code": 9}}])
def test_middleware_garbage_is_500_not_a_pass(answer):
    """Deviation: the reference lets a request through on an unknown answer."""
    api = Api(middleware=[{"function_id": "mw::bad"}])
    api.engine.register_function("mw::bad", lambda data: answer)
    api.route("f", {"api_path": "a"})
    response = _response(api.request("GET", "/a"))
    assert response.code == 500
    assert set(json.loads(_body(api.treq, response))) == {"error", "error_id"}
    assert api.invocations() == []


def test_failing_or_hanging_middleware():
    def fails(data):
        raise InvocationError("denied", "secret detail")
    api = Api(middleware=[{"function_id": "mw::fails"}], default_timeout=2000)
    api.engine.register_function("mw::fails", fails)
    api.route("f", {"api_path": "a"})
    response = _response(api.request("GET", "/a"))
    assert response.code == 500
    assert b"secret detail" not in _body(api.treq, response)
    api2 = Api(middleware=[{"function_id": "mw::hangs"}], default_timeout=2000)
    api2.engine.register_function("mw::hangs", lambda data: Deferred())
    api2.route("f", {"api_path": "a"})
    d = api2.request("GET", "/a")
    api2.clock.advance(2)
    api2.treq.flush()
    assert _response(d).code == 504


def test_condition_runs_between_global_and_route_middleware():
    order = []
    api = Api(middleware=[{"function_id": "mw::g"}])
    api.engine.register_function("mw::g", lambda d: order.append("g") or {"action": "continue"})
    api.engine.register_function("mw::r", lambda d: order.append("r") or {"action": "continue"})
    api.engine.register_function("cond", lambda d: order.append("c") or False)
    api.route("f", {"api_path": "a", "condition_function_id": "cond",
                    "middleware_function_ids": ["mw::r"]})
    response = _response(api.request("GET", "/a"))
    assert response.code == 422 and order == ["g", "c"]


def test_config_errors():
    for config, key in (({"auth": {"tokens": [{"name": "a", "token": ""}]}},
                         "auth.tokens[0].token"),
                        ({"middleware": [{"priority": 1}]}, "middleware[0].function_id"),
                        ({"middleware": [{"function_id": "f", "phase": "post"}]},
                         "middleware[0].phase")):
        with pytest.raises(ConfigError) as e:
            Api(**config)
        assert e.value.key == key
    assert parse_middleware([{"function_id": "b", "priority": 2}, {"function_id": "a"}]) == [
        "a", "b"]


def test_bad_route_middleware_is_a_refused_trigger():
    api = Api()
    api.worker.receive({"type": "registerfunction", "id": "f"})
    api.worker.receive({"type": "registertrigger", "id": "t", "trigger_type": "http",
                        "function_id": "f", "config": {"api_path": "a",
                                                       "middleware_function_ids": "mw"}})
    [result] = api.worker.sent_of_type("triggerregistrationresult")
    assert "middleware_function_ids" in result["error"]["message"]
