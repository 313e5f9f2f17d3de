"""tools/migrate_results.py: files of schema 6 and older (untyped params, figures keyed by
sentences) rewritten once in schema 7; and the committed files, which it rewrote."""

import importlib.util
import json
from pathlib import Path

import pytest

from bench import results, session
from bench.suite import load_suite, settings_of
from bench.training_modes import Mode
from suites import classify, table6

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("migrate_results", ROOT / "tools" / "migrate_results.py")
migrate_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(migrate_results)


def version_3_table6() -> dict:
    """A table6 run as schema version 3 wrote it: params, suffix-named summaries, samples beside the
    metrics, timing flags on sentence-named figures."""
    environment = json.loads(results.to_json(results.RunResult("cpu", "cpu", [], _environment(), [])))["environment"]
    params = {"profile": "cpu", "norm": "bn", "norm_options": {}, "arch": "mask_rcnn", "depth": "50", "placement": "heads"}
    summary = {f"train_step_{stat}_s": v for stat, v in zip(("median", "q1", "q3", "ci_low", "ci_high"),
                                                             (1.25, 1.225, 1.275, 1.2, 1.3))}
    bn = {"suite": "table6", "case": "bn", "params": params, "status": "ok", "error": None, "notes": [],
          "metrics": {"train_step_flops": 1e12, "counted_total_bytes": 5e8, **summary},
          "samples": {"train_step_s": [1.2, 1.25, 1.3]}}
    cbn = dict(bn, case="cbn", params=dict(params, norm="cbn", norm_options={"window": 4}))
    derived = [{"suite": "table6", "name": "cbn/bn train iter/s ratio", "value": 0.8, "ci_low": 0.7, "ci_high": 0.9,
                "note": "", "timing": True},
               {"suite": "table6", "name": "cbn/bn step-time ratio over training-FLOP ratio", "value": 1.1,
                "ci_low": None, "ci_high": None, "note": "", "timing": True}]
    return {"schema": results.SCHEMA, "schema_version": 3, "profile": "cpu", "device": "cpu", "suites": ["table6"],
            "environment": environment, "cases": [bn, cbn], "derived": derived}


def _environment():
    from test_results import environment

    return environment()


def test_a_schema_3_file_gets_typed_settings_mode_processes_and_figure_ids(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(version_3_table6()))
    assert migrate_results.migrate(path)
    run, stored = results.load_with_version(path)
    assert stored == results.SCHEMA_VERSION
    cbn = run.cases[1]
    settings = settings_of(table6.Settings, cbn)
    # written before settings were stored: the cpu profile as its name meant then (5 rounds, not today's 7)
    assert settings.profile.rounds == 5 and settings.depth == 50 and settings.norm_options == {"window": 4}
    assert cbn.mode == Mode() and cbn.processes.world_size == 1
    assert cbn.metrics["train_step_time"].samples == (1.2, 1.25, 1.3)
    assert cbn.metrics["counted_total_bytes"].kind == "count"
    figures = {str(d.id): d for d in run.derived}
    assert figures["table6.cbn/train_iter_per_s/ratio_to:bn"].label == "cbn/bn train iter/s ratio"
    assert figures["table6.cbn/step_time_over_flops/ratio_to:bn"].timing
    assert not migrate_results.migrate(path)  # schema 7 already: left alone


def test_a_figure_the_frozen_tables_do_not_know_is_named_and_the_file_left_as_it_was(tmp_path):
    data = version_3_table6()
    data["derived"][0]["name"] = "cbn/bn something new"
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(data))
    before = path.read_text()
    with pytest.raises(ValueError, match="no figure id for table6: 'cbn/bn something new'"):
        migrate_results.migrate(path)
    assert path.read_text() == before


def test_classify_sentences_map_to_the_ids_classify_derives():
    assert migrate_results.figure_id("classify", "resnet18.bn_control/bn inference iter/s interval deviation") == {
        "suite": "classify", "subject": "resnet18/bn_control", "quantity": "inference_iter_per_s_interval_deviation",
        "reference": "ratio_to:bn"}
    settings = migrate_results._settings("classify", {"profile": "cpu", "model": "resnet18", "norm": "cbn",
                                                      "settings": {"image_px": 224, "images_per_device": 4,
                                                                   "warmup_steps": 1, "rounds": 5, "timeout_s": 900,
                                                                   "models": ["resnet18"], "norms": ["bn"], "window": 4}})
    assert settings["window"] == 4 and "window" not in settings["profile"]
    assert settings_of(classify.Settings, results.CaseResult("classify", "x", settings, "ok")).model == "resnet18"


def test_every_committed_file_is_in_schema_7_with_the_figure_ids_its_suites_derive_today():
    registry = session.suite_registry()
    checked = 0
    for path in (ROOT / "results").rglob("*.json"):
        data = json.loads(path.read_text())
        if not results.is_results_file(data):
            continue
        run, stored = results.load_with_version(path)
        assert stored == results.SCHEMA_VERSION, path
        for name in run.suites:
            suite = load_suite(registry, name)
            for case in run.cases_of(name):
                settings_of(suite.SETTINGS, case)  # decodes into today's settings type
            assert {d.id for d in suite.derive(run.cases_of(name))} == set(run.derived_of(name)), (path, name)
        checked += 1
    assert checked >= 40
