"""Decoding and encoding of worker frames (iii_twisted.protocol)."""

import pytest

from iii_twisted import protocol as P


def test_decode_fills_absent_optional_fields_with_none():
    """Python iii-sdk omits None-valued keys; they read as null, data included."""
    message = P.decode(b'{"type":"invokefunction","function_id":"a::b"}')
    assert message["data"] is None
    assert message["invocation_id"] is None
    assert message["action"] is None


def test_decode_ignores_unknown_keys():
    """Node sends message_type inside trigger messages; extra keys are harmless."""
    message = P.decode(
        b'{"type":"registertrigger","id":"t","trigger_type":"x","function_id":"f",'
        b'"config":{},"message_type":"registertrigger"}')
    assert message["config"] == {}
    assert message["message_type"] == "registertrigger"


@pytest.mark.parametrize("payload, reason", [
    (b"{nope", "undecodable JSON"),
    (b"\xff\xfe\x00", "undecodable JSON"),
    (b"[1, 2]", "not an object"),
    (b'"text"', "not an object"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"type":"ping","x":' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    (b'{"type":"registerfunction","id":"f","metadata":{"w":NaN}}', "NaN and Infinity"),
    (b'{"type":"registertrigger","id":"t","trigger_type":"x","function_id":"f",'
     b'"config":[-Infinity]}', "NaN and Infinity"),
    (b'{"type":"invokefunction","function_id":"f","data":Infinity}', "NaN and Infinity"),
    (b'{"type":"teleport"}', "unknown message type"),
    (b'{"no_type":1}', "unknown message type"),
    (b'{"type":"registerfunction"}', "missing required field 'id'"),
    (b'{"type":"registerfunction","id":7}', "field 'id' must be str"),
    (b'{"type":"invokefunction","function_id":"f","action":"void"}', "field 'action'"),
])
def test_decode_rejects_bad_frames(payload, reason):
    """Malformed frames raise ProtocolError with a reason a log line can carry."""
    with pytest.raises(P.ProtocolError, match=reason):
        P.decode(payload)


def test_protocol_error_keeps_decoded_message():
    """A malformed invokefunction still exposes its invocation_id so it can be answered."""
    with pytest.raises(P.ProtocolError) as e:
        P.decode(b'{"type":"invokefunction","invocation_id":"abc","function_id":5}')
    assert e.value.message["invocation_id"] == "abc"


def test_encode_is_compact_utf8_json():
    """Frames are compact JSON objects; non-ASCII text stays UTF-8."""
    assert P.encode({"type": "pong", "x": "é"}) == '{"type":"pong","x":"é"}'.encode("utf-8")


def test_payloads_pass_through_unchanged():
    """Numbers, nesting and nulls survive a decode/encode round trip exactly."""
    raw = (b'{"type":"invocationresult","invocation_id":"i","function_id":"f",'
           b'"result":{"n":1,"f":513.4,"big":12345678901234567890,"l":[null,true,{}]}}')
    message = P.decode(raw)
    assert P.encode(message["result"]) == b'{"n":1,"f":513.4,"big":12345678901234567890,"l":[null,true,{}]}'


def test_invocation_error_from_partial_body():
    """An error body missing its keys still becomes a usable InvocationError."""
    error = P.InvocationError.from_body({"message": "boom"})
    assert error.code == P.INVOCATION_FAILED
    assert error.to_body() == {"code": "invocation_failed", "message": "boom"}
    with_trace = P.InvocationError.from_body({"code": "x", "message": "m", "stacktrace": "t"})
    assert with_trace.to_body() == {"code": "x", "message": "m", "stacktrace": "t"}


def test_a_result_may_carry_nan_to_be_answered_as_an_error():
    """An invocationresult is read with its NaN: the engine answers its one caller."""
    import math
    message = P.decode(b'{"type":"invocationresult","invocation_id":"i","result":[NaN]}')
    assert math.isnan(message["result"][0])
    # The next frame does not inherit the note of the last one.
    assert P.decode(b'{"type":"registerfunction","id":"f"}')["id"] == "f"


def _outcome(parse, text):
    """What reading C{text} gives: (value, non-finite noted) or the error's class."""
    from iii_twisted import protocol as P
    try:
        value = parse(text)
        return "value", repr(value), bool(P._nonfinite_seen)
    except (ValueError, RecursionError) as e:
        return "error", type(e).__name__
    finally:
        del P._nonfinite_seen[:]


def _json_texts():
    """Seeded JSON and near-JSON texts, with every kind of non-finite number."""
    import random
    rng = random.Random(18)
    atoms = ["1", "-0", "1.5", "1e5", "1E-7", "2e308", "1e999", "-1e999", "1e+400",
             "1e0308", "9" * 320, "9" * 320 + ".5", "1" + "0" * 250 + "e60", "NaN",
             "-Infinity", "Infinity", '"NaN"', '"x Infinity"', '"8e123"', '"\\u00e9"',
             '"\\ud800"', "true", "null", '"' + "7" * 250 + '"', "0.1e99", "12e99"]
    texts = []
    for _ in range(3000):
        parts = [rng.choice(atoms) for _ in range(rng.randrange(1, 5))]
        kind = rng.random()
        if kind < 0.4:
            text = "[" + ",".join(parts) + "]"
        elif kind < 0.8:
            text = "{" + ",".join('"k%d":%s' % (i, p) for i, p in enumerate(parts)) + "}"
        else:
            text = rng.choice(parts)
        if rng.random() < 0.1:  # broken
            cut = rng.randrange(len(text) + 1)
            text = text[:cut] + rng.choice(["", "]", "{", ",", " x"]) + text[cut:]
        texts.append(text)
    texts += ["[" * 150 + "]" * 150, "[" * 250 + "]" * 250, '{"a":' * 199 + "1" + "}" * 199,
              "", " ", "[1] [2]", '{"a":1,"a":2}']
    return texts


def test_fast_parser_gate_reads_as_the_careful_parser():
    """
    On PyPy, read_json uses PyPy's parser for text that cannot hold NaN, an infinity
    or an overflowing float, nor nest deeply: here (CPython) json.loads, which reads
    those the same unchecked way, stands in for it. Every text gives the same value,
    the same non-finite note, or the same kind of error as the careful parser alone.
    """
    import json

    from iii_twisted import protocol as P
    gated = P._text_parser(json.loads)
    careful = P._text_parser(None)
    for text in _json_texts():
        assert _outcome(gated, text) == _outcome(careful, text), text[:200]
