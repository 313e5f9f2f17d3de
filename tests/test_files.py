"""bench/files.py: a write appears whole or not at all."""

import os

import pytest

from bench import files


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    files.write_atomic(path, "old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_new_file_never_replaces_an_earlier_one_and_leaves_no_temp_file(tmp_path):
    first = files.write_new(tmp_path, "run", ".json", "{}")
    second = files.write_new(tmp_path, "run", ".json", b"[]")
    assert (first.name, second.name) == ("run.json", "run-2.json")
    assert (first.read_text(), second.read_text()) == ("{}", "[]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-2.json", "run.json"]


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    files.write_atomic(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode
