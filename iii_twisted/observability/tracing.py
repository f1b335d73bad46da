"""
The engine's span for every routed call, joined to the caller's W3C ``traceparent``.

L{CallTracer} is the L{ICallObserver} the observability module adds to the engine.
For each call it

1. takes the caller's ``traceparent`` (``00-<trace id>-<parent span id>-<flags>``) if
   there is a valid one, else starts a new trace;
2. asks the L{Sampler} whether to record this span (parent-based by default: a caller
   that sampled its span gets ours recorded, one that did not does not);
3. replaces the call's ``traceparent`` with the engine span's own context, so the
   worker that runs the function makes its span a child of the engine's;
4. when the call ends, records the latency and outcome in the engine metrics and,
   when sampled, hands the finished L{SpanRecord} to the module (memory store and/or
   OTLP export).

Everything here runs on the reactor thread for every call, so it does as little as it
can: no OpenTelemetry SDK objects, no dict building until a span is read.
"""

import re
from fnmatch import fnmatchcase
from random import Random

from zope.interface import implementer

from ..interfaces import ICallObserver
from .storage import SPAN_KIND_SERVER, STATUS_ERROR, STATUS_OK, SpanRecord

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_RULE_CACHE = 4096

_random = Random()
_bits = _random.getrandbits


def new_trace_id():
    """@return: a random 32-hex-digit trace id (never all zeros)."""
    return "%032x" % (_bits(128) or 1)


def new_span_id():
    """@return: a random 16-hex-digit span id (never all zeros)."""
    return "%016x" % (_bits(64) or 1)


def parse_traceparent(value):
    """
    @return: C{(trace_id, span_id, sampled)} of a valid W3C traceparent header, or
        None for a missing or malformed one (version ``ff`` and all-zero ids are
        invalid).
    """
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if version == "00" and len(value.strip()) != 55:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id, span_id, sampled):
    """@return: the W3C traceparent header for a span context."""
    return "00-" + trace_id + "-" + span_id + ("-01" if sampled else "-00")


class Sampler:
    """
    Decides which engine spans are recorded.

    - C{parent_based} (default true): a call whose caller sent a valid traceparent
      follows the caller's sampled flag.
    - Otherwise the ratio applies: the first rule whose ``operation`` (a glob on the
      function id) and ``service`` (a glob on the engine's service name) match gives
      it, else C{default}. The decision is a function of the trace id (as
      OpenTelemetry's TraceIdRatioBased), so every engine in a trace agrees.
    - C{max_traces_per_second} (optional) caps the new traces sampled, with a token
      bucket on the injected clock.
    """

    def __init__(self, clock, default=1.0, rules=(), parent_based=True,
                 max_traces_per_second=None, service_name="iii"):
        self._clock = clock
        self.default = default
        self.rules = list(rules)
        self.parent_based = parent_based
        self.max_traces_per_second = max_traces_per_second
        self._service = service_name
        self._ratio_cache = {}
        self._tokens = float(max_traces_per_second or 0)
        self._refilled = None

    def ratio_for(self, function_id):
        """@return: the sampling ratio that applies to calls of C{function_id}."""
        ratio = self._ratio_cache.get(function_id)
        if ratio is None:
            ratio = self.default
            for rule in self.rules:
                operation, service = rule.get("operation"), rule.get("service")
                if operation is not None and not fnmatchcase(function_id, operation):
                    continue
                if service is not None and not fnmatchcase(self._service, service):
                    continue
                ratio = rule["rate"]
                break
            if len(self._ratio_cache) >= _MAX_RULE_CACHE:
                self._ratio_cache.clear()
            self._ratio_cache[function_id] = ratio
        return ratio

    def should_sample(self, function_id, trace_id, parent_sampled):
        """
        @param parent_sampled: the caller's flag, or None when there is no caller span.
        @return: True to record the span.
        """
        if parent_sampled is not None and self.parent_based:
            return parent_sampled
        ratio = self.ratio_for(function_id)
        if ratio < 1.0:
            if ratio <= 0.0 or int(trace_id[16:], 16) >= ratio * 18446744073709551616:
                return False
        if self.max_traces_per_second and parent_sampled is None:
            return self._take_token()
        return True

    def _take_token(self):
        now = self._clock.seconds()
        rate = float(self.max_traces_per_second)
        if self._refilled is not None:
            self._tokens = min(rate, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def describe(self):
        """@return: the ``traces`` part of engine::sampling::rules."""
        return {
            "default_ratio": self.default,
            "rules": [dict(rule) for rule in self.rules],
            "parent_based": self.parent_based,
            "rate_limit": ({"max_traces_per_second": self.max_traces_per_second}
                           if self.max_traces_per_second else None),
        }


@implementer(ICallObserver)
class CallTracer:
    """
    The L{ICallObserver} of the observability module.

    @param metrics: the L{iii_twisted.observability.metrics.EngineMetrics} that every
        finished call is recorded in.
    @param on_span: called with each finished, sampled L{SpanRecord}; None disables
        tracing (metrics only).
    @param trace_internal: also trace calls of ``engine::*`` functions (the telemetry
        read functions among them); off by default, their spans would crowd out the
        application's in a bounded store.
    """

    def __init__(self, clock, metrics, sampler, on_span=None, service_name="iii",
                 trace_internal=False):
        self._seconds = clock.seconds
        self._metrics = metrics
        self._sampler = sampler
        self._on_span = on_span
        self._service = service_name
        self._trace_internal = trace_internal

    def call_started(self, call):
        start = self._seconds()
        function_id = call.function_id
        record = self._metrics.record
        self._metrics.in_flight += 1  # record() counts it down
        span = None
        if self._on_span is not None and (
                self._trace_internal or not function_id.startswith("engine::")):
            parent = parse_traceparent(call.traceparent) if call.traceparent else None
            if parent is None:
                trace_id, parent_id, parent_sampled = new_trace_id(), None, None
            else:
                trace_id, parent_id, parent_sampled = parent
            span_id = new_span_id()
            sampled = self._sampler.should_sample(function_id, trace_id, parent_sampled)
            call.traceparent = format_traceparent(trace_id, span_id, sampled)
            if sampled:
                span = (trace_id, span_id, parent_id)

        def finish(result, error):
            end = self._seconds()
            record(function_id, end - start, error)
            if span is not None:
                self._finish_span(span, call, start, end, error)
        return finish

    def _finish_span(self, span, call, start, end, error):
        trace_id, span_id, parent_id = span
        attributes = [["iii.function_id", call.function_id],
                      ["iii.invocation_id", call.invocation_id]]
        if call.caller_id is not None:
            attributes.append(["iii.caller_worker_id", call.caller_id])
        if error is not None:
            attributes.append(["error.type", getattr(error, "code", "error")])
        self._on_span(SpanRecord(
            trace_id, span_id, parent_id, "call " + call.function_id,
            int(start * 1e9), int(end * 1e9),
            STATUS_ERROR if error is not None else STATUS_OK,
            getattr(error, "message", None) if error is not None else None,
            attributes, self._service, (), (), "iii-twisted", None, 1, SPAN_KIND_SERVER,
            call.function_id.startswith("engine::"),
        ))
