"""
An official ``iii-sdk[otel]`` worker in a process of its own, for
test_observability.py. OpenTelemetry's tracer provider is global and can be set only
once per process, so the SDK's telemetry cannot be tested reliably inside the pytest
process (any earlier SDK worker would own it).

Run as ``python otel_worker.py ENGINE_URL`` with ``III_URL`` set to the same URL
(that is where the SDK's telemetry socket connects). It registers ``otel::work``,
whose handler logs through ``iii.Logger``; then it reads commands on stdin and
answers each with one JSON line on stdout:

- ``call``: inside a client span ``client-root``, trigger ``otel::work``; answers
  ``{"trace_id", "span_id", "result"}`` of the client span;
- ``flush``: force-flush the SDK's span and log processors (they hand their frames
  to the telemetry socket); answers ``{"flushed": true}``;
- ``exit``: shut the worker down.
"""

import json
import sys

from iii import InitOptions, Logger, register_worker
from opentelemetry import _logs, trace


def answer(value):
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def main(url):
    worker = register_worker(url, InitOptions(worker_name="otel-worker"))
    logger = Logger()

    # async: the SDK runs a sync handler in a thread pool, outside its handler span's
    # context, so a sync handler's logs would carry no trace id.
    async def work(data):
        logger.info("handling work", {"n": data.get("n")})
        return {"done": True, "n": data.get("n")}

    worker.register_function({"id": "otel::work"}, work)
    answer({"ready": True})
    tracer = trace.get_tracer("otel-interop-client")
    for line in sys.stdin:
        command = line.strip()
        if command == "call":
            with tracer.start_as_current_span("client-root") as span:
                result = worker.trigger({"function_id": "otel::work", "payload": {"n": 7},
                                         "timeout_ms": 10000})
                context = span.get_span_context()
            answer({"trace_id": format(context.trace_id, "032x"),
                    "span_id": format(context.span_id, "016x"), "result": result})
        elif command == "flush":
            trace.get_tracer_provider().force_flush()
            _logs.get_logger_provider().force_flush()
            answer({"flushed": True})
        elif command == "exit":
            break
    worker.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
