"""
How a function's result becomes an HTTP response (the REST API module's answer).

``response_of(result) -> (status, headers, body, dropped)``: a pure function over the
JSON value a function returned, so every shape the SDKs produce is tested here:

- status: ``status_code`` (the reference's name), else ``statusCode`` (what Python
  ``iii-sdk``'s ``ApiResponse`` model serializes to), else 200; a value that is not an
  integer in 100..599 counts as missing.
- headers: an object ``{"Name": "value"}`` (values that are not strings are skipped;
  a list of strings gives the header once per item, e.g. several ``Set-Cookie``), or a
  list of ``"Name: value"`` lines (the reference's older form, still accepted there),
  or of ``["Name", "value"]`` pairs. Names that are not HTTP tokens, values holding
  CR/LF/NUL, ``Content-Length`` and hop-by-hop headers are dropped (reported in
  ``dropped`` so the caller can log them, as the reference warns of invalid ones).
- body (reference ``engine/src/workers/rest_api/types.rs``
  ``HttpResponse::into_axum_response``), with ``ct`` the first ``Content-Type`` given:

  ========================================  =========================================
  result                                    bytes sent, Content-Type
  ========================================  =========================================
  ct given, body a string                   the string's UTF-8 bytes, raw; ct
  ct given, body null                       empty; ct
  ct given and not JSON, other body         the body's JSON text; ct
  body bytes (in-process functions) or a    the bytes, raw; ct or
  Node ``Buffer`` (``{"type": "Buffer",     ``application/octet-stream``
  "data": [0..255, ...]}``)
  otherwise (no ct, or a JSON ct)           the body as JSON (``{}`` when missing or
                                            null); ct or ``application/json``
  ========================================  =========================================

Raises ``ValueError`` when the body is not JSON-encodable (NaN, a set, ...): the
caller answers 500.
"""

import re

from ..protocol import encode

JSON_TYPE = "application/json"
OCTET_STREAM = "application/octet-stream"

HOP_BY_HOP = frozenset(["transfer-encoding", "connection", "keep-alive", "upgrade",
                        "te", "trailer", "proxy-connection", "content-length"])
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


def status_of(value):
    """``value`` if it is an int HTTP status (100..599), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


def header_pairs(headers):
    """
    ``(pairs, dropped)``: the ``(name, value)`` string pairs of a result's
    ``headers`` in any accepted form, in order; ``dropped`` lists the names (or lines)
    refused. Anything that is not an object or a list gives no headers.
    """
    raw = []
    if isinstance(headers, dict):
        for name, value in headers.items():
            if isinstance(value, list):
                raw.extend((name, item) for item in value if isinstance(item, str))
            elif isinstance(value, str):
                raw.append((name, value))
    elif isinstance(headers, list):
        for item in headers:
            if isinstance(item, str):
                name, sep, value = item.partition(":")
                if sep and name.strip():
                    raw.append((name.strip(), value.strip()))
            elif (isinstance(item, list) and len(item) == 2
                  and isinstance(item[0], str) and isinstance(item[1], str)):
                raw.append((item[0], item[1]))
    pairs, dropped = [], []
    for name, value in raw:
        if (not _TOKEN.match(name) or _BAD_VALUE.search(value)
                or name.lower() in HOP_BY_HOP):
            dropped.append(name)
        else:
            pairs.append((name, value))
    return pairs, dropped


def buffer_bytes(value):
    """The bytes of a JSON-serialized Node ``Buffer``, or None if ``value`` is not one."""
    if (isinstance(value, dict) and len(value) == 2 and value.get("type") == "Buffer"
            and isinstance(value.get("data"), list)):
        data = value["data"]
        if all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255
               for b in data):
            return bytes(data)
    return None


def response_of(result):
    """See the module docstring. Returns ``(status, [(name, value)], bytes, dropped)``."""
    if not isinstance(result, dict):
        return 200, [("Content-Type", JSON_TYPE)], b"{}", []
    status = status_of(result.get("status_code"))
    if status is None:
        status = status_of(result.get("statusCode")) or 200
    pairs, dropped = header_pairs(result.get("headers"))
    content_type = next((v for n, v in pairs if n.lower() == "content-type"), None)
    body = result.get("body")
    raw = bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else buffer_bytes(body)
    if raw is not None:
        if content_type is None:
            pairs.append(("Content-Type", OCTET_STREAM))
        return status, pairs, raw, dropped
    if content_type is not None:
        if isinstance(body, str):
            return status, pairs, body.encode("utf-8"), dropped
        if body is None and "body" in result:
            return status, pairs, b"", dropped
        if JSON_TYPE not in content_type.lower():
            return status, pairs, encode({} if body is None else body), dropped
    data = encode({} if body is None else body)
    if content_type is None:
        pairs.append(("Content-Type", JSON_TYPE))
    return status, pairs, data, dropped
