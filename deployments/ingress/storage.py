"""Storage of `response_format: url` images in a directory, under unguessable names.

A name is 256 random bits (URL-safe base64) plus the format's extension. Lookups accept only
names of exactly that shape, so no path a client sends can leave the directory. Images older
than the TTL are deleted: on lookup (an expired image is gone even if not yet swept) and by a
sweep that runs at most once a minute when images are saved.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from pathlib import Path

from deployments.ingress.encoding import MEDIA_TYPES

_NAME = re.compile(r"^[A-Za-z0-9_-]{43}\.(png|jpeg|webp)$")
_SWEEP_INTERVAL_S = 60.0


class ImageStore:
    def __init__(self, directory: Path, ttl_s: float) -> None:
        self._directory = directory
        self._ttl_s = ttl_s
        self._directory.mkdir(parents=True, exist_ok=True)
        self._sweep_lock = threading.Lock()
        self._last_sweep = 0.0

    @property
    def directory(self) -> Path:
        return self._directory

    def save(self, data: bytes, output_format: str) -> str:
        """Write an encoded image and return its name."""
        if output_format not in MEDIA_TYPES:
            raise ValueError(f"unsupported output format {output_format!r}")
        name = f"{secrets.token_urlsafe(32)}.{output_format}"
        # Write then rename, so a reader never sees a partial file.
        partial = self._directory / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, self._directory / name)
        self._sweep_if_due()
        return name

    def path_of(self, name: str) -> Path | None:
        """The file of a stored, unexpired image, or None for any other name."""
        if not _NAME.fullmatch(name):
            return None
        path = self._directory / name
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > self._ttl_s:
            path.unlink(missing_ok=True)
            return None
        return path

    @staticmethod
    def media_type(name: str) -> str:
        return MEDIA_TYPES[name.rsplit(".", 1)[1]]

    def sweep(self) -> int:
        """Delete expired images (and partial writes older than the TTL); return how many."""
        deadline = time.time() - self._ttl_s
        removed = 0
        for path in self._directory.iterdir():
            if not (_NAME.fullmatch(path.name) or path.name.endswith(".partial")):
                continue
            try:
                if path.stat().st_mtime < deadline:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # another replica sharing the directory removed it first
        return removed

    def _sweep_if_due(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < _SWEEP_INTERVAL_S or not self._sweep_lock.acquire(False):
            return
        try:
            self._last_sweep = now
            self.sweep()
        finally:
            self._sweep_lock.release()
