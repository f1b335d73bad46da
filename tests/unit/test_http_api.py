"""
The REST API module (iii_twisted.modules.rest_api): its Klein resource driven through
treq's StubTreq, an engine on a MemoryReactorClock, fake workers, and fake sockets on
the request's channels. A few tests feed a real HTTPChannel to see body limits and
client disconnects.
"""

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from iii_twisted.config import ConfigError
from iii_twisted.engine import Engine
from iii_twisted.modules.rest_api import RestApiModule
from iii_twisted.testing import FakeWorkerConnection


class FakeTransport:
    def __init__(self):
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False


class FakeSocket:
    """What SocketEnd needs of an Autobahn protocol."""

    STATE_OPEN = 3

    def __init__(self):
        self.state = self.STATE_OPEN
        self.transport = FakeTransport()
        self.frames = []
        self.closed_with = None
        self.producer = None
        self.autoPingInterval = 30

    def sendMessage(self, payload, isBinary=False):
        self.frames.append((payload, isBinary))

    def sendClose(self, code=None, reason=None):
        self.closed_with = code
        self.state = 0

    def registerProducer(self, producer, streaming):
        self.producer = producer


class Api:
    def __init__(self, **config):
        self.clock = MemoryReactorClock()
        self.engine = Engine(self.clock, invocation_timeout=60)
        config.setdefault("port", 0)
        self.module = RestApiModule(self.engine, config, self.clock)
        self.treq = StubTreq(self.module.resource)
        self.worker = FakeWorkerConnection.connect(self.engine)

    def route(self, function_id, config, trigger_id=None):
        self.worker.receive({"type": "registerfunction", "id": function_id})
        self.worker.receive({"type": "registertrigger", "id": trigger_id or function_id,
                             "trigger_type": "http", "function_id": function_id,
                             "config": config})

    def request(self, method, path, **kwargs):
        d = self.treq.request(method, "http://api.test" + path, **kwargs)
        self.treq.flush()
        return d

    def invocations(self):
        return [m for m in self.worker.pop_sent() if m.get("type") == "invokefunction"]

    def answer(self, invocation, result=None, error=None):
        message = {"type": "invocationresult", "invocation_id": invocation["invocation_id"],
                   "function_id": invocation["function_id"]}
        if error is not None:
            message["error"] = error
        elif result is not None:
            message["result"] = result
        self.worker.receive(message)
        self.treq.flush()

    def attach(self, ref):
        """Attach a fake socket to a channel ref, as the SDK would."""
        socket = FakeSocket()
        end = self.engine.channels.accept(
            ref["channel_id"], {"key": [ref["access_key"]], "dir": [ref["direction"]]},
            socket)
        end.opened()
        return socket, end


def _response(d):
    results = []
    d.addBoth(results.append)
    assert results, "no response yet"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def _body(treq, response):
    d = treq.content(response)
    treq.flush()
    return _response(d)


@pytest.fixture
def api():
    return Api()


def test_json_result_makes_the_response(api):
    """status_code, headers and body of a result become the response."""
    api.route("users.get", {"api_path": "users/:id", "http_method": "get"})
    d = api.request("GET", "/users/42?q=hello&q=last&x=a%20b",
                    headers={"X-Thing": "yes"})
    [call] = api.invocations()
    data = call["data"]
    assert data["path_params"] == {"id": "42"}
    assert data["query_params"] == {"q": "last", "x": "a b"}
    assert data["headers"]["x-thing"] == "yes"
    assert data["path"] == "users/:id" and data["method"] == "GET"
    assert data["trigger"] == {"type": "http", "path": "users/:id", "method": "GET"}
    assert data["body"] is None
    assert data["request_body"]["direction"] == "read"
    assert data["response"]["direction"] == "write"
    api.answer(call, {"status_code": 201, "headers": {"X-Out": "1"},
                      "body": {"id": "42"}})
    response = _response(d)
    assert response.code == 201
    assert response.headers.getRawHeaders("x-out") == ["1"]
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(_body(api.treq, response)) == {"id": "42"}
    # The request's channels are gone with it.
    assert len(api.engine.channels) == 0


def test_body_json_cannot_carry_is_500(api):
    """A body with NaN (a Python worker can send one) is not written as invalid JSON."""
    from iii_twisted.protocol import decode
    api.route("nan", {"api_path": "nan"})
    d = api.request("GET", "/nan")
    [call] = api.invocations()
    api.engine.handle_message(api.worker.worker, decode(
        b'{"type":"invocationresult","invocation_id":"%s","result":{"body":{"x":NaN}}}'
        % call["invocation_id"].encode()))
    api.treq.flush()
    response = _response(d)
    assert response.code == 500
    assert json.loads(_body(api.treq, response)) == {"error": "response body is not JSON"}


def test_statuscode_alias_and_defaults(api):
    """statusCode works too; a missing body is {}, a non-object result 200 {}."""
    api.route("f", {"api_path": "/a"})
    d = api.request("GET", "/a")
    api.answer(api.invocations()[0], {"statusCode": 418})
    response = _response(d)
    assert response.code == 418 and _body(api.treq, response) == b"{}"
    d = api.request("GET", "/a")
    api.answer(api.invocations()[0], [1, 2])
    response = _response(d)
    assert response.code == 200 and _body(api.treq, response) == b"{}"


def test_json_request_body_is_parsed(api):
    """A JSON request body arrives parsed in body; invalid JSON is null."""
    api.route("items.post", {"api_path": "items", "http_method": "POST"})
    d = api.request("POST", "/items", json={"name": "x", "n": 1})
    [call] = api.invocations()
    assert call["data"]["body"] == {"name": "x", "n": 1}
    api.answer(call, {"body": call["data"]["body"]})
    assert json.loads(_body(api.treq, _response(d))) == {"name": "x", "n": 1}
    for body in (b"{nope", b"[" * 100000 + b"]" * 100000):
        api.request("POST", "/items", data=body,
                    headers={"Content-Type": "application/json"})
        assert api.invocations()[0]["data"]["body"] is None


def test_unknown_route_404_and_other_method_405(api):
    """No route: 404, empty; the path exists for another method: 405 with Allow."""
    api.route("f", {"api_path": "only-get"})
    response = _response(api.request("GET", "/nothing"))
    assert response.code == 404 and _body(api.treq, response) == b""
    response = _response(api.request("DELETE", "/only-get"))
    assert response.code == 405
    assert response.headers.getRawHeaders("allow") == ["GET"]
    assert api.invocations() == []


def test_static_segments_win_over_parameters(api):
    """/users/me goes to its own route, not to /users/:id."""
    api.route("by_id", {"api_path": "users/:id"})
    api.route("me", {"api_path": "users/me"})
    api.request("GET", "/users/me")
    assert api.invocations()[0]["function_id"] == "me"
    api.request("GET", "/users/7")
    assert api.invocations()[0]["function_id"] == "by_id"


def test_route_goes_with_its_trigger_and_its_worker(api):
    """Unregistering the trigger, or the worker leaving, removes the route."""
    api.route("f", {"api_path": "x"}, trigger_id="t1")
    api.worker.receive({"type": "unregistertrigger", "id": "t1"})
    assert _response(api.request("GET", "/x")).code == 404
    api.route("f", {"api_path": "x"}, trigger_id="t2")
    api.request("GET", "/x")
    assert len(api.invocations()) == 1
    api.worker.disconnect()
    assert _response(api.request("GET", "/x")).code == 404


def test_later_registration_wins_and_unregistering_it_uncovers_the_first(api):
    """Two triggers on one route: the last wins; removing it brings back the first."""
    api.route("first", {"api_path": "r"}, trigger_id="t1")
    api.route("second", {"api_path": "/r"}, trigger_id="t2")
    api.request("GET", "/r")
    assert api.invocations()[0]["function_id"] == "second"
    api.worker.receive({"type": "unregistertrigger", "id": "t2"})
    api.request("GET", "/r")
    assert api.invocations()[0]["function_id"] == "first"


def test_same_shape_with_other_parameter_names_is_refused(api):
    """a/:x/:y then a/:y/:x: the second is refused, the worker told; the first serves."""
    api.route("first", {"api_path": "c/:listId/:userId"}, trigger_id="t1")
    api.route("second", {"api_path": "c/:userId/:listId"}, trigger_id="t2")
    [refused] = [m for m in api.worker.sent if m.get("type") == "triggerregistrationresult"]
    assert refused["id"] == "t2"
    assert "conflicts with already-registered route GET /c/:listId/:userId" in \
        refused["error"]["message"]
    api.request("GET", "/c/l1/u1")
    [call] = api.invocations()
    assert call["function_id"] == "first"
    assert call["data"]["path_params"] == {"listId": "l1", "userId": "u1"}
    # Once the first is gone the shape is free; another method never conflicts.
    api.worker.receive({"type": "unregistertrigger", "id": "t1"})
    api.route("second", {"api_path": "c/:userId/:listId"}, trigger_id="t2")
    api.route("third", {"api_path": "c/:a/:b", "http_method": "POST"}, trigger_id="t3")
    assert [m for m in api.worker.sent
            if m.get("type") == "triggerregistrationresult"] == []


@pytest.mark.parametrize("config, words", [
    (None, "api_path is required"),
    ({"http_method": "GET"}, "api_path is required"),
    ({"api_path": 7}, "api_path is required"),
    ({"api_path": "x", "http_method": "BREW"}, "http_method"),
    ({"api_path": "a/:/b"}, "without a name"),
    ({"api_path": "a/:id/:id"}, "repeats"),
    ({"api_path": "a b"}, "spaces"),
])
def test_malformed_trigger_is_refused(api, config, words):
    """A bad config is refused with a triggerregistrationresult naming the problem."""
    api.worker.receive({"type": "registertrigger", "id": "bad", "trigger_type": "http",
                        "function_id": "f", "config": config})
    [result] = api.worker.sent_of_type("triggerregistrationresult")
    assert words in result["error"]["message"]
    assert "bad" not in api.engine.triggers


def test_function_error_is_500_with_an_error_id_in_the_log(api):
    """A failing function gives 500 {error, error_id}; its text is only in the log."""
    api.route("boom", {"api_path": "boom"})
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        d = api.request("GET", "/boom")
        api.answer(api.invocations()[0], error={"code": "invocation_failed",
                                                "message": "it broke"})
    finally:
        globalLogPublisher.removeObserver(events.append)
    response = _response(d)
    assert response.code == 500
    body = json.loads(_body(api.treq, response))
    assert body == {"error": "internal server error", "error_id": body["error_id"]}
    assert any(e.get("error_id") == body["error_id"] and e.get("message") == "it broke"
               for e in events)


def test_unknown_function_is_500(api):
    """A route whose function is not registered answers 500, saying nothing more."""
    api.worker.receive({"type": "registertrigger", "id": "t", "trigger_type": "http",
                        "function_id": "ghost", "config": {"api_path": "g"}})
    response = _response(api.request("GET", "/g"))
    assert response.code == 500
    assert "ghost" not in _body(api.treq, response).decode()


def test_no_answer_within_default_timeout_is_504():
    """A function that never answers: 504 with an empty body after default_timeout."""
    api = Api(default_timeout=2000)
    api.route("slow", {"api_path": "slow"})
    d = api.request("GET", "/slow")
    assert api.invocations()
    api.clock.advance(2)
    api.treq.flush()
    response = _response(d)
    assert response.code == 504 and _body(api.treq, response) == b""
    # The call is forgotten (a late result is dropped) and nothing is left over.
    assert len(api.engine.tracker) == 0
    assert len(api.engine.channels) == 0


def test_condition_false_is_422_and_error_is_500(api):
    """condition_function_id: false -> 422 skipped; an error -> 500."""
    api.engine.register_function("cond.no", lambda data: False)
    api.engine.register_function("cond.boom", lambda data: 1 / 0)
    api.route("f", {"api_path": "c", "condition_function_id": "cond.no"})
    response = _response(api.request("GET", "/c"))
    assert response.code == 422
    assert json.loads(_body(api.treq, response)) == {
        "error": "Request condition not met", "skipped": True}
    assert api.invocations() == []
    api.route("g", {"api_path": "d", "condition_function_id": "cond.boom"})
    response = _response(api.request("GET", "/d"))
    assert response.code == 500


def test_condition_sees_the_request_without_channels(api):
    """The condition gets the same input minus request_body and response."""
    seen = []
    api.engine.register_function("cond.yes", lambda data: seen.append(data) or True)
    api.route("f", {"api_path": "c/:x", "condition_function_id": "cond.yes"})
    api.request("GET", "/c/1")
    assert seen[0]["path_params"] == {"x": "1"}
    assert "response" not in seen[0] and "request_body" not in seen[0]
    assert len(api.invocations()) == 1


def test_streamed_response_from_the_response_channel(api):
    """Null result: set_status/set_headers text frames then binary chunks are the answer."""
    api.route("dl", {"api_path": "dl"})
    d = api.request("GET", "/dl")
    [call] = api.invocations()
    socket, end = api.attach(call["data"]["response"])
    api.answer(call)  # null result: the channel has the answer
    end.frame(b"{not json", False)  # ignored, like any text frame it cannot read
    end.frame(b"[" * 100000 + b"]" * 100000, False)
    end.frame(b'{"type":"set_status","status_code":206}', False)
    end.frame(b'{"type":"set_headers","headers":{"content-type":"application/pdf"}}',
              False)
    payload = bytes(range(256)) * 1000
    for i in range(0, len(payload), 65536):
        end.frame(payload[i:i + 65536], True)
    end.frame(b'{"type":"set_status","status_code":500}', False)  # too late: ignored
    end.closed()
    api.treq.flush()
    response = _response(d)
    assert response.code == 206
    assert response.headers.getRawHeaders("content-type") == ["application/pdf"]
    assert _body(api.treq, response) == payload
    assert len(api.engine.channels) == 0


def test_channel_closed_without_data_is_an_empty_response(api):
    """The writer closes after set_status only: that status, empty body."""
    api.route("nc", {"api_path": "nc"})
    d = api.request("GET", "/nc")
    [call] = api.invocations()
    socket, end = api.attach(call["data"]["response"])
    end.frame(b'{"type":"set_status","status_code":204}', False)
    end.closed()
    api.treq.flush()
    assert _response(d).code == 204


def test_request_body_streams_in_64k_frames(api):
    """A non-JSON body goes to request_body in binary frames of at most 64 KiB, then EOF."""
    api.route("up", {"api_path": "up", "http_method": "POST"})
    payload = b"\x00\x01\xfe" * 100000
    d = api.request("POST", "/up", data=payload,
                    headers={"Content-Type": "application/octet-stream"})
    [call] = api.invocations()
    assert call["data"]["body"] is None
    socket, end = api.attach(call["data"]["request_body"])
    assert all(binary and len(p) <= 65536 for p, binary in socket.frames)
    assert b"".join(p for p, _ in socket.frames) == payload
    assert socket.closed_with == 1000
    end.closed()
    api.answer(call, {"body": {"size": len(payload)}})
    assert json.loads(_body(api.treq, _response(d))) == {"size": len(payload)}


def test_slow_request_body_reader_holds_the_rest_back(api):
    """The body is pumped only as fast as the reader takes it (bounded buffer)."""
    api.route("up", {"api_path": "up", "http_method": "POST"})
    payload = b"z" * (8 * 1024 * 1024)
    api.request("POST", "/up", data=payload)
    [call] = api.invocations()
    ref = call["data"]["request_body"]
    channel = api.engine.channels.get(ref["channel_id"])
    frames, size = channel.buffered
    assert size <= 1024 * 1024 + 65536
    socket, end = api.attach(ref)
    assert b"".join(p for p, _ in socket.frames) == payload


def test_head_uses_the_get_route(api):
    """HEAD on a GET-only route runs it, without a body."""
    api.route("f", {"api_path": "h"})
    d = api.request("HEAD", "/h")
    [call] = api.invocations()
    assert call["data"]["method"] == "HEAD"
    api.answer(call, {"body": {"a": 1}})
    assert _response(d).code == 200


def test_cors_permissive_by_default(api):
    """Without a cors key: any origin; preflights are answered without the function."""
    api.route("f", {"api_path": "x", "http_method": "POST"})
    response = _response(api.request("OPTIONS", "/x", headers={
        "Origin": "https://a.example", "Access-Control-Request-Method": "POST"}))
    assert response.code == 200
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
    assert api.invocations() == []


def test_cors_with_an_origin_list():
    """With allowed_origins, only those origins are echoed back."""
    api = Api(cors={"allowed_origins": ["https://ok.example"], "allowed_methods": ["GET"]})
    api.route("f", {"api_path": "x"})
    d = api.request("GET", "/x", headers={"Origin": "https://ok.example"})
    api.answer(api.invocations()[0], {"body": {}})
    assert _response(d).headers.getRawHeaders("access-control-allow-origin") == [
        "https://ok.example"]
    d = api.request("GET", "/x", headers={"Origin": "https://evil.example"})
    api.answer(api.invocations()[0], {"body": {}})
    assert _response(d).headers.getRawHeaders("access-control-allow-origin") is None


@pytest.mark.parametrize("config, key", [
    ({"body_limitt": 1}, "body_limitt"),
    ({"port": "x"}, "port"),
    ({"default_timeout": 0}, "default_timeout"),
    ({"cors": {"allowed_origin": []}}, "cors.allowed_origin"),
    ({"cors": {"allowed_origins": "*"}}, "cors.allowed_origins"),
    ({"concurrency_request_limit": 0}, "concurrency_request_limit"),
])
def test_bad_config_names_the_key(config, key):
    """Unknown keys and bad values are refused with a ConfigError naming the key."""
    with pytest.raises(ConfigError) as e:
        RestApiModule(Engine(MemoryReactorClock()), config, MemoryReactorClock())
    assert e.value.key == key


def test_concurrency_limit_queues_requests():
    """Past concurrency_request_limit requests wait (not refused) for a free slot."""
    api = Api(concurrency_request_limit=1)
    api.route("f", {"api_path": "q"})
    first = api.request("GET", "/q")
    second = api.request("GET", "/q")
    [call] = api.invocations()
    api.answer(call, {"body": 1})
    assert _response(first).code == 200
    [call] = api.invocations()
    api.answer(call, {"body": 2})
    assert _response(second).code == 200


def _channel(api):
    protocol = api.module.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_body_over_the_limit_is_413_before_buffering():
    """A declared length over body_limit is answered 413 and the function not called."""
    api = Api(body_limit=1000)
    api.route("f", {"api_path": "up", "http_method": "POST"})
    protocol, transport = _channel(api)
    protocol.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
                          + b"x" * 5000)
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting
    assert api.invocations() == []


@pytest.mark.parametrize("content_type, body", [
    (b"application/x-www-form-urlencoded", b"a=1&b=two"),
    # twisted.web's own form parsing would answer this one 400 itself.
    (b"multipart/form-data; boundary=zzz", b"not multipart at all"),
])
def test_form_bodies_reach_the_function_as_a_stream(content_type, body):
    """Form bodies are not parsed by twisted.web: the function reads them as sent."""
    api = Api()
    api.route("f", {"api_path": "form", "http_method": "POST"})
    protocol, transport = _channel(api)
    protocol.dataReceived(
        b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    [call] = api.invocations()
    assert call["data"]["body"] is None
    assert call["data"]["headers"]["content-type"] == content_type.decode()
    socket, end = api.attach(call["data"]["request_body"])
    assert b"".join(p for p, _ in socket.frames) == body
    end.closed()
    api.answer(call, {"status_code": 200, "body": {"ok": True}})
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_chunked_body_over_the_limit_is_413():
    """A chunked body is counted as it arrives."""
    api = Api(body_limit=1000)
    api.route("f", {"api_path": "up", "http_method": "POST"})
    protocol, transport = _channel(api)
    chunk = b"800\r\n" + b"y" * 0x800 + b"\r\n"
    protocol.dataReceived(b"POST /up HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert api.invocations() == []


def test_client_disconnect_cancels_the_call():
    """The client goes away: the pending call is cancelled, the channels dropped."""
    api = Api()
    api.route("f", {"api_path": "wait"})
    protocol, transport = _channel(api)
    protocol.dataReceived(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    [call] = api.invocations()
    assert len(api.engine.tracker) == 1
    socket, end = api.attach(call["data"]["response"])
    protocol.connectionLost(Failure(ConnectionDone()))
    assert len(api.engine.tracker) == 0
    assert len(api.engine.channels) == 0
    assert socket.closed_with is not None
    # The late result is dropped quietly.
    api.answer(call, {"body": {}})
    assert [c for c in api.clock.getDelayedCalls() if c.active()] == []


def test_route_table_forgets_everything_it_held(api):
    """Adding and removing many routes leaves the table (and its index) empty."""
    for i in range(50):
        api.route("f%d" % i, {"api_path": "a/%d/:x" % i}, trigger_id="t%d" % i)
    api.request("GET", "/a/7/z")
    assert api.invocations()[0]["function_id"] == "f7"
    for i in range(50):
        api.worker.receive({"type": "unregistertrigger", "id": "t%d" % i})
    routes = api.module.routes
    assert len(routes) == 0 and routes._by_length == {} and routes._by_trigger == {}


def test_stop_cancels_requests_in_flight_and_leaves_no_timer():
    """Stopping the module ends pending exchanges: no timer, call or channel is left."""
    api = Api()
    api.module.startService()
    assert api.clock.tcpServers[0][0] == 0
    api.route("f", {"api_path": "w"})
    api.request("GET", "/w")
    assert len(api.engine.tracker) == 1
    api.module.stopService()
    assert len(api.engine.tracker) == 0
    assert len(api.engine.channels) == 0
    assert [c for c in api.clock.getDelayedCalls() if c.active()] == []


def test_path_or_host_that_is_not_utf8_is_400_without_a_traceback():
    """A percent-encoded path that is not UTF-8 is refused quietly; UTF-8 ones route."""
    from iii_twisted.testing import logged_failures

    with logged_failures() as failures:
        api = Api()
        api.route("j", {"api_path": "j/:id", "http_method": "GET"})
        protocol, transport = _channel(api)
        protocol.dataReceived(b"GET /j/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 400 ")
        assert transport.value().endswith(
            b'{"error":"Request method, path or Host is not valid UTF-8"}')
        assert failures == []
        assert api.invocations() == []
        # A Host that is not UTF-8 too (Klein logged a traceback for each).
        protocol, transport = _channel(api)
        protocol.dataReceived(b"GET /j/1 HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 400 ")
        assert failures == []
        assert api.invocations() == []
        protocol.dataReceived(b"GET /j/%C3%A9 HTTP/1.1\r\nHost: x\r\n\r\n")
        [call] = api.invocations()
        assert call["data"]["path_params"] == {"id": "%C3%A9"}  # raw, as the reference


def test_random_requests_get_answers_and_log_no_failure():
    """
    Seeded random requests (methods, paths, headers, bodies; some not HTTP at all) on
    routes whose functions answer, fail or return odd shapes: no failure is logged,
    every request gets an HTTP response (504 for those left unanswered), and no
    channel is left behind.
    """
    import random

    from iii_twisted.testing import logged_failures

    rng = random.Random(5)
    with logged_failures() as failures:
        api = Api(body_limit=4096)
        api.route("j", {"api_path": "j/:id", "http_method": "POST"})
        api.route("g", {"api_path": "g", "http_method": "GET"})
        methods = [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"BREW", b"get"]
        paths = [b"/j/1", b"/j/%ff%00", b"/g?x=1&x=2&%zz", b"/g/../g", b"/nope", b"*", b"/j/",
                 b"/" + b"a" * 5000]
        types = [b"application/json", b"text/plain", b"multipart/form-data; boundary=",
                 b"application/json; charset=latin-1", b"\x00"]
        bodies = [b"", b"{}", b'{"a": [1, 2]}', b"{nope", b"[" * 3000 + b"]" * 3000,
                  b"\xff" * 100, b"x" * 5000]
        transports = []
        for _ in range(300):
            protocol, transport = _channel(api)
            body = rng.choice(bodies)
            if rng.random() < 0.1:
                protocol.dataReceived(bytes(rng.randrange(256) for _ in range(80)))
                continue
            transports.append(transport)
            head = rng.choice(methods) + b" " + rng.choice(paths) + b" HTTP/1.1\r\nHost: x\r\n"
            head += b"Content-Type: " + rng.choice(types) + b"\r\n"
            if rng.random() < 0.8:
                head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            if rng.random() < 0.2:
                head += b"Origin: http://elsewhere\r\n"
            protocol.dataReceived(head + b"\r\n" + body)
            for call in api.invocations():
                roll = rng.random()
                if roll < 0.4:
                    api.answer(call, {"status_code": rng.choice([200, 201, 404, 999, "x"]),
                                      "headers": rng.choice([{"a": "b"}, {"a": 1}, [], None]),
                                      "body": rng.choice([{"x": 1}, "text", None, [1]])})
                elif roll < 0.8:
                    api.answer(call, error={"code": "boom", "message": "no"})
                else:
                    api.answer(call, rng.choice([1, "s", [1], None]))
        api.clock.advance(api.module.timeout + 1)  # whatever is left times out: 504
        for transport in transports:
            assert transport.value().startswith(b"HTTP/1.1 "), transport.value()[:200]
        assert failures == [], [e.get("log_format") for e in failures]
        assert len(api.engine.channels) == 0
