"""Files under /mnt/data: round trips, both API generations, traversal refused."""

from __future__ import annotations

import os
import re

import pytest

from harness.api import GEN2, describe, error_code, raw_request

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def test_upload_list_download_delete_round_trip(py_any, sessions):
    ident = sessions.new(py_any)
    data = os.urandom(200_000) + b"\0\r\n end"
    r = py_any.upload(ident, "blob.bin", data)
    assert r.status_code == 200, describe(r)
    entry = r.json()["value"][0]["properties"]
    assert entry["filename"] == "blob.bin"
    assert entry["size"] == len(data)
    assert RFC3339.match(entry["lastModifiedTime"]), entry

    assert py_any.list_files(ident) == {"blob.bin": len(data)}
    r = py_any.download(ident, "blob.bin")
    assert r.status_code == 200, describe(r)
    assert r.content == data
    # The code sees the same bytes.
    assert py_any.run(ident, "import hashlib\nhashlib.sha256(open('/mnt/data/blob.bin','rb').read()).hexdigest()") == __import__("hashlib").sha256(data).hexdigest()

    r = py_any.delete_file(ident, "blob.bin")
    assert r.status_code in (200, 204), describe(r)
    assert py_any.list_files(ident) == {}
    r = py_any.download(ident, "blob.bin")
    assert r.status_code == 404, describe(r)


def test_upload_names_relative_and_absolute(py, sessions):
    ident = sessions.new(py)
    assert py.upload(ident, "sub/dir/x.txt", b"nested").status_code == 200
    assert py.upload(ident, "/mnt/data/abs.csv", b"a,b\n1,2\n").status_code == 200
    files = py.list_files(ident)
    assert files.get("sub/dir/x.txt") == 6, files
    assert files.get("abs.csv") == 8, files
    assert py.download(ident, "sub/dir/x.txt").content == b"nested"
    assert py.run(ident, "open('sub/dir/x.txt').read()") == "nested"
    assert py.run(ident, "import pandas as pd\nint(pd.read_csv('abs.csv')['b'].sum())", timeout=120) == 2


def test_file_written_by_code_is_listed_and_downloadable(py, sessions):
    ident = sessions.new(py)
    py.run(ident, "with open('/mnt/data/made-by-code.txt', 'w') as f:\n    f.write('hello from the sandbox')")
    files = py.list_files(ident)
    assert files.get("made-by-code.txt") == len("hello from the sandbox"), files
    r = py.download(ident, "made-by-code.txt")
    assert r.status_code == 200 and r.content == b"hello from the sandbox"


def test_percent_escaped_names(py, sessions):
    ident = sessions.new(py)
    name = "with space & ünïcode.txt"
    assert py.upload(ident, name, b"odd").status_code == 200
    assert name in py.list_files(ident)
    from urllib.parse import quote

    r = py.download(ident, quote(name))
    assert r.status_code == 200, describe(r)
    assert r.content == b"odd"


def test_download_of_unknown_file_is_404(py, sessions):
    ident = sessions.new(py)
    r = py.download(ident, "nope.txt")
    assert r.status_code == 404, describe(r)


def test_generation2_files(py, sessions):
    ident = sessions.new(py)
    r = py.http.post(
        f"{py.base}/files",
        params={"identifier": ident, "api-version": GEN2, "path": "/mnt/data"},
        files={"file": ("g2.txt", b"gen two", "application/octet-stream")},
    )
    assert r.status_code in (200, 201), describe(r)
    # What langchain's SessionsBashTool reads: a flat name and sizeInBytes.
    body = r.json()
    assert body.get("name") == "g2.txt", body
    assert body.get("sizeInBytes") == 7, body

    r = py.http.get(f"{py.base}/files", params={"identifier": ident, "api-version": GEN2})
    assert r.status_code == 200, describe(r)
    names = {e.get("name"): e.get("sizeInBytes") for e in r.json()["value"]}
    assert names == {"g2.txt": 7}, r.json()

    r = py.http.get(f"{py.base}/files/g2.txt", params={"identifier": ident, "api-version": GEN2})
    assert r.status_code == 200, describe(r)
    assert r.json().get("name") == "g2.txt"

    r = py.download(ident, "g2.txt", version=GEN2)
    assert r.status_code == 200 and r.content == b"gen two", describe(r)

    r = py.delete_file(ident, "g2.txt")
    assert r.status_code in (200, 204), describe(r)
    r = py.download(ident, "g2.txt", version=GEN2)
    assert r.status_code == 404, describe(r)


# --- traversal -------------------------------------------------------------


def _raw_get(daemon, path: str):
    return raw_request(
        daemon.port,
        "GET",
        path,
        headers={"Authorization": f"Bearer {daemon.api_key}"},
    )


def _refused(status: int, body: bytes) -> bool:
    return 400 <= status < 500 and b"root:" not in body


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../../../../etc/passwd",
        "%2e%2e/%2e%2e/etc/passwd",
        "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "sub/../../etc/passwd",
        "..%5c..%5cetc%5cpasswd",
    ],
)
def test_download_traversal_is_refused(daemon, py, sessions, name):
    ident = sessions.new(py)
    py.run(ident, "open('/mnt/data/inside.txt', 'w').write('ok')")
    for target in (
        f"/pools/py/files/content/{name}?identifier={ident}&api-version=2024-02-02-preview",
        f"/pools/py/files/{name}/content?identifier={ident}&api-version={GEN2}",
    ):
        r = _raw_get(daemon, target)
        assert _refused(r.status, r.body), (target, r.status, r.body[:300])
    # The daemon still serves the session.
    assert py.download(ident, "inside.txt").content == b"ok"


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/evil.txt", "sub/../../escape.txt", "/mnt/data/../escape.txt", ".."])
def test_upload_traversal_is_refused(py, sessions, name):
    ident = sessions.new(py)
    r = py.upload(ident, name, b"should not land")
    assert r.status_code == 400, describe(r)
    assert error_code(r) == "InvalidPath", r.text
    landed = py.run(
        ident,
        "import os\n[p for p in ('/mnt/escape.txt', '/etc/evil.txt', '/escape.txt') if os.path.exists(p)]",
    )
    assert landed == "[]"


def test_symlink_out_of_data_dir_is_not_followed(daemon, py, sessions):
    ident = sessions.new(py)
    py.run(
        ident,
        "import os\n"
        "open('/tmp/victim', 'w').write('outside secret')\n"
        "os.symlink('/etc/passwd', '/mnt/data/passwd-link')\n"
        "os.symlink('/etc', '/mnt/data/etc-link')\n"
        "os.symlink('/tmp/victim', '/mnt/data/victim-link')",
    )
    for name in ("passwd-link", "etc-link/passwd", "victim-link"):
        r = py.download(ident, name)
        assert _refused(r.status_code, r.content), describe(r)
        assert b"outside secret" not in r.content
    # Writing through a link must not reach the target either.
    # (Refusing, or replacing the link by a regular file, are both fine.)
    py.upload(ident, "victim-link", b"overwritten")
    assert py.run(ident, "open('/tmp/victim').read()") == "outside secret"
    r = py.upload(ident, "etc-link/new.txt", b"x")
    assert 400 <= r.status_code < 500, describe(r)
    assert py.run(ident, "import os\nos.path.exists('/etc/new.txt')") is False
