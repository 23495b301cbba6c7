"""A slower machine on demand: the validation's cluster (and the engine's standalone
measurement) run at a fraction of this machine's speed, so that any machine can check the
capacity model at x1, x0.7 and x0.5 of its own speed.

How: the processes go into a cgroup of their own that a small process freezes and thaws in
turn, thawed `speed` of every `PERIOD_S` (cgroup v2's `cgroup.freeze`, or v1's freezer).
Every thread of the group then runs at `speed` of its pace, one alone as much as many
together: what a host whose cores other tenants take part of does to a machine, which is how
this machine's own slow hours look (the engine alone at x0.54 of its speed, nothing else of
ours running). A CPU quota (`cpu.max`) would not do it: a quota of one core of two leaves a
lone thread at full speed and slows only what runs in parallel, a machine with fewer cores
rather than slower ones. Wall-clock time goes on while the group is frozen, so Serve's own
delays, timeouts and metric periods keep their seconds, as on a slow machine.

Needs root (or a delegated cgroup); at `speed` 1 nothing is made and nothing is needed.

    python -m bench.capacity.throttle GROUP SPEED PARENT_PID   # the duty cycle `Throttle` runs
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# The duty cycle's period: short beside a 64x64 call (0.1-0.3 s) so that every call sees the
# same share; long beside a write to the freezer (~0.2-0.7 ms measured here).
PERIOD_S = 0.02


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, type, options) of every cgroup mount."""
    rows = []
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, kind, options, *_ = line.split()
        if kind in ("cgroup", "cgroup2"):
            rows.append((point, kind, options))
    return rows


def freezer_root() -> tuple[Path, str, tuple[str, str]]:
    """Where groups that can be frozen are made: (the hierarchy's root, the file that freezes
    a group, its (frozen, thawed) values). cgroup v2 first, else v1's freezer controller."""
    mounts = _mounts()
    for point, kind, _ in mounts:
        if kind == "cgroup2" and (Path(point) / "cgroup.procs").exists():
            return Path(point), "cgroup.freeze", ("1", "0")
    for point, kind, options in mounts:
        if kind == "cgroup" and "freezer" in options.split(","):
            return Path(point), "freezer.state", ("FROZEN", "THAWED")
    raise RuntimeError("no cgroup hierarchy with a freezer is mounted: run at speed 1")


def _own_group(root: Path, freeze_file: str) -> Path:
    """This process's group in the hierarchy mounted at `root`: where ours is made, and
    where a process goes back to."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        v2_line = freeze_file == "cgroup.freeze" and controllers == ""
        if v2_line or "freezer" in controllers.split(","):
            return root / path.lstrip("/")
    return root


def duty_cycle(freeze_file: Path, values: tuple[str, str], speed: float, parent: int) -> None:
    """Thaw the group `speed` of every `PERIOD_S`, freeze it the rest, until SIGTERM or
    until `parent`, the process that started it, is gone (killed, it could not say so; its
    pid is given, as it may be gone before this one has started); thawed on the way out.
    Deadlines on one clock, so the share does not drift with late wake-ups."""
    frozen, thawed = values
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with freeze_file.open("w") as state:
        deadline = time.monotonic()
        try:
            while not stop and os.getppid() == parent:
                state.write(thawed)
                state.flush()
                deadline += speed * PERIOD_S
                time.sleep(max(0.0, deadline - time.monotonic()))
                if stop:
                    break
                state.write(frozen)
                state.flush()
                deadline += (1.0 - speed) * PERIOD_S
                time.sleep(max(0.0, deadline - time.monotonic()))
        finally:
            state.write(thawed)
            state.flush()


class Throttle:
    """A group whose processes run at `speed` of this machine's pace while it is open.

    `inside()` moves this process in for a block: what it starts meanwhile (Ray's nodes, and
    through them every worker) stays in the group after this process comes back out.
    At `speed` 1 it makes no group and `inside()` does nothing."""

    def __init__(self, speed: float) -> None:
        if not 0.05 <= speed <= 1.0:
            raise ValueError(f"speed must be within 0.05 and 1, not {speed}")
        self.speed = speed
        self._group: Path | None = None
        self._home: Path | None = None
        self._freeze: tuple[str, tuple[str, str]] = ("", ("", ""))
        self._cycle: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Throttle:
        if self.speed >= 1.0:
            return self
        root, freeze_file, values = freezer_root()
        self._home = _own_group(root, freeze_file)
        self._group = self._home / f"bench-capacity-{os.getpid()}"
        self._group.mkdir()
        self._freeze = (freeze_file, values)
        self._cycle = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.capacity.throttle",
                str(self._group),
                str(self.speed),
                str(os.getpid()),
            ]
        )
        return self

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        if self._group is None or self._home is None:
            yield
            return
        (self._group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (self._home / "cgroup.procs").write_text(str(os.getpid()))

    def __exit__(self, *_: object) -> None:
        if self._group is None or self._home is None:
            return
        if self._cycle is not None:
            self._cycle.terminate()
            self._cycle.wait()
        # What is left in the group (a Ray process slow to exit) goes back, thawed, to
        # finish on its own; the group goes.
        freeze_file, (_, thawed) = self._freeze
        (self._group / freeze_file).write_text(thawed)
        for pid in (self._group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (self._home / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self._group.rmdir()


if __name__ == "__main__":
    group, speed_arg, parent_pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    _, file_name, freeze_values = freezer_root()
    duty_cycle(Path(group) / file_name, freeze_values, speed_arg, parent_pid)
