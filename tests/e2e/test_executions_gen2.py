"""The generation-2 `executions` API: Python code and shell commands."""

from __future__ import annotations

import pytest

from harness.api import GEN2, GEN2_OCT, describe


def test_python_code_execution(py, sessions):
    ident = sessions.new(py)
    body = {"codeInputType": "Inline", "executionType": "Synchronous", "code": "x = 6\nx * 7", "timeoutInSeconds": 60}
    r = py.executions(ident, body)
    assert r.status_code in (200, 201), describe(r)
    e = r.json()
    assert e["status"] == "Succeeded", e
    assert e["identifier"] == ident
    assert e["executionType"] == "Synchronous"
    assert e["id"]
    assert str(e["result"]["executionResult"]) == "42", e
    assert "stdout" in e["result"] and "stderr" in e["result"]
    # State is shared with generation 1 calls on the same session.
    assert py.run(ident, "x") == 6

    r = py.http.get(f"{py.base}/executions/{e['id']}", params=py.params(ident, GEN2))
    assert r.status_code == 200, describe(r)
    again = r.json()
    assert again["id"] == e["id"] and again["status"] == "Succeeded"


def test_python_execution_failure(py, sessions):
    ident = sessions.new(py)
    r = py.executions(ident, {"codeInputType": "inline", "executionType": "synchronous", "code": "1/0"})
    assert r.status_code in (200, 201), describe(r)
    e = r.json()
    assert e["status"] == "Failed", e
    assert "ZeroDivisionError" in e["result"]["stderr"]


def test_shell_command_exit_code_is_status(sh, sessions):
    ident = sessions.new(sh)
    r = sh.executions(ident, {"shellCommand": "echo hello; echo oops >&2"})
    assert r.status_code in (200, 201), describe(r)
    e = r.json()
    assert e["status"] == "0", e
    assert e["result"]["stdout"] == "hello\n"
    assert e["result"]["stderr"] == "oops\n"

    e = sh.executions(ident, {"shellCommand": "exit 3"}).json()
    assert e["status"] == "3", e

    # Files persist across commands in the session; cwd is /mnt/data.
    assert sh.executions(ident, {"shellCommand": "pwd; echo kept > note.txt"}).json()["result"]["stdout"] == "/mnt/data\n"
    e = sh.executions(ident, {"shellCommand": "cat /mnt/data/note.txt"}).json()
    assert e["result"]["stdout"] == "kept\n"

    r = sh.http.get(f"{sh.base}/executions/{e['id']}", params=sh.params(ident, GEN2))
    assert r.status_code == 200, describe(r)
    assert r.json()["result"]["stdout"] == "kept\n"


def test_shell_exec_command_and_args_and_stdin(sh, sessions):
    ident = sessions.new(sh)
    r = sh.executions(ident, {"execCommandAndArgs": ["printf", "%s-%s", "a", "b"]}, version=GEN2_OCT)
    assert r.status_code in (200, 201), describe(r)
    assert r.json()["result"]["stdout"] == "a-b"
    r = sh.executions(ident, {"shellCommand": "tr a-z A-Z", "stdin": "shout\n"}, version=GEN2_OCT)
    assert r.json()["result"]["stdout"] == "SHOUT\n", r.json()


def test_shell_timeout(sh, sessions):
    ident = sessions.new(sh)
    r = sh.executions(ident, {"shellCommand": "sleep 600", "timeoutInSeconds": 2})
    assert r.status_code in (200, 201), describe(r)
    e = r.json()
    assert e["status"] not in ("0", "Succeeded"), e
    assert sh.executions(ident, {"shellCommand": "echo after"}).json()["result"]["stdout"] == "after\n"


def test_shell_output_length_cap(sh, sessions):
    ident = sessions.new(sh)
    r = sh.executions(
        ident, {"shellCommand": "head -c 100000 /dev/zero | tr '\\0' x", "outputStreamsMaxLength": 100}, version=GEN2_OCT
    )
    assert r.status_code in (200, 201), describe(r)
    assert len(r.json()["result"]["stdout"]) <= 100 + 64  # a short truncation note may follow


def test_shell_pool_runs_gen1_code_as_a_command(sh, sessions):
    ident = sessions.new(sh)
    p = sh.execute(ident, "echo from-gen1; exit 0")
    assert p["status"] == "Success", p
    assert p["stdout"] == "from-gen1\n"
    p = sh.execute(ident, "exit 4")
    assert p["status"] == "Failure", p


def test_unknown_execution_id(py, sessions):
    ident = sessions.new(py)
    py.run(ident, "1")
    r = py.http.get(f"{py.base}/executions/00000000-0000-0000-0000-000000000000", params=py.params(ident, GEN2))
    assert r.status_code == 404, describe(r)


@pytest.mark.parametrize("body", [{"code": 5}, {}, {"codeInputType": "Inline"}, {"code": "1", "executionType": "Sometimes"}])
def test_bad_execution_bodies(py, sessions, body):
    ident = sessions.new(py)
    r = py.executions(ident, body)
    assert r.status_code == 400, describe(r)
    assert r.json()["error"]["code"], r.text
