"""A directory watched for LoRA adapters (`models[].adapter_directory`): adapters dropped into
it are served without a redeploy.

Each `<id>.safetensors` file in it, and each `<id>/` directory holding one `.safetensors`
file, is an adapter `<id>` at scale 1. Names starting with `.` are skipped, so a file can be
written as `.ink.safetensors` and renamed into place once complete. Both sides read it: the
ingress to list and validate adapters, a generator replica to find their weights. Each reads
it again at most every `RESCAN_S` seconds (a listing, no weights), so a new adapter is seen
within that time.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

from deployments.config.model_config import ADAPTER_ID_PATTERN, AdapterConfig

logger = logging.getLogger("ray.serve")

RESCAN_S = 2.0
SUFFIX = ".safetensors"


def scan_adapter_directory(directory: str | Path) -> dict[str, AdapterConfig]:
    """The adapters in `directory` now, by id; {} if it does not exist (yet)."""
    root = Path(directory)
    found: dict[str, AdapterConfig] = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return found
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name.endswith(SUFFIX):
            adapter_id = entry.name.removesuffix(SUFFIX)
        elif entry.is_dir() and len(list(entry.glob(f"*{SUFFIX}"))) == 1:
            adapter_id = entry.name
        else:
            continue
        if re.fullmatch(ADAPTER_ID_PATTERN, adapter_id) and len(adapter_id) <= 200:
            found[adapter_id] = AdapterConfig(id=adapter_id, source=str(entry))
    return found


class WatchedAdapterDirectory:
    """A directory's adapters, read again at most every `RESCAN_S` seconds. Ids in `taken`
    (models and configured adapters) are left out: those names mean something else."""

    def __init__(self, directory: str | Path, taken: set[str]) -> None:
        self._directory = directory
        self._taken = taken
        self._lock = threading.Lock()
        self._adapters: dict[str, AdapterConfig] = {}
        self._scanned = -float("inf")

    def adapters(self, fresh: bool = False) -> dict[str, AdapterConfig]:
        """The adapters as last read, or as read now if that was `RESCAN_S` ago or `fresh`."""
        with self._lock:
            if fresh or time.monotonic() - self._scanned >= RESCAN_S:
                self._adapters = self._scan()
                self._scanned = time.monotonic()
            return self._adapters

    def last_read(self) -> dict[str, AdapterConfig]:
        """The adapters as last read (no I/O)."""
        with self._lock:
            return self._adapters

    def _scan(self) -> dict[str, AdapterConfig]:
        found = scan_adapter_directory(self._directory)
        clashing = sorted(set(found) & self._taken)
        if clashing:
            logger.warning(
                "adapter_directory %s: %s skipped (the name of a model or configured adapter)",
                self._directory,
                ", ".join(clashing),
            )
        return {key: value for key, value in found.items() if key not in self._taken}
