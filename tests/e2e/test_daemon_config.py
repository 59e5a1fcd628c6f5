"""Daemons of their own: configuration checks at startup, restarts, access control."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from harness.api import Api, new_id
from harness.daemon import Daemon, Pool


@pytest.fixture
def own_daemons(daemon):
    """Extra daemons made by a test; all stopped (and checked) afterwards."""
    made: list[Daemon] = []
    yield made
    problems = []
    for d in made:
        problems += d.stop()
    if not problems:
        for d in made:
            d.remove_files(keep_log=False)
    assert not problems, "\n".join(problems)


def exits_with(d: Daemon, timeout: float = 30) -> tuple[int, str]:
    d.launch()
    try:
        code = d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sessiond kept running with a bad config; log:\n{d.log_tail()}")
    return code, d.log_path.read_text(errors="replace")


def test_unknown_config_key_is_refused_by_name(own_daemons):
    d = Daemon([Pool("py", ready=0)], extra_config='listen_unixx = "/tmp/typo"\n')
    own_daemons.append(d)
    code, log = exits_with(d)
    assert code != 0
    assert "listen_unixx" in log, log


def test_tcp_without_api_keys_is_refused(own_daemons):
    d = Daemon([Pool("py", ready=0)], tcp=True, api_keys=False)
    own_daemons.append(d)
    code, log = exits_with(d)
    assert code != 0
    assert "api_keys" in log, log


def test_invalid_pool_in_config_is_refused(own_daemons):
    d = Daemon([Pool("py", ready=0, memory="lots")])
    own_daemons.append(d)
    code, log = exits_with(d)
    assert code != 0
    assert "memory" in log and "lots" in log, log


def test_unix_socket_without_keys_relies_on_file_permissions(own_daemons):
    d = Daemon([Pool("py", ready=1)], tcp=False, api_keys=False)
    own_daemons.append(d)
    d.start()
    mode = stat.S_IMODE(os.stat(d.socket).st_mode)
    assert mode & 0o007 == 0, oct(mode)  # no access for others
    with d.unix_client() as c:
        assert Api(c, "py").run(new_id(), "'no token needed'") == "no token needed"


def test_api_pools_survive_a_restart_and_sessions_do_not(own_daemons):
    first = Daemon([Pool("py", ready=0)], tcp=False)
    own_daemons.append(first)
    first.start()
    with first.unix_client() as c:
        r = c.put("/management/pools/kept", json={"properties": {"scaleConfiguration": {"maxConcurrentSessions": 3, "readySessionInstances": 0}}})
        assert r.status_code == 201, r.text
        ident = new_id()
        Api(c, "py").run(ident, "x = 1")
    assert first.stop() == []

    second = Daemon([Pool("py", ready=0)], tcp=False, state_dir=first.state_dir)
    own_daemons.append(second)
    second.start()
    with second.unix_client() as c:
        r = c.get("/management/pools/kept")
        assert r.status_code == 200, r.text
        assert r.json()["properties"]["scaleConfiguration"]["maxConcurrentSessions"] == 3
        assert r.json()["properties"]["source"] == "api"
        assert Api(c, "kept").run(new_id(), "'after restart'") == "after restart"
        # Sessions are not kept: the identifier is unknown to the new daemon.
        assert Api(c, "py").session(ident).status_code == 404
