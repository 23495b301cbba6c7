"""The directory backend of `ImageStorage`: one file per image.

Images older than the TTL are deleted: on lookup (an expired image is gone even if not yet
swept) and by a daemon thread that sweeps every min(TTL, 60 s) whether or not images are
being saved. With `max_bytes`, the oldest images also go once the directory's images add up
to more.

A write that fails leaves no partial file behind and raises `StorageUnavailable`, which the
API answers as a 503: retryable, except for a full disk or quota or a read-only volume
(`lasting`), which a retry within seconds does not mend.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import weakref
from pathlib import Path

from deployments.config.app_config import StorageConfig
from deployments.storage.stored_images import (
    NAME_PATTERN,
    StorageUnavailable,
    is_image_name,
    media_type_of,
    new_name,
)

logger = logging.getLogger("ray.serve")

_MAX_SWEEP_INTERVAL_S = 60.0
# Write failures that a retry within seconds does not mend: a full disk or quota (the sweep
# frees room only as images expire), a read-only volume.
_LASTING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class ImageStore:
    """The directory backend: one file per image."""

    def __init__(self, directory: Path, ttl_s: float, max_bytes: int | None = None) -> None:
        self._directory = directory
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._directory.mkdir(parents=True, exist_ok=True)
        # One eviction at a time: two at once would both count, and delete, the same files.
        self._evict_lock = threading.Lock()
        self._stopped = threading.Event()
        self._sweeper = threading.Thread(
            target=_sweep_until_stopped,
            args=(weakref.ref(self), self._stopped, min(ttl_s, _MAX_SWEEP_INTERVAL_S)),
            name=f"image-store-sweeper:{directory}",
            daemon=True,
        )
        self._sweeper.start()

    @classmethod
    def from_config(cls, config: StorageConfig) -> ImageStore:
        return cls(config.resolved_directory(), config.ttl_s, config.max_bytes)

    @property
    def directory(self) -> Path:
        return self._directory

    def close(self) -> None:
        """Stop the sweeper thread (the stored images stay)."""
        self._stopped.set()
        if self._sweeper is not threading.current_thread():
            self._sweeper.join()

    def save(self, data: bytes, output_format: str) -> str:
        """Write an encoded image and return its name; `StorageUnavailable` if it cannot be
        written."""
        name = new_name(output_format)
        # Write then rename, so a reader never sees a partial file.
        partial = self._directory / f".{name}.partial"
        try:
            with open(partial, "xb") as file:
                file.write(data)
            os.replace(partial, self._directory / name)
        except OSError as error:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise StorageUnavailable(
                f"could not write an image to {self._directory}: {error.strerror or error}",
                lasting=error.errno in _LASTING_ERRNOS,
            ) from error
        if self._max_bytes is not None:
            self._evict_over(self._max_bytes, keep=name)
        return name

    def discard(self, name: str) -> None:
        if is_image_name(name):
            with contextlib.suppress(OSError):
                (self._directory / name).unlink(missing_ok=True)

    def path_of(self, name: str) -> Path | None:
        """The file of a stored, unexpired image, or None for any other name."""
        if not is_image_name(name):
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

    def read(self, name: str) -> bytes | None:
        """Read in one go: the sweeper, a `max_bytes` eviction or another replica on the same
        volume may delete the file at any moment, and a file that vanishes is None."""
        path = self.path_of(name)
        try:
            return None if path is None else path.read_bytes()
        except FileNotFoundError:
            return None

    @staticmethod
    def media_type(name: str) -> str:
        return media_type_of(name)

    def sweep(self) -> int:
        """Delete expired images (and partial writes older than the TTL); return how many."""
        deadline = time.time() - self._ttl_s
        removed = 0
        for path in self._directory.iterdir():
            if not (NAME_PATTERN.fullmatch(path.name) or path.name.endswith(".partial")):
                continue
            try:
                if path.stat().st_mtime < deadline:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # another replica sharing the directory removed it first
        return removed

    def _evict_over(self, max_bytes: int, keep: str) -> None:
        """Delete the oldest images until they add up to at most `max_bytes`. The image just
        saved (`keep`) stays even if it alone is larger: its URL is about to be returned."""
        with self._evict_lock:
            images = []
            for path in self._directory.iterdir():
                if not NAME_PATTERN.fullmatch(path.name):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    images.append((stat.st_mtime_ns, path.name, stat.st_size))
            total = sum(size for _, _, size in images)
            for _, name, size in sorted(images):
                if total <= max_bytes:
                    break
                if name == keep:
                    continue
                with contextlib.suppress(FileNotFoundError):  # swept meanwhile
                    (self._directory / name).unlink()
                total -= size


def _sweep_until_stopped(
    store_ref: weakref.ReferenceType[ImageStore], stopped: threading.Event, interval_s: float
) -> None:
    """The sweeper thread. It holds the store only weakly, so a store that is dropped
    without `close` (in tests, say) ends its thread at the next tick."""
    while not stopped.wait(interval_s):
        store = store_ref()
        if store is None:
            return
        try:
            store.sweep()
        except Exception:  # a volume gone for a while, say: the next tick tries again
            logger.exception("sweeping the stored images of %s failed", store.directory)
        del store
