"""
Listeners: every port the engine opens is a L{Listener}, a strports service that

- says which port and which listener when it cannot bind (L{ListenerError}, one short
  line, short enough for twistd's daemon status pipe, which keeps 100 bytes);
- answers the start-up report (L{Listener.report}): its name, endpoint, bound port and
  whether connections on it are authenticated.

The engine sets C{authenticated} on a worker listener whose ``auth`` demands
credentials (iii_twisted/auth.py); every other listener reports ``unauthenticated``.
"""

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError


# True in each engine process of ``twistd iii --processes N`` (iii_twisted.processes):
# listeners with a fixed tcp:/ssl: port are then opened with SO_REUSEPORT and shared.
shared_ports = False


class ListenerError(Exception):
    """A listener could not bind its port. C{str()} is the whole message."""


class Listener(StreamServerEndpointService):
    """
    A strports service with a name, for messages and the start-up report.

    @ivar name: which listener (``iii-worker-manager``, ``iii-http``, ...).
    @ivar description: its endpoint string (``tcp:3111:interface=0.0.0.0``).
    @ivar authenticated: whether connections must authenticate.
    """

    def __init__(self, description, factory, reactor, name, authenticated=False):
        StreamServerEndpointService.__init__(
            self, _endpoint(reactor, description, name), factory)
        # As strports.service: a bind failure raises from startService, so that
        # twistd stops at once with a non-zero exit.
        self._raiseSynchronously = True
        # No "Starting factory <... at 0x...>" lines: the start-up report names ports.
        factory.noisy = False
        self.description = description
        self.name = name
        self.authenticated = authenticated
        self.port = None

    def privilegedStartService(self):
        try:
            StreamServerEndpointService.privilegedStartService(self)
        except CannotListenError as e:
            raise ListenerError(_bind_message(self.name, self.description, e)) from None
        self._waitingForPort.addCallback(self._bound)

    def _bound(self, port):
        self.port = port
        return port

    def bound_port(self):
        """@return: the TCP port number it listens on, or None (not yet, or not TCP)."""
        try:
            return self.port.getHost().port
        except AttributeError:
            return None

    def report(self):
        """@return: one line for the start-up report."""
        bound = self.bound_port()
        where = self.description
        if bound is not None and ":{}".format(bound) not in where:
            where += " (port {})".format(bound)
        return "{} listens on {}, {}".format(
            self.name, where, "authenticated" if self.authenticated else "unauthenticated")


def _endpoint(reactor, description, name):
    if not shared_ports:
        return endpoints.serverFromString(reactor, description)
    from .processes import shared_endpoint
    try:
        return shared_endpoint(reactor, description)
    except ValueError as e:
        raise ListenerError("{} listener: {}".format(name, e)) from None


def _bind_message(name, description, error):
    reason = error.socketError
    port = error.port if error.port not in (None, "any") else description
    if getattr(reason, "errno", None) == 98 or "in use" in str(reason):
        return "port {} is in use ({} listener)".format(port, name)
    text = getattr(reason, "strerror", None) or str(reason)
    return "cannot listen on port {} ({} listener {}): {}".format(
        port, name, description, text)


def listeners_of(service):
    """@return: the L{Listener}s in a service tree, depth first."""
    found = []
    if isinstance(service, Listener):
        found.append(service)
    for child in getattr(service, "services", ()):
        found.extend(listeners_of(child))
    return found
