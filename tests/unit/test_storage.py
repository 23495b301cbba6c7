import os
import time

import pytest

from deployments.ingress.storage import ImageStore


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
