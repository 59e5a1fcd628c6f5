"""The `sessiond` command line against the running daemon."""

from __future__ import annotations

import json
import os
import subprocess

from harness.api import new_id


def cli(daemon, *args: str, key: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SESSIOND_API_KEY", None)
    if key:
        env["SESSIOND_API_KEY"] = daemon.api_key
    cmd = [str(daemon.binary), *args, "--socket", str(daemon.socket)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if check:
        assert p.returncode == 0, f"{cmd} -> {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def test_pool_list_table_and_json(daemon):
    out = cli(daemon, "pool", "list").stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "TYPE", "MAX"], out
    rows = {line.split()[0]: line for line in lines[1:]}
    assert {"py", "sh", "tiny", "cool", "warm", "hostile"} <= set(rows)
    assert "Shell" in rows["sh"]
    assert "jail" in out.lower()
    pools = json.loads(cli(daemon, "pool", "list", "-o", "json").stdout)["value"]
    assert {p["name"] for p in pools} >= {"py", "sh"}


def test_pool_create_show_exec_delete(daemon):
    name = "cli-" + new_id("p")[2:10]
    created = json.loads(
        cli(
            daemon, "pool", "create", "--name", name, "--container-type", "PythonLTS",
            "--max-sessions", "2", "--ready-sessions", "1", "--cooldown-period", "60",
            "--memory", "512Mi", "--env-vars", "GREETING=hello", "MODE=cli",
        ).stdout
    )
    assert created["name"] == name
    try:
        shown = json.loads(cli(daemon, "pool", "show", "--name", name).stdout)
        props = shown["properties"]
        assert props["scaleConfiguration"]["maxConcurrentSessions"] == 2
        assert props["memory"] == "512Mi"
        ident = new_id()
        p = cli(daemon, "exec", "--pool", name, "--identifier", ident, "--code", "import os\nprint(os.environ['GREETING'])\n6 * 7")
        assert p.stdout.split() == ["hello", "42"], p.stdout
        p = cli(daemon, "exec", "--pool", name, "--identifier", ident, "--code", "1/0", check=False)
        assert p.returncode != 0
        assert "ZeroDivisionError" in p.stderr
    finally:
        out = cli(daemon, "pool", "delete", "--name", name).stdout
        assert name in out
    p = cli(daemon, "pool", "show", "--name", name, check=False)
    assert p.returncode != 0
    assert "does not exist" in p.stderr, p.stderr


def test_exec_shell_command(daemon):
    ident = new_id()
    p = cli(daemon, "exec", "--pool", "sh", "--identifier", ident, "--shell", "echo via-cli; uname -n")
    assert p.stdout.splitlines()[0] == "via-cli"
    p = cli(daemon, "exec", "--pool", "sh", "--identifier", ident, "--shell", "exit 5", check=False)
    assert p.returncode != 0
    assert "5" in p.stderr
    cli(daemon, "exec", "--pool", "sh", "--identifier", ident, "--shell", "true")


def test_cli_errors_are_actionable(daemon):
    p = cli(daemon, "pool", "list", key=False, check=False)
    assert p.returncode != 0
    assert "--api-key" in p.stderr or "SESSIOND_API_KEY" in p.stderr, p.stderr
    p = subprocess.run(
        [str(daemon.binary), "pool", "list", "--socket", "/nonexistent/sessiond.sock"],
        capture_output=True, text=True, timeout=60,
    )
    assert p.returncode != 0
    assert "sessiond serve" in p.stderr, p.stderr
    p = cli(daemon, "pool", "create", "--name", "Bad_Name", check=False)
    assert p.returncode != 0
    assert "pool name" in p.stderr, p.stderr


def test_host_reports_the_backend_and_why(daemon):
    p = subprocess.run([str(daemon.binary), "host", "-o", "json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["backend"] == "jail"
    assert report["reason"]
    assert report["kvm"]["kind"] and report["kvm"]["summary"], report
    # The daemon reports the same backend on /health and per pool.
    with daemon.unix_client() as c:
        assert c.get("/health").json()["backend"] == "jail"
