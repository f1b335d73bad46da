"""
HTTP-invoked functions (iii_twisted.modules.http_functions): registration and refusals,
the security policy, the request a call makes and how answers map to results. Calls
go to a Klein app through StubTreq, or through the real Agent on a MemoryReactorClock
to see the checked connection and the wire bytes.
"""

import base64
import hashlib
import hmac
import json

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from iii_twisted.engine import Engine
from iii_twisted.modules.http_functions import (
    HttpFunctionsModule, SecurityPolicy, UrlRejected, address_blocked,
)
from iii_twisted.protocol import InvocationError
from iii_twisted.testing import FakeWorkerConnection

OPEN_SECURITY = {"security": {"url_allowlist": ["*"], "require_https": False,
                              "block_private_ips": False}}


class Endpoint:
    """A Klein app standing in for the remote function; records what it got."""

    def __init__(self):
        self.app = Klein()
        self.requests = []
        self.answer = (200, {"Content-Type": "application/json"}, b'{"ok":true}')
        self.app.route("/", branch=True)(self.handle)

    def handle(self, request, **kwargs):
        self.requests.append({
            "method": request.method.decode(),
            "path": request.path.decode(),
            "headers": {k.decode().lower(): v[-1].decode()
                        for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": request.content.read(),
        })
        answer = self.answer
        if isinstance(answer, Deferred):
            return answer
        code, headers, body = answer
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


class Setup:
    def __init__(self, config=OPEN_SECURITY, environ=None, resolve=None):
        self.clock = MemoryReactorClock()
        self.engine = Engine(self.clock, invocation_timeout=60)
        self.remote = Endpoint()
        self.treq = StubTreq(self.remote.app.resource())
        self.module = HttpFunctionsModule(self.engine, config, self.clock,
                                          client=self.treq, environ=environ or {},
                                          resolve=resolve)
        self.worker = FakeWorkerConnection.connect(self.engine)

    def register(self, function_id="ext::fn", **invocation):
        invocation.setdefault("url", "http://hooks.example/fn")
        self.worker.receive({"type": "registerfunction", "id": function_id,
                             "description": "an external function",
                             "invocation": invocation})

    def call(self, function_id="ext::fn", data=None):
        d = self.engine.call(function_id, {"a": 1} if data is None else data)
        self.treq.flush()
        results = []
        d.addBoth(results.append)
        return results


def _value(results):
    assert results, "call has not finished"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def _error(results):
    assert results and isinstance(results[0], Failure), results
    return results[0].value


def test_call_sends_method_headers_and_json_body():
    """The request: method, x-iii-* headers, custom headers, the JSON data as body."""
    s = Setup()
    s.register(method="put", headers={"X-Custom": "v"})
    assert _value(s.call(data={"hello": "world"})) == {"ok": True}
    [request] = s.remote.requests
    assert request["method"] == "PUT" and request["path"] == "/fn"
    assert json.loads(request["body"]) == {"hello": "world"}
    headers = request["headers"]
    assert headers["content-type"] == "application/json"
    assert headers["x-iii-function-path"] == "ext::fn"
    assert headers["x-iii-invocation-id"]
    assert headers["x-iii-timestamp"].isdigit()
    assert headers["x-custom"] == "v"
    # Listed like any function.
    assert s.engine.functions["ext::fn"].description == "an external function"


def test_hmac_signature():
    """hmac: sha256=HMAC(secret, '<timestamp>:<base64(body)>') from the engine's env."""
    s = Setup(environ={"HOOK_SECRET": "s3cret"})
    s.register(auth={"type": "hmac", "secret_key": "HOOK_SECRET"})
    _value(s.call())
    headers = s.remote.requests[0]["headers"]
    signed = "{}:{}".format(headers["x-iii-timestamp"], base64.b64encode(
        s.remote.requests[0]["body"]).decode())
    expected = hmac.new(b"s3cret", signed.encode(), hashlib.sha256).hexdigest()
    assert headers["x-iii-signature"] == "sha256=" + expected


def test_bearer_and_api_key():
    """bearer sets Authorization; api_key sets the named header."""
    s = Setup(environ={"TOKEN": "tok", "KEY": "k1"})
    s.register("a", auth={"type": "bearer", "token_key": "TOKEN"})
    s.register("b", auth={"type": "api_key", "header": "X-Api-Key", "value_key": "KEY"})
    _value(s.call("a"))
    _value(s.call("b"))
    assert s.remote.requests[0]["headers"]["authorization"] == "Bearer tok"
    assert s.remote.requests[1]["headers"]["x-api-key"] == "k1"


@pytest.mark.parametrize("answer, outcome", [
    ((200, {}, b""), ("result", None)),
    ((204, {}, b""), ("result", None)),
    ((200, {}, b'[1, "two"]'), ("result", [1, "two"])),
    ((200, {}, b"<html>"), ("error", "invalid_response")),
    ((200, {}, b"[" * 100000 + b"]" * 100000), ("error", "invalid_response")),
    ((500, {}, b"[" * 100000 + b"]" * 100000), ("error", "http_error")),
    ((400, {}, b'{"error":{"code":"bad_input","message":"no"}}'), ("error", "bad_input")),
    ((400, {}, b'{"error":{}}'), ("error", "http_error")),
    ((500, {}, b"oops"), ("error", "http_error")),
    # Redirects are not followed and are a success with no result (the current
    # reference); a JSON body, if any, is the result.
    ((302, {"Location": "http://elsewhere/"}, b""), ("result", None)),
    ((301, {"Location": "http://elsewhere/"}, b"<html>moved</html>"), ("result", None)),
    ((307, {"Location": "http://elsewhere/"}, b'{"moved": true}'), ("result", {"moved": True})),
    ((304, {}, b""), ("result", None)),
    ((404, {}, b"<html>"), ("error", "http_error")),
])
def test_response_mapping(answer, outcome):
    """The engine-core.md §4.6 table as the current reference has it; redirects are not
    followed."""
    s = Setup()
    s.register()
    s.remote.answer = answer
    results = s.call()
    kind, expected = outcome
    if kind == "result":
        assert _value(results) == expected
    else:
        assert _error(results).code == expected
    assert len(s.remote.requests) == 1


def test_error_message_of_a_failing_endpoint():
    """A structured error keeps its message; a plain one says HTTP <status>."""
    s = Setup()
    s.register()
    s.remote.answer = (503, {}, b"down")
    assert _error(s.call()).message == "HTTP 503"


def test_timeout_ms_bounds_the_call():
    """No answer within timeout_ms: http_request_failed, and the request is cancelled."""
    s = Setup()
    s.register(timeout_ms=1500)
    s.remote.answer = Deferred()
    results = s.call()
    assert results == []
    s.clock.advance(1.5)
    error = _error(results)
    assert error.code == "http_request_failed" and "1500" in error.message
    assert [c for c in s.clock.getDelayedCalls() if c.active()] == []


@pytest.mark.parametrize("invocation, words", [
    ({"url": "http://localhost/x"}, "HTTPS is required"),
    ({"url": "https://10.1.2.3/x"}, "Private IP blocked"),
    ({"url": "not a url"}, "Invalid URL"),
    ({"url": "https://evil.example/x"}, "URL not in allowlist"),
    ({"url": "https://ok.example/x", "method": "TRACE"}, "invocation.method"),
    ({"url": "https://ok.example/x", "timeout_ms": -1}, "timeout_ms"),
    ({"url": "https://ok.example/x", "auth": {"type": "bearer", "token_key": "NOPE"}},
     "token_not_found"),
    ({"url": "https://ok.example/x", "auth": {"type": "magic"}}, "auth.type"),
])
def test_refused_registration_is_explained_on_call(invocation, words):
    """A refused registration is not a function; calling it says why."""
    s = Setup(config={"security": {"url_allowlist": ["ok.example", "localhost",
                                                     "10.1.2.3", "*.test"]}})
    s.worker.receive({"type": "registerfunction", "id": "ext::bad",
                      "invocation": invocation})
    assert "ext::bad" not in s.engine.functions
    assert not s.worker.sent_of_type("error")  # nothing an SDK could misread
    error = _error(s.call("ext::bad"))
    assert error.code == "function_not_found"
    assert words in error.message


def test_refusal_is_forgotten_when_the_worker_leaves_or_registers_again():
    """A later good registration clears the refusal; so does the worker leaving."""
    s = Setup(config={"security": {"url_allowlist": ["*"]}},
              resolve=_resolver({"ok.example": ["93.184.216.34"]}))
    s.register(url="http://plain.example/")
    assert "refused" in _error(s.call()).message
    s.register(url="https://ok.example/")
    assert "ext::fn" in s.engine.functions
    s.worker.receive({"type": "unregisterfunction", "id": "ext::fn"})
    assert "refused" not in _error(s.call()).message
    s.register(url="http://plain.example/")
    s.worker.disconnect()
    assert "refused" not in _error(s.call()).message


def test_function_goes_when_its_worker_leaves():
    s = Setup()
    s.register()
    s.worker.disconnect()
    assert "ext::fn" not in s.engine.functions


def test_dns_check_at_registration_removes_a_private_host():
    """A host name that resolves to a private address is removed once DNS answers."""
    answers = {}
    s = Setup(config={"security": {"url_allowlist": ["*"]}},
              resolve=lambda host, port: answers.setdefault(host, Deferred()))
    s.register(url="https://sneaky.example/")
    assert "ext::fn" in s.engine.functions
    answers["sneaky.example"].callback(["192.168.1.10"])
    assert "ext::fn" not in s.engine.functions
    assert "Private IP blocked" in _error(s.call()).message


@pytest.mark.parametrize("address, blocked", [
    ("127.0.0.1", True), ("10.0.0.1", True), ("172.16.5.4", True), ("192.168.0.1", True),
    ("169.254.169.254", True), ("0.0.0.0", True), ("255.255.255.255", True),
    ("192.0.2.7", True), ("100.64.0.1", True), ("::1", True), ("fc00::1", True),
    ("fe80::1", True), ("::", True), ("ff02::1", True), ("::ffff:127.0.0.1", True),
    ("64:ff9b::a00:1", True), ("8.8.8.8", False), ("2001:4860:4860::8888", False),
    ("::ffff:8.8.8.8", False),
])
def test_address_blocked(address, blocked):
    assert address_blocked(address) is blocked


def test_allowlist_matches_the_host_only():
    """Globs match the host: a pattern with a scheme matches nothing."""
    policy = SecurityPolicy(["*.example.com"], require_https=True, block_private_ips=True)
    assert policy.check_url("https://api.example.com:8443/x") == (
        "https", "api.example.com", 8443)
    with pytest.raises(UrlRejected):
        policy.check_url("https://example.org/")
    with pytest.raises(UrlRejected):
        SecurityPolicy(["https://x.com"]).check_url("https://x.com/")


def _resolver(table):
    def resolve(host, port):
        if host not in table:
            return fail(DNSLookupError(host))
        return succeed(table[host])
    return resolve


def _run(coroutine):
    results = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    return results[0]


def test_every_resolved_address_is_checked():
    """One private address among the answers blocks the host; DNS failure is refused."""
    policy = SecurityPolicy(resolve=_resolver({
        "mixed.example": ["93.184.216.34", "10.0.0.8"],
        "good.example": ["93.184.216.34"]}))
    assert _run(policy.addresses("good.example", 443)) == ["93.184.216.34"]
    assert _run(policy.addresses("mixed.example", 443)).value.message == \
        "Private IP blocked"
    assert _run(policy.addresses("gone.example", 443)).value.message == \
        "DNS lookup failed"


def _real_module(resolve_table, config=None):
    clock = MemoryReactorClock()
    engine = Engine(clock, invocation_timeout=60)
    module = HttpFunctionsModule(
        engine, config or {"security": {"url_allowlist": ["*"], "require_https": False}},
        clock, resolve=_resolver(resolve_table))
    worker = FakeWorkerConnection.connect(engine)
    return clock, engine, module, worker


def test_connection_goes_to_the_checked_address_with_headers_and_body_together():
    """The agent connects to the address it checked; headers and body go out at once;
    a 2xx without Content-Length ended by close is a success."""
    clock, engine, module, worker = _real_module({"hook.example": ["93.184.216.34"]})
    worker.receive({"type": "registerfunction", "id": "ext::fn",
                    "invocation": {"url": "http://hook.example:8080/in"}})
    results = []
    engine.call("ext::fn", {"x": 1}).addBoth(results.append)
    [(host, port, factory, timeout, bind)] = clock.tcpClients
    assert (host, port) == ("93.184.216.34", 8080)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    sent = transport.value()
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /in HTTP/1.1")
    assert b"Host: hook.example:8080" in head
    assert body == b'{"x":1}'  # written with the headers, not on a later tick
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
                          b'{"ok":true}')
    protocol.connectionLost(Failure(ConnectionDone()))
    assert _value(results) == {"ok": True}


def test_private_address_is_refused_at_connect_time():
    """DNS answering a private address at call time (rebinding) fails the call."""
    clock, engine, module, worker = _real_module(
        {"rebind.example": ["93.184.216.34"]},
        {"security": {"url_allowlist": ["*"], "require_https": False,
                      "block_private_ips": True}})
    worker.receive({"type": "registerfunction", "id": "ext::fn",
                    "invocation": {"url": "http://rebind.example/"}})
    assert "ext::fn" in engine.functions
    module.policy._resolve = _resolver({"rebind.example": ["127.0.0.1"]})
    results = []
    engine.call("ext::fn", {}).addBoth(results.append)
    assert clock.tcpClients == []
    error = _error(results)
    assert error.code == "url_validation_failed"
    assert error.message == "Private IP blocked"


def test_garbage_answer_is_a_clean_error():
    """An endpoint answering something that is not HTTP fails the call cleanly."""
    clock, engine, module, worker = _real_module({"junk.example": ["93.184.216.34"]})
    worker.receive({"type": "registerfunction", "id": "ext::fn",
                    "invocation": {"url": "http://junk.example/"}})
    results = []
    engine.call("ext::fn", {}).addBoth(results.append)
    [(_, _, factory, _, _)] = clock.tcpClients
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(b"\x00\x01garbage that is not http\r\n\r\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    error = _error(results)
    assert isinstance(error, InvocationError)
    assert error.code == "http_request_failed"


def test_https_connects_to_the_checked_address_through_tls():
    """For https the checked address gets a TLS connection named for the URL's host."""
    clock, engine, module, worker = _real_module(
        {"secure.example": ["93.184.216.34"]},
        {"security": {"url_allowlist": ["secure.example"]}})
    worker.receive({"type": "registerfunction", "id": "ext::tls",
                    "invocation": {"url": "https://secure.example/fn"}})
    assert "ext::tls" in engine.functions
    engine.call("ext::tls", {}).addErrback(lambda f: None)
    [(host, port, factory, timeout, bind)] = clock.tcpClients
    assert (host, port) == ("93.184.216.34", 443)
    protocol = factory.buildProtocol(None)
    assert "TLS" in type(protocol._wrappedProtocol).__name__


def test_data_json_cannot_carry_is_an_error_before_any_request():
    s = Setup()
    s.register()
    error = _error(s.call(data={"x": float("nan")}))
    assert error.code == "invocation_failed"
    assert error.message.startswith("the data for ext::fn is not JSON")
    assert s.remote.requests == []


def test_random_answers_are_a_value_or_a_clean_error():
    """Seeded random status codes, headers and bodies: a result or a known error code."""
    import random

    from iii_twisted.testing import logged_failures

    rng = random.Random(4)
    with logged_failures() as failures:
        s = Setup()
        s.register()
        bodies = [b"", b" ", b"null", b"{}", b'{"error":{"code":"c","message":"m"}}',
                  b'{"error":"flat"}', b'{"error":{"code":5}}', b"[1,2]", b"\xff\xfe",
                  b"[" * 5000 + b"]" * 5000, b'"text"', b"1e999", b"NaN", b"<html>"]
        codes = [200, 201, 204, 299, 300, 302, 400, 404, 418, 500, 503, 599]
        headers = [{}, {"Content-Type": "application/json"}, {"Content-Type": "text/html"},
                   {"Location": "http://elsewhere/"}]
        known = {"invalid_response", "http_error", "c"}
        for _ in range(300):
            s.remote.answer = (rng.choice(codes), rng.choice(headers), rng.choice(bodies))
            results = s.call(data=rng.choice([{}, {"a": [1]}, None, "x"]))
            assert results, "the call did not finish"
            if isinstance(results[0], Failure):
                assert results[0].check(InvocationError)
                assert results[0].value.code in known, results[0].value.code
        assert failures == [], [e.get("log_format") for e in failures]


# -- every URL form (issue: http://[::1]:PORT/x failed with "Codepoint U+003A ...") ----

@pytest.mark.parametrize("url, expected", [
    ("http://[::1]:8080/x", ("http", "::1", 8080)),
    ("http://[0:0:0:0:0:0:0:1]/x", ("http", "::1", 80)),
    ("https://[2001:db8::1]/x", ("https", "2001:db8::1", 443)),
    ("http://[::ffff:127.0.0.1]:81/", ("http", "::ffff:7f00:1", 81)),
    ("http://127.0.0.1:65535/", ("http", "127.0.0.1", 65535)),
    ("http://127.1/", ("http", "127.0.0.1", 80)),
    ("http://0x7f.0.0.1/", ("http", "127.0.0.1", 80)),
    ("http://2130706433/", ("http", "127.0.0.1", 80)),
    ("https://Bücher.Example:8443/ä?q=ü", ("https", "xn--bcher-kva.example", 8443)),
    ("https://xn--bcher-kva.example/", ("https", "xn--bcher-kva.example", 443)),
    ("HTTP://Example.COM/p", ("http", "example.com", 80)),
])
def test_every_url_form_parses(url, expected):
    policy = SecurityPolicy(["*"], require_https=False, block_private_ips=False)
    assert policy.check_url(url) == expected


@pytest.mark.parametrize("url", [
    "http://[::1/x", "http://[nope]/", "http://host:99999/", "http://host:-1/",
    "ftp://host/", "http:///x", "http://[fe80::1%25eth0]/", "http://xn--a.example/",
    "http://bad host/", "http://a\r\nb/",
])
def test_invalid_url_forms_are_refused(url):
    policy = SecurityPolicy(["*"], require_https=False, block_private_ips=False)
    with pytest.raises(UrlRejected) as e:
        policy.check_url(url)
    assert e.value.message == "Invalid URL"


@pytest.mark.parametrize("url", [
    "http://[::1]:8080/x", "http://[0:0:0:0:0:0:0:1]/", "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:a00:1]/", "http://[fc00::5]/", "http://[fe80::1]/", "http://[::]/",
    "http://127.1/", "http://0x7f.0.0.1/", "http://2130706433/", "http://0/",
    "http://017700000001/", "http://10.1/", "http://[64:ff9b::7f00:1]/",
])
def test_private_address_check_holds_for_every_form(url):
    policy = SecurityPolicy(["*"], require_https=False, block_private_ips=True)
    with pytest.raises(UrlRejected) as e:
        policy.check_url(url)
    assert e.value.message == "Private IP blocked"


def test_allowlist_patterns_in_every_form():
    assert SecurityPolicy(["[::1]"], require_https=False, block_private_ips=False) \
        .check_url("http://[0::1]:9/")[1] == "::1"
    assert SecurityPolicy(["::1"], require_https=False, block_private_ips=False) \
        .check_url("http://[::1]/")[1] == "::1"
    assert SecurityPolicy(["*.bücher.example"], block_private_ips=False) \
        .check_url("https://api.Bücher.example/")[1] == "api.xn--bcher-kva.example"
    with pytest.raises(UrlRejected):
        SecurityPolicy(["127.0.0.1"], require_https=False, block_private_ips=False) \
            .check_url("http://[::1]/")


def test_ipv6_literal_connects_over_tcp6_with_a_bracketed_host_header():
    """The reported input: http://[::1]:PORT/x sends a request (to ::1, Host [::1]:PORT)."""
    clock, engine, module, worker = _real_module(
        {}, {"security": {"url_allowlist": ["*"], "require_https": False,
                          "block_private_ips": False}})
    worker.receive({"type": "registerfunction", "id": "ext::v6",
                    "invocation": {"url": "http://[::1]:8123/x?a=b c"}})
    results = []
    engine.call("ext::v6", {"x": 1}).addBoth(results.append)
    [(host, port, factory, timeout, bind)] = clock.tcpClients
    assert (host, port) == ("::1", 8123)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    head = transport.value().partition(b"\r\n\r\n")[0]
    assert head.startswith(b"POST /x?a=b%20c HTTP/1.1")
    assert b"Host: [::1]:8123" in head
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert _value(results) == {}


def test_idna_host_is_resolved_and_sent_in_ascii():
    clock, engine, module, worker = _real_module(
        {"xn--bcher-kva.example": ["93.184.216.34"]})
    worker.receive({"type": "registerfunction", "id": "ext::idna",
                    "invocation": {"url": "http://Bücher.example/fn"}})
    engine.call("ext::idna", {}).addErrback(lambda f: None)
    [(host, port, factory, timeout, bind)] = clock.tcpClients
    assert (host, port) == ("93.184.216.34", 80)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert b"Host: xn--bcher-kva.example\r\n" in transport.value()
