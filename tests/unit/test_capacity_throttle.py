"""The validation's slower machine on demand (`bench/capacity/throttle.py`): a process put in
the throttle's group runs at a share of its speed while it is in, and everything is as it was
after. Needs a cgroup freezer this process may write (root here and in CI)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.capacity.throttle import Throttle, freezer_root

try:
    ROOT, _, _ = freezer_root()
    WRITABLE = os.access(ROOT, os.W_OK)
except RuntimeError:
    WRITABLE = False

pytestmark = pytest.mark.skipif(not WRITABLE, reason="no writable cgroup freezer here")


def cpu_share(seconds: float) -> float:
    """This thread's CPU seconds over the wall-clock seconds of a busy loop (the thread's,
    not the process's: the test process's other threads run on the other core meanwhile,
    and their seconds counted took a throttled loop over its share: 0.652 at 0.5 in CI)."""
    cpu, wall = time.thread_time(), time.monotonic()
    while time.monotonic() - wall < seconds:
        pass
    return (time.thread_time() - cpu) / (time.monotonic() - wall)


def test_a_process_in_the_throttle_runs_at_its_share_and_comes_back_out():
    groups_before = Path("/proc/self/cgroup").read_text()
    with Throttle(0.5) as throttle:
        with throttle.inside():
            assert Path("/proc/self/cgroup").read_text() != groups_before
            # At most half, and less if the machine is busy; without the freezing, ~1.
            share = cpu_share(1.0)
        assert Path("/proc/self/cgroup").read_text() == groups_before
        group = throttle._group
        assert group is not None and group.exists()
    assert share < 0.65
    assert not group.exists()


def test_at_full_speed_nothing_is_made():
    with Throttle(1.0) as throttle:
        with throttle.inside():
            pass
        assert throttle._group is None


def test_a_speed_outside_the_range_is_refused():
    with pytest.raises(ValueError, match="speed"):
        Throttle(0.0)


def test_the_group_is_thawed_when_the_process_that_throttles_it_dies():
    """A validation killed outright cannot close its throttle: the duty cycle sees its
    parent gone and thaws the group rather than freeze it forever, even when the parent
    died before the duty cycle had started."""
    import subprocess
    import sys

    script = (
        "import time\n"
        "from bench.capacity.throttle import Throttle\n"
        "t = Throttle(0.2).__enter__()\n"
        "print(t._group, t._cycle.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    group, cycle = parent.stdout.readline().split()
    parent.kill()  # at once: the duty cycle may still be starting
    parent.wait()
    status = Path(f"/proc/{cycle}/status")
    deadline = time.monotonic() + 10
    while status.exists() and "zombie" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not status.exists() or "zombie" in status.read_text()
        freeze = Path(group) / "cgroup.freeze"
        if freeze.exists():
            assert freeze.read_text().strip() == "0"
    finally:
        Path(group).rmdir()
