"""
Bounded in-memory storage of telemetry, and the record types it holds.

Every store is bounded twice, never by luck: by count (a C{deque} with an explicit
C{maxlen}, so the oldest record goes when a new one arrives) and by age (records older
than the retention are dropped on every insert and every read, and by the module's
periodic sweep). Ages are measured with the injected clock, by arrival time, so a
worker that sends timestamps from the future cannot keep records alive.

Single records are bounded too (L{Limits}): attribute counts, events, links and string
lengths are cut to size when a record is decoded, so one huge frame cannot hold more
than C{max_count} records of bounded size.
"""

from collections import deque

# Span status strings, as StoredSpan shows them.
STATUS_UNSET = "unset"
STATUS_OK = "ok"
STATUS_ERROR = "error"

SPAN_KIND_SERVER = 2


class Limits:
    """
    Per-record size bounds applied while decoding.

    @ivar attributes: attributes kept per span, log, event, link or data point.
    @ivar events: events kept per span (links too).
    @ivar string: characters kept per string value (longer ones are cut).
    @ivar data_points: data points kept per metric.
    """

    def __init__(self, attributes=128, events=128, string=4096, data_points=1000):
        self.attributes = attributes
        self.events = events
        self.string = string
        self.data_points = data_points


class BoundedStore:
    """
    Records in arrival order, bounded by count and by age.

    @ivar evicted: how many records were dropped to make room (count bound).
    @ivar expired: how many were dropped for age.
    """

    def __init__(self, clock, max_count, max_age_seconds):
        """
        @param clock: an C{IReactorTime}; C{clock.seconds()} stamps each arrival.
        @param max_count: at most this many records are kept (at least 1).
        @param max_age_seconds: records older than this are dropped; 0 or None keeps
            records until the count bound pushes them out.
        """
        self._clock = clock
        self.max_count = max(1, int(max_count))
        self.max_age = max_age_seconds or None
        self._items = deque(maxlen=self.max_count)
        self.evicted = 0
        self.expired = 0

    def __len__(self):
        return len(self._items)

    def add(self, record):
        """Store one record (dropping the oldest when full, and the expired)."""
        now = self._clock.seconds()
        self._expire(now)
        if len(self._items) == self.max_count:
            self.evicted += 1
        self._items.append((now, record))

    def extend(self, records):
        """Store several records, in order."""
        for record in records:
            self.add(record)

    def expire(self):
        """Drop the records older than the retention. @return: how many went."""
        return self._expire(self._clock.seconds())

    def _expire(self, now):
        if self.max_age is None:
            return 0
        items = self._items
        cutoff = now - self.max_age
        dropped = 0
        while items and items[0][0] < cutoff:
            items.popleft()
            dropped += 1
        self.expired += dropped
        return dropped

    def records(self):
        """@return: a list of the live records, oldest first."""
        self._expire(self._clock.seconds())
        return [record for _, record in self._items]

    def clear(self):
        self._items.clear()


class SpanRecord:
    """One stored span (an engine span or one a worker sent)."""

    __slots__ = (
        "trace_id", "span_id", "parent_span_id", "name", "start_ns", "end_ns", "status",
        "status_description", "attributes", "service_name", "events", "links",
        "scope_name", "scope_version", "flags", "kind", "internal",
    )

    def __init__(self, trace_id, span_id, parent_span_id, name, start_ns, end_ns,
                 status=STATUS_UNSET, status_description=None, attributes=(),
                 service_name="unknown", events=(), links=(), scope_name=None,
                 scope_version=None, flags=None, kind=0, internal=False):
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.name = name
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.status = status
        self.status_description = status_description
        self.attributes = attributes
        self.service_name = service_name
        self.events = events
        self.links = links
        self.scope_name = scope_name
        self.scope_version = scope_version
        self.flags = flags
        self.kind = kind
        self.internal = internal

    @property
    def duration_ms(self):
        return max(0, self.end_ns - self.start_ns) / 1e6

    def to_dict(self):
        """@return: the StoredSpan JSON object (modules.md §9.3)."""
        span = {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "start_time_unix_nano": self.start_ns,
            "end_time_unix_nano": self.end_ns,
            "status": self.status,
            "attributes": [list(pair) for pair in self.attributes],
            "service_name": self.service_name,
            "events": list(self.events),
            "links": list(self.links),
        }
        if self.status_description:
            span["status_description"] = self.status_description
        if self.scope_name is not None:
            span["instrumentation_scope_name"] = self.scope_name
        if self.scope_version is not None:
            span["instrumentation_scope_version"] = self.scope_version
        if self.flags is not None:
            span["flags"] = self.flags
        return span


def log_record(timestamp_ns, observed_ns, severity_number, severity_text, body,
               attributes=None, trace_id=None, span_id=None, resource=None,
               service_name="unknown", scope_name=None, scope_version=None):
    """@return: a StoredLog JSON object (modules.md §9.3)."""
    record = {
        "timestamp_unix_nano": timestamp_ns,
        "observed_timestamp_unix_nano": observed_ns,
        "severity_number": severity_number,
        "severity_text": severity_text,
        "body": body,
        "attributes": attributes or {},
        "trace_id": trace_id,
        "span_id": span_id,
        "resource": resource or {},
        "service_name": service_name,
    }
    if scope_name is not None:
        record["instrumentation_scope_name"] = scope_name
    if scope_version is not None:
        record["instrumentation_scope_version"] = scope_version
    return record


# -- queries -------------------------------------------------------------------------


def _contains(haystack, needle):
    return needle.lower() in (haystack or "").lower()


def span_matches(span, query):
    """
    @param query: the (validated) engine::traces::list input.
    @return: whether C{span} passes every filter but C{trace_id} and C{name}.
    """
    if query.get("service_name") and not _contains(span.service_name, query["service_name"]):
        return False
    if query.get("status") and not _contains(span.status, query["status"]):
        return False
    duration = span.duration_ms
    if query.get("min_duration_ms") is not None and duration < query["min_duration_ms"]:
        return False
    if query.get("max_duration_ms") is not None and duration > query["max_duration_ms"]:
        return False
    if query.get("start_time") is not None and span.end_ns < query["start_time"] * 1_000_000:
        return False
    if query.get("end_time") is not None and span.start_ns > query["end_time"] * 1_000_000:
        return False
    own = None
    for pair in query.get("attributes") or ():
        own = own if own is not None else [list(a) for a in span.attributes]
        if len(pair) != 2 or [pair[0], pair[1]] not in own:
            return False
    for pair in query.get("exclude_attributes") or ():
        own = own if own is not None else [list(a) for a in span.attributes]
        if [pair[0], pair[1]] in own:  # any one excludes the row (the reference's OR)
            return False
    return True


def list_traces(spans, query):
    """
    engine::traces::list over C{spans} (L{SpanRecord}s, oldest first).

    Without C{trace_id}, one entry per trace: its root span (a span whose parent is
    not stored counts as a root). With C{trace_id}, every span of that trace.

    @return: C{(page, total)}: the StoredSpan dicts of the requested page and the
        number of matches.
    """
    include_internal = query.get("include_internal")
    if not include_internal:
        spans = [s for s in spans if not s.internal]
    name = query.get("name")
    if query.get("trace_id"):
        selected = [s for s in spans if s.trace_id == query["trace_id"]]
        if name:
            selected = [s for s in selected if _contains(s.name, name)]
    else:
        wanted = query.get("trace_ids")
        if wanted is not None:  # one group's members (ignored with trace_id)
            wanted = set(wanted)
            spans = [s for s in spans if s.trace_id in wanted]
        by_trace = {}
        ids = set()
        for span in spans:
            by_trace.setdefault(span.trace_id, []).append(span)
            ids.add(span.span_id)
        selected = []
        for members in by_trace.values():
            roots = [s for s in members if s.parent_span_id is None
                     or s.parent_span_id not in ids]
            if not roots:
                continue
            if name:
                pool = members if query.get("search_all_spans") else roots
                if not any(_contains(s.name, name) for s in pool):
                    continue
            selected.extend(roots)
    selected = [s for s in selected if span_matches(s, query)]
    sort_by = query.get("sort_by") or "start_time"
    key = {
        "duration": lambda s: s.duration_ms,
        "duration_ms": lambda s: s.duration_ms,
        "service_name": lambda s: (s.service_name or "").lower(),
        "name": lambda s: s.name,
    }.get(sort_by, lambda s: s.start_ns)
    selected.sort(key=key, reverse=(query.get("sort_order") == "desc"))
    offset, limit = query.get("offset") or 0, query.get("limit")
    if limit is None:
        limit = 100
    return [s.to_dict() for s in selected[offset:offset + limit]], len(selected)


def span_tree(spans, trace_id):
    """@return: the root nodes of a trace's tree: StoredSpan dicts with ``children``."""
    members = [s for s in spans if s.trace_id == trace_id]
    members.sort(key=lambda s: s.start_ns)
    ids = {s.span_id for s in members}
    children = {}
    roots = []
    for span in members:
        if span.parent_span_id is None or span.parent_span_id not in ids:
            roots.append(span)
        else:
            children.setdefault(span.parent_span_id, []).append(span)

    def node(span, seen):
        result = span.to_dict()
        seen.add(span.span_id)
        result["children"] = [node(c, seen) for c in children.get(span.span_id, ())
                              if c.span_id not in seen]
        return result

    seen = set()
    return [node(root, seen) for root in roots]


def list_logs(logs, query):
    """
    engine::logs::list over StoredLog dicts (oldest first).

    @return: C{(page, total)}, newest first.
    """
    start, end = query.get("start_time"), query.get("end_time")
    severity_min = query.get("severity_min")
    severity_text = query.get("severity_text")
    selected = []
    for log in reversed(logs):
        ts = log["timestamp_unix_nano"]
        if start is not None and ts < start * 1_000_000:
            continue
        if end is not None and ts > end * 1_000_000:
            continue
        if query.get("trace_id") and log["trace_id"] != query["trace_id"]:
            continue
        if query.get("span_id") and log["span_id"] != query["span_id"]:
            continue
        if severity_min is not None and log["severity_number"] < severity_min:
            continue
        if severity_text and (log["severity_text"] or "").lower() != severity_text.lower():
            continue
        selected.append(log)
    offset, limit = query.get("offset") or 0, query.get("limit")
    page = selected[offset:] if limit is None else selected[offset:offset + limit]
    return page, len(selected)
