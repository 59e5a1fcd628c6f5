"""Starts the real `sessiond serve` with a temporary configuration."""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .cgroup import TestCgroup

REPO = Path(__file__).resolve().parents[2]


def find_binary(env: str, name: str) -> Path:
    """The binary named by `env`, else the debug build in the checkout."""
    p = Path(os.environ.get(env) or REPO / "target" / "debug" / name)
    if not p.is_file():
        raise RuntimeError(f"{p} is missing: run `cargo build --workspace` (or set {env})")
    return p


def find_rootfs() -> Path:
    """SESSIOND_ROOTFS, else the cached build (scripts/build-rootfs is instant when cached)."""
    if os.environ.get("SESSIOND_ROOTFS"):
        return Path(os.environ["SESSIOND_ROOTFS"])
    out = subprocess.run(
        [str(REPO / "scripts" / "build-rootfs")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


@dataclass
class Pool:
    name: str
    container_type: str = "PythonLTS"
    max_sessions: int = 10
    ready: int = 1
    cooldown: int = 300
    cpu: float | None = None
    memory: str | None = None
    disk: str | None = None
    pids: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def toml(self) -> str:
        lines = [
            "[[pools]]",
            f"name = {toml_value(self.name)}",
            f"containerType = {toml_value(self.container_type)}",
            f"maxConcurrentSessions = {self.max_sessions}",
            f"readySessionInstances = {self.ready}",
            f"cooldownPeriodInSeconds = {self.cooldown}",
        ]
        for key in ("cpu", "memory", "disk", "pids"):
            v = getattr(self, key)
            if v is not None:
                lines.append(f"{key} = {toml_value(v)}")
        if self.env:
            lines.append("[pools.env]")
            lines += [f"{k} = {toml_value(v)}" for k, v in self.env.items()]
        return "\n".join(lines) + "\n"


class DaemonFailed(RuntimeError):
    pass


class Daemon:
    """One `sessiond serve` process inside its own test cgroup."""

    def __init__(
        self,
        pools: list[Pool],
        *,
        memory_cap: int = 6 << 30,
        pids_cap: int = 4096,
        tcp: bool = True,
        api_keys: bool = True,
        extra_config: str = "",
        state_dir: Path | None = None,
    ):
        self.pools = pools
        self.tcp = tcp
        self.with_keys = api_keys
        self.extra_config = extra_config
        # A short directory: Unix socket paths are limited to 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="sessiond-e2e-", dir="/tmp"))
        self.socket = self.dir / "api.sock"
        self.state_dir = state_dir or self.dir / "state"
        self.run_dir = self.dir / "run"
        self.log_path = self.dir / "sessiond.log"
        self.port = free_tcp_port()
        self.api_key = "e2e-" + secrets.token_hex(16)
        self.binary = find_binary("SESSIOND_BIN", "sessiond")
        self.agent = find_binary("SESSIOND_AGENT_BIN", "sessiond-agent")
        self.rootfs = find_rootfs()
        self.config_path = self.dir / "config.toml"
        self.cgroup = TestCgroup(f"sessiond-e2e-{os.getpid()}-{self.dir.name[-8:]}", memory_cap, pids_cap)
        self.proc: subprocess.Popen | None = None

    @property
    def tcp_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        lines = [
            "# written by tests/harness/daemon.py",
            f"listen_unix = {toml_value(str(self.socket))}",
            f"state_dir = {toml_value(str(self.state_dir))}",
            f"run_dir = {toml_value(str(self.run_dir))}",
            f"rootfs = {toml_value(str(self.rootfs))}",
            f"agent_binary = {toml_value(str(self.agent))}",
        ]
        if self.tcp:
            lines.append(f"listen_tcp = {toml_value(f'127.0.0.1:{self.port}')}")
        if self.with_keys:
            lines.append(f"api_keys = {toml_value([self.api_key])}")
        text = "\n".join(lines) + "\n" + self.extra_config + "\n"
        text += "\n".join(p.toml() for p in self.pools)
        self.config_path.write_text(text)

    def start(self, timeout: float = 180) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Starts the process without waiting for it to serve."""
        self.write_config()
        self.cgroup.create()
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info,sessiond=debug")
        env.setdefault("RUST_BACKTRACE", "1")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=self._child_setup,
        )
        log.close()

    def _child_setup(self) -> None:
        """Runs in the daemon's process before exec."""
        self.cgroup.enter()
        # If pytest dies (killed by a CI timeout, say), the daemon is told to
        # stop, and it takes its sandboxes down with it.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def unix_client(self, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.with_keys else {}
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://sessiond",
            headers=headers,
            timeout=kw.pop("timeout", 120),
            **kw,
        )

    def tcp_client(self, **kw) -> httpx.Client:
        return httpx.Client(
            base_url=self.tcp_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=kw.pop("timeout", 120),
            **kw,
        )

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise DaemonFailed(f"sessiond exited (status {code}); log tail:\n{self.log_tail()}")

    def wait_ready(self, timeout: float) -> None:
        """Waits until both listeners answer and every pool's ready set is full."""
        deadline = time.monotonic() + timeout
        last = "nothing yet"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with self.unix_client(timeout=5) as c:
                    r = c.get("/management/pools")
                    if r.status_code == 200:
                        pools = {p["name"]: p for p in r.json()["value"]}
                        missing = [
                            p.name
                            for p in self.pools
                            if ready_count(pools.get(p.name)) < p.ready
                        ]
                        # Nothing warm after a while and failures logged:
                        # the daemon cannot make sandboxes; say why now.
                        started = time.monotonic() - (deadline - timeout)
                        warm = [p for p in self.pools if p.ready]
                        if started > 45 and warm and all(ready_count(pools.get(p.name)) == 0 for p in warm):
                            failures = [line for line in self.log_tail(400).splitlines() if "failed" in line]
                            if failures:
                                raise DaemonFailed(
                                    "no sandbox became ready in 45 s; last failures:\n" + "\n".join(failures[-5:])
                                )
                        if not missing:
                            if not self.tcp:
                                return
                            with self.tcp_client(timeout=5) as t:
                                if t.get("/management/pools").status_code == 200:
                                    return
                        last = f"pools not yet warm: {missing}"
                    else:
                        last = f"GET /management/pools -> {r.status_code} {r.text[:200]}"
            except (httpx.TransportError, KeyError, ValueError) as e:
                last = repr(e)
            time.sleep(0.2)
        raise DaemonFailed(f"sessiond not ready after {timeout} s ({last}); log tail:\n{self.log_tail()}")

    def stop(self) -> list[str]:
        """Stops the daemon and returns a list of problems found on the way."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append("sessiond did not exit within 30 s of SIGTERM; killed")
                self.proc.kill()
                self.proc.wait()
        # Give the kernel a moment to reap namespaces whose init just died.
        deadline = time.monotonic() + 10
        left = self.cgroup.pids() if self.cgroup.dirs else set()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.cgroup.pids()
        if left:
            problems.append(
                "processes left in the daemon's cgroup after it stopped:\n  "
                + "\n  ".join(self.cgroup.describe(left))
            )
        mounts = [
            line
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if str(self.dir) in line
        ]
        if mounts:
            problems.append("mounts left on the host:\n  " + "\n  ".join(mounts))
        try:
            self.cgroup.destroy()
        except RuntimeError as e:
            problems.append(str(e))
        return problems


    def remove_files(self, keep_log: bool) -> None:
        """Deletes the temporary directory (all but the log if asked)."""
        if not keep_log:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        for p in self.dir.iterdir():
            if p != self.log_path:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def ready_count(pool: dict | None) -> int:
    """The number of pre-warmed sandboxes a management API pool reports."""
    if not pool:
        return 0
    return int(pool_status(pool).get("readySessions", 0))


def pool_status(pool: dict) -> dict:
    """The live counts (readySessions, allocatedSessions, startingSessions)."""
    return pool.get("properties", {})
