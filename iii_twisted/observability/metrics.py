"""
The engine's own metrics, and their Prometheus text exposition.

- per function: calls, errors, and a latency histogram (fixed buckets, seconds);
  the table of functions is an LRU bounded by C{max_functions}, so ids that come and
  go (a test suite registers thousands) cannot grow it without bound;
- overall: a reservoir of the last C{reservoir} latencies for percentiles;
- workers: active (read from the engine), spawns and deaths;
- queues: depths read through an optional hook on the engine's enqueuer: if
  C{engine.enqueuer} has a C{depths()} method returning ``{queue name: messages
  waiting}``, each is exposed as ``iii_queue_depth{queue="..."}``;
- telemetry ingestion: frames and records by kind, frames dropped as invalid;
- auth: connections refused at the upgrade, calls answered FORBIDDEN, registrations
  refused (C{engine.auth_stats}, L{iii_twisted.auth.AuthStats}).
"""

import os
import platform
import time
from bisect import bisect_left
from collections import OrderedDict, deque

from twisted.logger import Logger
from twisted.web.resource import Resource

from .. import __version__
from ..health import cluster_status, directory_of, unlinked_of

# Latency buckets in seconds (upper bounds; +Inf is implicit).
# Distinct error codes kept per function: codes are a worker's own strings, and a label
# per value must stay bounded.
MAX_CODES = 16

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
           5.0, 10.0, 30.0, 60.0)

_log = Logger()


class FunctionStats:
    """Counters and a latency histogram of one function."""

    __slots__ = ("calls", "errors", "total_seconds", "min", "max", "buckets", "codes")

    def __init__(self):
        self.calls = 0
        self.errors = 0
        self.codes = {}  # error code -> count (at most MAX_CODES, then "other")
        self.total_seconds = 0.0
        self.min = None
        self.max = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)

    def to_dict(self):
        return {
            "calls": self.calls,
            "errors": self.errors,
            "avg_duration_ms": (self.total_seconds / self.calls * 1000) if self.calls else 0,
            "min_duration_ms": (self.min or 0) * 1000,
            "max_duration_ms": self.max * 1000,
            "p50_duration_ms": quantile_ms(self.buckets, 0.50),
            "p99_duration_ms": quantile_ms(self.buckets, 0.99),
            # Counts per BUCKETS bound (the last is +Inf): lets a reader (the console)
            # merge functions into one distribution.
            "buckets": list(self.buckets),
        }


def quantile_ms(counts, q):
    """
    Estimate a quantile from histogram counts (one per L{BUCKETS} bound, then +Inf).

    @return: milliseconds, interpolated linearly inside the bucket the quantile falls
        in (the +Inf bucket answers the largest finite bound); 0 for no calls.
    """
    total = sum(counts)
    if not total:
        return 0
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(BUCKETS):
                return BUCKETS[-1] * 1000
            low = BUCKETS[index - 1] if index else 0.0
            high = BUCKETS[index]
            return (low + (high - low) * (rank - seen) / count) * 1000
        seen += count
    return BUCKETS[-1] * 1000


class EngineMetrics:
    """
    The engine's call, worker, queue and telemetry metrics.

    @ivar total, errors, deferred: calls finished, failed, and hosted by a worker.
    @ivar spawns, deaths: workers that connected and left since the module started.
    """

    def __init__(self, engine, max_functions=1000, reservoir=1000):
        self._engine = engine
        self.max_functions = max_functions
        self.functions = OrderedDict()
        self.recent = deque(maxlen=reservoir)
        self.total = 0
        self.errors = 0
        self.evicted_functions = 0
        self.deaths = 0
        self._workers_at_start = len(engine.workers)
        self.telemetry_frames = {"OTLP": 0, "LOGS": 0, "MTRC": 0}
        self.telemetry_records = {"OTLP": 0, "LOGS": 0, "MTRC": 0}
        self.telemetry_invalid = {"OTLP": 0, "LOGS": 0, "MTRC": 0}
        self.telemetry_skipped = {"OTLP": 0, "LOGS": 0, "MTRC": 0}
        self.in_flight = 0  # calls started and not finished (CallTracer counts them)

    def record(self, function_id, seconds, error):
        """Count one finished call (the hot path: kept small)."""
        functions = self.functions
        stats = functions.get(function_id)
        if stats is None:
            stats = functions[function_id] = FunctionStats()
            if len(functions) > self.max_functions:
                functions.popitem(last=False)
                self.evicted_functions += 1
        else:
            functions.move_to_end(function_id)
        stats.calls += 1
        self.total += 1
        self.in_flight -= 1
        if error is not None:
            stats.errors += 1
            self.errors += 1
            code = getattr(error, "code", None)
            codes = stats.codes
            if not isinstance(code, str):
                code = "unknown"
            if code not in codes and len(codes) >= MAX_CODES:
                code = "other"
            codes[code] = codes.get(code, 0) + 1
        stats.total_seconds += seconds
        if stats.min is None or seconds < stats.min:
            stats.min = seconds
        if seconds > stats.max:
            stats.max = seconds
        stats.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.recent.append(seconds)

    def worker_left(self, worker):
        """A detach hook: count a worker death."""
        self.deaths += 1

    @property
    def active_workers(self):
        return len(self._engine.workers)

    @property
    def spawns(self):
        return self.deaths + self.active_workers - self._workers_at_start

    def queue_depths(self):
        """
        @return: ``{queue: depth}`` from the enqueuer's optional C{depths()} hook, or
            an empty dict when there is no queue module or no hook (or it fails).
        """
        depths = getattr(self._engine.enqueuer, "depths", None)
        if depths is None:
            return {}
        try:
            result = depths()
        except Exception:
            _log.failure("enqueuer.depths() failed")
            return {}
        if not isinstance(result, dict):
            return {}
        return {str(name): value for name, value in result.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}

    def dlq_depths(self):
        """@return: ``{queue: dead-lettered messages}`` from the enqueuer's hook, or {}."""
        hook = getattr(self._engine.enqueuer, "dlq_depths", None)
        if hook is None:
            return {}
        try:
            result = hook()
        except Exception:
            _log.failure("enqueuer.dlq_depths() failed")
            return {}
        return {str(k): v for k, v in result.items() if isinstance(v, int)} \
            if isinstance(result, dict) else {}

    def limit_events(self):
        """
        @return: ``{event: count}`` of what the engine's limits refused or dropped
            (L{iii_twisted.limits.Limits.counters}; docs/limits.rst).
        """
        limits = getattr(self._engine, "limits", None)
        return dict(limits.counters) if limits is not None else {}

    def performance(self):
        """@return: the ``performance`` part of engine::metrics::list (milliseconds)."""
        values = sorted(self.recent)
        if not values:
            return {key: 0 for key in ("avg_duration_ms", "p50_duration_ms",
                                       "p95_duration_ms", "p99_duration_ms",
                                       "min_duration_ms", "max_duration_ms")}

        def pct(p):
            return values[min(len(values) - 1, int(p * len(values)))] * 1000
        return {
            "avg_duration_ms": sum(values) / len(values) * 1000,
            "p50_duration_ms": pct(0.50),
            "p95_duration_ms": pct(0.95),
            "p99_duration_ms": pct(0.99),
            "min_duration_ms": values[0] * 1000,
            "max_duration_ms": values[-1] * 1000,
        }

    def deferred_count(self):
        """@return: calls of functions hosted by a worker (still registered)."""
        functions = self._engine.functions
        return sum(stats.calls for fid, stats in self.functions.items()
                   if getattr(functions.get(fid), "owner", None) is not None)

    def engine_metrics(self):
        """@return: the ``engine_metrics`` object of engine::metrics::list."""
        return {
            "invocations": {
                "total": self.total,
                "success": self.total - self.errors,
                "error": self.errors,
                "deferred": self.deferred_count(),
                "by_function": {fid: stats.to_dict() for fid, stats in self.functions.items()},
                "bucket_bounds_ms": [bound * 1000 for bound in BUCKETS],
            },
            "workers": {
                "spawns": self.spawns,
                "deaths": self.deaths,
                "active": self.active_workers,
            },
            "performance": self.performance(),
            "queues": self.queue_depths(),
            "limits": self.limit_events(),
            "telemetry": {
                "frames": dict(self.telemetry_frames),
                "records": dict(self.telemetry_records),
                "invalid_frames": dict(self.telemetry_invalid),
                "skipped_records": dict(self.telemetry_skipped),
            },
            "auth": self.auth_counts(),
        }

    def auth_counts(self):
        """@return: ``{refused_connections, forbidden_calls, refused_registrations}``."""
        stats = getattr(self._engine, "auth_stats", None)
        if stats is None:
            return {"refused_connections": 0, "forbidden_calls": 0,
                    "refused_registrations": 0}
        return stats.to_dict()

    def alert_values(self):
        """@return: the metric names alerts may watch, with their current values."""
        perf = self.performance()
        values = {
            "invocations.total": self.total,
            "invocations.error": self.errors,
            "invocations.success": self.total - self.errors,
            "invocations.error_rate": (self.errors / self.total) if self.total else 0.0,
            "workers.active": self.active_workers,
            "workers.deaths": self.deaths,
            "workers.spawns": self.spawns,
        }
        for key, value in perf.items():
            values["performance." + key] = value
        for queue, depth in self.queue_depths().items():
            values["queue.depth." + queue] = depth
        return values


# -- Prometheus text exposition format (version 0.0.4) ----------------------------------


def _escape(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value):
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return repr(value)
    return repr(value) if isinstance(value, float) else str(value)


def prometheus_text(metrics, namespace="iii"):
    """@return: the metrics in the Prometheus text exposition format, as bytes."""
    n = namespace
    lines = []

    def head(name, kind, text):
        lines.append("# HELP {}_{} {}".format(n, name, text))
        lines.append("# TYPE {}_{} {}".format(n, name, kind))

    head("invocations_total", "counter", "Calls routed by the engine, by function and outcome.")
    for fid, stats in metrics.functions.items():
        label = _escape(fid)
        lines.append('{}_invocations_total{{function_id="{}",status="success"}} {}'.format(
            n, label, stats.calls - stats.errors))
        lines.append('{}_invocations_total{{function_id="{}",status="error"}} {}'.format(
            n, label, stats.errors))
    head("invocation_duration_seconds", "histogram", "Call latency seen by the engine.")
    for fid, stats in metrics.functions.items():
        label = _escape(fid)
        cumulative = 0
        for bound, count in zip(BUCKETS + (float("inf"),), stats.buckets):
            cumulative += count
            lines.append('{}_invocation_duration_seconds_bucket{{function_id="{}",le="{}"}} {}'
                         .format(n, label, _number(bound), cumulative))
        lines.append('{}_invocation_duration_seconds_sum{{function_id="{}"}} {}'.format(
            n, label, repr(stats.total_seconds)))
        lines.append('{}_invocation_duration_seconds_count{{function_id="{}"}} {}'.format(
            n, label, stats.calls))
    head("invocation_errors_total", "counter",
         "Failed calls by function and error code (16 codes per function, then other).")
    for fid, stats in metrics.functions.items():
        label = _escape(fid)
        for code, count in sorted(stats.codes.items()):
            lines.append('{}_invocation_errors_total{{function_id="{}",code="{}"}} {}'.format(
                n, label, _escape(code), count))
    head("invocations_not_found_total", "counter",
         "Calls of function ids no one provides (function_not_found).")
    lines.append("{}_invocations_not_found_total {}".format(
        n, getattr(metrics._engine, "unknown_calls", 0)))
    head("invocations_in_flight", "gauge", "Calls started and not yet finished.")
    lines.append("{}_invocations_in_flight {}".format(n, metrics.in_flight))
    head("workers_active", "gauge", "Connected workers.")
    lines.append("{}_workers_active {}".format(n, metrics.active_workers))
    head("worker_spawns_total", "counter", "Workers that connected.")
    lines.append("{}_worker_spawns_total {}".format(n, metrics.spawns))
    head("worker_deaths_total", "counter", "Workers that disconnected.")
    lines.append("{}_worker_deaths_total {}".format(n, metrics.deaths))
    depths = metrics.queue_depths()
    head("queue_depth", "gauge", "Messages waiting per queue.")
    for queue, depth in sorted(depths.items()):
        lines.append('{}_queue_depth{{queue="{}"}} {}'.format(n, _escape(queue), depth))
    head("limit_events_total", "counter",
         "Requests refused and peers dropped by the engine's limits, by event.")
    for event, count in sorted(metrics.limit_events().items()):
        lines.append('{}_limit_events_total{{event="{}"}} {}'.format(n, event, count))
    head("queue_dlq_depth", "gauge", "Messages in each queue's dead-letter queue.")
    for queue, depth in sorted(metrics.dlq_depths().items()):
        lines.append('{}_queue_dlq_depth{{queue="{}"}} {}'.format(n, _escape(queue), depth))
    responses = getattr(metrics._engine, "http_responses", None) or {}
    head("http_responses_total", "counter", "REST API responses by method and status.")
    for (method, status), count in sorted(responses.items()):
        lines.append('{}_http_responses_total{{method="{}",status="{}"}} {}'.format(
            n, _escape(method), status, count))
    lines.extend(process_lines(n))
    directory = directory_of(metrics._engine)
    if directory is not None:  # a cluster member (docs/cluster.rst)
        cluster = cluster_status(directory, unlinked_of(metrics._engine))
        head("cluster_directory_up", "gauge",
             "1 while the cluster directory (Redis) answers, else 0.")
        lines.append("{}_cluster_directory_up {}".format(
            n, 1 if cluster["directory"] == "ok" else 0))
        head("cluster_members", "gauge", "Other cluster members this engine knows.")
        lines.append("{}_cluster_members {}".format(n, cluster["members"]))
        head("cluster_unlinked_members", "gauge",
             "Members this engine knows but has had no link to for longer than the "
             "member TTL (a wrong secret, a firewall).")
        lines.append("{}_cluster_unlinked_members {}".format(
            n, len(cluster.get("unlinked") or ())))
    auth = metrics.auth_counts()
    head("auth_refused_connections_total", "counter",
         "Connections refused at the upgrade for want of valid credentials.")
    lines.append("{}_auth_refused_connections_total {}".format(
        n, auth["refused_connections"]))
    head("auth_forbidden_calls_total", "counter",
         "Calls answered FORBIDDEN: outside the caller's grants.")
    lines.append("{}_auth_forbidden_calls_total {}".format(n, auth["forbidden_calls"]))
    head("auth_refused_registrations_total", "counter",
         "Registrations refused: outside the grants, or another owner's.")
    lines.append("{}_auth_refused_registrations_total {}".format(
        n, auth["refused_registrations"]))
    head("telemetry_frames_total", "counter", "Telemetry frames received from workers.")
    for kind, count in metrics.telemetry_frames.items():
        lines.append('{}_telemetry_frames_total{{kind="{}"}} {}'.format(n, kind, count))
    head("telemetry_invalid_frames_total", "counter",
         "Telemetry frames dropped because they were not valid OTLP JSON.")
    for kind, count in metrics.telemetry_invalid.items():
        lines.append('{}_telemetry_invalid_frames_total{{kind="{}"}} {}'.format(n, kind, count))
    return ("\n".join(lines) + "\n").encode("utf-8")


_STARTED = time.time()


def process_lines(n="iii"):
    """
    Build info, uptime, and the process's memory and file descriptors, under the
    names Prometheus client libraries use (``process_*``); Linux ``/proc`` is read
    where it exists, else what C{resource} gives.
    """
    lines = [
        "# HELP {}_build_info The engine's version and Python (value 1).".format(n),
        "# TYPE {}_build_info gauge".format(n),
        '{}_build_info{{version="{}",python="{}",implementation="{}"}} 1'.format(
            n, _escape(__version__), _escape(platform.python_version()),
            _escape(platform.python_implementation())),
        "# HELP {}_uptime_seconds Seconds since the engine process started.".format(n),
        "# TYPE {}_uptime_seconds gauge".format(n),
        "{}_uptime_seconds {}".format(n, repr(round(time.time() - _STARTED, 3))),
        "# HELP process_start_time_seconds Start time of the process, Unix seconds.",
        "# TYPE process_start_time_seconds gauge",
        "process_start_time_seconds {}".format(repr(round(_STARTED, 3))),
    ]
    rss = _rss_bytes()
    if rss is not None:
        lines += ["# HELP process_resident_memory_bytes Resident memory size in bytes.",
                  "# TYPE process_resident_memory_bytes gauge",
                  "process_resident_memory_bytes {}".format(rss)]
    fds = _open_fds()
    if fds is not None:
        lines += ["# HELP process_open_fds Open file descriptors.",
                  "# TYPE process_open_fds gauge", "process_open_fds {}".format(fds)]
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            lines += ["# HELP process_max_fds Maximum open file descriptors.",
                      "# TYPE process_max_fds gauge", "process_max_fds {}".format(soft)]
    except (ImportError, OSError, ValueError):
        pass
    return lines


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak, KiB
    except (ImportError, OSError):
        return None


def _open_fds():
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return None


class PrometheusResource(Resource):
    """A twisted.web resource serving L{prometheus_text} at any path (GET only)."""

    isLeaf = True

    def __init__(self, metrics):
        Resource.__init__(self)
        self._metrics = metrics

    def render_GET(self, request):
        # The health endpoints live on this port too (iii_twisted.health).
        if getattr(request, "path", None) in (b"/health/live", b"/health/ready"):
            from twisted.web.server import NOT_DONE_YET

            from ..health import render

            answer = render(request, getattr(self._metrics._engine, "health", None),
                            request.path.rsplit(b"/", 1)[1].decode("ascii"))
            if isinstance(answer, bytes):
                return answer
            answer.addCallback(_finish, request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return prometheus_text(self._metrics)


def _finish(body, request):
    if not request.finished and not getattr(request, "_disconnected", False):
        request.write(body)
        request.finish()
