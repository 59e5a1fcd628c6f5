"""Bad requests get their precise error, and the daemon keeps serving."""

from __future__ import annotations

import time
from urllib.parse import quote

import httpx
import pytest

from harness.api import GEN1, GEN2, Api, describe, multipart_stream, new_id, raw_request

pytestmark = pytest.mark.usefixtures("alive")

VALIDATION = "SessionRequestValidationFailed"


def assert_error(r: httpx.Response, status: int, code: str | None = None):
    assert r.status_code == status, describe(r)
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
        assert r.headers.get("x-ms-error-code") == code, r.headers


def test_malformed_json(py):
    ident = new_id()
    url = f"{py.base}/code/execute"
    for body in (b"{not json", b"", b"[1, 2]", b'{"properties": {"code": 5}}', b'{"properties": {}}'):
        r = py.http.post(url, params=py.params(ident), content=body, headers={"Content-Type": "application/json"})
        assert_error(r, 400)
    # Nothing was allocated for these.
    assert py.session(ident).status_code == 404


def test_wrong_api_version(py):
    ident = new_id()
    for params in (
        {"identifier": ident, "api-version": "2020-01-01"},
        {"identifier": ident, "api-version": ""},
        {"identifier": ident},
    ):
        r = py.http.post(f"{py.base}/code/execute", params=params, json={"properties": {"code": "1"}})
        assert_error(r, 400, VALIDATION)
        assert "api-version" in r.json()["error"]["message"]
    assert py.session(ident).status_code == 404


@pytest.mark.parametrize("version", ["2024-02-02-preview", "2024-08-02-preview", "2024-10-02-preview", "2025-02-02-preview", "2025-10-02-preview"])
def test_every_documented_api_version_is_accepted(py, sessions, version):
    ident = sessions.new(py)
    r = py.http.get(f"{py.base}/files", params={"identifier": ident, "api-version": version})
    assert r.status_code == 200, describe(r)


@pytest.mark.parametrize(
    "ident",
    [
        "abc",  # too short
        "x" * 129,  # too long
        "has space",
        "tab\there",
        "new\nline",
        "ünïcode-id",
        "null\x00byte",
        "",
    ],
)
def test_bad_identifiers(py, ident):
    # Percent-encoded by hand: httpx would send a space as '+', a legal character.
    r = py.http.post(
        f"{py.base}/code/execute?identifier={quote(ident, safe='')}&api-version={GEN1}",
        json={"properties": {"code": "1"}},
    )
    assert_error(r, 400, VALIDATION)
    assert "identifier" in r.json()["error"]["message"]


def test_missing_identifier(py):
    r = py.http.post(f"{py.base}/code/execute", params={"api-version": GEN1}, json={"properties": {"code": "1"}})
    assert_error(r, 400, VALIDATION)


@pytest.mark.parametrize("ident", ["abcd", "y" * 128, "a|b-c&d^e%f$g#h(i)j{k}l[m]n;o<p>q", "u_v:w.x@y+z=1!2~3*4"])
def test_good_identifiers_at_the_edges(py, sessions, ident):
    sessions.made.append((py, ident))
    r = py.execute_raw(ident, "'ok'")
    assert r.status_code == 200, describe(r)
    assert r.json()["properties"]["result"] == "ok"


def test_raw_unencoded_identifier_characters(daemon, py, sessions):
    # Some clients send | { } raw in the query string.
    ident = "raw|{id}-" + new_id()
    sessions.made.append((py, ident))
    body = b'{"properties": {"code": "40 + 2"}}'
    r = raw_request(
        daemon.port,
        "POST",
        f"/pools/py/code/execute?identifier={ident}&api-version={GEN1}",
        headers={"Authorization": f"Bearer {daemon.api_key}", "Content-Type": "application/json"},
        body=body,
    )
    assert r.status == 200, r.body
    assert r.json()["properties"]["result"] == 42
    # The same session, reached with the identifier percent-encoded.
    assert py.run(ident, "40 + 2") == 42
    r = py.session(ident)
    assert r.status_code == 200 and r.json()["identifier"] == ident


def test_missing_or_wrong_token(daemon, sessions):
    ident = new_id()
    with httpx.Client(base_url=daemon.tcp_url, timeout=30) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {daemon.api_key}"}, {"Authorization": "Bearer"}):
            r = anon.post(
                "/pools/py/code/execute",
                params={"identifier": ident, "api-version": GEN1},
                json={"properties": {"code": "1"}},
                headers=headers,
            )
            assert r.status_code == 401, describe(r)
            assert r.json()["error"]["code"], r.text
        r = anon.get("/management/pools")
        assert r.status_code == 401, describe(r)
    with daemon.unix_client() as c:
        c.headers.pop("Authorization")
        r = c.get("/management/pools")
        assert r.status_code == 401, describe(r)
    with daemon.tcp_client() as c:
        assert c.get("/pools/py/session", params={"identifier": ident, "api-version": GEN2}).status_code == 404


def test_unknown_route_and_method(py):
    ident = new_id()
    r = py.http.post(f"{py.base}/no/such/route", params=py.params(ident), json={})
    assert r.status_code in (400, 404, 405), describe(r)
    r = py.http.put(f"{py.base}/code/execute", params=py.params(ident), json={})
    assert r.status_code in (400, 405), describe(r)
    assert py.session(ident).status_code == 404


def test_oversized_upload_with_content_length(daemon, py, sessions):
    ident = sessions.new(py)
    py.run(ident, "1")
    ctype, body = multipart_stream("big.bin", 130 << 20)
    size = 130 << 20
    t0 = time.monotonic()
    r = raw_request(
        daemon.port,
        "POST",
        f"/pools/py/files/upload?identifier={quote(ident)}&api-version={GEN1}",
        headers={
            "Authorization": f"Bearer {daemon.api_key}",
            "Content-Type": ctype,
            "Content-Length": str(size + 400),
        },
        body=b"",
    )
    assert r.status == 413, r.body[:300]
    assert r.json()["error"]["code"] == "PayloadTooLarge", r.body
    assert time.monotonic() - t0 < 30
    assert "big.bin" not in py.list_files(ident)


def upload_streamed(daemon, ident, name, size, timeout):
    """Uploads `size` zero bytes as `name` to pool py, chunked, without buffering them."""
    ctype, body = multipart_stream(name, size)
    return raw_request(
        daemon.port,
        "POST",
        f"/pools/py/files/upload?identifier={quote(ident)}&api-version={GEN1}",
        headers={"Authorization": f"Bearer {daemon.api_key}", "Content-Type": ctype},
        body=body,
        timeout=timeout,
    )


def test_oversized_upload_streamed_chunked(daemon, py, sessions):
    ident = sessions.new(py)
    py.run(ident, "1")
    r = upload_streamed(daemon, ident, "big.bin", 129 << 20, timeout=120)
    assert r.status == 413, r.body[:300]
    assert r.json()["error"]["code"] == "PayloadTooLarge", r.body
    # No partial file is left behind, and the session still works.
    assert "big.bin" not in py.list_files(ident)
    assert py.run(ident, "import os\nos.listdir('/mnt/data')") == "[]"


def test_upload_just_under_the_limit_streams(daemon, tcp, sessions):
    # 100 MiB goes through chunked without the daemon buffering it into memory
    # twice; the hostile pool's 64 MiB disk is too small, so use py.
    api = Api(tcp, "py")
    ident = sessions.new(api)
    r = upload_streamed(daemon, ident, "large.bin", 100 << 20, timeout=300)
    assert r.status == 200, r.body[:300]
    assert api.list_files(ident)["large.bin"] == 100 << 20
    # And back, streamed.
    total = 0
    with api.http.stream("GET", f"{api.base}/files/content/large.bin", params=api.params(ident)) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_bytes():
            assert not chunk.strip(b"\0"), "unexpected content"
            total += len(chunk)
    assert total == 100 << 20


def test_multipart_without_file_field(py, sessions):
    ident = sessions.new(py)
    r = py.http.post(
        f"{py.base}/files/upload", params=py.params(ident), files={"comment": (None, b"a form field, not a file")}
    )
    assert_error(r, 400)
    r = py.http.post(f"{py.base}/files/upload", params=py.params(ident), content=b"plain", headers={"Content-Type": "text/plain"})
    assert_error(r, 400)
