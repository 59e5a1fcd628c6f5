"""langchain-azure-dynamic-sessions, from PyPI, unchanged, against sessiond."""

from __future__ import annotations

import io
import json
import time
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import langchain_azure_dynamic_sessions as lc


@pytest.fixture
def endpoint(daemon):
    return lambda pool: f"{daemon.tcp_url}/pools/{pool}"


@pytest.fixture
def token(daemon):
    return lambda: daemon.api_key


def test_python_repl_tool_runs_code(endpoint, token):
    tool = lc.SessionsPythonREPLTool(pool_management_endpoint=endpoint("py"), access_token_provider=token)
    try:
        out = json.loads(tool.invoke("x = 6\nx * 7"))
        assert out["result"] == 42, out
        out = json.loads(tool.invoke("print('hi from langchain'); x"))
        assert out["result"] == 6
        assert out["stdout"] == "hi from langchain\n"
        props = tool.execute("1/0")
        assert props["status"] == "Failure"
        assert "ZeroDivisionError" in props["stderr"]
        # An image result: the tool strips base64 from the text it gives the model.
        out = json.loads(tool.invoke("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()"))
        assert out["result"]["type"] == "image", out
        assert "base64_data" not in out["result"]
    finally:
        tool.close()


def test_python_repl_tool_moves_files(endpoint, token, tmp_path):
    tool = lc.SessionsPythonREPLTool(pool_management_endpoint=endpoint("py"), access_token_provider=token)
    try:
        meta = tool.upload_file(data=io.BytesIO(b"a,b\n1,2\n3,4\n"), remote_file_path="data.csv")
        assert meta.filename == "data.csv"
        assert meta.size_in_bytes == 12
        assert meta.full_path == "/mnt/data/data.csv"

        local = tmp_path / "local.txt"
        local.write_bytes(b"from a local file")
        meta = tool.upload_file(local_file_path=str(local))
        assert meta.filename == "local.txt"

        out = json.loads(tool.invoke("import pandas as pd\nint(pd.read_csv('/mnt/data/data.csv')['b'].sum())"))
        assert out["result"] == 6, out
        tool.invoke("open('/mnt/data/out.txt', 'w').write('written by code')")

        names = {f.filename: f.size_in_bytes for f in tool.list_files()}
        assert names == {"data.csv": 12, "local.txt": 17, "out.txt": 15}, names

        assert tool.download_file(remote_file_path="out.txt").read() == b"written by code"
        dest = tmp_path / "dl.txt"
        tool.download_file(remote_file_path="local.txt", local_file_path=str(dest))
        assert dest.read_bytes() == b"from a local file"
    finally:
        tool.close()


def test_close_deletes_the_session(endpoint, token, daemon):
    tool = lc.SessionsPythonREPLTool(pool_management_endpoint=endpoint("py"), access_token_provider=token)
    tool.invoke("kept = 1")
    old = tool.session_id
    tool.close()  # DELETE session in a background thread
    with daemon.tcp_client() as c:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = c.get("/pools/py/session", params={"identifier": old, "api-version": "2025-02-02-preview"})
            if r.status_code == 404:
                break
            time.sleep(0.2)
        assert r.status_code == 404, r.text


def test_bash_tool(endpoint, token, tmp_path):
    if not hasattr(lc, "SessionsBashTool"):
        pytest.skip("optional: this langchain-azure-dynamic-sessions has no SessionsBashTool")
    tool = lc.SessionsBashTool(pool_management_endpoint=endpoint("sh"), access_token_provider=token)
    try:
        out = json.loads(tool.invoke("echo hello; echo bad >&2"))
        assert out == {"stdout": "hello\n", "stderr": "bad\n", "exitCode": 0}, out
        out = json.loads(tool.invoke("false"))
        assert out["exitCode"] == 1
        meta = tool.upload_file(data=io.BytesIO(b"shell data"), remote_file_path="s.txt")
        assert meta.filename == "s.txt"
        assert meta.size_in_bytes == 10
        out = json.loads(tool.invoke("wc -c < /mnt/data/s.txt"))
        assert out["stdout"].strip() == "10"
        names = {f.filename: f.size_in_bytes for f in tool.list_files()}
        assert names == {"s.txt": 10}, names
        assert tool.download_file(remote_file_path="s.txt").read() == b"shell data"
    finally:
        tool.close()
