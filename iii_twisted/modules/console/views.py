"""
What each console page shows, read through engine functions.

A view is ``async def view(grants, params) -> dict``: it calls engine functions
(discovery, observability, queue, state, stream) with C{engine.call}, after checking
each function id against the session's grants (L{auth.check}), and shapes the answers
for the page. A part of a page whose function is missing (its module is not loaded) or
not granted comes back as ``{"error": {"code", "message"}}`` in its place, so the rest
of the page still shows.

Page params (all optional, from the page's filters) are validated here: a wrong type
is ignored rather than failing the page.
"""

from __future__ import annotations

from collections import deque

from ...protocol import InvocationError
from .auth import call, check

#: Read functions each view may call (the grants a read-only console token needs).
READS = {
    "overview": ("engine::modules::list", "engine::workers::list", "engine::metrics::list",
                 "engine::queue::list_topics", "engine::queue::topic_stats"),
    "workers": ("engine::workers::list",),
    "functions": ("engine::functions::list", "engine::triggers::list",
                  "engine::metrics::list"),
    "triggers": ("engine::triggers::list", "engine::trigger-types::list"),
    "traces": ("engine::traces::list", "engine::traces::tree"),
    "logs": ("engine::logs::list",),
    "queues": ("engine::queue::list_topics", "engine::queue::topic_stats",
               "engine::queue::dlq_messages"),
    "state": ("state::list_groups", "state::list"),
    "streams": ("stream::list_all", "stream::list"),
}

MAX_ROWS = 200  # rows a page shows of a list (functions, workers, items, logs)
# The console reads the engine's own metrics only, not every stored SDK metric.
NO_SDK_METRICS = {"include_sdk_metrics": False}


def _error(e):
    if isinstance(e, InvocationError):
        return {"error": {"code": e.code, "message": e.message}}
    return {"error": {"code": "console_error", "message": str(e)}}


def _str(params, key, limit=500):
    value = params.get(key)
    return value[:limit] if isinstance(value, str) and value else None


def _number(params, key):
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return None
        return None
    return value


def _capped(items):
    """@return: a list's first L{MAX_ROWS} items and its length, or an error part."""
    if not isinstance(items, list):
        return items
    return {"items": items[:MAX_ROWS], "total": len(items)}


def user_functions(by_function):
    """@return: the per-function stats of functions that are not ``engine::*``."""
    return {fid: stats for fid, stats in by_function.items()
            if not fid.startswith("engine::")}


def merged_quantiles(by_function, bounds_ms):
    """
    @return: ``(p50, p99)`` in ms over the merged latency histograms of C{by_function}
        (estimates, linear inside a bucket), or ``(None, None)`` without calls.
    """
    counts = None
    for stats in by_function.values():
        buckets = stats.get("buckets")
        if not isinstance(buckets, list):
            continue
        if counts is None:
            counts = [0] * len(buckets)
        for i, count in enumerate(buckets[:len(counts)]):
            counts[i] += count
    if not counts or not sum(counts):
        return None, None
    return _quantile(counts, bounds_ms, 0.5), _quantile(counts, bounds_ms, 0.99)


def _quantile(counts, bounds_ms, q):
    rank = q * sum(counts)
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds_ms):
                return bounds_ms[-1]
            low = bounds_ms[i - 1] if i else 0.0
            return low + (bounds_ms[i] - low) * (rank - seen) / count
        seen += count
    return bounds_ms[-1]


class History:
    """
    Samples of call counts and queue depths, for the overview's rates and chart.

    @ivar samples: the last C{size} samples, oldest first: ``{"t": ms, "calls",
        "errors", "depths": {queue: depth}}`` (calls and errors over non-``engine::``
        functions, None without the observability module; depths empty without the
        queue module).
    """

    def __init__(self, size=60):
        self.samples = deque(maxlen=size)

    def add(self, sample):
        self.samples.append(sample)

    def rates(self):
        """
        @return: ``(calls per second, error rate)`` between the last two samples with
            counts (None, None when there are not two).
        """
        counted = [s for s in self.samples if s.get("calls") is not None]
        if len(counted) < 2:
            return None, None
        before, now = counted[-2], counted[-1]
        seconds = (now["t"] - before["t"]) / 1000.0
        calls = now["calls"] - before["calls"]
        errors = now["errors"] - before["errors"]
        if seconds <= 0 or calls < 0:
            return None, None
        return calls / seconds, (errors / calls if calls else 0.0)


class Views:
    """
    The console's pages, computed from engine function calls.

    @param engine: the L{iii_twisted.engine.Engine} to call.
    @param history: the L{History} the module samples into.
    @param clock: for timestamps (milliseconds since the epoch: C{clock.seconds()}).
    """

    def __init__(self, engine, history, clock):
        self.engine = engine
        self.history = history
        self.clock = clock

    async def call(self, grants, function_id, data=None):
        """
        Call C{function_id} as the session (L{auth.call}: through the engine's checks
        of its grants).

        @raise InvocationError: ``FORBIDDEN``/``unauthenticated``, or the call's own.
        """
        return await call(self.engine, grants, function_id, data)

    async def part(self, grants, function_id, data=None):
        """@return: the call's result, or ``{"error": ...}`` in its place."""
        try:
            return await self.call(grants, function_id, data)
        except Exception as e:
            return _error(e)

    async def render(self, name, grants, params):
        """
        @return: the page C{name}'s data.
        @raise KeyError: for an unknown page.
        """
        view = getattr(self, "view_" + name) if name in READS else None
        if view is None:
            raise KeyError(name)
        return await view(grants, params if isinstance(params, dict) else {})

    # -- sampling ----------------------------------------------------------------------

    async def sample(self, grants):
        """Take one L{History} sample (called by the module on a timer)."""
        sample = {"t": int(self.clock.seconds() * 1000), "calls": None, "errors": None,
                  "depths": {}}
        metrics = await self.part(grants, "engine::metrics::list", NO_SDK_METRICS)
        if "error" not in metrics:
            by_function = user_functions(
                metrics["engine_metrics"]["invocations"]["by_function"])
            sample["calls"] = sum(s["calls"] for s in by_function.values())
            sample["errors"] = sum(s["errors"] for s in by_function.values())
        queues = await self._queues(grants, dlq=False)
        if "error" not in queues:
            sample["depths"] = {q["name"]: q["depth"] for q in queues["queues"]}
        self.history.add(sample)
        return sample

    # -- pages -------------------------------------------------------------------------

    async def view_overview(self, grants, params):
        info = await self.part(grants, "engine::modules::list", {})
        workers = await self.part(grants, "engine::workers::list", {})
        metrics = await self.part(grants, "engine::metrics::list", NO_SDK_METRICS)
        result = {"engine": info, "workers": None, "calls": None, "queues": None}
        if "error" in workers:
            result["workers"] = workers
        else:
            result["workers"] = {"count": len(workers["workers"]), "names": sorted(
                {w.get("name") or w["id"] for w in workers["workers"]})[:20]}
        if "error" in metrics:
            result["calls"] = metrics
        else:
            invocations = metrics["engine_metrics"]["invocations"]
            by_function = user_functions(invocations["by_function"])
            p50, p99 = merged_quantiles(by_function, invocations.get("bucket_bounds_ms", []))
            per_second, error_rate = self.history.rates()
            result["calls"] = {
                "total": sum(s["calls"] for s in by_function.values()),
                "errors": sum(s["errors"] for s in by_function.values()),
                "per_second": per_second, "error_rate": error_rate,
                "p50_ms": p50, "p99_ms": p99,
            }
        try:
            check(grants, "engine::queue::topic_stats")
            result["queues"] = {"series": list(self.history.samples)}
        except InvocationError as e:
            result["queues"] = _error(e)
        return result

    async def view_workers(self, grants, params):
        workers = await self.part(grants, "engine::workers::list", {})
        if "error" in workers:
            return workers
        # Without the answer's own timestamp, an unchanged list is not pushed again.
        workers.pop("timestamp", None)
        rows = workers["workers"]
        needle = (_str(params, "filter") or "").lower()
        if needle:
            rows = [w for w in rows if needle in (w.get("name") or "").lower()
                    or needle in w["id"]]
        workers["total"] = len(rows)
        workers["workers"] = rows[:MAX_ROWS]
        return workers

    async def view_functions(self, grants, params):
        functions = await self.part(grants, "engine::functions::list",
                                    {"include_host": True})
        if "error" in functions:
            return functions
        triggers = await self.part(grants, "engine::triggers::list", {})
        metrics = await self.part(grants, "engine::metrics::list", NO_SDK_METRICS)
        bound = {}
        for trigger in triggers.get("triggers", ()):
            bound.setdefault(trigger["function_id"], []).append(
                {"id": trigger["id"], "trigger_type": trigger["trigger_type"]})
        stats = ({} if "error" in metrics
                 else metrics["engine_metrics"]["invocations"]["by_function"])
        rows = []
        listed = sorted(functions["functions"], key=lambda f: f["function_id"])
        needle = (_str(params, "filter") or "").lower()
        if needle:
            listed = [f for f in listed if needle in f["function_id"].lower()]
        for f in listed[:MAX_ROWS]:
            s = stats.get(f["function_id"])
            rows.append({
                "function_id": f["function_id"],
                "description": f.get("description"),
                "host": f.get("host"), "worker_id": f.get("worker_id"),
                "worker_name": f.get("worker_name") if f.get("worker_id") else None,
                "request_format": f.get("request_format"),
                "triggers": bound.get(f["function_id"], []),
                "calls": s["calls"] if s else 0,
                "errors": s["errors"] if s else 0,
                "p50_ms": s.get("p50_duration_ms") if s else None,
                "p99_ms": s.get("p99_duration_ms") if s else None,
            })
        return {"functions": rows, "total": len(listed),
                "stats_error": metrics["error"] if "error" in metrics else None,
                "triggers_error": triggers["error"] if "error" in triggers else None}

    async def view_triggers(self, grants, params):
        triggers = await self.part(grants, "engine::triggers::list",
                                   {"include_refused": True})
        types = await self.part(grants, "engine::trigger-types::list", {})
        return {"triggers": triggers, "trigger_types": types}

    async def view_traces(self, grants, params):
        query = {"limit": 50, "sort_by": "start_time", "sort_order": "desc"}
        name = _str(params, "function")
        if name:
            query["name"] = name
        status = _str(params, "status", 20)
        if status:
            query["status"] = status
        min_ms = _number(params, "min_duration_ms")
        if min_ms is not None:
            query["min_duration_ms"] = min_ms
        result = {"list": await self.part(grants, "engine::traces::list", query),
                  "tree": None}
        trace_id = _str(params, "trace_id", 64)
        if trace_id:
            result["tree"] = await self.part(grants, "engine::traces::tree",
                                             {"trace_id": trace_id})
        return result

    async def view_logs(self, grants, params):
        query = {"limit": MAX_ROWS * 5}
        level = _number(params, "severity_min")
        if level is not None:
            query["severity_min"] = int(level)
        logs = await self.part(grants, "engine::logs::list", query)
        text = _str(params, "text")
        if text and "error" not in logs:
            needle = text.lower()
            logs["logs"] = [entry for entry in logs["logs"]
                            if needle in str(entry.get("body", "")).lower()
                            or needle in str(entry.get("attributes", "")).lower()]
        if "error" not in logs:
            logs["logs"] = logs["logs"][:MAX_ROWS]
        return logs

    async def _queues(self, grants, dlq=True):
        topics = await self.part(grants, "engine::queue::list_topics", {})
        if isinstance(topics, dict) and "error" in topics:
            return topics
        queues = []
        for topic in topics:
            stats = await self.part(grants, "engine::queue::topic_stats",
                                    {"topic": topic["name"]})
            if "error" in stats:
                return stats
            entry = {"name": topic["name"], "broker_type": topic["broker_type"],
                     "depth": stats["depth"], "in_flight": stats["in_flight"],
                     "dlq_depth": stats["dlq_depth"],
                     "consumers": stats["consumer_count"]}
            if dlq and stats["dlq_depth"]:
                entry["dlq"] = await self.part(grants, "engine::queue::dlq_messages",
                                               {"topic": topic["name"], "limit": 50})
            queues.append(entry)
        return {"queues": queues}

    async def view_queues(self, grants, params):
        return await self._queues(grants)

    async def view_state(self, grants, params):
        groups = await self.part(grants, "state::list_groups", {})
        result = {"groups": groups, "scope": None, "items": None}
        scope = _str(params, "scope")
        if scope:
            result["scope"] = scope
            result["items"] = _capped(await self.part(
                grants, "state::list", {"scope": scope, "with_keys": True}))
        return result

    async def view_streams(self, grants, params):
        streams = await self.part(grants, "stream::list_all", {})
        result = {"streams": streams, "stream": None, "group": None, "items": None}
        stream, group = _str(params, "stream"), _str(params, "group")
        if stream and group:
            result["stream"], result["group"] = stream, group
            result["items"] = _capped(await self.part(
                grants, "stream::list",
                {"stream_name": stream, "group_id": group, "with_keys": True}))
        return result
