"""Which files of a watched adapter directory are adapters, and how soon new ones are seen."""

from __future__ import annotations

from deployments import adapter_directory
from deployments.adapter_directory import WatchedAdapterDirectory, scan_adapter_directory


def test_files_and_single_file_directories_are_adapters_and_the_rest_is_not(tmp_path):
    (tmp_path / "ink.safetensors").write_bytes(b"x")
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / ".half-written.safetensors").write_bytes(b"x")  # renamed into place later
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.safetensors").write_bytes(b"x")
    (tmp_path / "two" / "b.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "bad+name.safetensors").write_bytes(b"x")  # `+` joins the ids of a set
    found = scan_adapter_directory(tmp_path)
    assert sorted(found) == ["ink", "paper"]
    assert found["ink"].source == str(tmp_path / "ink.safetensors")
    assert found["paper"].source == str(tmp_path / "paper") and found["paper"].scale == 1.0


def test_a_missing_directory_has_no_adapters(tmp_path):
    assert scan_adapter_directory(tmp_path / "not-yet") == {}


def test_new_adapters_are_seen_at_the_next_rescan_and_taken_names_never(tmp_path, monkeypatch):
    watched = WatchedAdapterDirectory(tmp_path, taken={"tiny-sd3"})
    assert watched.adapters() == {}
    (tmp_path / "ink.safetensors").write_bytes(b"x")
    (tmp_path / "tiny-sd3.safetensors").write_bytes(b"x")
    assert watched.adapters() == {}, "read again only after RESCAN_S"
    monkeypatch.setattr(adapter_directory, "RESCAN_S", 0.0)
    assert sorted(watched.adapters()) == ["ink"]
