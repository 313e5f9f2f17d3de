"""Rewrite cbn-bench results files of schema 6 and older in schema 7, once: typed settings and
figure ids (bench/results.py).

Up to schema 6 a case stored an untyped ``params`` dict (sizes, norm, options, the mode as "on"/"off"
strings, the processes) and a derived figure was keyed by an English sentence. This tool applies
the old step-by-step upgrades up to version 6, then turns each case's params into its suite's
SETTINGS (JSON form), mode and processes, and each figure's sentence into its FigureId with the
sentence kept as its label, through the frozen tables below. Files written before settings were
stored (schema 2 and older) get the profile that their name meant then (LEGACY_PROFILES).

    python tools/migrate_results.py FILE_OR_FOLDER ...   # rewrites in place, atomically

Each rewritten file is loaded back with today's code and every case's settings decoded into its
suite's SETTINGS, so a file this tool cannot convert is left as it was and named.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import codec, results  # noqa: E402
from bench.files import write_atomic  # noqa: E402
from bench.suite import Processes, settings_of  # noqa: E402
from bench.training_modes import Mode  # noqa: E402

# ---------------------------------------------------------------------- schema 0 to 6 (as they were)

def _upgrade_0_to_1(data: dict) -> dict:
    # Version 0 (pre-release) called the derived figures "ratios" and had no case notes.
    data = dict(data, schema_version=1)
    data["derived"] = data.pop("ratios", [])
    for case in data.get("cases", []):
        case.setdefault("notes", [])
    return data


def _upgrade_1_to_2(data: dict) -> dict:
    # Version 1 had no timing flag on derived figures; its timing figures were the ratios with an
    # interval, the log-log time slopes and CBN's step-time over FLOP ratio.
    data = dict(data, schema_version=2)
    for d in data.get("derived", []):
        d.setdefault("timing", d.get("ci_low") is not None or "slope" in d["name"] or "step-time" in d["name"])
    return data


def _upgrade_2_to_3(data: dict) -> dict:
    # Version 2 took one sample per round, none discarded, the cases in a fixed order, and emptied
    # CUDA caches after every command.
    data = dict(data, schema_version=3)
    cuda = data.get("device", "").startswith("cuda")
    for case in data.get("cases", []):
        case.setdefault("sampling", {"kept_per_round": 1, "discarded_per_round": 0, "order": "fixed",
                                     "cuda_cache": "emptied after every command" if cuda else "not applicable"})
    return data


# Version 3 named a metric's kind and unit by suffix: "_flops", "_macs", "_bytes", and timings as
# raw samples under "samples" plus "<stem>_median_s", "_q1_s", "_q3_s", "_ci_low_s", "_ci_high_s".
_V3_SUMMARY = ("median", "q1", "q3", "ci_low", "ci_high")
_V3_TIMING_NAMES = {"train_step_s": "train_step_time", "inference_s": "inference_time", "stat_grad_s": "stat_grad_time"}


def _v3_kind(name: str) -> tuple[str, str]:
    if name.endswith("_flops"):
        return "count", "flop"
    if name.endswith("_macs"):
        return "count", "mac"
    if name.startswith(("peak_", "nvml_")):
        return "peak", "byte"
    if name.endswith("_bytes"):
        return "count", "byte"
    return "count", "1"  # parameters, cbn_layers, max_relative_difference_to_efficient


def _upgrade_3_to_4(data: dict) -> dict:
    data = dict(data, schema_version=4)
    for case in data.get("cases", []):
        old, samples = case.get("metrics", {}), case.pop("samples", {})
        summaries = {f"{name.removesuffix('_s')}_{stat}_s" for name in samples for stat in _V3_SUMMARY}
        metrics = {}
        for name, value in old.items():
            if name not in summaries:
                kind, unit = _v3_kind(name)
                metrics[name] = {"value": value, "kind": kind, "unit": unit}
        for name, values in samples.items():
            stem = name.removesuffix("_s")
            summary = {stat: old.get(f"{stem}_{stat}_s") for stat in _V3_SUMMARY}
            metrics[_V3_TIMING_NAMES.get(name, f"{stem}_time")] = {
                "value": summary["median"], "kind": "timing", "unit": "s", "samples": values, "summary": {"n": len(values), **summary}}
        case["metrics"] = metrics
    for d in data.get("derived", []):
        d["kind"] = "timing" if d.pop("timing", False) else "count"
    return data


def _upgrade_4_to_5(data: dict) -> dict:
    # Version 5 added what a case on several processes records (bench/ranks.py): each rank's value
    # of a metric ("per_rank"), and "world_size", "backend" and "nodes" in the case's params. Every case of
    # a version 4 file ran in one process, which is what their absence means: nothing to convert.
    return dict(data, schema_version=5)


def _upgrade_5_to_6(data: dict) -> dict:
    # Version 6 added each timing sample's round ("rounds"), a case's metrics that failed to be
    # measured ("missing") and digests of its work ("work"). A version 5 case has none of them: its
    # samples were kept in consecutive groups of sampling["kept_per_round"] (Metric.by_round).
    return dict(data, schema_version=6)


OLD_UPGRADES = {0: _upgrade_0_to_1, 1: _upgrade_1_to_2, 2: _upgrade_2_to_3, 3: _upgrade_3_to_4, 4: _upgrade_4_to_5,
                5: _upgrade_5_to_6}

# ---------------------------------------------------------------------- schema 6 to 7
# The profiles while results files stored only a profile's name (up to commit 697dbca); do not edit.
LEGACY_PROFILES = {
    "table6": {
        "paper": dict(height_px=800, width_px=1333, images_per_device=4, sampled_rois_per_image=512,
                      proposals_per_image=2000, warmup_steps=10, rounds=20, timeout_s=900),
        "cpu": dict(height_px=320, width_px=320, images_per_device=2, sampled_rois_per_image=128,
                    proposals_per_image=300, warmup_steps=1, rounds=5, timeout_s=900),
        "quick": dict(height_px=256, width_px=256, images_per_device=1, sampled_rois_per_image=64,
                      proposals_per_image=200, warmup_steps=1, rounds=7, timeout_s=600, norms=["bn", "gn", "cbn"]),
        "smoke": dict(height_px=96, width_px=96, images_per_device=1, sampled_rois_per_image=16,
                      proposals_per_image=50, warmup_steps=1, rounds=2, timeout_s=300),
    },
    "gradpath": {
        "paper": dict(channels=[16, 32, 64, 128, 256, 512], batch=2, height_px=100, width_px=152, rounds=10,
                      naive_budget_bytes=None),
        "cpu": dict(channels=[16, 32, 64, 128, 256], batch=1, height_px=32, width_px=48, rounds=3,
                    naive_budget_bytes=8 << 30),
        "quick": dict(channels=[64, 128, 256], batch=1, height_px=32, width_px=48, rounds=3, naive_budget_bytes=8 << 30),
        "smoke": dict(channels=[8, 16], batch=1, height_px=8, width_px=12, rounds=2, naive_budget_bytes=1 << 30),
    },
}
# Settings stored beside a profile's fields in schema 3-6, per suite: they move out of the profile.
EXTRAS = {
    "table6": ("window",),
    "gradpath": ("block_s", "agreement_tolerance"),
    "classify": ("window",),
    "statistics": ("momentum", "weight_decay", "samples"),
    "quality": ("momentum", "weight_decay", "gn_groups", "samples"),
}
# What each suite's case settings held beside the profile (params key -> settings field).
CASE_FIELDS = {
    "table6": ("norm", "norm_options", "arch", "depth", "placement"),
    "gradpath": ("path", "kernel", "channels"),
    "classify": ("model", "norm"),
    "statistics": ("regime", "window", "lr"),
    "quality": ("variant", "window", "burn_in"),
}
TAKES_MODE = ("table6", "classify")


def _settings(suite: str, params: dict) -> dict:
    stored = dict(params.get("settings") or LEGACY_PROFILES[suite][params["profile"]])
    extras = {k: stored.pop(k) for k in EXTRAS[suite] if k in stored}
    case = {k: params[k] for k in CASE_FIELDS[suite] if k in params}
    if suite == "table6":
        case = {"arch": "mask_rcnn", "depth": "50", "placement": "heads", **case}
        case["depth"] = int(case["depth"])
    if suite == "statistics":
        case.setdefault("regime", "scratch")  # files before the regimes measured from scratch only
    return {"profile": stored, **case, **extras}


def _case(case: dict) -> dict:
    params = case.pop("params")
    suite = case["suite"]
    case["settings"] = _settings(suite, params)
    case["mode"] = codec.encode(Mode.from_options(params)) if suite in TAKES_MODE else None
    case["processes"] = codec.encode(Processes(params.get("world_size", 1), params.get("backend", ""),
                                               params.get("nodes", 1)))
    return case


_RATIO = r"(?:(?P<model>\w+)\.)?(?P<norm>\w+)/bn "
_TIMED = {"train iter/s": "train_iter_per_s", "inference iter/s": "inference_iter_per_s"}
# suite -> (pattern of an old sentence, its FigureId's (subject, quantity, reference) from the match)
FIGURES = {
    "table6": [], "classify": [],
    "gradpath": [
        (r"speedup (?P<k>\d+)x\d+ C=(?P<c>\d+)", lambda m: (f"naive-{m['k']}x{m['k']}-C{m['c']}", "stat_grad_time",
                                                        "ratio_to:efficient")),
        (r"stored memory ratio (?P<k>\d+)x\d+ C=(?P<c>\d+)", lambda m: (f"naive-{m['k']}x{m['k']}-C{m['c']}",
                                                                     "stored_bytes_per_step", "ratio_to:efficient")),
        (r"time slope in C, (?P<path>\w+) (?P<k>\d+)x\d+", lambda m: (f"{m['path']}-{m['k']}x{m['k']}", "stat_grad_time",
                                                                    "loglog_slope_in:C")),
    ],
    "statistics": [
        (r"(?P<case>\S+)\.cbn - best other (?P<stat>mean|var) error", lambda m: (f"{m['case']}/cbn", f"{m['stat']}_error",
                                                                          "minus:best_other")),
    ],
    "quality": [
        (r"(?P<case>\S+) - bn accuracy", lambda m: (m["case"], "accuracy", "minus:bn")),
        (r"claim: CBN k=(?P<k>\d+) \(burn-in (?P<b>[\d.]+)\) close to BN at k x m",
         lambda m: (f"cbn-k{m['k']}-burn{m['b']}", "accuracy_claim_close", f"minus:bn_km-k{m['k']}")),
        (r"claim: CBN k=(?P<k>\d+) \(burn-in (?P<b>[\d.]+)\) above BN at m",
         lambda m: (f"cbn-k{m['k']}-burn{m['b']}", "accuracy_claim_above", "minus:bn")),
        (r"claim: premise, k=(?P<k>\d+): BN at k x m above BN at m with the same k x m gradient batch",
         lambda m: (f"bn_km-k{m['k']}", "accuracy_claim_above", f"minus:bn_accum-k{m['k']}")),
        (r"claim: Naive CBN fails at k=(?P<k>\d+): CBN above it \(burn-in (?P<b>[\d.]+)\)",
         lambda m: (f"cbn-k{m['k']}-burn{m['b']}", "accuracy_claim_above", f"minus:naive_cbn-k{m['k']}-burn{m['b']}")),
        (r"claim: CBN k=(?P<k>\d+) stable over burn-ins: (?P<b>[\d.]+) close to (?P<first>[\d.]+)",
         lambda m: (f"cbn-k{m['k']}-burn{m['b']}", "accuracy_claim_close", f"minus:cbn-k{m['k']}-burn{m['first']}")),
    ],
}
for _suite in ("table6", "classify"):
    FIGURES[_suite] = [
        (_RATIO + r"(?P<what>memory|forward_macs|train_step_flops) ratio", lambda m: (_subject(m), m["what"], "ratio_to:bn")),
        (_RATIO + r"(?P<what>train iter/s|inference iter/s) ratio", lambda m: (_subject(m), _TIMED[m["what"]], "ratio_to:bn")),
        (_RATIO + r"(?P<what>train iter/s|inference iter/s) interval deviation",
         lambda m: (_subject(m), f"{_TIMED[m['what']]}_interval_deviation", "ratio_to:bn")),
        (_RATIO + r"step-time ratio over training-FLOP ratio", lambda m: (_subject(m), "step_time_over_flops", "ratio_to:bn")),
    ]


def _subject(m: re.Match) -> str:
    return m["norm"] if m["model"] is None else f"{m['model']}/{m['norm']}"


def figure_id(suite: str, sentence: str) -> dict:
    for pattern, parts in FIGURES[suite]:
        m = re.fullmatch(pattern, sentence)
        if m:
            subject, quantity, reference = parts(m)
            return {"suite": suite, "subject": subject, "quantity": quantity, "reference": reference}
    raise ValueError(f"no figure id for {suite}: {sentence!r}")


def _derived(d: dict) -> dict:
    suite, sentence = d.pop("suite"), d.pop("name")
    return {"id": figure_id(suite, sentence), "label": sentence, **d}


def upgrade(data: dict) -> dict:
    """A results file's JSON, of any schema up to 6, in schema 7."""
    version = data["schema_version"]
    while version < 6:
        data = OLD_UPGRADES[version](data)
        version = data["schema_version"]
    data = dict(data, schema_version=7)
    data["cases"] = [_case(c) for c in data["cases"]]
    data["derived"] = [_derived(d) for d in data.get("derived", [])]
    return data


def check(path: Path) -> None:
    """Load the file with today's code and decode every case's settings into its suite's SETTINGS."""
    from bench import session
    from bench.suite import load_suite

    run = results.load(path)
    for case in run.cases:
        settings_of(load_suite(session.suite_registry(), case.suite).SETTINGS, case)


def migrate(path: Path) -> bool:
    """Rewrite path in schema 7 if it is an older results file; whether it was rewritten."""
    original = path.read_text()
    data = json.loads(original)
    if not results.is_results_file(data) or data.get("schema_version", 0) >= 7:
        return False
    write_atomic(path, json.dumps(upgrade(data), indent=1, allow_nan=True))
    try:
        check(path)
    except Exception:
        write_atomic(path, original)
        raise
    return True


def main(paths: list[str]) -> int:
    files = [f for p in map(Path, paths) for f in (sorted(p.rglob("*.json")) if p.is_dir() else [p])]
    failed = 0
    for f in files:
        try:
            if migrate(f):
                print(f"rewritten: {f}")
        except Exception as err:  # named, and the file is left as it was
            failed += 1
            print(f"NOT converted: {f}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["results"]))
