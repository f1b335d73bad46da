"""
Decoding the OTLP JSON that workers send in binary telemetry frames.

- ``OTLP`` + ExportTraceServiceRequest: ``{"resourceSpans": [{"resource":
  {"attributes": [...]}, "scopeSpans": [{"scope": {...}, "spans": [...]}]}]}``
- ``LOGS`` + ExportLogsServiceRequest: ``resourceLogs`` / ``scopeLogs`` /
  ``logRecords``
- ``MTRC`` + ExportMetricsServiceRequest: ``resourceMetrics`` / ``scopeMetrics`` /
  ``metrics`` (``gauge``, ``sum``, ``histogram``, ``exponentialHistogram``,
  ``summary``)

This is the JSON encoding of the OTLP protobufs: trace and span ids are lowercase hex
(base64, as protobuf's generic JSON mapping writes them, is accepted too), 64-bit
integers may be strings, enums are numbers (or their names). What the iii SDKs send
is in ``iii/telemetry_exporters.py`` of the Python SDK.

A frame that is not JSON, not an object or not shaped like its request raises
L{TelemetryDecodeError}; inside a well-formed frame, an item that is malformed (a span
without ids, say) is skipped and counted, and the rest is kept.
"""

import base64
import binascii
import json
import math

from ..protocol import read_json
from .storage import (
    STATUS_ERROR, STATUS_OK, STATUS_UNSET, Limits, SpanRecord, log_record,
)

_DEFAULT_LIMITS = Limits()

_STATUS = {0: STATUS_UNSET, 1: STATUS_OK, 2: STATUS_ERROR,
           "STATUS_CODE_UNSET": STATUS_UNSET, "STATUS_CODE_OK": STATUS_OK,
           "STATUS_CODE_ERROR": STATUS_ERROR}

_SEVERITY_NAMES = {
    "SEVERITY_NUMBER_TRACE": 1, "SEVERITY_NUMBER_DEBUG": 5, "SEVERITY_NUMBER_INFO": 9,
    "SEVERITY_NUMBER_WARN": 13, "SEVERITY_NUMBER_ERROR": 17, "SEVERITY_NUMBER_FATAL": 21,
}


class TelemetryDecodeError(ValueError):
    """A telemetry frame that is not the OTLP JSON request its prefix announces."""


class Decoded:
    """
    What one frame held.

    @ivar records: the decoded records (L{SpanRecord}s, StoredLog dicts, or metric
        dicts).
    @ivar skipped: how many items inside the frame were malformed and skipped.
    """

    __slots__ = ("records", "skipped")

    def __init__(self):
        self.records = []
        self.skipped = 0


# -- helpers ---------------------------------------------------------------------------


def _load(payload, top_key):
    try:
        body, nonfinite = read_json(payload)
    except ValueError as e:  # includes UnicodeDecodeError
        raise TelemetryDecodeError("not UTF-8 JSON: {}".format(e))
    except RecursionError:
        raise TelemetryDecodeError("JSON nested too deeply")
    if nonfinite:  # OTLP JSON writes non-finite doubles as strings, never as tokens
        raise TelemetryDecodeError("NaN and Infinity are not JSON")
    if not isinstance(body, dict):
        raise TelemetryDecodeError("the body is not a JSON object")
    items = body.get(top_key)
    if items is None:
        items = []
    if not isinstance(items, list):
        raise TelemetryDecodeError("{} is not a list".format(top_key))
    if not items and top_key not in body:
        raise TelemetryDecodeError("no {} in the body".format(top_key))
    return items


def _list(mapping, *keys):
    for key in keys:
        value = mapping.get(key)
        if value is not None:
            if not isinstance(value, list):
                raise ValueError("{} is not a list".format(key))
            return value
    return []


def _int(value, default=0):
    if value is None:
        return default
    if isinstance(value, bool):
        raise ValueError("boolean where an integer was expected")
    if isinstance(value, (int, float)):
        return int(value)
    return int(value, 10)


def _hex_id(value, length):
    """@return: a lowercase hex id of C{length} characters, or None when empty."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("id is not a string")
    if len(value) == length:
        try:
            int(value, 16)
            return value.lower()
        except ValueError:
            pass
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("id {!r} is neither hex nor base64".format(value[:64]))
    if len(raw) * 2 != length:
        raise ValueError("id {!r} has the wrong length".format(value[:64]))
    return raw.hex()


def _cut(text, limits):
    return text if len(text) <= limits.string else text[:limits.string]


def _double(value):
    """
    @return: an OTLP JSON double (a number, or a string such as ``"1.5"``) as a finite
        float, or None for NaN and infinities (OTLP JSON writes those as the strings
        ``"NaN"`` and ``"Infinity"``): what is stored is read back as JSON, which has
        no such values.
    @raise ValueError: for a value that is not a number.
    @raise TypeError: for a value of another type.
    """
    number = float(value)
    return number if math.isfinite(number) else None


def any_value(value, limits=_DEFAULT_LIMITS, depth=0):
    """@return: the Python value of an OTLP AnyValue JSON object."""
    if not isinstance(value, dict) or depth > 8:
        return None
    if "stringValue" in value:
        return _cut(str(value["stringValue"]), limits)
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        return _int(value["intValue"])
    if "doubleValue" in value:
        v = value["doubleValue"]
        return _double(v) if isinstance(v, (int, float, str)) else None
    if "arrayValue" in value:
        values = (value["arrayValue"] or {}).get("values") or []
        return [any_value(v, limits, depth + 1) for v in values[:limits.attributes]]
    if "kvlistValue" in value:
        return attributes((value["kvlistValue"] or {}).get("values"), limits, depth + 1)
    if "bytesValue" in value:
        return _cut(str(value["bytesValue"]), limits)
    return None


def attributes(items, limits=_DEFAULT_LIMITS, depth=0):
    """@return: a dict of an OTLP KeyValue list (at most C{limits.attributes} keys)."""
    result = {}
    if not isinstance(items, list):
        return result
    for item in items[:limits.attributes]:
        if isinstance(item, dict) and isinstance(item.get("key"), str):
            result[_cut(item["key"], limits)] = any_value(item.get("value"), limits, depth)
    return result


def _as_text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":"))


def attribute_pairs(items, limits=_DEFAULT_LIMITS):
    """@return: ``[[key, value-as-text], ...]``, as StoredSpan attributes are shown."""
    return [[key, _as_text(value)] for key, value in attributes(items, limits).items()]


def _service(resource_attrs):
    name = resource_attrs.get("service.name")
    return name if isinstance(name, str) and name else "unknown"


def _scope(scope_holder):
    scope = scope_holder.get("scope") or scope_holder.get("instrumentationLibrary") or {}
    if not isinstance(scope, dict):
        return None, None
    return scope.get("name"), scope.get("version")


# -- traces ----------------------------------------------------------------------------


def _decode(payload, top_key, scope_keys, item_key, limits, make):
    """
    Walk an OTLP JSON export request: resources, their scopes, their items.

    A resource, scope or item that cannot be read is counted in C{skipped} and the walk
    goes on with the next one.

    @param top_key: the request's list of resources (``resourceSpans``, ...).
    @param scope_keys: the names of a resource's list of scopes, current name first.
    @param item_key: the name of a scope's list of items (``spans``, ...).
    @param make: C{make(item, resource attributes, service name, scope name, scope
        version)} returning one decoded record.
    @return: a L{Decoded}.
    @raise TelemetryDecodeError: for a payload that is not such a request.
    """
    decoded = Decoded()
    for resource_items in _load(payload, top_key):
        try:
            resource = attributes((resource_items.get("resource") or {}).get("attributes"),
                                  limits)
            scopes = _list(resource_items, *scope_keys)
        except (AttributeError, ValueError, TypeError):
            decoded.skipped += 1
            continue
        service = _service(resource)
        for scope_items in scopes:
            try:
                scope_name, scope_version = _scope(scope_items)
                items = _list(scope_items, item_key)
            except (AttributeError, ValueError, TypeError):
                decoded.skipped += 1
                continue
            for item in items:
                try:
                    decoded.records.append(
                        make(item, resource, service, scope_name, scope_version))
                except (AttributeError, ValueError, TypeError, KeyError):
                    decoded.skipped += 1
    return decoded


def decode_traces(payload, limits=_DEFAULT_LIMITS):
    """
    @return: a L{Decoded} of L{SpanRecord}s.
    @raise TelemetryDecodeError: for a frame that is not an ExportTraceServiceRequest.
    """
    return _decode(
        payload, "resourceSpans", ("scopeSpans", "instrumentationLibrarySpans"), "spans",
        limits, lambda span, resource, service, scope_name, scope_version: _span(
            span, service, scope_name, scope_version, limits))


def _span(span, service, scope_name, scope_version, limits):
    trace_id = _hex_id(span["traceId"], 32)
    span_id = _hex_id(span["spanId"], 16)
    if trace_id is None or span_id is None:
        raise ValueError("span without ids")
    status = span.get("status") or {}
    code = status.get("code", 0)
    events = []
    for event in _list(span, "events")[:limits.events]:
        events.append({
            "name": _cut(str(event.get("name", "")), limits),
            "timestamp_unix_nano": _int(event.get("timeUnixNano")),
            "attributes": attribute_pairs(event.get("attributes"), limits),
        })
    links = []
    for link in _list(span, "links")[:limits.events]:
        links.append({
            "trace_id": _hex_id(link.get("traceId"), 32),
            "span_id": _hex_id(link.get("spanId"), 16),
            "attributes": attribute_pairs(link.get("attributes"), limits),
        })
    flags = span.get("flags")
    return SpanRecord(
        trace_id, span_id, _hex_id(span.get("parentSpanId"), 16),
        _cut(str(span.get("name", "")), limits),
        _int(span.get("startTimeUnixNano")), _int(span.get("endTimeUnixNano")),
        _STATUS.get(code, STATUS_UNSET), status.get("message") or None,
        attribute_pairs(span.get("attributes"), limits), service, events, links,
        scope_name, scope_version, _int(flags) if flags is not None else None,
        _kind(span.get("kind")),
    )


_KINDS = {"SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2,
          "SPAN_KIND_CLIENT": 3, "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5}


def _kind(value):
    if isinstance(value, str) and value in _KINDS:
        return _KINDS[value]
    try:
        return _int(value)
    except (ValueError, TypeError):
        return 0


# -- logs ------------------------------------------------------------------------------


def decode_logs(payload, observed_ns, limits=_DEFAULT_LIMITS):
    """
    @param observed_ns: the arrival time, for records without an observed timestamp.
    @return: a L{Decoded} of StoredLog dicts.
    @raise TelemetryDecodeError: for a frame that is not an ExportLogsServiceRequest.
    """
    return _decode(
        payload, "resourceLogs", ("scopeLogs", "instrumentationLibraryLogs"), "logRecords",
        limits, lambda record, resource, service, scope_name, scope_version: _log(
            record, resource, service, scope_name, scope_version, observed_ns, limits))


def _log(record, resource, service, scope_name, scope_version, observed_ns, limits):
    if not isinstance(record, dict):
        raise ValueError("log record is not an object")
    severity = record.get("severityNumber", 0)
    if isinstance(severity, str):
        severity = _SEVERITY_NAMES.get(severity) or _int(severity)
    timestamp = _int(record.get("timeUnixNano")) or _int(record.get("observedTimeUnixNano"))
    observed = _int(record.get("observedTimeUnixNano")) or observed_ns
    body = any_value(record.get("body"), limits)
    attrs = attributes(record.get("attributes"), limits)
    log_service = attrs.get("service.name")
    return log_record(
        timestamp or observed, observed, int(severity),
        _cut(str(record.get("severityText") or ""), limits),
        body, attrs, _hex_id(record.get("traceId"), 32), _hex_id(record.get("spanId"), 16),
        {k: v for k, v in resource.items()},
        log_service if isinstance(log_service, str) and log_service else service,
        scope_name, scope_version,
    )


# -- metrics ---------------------------------------------------------------------------

_METRIC_KINDS = ("gauge", "sum", "histogram", "exponentialHistogram", "summary")


def decode_metrics(payload, limits=_DEFAULT_LIMITS):
    """
    @return: a L{Decoded} of metric dicts: ``{name, description, unit, metric_type,
        data_points, service_name, resource, instrumentation_scope_name,
        timestamp_unix_nano}`` (the newest point's time).
    @raise TelemetryDecodeError: for a frame that is not an
        ExportMetricsServiceRequest.
    """
    return _decode(
        payload, "resourceMetrics", ("scopeMetrics", "instrumentationLibraryMetrics"),
        "metrics", limits, lambda metric, resource, service, scope_name, _: _metric(
            metric, resource, service, scope_name, limits))


def _metric(metric, resource, service, scope_name, limits):
    name = metric["name"]
    if not isinstance(name, str) or not name:
        raise ValueError("metric without a name")
    for kind in _METRIC_KINDS:
        data = metric.get(kind)
        if data is not None:
            break
    else:
        raise ValueError("metric {} has no data".format(name))
    points = []
    newest = 0
    for point in _list(data, "dataPoints")[:limits.data_points]:
        p = {
            "attributes": attributes(point.get("attributes"), limits),
            "start_time_unix_nano": _int(point.get("startTimeUnixNano")),
            "timestamp_unix_nano": _int(point.get("timeUnixNano")),
        }
        newest = max(newest, p["timestamp_unix_nano"])
        if "asDouble" in point:
            p["value"] = _double(point["asDouble"])
        elif "asInt" in point:
            p["value"] = _int(point["asInt"])
        if kind in ("histogram", "exponentialHistogram", "summary"):
            p["count"] = _int(point.get("count"))
            if point.get("sum") is not None:
                p["sum"] = _double(point["sum"])
            if kind == "histogram":
                p["bucket_counts"] = [_int(c) for c in point.get("bucketCounts") or []][:256]
                p["explicit_bounds"] = [
                    _double(b) for b in point.get("explicitBounds") or []][:256]
            for key in ("min", "max"):
                if point.get(key) is not None:
                    p[key] = _double(point[key])
        points.append(p)
    result = {
        "name": _cut(name, limits),
        "description": _cut(str(metric.get("description") or ""), limits),
        "unit": _cut(str(metric.get("unit") or ""), limits),
        "metric_type": {"exponentialHistogram": "exponential_histogram"}.get(kind, kind),
        "data_points": points,
        "service_name": service,
        "resource": resource,
        "instrumentation_scope_name": scope_name,
        "timestamp_unix_nano": newest,
    }
    if kind == "sum":
        result["is_monotonic"] = bool(data.get("isMonotonic", False))
    return result
