"""
Liveness and readiness, for load balancers, Docker ``HEALTHCHECK`` and Kubernetes
probes. Served on the REST API port (``/_iii/health/live``, ``/_iii/health/ready``) and
on the Prometheus port (``/health/live``, ``/health/ready``); the reference has no such
endpoints.

- **live**: 200 ``{"status": "alive", "uptime_seconds": N}`` whenever the reactor
  answers at all.
- **ready**: 200 ``{"status": "ready", "checks": {...}}`` when the engine has started
  (every module and listener up), is not shutting down, and every store answers; else
  503 ``{"status": "starting"|"draining"|"stopped"|"unready", "checks": {...}}``.
  ``checks`` maps each module with a store (``state``, ``stream``, ``queue`` ...) to
  ``"ok"`` or what is wrong.

A store (``module.store``) or a queue broker (``module.broker``) takes part by having a
``health()`` method returning (or firing a Deferred with) None when it is usable, else
a short reason; one without counts as ok.
A module can also have ``health()`` itself. A check that takes longer than
L{CHECK_TIMEOUT} seconds, or raises, counts as unready.

A cluster member's ready answer also has ``"cluster": {"directory": "ok"|"unreachable",
"members": N}`` (L{cluster_status}; N counts the other members known). An unreachable
directory (Redis down) does not make the engine unready: it keeps serving its own
workers, and taking every member out of a load balancer because their shared Redis is
down would stop a cluster that still works.
"""

import json
import time

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

CHECK_TIMEOUT = 2.0

STARTING = "starting"
RUNNING = "running"
DRAINING = "draining"
STOPPED = "stopped"


class Health:
    """
    The engine's health state.

    @ivar state: L{STARTING}, L{RUNNING}, L{DRAINING} or L{STOPPED} (set by the
        engine service).
    """

    _log = Logger()

    def __init__(self, clock, modules=lambda: [], directory=lambda: None,
                 unlinked=lambda: None):
        """
        @param modules: returns the modules to check (the service's current list).
        @param directory: returns the engine's cluster directory
            (L{iii_twisted.cluster.directory.IClusterDirectory}), or None when the
            engine is not a cluster member (see L{directory_of}).
        @param unlinked: returns L{unlinked_of} the engine.
        """
        self.clock = clock
        self.state = STARTING
        self.started_at = time.time()
        self._modules = modules
        self._directory = directory
        self._unlinked = unlinked

    def live(self):
        """@return: the liveness answer (always alive)."""
        return {"status": "alive", "uptime_seconds": round(time.time() - self.started_at, 3)}

    async def ready(self):
        """@return: C{(ready: bool, answer: dict)}."""
        checks = {}
        for module in self._modules():
            for name, check in _checks_of(module):
                checks[name] = await self._run(check)
        healthy = all(v == "ok" for v in checks.values())
        if self.state != RUNNING:
            status = self.state
        else:
            status = "ready" if healthy else "unready"
        answer = {"status": status, "checks": checks}
        directory = self._directory()
        if directory is not None:
            answer["cluster"] = cluster_status(directory, self._unlinked())
        return status == "ready", answer

    async def _run(self, check):
        try:
            d = maybeDeferred(check)
            d.addTimeout(CHECK_TIMEOUT, self.clock)
            reason = await d
        except Exception as e:
            return "check failed: {}".format(str(e) or type(e).__name__)
        return "ok" if reason is None else str(reason)


def directory_of(engine):
    """
    @return: the cluster directory of C{engine} (C{engine.cluster.directory}, set by
        the ``cluster:`` section's service), or None when it is not a cluster member.
    """
    return getattr(getattr(engine, "cluster", None), "directory", None)


def unlinked_of(engine):
    """
    @return: the names of the members C{engine} knows but has had no link to for
        longer than the member TTL (a wrong cluster secret, a firewall), or None when
        it is not a cluster member.
    """
    unlinked = getattr(getattr(engine, "cluster", None), "unlinked_members", None)
    return unlinked() if callable(unlinked) else None


def cluster_status(directory, unlinked=None):
    """
    @param directory: an L{iii_twisted.cluster.directory.IClusterDirectory}.
    @param unlinked: names of known members without a link (L{unlinked_of}), or None.
    @return: C{{"directory": "ok"|"unreachable", "members": N}}, N the number of
        other members it knows, and C{"unlinked": [names]} when C{unlinked} is given.
    """
    status = {"directory": "ok" if directory.healthy else "unreachable",
              "members": len(directory.members())}
    if unlinked is not None:
        status["unlinked"] = sorted(unlinked)
    return status


def _checks_of(module):
    name = getattr(module, "health_name", None) or _module_name(module)
    own = getattr(module, "health", None)
    if callable(own):
        yield name, own
    for part in ("store", "broker"):  # a queue module may have a broker (Redis, AMQP)
        check = getattr(getattr(module, part, None), "health", None)
        if callable(check):
            yield "{}.{}".format(name, part), check


def _module_name(module):
    cls = getattr(module, "iii_class", None) or type(module).__name__
    return cls.rsplit("::", 1)[-1] if isinstance(cls, str) else type(module).__name__


def render(request, health, which):
    """
    Answer a health request on a twisted.web C{request}.

    @param which: ``live`` or ``ready``.
    @return: C{NOT_DONE_YET}-style: a Deferred (ready) or bytes (live).
    """
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    if health is None:
        health = Health(None)
        health.state = RUNNING
    if which == "live":
        request.setResponseCode(200)
        return json.dumps(health.live()).encode("utf-8")

    def answer(outcome):
        ok, body = outcome
        request.setResponseCode(200 if ok else 503)
        return json.dumps(body, sort_keys=True).encode("utf-8")
    return Deferred.fromCoroutine(health.ready()).addCallback(answer)
