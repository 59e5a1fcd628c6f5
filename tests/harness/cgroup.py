"""A cgroup placed around the daemon under test.

The daemon creates its sandboxes' cgroups under its own, so the caps set
here bound everything the tests start: a fork bomb or memory hog that
escaped its sandbox's limit fails the run instead of taking the machine
down. cgroup v1 (one hierarchy per controller) and v2 are both handled.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_cgroup_v1(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return "/"


def cgroup_version() -> int:
    if (CGROUP_ROOT / "memory" / "memory.limit_in_bytes").exists():
        return 1
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return 2
    raise RuntimeError("no usable cgroup hierarchy under /sys/fs/cgroup")


@dataclass
class TestCgroup:
    """Memory and pids caps around one process tree."""

    name: str
    memory_bytes: int
    pids_max: int
    version: int = 0
    dirs: list[Path] = field(default_factory=list)

    def create(self) -> "TestCgroup":
        self.version = cgroup_version()
        if self.version == 1:
            mem = CGROUP_ROOT / "memory" / _own_cgroup_v1("memory").lstrip("/") / self.name
            pids = CGROUP_ROOT / "pids" / _own_cgroup_v1("pids").lstrip("/") / self.name
            for d in (mem, pids):
                d.mkdir(exist_ok=True)
                self.dirs.append(d)
            (mem / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
            memsw = mem / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                memsw.write_text(str(self.memory_bytes))
            (pids / "pids.max").write_text(str(self.pids_max))
        else:
            # v2: processes may only live in leaves, so the group hangs off
            # the root, where the controllers are always available.
            for ctl in ("+memory", "+pids"):
                try:
                    (CGROUP_ROOT / "cgroup.subtree_control").write_text(ctl)
                except OSError:
                    pass
            d = CGROUP_ROOT / self.name
            d.mkdir(exist_ok=True)
            self.dirs.append(d)
            (d / "memory.max").write_text(str(self.memory_bytes))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
            (d / "pids.max").write_text(str(self.pids_max))
        return self

    def enter(self) -> None:
        """Moves the calling process in (used as a Popen preexec_fn)."""
        pid = str(os.getpid())
        for d in self.dirs:
            (d / "cgroup.procs").write_text(pid)

    def _tree(self) -> list[Path]:
        out: list[Path] = []
        for d in self.dirs:
            if not d.exists():
                continue
            for root, subdirs, _ in os.walk(d, topdown=False):
                out.append(Path(root))
        return out

    def pids(self) -> set[int]:
        """Every process left anywhere in the group's subtree."""
        found: set[int] = set()
        for d in self._tree():
            try:
                text = (d / "cgroup.procs").read_text()
            except OSError:
                continue
            found.update(int(p) for p in text.split())
        return found

    def describe(self, pids: set[int]) -> list[str]:
        lines = []
        for pid in sorted(pids):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cg = Path(f"/proc/{pid}/cgroup").read_text().replace("\n", " ")
            except OSError:
                continue
            lines.append(f"pid {pid}: {cmd.strip()} [{cg.strip()}]")
        return lines

    def memory_peak(self) -> int | None:
        for d in self.dirs:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):
                p = d / name
                if p.exists():
                    return int(p.read_text())
        return None

    def destroy(self) -> None:
        """Kills whatever is left and removes the subtree, deepest first."""
        deadline = time.monotonic() + 10
        while True:
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot empty test cgroup {self.name}: {sorted(left)}")
            time.sleep(0.1)
        for d in self._tree():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
