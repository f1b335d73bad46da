"""
Slow clients and descriptors (docs/limits.rst): connections per client address, and
the HTTP header timeout.

- L{AddressCounter}: open connections per client IP address on one port; a factory's
  C{buildProtocol} asks L{AddressCounter.admit} and returns None past
  ``max_connections_per_address`` (Twisted then closes the new socket at once), the
  protocol gives its place back when its connection is lost.
- L{SlowClientHTTPChannel}: twisted.web's C{HTTPChannel} with a deadline for each
  request's headers (``http_header_timeout_ms``): its own idle timeout is reset by every
  byte, so a client sending headers one byte a second would hold its descriptor for
  ever. The WebSocket ports use Autobahn's ``openHandshakeTimeout`` for the same.
"""

from twisted.logger import Logger
from twisted.web.http import HTTPChannel

_log = Logger()


class AddressCounter:
    """Open connections per client address on one port (see the module docstring)."""

    def __init__(self, limits, port_name):
        """
        @param limits: the engine's L{iii_twisted.limits.Limits}.
        @param port_name: how the log names the port (``worker``, ``http``).
        """
        self._limits = limits
        self._port_name = port_name
        self.open = {}  # host -> open connections
        self._warned = set()  # hosts at the limit that were logged once

    def admit(self, addr):
        """
        @param addr: the C{IAddress} C{buildProtocol} was given.
        @return: the host to pass to L{release} later (None for an address without a
            host, such as a UNIX socket, which is not counted), or False when that
            host is at the limit.
        """
        host = getattr(addr, "host", None)
        if host is None:
            return None
        count = self.open.get(host, 0)
        if count >= self._limits.connections_per_address:
            self._limits.count("connections_refused_per_address")
            if host not in self._warned:
                self._warned.add(host)
                _log.warn("refusing connections to the {port} port from {host}: it has "
                          "{count} open (limits.max_connections_per_address)",
                          port=self._port_name, host=host, count=count)
            return False
        self.open[host] = count + 1
        return host

    def release(self, host):
        """A connection admitted for C{host} is gone."""
        if host is None:
            return
        count = self.open.get(host, 0) - 1
        if count > 0:
            self.open[host] = count
        else:
            self.open.pop(host, None)
        self._warned.discard(host)


class SlowClientHTTPChannel(HTTPChannel):
    """
    An C{HTTPChannel} that closes a connection whose request headers are not all in
    within C{header_timeout} seconds (set by the factory; None disables it), and
    gives back its place in the site's L{AddressCounter} (C{counted_host}).
    """

    header_timeout = None
    counted_host = None
    _header_call = None
    _counter = None
    _limits = None
    _host = None
    _peer = None

    # twisted.web's Request asks its channel for both addresses as it is made, and
    # the transport builds a new address (the local one with a getsockname() call)
    # each time: a connection's addresses do not change, so they are asked once.
    def getHost(self):
        host = self._host
        if host is None:
            host = self._host = HTTPChannel.getHost(self)
        return host

    def getPeer(self):
        peer = self._peer
        if peer is None:
            peer = self._peer = HTTPChannel.getPeer(self)
        return peer

    def connectionMade(self):
        HTTPChannel.connectionMade(self)
        self._start_header_timer()

    def _start_header_timer(self):
        if self.header_timeout is not None and self._header_call is None:
            self._header_call = self.callLater(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self):
        if self._header_call is not None:
            if self._header_call.active():
                self._header_call.cancel()
            self._header_call = None

    def _headers_too_slow(self):
        self._header_call = None
        if self._limits is not None:
            self._limits.count("handshakes_timed_out")
        _log.debug("closed an HTTP connection from {peer}: its headers took over {seconds}s",
                   peer=self.transport.getPeer(), seconds=self.header_timeout)
        self.transport.abortConnection()

    def allHeadersReceived(self):
        self._cancel_header_timer()
        HTTPChannel.allHeadersReceived(self)

    def requestDone(self, request):
        # A kept-alive connection's next request gets its own deadline; set before the
        # base class parses what it already holds of that request.
        if self.persistent:
            self._start_header_timer()
        HTTPChannel.requestDone(self, request)

    def connectionLost(self, reason):
        self._cancel_header_timer()
        HTTPChannel.connectionLost(self, reason)
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.release(self.counted_host)


class LimitedSite:
    """
    Mixin for a twisted.web C{Site} (put it first): connections are
    L{SlowClientHTTPChannel}s, counted per client address, with the idle timeout of
    ``http_idle_timeout_ms``. Call L{limit_connections} from C{__init__}.
    """

    protocol = SlowClientHTTPChannel
    limits = None
    _address_counter = None

    def limit_connections(self, limits):
        """@param limits: the engine's L{iii_twisted.limits.Limits}."""
        self.limits = limits
        self.timeOut = limits.http_idle_timeout_ms / 1000.0
        self._address_counter = AddressCounter(limits, "http")

    def buildProtocol(self, addr):
        counter = self._address_counter
        host = counter.admit(addr) if counter is not None else None
        if host is False:
            return None
        channel = super().buildProtocol(addr)
        if self.limits is not None:
            channel.header_timeout = self.limits.http_header_timeout_ms / 1000.0
            channel.counted_host = host
            channel._counter = counter
            channel._limits = self.limits
        return channel

