"""
The engine's log as an operator reads it.

- ``log_level`` (top-level config key: ``debug``, ``info`` (default), ``warn``,
  ``error``, ``critical``): events below it are dropped. L{LogSettingsService} applies
  it to whatever observers ``twistd``/``twist`` installed, before any port opens.
- Twisted's ``Starting factory <... object at 0x...>`` / ``Stopping factory`` lines are
  dropped (our listeners' factories are not noisy; this also quiets the client
  factories of outgoing HTTP connections).
- Autobahn's own line for each failed handshake and each unclean drop (``failing
  WebSocket opening handshake``, ``dropping connection to peer ...``) is kept at most
  10 times a minute (L{PerConnectionLines}): a peer failing a thousand upgrades in a
  row (wrong tokens) would otherwise write two thousand lines. The engine's own lines
  for the same events (refusals in ``authn``, disconnects in ``oplog``) say more and
  are bounded where they are made.
- ``log_format`` (``text`` (default) or ``json``): what ``twist iii`` writes. ``twist``
  writes JSON events when its output is not a terminal (Docker, systemd); we make text
  the default there too, unless ``--log-format`` is given on the command line.
  ``twistd`` always writes text.
- The REST API's access log (its ``access_log: true``) is one line per request in
  the ``iii.access`` namespace; Prometheus scrapes and health checks are never logged
  (L{QuietSite}).

Where the reference is concerned: it logs with ``tracing`` and a ``RUST_LOG``-style
level; the names and the default (info) match.
"""

import sys

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver, LogLevel, LogLevelFilterPredicate, PredicateResult,
    globalLogPublisher, jsonFileLogObserver, textFileLogObserver,
)
from twisted.web.server import Site

LEVELS = ("debug", "info", "warn", "error", "critical")
FORMATS = ("text", "json")

_NOISE = ("Starting factory", "Stopping factory")


def drop_factory_noise(event):
    """A log predicate: no ``Starting factory``/``Stopping factory`` events."""
    text = event.get("log_format")
    if isinstance(text, str) and text.startswith(_NOISE):
        return PredicateResult.no
    return PredicateResult.maybe


# Autobahn's per-connection failure lines (autobahn/websocket/protocol.py:
# failHandshake at info, dropConnection of an unclean close at warn).
_PER_CONNECTION = ("failing WebSocket opening handshake", "dropping connection to peer")


class PerConnectionLines:
    """
    A log predicate: at most C{limit} of Autobahn's per-connection failure lines in any
    window of C{window} seconds, timed by the events' own C{log_time}; the rest are
    dropped. Every other event passes untouched.
    """

    def __init__(self, limit=10, window=60.0):
        self.limit = limit
        self.window = window
        self._window_start = None
        self._count = 0

    def __call__(self, event):
        text = event.get("log_format")
        if not (isinstance(text, str) and text.startswith(_PER_CONNECTION)):
            return PredicateResult.maybe
        now = event.get("log_time") or 0.0
        if self._window_start is None or now - self._window_start >= self.window:
            self._window_start = now
            self._count = 0
        self._count += 1
        return PredicateResult.maybe if self._count <= self.limit else PredicateResult.no


def predicates(level):
    """
    The predicates the engine's log applies: C{level} (a name), no factory noise, and
    Autobahn's per-connection lines bounded (L{PerConnectionLines}).
    """
    return [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level)),
            drop_factory_noise, PerConnectionLines()]


class LogSettingsService(Service):
    """
    Applies the log settings to every observer of C{publisher} while it runs: each is
    wrapped in a C{FilteringLogObserver} (``log_level``, no factory noise). Added first
    to the engine's service by ``twistd iii``/``twist iii``, so that the settings hold
    from before the first port opens; an application that embeds the engine keeps its
    own logging.
    """

    name = "iii-log-settings"

    def __init__(self, level="info", publisher=globalLogPublisher):
        self.level = level
        self.publisher = publisher
        self._wrapped = []

    def privilegedStartService(self):
        Service.privilegedStartService(self)
        self.apply()

    def apply(self):
        """Wrap the publisher's observers now (once; again after L{restore})."""
        if self._wrapped:
            return
        # LogPublisher keeps its observers in _observers; there is no public way to
        # list them, and a filter must sit in front of each.
        observers = list(getattr(self.publisher, "_observers", []))
        for observer in observers:
            wrapped = FilteringLogObserver(observer, predicates(self.level))
            self.publisher.removeObserver(observer)
            self.publisher.addObserver(wrapped)
            self._wrapped.append((observer, wrapped))

    def set_level(self, level):
        """Change the level (a reload) for the observers already wrapped."""
        self.level = level
        pairs, self._wrapped = self._wrapped, []
        for observer, wrapped in pairs:
            self.publisher.removeObserver(wrapped)
            replacement = FilteringLogObserver(observer, predicates(level))
            self.publisher.addObserver(replacement)
            self._wrapped.append((observer, replacement))

    def restore(self):
        for observer, wrapped in self._wrapped:
            self.publisher.removeObserver(wrapped)
            self.publisher.addObserver(observer)
        self._wrapped = []

    def stopService(self):
        Service.stopService(self)
        # Keep filtering until the process ends: twistd logs the shutdown after this.


def configure_twist(parent, level, fmt, argv=None):
    """
    Under ``twist`` (C{parent} is its C{TwistOptions}): log at C{level} and in C{fmt}
    unless the command line says otherwise (``--log-level``, ``--log-format``). Does
    nothing under ``twistd``.
    """
    if parent is None or "fileLogObserverFactory" not in parent:
        return
    argv = sys.argv[1:] if argv is None else argv
    if not any(a.startswith("--log-level") for a in argv):
        parent["logLevel"] = LogLevel.levelWithName(level)
    if not any(a.startswith("--log-format") for a in argv):
        base = jsonFileLogObserver if fmt == "json" else textFileLogObserver
        parent["fileLogObserverFactory"] = lambda f: FilteringLogObserver(
            base(f), [drop_factory_noise, PerConnectionLines()])
        parent["logFormat"] = fmt


class QuietSite(Site):
    """A C{Site} that logs no request (Prometheus scrapes, health checks)."""

    noisy = False

    def log(self, request):
        pass
