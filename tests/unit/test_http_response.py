"""
Every response shape the SDKs produce (iii_twisted.modules.http_response.response_of),
and the REST API answering with it. Reported input: ``{"status_code": 200, "headers":
{"Content-Type": "text/xml"}, "body": "<ok/>"}`` went out JSON-encoded (``"<ok/>"``).
"""

import json

import pytest

from iii_twisted.modules.http_response import header_pairs, response_of


def test_reported_input_text_xml_string_goes_out_raw():
    status, headers, body, dropped = response_of(
        {"status_code": 200, "headers": {"Content-Type": "text/xml"}, "body": "<ok/>"})
    assert (status, headers, body, dropped) == (200, [("Content-Type", "text/xml")],
                                                b"<ok/>", [])


@pytest.mark.parametrize("result, expected_body, expected_type", [
    # A content type given: a string body is raw, whatever the type (the reference's rule).
    ({"headers": {"content-type": "text/html; charset=utf-8"}, "body": "<p>é</p>"},
     "<p>é</p>".encode("utf-8"), "text/html; charset=utf-8"),
    ({"headers": {"Content-Type": "application/json"}, "body": '{"a":1}'},
     b'{"a":1}', "application/json"),
    ({"headers": {"Content-Type": "text/csv"}, "body": ""}, b"", "text/csv"),
    # A content type and null: empty.
    ({"headers": {"Content-Type": "text/plain"}, "body": None}, b"", "text/plain"),
    # A content type that is not JSON and a structured body: its JSON text.
    ({"headers": {"Content-Type": "text/plain"}, "body": {"a": [1, 2]}},
     b'{"a":[1,2]}', "text/plain"),
    ({"headers": {"Content-Type": "text/plain"}, "body": 5}, b"5", "text/plain"),
    # No content type: JSON, as before (a string is a JSON string).
    ({"body": "<ok/>"}, b'"<ok/>"', "application/json"),
    ({"body": {"x": 1}}, b'{"x":1}', "application/json"),
    ({}, b"{}", "application/json"),
    ({"body": None}, b"{}", "application/json"),
    # Bytes: in-process functions, and a Node Buffer serialized by JSON.stringify.
    ({"body": b"\x00\xffPNG"}, b"\x00\xffPNG", "application/octet-stream"),
    ({"headers": {"Content-Type": "image/png"}, "body": bytearray(b"\x89PNG")},
     b"\x89PNG", "image/png"),
    ({"headers": {"Content-Type": "image/png"},
      "body": {"type": "Buffer", "data": [137, 80, 78, 71]}}, b"\x89PNG", "image/png"),
    # Not a Buffer (a byte out of range): an ordinary object.
    ({"body": {"type": "Buffer", "data": [256]}}, b'{"type":"Buffer","data":[256]}',
     "application/json"),
])
def test_body_by_content_type(result, expected_body, expected_type):
    _, headers, body, _ = response_of(dict(result, status_code=200))
    assert body == expected_body
    assert [v for n, v in headers if n.lower() == "content-type"] == [expected_type]


@pytest.mark.parametrize("result, status", [
    ({"status_code": 201}, 201),
    ({"statusCode": 404}, 404),          # Python iii-sdk ApiResponse.model_dump(by_alias)
    ({"status_code": 204, "statusCode": 500}, 204),
    ({"status_code": 999}, 200), ({"status_code": "201"}, 200), ({"status_code": True}, 200),
    ({}, 200),
])
def test_status(result, status):
    assert response_of(result)[0] == status


def test_not_an_object_is_200_empty_json():
    for result in (1, "s", [1], True):
        assert response_of(result)[:3] == (200, [("Content-Type", "application/json")], b"{}")


def test_every_header_form():
    # An object (non-string values skipped; a list of strings repeats the header).
    assert header_pairs({"X-A": "1", "X-N": 2, "Set-Cookie": ["a=1", "b=2"]}) == (
        [("X-A", "1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], [])
    # "Name: value" lines (the reference's Vec<String> form), trimmed; lines without a
    # colon or a name are skipped.
    assert header_pairs(["Content-Type: text/plain", "X-B:  two words ", "junk", ": x"]) == (
        [("Content-Type", "text/plain"), ("X-B", "two words")], [])
    # [name, value] pairs.
    assert header_pairs([["X-C", "3"], ["X-D"], [1, "x"]]) == ([("X-C", "3")], [])
    assert header_pairs(None) == ([], []) and header_pairs("x") == ([], [])


def test_invalid_headers_are_dropped_and_reported():
    pairs, dropped = header_pairs({"X-Ok": "1", "Bad Name": "x", "X-Split": "a\r\nSet: b",
                                   "Content-Length": "3", "Transfer-Encoding": "chunked",
                                   "": "x"})
    assert pairs == [("X-Ok", "1")]
    assert sorted(dropped) == sorted(["Bad Name", "X-Split", "Content-Length",
                                      "Transfer-Encoding", ""])


def test_unencodable_body_raises_value_error():
    with pytest.raises(ValueError):
        response_of({"body": {"x": float("nan")}})


# -- through the REST API module ------------------------------------------------------

from test_http_api import Api, _body, _response  # noqa: E402


def _answer(result):
    api = Api()
    api.route("f", {"api_path": "x", "http_method": "GET"})
    d = api.request("GET", "/x", allow_redirects=False)
    [call] = api.invocations()
    api.answer(call, result)
    response = _response(d)
    return response, _body(api.treq, response)


def test_rest_api_sends_the_reported_input_raw():
    response, body = _answer({"status_code": 200, "headers": {"Content-Type": "text/xml"},
                              "body": "<ok/>"})
    assert response.code == 200
    assert body == b"<ok/>"
    assert response.headers.getRawHeaders("content-type") == ["text/xml"]


def test_rest_api_header_lines_and_repeated_headers():
    response, body = _answer({"status_code": 302, "headers": [
        "Location: /elsewhere", "Set-Cookie: a=1", "Set-Cookie: b=2"]})
    assert response.code == 302
    assert response.headers.getRawHeaders("location") == ["/elsewhere"]
    assert response.headers.getRawHeaders("set-cookie") == ["a=1", "b=2"]
    assert json.loads(body) == {}


def test_rest_api_api_response_model_shape():
    """What Python iii-sdk's ApiResponse(statusCode=..., ...) serializes to."""
    response, body = _answer({"statusCode": 418, "headers": {"content-type": "text/plain"},
                              "body": "teapot"})
    assert (response.code, body) == (418, b"teapot")


def test_rest_api_bytes_and_nan_from_in_process_functions():
    """In-process functions may return bytes (raw) or NaN (500, not a crash)."""
    api = Api()
    api.engine.register_function("png", lambda data: {"body": b"\x89PNG",
                                                      "headers": {"Content-Type": "image/png"}})
    api.engine.register_function("nan", lambda data: {"body": {"x": float("nan")}})
    api.worker.receive({"type": "registertrigger", "id": "t1", "trigger_type": "http",
                        "function_id": "png", "config": {"api_path": "png"}})
    api.worker.receive({"type": "registertrigger", "id": "t2", "trigger_type": "http",
                        "function_id": "nan", "config": {"api_path": "nan"}})
    response = _response(api.request("GET", "/png"))
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["image/png"]
    assert _body(api.treq, response) == b"\x89PNG"
    response = _response(api.request("GET", "/nan"))
    body = _body(api.treq, response)
    assert response.code == 500
    assert json.loads(body) == {"error": "response body is not JSON"}
