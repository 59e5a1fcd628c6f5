"""Thin helpers over the Azure-shaped data plane, as clients call it."""

from __future__ import annotations

import json
import socket
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

import httpx

GEN1 = "2024-02-02-preview"
GEN2 = "2025-02-02-preview"
GEN2_OCT = "2025-10-02-preview"


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def error_code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def describe(r: httpx.Response) -> str:
    return f"{r.request.method} {r.request.url} -> {r.status_code} {r.text[:600]}"


@dataclass
class Api:
    """One pool's data plane reached through one httpx client."""

    http: httpx.Client
    pool: str

    @property
    def base(self) -> str:
        return f"/pools/{self.pool}"

    def params(self, ident: str, version: str = GEN1, **extra) -> dict:
        return {"identifier": ident, "api-version": version, **extra}

    # generation 1 ---------------------------------------------------------
    def execute_raw(self, ident: str, code: str, timeout: int | None = None, **kw) -> httpx.Response:
        props: dict = {"codeInputType": "inline", "executionType": "synchronous", "code": code}
        if timeout is not None:
            props["timeoutInSeconds"] = timeout
        return self.http.post(
            f"{self.base}/code/execute", params=self.params(ident), json={"properties": props}, **kw
        )

    def execute(self, ident: str, code: str, timeout: int | None = None) -> dict:
        r = self.execute_raw(ident, code, timeout)
        assert r.status_code == 200, describe(r)
        props = r.json()["properties"]
        for key in ("status", "stdout", "stderr", "result"):
            assert key in props, f"{key!r} missing from {props}"
        return props

    def run(self, ident: str, code: str, timeout: int | None = None):
        """Executes `code`, requires success and returns its result."""
        p = self.execute(ident, code, timeout)
        assert p["status"] == "Success", p
        return p["result"]

    def upload(self, ident: str, name: str, data: bytes, version: str = GEN1) -> httpx.Response:
        path = f"{self.base}/files/upload" if version == GEN1 else f"{self.base}/files"
        return self.http.post(
            path,
            params=self.params(ident, version),
            files={"file": (name, data, "application/octet-stream")},
        )

    def list_files(self, ident: str) -> dict[str, int]:
        r = self.http.get(f"{self.base}/files", params=self.params(ident))
        assert r.status_code == 200, describe(r)
        return {e["properties"]["filename"]: e["properties"]["size"] for e in r.json()["value"]}

    def download(self, ident: str, name: str, version: str = GEN1) -> httpx.Response:
        path = (
            f"{self.base}/files/content/{name}"
            if version == GEN1
            else f"{self.base}/files/{name}/content"
        )
        return self.http.get(path, params=self.params(ident, version))

    def delete_file(self, ident: str, name: str) -> httpx.Response:
        return self.http.delete(f"{self.base}/files/{name}", params=self.params(ident, GEN2))

    # generation 2 ---------------------------------------------------------
    def executions(self, ident: str, body: dict, version: str = GEN2) -> httpx.Response:
        return self.http.post(f"{self.base}/executions", params=self.params(ident, version), json=body)

    def session(self, ident: str, method: str = "GET") -> httpx.Response:
        return self.http.request(method, f"{self.base}/session", params=self.params(ident, GEN2))

    def delete_session(self, ident: str) -> None:
        r = self.session(ident, "DELETE")
        assert r.status_code in (200, 204, 404), describe(r)


class Management:
    def __init__(self, http: httpx.Client):
        self.http = http

    def pools(self) -> dict[str, dict]:
        r = self.http.get("/management/pools")
        assert r.status_code == 200, describe(r)
        return {p["name"]: p for p in r.json()["value"]}

    def pool(self, name: str) -> dict:
        r = self.http.get(f"/management/pools/{name}")
        assert r.status_code == 200, describe(r)
        return r.json()


# A raw HTTP/1.1 exchange, for requests httpx would refuse or normalise
# (dot segments, malformed framing, streaming an oversized body).
@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def _read_response(sock: socket.socket) -> RawResponse:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response head: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest[:n]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body, data = b"", rest
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += data[:size]
            data = data[size + 2 :]
    else:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest
    return RawResponse(status, headers, body)


def raw_request(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes | Iterable[bytes] = b"",
    timeout: float = 60,
) -> RawResponse:
    """Sends one request exactly as given. A body iterator is sent chunked.

    If the server answers and closes before the body is fully sent (as it
    should for an oversized upload), the early answer is returned.
    """
    headers = dict(headers or {})
    headers.setdefault("Host", f"127.0.0.1:{port}")
    headers.setdefault("Connection", "close")
    streaming = not isinstance(body, (bytes, bytearray))
    if streaming:
        headers.setdefault("Transfer-Encoding", "chunked")
    elif "Content-Length" not in headers:
        headers["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(head.encode("latin-1") + b"\r\n")
            if streaming:
                for chunk in body:  # type: ignore[union-attr]
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                s.sendall(b"0\r\n\r\n")
            elif body:
                s.sendall(body)  # type: ignore[arg-type]
        except (BrokenPipeError, ConnectionResetError):
            pass
        return _read_response(s)


def multipart_stream(name: str, total: int, chunk: int = 1 << 20, boundary: str = "e2eboundary") -> tuple[str, Iterator[bytes]]:
    """A multipart/form-data body of `total` zero bytes, produced lazily."""

    def gen() -> Iterator[bytes]:
        yield (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        block = b"\0" * chunk
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            yield block if n == chunk else block[:n]
            sent += n
        yield f"\r\n--{boundary}--\r\n".encode()

    return f"multipart/form-data; boundary={boundary}", gen()
