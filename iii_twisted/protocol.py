"""
The iii worker wire format: decoding and encoding of frames, message types, error codes.

Every frame on the worker socket is one JSON object with a lowercase ``type`` key
(``registerfunction``, ``invokefunction``, ...); see ../shared/spec/engine-core.md §2.
Workers may also send binary frames: ``OTLP``/``LOGS``/``MTRC`` followed by OTLP JSON
(telemetry, never routed), or JSON protocol messages.

Decoding is deliberately lenient where real SDKs need it:

- unknown keys are ignored (Node sends ``message_type`` inside trigger messages);
- a missing optional key reads as ``None``, including ``data`` and ``config``, which
  the reference requires but Python ``iii-sdk`` 0.10.0 omits when they are None;

and strict where a wrong value would poison the engine: a required key with the wrong
type makes the whole message a :class:`ProtocolError`.
"""

import itertools
import json
import re
from uuid import uuid4

# Message types, worker -> engine and engine -> worker.
REGISTER_FUNCTION = "registerfunction"
UNREGISTER_FUNCTION = "unregisterfunction"
REGISTER_TRIGGER_TYPE = "registertriggertype"
UNREGISTER_TRIGGER_TYPE = "unregistertriggertype"
REGISTER_TRIGGER = "registertrigger"
UNREGISTER_TRIGGER = "unregistertrigger"
TRIGGER_REGISTRATION_RESULT = "triggerregistrationresult"
INVOKE_FUNCTION = "invokefunction"
INVOCATION_RESULT = "invocationresult"
REGISTER_SERVICE = "registerservice"
WORKER_REGISTERED = "workerregistered"
REATTACH = "reattach"  # newer SDKs (engine-core.md §11), first after a reconnect
PING = "ping"
PONG = "pong"

# The capability flags this engine announces in ``workerregistered.features`` (a
# 0.25 engine's ``observe.v1``, ``local-dispatch.v1``): only what it implements.
# None yet; an SDK that finds a flag missing keeps that feature off (py 0.25: its
# observe API reports UNSUPPORTED; every call goes through the engine).
ENGINE_FEATURES = ()

# What a worker may declare in engine::workers::register ``features`` that the engine
# acts on: it reads JSON messages up to 64 MiB (py 0.25), see discovery_current.
LARGE_MESSAGES_V1 = "large-messages.v1"

# Binary frame prefixes that carry telemetry (OTLP JSON follows the prefix).
TELEMETRY_PREFIXES = (b"OTLP", b"LOGS", b"MTRC")

# Error codes the engine produces (engine-core.md §4.4), plus our own additions.
FUNCTION_NOT_FOUND = "function_not_found"
INVOCATION_STOPPED = "invocation_stopped"
INVOCATION_TIMEOUT = "invocation_timeout"  # ours: the reference has no engine timeout
INVOCATION_FAILED = "invocation_failed"
ENQUEUE_ERROR = "enqueue_error"
DESERIALIZATION_ERROR = "deserialization_error"
INVALID_MESSAGE = "invalid_message"  # ours: a malformed invokefunction we can answer
MESSAGE_TOO_LARGE = "message_too_large"  # ours: a frame over max_message_size
CHANNEL_SEND_FAILED = "channel_send_failed"
TRIGGER_REGISTRATION_FAILED = "trigger_registration_failed"

_ANY = object()  # field schema: any JSON value
_STR = (str,)
_OPT_STR = (str, type(None))
_OPT_DICT = (dict, type(None))

# For each message type the engine acts on: {field: (accepted types, required)}.
# Absent optional fields read as None.
_SCHEMAS = {
    REGISTER_FUNCTION: {
        "id": (_STR, True),
        "description": (_OPT_STR, False),
        "request_format": (_ANY, False),
        "response_format": (_ANY, False),
        "metadata": (_ANY, False),
        "invocation": (_OPT_DICT, False),
    },
    UNREGISTER_FUNCTION: {"id": (_STR, True)},
    REGISTER_TRIGGER_TYPE: {
        "id": (_STR, True),
        "description": (_OPT_STR, False),
        "trigger_request_format": (_ANY, False),
        "call_request_format": (_ANY, False),
    },
    UNREGISTER_TRIGGER_TYPE: {"id": (_STR, True)},
    REGISTER_TRIGGER: {
        "id": (_STR, True),
        "trigger_type": (_STR, True),
        "function_id": (_STR, True),
        "config": (_ANY, False),
        "metadata": (_ANY, False),
        # Reference 0.23: where the target function lives, where the provider does.
        "namespace": (_ANY, False),
        "trigger_namespace": (_ANY, False),
    },
    UNREGISTER_TRIGGER: {"id": (_STR, True), "trigger_type": (_OPT_STR, False)},
    TRIGGER_REGISTRATION_RESULT: {
        "id": (_STR, True),
        "trigger_type": (_OPT_STR, False),
        "function_id": (_OPT_STR, False),
        "error": (_OPT_DICT, False),
    },
    INVOKE_FUNCTION: {
        "invocation_id": (_OPT_STR, False),
        "function_id": (_STR, True),
        "data": (_ANY, False),
        "traceparent": (_OPT_STR, False),
        "baggage": (_OPT_STR, False),
        "action": (_OPT_DICT, False),
        # Reference 0.21.3: a per-call side channel beside ``data``, never merged
        # into it; forwarded to the function's worker as it came.
        "metadata": (_ANY, False),
        "namespace": (_ANY, False),  # reference 0.23: where to route (absent: default)
    },
    INVOCATION_RESULT: {
        "invocation_id": (_STR, True),
        "function_id": (_OPT_STR, False),
        "result": (_ANY, False),
        "error": (_OPT_DICT, False),
        "traceparent": (_OPT_STR, False),
        "baggage": (_OPT_STR, False),
    },
    REGISTER_SERVICE: {
        "id": (_STR, True),
        "name": (_OPT_STR, False),
        "description": (_OPT_STR, False),
        "parent_service_id": (_OPT_STR, False),
    },
    REATTACH: {"previous_worker_id": (_STR, True), "reattach_token": (_OPT_STR, False)},
    PING: {},
    PONG: {},
    WORKER_REGISTERED: {},
}

MESSAGE_TYPES = frozenset(_SCHEMAS)


class ProtocolError(ValueError):
    """
    A frame that is not a usable iii message.

    @ivar message: the decoded JSON object when there was one (so a caller can still
        answer a malformed ``invokefunction`` by its ``invocation_id``), else None.
    """

    def __init__(self, reason, message=None):
        ValueError.__init__(self, reason)
        self.reason = reason
        self.message = message


def sequential_ids():
    """
    @return: an iterator of ids unique within this engine process: UUID-shaped, a
        random prefix chosen once and a counter, so that making one costs neither a
        getrandom() syscall nor a UUID object (a measurable share of a routed call).
        They are not secrets: use them where another check (the worker a call went
        to, a channel's access key) is what refuses a stranger.
    """
    prefix = str(uuid4())[:24]
    return ("{}{:012x}".format(prefix, n) for n in itertools.count(1))


# NaN and Infinity are not JSON, but Python's json writes them (so a Python worker can
# send them) and reads them. The decoder reads them, and notes that it did here, so
# that a reader can refuse them where they would be kept and shown to everyone. A
# number too large for a float (``1e999``) is valid JSON that the parser would turn
# into an infinity: it is noted the same way, since it cannot be written back.
_nonfinite_seen = []


def _read_nonfinite(constant):
    _nonfinite_seen.append(constant)
    return float(constant)


def _read_float(text):
    value = float(text)
    if value - value != 0.0:  # inf - inf is nan; finite - itself is 0.0
        _nonfinite_seen.append(text)
    return value


_decode_text = json.JSONDecoder(parse_constant=_read_nonfinite, parse_float=_read_float).decode

# Text in which a parser that reads NaN, infinities and overflowing floats without
# saying so could meet one: the two words, an exponent of 3 digits or more, or 200
# digits in a row (a float overflows past 1.8e308, so with an exponent under 100 its
# integer part needs over 200 digits). Most text that matches holds none (an id with
# "NaN" in it): it only takes the careful parser. Likewise any text with 200 brackets
# (whose nesting could reach the recursion limit the careful parser reports).
_MAYBE_NONFINITE = re.compile(r"NaN|Infinity|[eE][+-]?[0-9]{3}|[0-9]{200}")


def _text_parser(fast):
    """
    @param fast: a JSON parser without hooks (reading NaN and infinities as floats),
        or None.
    @return: the parser C{read_json} uses: C{fast} for text that cannot hold a
        non-finite number nor nest deeply, the careful C{_decode_text} otherwise.
    """
    if fast is None:
        return _decode_text
    search = _MAYBE_NONFINITE.search

    def parse(text):
        if text.count("[") + text.count("{") < 200 and search(text) is None:
            return fast(text)
        return _decode_text(text)
    return parse


try:
    # PyPy has no C scanner for a JSONDecoder with hooks: ours runs json's pure-Python
    # scanner there, 5x slower than PyPy's own parser (a tenth of a routed call).
    # CPython's C scanner takes the hooks at full speed.
    from _pypyjson import loads as _pypy_loads
except ImportError:
    _parse_text = _decode_text
else:
    _parse_text = _text_parser(lambda text: _pypy_loads(text, json.JSONDecodeError))


def read_json(payload):
    """
    Parse UTF-8 JSON from outside (a frame, a telemetry body).

    @return: (the value, whether it held ``NaN``, ``Infinity`` or a number too large
        for a float such as ``1e999``).
    @raise ValueError: for invalid UTF-8 or JSON.
    @raise RecursionError: for JSON nested deeper than the interpreter allows.
    """
    try:
        text = payload.decode("utf-8") if isinstance(payload, (bytes, bytearray)) else payload
        return _parse_text(text), bool(_nonfinite_seen)
    finally:
        del _nonfinite_seen[:]


def loads(payload):
    """
    Parse JSON from outside that the engine may keep or pass on (an HTTP body, a
    stream client's frame, an HTTP function's answer, a stored record): like
    L{read_json}, but a non-finite number is an error.

    @return: the value.
    @raise ValueError: for invalid UTF-8 or JSON, or ``NaN``/``Infinity``/``1e999``.
    @raise RecursionError: for JSON nested deeper than the interpreter allows.
    """
    value, nonfinite = read_json(payload)
    if nonfinite:
        raise ValueError("NaN and infinities (including numbers such as 1e999) are not JSON")
    return value


def decode(payload):
    """
    Decode one worker frame's payload into a message dict.

    @param payload: the frame's bytes (text frames are UTF-8).
    @return: a dict with a known ``type`` whose fields have been checked against the
        message's schema; optional fields that were absent are present as None.
    @raise ProtocolError: for invalid UTF-8 or JSON (or JSON nested deeper than the
        interpreter's recursion limit), a JSON value that is not an object, an unknown
        ``type``, a field with the wrong type, or ``NaN``/``Infinity`` (in any
        spelling, ``1e999`` included) anywhere in a message other than an
        ``invocationresult``. (Registrations and calls would
        carry them into what discovery and other workers are sent, which must be JSON;
        a result goes to one caller only, and the engine answers that caller with
        ``invocation_failed`` when the result cannot be sent as JSON.)
    """
    try:
        message, nonfinite = read_json(payload)
    except ValueError as e:  # includes UnicodeDecodeError
        raise ProtocolError("undecodable JSON: {}".format(e))
    except RecursionError:
        raise ProtocolError("undecodable JSON: nested too deeply")
    if not isinstance(message, dict):
        raise ProtocolError("frame is a JSON {}, not an object".format(type(message).__name__))
    kind = message.get("type")
    schema = _SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ProtocolError("unknown message type {!r}".format(kind), message)
    if nonfinite and kind != INVOCATION_RESULT:
        raise ProtocolError("{}: NaN and Infinity are not JSON".format(kind), message)
    for field, (types, required) in schema.items():
        value = message.get(field)
        if value is None:
            if required:
                raise ProtocolError("{}: missing required field {!r}".format(kind, field), message)
            message[field] = None
        elif types is not _ANY and not isinstance(value, types):
            raise ProtocolError(
                "{}: field {!r} must be {}, not {}".format(
                    kind, field, " or ".join(t.__name__ for t in types if t is not type(None)),
                    type(value).__name__,
                ),
                message,
            )
    return message


# allow_nan=False: NaN and infinities are not JSON. Python's json writes them anyway
# (and a Python worker can send them); a Node worker's JSON.parse would then throw
# on the frame. A message holding one fails to encode, and the engine answers the
# call with an error instead (see WorkerProtocol.send).
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def encode(message):
    """
    Encode a message dict as the payload of a text frame.

    @return: UTF-8 bytes of compact JSON.
    @raise TypeError: if the message holds a value JSON cannot represent.
    @raise ValueError: if it holds NaN or an infinity.
    """
    return _dumps(message).encode("utf-8")


def error_body(code, message, stacktrace=None):
    """
    @return: an ErrorBody dict ``{"code", "message"}``, with ``stacktrace`` only when
        given.
    """
    body = {"code": code, "message": message}
    if stacktrace is not None:
        body["stacktrace"] = stacktrace
    return body


class InvocationError(Exception):
    """
    A call that failed with an iii ErrorBody; what ``Engine.call`` Deferreds fail with.

    @ivar code: the error code (``function_not_found``, ``invocation_failed``, ...).
    @ivar message: human-readable text.
    @ivar stacktrace: the remote stack trace when a worker sent one, else None.
    """

    def __init__(self, code, message, stacktrace=None):
        Exception.__init__(self, "{}: {}".format(code, message))
        self.code = code
        self.message = message
        self.stacktrace = stacktrace

    @classmethod
    def from_body(cls, body):
        """
        @param body: an ErrorBody dict as a worker sent it (keys may be missing).
        @return: the matching InvocationError.
        """
        code = body.get("code")
        message = body.get("message")
        stacktrace = body.get("stacktrace")
        return cls(
            code if isinstance(code, str) else INVOCATION_FAILED,
            message if isinstance(message, str) else json.dumps(body),
            stacktrace if isinstance(stacktrace, str) else None,
        )

    def to_body(self):
        """@return: this error as an ErrorBody dict."""
        return error_body(self.code, self.message, self.stacktrace)


def function_not_found(function_id):
    """@return: the InvocationError for calling an id nobody registered."""
    return InvocationError(FUNCTION_NOT_FOUND, "Function {} not found".format(function_id))
