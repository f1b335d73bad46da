"""
Slow clients and descriptors (issue 14): the HTTP header timeout, the WebSocket
handshake timeout and connections per client address, on a MemoryReactorClock with
in-memory transports.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from iii_twisted.engine import Engine
from iii_twisted.limits import Limits
from iii_twisted.modules.rest_api import RestApiModule
from iii_twisted.worker import WorkerFactory


def addr(host, port=40000):
    return IPv4Address("TCP", host, port)


def make_api(**limits):
    reactor = MemoryReactorClock()
    engine = Engine(reactor)
    engine.limits = Limits(**limits)
    module = RestApiModule(engine, {"port": 0, "host": "127.0.0.1"}, reactor)
    engine.register_function("app::hello", lambda data: {"hi": True})
    engine.register_trigger("t", "http", "app::hello",
                            {"api_path": "hello", "http_method": "GET"})
    return reactor, engine, module.site


class Transport(StringTransport):
    """As a TCP transport: unregistering when no producer is registered is fine."""

    def unregisterProducer(self):
        self.producer = None


def connect(factory, host="127.0.0.1", port=40000):
    protocol = factory.buildProtocol(addr(host, port))
    if protocol is None:
        return None, None
    transport = Transport(peerAddress=addr(host, port),
                                hostAddress=addr("127.0.0.1", 3111))
    protocol.makeConnection(transport)
    return protocol, transport


def test_http_headers_sent_slowly_are_cut_off_at_the_header_timeout():
    """The issue's slow client: headers a byte a second never finish; the idle timeout
    alone (reset by each byte) would keep the descriptor for ever."""
    reactor, engine, site = make_api(http_header_timeout_ms=10000)
    channel, transport = connect(site)
    for byte in b"GET /hello HTTP/1.1\r\nHost: x\r\n":
        channel.dataReceived(bytes([byte]))
        reactor.advance(0.25)  # a byte every quarter second: never idle
    assert not transport.disconnecting  # 7.5 s of trickling
    reactor.advance(10.0 - reactor.seconds() - 0.01)
    assert not transport.disconnecting
    reactor.advance(0.02)
    assert transport.disconnecting and transport.disconnected  # aborted
    assert engine.limits.counters["handshakes_timed_out"] == 1


def test_http_request_with_headers_in_time_is_served_and_keeps_alive():
    reactor, engine, site = make_api(http_header_timeout_ms=1000)
    channel, transport = connect(site)
    for round_ in range(3):
        channel.dataReceived(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        reactor.advance(0)
        assert b"HTTP/1.1 200 OK" in transport.value()
        transport.clear()
        reactor.advance(0.9)  # under the deadline for the next request's headers
    assert not transport.disconnecting
    reactor.advance(0.2)  # the next request's headers never came
    assert transport.disconnecting


def test_http_connections_per_address_are_capped():
    reactor, engine, site = make_api(connections_per_address=3)
    held = [connect(site, "10.0.0.1", 1000 + i) for i in range(3)]
    assert connect(site, "10.0.0.1", 2000) == (None, None)
    assert engine.limits.counters["connections_refused_per_address"] == 1
    channel, transport = connect(site, "10.0.0.2")  # another address is served
    channel.dataReceived(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    reactor.advance(0)
    assert b"HTTP/1.1 200 OK" in transport.value()
    held[0][0].connectionLost(None)
    assert connect(site, "10.0.0.1", 3000)[0] is not None


def test_http_idle_timeout_comes_from_limits():
    reactor, engine, site = make_api(http_idle_timeout_ms=5000, http_header_timeout_ms=60000)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    reactor.advance(4.0)
    assert not transport.disconnecting
    reactor.advance(1.1)
    assert transport.disconnecting


def make_worker_port(handshake_timeout=10.0, **limits):
    reactor = MemoryReactorClock()
    engine = Engine(reactor)
    engine.limits = Limits(**limits)
    return reactor, engine, WorkerFactory(engine, reactor, ping_interval=0,
                                          handshake_timeout=handshake_timeout)


def test_worker_port_handshake_sent_slowly_is_dropped_at_the_timeout():
    reactor, engine, factory = make_worker_port(handshake_timeout=3.0)
    protocol, transport = connect(factory)
    for byte in b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n":
        protocol.dataReceived(bytes([byte]))
        reactor.advance(0.05)
    reactor.advance(1.0)
    assert transport.disconnecting
    assert engine.limits.counters["handshakes_timed_out"] == 1
    assert engine.workers == {}


def test_worker_port_connections_per_address_are_capped_and_given_back():
    reactor, engine, factory = make_worker_port(connections_per_address=2)
    first, _ = connect(factory, "10.0.0.1", 1)
    connect(factory, "10.0.0.1", 2)
    assert connect(factory, "10.0.0.1", 3) == (None, None)
    assert connect(factory, "10.0.0.2", 4)[0] is not None
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone
    first.connectionLost(Failure(ConnectionDone()))
    assert connect(factory, "10.0.0.1", 5)[0] is not None
    assert factory.addresses.open == {"10.0.0.1": 2, "10.0.0.2": 1}


def test_stream_port_connections_per_address_are_capped_and_given_back():
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from iii_twisted.modules import build_module
    reactor = MemoryReactorClock()
    engine = Engine(reactor)
    engine.limits = Limits(connections_per_address=2)
    module = build_module("modules::stream::StreamModule", engine,
                          {"port": 0, "host": "127.0.0.1"}, reactor)
    factory = module.factory
    first, _ = connect(factory, "10.0.0.1", 1)
    connect(factory, "10.0.0.1", 2)
    assert connect(factory, "10.0.0.1", 3) == (None, None)
    assert engine.limits.counters["connections_refused_per_address"] == 1
    first.connectionLost(Failure(ConnectionDone()))
    assert connect(factory, "10.0.0.1", 4)[0] is not None


def test_requests_of_a_connection_share_its_addresses_asked_once():
    """A kept-alive connection's requests get its addresses, asked of the transport once."""

    class Counting(Transport):
        asked = 0

        def getHost(self):
            Counting.asked += 1
            return Transport.getHost(self)

    reactor, engine, site = make_api()
    protocol = site.buildProtocol(addr("127.0.0.1"))
    transport = Counting(peerAddress=addr("127.0.0.1"))
    protocol.makeConnection(transport)
    for _ in range(3):
        protocol.dataReceived(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 200 ") == 3
    assert Counting.asked == 1
    assert protocol.getHost() == transport.getHost()
    assert protocol.getPeer() == addr("127.0.0.1")
