"""Sessions are isolated from each other and from the host."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading

import pytest

from harness.api import describe

LIST_PROCS = (
    "import os\n"
    "procs = []\n"
    "for p in os.listdir('/proc'):\n"
    "    if p.isdigit():\n"
    "        try:\n"
    "            procs.append(open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0', b' ').decode()[:200])\n"
    "        except OSError:\n"
    "            pass\n"
    "import json\n"
    "json.dumps(procs)"
)


def test_sessions_never_see_each_others_files(py, sessions):
    a, b = sessions.new(py), sessions.new(py)
    assert py.upload(a, "a-secret.txt", b"only for a").status_code == 200
    py.run(a, "open('/mnt/data/a-written.txt', 'w').write('a too')")
    assert set(py.list_files(a)) == {"a-secret.txt", "a-written.txt"}
    assert py.list_files(b) == {}
    for name in ("a-secret.txt", "a-written.txt"):
        assert py.download(b, name).status_code == 404
    assert py.run(b, "import os\nsorted(os.listdir('/mnt/data'))") == "[]"
    # Nothing of a's is reachable anywhere in b's file system.
    found = py.run(
        b,
        "import os\nhits = []\n"
        "for root, dirs, files in os.walk('/', onerror=lambda e: None):\n"
        "    if root.startswith('/proc'):\n"
        "        dirs[:] = []\n"
        "        continue\n"
        "    hits += [os.path.join(root, f) for f in files if f.startswith('a-secret') or f.startswith('a-written')]\n"
        "hits",
        timeout=120,
    )
    assert found == "[]"


def test_same_identifier_in_two_pools_is_two_sessions(tcp, sessions):
    from harness.api import Api

    py, warm = Api(tcp, "py"), Api(tcp, "warm")
    ident = sessions.new(py)
    sessions.made.append((warm, ident))
    py.run(ident, "only_in_py = 1")
    p = warm.execute(ident, "only_in_py")
    assert p["status"] == "Failure" and "NameError" in p["stderr"], p


def test_sessions_never_see_each_others_processes(py, sessions):
    a, b = sessions.new(py), sessions.new(py)
    py.run(a, "import subprocess\nmarker = subprocess.Popen(['sleep', '3131'])\nmarker.pid")
    assert any("sleep 3131" in p for p in json.loads(py.run(a, LIST_PROCS)))
    assert not any("sleep 3131" in p for p in json.loads(py.run(b, LIST_PROCS)))
    # b cannot signal a's process either: it does not exist in b's pid namespace.
    uid_a = py.run(a, "import os\nos.getuid()")
    uid_b = py.run(b, "import os\nos.getuid()")
    assert uid_a != uid_b, "two sandboxes share a uid"
    assert uid_a != 0 and uid_b != 0
    py.run(a, "marker.kill()")


def test_sandbox_runs_unprivileged(py, sessions):
    ident = sessions.new(py)
    status = py.run(ident, "open('/proc/self/status').read()")
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["CapEff"].strip() == "0000000000000000", fields["CapEff"]
    assert fields["CapBnd"].strip() == "0000000000000000", fields["CapBnd"]
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    uids = fields["Uid"].split()
    assert "0" not in uids, uids
    # Privileged operations fail.
    out = py.run(
        ident,
        "import ctypes, os, errno\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "r = {}\n"
        "r['mount'] = libc.mount(b'none', b'/mnt', b'tmpfs', 0, None) == 0\n"
        "r['unshare'] = libc.unshare(0x10000000) == 0\n"  # CLONE_NEWUSER
        "r['ptrace'] = libc.ptrace(16, 1, None, None) == 0\n"  # PTRACE_ATTACH to pid 1
        "try:\n"
        "    open('/etc/passwd', 'a').close(); r['write_etc'] = True\n"
        "except OSError:\n"
        "    r['write_etc'] = False\n"
        "r['sys'] = os.path.exists('/sys/kernel')\n"
        "import json\njson.dumps(r)",
    )
    assert json.loads(out) == {"mount": False, "unshare": False, "ptrace": False, "write_etc": False, "sys": False}


def test_sandbox_sees_only_its_own_tree(py, sessions):
    ident = sessions.new(py)
    procs = json.loads(py.run(ident, LIST_PROCS))
    # Only the sandbox's own processes: its init, the agent, the interpreter.
    assert not any("sessiond serve" in p for p in procs), procs
    assert len(procs) < 10, procs
    assert py.run(ident, "import socket\nsocket.gethostname()") != socket.gethostname()


def test_egress_is_disabled(py, sessions):
    ident = sessions.new(py)
    # A listener on the host's loopback: the sandbox must not reach it.
    accepted: list = []
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(0.5)
        port = srv.getsockname()[1]
        stop = threading.Event()

        def accept():
            while not stop.is_set():
                try:
                    accepted.append(srv.accept())
                except OSError:
                    pass

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        try:
            p = py.execute(
                ident,
                "import socket\n"
                "s = socket.socket()\n"
                "s.settimeout(5)\n"
                f"s.connect(('127.0.0.1', {port}))",
            )
        finally:
            stop.set()
            t.join()
    assert p["status"] == "Failure", p
    assert "ConnectionRefused" in p["stderr"] or "refused" in p["stderr"], p["stderr"]
    assert accepted == []

    # Only loopback exists.
    ifaces = py.run(
        ident,
        "sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:])",
    )
    assert ifaces == "['lo']"

    # No name resolution.
    p = py.execute(ident, "import socket\nsocket.getaddrinfo('example.com', 80)")
    assert p["status"] == "Failure"
    assert "gaierror" in p["stderr"], p["stderr"]


@pytest.fixture
def target_netns():
    """A network namespace the host reaches over a veth pair, with a TCP
    listener in it: a stand-in for "another machine" that stays on this host."""
    name = f"e2e-{os.getpid() % 100000}"
    host_if, peer_if = f"ve{os.getpid() % 100000}h", f"ve{os.getpid() % 100000}p"
    host_ip, peer_ip = "10.213.77.1", "10.213.77.2"

    def ip(*args, ns=None):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True)

    ip("netns", "add", name)
    listener = None
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        ip("link", "set", peer_if, "netns", name)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{peer_ip}/30", "dev", peer_if, ns=name)
        ip("link", "set", peer_if, "up", ns=name)
        ip("link", "set", "lo", "up", ns=name)
        listener = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c",
             "import socket, sys\n"
             "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
             f"s.bind(('{peer_ip}', 8077)); s.listen()\n"
             "print('ready', flush=True)\n"
             "while True:\n"
             "    c, a = s.accept(); print('accepted', a, flush=True); c.close()\n"],
            stdout=subprocess.PIPE, text=True,
        )
        assert listener.stdout.readline().strip() == "ready"
        # Control: the host reaches it.
        with socket.create_connection((peer_ip, 8077), timeout=5):
            pass
        assert "accepted" in listener.stdout.readline()
        yield peer_ip, 8077, listener
    finally:
        if listener:
            listener.kill()
            listener.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_egress_to_another_host_is_blocked(py, sessions, target_netns):
    addr, port, listener = target_netns
    ident = sessions.new(py)
    p = py.execute(
        ident,
        f"import socket\ns = socket.socket()\ns.settimeout(5)\ns.connect(('{addr}', {port}))",
    )
    assert p["status"] == "Failure", p
    assert "unreachable" in p["stderr"].lower(), p["stderr"]
    # Nothing arrived at the listener.
    readable, _, _ = select.select([listener.stdout], [], [], 1)
    assert not readable, f"the sandbox reached the target: {listener.stdout.readline()!r}"


def test_session_metadata_and_delete(py, sessions):
    ident = sessions.new(py)
    py.run(ident, "x = 1")
    r = py.session(ident)
    assert r.status_code == 200, describe(r)
    assert r.json().get("identifier") == ident, r.json()
    r = py.session(ident, "DELETE")
    assert r.status_code in (200, 204), describe(r)
    r = py.session(ident)
    assert r.status_code == 404, describe(r)
    # The same identifier now gets a fresh session.
    p = py.execute(ident, "x")
    assert p["status"] == "Failure" and "NameError" in p["stderr"], p


def _cgroup_paths(pid: int) -> dict[str, str]:
    out = {}
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else ["unified"]:
            out[c] = path
    return out


def test_sandboxes_are_bounded_by_the_daemons_cgroup_and_their_pool_limits(daemon, tcp, sessions):
    from harness.api import Api

    api = Api(tcp, "hostile")
    ident = sessions.new(api)
    api.run(ident, "1")
    sandbox = api.session(ident).json()["sandboxId"]
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                paths = _cgroup_paths(int(d))
            except OSError:
                continue
            if any(p.rstrip("/").endswith("/" + sandbox) for p in paths.values()):
                pids.append(int(d))
    assert pids, f"no host process in a cgroup named {sandbox}"
    paths = _cgroup_paths(pids[0])
    if daemon.cgroup.version == 1:
        mem_dir = "/sys/fs/cgroup/memory" + paths["memory"]
        pids_dir = "/sys/fs/cgroup/pids" + paths["pids"]
        # Nested under the test cgroup around the daemon.
        assert mem_dir.startswith(str(daemon.cgroup.dirs[0]) + "/"), (mem_dir, daemon.cgroup.dirs)
        assert pids_dir.startswith(str(daemon.cgroup.dirs[1]) + "/"), (pids_dir, daemon.cgroup.dirs)
        assert int(open(mem_dir + "/memory.limit_in_bytes").read()) == 256 << 20
        assert int(open(pids_dir + "/pids.max").read()) == 64
        leaves = [mem_dir, pids_dir]
    else:
        d = "/sys/fs/cgroup" + paths["unified"]
        assert d.startswith(str(daemon.cgroup.dirs[0]) + "/"), (d, daemon.cgroup.dirs)
        assert int(open(d + "/memory.max").read()) == 256 << 20
        assert int(open(d + "/pids.max").read()) == 64
        leaves = [d]
    # Deleting the session removes the sandbox's cgroups.
    assert api.session(ident, "DELETE").status_code == 204
    import time

    deadline = time.monotonic() + 20
    while any(os.path.exists(p) for p in leaves) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(p) for p in leaves), leaves
