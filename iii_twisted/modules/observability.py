"""
Observability: ``modules::observability::OtelModule`` (also loaded as
``modules::observability::ObservabilityModule``). Behaviour: modules.md §9.

What it does once loaded (and ``enabled``, the default):

- every call routed through ``Engine.call`` gets an engine span, a child of the
  caller's ``traceparent``, whose context is passed on to the worker that runs the
  function (L{iii_twisted.observability.tracing.CallTracer});
- the ``OTLP``/``LOGS``/``MTRC`` binary frames workers send are decoded and stored
  (L{TelemetrySink}); a frame that is not valid OTLP JSON is counted and dropped;
- spans, logs and worker metrics are kept in memory stores bounded by count and age;
  the engine's own metrics (calls, errors, latency histograms per function, workers,
  queue depths) are kept as counters, and the npm SDK's worker gauges become
  ``latest_metrics`` in ``engine::workers::list`` (L{WorkerGauges});
- the engine's own log lines at or above ``level`` are stored with the logs
  (L{EngineLogCapture}, a C{twisted.logger} observer);
- ``engine::traces::*``, ``engine::logs::*``, ``engine::metrics::list``,
  ``engine::log::*``, ``engine::baggage::*``, ``engine::sampling::rules``,
  ``engine::health::check``, ``engine::alerts::*`` and ``engine::rollups::list`` read
  them, and the ``log`` trigger type calls a function for every log stored from a
  worker or ``engine::log::*``;
- optionally everything is exported to an OpenTelemetry collector (``exporter: otlp``
  or ``both``), and the engine metrics are served as Prometheus text
  (``prometheus: {port: 9464, host: 127.0.0.1}``).

Config keys: see docs/observability.rst. Unknown keys are ignored (the reference's
config is lenient too), and logged.
"""

import os
import threading
from random import Random

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger, globalLogPublisher
from zope.interface import implementer

from .. import __version__
from ..config import ConfigError
from ..listeners import Listener
from ..logsetup import QuietSite
from ..schema import Key, ListOf, MapOf, Section, closest
from ..engine import VOID
from ..health import cluster_status, directory_of, unlinked_of
from ..interfaces import IModule, ITelemetrySink, ITriggerProvider, TriggerError
from ..observability import otlp
from ..observability.engine_logs import NOT_CAPTURED, THRESHOLDS, EngineLogCapture
from ..observability.metrics import EngineMetrics, PrometheusResource
from ..observability.storage import (
    BoundedStore, Limits, list_logs, list_traces, log_record, span_tree,
)
from ..observability.tracing import CallTracer, Sampler
from ..observability.worker_gauges import WorkerGauges
from ..protocol import DESERIALIZATION_ERROR, InvocationError

_log = Logger()

LOG_TRIGGER_TYPE = "log"
LOG_LEVELS = ("all", "info", "warn", "error", "debug", "trace")
_SEVERITY = {"info": ("INFO", 9), "warn": ("WARN", 13), "error": ("ERROR", 17),
             "debug": ("DEBUG", 5), "trace": ("TRACE", 1)}
_OPERATORS = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
_ROLLUP_LEVELS = (60, 300, 3600)
_KNOWN_KEYS = frozenset("""
enabled service_name service_version service_namespace exporter endpoint protocol headers
sampling_ratio sampling memory_max_spans traces_retention_seconds trace_internal
export_interval_ms shutdown_timeout_ms metrics_enabled metrics_exporter metrics_retention_seconds
metrics_max_count metrics_export_interval_ms max_functions logs_enabled logs_exporter
logs_max_count logs_retention_seconds logs_batch_size logs_flush_interval_ms
logs_sampling_ratio logs_console_output alerts level log_level format prometheus
max_frame_bytes limits
""".split())

# Every key of the module's config (iii_twisted/schema.py says how to add one).
_EXPORTERS = ("memory", "otlp", "both")


def _pos(default, doc, kind=int):
    # Numbers must be positive: 0 passes here and the module refuses it, saying so.
    return Key(kind, default, doc, min=1 if kind is int else 0)


def _share(default, doc):
    return Key(float, default, doc, min=0.0, max=1.0)


def _alert_rules(alert):
    action = alert.get("action") or {}
    kind = action.get("type") or "log"
    if kind == "webhook" and not action.get("url"):
        return "action.url", "is required for a webhook action"
    if kind == "function" and not action.get("path"):
        return "action.path", "is required for a function action"
    return None


CONFIG_SCHEMA = Section(
    enabled=Key(bool, None, "on or off (default: env OTEL_ENABLED, else on)"),
    service_name=Key(str, "iii", "service.name of what is exported"),
    service_version=Key(str, "unknown", "service.version of what is exported"),
    service_namespace=Key(str, None, "service.namespace of what is exported"),
    exporter=Key(str, "memory", "where spans go", choices=_EXPORTERS),
    endpoint=Key(str, None, "OTLP collector URL (default per protocol)"),
    protocol=Key(str, "http/protobuf", "OTLP protocol",
                 choices=("http", "http/protobuf", "grpc")),
    headers=Key(MapOf(str), {}, "headers sent to the collector"),
    export_interval_ms=_pos(5000, "how often spans are exported, ms"),
    shutdown_timeout_ms=_pos(5000, "how long a stop waits for the exporter, ms"),
    max_frame_bytes=_pos(4 * 1024 * 1024, "largest telemetry frame from a worker"),
    sampling_ratio=_share(1.0, "share of traces kept"),
    sampling=Key(Section(
        default=_share(None, "share of traces kept (overrides sampling_ratio)"),
        parent_based=Key(bool, True, "follow the parent span's decision"),
        rules=Key(ListOf(Section(
            operation=Key(str, None, "span name pattern"),
            service=Key(str, None, "service name pattern"),
            rate=Key(float, None, "share kept", min=0.0, max=1.0, required=True),
        )), [], "per-operation sampling"),
        rate_limit=Key(Section(
            max_traces_per_second=_pos(None, "cap on traces kept", float),
        ), None, "cap on traces kept"),
    ), None, "trace sampling"),
    memory_max_spans=_pos(1000, "spans kept in memory"),
    traces_retention_seconds=_pos(3600, "how long spans are kept", float),
    trace_internal=Key(bool, False, "also trace the engine's own functions"),
    metrics_enabled=Key(bool, True, "keep metrics"),
    metrics_exporter=Key(str, "memory", "where metrics go", choices=_EXPORTERS),
    metrics_retention_seconds=_pos(3600, "how long metrics are kept", float),
    metrics_max_count=_pos(10000, "metric points kept"),
    metrics_export_interval_ms=_pos(60000, "how often metrics are exported, ms"),
    max_functions=_pos(1000, "functions tracked in metrics"),
    logs_enabled=Key(bool, True, "keep logs"),
    logs_exporter=Key(str, "memory", "where logs go", choices=_EXPORTERS),
    logs_max_count=_pos(1000, "log records kept"),
    logs_retention_seconds=_pos(3600, "how long logs are kept", float),
    logs_batch_size=_pos(100, "log records per export"),
    logs_flush_interval_ms=_pos(5000, "how often logs are exported, ms"),
    logs_sampling_ratio=_share(1.0, "share of log records kept"),
    logs_console_output=Key(bool, True, "accepted for compatibility"),
    level=Key(str, "info", "lowest engine log level stored with the logs",
              choices=tuple(THRESHOLDS)),
    log_level=Key(str, "info", "same as level (level wins)", choices=tuple(THRESHOLDS)),
    format=Key(str, "default", "accepted for compatibility", choices=("default", "json")),
    alerts=Key(ListOf(Section(
        _check=_alert_rules,
        name=Key(str, None, "alert name", required=True),
        metric=Key(str, None, "metric watched", required=True),
        threshold=Key(float, None, "value compared", required=True),
        operator=Key(str, ">", "comparison", choices=tuple(_OPERATORS)),
        window_seconds=_pos(60, "window the metric is read over"),
        cooldown_seconds=Key(int, 60, "quiet time after firing", min=0),
        enabled=Key(bool, True, "on or off"),
        action=Key(Section(
            type=Key(str, "log", "what firing does",
                     choices=("log", "webhook", "function")),
            url=Key(str, None, "webhook URL"),
            path=Key(str, None, "function id to call"),
        ), None, "what firing does (default: log)"),
    )), [], "alerts on metrics"),
    prometheus=Key((str, bool, Section(
        port=Key(int, 9464, "TCP port of /metrics", min=0, max=65535),
        host=Key(str, "127.0.0.1", "interface"),
        listen=Key(str, None, "a Twisted endpoint string; overrides port and host"),
    )), None, "Prometheus /metrics listener (an endpoint string, a mapping, or false)",
        check=lambda v: "must be a mapping {port, host}, an endpoint string or false"
        if v is True else None),
    limits=Key(Section(
        attributes=_pos(128, "attributes per span"),
        events=_pos(128, "events per span"),
        string=_pos(4096, "characters per attribute value"),
        data_points=_pos(1000, "data points per metric"),
    ), None, "size limits on what is stored"),
)

NOT_ENABLED_MESSAGE = ("In-memory span storage is not available. Set exporter: memory "
                       "or both in config.")


# -- config ----------------------------------------------------------------------------


def _kind(value):
    return "null" if value is None else type(value).__name__


def _opt(mapping, key, kinds, default, prefix=""):
    value = mapping.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        value = object()  # a boolean is not a number here
    if not isinstance(value, kinds):
        names = {bool: "true or false", int: "an integer", float: "a number",
                 str: "a string", list: "a list", dict: "a mapping"}
        raise ConfigError("must be {}, not {} ({!r})".format(
            " or ".join(names[k] for k in kinds), _kind(mapping.get(key)),
            mapping.get(key)), prefix + key)
    return value


def _ratio(mapping, key, default, prefix=""):
    value = _opt(mapping, key, (int, float), default, prefix)
    if not 0.0 <= value <= 1.0:
        raise ConfigError("must be between 0.0 and 1.0, not {!r}".format(value), prefix + key)
    return float(value)


def _positive(mapping, key, default, prefix="", kinds=(int,)):
    value = _opt(mapping, key, kinds, default, prefix)
    if value is not None and value <= 0:
        raise ConfigError("must be greater than 0, not {!r}".format(value), prefix + key)
    return value


def _choice(mapping, key, choices, default, prefix=""):
    value = _opt(mapping, key, (str,), default, prefix)
    if value not in choices:
        raise ConfigError("must be one of {}, not {!r}".format(", ".join(choices), value),
                          prefix + key)
    return value


def _env_enabled():
    value = os.environ.get("OTEL_ENABLED")
    if value is None or not value.strip():
        return True
    return value.strip().lower() not in ("false", "0", "no", "off")


class Options:
    """The module's validated configuration (see L{parse_config})."""


def parse_config(config):
    """
    Validate the module's config.

    @return: an L{Options}.
    @raise ConfigError: naming the key of a wrong value.
    """
    o = Options()
    unknown = sorted(set(config) - _KNOWN_KEYS)
    if unknown:
        _log.info("observability: ignoring unknown config keys {keys}", keys=", ".join(unknown))
    o.enabled = _opt(config, "enabled", (bool,), None)
    if o.enabled is None:
        o.enabled = _env_enabled()
    o.service_name = _opt(config, "service_name", (str,), "iii")
    o.service_version = _opt(config, "service_version", (str,), "unknown")
    o.service_namespace = _opt(config, "service_namespace", (str,), None)
    o.exporter = _choice(config, "exporter", ("memory", "otlp", "both"), "memory")
    o.protocol = _opt(config, "protocol", (str,), "http/protobuf")
    if o.protocol in ("http", "http/protobuf"):
        o.protocol = "http/protobuf"
    elif o.protocol != "grpc":
        raise ConfigError("must be http/protobuf or grpc, not {!r}".format(o.protocol),
                          "protocol")
    o.endpoint = _opt(config, "endpoint", (str,),
                      "http://localhost:4317" if o.protocol == "grpc" else "http://localhost:4318")
    headers = _opt(config, "headers", (dict,), {})
    for name, value in headers.items():
        if not isinstance(value, str):
            raise ConfigError("must be a string", "headers." + str(name))
    o.headers = headers
    o.export_interval_ms = _positive(config, "export_interval_ms", 5000)
    o.shutdown_timeout_ms = _positive(config, "shutdown_timeout_ms", 5000)
    o.max_frame_bytes = _positive(config, "max_frame_bytes", 4 * 1024 * 1024)

    # traces and sampling
    default_ratio = _ratio(config, "sampling_ratio", 1.0)
    sampling = _opt(config, "sampling", (dict,), {})
    o.sampling_default = _ratio(sampling, "default", default_ratio, "sampling.")
    o.sampling_parent_based = _opt(sampling, "parent_based", (bool,), True, "sampling.")
    rules = _opt(sampling, "rules", (list,), [], "sampling.")
    o.sampling_rules = []
    for i, rule in enumerate(rules):
        prefix = "sampling.rules[{}].".format(i)
        if not isinstance(rule, dict):
            raise ConfigError("must be a mapping", prefix[:-1])
        if rule.get("rate") is None:
            raise ConfigError("is required", prefix + "rate")
        o.sampling_rules.append({
            "operation": _opt(rule, "operation", (str,), None, prefix),
            "service": _opt(rule, "service", (str,), None, prefix),
            "rate": _ratio(rule, "rate", None, prefix),
        })
    rate_limit = _opt(sampling, "rate_limit", (dict,), {}, "sampling.")
    o.max_traces_per_second = _positive(rate_limit, "max_traces_per_second", None,
                                        "sampling.rate_limit.", (int, float))
    o.memory_max_spans = _positive(config, "memory_max_spans", 1000)
    o.traces_retention_seconds = _positive(config, "traces_retention_seconds", 3600,
                                           kinds=(int, float))
    o.trace_internal = _opt(config, "trace_internal", (bool,), False)

    # metrics
    o.metrics_enabled = _opt(config, "metrics_enabled", (bool,), True)
    o.metrics_exporter = _choice(config, "metrics_exporter", ("memory", "otlp", "both"),
                                 "memory")
    o.metrics_retention_seconds = _positive(config, "metrics_retention_seconds", 3600,
                                            kinds=(int, float))
    o.metrics_max_count = _positive(config, "metrics_max_count", 10000)
    o.metrics_export_interval_ms = _positive(config, "metrics_export_interval_ms", 60000)
    o.max_functions = _positive(config, "max_functions", 1000)

    # logs
    o.logs_enabled = _opt(config, "logs_enabled", (bool,), True)
    o.logs_exporter = _choice(config, "logs_exporter", ("memory", "otlp", "both"), "memory")
    o.logs_max_count = _positive(config, "logs_max_count", 1000)
    o.logs_retention_seconds = _positive(config, "logs_retention_seconds", 3600,
                                         kinds=(int, float))
    o.logs_batch_size = _positive(config, "logs_batch_size", 100)
    o.logs_flush_interval_ms = _positive(config, "logs_flush_interval_ms", 5000)
    o.logs_sampling_ratio = _ratio(config, "logs_sampling_ratio", 1.0)
    o.logs_console_output = _opt(config, "logs_console_output", (bool,), True)

    # ``level`` (or ``log_level``): which of the engine's own log lines are stored with
    # the logs; the log output itself belongs to twistd (see docs/observability.rst).
    # ``format`` is accepted for compatibility.
    o.engine_log_level = "info"
    for key in ("log_level", "level"):  # ``level`` wins when both are given
        if key in config:
            o.engine_log_level = _choice(config, key, tuple(THRESHOLDS), "info")
    _choice(config, "format", ("default", "json"), "default")

    o.alerts = _parse_alerts(_opt(config, "alerts", (list,), []))
    o.prometheus = _parse_prometheus(config.get("prometheus"))
    limits = _opt(config, "limits", (dict,), {})
    o.limits = Limits(
        attributes=_positive(limits, "attributes", 128, "limits."),
        events=_positive(limits, "events", 128, "limits."),
        string=_positive(limits, "string", 4096, "limits."),
        data_points=_positive(limits, "data_points", 1000, "limits."),
    )
    o.uses_otlp = o.enabled and (
        o.exporter in ("otlp", "both") or o.logs_exporter in ("otlp", "both")
        or o.metrics_exporter in ("otlp", "both"))
    if o.uses_otlp:
        from ..observability.export import ExporterUnavailable, require_sdk
        try:
            require_sdk(o.protocol)
        except ExporterUnavailable as e:
            raise ConfigError(str(e), "exporter")
    return o


def _parse_alerts(alerts):
    result = []
    for i, alert in enumerate(alerts):
        prefix = "alerts[{}].".format(i)
        if not isinstance(alert, dict):
            raise ConfigError("must be a mapping", prefix[:-1])
        for key in ("name", "metric"):
            if not isinstance(alert.get(key), str) or not alert[key]:
                raise ConfigError("is required (a string)", prefix + key)
        if alert.get("threshold") is None:
            raise ConfigError("is required (a number)", prefix + "threshold")
        action = _opt(alert, "action", (dict,), {"type": "log"}, prefix)
        kind = _choice(action, "type", ("log", "webhook", "function"), "log", prefix + "action.")
        if kind == "webhook" and not isinstance(action.get("url"), str):
            raise ConfigError("is required for a webhook action", prefix + "action.url")
        if kind == "function" and not isinstance(action.get("path"), str):
            raise ConfigError("is required for a function action", prefix + "action.path")
        result.append({
            "name": alert["name"],
            "metric": alert["metric"],
            "threshold": _opt(alert, "threshold", (int, float), 0, prefix),
            "operator": _choice(alert, "operator", tuple(_OPERATORS), ">", prefix),
            "window_seconds": _positive(alert, "window_seconds", 60, prefix),
            "cooldown_seconds": _opt(alert, "cooldown_seconds", (int,), 60, prefix),
            "enabled": _opt(alert, "enabled", (bool,), True, prefix),
            "action": dict(action, type=kind),
        })
    return result


def _parse_prometheus(value):
    """@return: an endpoint string, or None when not configured."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise ConfigError("must be a mapping {port, host} or an endpoint string",
                          "prometheus")
    if value.get("listen") is not None:
        return _opt(value, "listen", (str,), None, "prometheus.")
    port = _opt(value, "port", (int,), 9464, "prometheus.")
    if not 0 <= port <= 65535:
        raise ConfigError("must be between 0 and 65535", "prometheus.port")
    host = _opt(value, "host", (str,), "127.0.0.1", "prometheus.")
    return "tcp:{}:interface={}".format(port, host)


# -- the module --------------------------------------------------------------------------


def _input(function_id, data):
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _bad_input(function_id, "expected an object, got {}".format(type(data).__name__))
    return data


def _bad_input(function_id, why):
    return InvocationError(DESERIALIZATION_ERROR,
                           "Failed to deserialize input for {}: {}".format(function_id, why))


# The parameters of the read functions, as the current reference names them
# (engine/src/workers/observability/mod.rs TracesListInput, LogsListInput,
# MetricsListInput). The reference ignores any other key and sorts by start_time for
# an unknown sort_by; we refuse both, naming the key (docs/deviations.rst), so that a
# misspelt filter is not a silently unfiltered answer.
TRACES_LIST_KEYS = frozenset([
    "trace_id", "trace_ids", "offset", "limit", "service_name", "name", "status",
    "min_duration_ms", "max_duration_ms", "start_time", "end_time", "sort_by",
    "sort_order", "attributes", "exclude_attributes", "include_internal",
    "search_all_spans"])
LOGS_LIST_KEYS = frozenset([
    "start_time", "end_time", "trace_id", "span_id", "severity_min", "severity_text",
    "offset", "limit"])
METRICS_LIST_KEYS = frozenset(["start_time", "end_time", "metric_name",
                               "aggregate_interval",
                               # ours (the console): engine metrics only
                               "include_sdk_metrics"])
SORT_KEYS = ("start_time", "duration", "duration_ms", "service_name", "name")


def _known_keys(function_id, data, known):
    """
    @raise InvocationError: ``deserialization_error`` naming the first unknown key
        (and the closest known one). Keys the engine itself adds to a worker's call
        data (``_caller_*``) are not the caller's and pass.
    """
    for key in data:
        if key in known or (isinstance(key, str) and key.startswith("_caller")):
            continue
        hint = closest(key, sorted(known))
        raise _bad_input(function_id, "unknown field `{}`{}; expected one of {}".format(
            key, ", did you mean `{}`?".format(hint) if hint else "",
            ", ".join(sorted(known))))


def _one_of(function_id, data, key, choices, default):
    value = _field(function_id, data, key, (str,), default)
    if value not in choices:
        raise _bad_input(function_id, "unknown {} `{}`; expected one of {}".format(
            key, value, ", ".join(choices)))
    return value


def _field(function_id, data, key, kinds, default=None, required=False):
    value = data.get(key)
    if value is None:
        if required:
            raise _bad_input(function_id, "missing field `{}`".format(key))
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise _bad_input(function_id, "invalid type for `{}`".format(key))
    if not isinstance(value, kinds):
        raise _bad_input(function_id, "invalid type for `{}`: {}".format(key, _kind(value)))
    if kinds == (int,) and value < 0:
        raise _bad_input(function_id, "`{}` must not be negative".format(key))
    return value


@implementer(IModule, ITelemetrySink, ITriggerProvider)
class OtelModule(MultiService):
    """
    The observability module. It is the engine's C{telemetry_sink}, a call observer
    (through its L{CallTracer}) and the provider of the ``log`` trigger type.

    @ivar spans: the L{BoundedStore} of L{SpanRecord}s, or None when span storage is
        off (``enabled: false``).
    @ivar logs: the L{BoundedStore} of StoredLog dicts.
    @ivar sdk_metrics: the L{BoundedStore} of metric dicts workers sent.
    @ivar metrics: the L{EngineMetrics}.
    @ivar worker_gauges: the L{WorkerGauges} behind ``latest_metrics`` in
        ``engine::workers::list`` (the engine's C{worker_metrics}), or None when
        observability or metrics are off.
    @ivar exporter: the L{iii_twisted.observability.export.OtlpExporter} while running
        with an OTLP exporter, else None.
    """

    iii_class = None
    config_schema = CONFIG_SCHEMA
    # Where the engine's own log lines are captured from (tests give their own).
    log_publisher = globalLogPublisher

    def __init__(self, engine, config, reactor):
        MultiService.__init__(self)
        self.engine = engine
        self.reactor = reactor
        self.options = o = parse_config(config or {})
        self._random = Random()
        self.exporter = None
        self.metrics = EngineMetrics(engine, max_functions=o.max_functions)
        self.sampler = Sampler(reactor, o.sampling_default, o.sampling_rules,
                               o.sampling_parent_based, o.max_traces_per_second,
                               o.service_name)
        self.spans = self.logs = self.sdk_metrics = None
        self._store_engine_spans = o.exporter in ("memory", "both")
        self._alert_state = {alert["name"]: {"firing": False, "last_value": None,
                                             "last_triggered": None}
                             for alert in o.alerts}
        self._invalid_logged = 0
        if o.enabled:
            self.spans = BoundedStore(reactor, o.memory_max_spans, o.traces_retention_seconds)
        self.logs = BoundedStore(reactor, o.logs_max_count, o.logs_retention_seconds)
        self.sdk_metrics = BoundedStore(reactor, o.metrics_max_count,
                                        o.metrics_retention_seconds)
        self.tracer = CallTracer(reactor, self.metrics, self.sampler,
                                 on_span=self._on_span if o.enabled else None,
                                 service_name=o.service_name,
                                 trace_internal=o.trace_internal)
        self.worker_gauges = None
        self._capture = None
        if o.enabled:
            engine.telemetry_sink = self
            engine.add_call_observer(self.tracer)
            engine.add_detach_hook(self.metrics.worker_left)
            if o.metrics_enabled:
                self.worker_gauges = WorkerGauges(engine, reactor)
                engine.worker_metrics = self.worker_gauges
                engine.add_detach_hook(self.worker_gauges.worker_left)
        self._register_functions()
        engine.register_trigger_type(
            LOG_TRIGGER_TYPE, self,
            "Fires for every log stored (engine::log::* and workers' OTLP logs); "
            "config {level: all|info|warn|error|debug|trace}")
        sweep = TimerService(60, self._sweep)
        sweep.clock = reactor
        sweep.setServiceParent(self)
        if o.alerts:
            alerts = TimerService(10, self._evaluate_alerts_tick)
            alerts.clock = reactor
            alerts.setServiceParent(self)
        if o.prometheus is not None:
            # Scrapes are not logged (logsetup.QuietSite).
            Listener(o.prometheus, QuietSite(PrometheusResource(self.metrics),
                                             reactor=reactor),
                     reactor, "prometheus").setServiceParent(self)

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self):
        o = self.options
        minimum = THRESHOLDS[o.engine_log_level]
        if o.enabled and o.logs_enabled and minimum is not None and self._capture is None:
            self._capture = EngineLogCapture(self._store_engine_log, self.reactor,
                                             o.service_name, minimum)
            self.log_publisher.addObserver(self._capture)
        if o.uses_otlp and self.exporter is None:
            from ..observability.export import OtlpExporter
            resource = {"service.name": o.service_name, "service.version": o.service_version}
            if o.service_namespace:
                resource["service.namespace"] = o.service_namespace
            self.exporter = OtlpExporter(
                o.endpoint, o.protocol, o.headers, resource,
                traces=o.exporter in ("otlp", "both"),
                logs=o.logs_enabled and o.logs_exporter in ("otlp", "both"),
                metrics=self.metrics if (o.metrics_enabled and o.metrics_exporter in
                                         ("otlp", "both")) else None,
                export_interval_ms=o.export_interval_ms,
                metrics_interval_ms=o.metrics_export_interval_ms,
            )
            _log.info("observability: exporting OTLP ({protocol}) to {endpoint}",
                      protocol=o.protocol, endpoint=o.endpoint)
        MultiService.startService(self)

    def stopService(self):
        if self._capture is not None:
            self.log_publisher.removeObserver(self._capture)
            self._capture = None
        d = MultiService.stopService(self)
        exporter, self.exporter = self.exporter, None
        if exporter is None:
            return d

        def shut_down(result):
            # The SDK flushes and joins its threads, which blocks (for the exporter's
            # timeout and retries when the collector is down): so it runs in a daemon
            # thread of its own, and the engine waits for it at most
            # shutdown_timeout_ms; what is still queued then is lost.
            done = Deferred()

            def finished():
                if not done.called:
                    done.callback(None)

            def run():
                try:
                    exporter.shutdown()
                finally:
                    self.reactor.callFromThread(finished)

            threading.Thread(target=run, name="otlp-shutdown", daemon=True).start()

            def timed_out(value, timeout):
                _log.warn("observability: OTLP export did not finish within {timeout}s "
                          "of shutdown; unsent telemetry is dropped", timeout=timeout)
            done.addTimeout(self.options.shutdown_timeout_ms / 1000.0, self.reactor,
                            onTimeoutCancel=timed_out)
            return done.addCallback(lambda _: result)
        return d.addCallback(shut_down)

    def _sweep(self):
        try:
            for store in (self.spans, self.logs, self.sdk_metrics):
                if store is not None:
                    store.expire()
        except Exception:
            _log.failure("observability: expiry sweep failed")

    # -- spans -------------------------------------------------------------------------

    def _on_span(self, record):
        if self._store_engine_spans:
            self.spans.add(record)
        if self.exporter is not None:
            self.exporter.export_span(record)

    # -- ITelemetrySink ----------------------------------------------------------------

    def ingest(self, kind, payload, worker_id):
        """
        Decode and store one telemetry frame; never raises. A frame that is not valid
        OTLP JSON (or is over C{max_frame_bytes}) is counted as invalid and dropped.
        """
        metrics = self.metrics
        try:
            if kind not in metrics.telemetry_frames:
                return
            metrics.telemetry_frames[kind] += 1
            if len(payload) > self.options.max_frame_bytes:
                raise otlp.TelemetryDecodeError("frame of {} bytes is over max_frame_bytes "
                                                "({})".format(len(payload),
                                                              self.options.max_frame_bytes))
            limits = self.options.limits
            if kind == "OTLP":
                decoded = otlp.decode_traces(payload, limits)
                self._store_spans(decoded.records)
            elif kind == "LOGS":
                if not self.options.logs_enabled:
                    return
                decoded = otlp.decode_logs(payload, int(self.reactor.seconds() * 1e9), limits)
                for record in decoded.records:
                    self._store_log(record)
            else:
                if not self.options.metrics_enabled:
                    return
                decoded = otlp.decode_metrics(payload, limits)
                self.sdk_metrics.extend(decoded.records)
                for record in decoded.records:
                    self.worker_gauges.record(record)
            metrics.telemetry_records[kind] += len(decoded.records)
            metrics.telemetry_skipped[kind] += decoded.skipped
        except otlp.TelemetryDecodeError as e:
            metrics.telemetry_invalid[kind] += 1
            self._invalid_logged += 1
            if self._invalid_logged <= 10 or self._invalid_logged % 1000 == 0:
                _log.warn("dropped an invalid {kind} telemetry frame from worker "
                          "{worker_id}: {error} ({count} so far)", kind=kind,
                          worker_id=worker_id, error=e,
                          count=metrics.telemetry_invalid[kind])
        except Exception:
            metrics.telemetry_invalid[kind] = metrics.telemetry_invalid.get(kind, 0) + 1
            _log.failure("observability: ingesting a {kind} frame failed", kind=kind)

    def _store_spans(self, records):
        spans, exporter = self.spans, self.exporter
        for record in records:
            if spans is not None:
                spans.add(record)
            if exporter is not None and self.options.exporter in ("otlp", "both"):
                exporter.export_span(record)

    # -- logs --------------------------------------------------------------------------

    def _store_log(self, record):
        """Store one StoredLog, echo it, export it and fire the ``log`` triggers."""
        self.logs.add(record)
        o = self.options
        if o.logs_console_output:
            _log.info("[{service}] {severity} {body}", service=record["service_name"],
                      severity=record["severity_text"], body=record["body"],
                      **{NOT_CAPTURED: True})  # stored already
        if self.exporter is not None and o.logs_exporter in ("otlp", "both"):
            self.exporter.export_log(record)
        triggers = self.engine.triggers_of_type(LOG_TRIGGER_TYPE)
        if triggers:
            level = (record["severity_text"] or "").lower()
            for trigger in triggers:
                wanted = (trigger.config or {}).get("level") or "all"
                if wanted == "all" or wanted == level:
                    self.engine.call(trigger.function_id, record, VOID,
                                     metadata=trigger.metadata)

    def _store_engine_log(self, record):
        """
        Store and export one of the engine's own log lines. It does not fire ``log``
        triggers: a trigger function whose failure the engine logs would otherwise
        feed itself forever.
        """
        self.logs.add(record)
        if self.exporter is not None and self.options.logs_exporter in ("otlp", "both"):
            self.exporter.export_log(record)

    def register_trigger(self, trigger):
        config = trigger.config
        if config is None:
            return succeed(None)
        if not isinstance(config, dict):
            raise TriggerError("log trigger config must be an object")
        level = config.get("level", "all")
        if level is not None and level not in LOG_LEVELS:
            raise TriggerError("log trigger level must be one of {}, not {!r}".format(
                ", ".join(LOG_LEVELS), level))
        return succeed(None)

    def unregister_trigger(self, trigger):
        return succeed(None)

    # -- functions ---------------------------------------------------------------------

    def _register_functions(self):
        register = self.engine.register_function
        for level in _SEVERITY:
            register("engine::log::" + level, self._logger(level),
                     "Log a {} message (stored with the engine's logs)".format(level))
        register("engine::baggage::get", self.baggage_get, "Get a baggage item (engine context)")
        register("engine::baggage::set", self.baggage_set, "Set a baggage item (no effect)")
        register("engine::baggage::get_all", self.baggage_get_all, "Get all baggage items")
        register("engine::traces::list", self.traces_list, "List stored traces")
        register("engine::traces::tree", self.traces_tree, "A trace's spans as a tree")
        register("engine::traces::clear", self.traces_clear, "Clear stored spans")
        register("engine::metrics::list", self.metrics_list, "Engine and SDK metrics")
        register("engine::logs::list", self.logs_list, "List stored logs")
        register("engine::logs::clear", self.logs_clear, "Clear stored logs")
        register("engine::sampling::rules", self.sampling_rules, "The sampling rules")
        register("engine::health::check", self.health_check, "Observability health")
        register("engine::alerts::list", self.alerts_list, "Configured alerts and state")
        register("engine::alerts::evaluate", self.alerts_evaluate, "Evaluate alerts now")
        register("engine::rollups::list", self.rollups_list, "Metric rollups")

    def _now_ms(self):
        return int(self.reactor.seconds() * 1000)

    def _logger(self, level):
        function_id = "engine::log::" + level
        severity_text, severity_number = _SEVERITY[level]

        def log(data):
            data = _input(function_id, data)
            message = _field(function_id, data, "message", (str,), required=True)
            extra = _field(function_id, data, "data", (dict, list, str, int, float, bool))
            trace_id = _field(function_id, data, "trace_id", (str,))
            span_id = _field(function_id, data, "span_id", (str,))
            service = _field(function_id, data, "service_name", (str,), "unknown")
            ratio = self.options.logs_sampling_ratio
            if not self.options.logs_enabled or (
                    ratio < 1.0 and self._random.random() >= ratio):
                return None
            now = int(self.reactor.seconds() * 1e9)
            attributes = dict(extra) if isinstance(extra, dict) else (
                {} if extra is None else {"data": extra})
            resource = {"service.name": self.options.service_name}
            self._store_log(log_record(now, now, severity_number, severity_text, message,
                                       attributes, trace_id, span_id, resource, service))
            return None
        return log

    def baggage_get(self, data):
        data = _input("engine::baggage::get", data)
        _field("engine::baggage::get", data, "key", (str,), required=True)
        return {"value": None}

    def baggage_set(self, data):
        data = _input("engine::baggage::set", data)
        _field("engine::baggage::set", data, "key", (str,), required=True)
        _field("engine::baggage::set", data, "value", (str,), required=True)
        return {"success": True, "note": "Baggage set in new context. For propagation, "
                                         "use SDK-level baggage headers."}

    def baggage_get_all(self, data):
        _input("engine::baggage::get_all", data)
        return {"baggage": {}}

    def _span_store(self):
        if self.spans is None:
            raise InvocationError("memory_exporter_not_enabled", NOT_ENABLED_MESSAGE)
        return self.spans

    def traces_list(self, data):
        fid = "engine::traces::list"
        data = _input(fid, data)
        _known_keys(fid, data, TRACES_LIST_KEYS)
        store = self._span_store()
        query = {
            "trace_id": _field(fid, data, "trace_id", (str,)),
            "offset": _field(fid, data, "offset", (int,), 0),
            "limit": _field(fid, data, "limit", (int,), 100),
            "service_name": _field(fid, data, "service_name", (str,)),
            "name": _field(fid, data, "name", (str,)),
            "status": _field(fid, data, "status", (str,)),
            "min_duration_ms": _field(fid, data, "min_duration_ms", (int, float)),
            "max_duration_ms": _field(fid, data, "max_duration_ms", (int, float)),
            "start_time": _field(fid, data, "start_time", (int,)),
            "end_time": _field(fid, data, "end_time", (int,)),
            "sort_by": _one_of(fid, data, "sort_by", SORT_KEYS, "start_time"),
            "sort_order": _one_of(fid, data, "sort_order", ("asc", "desc"), "asc"),
            "attributes": _field(fid, data, "attributes", (list,)),
            "exclude_attributes": _field(fid, data, "exclude_attributes", (list,)),
            "trace_ids": _field(fid, data, "trace_ids", (list,)),
            "include_internal": _field(fid, data, "include_internal", (bool,), False),
            "search_all_spans": _field(fid, data, "search_all_spans", (bool,), False),
        }
        for key in ("attributes", "exclude_attributes"):
            for pair in query[key] or ():
                if not (isinstance(pair, list) and len(pair) == 2
                        and all(isinstance(x, str) for x in pair)):
                    raise _bad_input(fid, "{} must be a list of [key, value] strings"
                                     .format(key))
        if query["trace_ids"] is not None:
            if not all(isinstance(t, str) for t in query["trace_ids"]):
                raise _bad_input(fid, "trace_ids must be a list of strings")
            query["trace_ids"] = [t.lower() for t in query["trace_ids"]]
        if query["trace_id"]:
            query["trace_id"] = query["trace_id"].lower()
        spans, total = list_traces(store.records(), query)
        return {"spans": spans, "total": total, "offset": query["offset"],
                "limit": query["limit"]}

    def traces_tree(self, data):
        fid = "engine::traces::tree"
        data = _input(fid, data)
        trace_id = _field(fid, data, "trace_id", (str,), required=True)
        return {"roots": span_tree(self._span_store().records(), trace_id.lower())}

    def traces_clear(self, data):
        self._span_store().clear()
        return {"success": True}

    def metrics_list(self, data):
        fid = "engine::metrics::list"
        data = _input(fid, data)
        _known_keys(fid, data, METRICS_LIST_KEYS)
        start = _field(fid, data, "start_time", (int,))
        end = _field(fid, data, "end_time", (int,))
        name = _field(fid, data, "metric_name", (str,))
        interval = _field(fid, data, "aggregate_interval", (int,))
        # Ours: a reader that wants the engine's metrics only (the console, every
        # second) need not copy every stored SDK metric.
        with_sdk = _field(fid, data, "include_sdk_metrics", (bool,), True)
        sdk = []
        if self.options.metrics_enabled and with_sdk:
            for metric in self.sdk_metrics.records():
                ts = metric["timestamp_unix_nano"] // 1_000_000
                if name and metric["name"] != name:
                    continue
                if start is not None and ts < start or end is not None and ts > end:
                    continue
                sdk.append(metric)
        result = {
            "engine_metrics": self.metrics.engine_metrics(),
            "sdk_metrics": sdk,
            "timestamp": self._now_ms(),
            "query": {"start_time": start, "end_time": end, "metric_name": name,
                      "aggregate_interval": interval},
        }
        if interval:
            result["aggregated_metrics"] = _rollups(sdk, interval)[0]
        return result

    def logs_list(self, data):
        fid = "engine::logs::list"
        data = _input(fid, data)
        _known_keys(fid, data, LOGS_LIST_KEYS)
        query = {
            "start_time": _field(fid, data, "start_time", (int,)),
            "end_time": _field(fid, data, "end_time", (int,)),
            "trace_id": _field(fid, data, "trace_id", (str,)),
            "span_id": _field(fid, data, "span_id", (str,)),
            "severity_min": _field(fid, data, "severity_min", (int,)),
            "severity_text": _field(fid, data, "severity_text", (str,)),
            "offset": _field(fid, data, "offset", (int,), 0),
            "limit": _field(fid, data, "limit", (int,)),
        }
        logs, total = list_logs(self.logs.records(), query)
        return {"logs": logs, "total": total, "query": query, "timestamp": self._now_ms()}

    def logs_clear(self, data):
        self.logs.clear()
        return {"success": True}

    def sampling_rules(self, data):
        return {"traces": self.sampler.describe(),
                "logs": {"sampling_ratio": self.options.logs_sampling_ratio},
                "timestamp": self._now_ms()}

    def health_check(self, data):
        o = self.options

        def component(enabled, details):
            return ({"status": "healthy", "details": details} if enabled
                    else {"status": "disabled", "details": None})
        components = {
            "otel": component(o.enabled, {
                "service_name": o.service_name, "exporter": o.exporter,
                "endpoint": o.endpoint if o.uses_otlp else None,
                "exporting": self.exporter is not None}),
            "metrics": component(o.metrics_enabled, {
                "sdk_metrics_stored": len(self.sdk_metrics),
                "max_count": o.metrics_max_count,
                "exporter": o.metrics_exporter}),
            "logs": component(o.logs_enabled, {
                "stored": len(self.logs), "max_count": o.logs_max_count,
                "exporter": o.logs_exporter}),
            "spans": component(self.spans is not None, self.spans is not None and {
                "stored": len(self.spans), "max_count": o.memory_max_spans}),
        }
        status = "healthy"
        directory = directory_of(self.engine)
        if directory is not None:
            # A cluster member whose directory (Redis) is unreachable, or that cannot
            # link to a member it knows (a wrong secret), still serves its own
            # workers: degraded, not down (iii_twisted.health).
            cluster = cluster_status(directory, unlinked_of(self.engine))
            if cluster["directory"] != "ok" or cluster.get("unlinked"):
                status = "degraded"
            components["cluster"] = {"status": "healthy" if status == "healthy"
                                     else "degraded", "details": cluster}
        return {
            "status": status,
            "components": components,
            "timestamp": self._now_ms(),
            "version": __version__,
        }

    # -- alerts ------------------------------------------------------------------------

    def _metric_value(self, name):
        values = self.metrics.alert_values()
        if name in values:
            return values[name]
        latest = None
        for metric in self.sdk_metrics.records():
            if metric["name"] == name:
                for point in metric["data_points"]:
                    if "value" in point:
                        latest = point["value"]
                    elif "sum" in point:
                        latest = point["sum"]
        return latest

    def _evaluate_alerts_tick(self):
        try:
            self.evaluate_alerts()
        except Exception:
            _log.failure("observability: alert evaluation failed")

    def evaluate_alerts(self):
        """@return: (number evaluated, list of the alerts that fired now)."""
        now = self.reactor.seconds()
        evaluated, fired = 0, []
        for alert in self.options.alerts:
            if not alert["enabled"]:
                continue
            evaluated += 1
            state = self._alert_state[alert["name"]]
            value = self._metric_value(alert["metric"])
            state["last_value"] = value
            firing = value is not None and _OPERATORS[alert["operator"]](
                value, alert["threshold"])
            state["firing"] = firing
            if not firing:
                continue
            last = state["last_triggered"]
            if last is not None and now - last < alert["cooldown_seconds"]:
                continue
            state["last_triggered"] = now
            event = {"name": alert["name"], "metric": alert["metric"], "value": value,
                     "threshold": alert["threshold"], "operator": alert["operator"],
                     "timestamp": int(now * 1000)}
            fired.append(event)
            self._alert_action(alert, event)
        return evaluated, fired

    def _alert_action(self, alert, event):
        action = alert["action"]
        if action["type"] == "function":
            self.engine.call(action["path"], event, VOID)
        elif action["type"] == "webhook":
            from treq.client import HTTPClient
            from twisted.web.client import Agent

            client = HTTPClient(Agent(self.reactor))
            client.post(action["url"], json=event, timeout=10).addCallbacks(
                lambda response: response.content(),
                lambda f: _log.warn("alert {name}: webhook failed: {error}",
                                    name=alert["name"], error=f.getErrorMessage()))
        _log.warn("alert {name} fired: {metric}={value} {operator} {threshold}", **event)

    def alerts_list(self, data):
        alerts = []
        for alert in self.options.alerts:
            state = self._alert_state[alert["name"]]
            last = state["last_triggered"]
            alerts.append(dict(alert, firing=state["firing"], last_value=state["last_value"],
                               last_triggered=None if last is None else int(last * 1000)))
        return {"alerts": alerts, "firing_count": sum(1 for a in alerts if a["firing"]),
                "timestamp": self._now_ms()}

    def alerts_evaluate(self, data):
        evaluated, fired = self.evaluate_alerts()
        return {"evaluated": evaluated, "triggered_alerts": fired,
                "timestamp": self._now_ms()}

    # -- rollups -----------------------------------------------------------------------

    def rollups_list(self, data):
        fid = "engine::rollups::list"
        data = _input(fid, data)
        level = _field(fid, data, "level", (int,), 0)
        if level >= len(_ROLLUP_LEVELS):
            raise _bad_input(fid, "level must be 0 (1 min), 1 (5 min) or 2 (1 h)")
        start = _field(fid, data, "start_time", (int,))
        end = _field(fid, data, "end_time", (int,))
        name = _field(fid, data, "metric_name", (str,))
        metrics = [m for m in self.sdk_metrics.records()
                   if (not name or m["name"] == name)
                   and (start is None or m["timestamp_unix_nano"] // 1_000_000 >= start)
                   and (end is None or m["timestamp_unix_nano"] // 1_000_000 <= end)]
        rollups, histograms = _rollups(metrics, _ROLLUP_LEVELS[level])
        return {"rollups": rollups, "histogram_rollups": histograms, "level": level,
                "query": {"start_time": start, "end_time": end, "metric_name": name,
                          "level": level},
                "timestamp": self._now_ms()}


def _rollups(metrics, interval):
    """@return: (value rollups, histogram rollups) of metric dicts per time window."""
    values, histograms = {}, {}
    width = interval * 1_000_000_000
    for metric in metrics:
        for point in metric["data_points"]:
            window = point["timestamp_unix_nano"] // width * width // 1_000_000
            key = (metric["name"], window)
            if "bucket_counts" in point or metric["metric_type"] == "histogram":
                h = histograms.setdefault(key, {"metric_name": metric["name"],
                                                "window_start": window,
                                                "interval_seconds": interval,
                                                "count": 0, "sum": 0.0})
                h["count"] += point.get("count", 0)
                h["sum"] += point.get("sum", 0.0)
            elif "value" in point:
                v = point["value"]
                r = values.get(key)
                if r is None:
                    r = values[key] = {"metric_name": metric["name"], "window_start": window,
                                       "interval_seconds": interval, "count": 0,
                                       "sum": 0.0, "min": v, "max": v}
                r["count"] += 1
                r["sum"] += v
                r["min"] = min(r["min"], v)
                r["max"] = max(r["max"], v)
                r["avg"] = r["sum"] / r["count"]
    return list(values.values()), list(histograms.values())


# Seed configs name it ObservabilityModule.
ObservabilityModule = OtelModule
