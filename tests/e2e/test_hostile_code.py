"""Hostile code is contained by the sandbox's limits; other sessions keep working.

The "hostile" pool runs with memory 256Mi, disk 64Mi, pids 64 and half a CPU.
The daemon itself runs in a test cgroup (6 GiB, 4096 pids), so anything that
escaped a sandbox's limit would fail the run rather than hurt the machine.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from harness.api import Api

pytestmark = pytest.mark.usefixtures("alive")


@pytest.fixture
def hostile(tcp):
    return Api(tcp, "hostile")


class Background:
    """Runs one call in a thread while the test checks others."""

    def __init__(self, fn):
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # reported by join()
            self.error = e

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the hostile call never returned"
        if self.error:
            raise self.error
        return self.result


def sandbox_processes(sandbox_id: str) -> list[int]:
    """Host pids whose cgroup is the sandbox's (the leaf is named after its id)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cg = open(f"/proc/{d}/cgroup").read()
            except OSError:
                continue
            if any(line.rstrip("/").rsplit("/", 1)[-1] == sandbox_id for line in cg.splitlines()):
                found.append(int(d))
    return found


def test_fork_bomb_is_contained(hostile, py, sessions):
    bomber, other = sessions.new(hostile), sessions.new(py)
    assert py.run(other, "'warm'") == "warm"
    # A classic shell fork bomb (every child forks two more, forever), with
    # the shell then waiting, so the call runs into its timeout.
    bomb = "import subprocess\nsubprocess.run(['bash', '-c', ':(){ :|:& };:; sleep 1000'])"
    bg = Background(lambda: hostile.execute(bomber, bomb, timeout=10))
    time.sleep(3)
    # While the bomb runs, another session answers.
    t0 = time.monotonic()
    assert py.run(other, "sum(range(10))") == 45
    assert time.monotonic() - t0 < 30
    p = bg.join(120)
    assert p["status"] == "Failure", p
    assert "timed out" in p["stderr"], p["stderr"]
    # The bomb is gone: the session's tree is back to a handful of processes.
    time.sleep(1)
    procs = hostile.run(bomber, "import os\nlen([p for p in os.listdir('/proc') if p.isdigit()])")
    assert procs < 10, procs


def test_detached_fork_bomb_dies_with_its_session(hostile, py, sessions):
    bomber, other = sessions.new(hostile), sessions.new(py)
    # The bomb's first call returns at once and leaves the bomb running
    # detached inside the sandbox, bounded by the pool's pids limit.
    hostile.execute(bomber, "import os\nos.system(\"bash -c ':(){ :|:& };:'\")", timeout=10)
    sandbox = hostile.session(bomber).json()["sandboxId"]
    time.sleep(2)
    pids = sandbox_processes(sandbox)
    assert 10 < len(pids) <= 64, len(pids)
    assert py.run(other, "'unaffected'") == "unaffected"
    # Deleting the session kills every process of the sandbox.
    assert hostile.session(bomber, "DELETE").status_code == 204
    deadline = time.monotonic() + 20
    while sandbox_processes(sandbox) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sandbox_processes(sandbox) == []


def test_fork_loop_hits_the_pids_limit(hostile, sessions):
    ident = sessions.new(hostile)
    p = hostile.execute(
        ident,
        "import os, time\n"
        "kids = []\n"
        "try:\n"
        "    while True:\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        kids.append(pid)\n"
        "finally:\n"
        "    print('forked', len(kids))\n"
        "    for k in kids:\n"
        "        os.kill(k, 9)\n"
        "        os.waitpid(k, 0)",
        timeout=60,
    )
    assert p["status"] == "Failure", p
    assert "BlockingIOError" in p["stderr"] or "Resource temporarily unavailable" in p["stderr"], p["stderr"]
    forked = int(p["stdout"].split("forked")[1].split()[0])
    assert 10 < forked < 64, forked  # bounded by the pool's pids limit, not the host's
    assert hostile.run(ident, "6 * 7") == 42


def test_memory_hog_is_killed_and_session_recovers(hostile, py, sessions):
    hog, other = sessions.new(hostile), sessions.new(py)
    assert py.run(other, "'ok'") == "ok"
    bg = Background(
        lambda: hostile.execute(
            hog,
            "chunks = []\nwhile True:\n    chunks.append(bytearray(b'x' * (16 << 20)))",
            timeout=120,
        )
    )
    assert py.run(other, "1 + 1") == 2
    p = bg.join(180)
    assert p["status"] == "Failure", p
    assert "memory" in p["stderr"].lower(), p["stderr"]
    # The session is usable again (the interpreter may have been restarted).
    assert hostile.run(hog, "'alive'") == "alive"
    assert py.run(other, "'still ok'") == "still ok"


def test_disk_filler_hits_its_quota(hostile, py, sessions):
    filler, other = sessions.new(hostile), sessions.new(py)
    p = hostile.execute(
        filler,
        "block = b'\\0' * (1 << 20)\n"
        "with open('/mnt/data/fill.bin', 'wb') as f:\n"
        "    while True:\n"
        "        f.write(block)\n"
        "        f.flush()",
        timeout=120,
    )
    assert p["status"] == "Failure", p
    assert "No space left on device" in p["stderr"], p["stderr"]
    size = hostile.list_files(filler)["fill.bin"]
    assert size <= 64 << 20, size
    # /tmp shares the sandbox's quota: it cannot be used to go around it.
    p = hostile.execute(
        filler,
        "with open('/tmp/more.bin', 'wb') as f:\n    f.write(b'\\0' * (32 << 20))",
        timeout=60,
    )
    assert p["status"] == "Failure", p
    # Deleting the file frees the space again.
    assert hostile.delete_file(filler, "fill.bin").status_code in (200, 204)
    assert hostile.run(filler, "open('/mnt/data/small.txt','w').write('fits')") == 4
    assert py.run(other, "'unaffected'") == "unaffected"


def test_cpu_spinner_does_not_starve_others(hostile, py, sessions):
    spinner, other = sessions.new(hostile), sessions.new(py)
    bg = Background(lambda: hostile.execute(spinner, "while True:\n    pass", timeout=8))
    time.sleep(1)
    t0 = time.monotonic()
    for _ in range(5):
        assert py.run(other, "2 ** 10") == 1024
    assert time.monotonic() - t0 < 30
    p = bg.join(60)
    assert p["status"] == "Failure"
