"""
Reference servers for the benchmark, on the same Twisted and Autobahn as the engine
and with the same WebSocket options (no UTF-8 validation pass, no compression):

- ``echo``: a bare Autobahn WebSocket server sending every frame back (the floor of a
  round trip: one frame in, one frame out per call);
- ``relay``: the "minimal relay": clients connecting on ``/worker`` are workers, any
  other path is a caller; each caller frame goes, unparsed, to the next worker (round
  robin) and each worker frame back to the caller whose frame that worker received
  first (workers answer in order). Two frames in, two frames out per call, as in the
  engine, with no decoding and no routing logic: the cost of carrying a call in Python;
- ``http``: a bare twisted.web server answering every POST with its body (the floor
  of an HTTP request).

Usage: ``python bench/servers.py echo|relay|http PORT``. Listens on 127.0.0.1 only.
"""

import sys
from collections import deque
from itertools import cycle

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol


def _options(factory):
    factory.setProtocolOptions(
        maxMessagePayloadSize=64 * 1024 * 1024, maxFramePayloadSize=64 * 1024 * 1024,
        webStatus=False, autoPingInterval=0, utf8validateIncoming=False,
        perMessageCompressionAccept=lambda offers: None)
    return factory


class EchoProtocol(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


class RelayProtocol(WebSocketServerProtocol):
    _is_worker = False

    def onConnect(self, request):
        self._is_worker = request.path == "/worker"
        self.owed = deque()  # callers this worker owes an answer, in order

    def onOpen(self):
        if self._is_worker:
            self.factory.add_worker(self)

    def onMessage(self, payload, isBinary):
        if self._is_worker:
            if self.owed:
                caller = self.owed.popleft()
                if caller.state == caller.STATE_OPEN:
                    caller.sendMessage(payload, isBinary)
            return
        worker = self.factory.next_worker()
        if worker is not None:
            worker.owed.append(self)
            worker.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        if self._is_worker:
            self.factory.remove_worker(self)


class RelayFactory(WebSocketServerFactory):
    protocol = RelayProtocol

    def __init__(self, *args, **kwargs):
        WebSocketServerFactory.__init__(self, *args, **kwargs)
        self._workers = []
        self._next = None

    def add_worker(self, worker):
        self._workers.append(worker)
        self._next = cycle(list(self._workers))

    def remove_worker(self, worker):
        if worker in self._workers:
            self._workers.remove(worker)
        self._next = cycle(list(self._workers)) if self._workers else None

    def next_worker(self):
        return next(self._next) if self._next is not None else None


def main(kind, port):
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    if kind == "echo":
        factory = _options(WebSocketServerFactory(reactor=reactor))
        factory.protocol = EchoProtocol
    elif kind == "relay":
        factory = _options(RelayFactory(reactor=reactor))
    elif kind == "http":
        class Echo(Resource):
            isLeaf = True

            def render_POST(self, request):
                request.setHeader(b"content-type", b"application/json")
                return request.content.read()
        factory = Site(Echo())
        factory.log = lambda request: None  # no access log, as the engine has none
    else:
        raise SystemExit("unknown server kind {!r}".format(kind))
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=256)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
