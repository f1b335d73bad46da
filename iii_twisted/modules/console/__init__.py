"""
The web console (``modules::console::ConsoleModule``): the engine's pages for
operators, served on the console's own port from assets shipped in this package.

Config (all optional)::

    - class: modules::console::ConsoleModule
      config:
        port: 3113             # ignored when listen is given
        host: 127.0.0.1        # loopback by default
        listen: tcp:3113:interface=127.0.0.1   # any Twisted server endpoint string
        push_interval: 1.0     # seconds between two updates of an open page
        sample_interval: 5.0   # seconds between two samples of the overview's chart
        history: 60            # samples kept (5 minutes at the default interval)

The console is a client of the engine: each page
is computed from engine function calls (discovery, observability, queue, state and
stream functions) checked against the session's grants (L{auth}), and pushed to the
browser over Server-Sent Events; actions (calling a function, redrive, discard, state
and stream edits) are function calls POSTed with a CSRF token (L{web}).

The module registers one function of its own, ``engine::modules::list``: the engine's
version, start time and modules with the addresses they listen on (the overview's
first panel; the reference's console reads these from its own process).
"""

from __future__ import annotations

import time

from twisted.application.service import MultiService
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ... import __version__
from ...config import ConfigError, get_option
from ...interfaces import IModule
from ...listeners import Listener
from ...schema import Key, Section
from .auth import AllGrants, OpenAccess, access_for
from .views import History, Views
from .web import LOOPBACK_NAMES, ConsoleSite, ConsoleWeb

DEFAULT_PORT = 3113
DEFAULT_HOST = "127.0.0.1"

# Every key of the module's config (iii_twisted/schema.py says how to add one).
CONFIG_SCHEMA = Section(
    port=Key(int, DEFAULT_PORT, "TCP port of the web console", min=0, max=65535),
    host=Key(str, DEFAULT_HOST, "interface the console listens on (loopback: only "
                                "requests for a loopback host name are answered)"),
    listen=Key(str, None, "a Twisted endpoint string; overrides port and host"),
    push_interval=Key(float, 1.0, "seconds between two updates of an open page",
                      min=0.01),
    sample_interval=Key(float, 5.0, "seconds between two samples of the overview's "
                                    "rates and queue depth chart", min=0.01),
    history=Key(int, 60, "samples the overview keeps", min=2),
)
CONFIG_KEYS = tuple(CONFIG_SCHEMA.known())


def _positive_number(config, key, default):
    value = get_option(config, key, (int, float), default)
    if isinstance(value, bool) or value <= 0:
        raise ConfigError("must be a positive number of seconds, not {!r}".format(value),
                          key)
    return float(value)


def _interface(listen):
    """@return: the interface= of a tcp endpoint string (None when absent)."""
    for part in listen.replace("\\:", "\0").split(":")[1:]:
        if part.startswith("interface="):
            return part[len("interface="):].replace("\0", ":")
    return None


@implementer(IModule)
class ConsoleModule(MultiService):
    """
    The console: its port, its pages and the overview's sampler.

    @ivar web: the L{ConsoleWeb} (its C{resource} is what the port serves).
    @ivar views: the L{Views}.
    @ivar history: the L{History} of the overview's chart.
    @ivar listen: the endpoint string of the port.
    """

    iii_class = None
    config_schema = CONFIG_SCHEMA
    _log = Logger()

    def __init__(self, engine, config, reactor, **kept):
        """
        @param kept: what a config reload hands over from the previous instance
            (nothing the console needs: its sessions end with it).
        @raise ConfigError: for an unknown key or a bad value, naming the key.
        """
        MultiService.__init__(self)
        config = config or {}
        if not isinstance(config, dict):
            raise ConfigError("config must be a mapping")
        for key in config:
            if key not in CONFIG_KEYS:
                raise ConfigError("unknown key {} (known: {})".format(
                    key, ", ".join(CONFIG_KEYS)), key)
        port = get_option(config, "port", int, DEFAULT_PORT)
        if not 0 <= port <= 65535:
            raise ConfigError("must be between 0 and 65535, not {}".format(port), "port")
        host = get_option(config, "host", str, DEFAULT_HOST)
        listen = get_option(config, "listen", str, None)
        self.listen = listen or "tcp:{}:interface={}".format(port, host.replace(":", "\\:"))
        push_interval = _positive_number(config, "push_interval", 1.0)
        self.sample_interval = _positive_number(config, "sample_interval", 5.0)
        size = get_option(config, "history", int, 60)
        if size < 2:
            raise ConfigError("must be at least 2 samples, not {}".format(size), "history")
        self.engine = engine
        self.clock = reactor
        self.started_at_ms = int(time.time() * 1000)
        self.history = History(size)
        self.views = Views(engine, self.history, reactor)
        interface = _interface(self.listen)
        self.web = ConsoleWeb(
            self.views, OpenAccess(), reactor, push_interval,
            loopback_only=self.listen.startswith(("tcp:", "tcp6:"))
            and (interface or "0.0.0.0") in LOOPBACK_NAMES)
        self.site = ConsoleSite(self.web.resource, reactor=reactor)
        self._listener = Listener(self.listen, self.site, reactor, "iii-console")
        self._listener.setServiceParent(self)
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = reactor
        engine.register_function(
            "engine::modules::list", self.modules_list,
            "The engine's version, start time and modules with their listeners",
            {"type": "object"},
            {"type": "object", "properties": {"version": {"type": "string"},
                                              "modules": {"type": "array"}}})

    def startService(self):
        # The engine's auth: is known now (the service holds the config); before the
        # port opens, so no session is ever open by mistake.
        access = access_for(self.engine, getattr(self.parent, "config", None), self.clock)
        self.web.set_access(access)
        self._listener.authenticated = access.auth_required
        MultiService.startService(self)
        self._sampler.start(self.sample_interval, now=True)

    def stopService(self):
        if self._sampler.running:
            self._sampler.stop()
        self.web.stop()
        return MultiService.stopService(self)

    def _sample(self):
        # The sampler is the engine's own (no session): what a session then sees of
        # the history is checked against its grants in the overview.
        return ensureDeferred(self.views.sample(AllGrants())).addErrback(
            lambda f: self._log.failure("console sample failed", f))

    def listening(self):
        """@return: the console port's C{IListeningPort} once bound (a Deferred)."""
        return _port_of(self._listener)

    def modules_list(self, data):
        """
        ``engine::modules::list``.

        @return: ``{"version", "started_at_ms", "uptime_ms", "worker_listen",
            "modules": [{"class", "listeners": ["host:port", ...]}]}``: the modules of
            the L{iii_twisted.service.EngineService} this console runs in (none when
            it is not run by one).
        """
        service = self.parent
        modules = []
        for module in getattr(service, "modules", ()):
            modules.append({"class": module.iii_class, "listeners": _listeners(module)})
        config = getattr(service, "config", None)
        now = int(time.time() * 1000)
        return {"version": __version__, "started_at_ms": self.started_at_ms,
                "uptime_ms": now - self.started_at_ms,
                "worker_listen": getattr(config, "listen", None),
                "worker_listeners": _listeners(getattr(service, "_listener", None)),
                "modules": modules}


def _port_of(listener):
    from twisted.internet.defer import succeed
    d = listener._waitingForPort
    if d is None:
        raise RuntimeError("the console is not running")
    if d.called:
        return succeed(d.result)
    result = type(d)()
    d.addBoth(lambda r: (result.callback(r), r)[1])
    return result


def _listeners(service):
    """@return: "host:port" of every bound endpoint service in C{service}'s tree."""
    found = []
    todo = [service] if service is not None else []
    while todo:
        node = todo.pop()
        # StreamServerEndpointService keeps its listen() Deferred here (service.py
        # reads it too); strports gives no public handle on the port.
        waiting = getattr(node, "_waitingForPort", None)
        if waiting is not None and waiting.called and hasattr(waiting.result, "getHost"):
            host = waiting.result.getHost()
            found.append("{}:{}".format(getattr(host, "host", "?"), getattr(host, "port", "?")))
        try:
            todo.extend(node)
        except TypeError:
            pass
    return sorted(found)
