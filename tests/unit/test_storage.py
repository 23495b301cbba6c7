"""Stored `url` images: names, expiry, a sweeper that runs on its own, a byte cap, and
writes that fail cleanly."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from deployments.config.app_config import StorageConfig
from deployments.storage import ImageStore, StorageUnavailable
from deployments.storage import directory_store as storage_module


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "images", ttl_s=60)


def test_saved_image_is_found_by_its_name(store):
    name = store.save(b"png-bytes", "png")
    assert store.path_of(name).read_bytes() == b"png-bytes"
    assert store.media_type(name) == "image/png"


def test_names_are_long_random_and_distinct(store):
    names = {store.save(b"x", "webp") for _ in range(50)}
    assert len(names) == 50
    for name in names:
        stem, ext = name.split(".")
        assert ext == "webp"
        assert len(stem) == 43  # 256 random bits


@pytest.mark.parametrize(
    "name",
    [
        "../secret.png",
        "..%2Fsecret.png",
        "/etc/passwd",
        "a" * 43 + ".exe",
        "a" * 42 + ".png",
        "a" * 43 + ".png/../../x",
        "." + "a" * 42 + ".png",
        "",
    ],
)
def test_names_of_another_shape_are_never_looked_up(store, tmp_path, name):
    (tmp_path / "secret.png").write_bytes(b"secret")
    assert store.path_of(name) is None


def test_expired_images_are_gone(store):
    name = store.save(b"old", "png")
    path = store.path_of(name)
    past = time.time() - 120
    os.utime(path, (past, past))
    assert store.path_of(name) is None
    assert not path.exists()


def test_sweep_removes_only_expired_images(store):
    old = store.save(b"old", "png")
    fresh = store.save(b"fresh", "png")
    past = time.time() - 120
    os.utime(store.directory / old, (past, past))
    unrelated = store.directory / "README.txt"
    unrelated.write_text("not an image")
    os.utime(unrelated, (past, past))
    assert store.sweep() == 1
    assert store.path_of(fresh) is not None
    assert unrelated.exists()


def test_unknown_format_is_refused(store):
    with pytest.raises(ValueError):
        store.save(b"x", "gif")


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_a_failed_rename_leaves_no_partial_file(store, monkeypatch):
    def disk_full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_module.os, "replace", disk_full)
    with pytest.raises(StorageUnavailable, match="No space left"):
        store.save(b"x" * 1000, "png")
    assert files_in(store.directory) == []


def test_a_write_cut_off_by_a_full_disk_leaves_no_partial_file(store, monkeypatch):
    real_open = open

    class FillsUp:
        """A file on a disk that fills up halfway through the write."""

        def __init__(self, path, mode):
            self._file = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self._file.close()

        def write(self, data: bytes) -> int:
            self._file.write(data[: len(data) // 2])
            self._file.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_module, "open", FillsUp, raising=False)
    with pytest.raises(StorageUnavailable):
        store.save(b"x" * 1000, "png")
    assert files_in(store.directory) == []
    monkeypatch.undo()
    assert store.path_of(store.save(b"fine", "png")).read_bytes() == b"fine"  # still usable


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_expired_images_are_swept_on_a_timer_without_any_save_or_lookup(tmp_path):
    store = ImageStore(tmp_path / "images", ttl_s=0.2)
    try:
        store.save(b"old", "png")
        assert len(files_in(store.directory)) == 1
        # Nothing is saved or looked up from here on: only the sweeper can remove it.
        assert wait_for(lambda: files_in(store.directory) == [])
    finally:
        store.close()


def test_close_stops_the_sweeper(tmp_path):
    store = ImageStore(tmp_path / "images", ttl_s=0.1)
    sweepers = [t for t in threading.enumerate() if t.name.endswith(str(tmp_path / "images"))]
    assert len(sweepers) == 1 and sweepers[0].daemon
    store.close()
    assert not sweepers[0].is_alive()
    name = store.save(b"kept", "png")  # the store still saves; nothing sweeps it now
    time.sleep(0.3)
    assert (store.directory / name).exists()


def test_a_dropped_store_ends_its_sweeper(tmp_path):
    store = ImageStore(tmp_path / "images", ttl_s=0.1)
    (sweeper,) = [t for t in threading.enumerate() if t.name.endswith(str(tmp_path / "images"))]
    del store
    assert wait_for(lambda: not sweeper.is_alive())


def save_aged(store: ImageStore, data: bytes, age_s: float) -> str:
    name = store.save(data, "png")
    then = time.time() - age_s
    os.utime(store.directory / name, (then, then))
    return name


def test_max_bytes_removes_the_oldest_images_first(tmp_path):
    store = ImageStore(tmp_path / "images", ttl_s=60, max_bytes=250)
    oldest = save_aged(store, b"a" * 100, 30)
    older = save_aged(store, b"b" * 100, 20)
    assert store.path_of(oldest) and store.path_of(older)  # 200 bytes: both fit
    newest = store.save(b"c" * 100, "png")  # 300 bytes: the oldest goes
    assert store.path_of(oldest) is None
    assert store.path_of(older) and store.path_of(newest)
    assert sum(path.stat().st_size for path in store.directory.iterdir()) <= 250


def test_max_bytes_keeps_the_image_just_saved_even_if_it_alone_is_larger(tmp_path):
    store = ImageStore(tmp_path / "images", ttl_s=60, max_bytes=250)
    older = save_aged(store, b"a" * 100, 10)
    big = store.save(b"b" * 1000, "png")
    assert store.path_of(big).read_bytes() == b"b" * 1000  # its URL works
    assert store.path_of(older) is None


def test_the_store_follows_its_config(tmp_path):
    config = StorageConfig(directory=str(tmp_path / "cfg"), ttl_s=5, max_bytes=150)
    assert StorageConfig().max_bytes is None
    with pytest.raises(ValueError):
        StorageConfig(max_bytes=0)
    store = ImageStore.from_config(config)
    try:
        first = save_aged(store, b"a" * 100, 1)
        second = store.save(b"b" * 100, "png")
        assert store.directory == tmp_path / "cfg"
        assert store.path_of(first) is None and store.path_of(second) is not None
    finally:
        store.close()
