"""Ready sets, refill, the max-sessions limit, cooldown, DELETE session."""

from __future__ import annotations

import time

from harness.api import GEN1, GEN2, Api, describe, error_code, new_id
from harness.daemon import pool_status

# Age of the interpreter serving the call, measured inside the sandbox from
# the kernel's process start time.
INTERPRETER_AGE = (
    "import os\n"
    "_hz = os.sysconf('SC_CLK_TCK')\n"
    "_start = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]) / _hz\n"
    "float(open('/proc/uptime').read().split()[0]) - _start"
)


def counts(mgmt, pool: str) -> dict:
    return pool_status(mgmt.pool(pool))


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def test_management_reports_pools(mgmt):
    pools = mgmt.pools()
    assert {"py", "sh", "tiny", "cool", "warm", "hostile"} <= set(pools)
    props = mgmt.pool("sh")["properties"]
    assert props["containerType"] == "Shell"
    assert props["scaleConfiguration"]["maxConcurrentSessions"] == 6
    assert props["scaleConfiguration"]["readySessionInstances"] == 1
    hostile = mgmt.pool("hostile")["properties"]
    assert hostile["memory"] == "256Mi"
    assert hostile["sessionNetworkConfiguration"]["status"] == "EgressDisabled"


def test_new_identifier_is_served_from_ready_pool_which_refills(tcp, mgmt, sessions):
    api = Api(tcp, "warm")
    wait_for(lambda: counts(mgmt, "warm").get("readySessions") == 2, 120, "warm pool to be full")
    before = counts(mgmt, "warm")
    ident = sessions.new(api)
    t0 = time.monotonic()
    age = api.run(ident, INTERPRETER_AGE)
    elapsed = time.monotonic() - t0
    # The interpreter existed before the request was sent: it was pre-warmed.
    assert age > elapsed, (age, elapsed)
    after = counts(mgmt, "warm")
    assert after["allocatedSessions"] == before["allocatedSessions"] + 1
    # The ready set refills in the background.
    wait_for(lambda: counts(mgmt, "warm").get("readySessions") == 2, 120, "ready set to refill")
    # A second new identifier gets another pre-warmed sandbox.
    ident2 = sessions.new(api)
    t0 = time.monotonic()
    age2 = api.run(ident2, INTERPRETER_AGE)
    assert age2 > time.monotonic() - t0
    assert counts(mgmt, "warm")["allocatedSessions"] == before["allocatedSessions"] + 2


def test_max_sessions_gives_documented_error(tcp, mgmt, sessions):
    api = Api(tcp, "tiny")
    a, b = sessions.new(api), sessions.new(api)
    assert api.run(a, "'a'") == "a"
    assert api.run(b, "'b'") == "b"
    third = sessions.new(api)
    r = api.execute_raw(third, "1")
    assert r.status_code == 429, describe(r)
    assert error_code(r) == "SessionPoolFull", r.text
    assert r.headers.get("x-ms-error-code") == "SessionPoolFull"
    retry = r.headers.get("retry-after")
    assert retry is not None and retry.isdigit() and int(retry) >= 1, r.headers
    assert "maxConcurrentSessions" in r.json()["error"]["message"]
    # The refusal did not allocate, and existing sessions keep working.
    assert counts(mgmt, "tiny")["allocatedSessions"] == 2
    assert api.run(a, "'still a'") == "still a"
    # Files are refused the same way for the new identifier.
    r = api.http.get(f"{api.base}/files", params=api.params(third))
    assert r.status_code == 429, describe(r)
    # Freeing a slot lets the new identifier in.
    assert api.session(a, "DELETE").status_code in (200, 204)
    assert api.run(third, "3") == 3


def test_cooldown_destroys_idle_sessions_and_files(tcp, mgmt, sessions):
    api = Api(tcp, "cool")
    ident = sessions.new(api)
    api.run(ident, "secret = 'gone soon'\nopen('/mnt/data/f.txt', 'w').write('x')")
    assert "f.txt" in api.list_files(ident)
    # Each call resets the 2 s cooldown: 4 s of calls every 0.5 s keep it alive.
    for _ in range(8):
        time.sleep(0.5)
        assert api.run(ident, "secret") == "gone soon"
    # Idle: expires. Watched through the management API, which is not a call
    # to the session (GET session would reset the cooldown).
    assert ident in _session_ids(mgmt, "cool")
    wait_for(lambda: ident not in _session_ids(mgmt, "cool"), 15, "the idle session to expire", 0.25)
    assert api.session(ident).status_code == 404
    # Same identifier: a brand-new, empty session.
    p = api.execute(ident, "secret")
    assert p["status"] == "Failure" and "NameError" in p["stderr"], p
    assert api.list_files(ident) == {}


def _session_ids(mgmt, pool: str) -> list[str]:
    r = mgmt.http.get(f"/management/pools/{pool}/sessions")
    assert r.status_code == 200, describe(r)
    return [s.get("identifier") for s in r.json().get("value", [])]


def test_delete_session_destroys_it(tcp, mgmt, sessions):
    api = Api(tcp, "py")
    ident = sessions.new(api)
    api.run(ident, "v = 5\nopen('/mnt/data/keep.txt','w').write('k')")
    allocated = counts(mgmt, "py")["allocatedSessions"]
    r = api.session(ident, "DELETE")
    assert r.status_code == 204, describe(r)
    assert counts(mgmt, "py")["allocatedSessions"] == allocated - 1
    r = api.session(ident)
    assert r.status_code == 404, describe(r)
    assert error_code(r) == "SessionWithIdentifierNotFound", r.text
    p = api.execute(ident, "v")
    assert p["status"] == "Failure" and "NameError" in p["stderr"]
    assert api.list_files(ident) == {}


def test_get_and_delete_of_unknown_identifier_do_not_allocate(tcp, mgmt):
    api = Api(tcp, "py")
    before = counts(mgmt, "py")["allocatedSessions"]
    for method in ("GET", "DELETE"):
        ident = new_id("ghost")
        r = api.session(ident, method)
        assert r.status_code == 404, describe(r)
        assert error_code(r) == "SessionWithIdentifierNotFound", r.text
        assert r.headers.get("x-ms-error-code") == "SessionWithIdentifierNotFound"
    r = api.http.get(f"{api.base}/executions/{new_id('x')}", params=api.params(new_id("ghost"), GEN2))
    assert r.status_code == 404, describe(r)
    assert counts(mgmt, "py")["allocatedSessions"] == before


def test_azure_shaped_base_url(tcp, sessions):
    api = Api(tcp, "py")
    ident = sessions.new(api)
    r = tcp.post(
        "/subscriptions/sub-1/resourceGroups/rg-1/sessionPools/py/code/execute",
        params={"identifier": ident, "api-version": GEN1},
        json={"properties": {"codeInputType": "inline", "executionType": "synchronous", "code": "21 * 2"}},
    )
    assert r.status_code == 200, describe(r)
    assert r.json()["properties"]["result"] == 42
    # Same session through the short base URL.
    assert api.run(ident, "21 * 2") == 42


def test_unknown_pool_is_404(tcp):
    r = tcp.post(
        "/pools/no-such-pool/code/execute",
        params={"identifier": new_id(), "api-version": GEN1},
        json={"properties": {"code": "1"}},
    )
    assert r.status_code == 404, describe(r)
    assert error_code(r), r.text


def test_concurrent_first_calls_share_one_session(daemon, mgmt, sessions):
    from concurrent.futures import ThreadPoolExecutor

    api_for = lambda c: Api(c, "warm")  # noqa: E731
    clients = [daemon.tcp_client() for _ in range(4)]
    try:
        wait_for(lambda: counts(mgmt, "warm").get("readySessions") == 2, 120, "warm pool to be full")
        before = counts(mgmt, "warm")["allocatedSessions"]
        ident = sessions.new(api_for(clients[0]))
        code = "import os\nos.getpid()"
        with ThreadPoolExecutor(len(clients)) as ex:
            pids = list(ex.map(lambda c: api_for(c).run(ident, code), clients))
        assert len(set(pids)) == 1, pids
        assert counts(mgmt, "warm")["allocatedSessions"] == before + 1
    finally:
        for c in clients:
            c.close()
