"""Fixtures shared by the end-to-end suite: one real daemon for the whole run.

The daemon runs the debug binaries of this checkout (or SESSIOND_BIN /
SESSIOND_AGENT_BIN), the cached rootfs (or SESSIOND_ROOTFS), inside a test
cgroup capped at 6 GiB and 4096 processes. Its log is kept and its path is
printed at the end of the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness.api import Api, Management, new_id  # noqa: E402
from harness.daemon import Daemon, Pool  # noqa: E402

# Pools the suite relies on. Small numbers keep a 2-core machine responsive.
POOLS = [
    Pool("py", max_sessions=24, ready=2, cooldown=900, memory="1Gi"),
    Pool("sh", container_type="Shell", max_sessions=6, ready=1, cooldown=900),
    # Full-pool behaviour: two sessions at most.
    Pool("tiny", max_sessions=2, ready=1, cooldown=900),
    # Expiry: idle sessions die after 2 s.
    Pool("cool", max_sessions=6, ready=1, cooldown=2),
    # Ready-set accounting: nobody else allocates here.
    Pool("warm", max_sessions=6, ready=2, cooldown=900),
    # Hostile code: tight limits so bombs hit them fast.
    Pool("hostile", max_sessions=6, ready=1, cooldown=900, memory="256Mi", disk="64Mi", pids=64, cpu=0.5),
]

_STATE: dict = {"passed": 0, "daemon_log": None}


def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        _STATE["passed"] += 1


def pytest_sessionfinish(session, exitstatus):
    # A run that tested nothing must not look green.
    if exitstatus == 0 and _STATE["passed"] == 0:
        session.exitstatus = 1
    # In strict mode (scripts/test, CI) a skip is a failure: on the machines
    # that run the suite every capability it needs is present.
    if os.environ.get("SESSIOND_TEST_STRICT") == "1" and exitstatus == 0:
        skipped = session.config.pluginmanager.get_plugin("terminalreporter").stats.get("skipped", [])
        if skipped:
            session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _STATE["daemon_log"]:
        terminalreporter.write_line(f"sessiond log: {_STATE['daemon_log']}")
    if _STATE["passed"] == 0:
        terminalreporter.write_line("no test passed: failing the run", red=True)
    if os.environ.get("SESSIOND_TEST_STRICT") == "1" and terminalreporter.stats.get("skipped"):
        terminalreporter.write_line("strict mode: skipped tests fail the run", red=True)


@pytest.fixture(scope="session")
def daemon():
    if os.geteuid() != 0:
        pytest.skip("the end-to-end suite needs root (namespaces, cgroups, pivot_root)")
    d = Daemon(POOLS)
    _STATE["daemon_log"] = str(d.log_path)
    try:
        d.start()
    except BaseException as e:
        problems = d.stop()
        raise RuntimeError(f"sessiond failed to start: {e}\n" + "\n".join(problems)) from e
    yield d
    problems = d.stop()
    if not problems:
        d.remove_files(keep_log=True)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def tcp(daemon):
    with daemon.tcp_client() as c:
        yield c


@pytest.fixture(scope="session")
def unix(daemon):
    with daemon.unix_client() as c:
        yield c


@pytest.fixture(scope="session")
def mgmt(unix):
    return Management(unix)


@pytest.fixture(params=["tcp", "unix"])
def transport(request, tcp, unix):
    return {"tcp": tcp, "unix": unix}[request.param]


@pytest.fixture
def py(tcp):
    return Api(tcp, "py")


@pytest.fixture
def py_any(transport):
    """The Python pool over TCP and over the Unix socket."""
    return Api(transport, "py")


@pytest.fixture
def sh(tcp):
    return Api(tcp, "sh")


class Sessions:
    """Hands out fresh identifiers and deletes their sessions afterwards."""

    def __init__(self):
        self.made: list[tuple[Api, str]] = []

    def new(self, api: Api, prefix: str = "t") -> str:
        ident = new_id(prefix)
        self.made.append((api, ident))
        return ident

    def cleanup(self):
        for api, ident in self.made:
            try:
                api.session(ident, "DELETE")
            except Exception:  # the daemon may be gone; teardown reports that
                pass


@pytest.fixture
def sessions(daemon):
    s = Sessions()
    yield s
    s.cleanup()


@pytest.fixture
def alive(daemon, tcp):
    """Asserts, after the test, that the daemon still serves a fresh session."""
    yield
    daemon.check_alive()
    api = Api(tcp, "py")
    ident = new_id("alive")
    try:
        assert api.run(ident, "40 + 2") == 42
    finally:
        api.session(ident, "DELETE")
