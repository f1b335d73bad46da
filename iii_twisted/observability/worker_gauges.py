"""
The resource gauges workers report about themselves, for the ``latest_metrics`` of
``engine::workers::list`` (engine-core.md §3).

npm ``iii-sdk`` workers export OpenTelemetry observable gauges named
``iii.worker.memory.heap_used``, ``iii.worker.cpu.percent``, ... in ``MTRC`` frames,
every 60 s by default, each data point carrying the ``worker.id`` the engine gave them.
L{WorkerGauges} keeps the newest value of each gauge per connected worker, so that the
list answers without scanning the metric store; like the reference, values older than
120 s are not reported. Python ``iii-sdk`` 0.10.0 sends no such gauges.
"""

from zope.interface import implementer

from ..interfaces import IWorkerMetricsSource

# OTel gauge name -> WorkerMetrics field.
GAUGE_FIELDS = {
    "iii.worker.memory.heap_used": "memory_heap_used",
    "iii.worker.memory.heap_total": "memory_heap_total",
    "iii.worker.memory.rss": "memory_rss",
    "iii.worker.memory.external": "memory_external",
    "iii.worker.cpu.percent": "cpu_percent",
    "iii.worker.cpu.user_micros": "cpu_user_micros",
    "iii.worker.cpu.system_micros": "cpu_system_micros",
    "iii.worker.event_loop.lag_ms": "event_loop_lag_ms",
    "iii.worker.uptime_seconds": "uptime_seconds",
}

# The SDK that sends these gauges; the reference reports it for every worker.
DEFAULT_RUNTIME = "node"


@implementer(IWorkerMetricsSource)
class WorkerGauges:
    """
    The newest gauge values per connected worker.

    Memory is bounded by the connected workers times the nine gauges: points naming a
    worker id that is not connected are ignored, and a worker's values go when it
    leaves (L{worker_left}, an engine detach hook).
    """

    def __init__(self, engine, clock, max_age_seconds=120.0):
        """
        @param clock: an L{IReactorTime}, for the age of reports.
        @param max_age_seconds: reports older than this are not reported.
        """
        self._engine = engine
        self._clock = clock
        self._max_age_ms = max_age_seconds * 1000.0
        self._latest = {}  # worker id -> {field: (value, timestamp ms)}

    def record(self, metric):
        """
        Take one decoded metric (L{iii_twisted.observability.otlp.decode_metrics}); a
        metric that is not a worker gauge is ignored.
        """
        field = GAUGE_FIELDS.get(metric["name"])
        if field is None:
            return
        now_ms = self._clock.seconds() * 1000.0
        for point in metric["data_points"]:
            worker_id = point["attributes"].get("worker.id")
            value = point.get("value")
            if (not isinstance(worker_id, str) or worker_id not in self._engine.workers
                    or isinstance(value, bool)
                    or not isinstance(value, (int, float))):
                continue
            # A point without a time is taken as arriving now.
            at_ms = point["timestamp_unix_nano"] / 1e6 or now_ms
            values = self._latest.setdefault(worker_id, {})
            previous = values.get(field)
            if previous is None or at_ms >= previous[1]:
                values[field] = (value, at_ms)

    def worker_left(self, worker):
        """Forget a worker that disconnected."""
        self._latest.pop(worker.id, None)

    def latest(self, worker):
        """
        @return: C{{<gauge fields>, "timestamp_ms", "runtime"}} from the reports of the
            last C{max_age_seconds}, or None when there are none. C{timestamp_ms} is the
            newest report's; C{runtime} is the one the worker registered, else
            ``"node"``.
        """
        values = self._latest.get(worker.id)
        if not values:
            return None
        oldest_ms = self._clock.seconds() * 1000.0 - self._max_age_ms
        fresh = {field: (value, at_ms) for field, (value, at_ms) in values.items()
                 if at_ms >= oldest_ms}
        if not fresh:
            return None
        result = {field: value for field, (value, _) in fresh.items()}
        result["timestamp_ms"] = int(max(at_ms for _, at_ms in fresh.values()))
        result["runtime"] = worker.runtime or DEFAULT_RUNTIME
        return result
