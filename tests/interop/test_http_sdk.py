"""
The REST API module and HTTP-invoked functions driven by the official Python SDK
(iii-sdk 0.10.0) over loopback: routes, a multi-MiB streamed upload and download,
errors, and a function that lives behind a URL.
"""

import hashlib
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from iii import HttpInvocationConfig, http

from engine_process import Waiter, http_functions, rest_api, v010_config, wait_until
from engine_process import http_request as _request

API_CONFIG = v010_config(
    rest_api(default_timeout=3000, more="      body_limit: 33554432\n"),
    http_functions(["127.0.0.1", "[::1]"]))


@pytest.fixture
def api(start_engine):
    engine = start_engine(API_CONFIG, http=True)
    engine.base = "http://127.0.0.1:{}".format(engine.ports["http"])
    return engine


def _wait_for_route(url, timeout=10.0, absent=False):
    """Wait (bounded) until a route answers something other than 404, or 404."""
    wait_until(lambda: (_request(url, method="OPTIONS")[0] == 404) == absent, timeout,
               "route {} to {}".format(url, "go" if absent else "come"))


def test_get_route_with_params(api, sdk_worker):
    """A GET route with a :param answers with the function's status, headers and body."""
    worker = sdk_worker(api.url, "http-get")
    worker.register_function({"id": "users.get"}, lambda data: {
        "status_code": 200, "headers": {"x-user": data["path_params"]["id"]},
        "body": {"id": data["path_params"]["id"], "q": data["query_params"].get("q")}})
    worker.register_trigger({"type": "http", "function_id": "users.get",
                             "config": {"api_path": "users/:id", "http_method": "GET"}})
    _wait_for_route(api.base + "/users/x")
    status, headers, body = _request(api.base + "/users/42?q=hi")
    assert status == 200
    assert json.loads(body) == {"id": "42", "q": "hi"}
    assert headers.get("x-user") == "42"
    assert _request(api.base + "/nope")[0] == 404


def test_route_goes_when_the_worker_leaves(api, sdk_worker):
    """Once the worker that registered a route disconnects, the route is 404."""
    worker = sdk_worker(api.url, "http-leaver")
    worker.register_function({"id": "bye"}, lambda data: {"body": "hi"})
    worker.register_trigger({"type": "http", "function_id": "bye",
                             "config": {"api_path": "/bye"}})
    _wait_for_route(api.base + "/bye")
    worker.shutdown()
    _wait_for_route(api.base + "/bye", absent=True)


def test_multi_mib_upload_streams_through_request_body(api, sdk_worker):
    """A 6 MiB upload reaches the handler intact through the request_body channel."""
    worker = sdk_worker(api.url, "http-upload")
    payload = os.urandom(6 * 1024 * 1024 + 17)

    @http
    async def upload(request, response):
        received = await request.request_body.read_all()
        await response.status(201)
        await response.headers({"content-type": "application/json"})
        await response.writer.write(json.dumps({
            "size": len(received),
            "sha256": hashlib.sha256(received).hexdigest()}).encode())
        await response.writer.close_async()

    worker.register_function({"id": "upload"}, upload)
    worker.register_trigger({"type": "http", "function_id": "upload",
                             "config": {"api_path": "upload", "http_method": "POST"}})
    _wait_for_route(api.base + "/upload")
    status, _, body = _request(api.base + "/upload", data=payload, method="POST",
                               headers={"Content-Type": "application/octet-stream"})
    assert status == 201
    assert json.loads(body) == {"size": len(payload),
                                "sha256": hashlib.sha256(payload).hexdigest()}


def test_multi_mib_download_streams_from_the_response_channel(api, sdk_worker):
    """A 5 MiB body written to the response channel arrives byte for byte."""
    worker = sdk_worker(api.url, "http-download")
    payload = os.urandom(5 * 1024 * 1024 + 3)

    @http
    async def download(request, response):
        await response.status(200)
        await response.headers({"content-type": "application/octet-stream",
                                "x-size": str(len(payload))})
        await response.writer.write(payload)
        await response.writer.close_async()

    worker.register_function({"id": "download"}, download)
    worker.register_trigger({"type": "http", "function_id": "download",
                             "config": {"api_path": "download"}})
    _wait_for_route(api.base + "/download")
    status, headers, body = _request(api.base + "/download")
    assert status == 200
    assert headers.get("Content-Type") == "application/octet-stream"
    assert headers.get("x-size") == str(len(payload))
    assert body == payload


def test_function_error_is_500_with_error_id_in_the_log(api, sdk_worker):
    """A handler that raises gives 500 {error, error_id}: its text is only in the log."""
    worker = sdk_worker(api.url, "http-error")

    def broken(data):
        raise ValueError("handler exploded")

    worker.register_function({"id": "broken"}, broken)
    worker.register_trigger({"type": "http", "function_id": "broken",
                             "config": {"api_path": "broken"}})
    _wait_for_route(api.base + "/broken")
    status, _, body = _request(api.base + "/broken")
    assert status == 500
    answer = json.loads(body)
    assert "handler exploded" not in body.decode()
    assert answer["error"] == "internal server error"
    wait_until(lambda: any(answer["error_id"] in line and "handler exploded" in line
                           for line in api.log().splitlines()), 5,
               "the error id and the handler's error in the engine log")


def test_no_answer_is_504(api, sdk_worker):
    """A handler that returns nothing and never writes the response: 504 at the timeout."""
    worker = sdk_worker(api.url, "http-silent")
    worker.register_function({"id": "silent"}, lambda data: None)
    worker.register_trigger({"type": "http", "function_id": "silent",
                             "config": {"api_path": "silent"}})
    _wait_for_route(api.base + "/silent")
    started = time.monotonic()
    status, _, body = _request(api.base + "/silent")
    assert status == 504 and body == b""
    assert 2.5 < time.monotonic() - started < 10


class _Hook(BaseHTTPRequestHandler):
    seen = None

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/moved":
            self.server.seen.add({"path": self.path, "host": self.headers.get("Host")})
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/elsewhere")
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>moved</html>")
            return
        self.server.seen.add({"path": self.path,
                              "headers": {k.lower(): v for k, v in self.headers.items()},
                              "body": json.loads(body)})
        answer = json.dumps({"echo": json.loads(body)["n"] * 2}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(answer)  # no Content-Length: ended by the close

    def log_message(self, *args):
        pass


@pytest.fixture
def hook_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.seen = Waiter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_function_is_called_like_any_other(api, sdk_worker, hook_server):
    """A function behind a URL: called by id, JSON in and out, headers sent."""
    owner = sdk_worker(api.url, "http-fn-owner")
    caller = sdk_worker(api.url, "http-fn-caller")
    url = "http://127.0.0.1:{}/hook".format(hook_server.server_address[1])
    owner.register_function({"id": "ext::double"}, HttpInvocationConfig(
        url=url, timeout_ms=5000, headers={"X-Team": "blue"}))
    wait_until(lambda: "ext::double" in [f.function_id for f in caller.list_functions()],
               what="ext::double")
    result = caller.trigger({"function_id": "ext::double", "payload": {"n": 21}})
    assert result == {"echo": 42}
    [seen] = hook_server.seen.wait_for()
    assert seen["path"] == "/hook"
    assert seen["body"]["n"] == 21
    assert seen["headers"]["x-team"] == "blue"
    assert seen["headers"]["x-iii-function-path"] == "ext::double"
    assert seen["headers"]["content-type"] == "application/json"


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def test_http_function_on_an_ipv6_literal_and_a_redirect(api, sdk_worker):
    """
    Reported: a function at http://[::1]:PORT/x failed ("Codepoint U+003A ... not
    allowed") and never sent a request. A 302 it answers is a success with no result
    (not followed), as in the current reference.
    """
    server = _V6Server(("::1", 0), _Hook)
    server.seen = Waiter()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        owner = sdk_worker(api.url, "http-fn-v6")
        base = "http://[::1]:{}".format(server.server_address[1])
        owner.register_function({"id": "ext::v6"}, HttpInvocationConfig(
            url=base + "/hook", timeout_ms=5000))
        owner.register_function({"id": "ext::moved"}, HttpInvocationConfig(
            url=base + "/moved", timeout_ms=5000))
        wait_until(lambda: {"ext::v6", "ext::moved"} <= {
            f.function_id for f in owner.list_functions()}, what="the v6 functions")
        assert owner.trigger({"function_id": "ext::v6", "payload": {"n": 4}}) == {"echo": 8}
        assert owner.trigger({"function_id": "ext::moved", "payload": {"n": 1}}) is None
        seen = server.seen.wait_for(lambda values: len(values) >= 2)
        assert seen[0]["path"] == "/hook"
        assert seen[0]["headers"]["host"] == "[::1]:{}".format(server.server_address[1])
        assert seen[1] == {"path": "/moved",
                           "host": "[::1]:{}".format(server.server_address[1])}
    finally:
        server.shutdown()
        server.server_close()


def test_refused_http_function_says_why(api, sdk_worker):
    """A URL outside the allowlist is not registered; a call explains the refusal."""
    owner = sdk_worker(api.url, "http-fn-refused")
    owner.register_function({"id": "ext::elsewhere"}, HttpInvocationConfig(
        url="http://203.0.113.9/hook"))
    wait_until(lambda: "refused" in api.log(), what="the refusal in the engine log")
    with pytest.raises(Exception) as e:
        owner.trigger({"function_id": "ext::elsewhere", "payload": {},
                       "timeout_ms": 5000})
    assert "function_not_found" in str(e.value)
    assert "not in allowlist" in str(e.value)


def test_client_leaving_a_stream_stops_the_writer(api, sdk_worker):
    """An endless streamed response: when the client hangs up, the engine closes the
    worker's response channel, so the handler's next write fails instead of going on."""
    from http.client import HTTPConnection

    worker = sdk_worker(api.url, "http-endless")
    outcome = Waiter()

    @http
    async def endless(request, response):
        import asyncio

        await response.status(200)
        await response.headers({"content-type": "text/event-stream"})
        try:
            for i in range(2000):
                await response.writer.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.005)
            outcome.add("finished")
        except Exception as e:
            outcome.add(type(e).__name__)

    worker.register_function({"id": "endless"}, endless)
    worker.register_trigger({"type": "http", "function_id": "endless",
                             "config": {"api_path": "endless"}})
    _wait_for_route(api.base + "/endless")
    connection = HTTPConnection("127.0.0.1", api.ports["http"], timeout=10)
    connection.request("GET", "/endless")
    response = connection.getresponse()
    assert response.status == 200
    assert response.read1(64).startswith(b"data: 0")
    connection.sock.close()
    connection.close()
    [result] = outcome.wait_for(timeout=8)
    assert result != "finished"


def test_response_shapes_from_a_real_worker(api, sdk_worker):
    """
    Reported input: a text/xml string body goes out raw (it went out JSON-encoded);
    an ApiResponse model (serialized as statusCode) and "Name: value" header lines work.
    """
    from iii import ApiResponse

    worker = sdk_worker(api.url, "http-shapes")
    worker.register_function({"id": "shapes.xml"}, lambda data: {
        "status_code": 200, "headers": {"Content-Type": "text/xml"}, "body": "<ok/>"})
    worker.register_function({"id": "shapes.model"}, lambda data: ApiResponse(
        statusCode=201, headers={"content-type": "text/plain; charset=utf-8"}, body="made"))
    worker.register_function({"id": "shapes.lines"}, lambda data: {
        "status_code": 200, "headers": ["Content-Type: text/csv", "X-Rows: 2"],
        "body": "a,b\n1,2\n"})
    for name in ("xml", "model", "lines"):
        worker.register_trigger({"type": "http", "function_id": "shapes." + name,
                                 "config": {"api_path": "shapes/" + name,
                                            "http_method": "GET"}})
        _wait_for_route(api.base + "/shapes/" + name)
    status, headers, body = _request(api.base + "/shapes/xml")
    assert (status, headers.get("content-type"), body) == (200, "text/xml", b"<ok/>")
    status, headers, body = _request(api.base + "/shapes/model")
    assert (status, headers.get("content-type"), body) == (
        201, "text/plain; charset=utf-8", b"made")
    status, headers, body = _request(api.base + "/shapes/lines")
    assert (status, headers.get("content-type"), headers.get("x-rows"), body) == (
        200, "text/csv", "2", b"a,b\n1,2\n")
