"""The benchmarks' generic outputs: the machine they ran on, and JSON files under
bench/results/."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

# Where the figures are kept (in the repository: docs cite them).
RESULTS = Path(__file__).resolve().parents[1] / "results"


def machine() -> dict[str, Any]:
    """The CPU, cores, memory, device and versions a figure was measured with."""
    import psutil
    import ray
    import torch

    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def run_header(sizes: Any, duration_s: float, rounds: int) -> dict[str, Any]:
    """What a load benchmark's result file starts with: when, on what, and its loads."""
    import datetime

    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "sizes": sizes,
        "duration_s": duration_s,
        "rounds": rounds,
    }


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write `results` to `path` whole or not at all (a run cut short keeps the last file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(path)
