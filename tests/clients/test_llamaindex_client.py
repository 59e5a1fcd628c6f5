"""llama-index-tools-azure-code-interpreter, from PyPI, unchanged, against sessiond."""

from __future__ import annotations

import os
import uuid

import pytest
from llama_index.tools.azure_code_interpreter import AzureCodeInterpreterToolSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def spec(daemon):
    s = AzureCodeInterpreterToolSpec(
        pool_management_endpoint=f"{daemon.tcp_url}/pools/py",
        session_id=f"llama-{uuid.uuid4().hex}",
    )
    s.access_token_provider = lambda: daemon.api_key
    yield s
    with daemon.tcp_client() as c:
        c.delete("/pools/py/session", params={"identifier": s.session_id, "api-version": "2025-02-02-preview"})


def test_code_interpreter(spec):
    r = spec.code_interpreter("numbers = [1, 2, 3]\nsum(numbers)")
    assert r["properties"]["status"] == "Success", r
    assert r["properties"]["result"] == 6
    r = spec.code_interpreter("print(len(numbers))")
    assert r["properties"]["stdout"] == "3\n"
    r = spec.code_interpreter("undefined_name")
    assert r["properties"]["status"] == "Failure"
    assert "NameError" in r["properties"]["stderr"]


def test_code_interpreter_saves_images(daemon, tmp_path):
    s = AzureCodeInterpreterToolSpec(
        pool_management_endpoint=f"{daemon.tcp_url}/pools/py",
        local_save_path=str(tmp_path),
    )
    s.access_token_provider = lambda: daemon.api_key
    try:
        r = s.code_interpreter("import matplotlib.pyplot as plt\nplt.plot([3, 1, 2])\nplt.show()")
        assert r["properties"]["result"]["saved_to_local_path"] is True, r
        pngs = list(tmp_path.glob("*.png"))
        assert len(pngs) == 1
        assert pngs[0].read_bytes().startswith(PNG_SIGNATURE)
    finally:
        with daemon.tcp_client() as c:
            c.delete("/pools/py/session", params={"identifier": s.session_id, "api-version": "2025-02-02-preview"})


def test_files_round_trip(spec, tmp_path):
    local = tmp_path / "numbers.csv"
    payload = b"n\n" + b"".join(b"%d\n" % i for i in range(100))
    local.write_bytes(payload)
    metas = spec.upload_file(local_file_path=str(local))
    assert len(metas) == 1
    assert metas[0].file_full_path == "/mnt/data/numbers.csv"
    assert metas[0].size_in_bytes == len(payload)

    r = spec.code_interpreter(
        "import pandas as pd\ndf = pd.read_csv('/mnt/data/numbers.csv')\n"
        "df['n'].mul(2).to_csv('/mnt/data/doubled.csv', index=False)\nint(df['n'].sum())"
    )
    assert r["properties"]["result"] == 4950, r

    listed = {os.path.basename(m.filename): m.size_in_bytes for m in spec.list_files()}
    assert listed["numbers.csv"] == len(payload)
    assert "doubled.csv" in listed

    dest = tmp_path / "doubled.csv"
    assert spec.download_file_to_local("/mnt/data/doubled.csv", str(dest)) is None
    lines = dest.read_text().split()
    assert lines[0] == "n" and lines[1:4] == ["0", "2", "4"]
    buf = spec.download_file_to_local("numbers.csv")
    assert buf.read() == payload


def test_image_result_shape(spec):
    # Without local_save_path the tool blanks base64_data but keeps the shape.
    r = spec.code_interpreter("import matplotlib.pyplot as plt\nfig = plt.figure()\n_ = plt.plot([1, 4, 9])")
    assert r["properties"]["status"] == "Success", r
    assert r["properties"]["result"]["type"] == "image"
    assert r["properties"]["result"]["format"] == "png"
