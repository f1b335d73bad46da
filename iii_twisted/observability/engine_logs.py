"""
The engine's own log lines, kept with the workers' logs (modules.md §9.4: "engine's
own logs when enabled").

L{EngineLogCapture} is a C{twisted.logger} observer: every event at or above the
configured level from the engine (namespaces under ``iii_twisted``), and every error
from anywhere in the process (Twisted, Autobahn, an unhandled error in a Deferred),
becomes a StoredLog of the engine's service. The log output itself stays twistd's.
"""

import threading

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

from .storage import log_record

# An event carrying this key is not captured: the observability module marks its
# echo of worker logs with it, which are stored already.
NOT_CAPTURED = "iii_not_captured"

_SEVERITY = {
    LogLevel.debug: (5, "DEBUG"),
    LogLevel.info: (9, "INFO"),
    LogLevel.warn: (13, "WARN"),
    LogLevel.error: (17, "ERROR"),
    LogLevel.critical: (21, "FATAL"),
}

# The module's ``level`` config: the lowest severity captured (None: nothing).
THRESHOLDS = {"trace": 1, "debug": 5, "info": 9, "warn": 13, "warning": 13, "error": 17,
              "off": None}

_ERROR = 17
_ENGINE_NAMESPACE = "iii_twisted"


@implementer(ILogObserver)
class EngineLogCapture:
    """
    Turns log events into StoredLogs and hands them to C{store}.

    Events logged on other threads (an exporter's, a thread pool's) are handed over
    through C{reactor.callFromThread}, so C{store} always runs on the reactor thread.
    """

    def __init__(self, store, reactor, service_name, minimum_severity):
        """
        @param store: called with each StoredLog dict, on the reactor thread.
        @param minimum_severity: the lowest OTel severity number captured; below
            ERROR (17), only events from the engine's own namespaces are.
        """
        self._store = store
        self._reactor = reactor
        self._service_name = service_name
        self._minimum = minimum_severity
        self._thread = threading.get_ident()  # built on the reactor thread

    def __call__(self, event):
        if event.get(NOT_CAPTURED):
            return
        severity = _SEVERITY.get(event.get("log_level"))
        if severity is None:
            return
        number, text = severity
        namespace = event.get("log_namespace") or ""
        if number < self._minimum or (
                number < _ERROR and not namespace.startswith(_ENGINE_NAMESPACE)):
            return
        body = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            body = "{}: {}: {}".format(body, failure.type.__name__,
                                       failure.getErrorMessage())
        at_ns = int(event.get("log_time", self._reactor.seconds()) * 1e9)
        record = log_record(at_ns, at_ns, number, text, body,
                            {"log.namespace": namespace},
                            resource={"service.name": self._service_name},
                            service_name=self._service_name)
        if threading.get_ident() == self._thread:
            self._store(record)
        else:
            self._reactor.callFromThread(self._store, record)
