"""Stored device-independent counts: keyed by full settings and releases, reused only on a match."""

import pytest

from bench import counts
from bench.results import ResultsFileError


def lookup(folder, suite, settings, torch_version, torchvision_version, cbn_source="abc"):
    """What a run finds for a case (bench/session.py's known_counts: the store loaded once, then by key)."""
    return counts.load(folder, suite).get(counts.key(settings, torch_version, torchvision_version, cbn_source))


PARAMS = {"profile": {"height_px": 800, "width_px": 1333}, "norm": "cbn"}  # a case's settings, JSON form


def test_counts_are_reused_for_the_same_settings_and_releases_only(tmp_path):
    counts.save(tmp_path, "table6", [(PARAMS, {"train_step_flops": 9.1e12})], "2.11.0+cpu", "0.26.0", "abc", "cpu: test")
    entry = lookup(tmp_path, "table6", PARAMS, "2.11.0+cu130", "0.26.0+cu130")  # another build, same release
    assert entry["metrics"] == {"train_step_flops": 9.1e12} and entry["counted_on"] == "cpu: test"
    assert "reused from results/counts, counted on cpu: test" in counts.note(entry)
    other_size = {**PARAMS, "profile": {"height_px": 512, "width_px": 512}}
    assert lookup(tmp_path, "table6", other_size, "2.11.0", "0.26.0") is None
    assert lookup(tmp_path, "table6", PARAMS, "2.15.0", "0.29.2") is None
    assert lookup(tmp_path, "gradpath", PARAMS, "2.11.0", "0.26.0") is None  # nothing stored
    assert lookup(tmp_path, "table6", PARAMS, "2.11.0", "0.26.0", cbn_source="def") is None  # the layer changed


def test_saving_again_replaces_the_entry_of_the_same_key(tmp_path):
    counts.save(tmp_path, "table6", [(PARAMS, {"train_step_flops": 1.0})], "2.11.0", "0.26.0", "abc", "a")
    counts.save(tmp_path, "table6", [(PARAMS, {"train_step_flops": 2.0})], "2.11.0", "0.26.0", "abc", "b")
    stored = counts.load(tmp_path, "table6")
    assert len(stored) == 1 and next(iter(stored.values()))["metrics"] == {"train_step_flops": 2.0}


def test_the_digest_follows_the_cbn_source():
    from bench.env import cbn_source_digest

    assert cbn_source_digest() == cbn_source_digest() and len(cbn_source_digest()) == 12


@pytest.mark.parametrize("content", ['{"schema": "something else"}',
                                     '{"schema": "cbn-bench/counts", "schema_version": 1, "entries": []}'])
def test_a_foreign_or_untyped_store_is_refused_with_the_fix(tmp_path, content):
    (tmp_path / "table6.json").write_text(content)
    with pytest.raises(ResultsFileError, match="not a cbn-bench/counts v2 file; delete it and rerun"):
        counts.load(tmp_path, "table6")


def test_counts_of_a_run_that_recorded_no_cbn_source_are_not_stored(tmp_path):
    from pathlib import Path

    from bench import session

    old_run = Path(__file__).parents[1] / "results" / "runs" / "20261127T012730Z_paper_nvidia-h100-80gb-hbm3.json"
    with pytest.raises(ValueError, match="recorded no cbn source digest .it predates them."):
        session.counts_from_run(old_run, tmp_path)
    assert not list(tmp_path.iterdir())
