"""The multipart fast path against python-multipart: same parts, same refusals, or it defers."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from python_multipart.multipart import parse_options_header

from app.errors import ServeError
from app.http.multipart import (
    _PLAIN_DISPOSITION,
    _PLAIN_MULTIPART_TYPE,
    _boundary,
    _Collector,
    _disposition,
    _parse_any,
    _parse_plain,
    parse_multipart,
)

BOUNDARY = b"xYzZY"
Outcome = list[tuple[str | None, str | None, str | None, bytes]] | tuple[int, str]


def _outcome(parts: object) -> Outcome:
    return [(p.name, p.filename, p.content_type, bytes(p.data)) for p in parts]  # type: ignore[attr-defined]


def plain(body: bytes, max_files: int = 3) -> Outcome | None:
    try:
        parts = _parse_plain(body, BOUNDARY, _Collector("file", max_files))
    except ServeError as exc:
        return exc.status, exc.message
    return None if parts is None else _outcome(parts)


def general(body: bytes, max_files: int = 3) -> Outcome:
    try:
        return _outcome(_parse_any(body, BOUNDARY, _Collector("file", max_files)))
    except ServeError as exc:
        return exc.status, exc.message


def build(parts: list[tuple[list[bytes], bytes]], closing: bytes = b"--\r\n") -> bytes:
    body = b"".join(
        b"--" + BOUNDARY + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + data + b"\r\n"
        for headers, data in parts
    )
    return body + b"--" + BOUNDARY + closing


FILE = b'Content-Disposition: form-data; name="file"; filename="a.png"'


def test_what_clients_send_takes_the_fast_path() -> None:
    request = httpx.Request(
        "POST", "http://x/predict", files=[("file", ("a.png", b"\x89PNG\r\n--xYzZ", "image/png")), ("file", ("b", b""))]
    )
    body = request.read()
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    parts = _parse_plain(body, boundary, _Collector("file", 3))
    assert parts is not None
    assert _outcome(parts) == [
        ("file", "a.png", "image/png", b"\x89PNG\r\n--xYzZ"),
        ("file", "b", "application/octet-stream", b""),
    ]
    assert _outcome(parse_multipart(body, request.headers["content-type"], "file", 3)) == _outcome(parts)


@pytest.mark.parametrize(
    "body",
    [
        b"preamble\r\n" + build([([FILE], b"data")]),  # a preamble
        build([([FILE], b"data")]).replace(b"xYzZY\r\n", b"xYzZY  \r\n", 1),  # transport padding
        build([([FILE, b" folded: x"], b"data")]),  # an obsolete folded header line
        build([([FILE, b"Bad Header: x"], b"data")]),  # not a token: python-multipart refuses it
        build([([FILE + b"\rx"], b"data")]),  # bare CR in a header
        build([([FILE] * 9, b"data")]),  # more headers than python-multipart allows
        build([([FILE], b"data")])[:-8],  # no closing delimiter
        build(
            [([FILE], b"data\r\n--xYzZYzz\r\n")]
        ),  # a delimiter followed by neither CRLF nor --: data to python-multipart
    ],
)
def test_anything_unusual_is_left_to_python_multipart(body: bytes) -> None:
    assert plain(body) is None
    general(body)  # decides on its own: parts or a 400, never an exception of another kind


def test_a_part_without_headers_and_the_limits() -> None:
    assert plain(build([([], b"x"), ([FILE], b"\r\n\r\ny")])) == [("file", "a.png", None, b"\r\n\r\ny")]
    too_many = build([([FILE], b"x")] * 4)
    assert plain(too_many) == general(too_many) == (413, "too many files: the limit is 3 per request")
    fields = build([([b'Content-Disposition: form-data; name="f"'], b"x")] * 20)
    assert plain(fields) == general(fields) == (413, "too many parts: the limit is 19 per request")


pieces = st.sampled_from([b"\r\n", b"\r", b"\n", b"--", b"-", b"xYzZY", b"--xYzZY", b":", b" ", b"a", b"\x00", b"\xff"])
data = st.lists(pieces | st.binary(max_size=6), max_size=8).map(b"".join)
header = (
    st.sampled_from(
        [
            FILE,
            b'Content-Disposition: form-data; name="other"',
            b'content-disposition:form-data; name="file"',
            b'Content-Disposition: form-data; name="file"; filename="b c.png" ',
            b"Content-Type: image/png",
            b"Content-Type:  image/png\t ",
            b"content-type:image/jpeg",
            b"Content-Type:",
            b"X-Thing:  spaced ",
        ]
    )
    | data
)
part = st.tuples(st.lists(header, max_size=4), data)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    parts=st.lists(part, max_size=5),
    closing=st.sampled_from([b"--\r\n", b"--", b"--epilogue", b"\r\n", b""]),
    cut=st.integers(min_value=0, max_value=400),
    insert=data,
)
def test_the_fast_path_agrees_with_python_multipart(
    parts: list[tuple[list[bytes], bytes]], closing: bytes, cut: int, insert: bytes
) -> None:
    body = build(parts, closing)
    for candidate in (body, body[: len(body) - cut], body[:cut] + insert + body[cut:]):
        fast = plain(candidate)
        if fast is not None:
            assert fast == general(candidate), candidate


quoted_text = st.text(alphabet=st.sampled_from([*'ab;= "\\:/.\tä', "\r"]), max_size=8)
disposition = st.one_of(
    st.builds(lambda n: f'form-data; name="{n}"', quoted_text),
    st.builds(lambda n, f: f'form-data; name="{n}"; filename="{f}"', quoted_text, quoted_text),
    st.builds(lambda n, f: f'form-data; filename="{f}"; name="{n}"', quoted_text, quoted_text),
    st.builds(lambda n: f"form-data; name={n}", quoted_text),
    quoted_text,
)


@settings(max_examples=500, deadline=None)
@given(value=disposition)
def test_the_plain_disposition_reading_agrees_with_python_multipart(value: str) -> None:
    raw = value.encode("latin-1", "replace")
    kind, params = parse_options_header(raw)
    expected = (None, None)
    if kind == b"form-data":
        name, filename = params.get(b"name"), params.get(b"filename")
        expected = (
            name.decode("utf-8", "replace") if name is not None else None,
            filename.decode("utf-8", "replace") if filename is not None else None,
        )
    assert _disposition(raw) == expected


@settings(max_examples=500, deadline=None)
@given(
    value=st.one_of(
        st.builds(
            lambda b, sep: f"multipart/form-data;{sep}boundary={b}",
            st.text(alphabet=st.sampled_from(list("aZ09'()+_,-./:=? \";")), max_size=12),
            st.sampled_from(["", " ", "  ", "\t"]),
        ),
        st.text(st.characters(max_codepoint=255), max_size=30),  # headers arrive as latin-1
    )
)
def test_the_plain_boundary_reading_agrees_with_python_multipart(value: str) -> None:
    assert _boundary(value) == parse_options_header(value)[1].get(b"boundary")


def test_the_plain_readings_take_what_clients_send() -> None:
    assert _PLAIN_DISPOSITION.fullmatch(b'form-data; name="file"; filename="shirt 1.png"')
    assert _PLAIN_MULTIPART_TYPE.fullmatch("multipart/form-data; boundary=a1b2c3d4e5f6")
    assert _disposition(b'form-data; name="file"; filename="C:\\\\x\\\\a.png"') == ("file", "a.png")  # IE6's path


def test_a_body_of_endless_header_lines_is_not_copied_by_the_fast_path() -> None:
    """Found in review: the fast path split the whole body into lines before counting them."""
    import tracemalloc

    body = b"--" + BOUNDARY + b"\r\n" + b"ab\r\n" * 2_500_000 + b"\r\nx\r\n--" + BOUNDARY + b"--"  # 10 MB of headers
    tracemalloc.start()
    try:
        assert _parse_plain(body, BOUNDARY, _Collector("file", 3)) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    assert general(body)[0] == 400  # python-multipart refuses it, streaming
