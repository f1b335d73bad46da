"""
The worker WebSocket over in-memory transports, shared by the socket-level unit tests:
real Autobahn server and client protocols joined by twisted.test.iosim, on a
MemoryReactorClock.
"""

import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from iii_twisted.engine import Engine
from iii_twisted.worker import WorkerFactory


class Client(WebSocketClientProtocol):
    """A test client that records what it receives."""

    def __init__(self):
        WebSocketClientProtocol.__init__(self)
        self.received = []
        self.opened = False
        self.closed_with = None
        self.http_status = None

    def onOpen(self):
        self.opened = True

    def onMessage(self, payload, isBinary):
        self.received.append(json.loads(payload) if not isBinary else payload)

    def onClose(self, wasClean, code, reason):
        self.closed_with = code

    def send(self, message):
        self.sendMessage(json.dumps(message).encode("utf-8"))

    def of_type(self, kind):
        return [m for m in self.received if isinstance(m, dict) and m.get("type") == kind]


class Harness:
    """
    An engine and its worker factory, with in-memory clients.

    @param limits: an L{iii_twisted.limits.Limits} the engine has before the factory is
        built (the factory reads its send-buffer and frame budgets), or None.
    @param factory_options: passed to L{WorkerFactory} (C{ping_interval} defaults to 0).
    """

    def __init__(self, limits=None, **factory_options):
        self.reactor = MemoryReactorClock()
        self.engine = Engine(self.reactor, invocation_timeout=30)
        if limits is not None:
            self.engine.limits = limits
        factory_options.setdefault("ping_interval", 0)
        self.factory = WorkerFactory(self.engine, self.reactor, **factory_options)
        self.pumps = []

    def connect(self, path="/"):
        server = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
        client_factory = WebSocketClientFactory("ws://127.0.0.1:49134" + path,
                                                reactor=self.reactor)
        client_factory.protocol = Client
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49134))
        server_transport = iosim.FakeTransport(
            server, isServer=True, hostAddress=IPv4Address("TCP", "127.0.0.1", 49134),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + len(self.pumps)))
        client_transport = iosim.FakeTransport(client, isServer=False)
        pump = iosim.connect(server, server_transport, client, client_transport, greet=False)
        self.pumps.append(pump)
        self.flush()
        return client, server

    def flush(self):
        """Run what is due now on the clock and carry every byte both ways, 5 times."""
        for _ in range(5):
            self.reactor.advance(0)
            for pump in self.pumps:
                pump.flush()
