"""
Observability for the engine: what ``modules::observability::OtelModule`` is made of.

- L{iii_twisted.observability.otlp}: decoding the OTLP JSON that workers send in
  ``OTLP``/``LOGS``/``MTRC`` binary frames into stored records.
- L{iii_twisted.observability.storage}: the bounded memory stores (count and age) and
  the record types (spans, logs, metric batches) with their query helpers.
- L{iii_twisted.observability.tracing}: W3C ``traceparent`` handling, the sampler and
  the call observer that gives every routed call an engine span.
- L{iii_twisted.observability.metrics}: the engine's own metrics (calls, errors,
  latency histograms, workers, queue depths) and their Prometheus text exposition.
- L{iii_twisted.observability.engine_logs}: the engine's own log lines, captured from
  C{twisted.logger} into the log store.
- L{iii_twisted.observability.worker_gauges}: the resource gauges npm workers report,
  kept per connected worker for ``latest_metrics`` in ``engine::workers::list``.
- L{iii_twisted.observability.export}: export to an OpenTelemetry collector through
  the OpenTelemetry Python SDK (optional dependency, the ``otel`` extra).
"""
