"""
The REST port's direct way (iii_twisted.modules.rest_api._ApiResource) against Klein's:
every request gets, byte for byte, the answer Klein's resource gives it, for paths
either takes, answered, failed, streamed, cancelled or left waiting for a slot.
"""

import platform
import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from iii_twisted.modules.rest_api import ApiSite, _ApiResource

from test_http_api import Api

_DATE = re.compile(rb"\r\nDate: [^\r]*")


class Port:
    """One REST module served either way: C{direct} (its own resource) or Klein's."""

    def __init__(self, direct, **config):
        self.api = Api(**config)
        module = self.api.module
        assert isinstance(module.resource, _ApiResource)
        resource = module.resource if direct else module.app.resource()
        self.site = ApiSite(resource, self.api.clock, module.site.body_limit)
        self.api.route("j", {"api_path": "j/:id", "http_method": "POST"})
        self.api.route("g", {"api_path": "g"})

    def connect(self):
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def answer_all(self, result):
        for call in self.api.invocations():
            self.api.answer(call, result)


REQUESTS = [
    b"GET /g HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /j/1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 7\r\n\r\n{\"a\":1}",
    b"HEAD /g HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /j/1 HTTP/1.1\r\nHost: x\r\n\r\n",  # 405
    b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",  # 404
    b"GET //g HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://x/g HTTP/1.1\r\nHost: x\r\n\r\n",
    # Klein's router answers these itself: a newline inside the path is a 404 from
    # werkzeug; a Host that is not UTF-8 is a 400 before either (ApiRequest.process).
    b"GET /g%0Ax HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /g%0a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /g HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    b"GET /g HTTP/1.1\r\nHost: \xc3\xa9\r\n\r\n",
    b"GET /_iii/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /_iii/health/ready HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /_iii/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"OPTIONS /g HTTP/1.1\r\nHost: x\r\nOrigin: http://o\r\n"
    b"Access-Control-Request-Method: GET\r\n\r\n",
    b"GET /g HTTP/1.1\r\nHost: x\r\nOrigin: http://o\r\n\r\n",
    b"GET /%ff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"BREW /g HTTP/1.1\r\nHost: x\r\n\r\n",
]

RESULTS = [
    {"status_code": 201, "headers": {"X-A": "1"}, "body": {"x": 1}},
    {"body": "text", "headers": {"Content-Type": "text/plain"}},
    None,  # a null result: the answer would come on the response channel
]


def _exchange(direct, request, result):
    port = Port(direct)
    protocol, transport = port.connect()
    protocol.dataReceived(request)
    if result is not None:
        port.answer_all(result)
    port.api.clock.advance(port.api.module.timeout + 1)  # the rest: 504
    return _DATE.sub(b"", transport.value())


@pytest.mark.parametrize("request_bytes", REQUESTS)
@pytest.mark.parametrize("result", RESULTS)
def test_direct_way_answers_as_klein(request_bytes, result):
    """The same request and function result give the same bytes either way."""
    klein = _exchange(False, request_bytes, result)
    direct = _exchange(True, request_bytes, result)
    assert klein.startswith(b"HTTP/1.1 ")
    assert direct == klein


def test_function_error_and_stop_and_disconnect_as_klein():
    """A failed call, a module stopping and a client leaving end alike either way."""
    outcomes = {}
    for direct in (False, True):
        seen = []
        # A function error: 500 with an error id (which differs: compared by shape).
        port = Port(direct)
        protocol, transport = port.connect()
        protocol.dataReceived(REQUESTS[0])
        [call] = port.api.invocations()
        port.api.answer(call, error={"code": "boom", "message": "no"})
        seen.append(re.sub(rb'"error_id":"[0-9a-f]+"', b"", _DATE.sub(b"", transport.value())))
        # The module stops with a request in flight: 503, its call cancelled.
        port = Port(direct)
        port.api.module.startService()
        protocol, transport = port.connect()
        protocol.dataReceived(REQUESTS[0])
        port.api.module.stopService()
        seen.append(_DATE.sub(b"", transport.value()))
        assert len(port.api.engine.channels) == 0
        # The client leaves: nothing is written, the call and its channels go.
        port = Port(direct)
        protocol, transport = port.connect()
        protocol.dataReceived(REQUESTS[0])
        protocol.connectionLost(Failure(ConnectionDone()))
        seen.append(transport.value())
        assert len(port.api.engine.tracker) == 0 and len(port.api.engine.channels) == 0
        outcomes[direct] = seen
    assert outcomes[True] == outcomes[False]
    assert outcomes[True][0].startswith(b"HTTP/1.1 500 ")
    assert outcomes[True][1].startswith(b"HTTP/1.1 503 ")
    assert outcomes[True][1].endswith(b'{"error":"the HTTP API is stopping"}')


@pytest.mark.parametrize("direct", [False, True])
def test_waiting_requests_run_in_order_and_a_leaver_gives_its_turn(direct):
    """
    With concurrency_request_limit 1: requests wait in order; one whose client leaves
    while it waits is never run; each finished request starts the next.
    """
    port = Port(direct, concurrency_request_limit=1)
    connections = [port.connect() for _ in range(4)]
    for i, (protocol, _) in enumerate(connections):
        protocol.dataReceived(b"GET /g?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
    connections[1][0].connectionLost(Failure(ConnectionDone()))
    order = []
    for _ in range(3):
        [call] = port.api.invocations()
        order.append(call["data"]["query_params"]["n"])
        port.api.answer(call, {"body": order[-1]})
    assert order == ["0", "2", "3"]
    assert port.api.invocations() == []
    assert port.api.module.in_flight() == 0
    for i in (0, 2, 3):
        assert connections[i][1].value().startswith(b"HTTP/1.1 200 ")
    assert connections[1][1].value() == b""


def test_synchronous_failures_do_not_nest_deeper_per_waiting_request():
    """
    Requests that wait for a slot and then fail at once (the function is gone) each
    start the next in a loop, not one stack frame deeper per request.
    """
    port = Port(True, concurrency_request_limit=1)
    first, first_transport = port.connect()
    first.dataReceived(REQUESTS[0])
    others = [port.connect() for _ in range(2000)]
    for protocol, _ in others:
        protocol.dataReceived(REQUESTS[0])
    # The function goes away: every waiting request fails when its turn comes.
    port.api.worker.receive({"type": "unregisterfunction", "id": "g"})
    [call] = port.api.invocations()
    port.api.answer(call, {"body": 1})
    assert first_transport.value().startswith(b"HTTP/1.1 200 ")
    for _, transport in others:
        assert transport.value().startswith(b"HTTP/1.1 500 ")
    assert port.api.module.in_flight() == 0


@pytest.mark.skipif(platform.python_implementation() != "CPython",
                    reason="reference counting frees objects without the cyclic GC only "
                    "on CPython (PyPy's gc.collect() counts nothing)")
def test_an_answered_request_leaves_no_reference_cycles():
    """
    A request's exchange, channels and their ends are unlinked when it ends: they are
    freed with it, not left (with the request) to the cyclic garbage collector.
    """
    import gc

    port = Port(True)
    protocol, transport = port.connect()

    def one():
        protocol.dataReceived(REQUESTS[1])
        port.answer_all({"body": {"ok": True}})
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        transport.clear()
    one()  # first-use caches
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            one()
        assert gc.collect() == 0
    finally:
        gc.enable()
