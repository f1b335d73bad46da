"""
Export to an OpenTelemetry collector (OTLP) through the OpenTelemetry Python SDK.

The SDK's exporters do blocking network I/O; none of it runs on the reactor thread:

- spans go to a C{BatchSpanProcessor} (its own worker thread); the reactor thread only
  builds a C{ReadableSpan} and appends it to the processor's queue (bounded by
  C{max_queue_size}: past it the SDK drops spans rather than grow);
- logs go to a C{BatchLogRecordProcessor} the same way;
- metrics are read by a C{PeriodicExportingMetricReader} (its own thread) from
  observable instruments whose callbacks copy the engine's counters;
- C{shutdown()} (which flushes and joins those threads) is called by the module from
  a thread-pool thread, never the reactor thread.

Both engine spans and the spans workers send over their telemetry socket are
exported, each with its own ``service.name`` resource, so the collector sees whole
traces.

The SDK and exporters are an optional dependency (``pip install iii-twisted[otel]``);
L{require_sdk} gives a clear error when they are missing.
"""

from twisted.logger import Logger

from .storage import STATUS_ERROR, STATUS_OK

_log = Logger()

PROTOCOLS = ("http/protobuf", "grpc")


class ExporterUnavailable(Exception):
    """The OpenTelemetry SDK or the exporter for the chosen protocol is not installed."""


def require_sdk(protocol):
    """
    Check that the SDK and the exporter for C{protocol} can be imported.

    @raise ExporterUnavailable: naming what to install.
    """
    try:
        import opentelemetry.sdk.trace  # noqa: F401

        if protocol == "grpc":
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        else:
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except ImportError as e:
        package = ("opentelemetry-exporter-otlp-proto-grpc" if protocol == "grpc"
                   else "opentelemetry-exporter-otlp-proto-http")
        raise ExporterUnavailable(
            "exporting OTLP needs opentelemetry-sdk and {} ({}); install "
            "iii-twisted[otel]".format(package, e))


def _signal_endpoint(endpoint, protocol, path):
    if protocol == "grpc":
        return endpoint
    return endpoint.rstrip("/") + path


class OtlpExporter:
    """
    Sends engine telemetry to a collector. Build it in C{startService} (it starts
    threads); call L{shutdown} from a thread when the module stops.
    """

    def __init__(self, endpoint, protocol="http/protobuf", headers=None, resource=None,
                 traces=True, logs=False, metrics=None, export_interval_ms=5000,
                 metrics_interval_ms=60000, timeout=10.0, max_queue_size=2048):
        """
        @param resource: the engine's resource attributes (``service.name``, ...).
        @param metrics: an L{iii_twisted.observability.metrics.EngineMetrics} to
            export, or None not to export metrics.
        """
        require_sdk(protocol)
        from opentelemetry.sdk.resources import Resource

        self._protocol = protocol
        self._resource_attrs = dict(resource or {})
        self._engine_resource = Resource.create(self._resource_attrs)
        self._resources = {}
        self._span_processor = None
        self._log_processor = None
        self._logger_provider = None
        self._meter_provider = None
        kwargs = {"endpoint": None, "headers": dict(headers or {}), "timeout": timeout}
        if traces:
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
            kwargs["endpoint"] = _signal_endpoint(endpoint, protocol, "/v1/traces")
            from opentelemetry.sdk.trace import Event, ReadableSpan
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace import (
                Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags,
            )
            self._span_api = (Event, ReadableSpan, InstrumentationScope, Link, SpanContext,
                              SpanKind, Status, StatusCode, TraceFlags(TraceFlags.SAMPLED))
            self._span_processor = BatchSpanProcessor(
                OTLPSpanExporter(**kwargs), max_queue_size=max_queue_size,
                schedule_delay_millis=export_interval_ms)
        if logs:
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
                    OTLPLogExporter,
                )
            else:
                from opentelemetry.exporter.otlp.proto.http._log_exporter import (
                    OTLPLogExporter,
                )
            kwargs["endpoint"] = _signal_endpoint(endpoint, protocol, "/v1/logs")
            self._log_processor = BatchLogRecordProcessor(
                OTLPLogExporter(**kwargs), max_queue_size=max_queue_size,
                schedule_delay_millis=export_interval_ms)
            self._logger_provider = LoggerProvider(resource=self._engine_resource)
            self._logger_provider.add_log_record_processor(self._log_processor)
            self._loggers = {}
        if metrics is not None:
            self._start_metrics(metrics, endpoint, protocol, dict(kwargs),
                                metrics_interval_ms)

    # -- spans -------------------------------------------------------------------------

    def _resource(self, service_name):
        from opentelemetry.sdk.resources import Resource

        if service_name == self._resource_attrs.get("service.name"):
            return self._engine_resource
        resource = self._resources.get(service_name)
        if resource is None:
            if len(self._resources) >= 256:
                self._resources.clear()
            resource = self._resources[service_name] = Resource.create(
                {"service.name": service_name})
        return resource

    def export_span(self, record):
        """Queue one L{SpanRecord} for export (cheap; never blocks)."""
        if self._span_processor is None:
            return
        (Event, ReadableSpan, InstrumentationScope, Link, SpanContext, SpanKind, Status,
         StatusCode, sampled) = self._span_api
        context = SpanContext(int(record.trace_id, 16), int(record.span_id, 16), False,
                              sampled)
        parent = None
        if record.parent_span_id:
            parent = SpanContext(int(record.trace_id, 16), int(record.parent_span_id, 16),
                                 True, sampled)
        if record.status == STATUS_OK:
            status = Status(StatusCode.OK)
        elif record.status == STATUS_ERROR:
            status = Status(StatusCode.ERROR, record.status_description)
        else:
            status = Status(StatusCode.UNSET)
        try:
            kind = SpanKind(record.kind - 1) if record.kind else SpanKind.INTERNAL
        except ValueError:
            kind = SpanKind.INTERNAL
        links = []
        for link in record.links:
            if link.get("trace_id") and link.get("span_id"):
                links.append(Link(SpanContext(int(link["trace_id"], 16),
                                              int(link["span_id"], 16), True),
                                  dict(link.get("attributes") or ())))
        span = ReadableSpan(
            name=record.name, context=context, parent=parent,
            resource=self._resource(record.service_name),
            attributes=dict(record.attributes),
            events=[Event(e["name"], dict(e.get("attributes") or ()),
                          e.get("timestamp_unix_nano") or None) for e in record.events],
            links=links, kind=kind, status=status,
            start_time=record.start_ns, end_time=record.end_ns,
            instrumentation_scope=InstrumentationScope(record.scope_name or "iii-twisted",
                                                       record.scope_version),
        )
        self._span_processor.on_end(span)

    # -- logs --------------------------------------------------------------------------

    def export_log(self, log):
        """Queue one StoredLog dict for export (cheap; never blocks)."""
        if self._logger_provider is None:
            return
        from opentelemetry import trace
        from opentelemetry._logs import SeverityNumber

        context = None
        if log.get("trace_id") and log.get("span_id"):
            context = trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
                int(log["trace_id"], 16), int(log["span_id"], 16), True,
                trace.TraceFlags(trace.TraceFlags.SAMPLED))))
        try:
            severity = SeverityNumber(log.get("severity_number") or 0)
        except ValueError:
            severity = SeverityNumber.UNSPECIFIED
        service = log.get("service_name") or "unknown"
        logger = self._loggers.get(service)
        if logger is None:
            if len(self._loggers) >= 256:
                self._loggers.clear()
            logger = self._loggers[service] = self._logger_provider.get_logger(
                service)
        attributes = {k: v for k, v in (log.get("attributes") or {}).items()
                      if isinstance(v, (str, bool, int, float))}
        body = log.get("body")
        logger.emit(
            timestamp=log.get("timestamp_unix_nano") or None,
            observed_timestamp=log.get("observed_timestamp_unix_nano") or None,
            context=context, severity_number=severity,
            severity_text=log.get("severity_text") or None,
            body=body if isinstance(body, (str, bool, int, float)) or body is None
            else str(body),
            attributes=attributes,
        )

    # -- metrics -----------------------------------------------------------------------

    def _start_metrics(self, metrics, endpoint, protocol, kwargs, interval_ms):
        from opentelemetry.metrics import Observation
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
        kwargs["endpoint"] = _signal_endpoint(endpoint, protocol, "/v1/metrics")
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(**kwargs),
                                               export_interval_millis=interval_ms)
        self._meter_provider = MeterProvider(resource=self._engine_resource,
                                             metric_readers=[reader])
        meter = self._meter_provider.get_meter("iii-twisted")

        # The callbacks run on the reader's thread: they copy (list(...) of a dict
        # of plain objects is one step under the GIL) and never call into the engine
        # beyond reading.
        def calls(options):
            return [Observation(stats.calls, {"function_id": fid})
                    for fid, stats in list(metrics.functions.items())]

        def errors(options):
            return [Observation(stats.errors, {"function_id": fid})
                    for fid, stats in list(metrics.functions.items())]

        def duration_sum(options):
            return [Observation(stats.total_seconds, {"function_id": fid})
                    for fid, stats in list(metrics.functions.items())]

        def workers(options):
            return [Observation(metrics.active_workers)]

        meter.create_observable_counter("iii.invocations", [calls], unit="{call}",
                                        description="Calls routed by the engine")
        meter.create_observable_counter("iii.invocations.errors", [errors],
                                        unit="{call}", description="Calls that failed")
        meter.create_observable_counter("iii.invocations.duration", [duration_sum],
                                        unit="s", description="Total call time")
        meter.create_observable_gauge("iii.workers.active", [workers], unit="{worker}",
                                      description="Connected workers")

    # -- lifecycle ---------------------------------------------------------------------

    def force_flush(self, timeout_millis=10000):
        """Export what is queued now (blocking: call from a thread). @return: None."""
        for thing in (self._span_processor, self._logger_provider, self._meter_provider):
            if thing is not None:
                try:
                    thing.force_flush(timeout_millis)
                except Exception:
                    _log.failure("OTLP flush failed")

    def shutdown(self):
        """Flush and stop the export threads (blocking: call from a thread)."""
        for thing in (self._meter_provider, self._span_processor, self._logger_provider):
            if thing is not None:
                try:
                    thing.shutdown()
                except Exception:
                    _log.failure("OTLP exporter shutdown failed")
