"""Stored deterministic counts (FLOPs, multiply-adds) that do not depend on the device.

Counting FLOPs of a detection model at 1333x800 takes minutes of host time (fvcore's trace and
FlopCounterMode), which a lent GPU should not spend. `python -m bench counts` measures a suite's
cases on the CPU and stores the counts a suite names in its ``COUNTS`` under
``results/counts/<suite>.json``, keyed by the case's full settings, the torch and torchvision
releases and a digest of the cbn package's source (a change to the layer changes what is counted);
a later run with the same key reuses them and says so in each case's notes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from bench.files import write_atomic
from bench.results import ResultsFileError, read_json

SCHEMA = "cbn-bench/counts"
SCHEMA_VERSION = 2  # 2: keyed by a case's typed settings (bench/codec.py's JSON form)
DEFAULT_FOLDER = Path("results") / "counts"


def release(version: str | None) -> str | None:
    """'2.11.0+cu130' -> '2.11.0': the build's CUDA flavour does not change what is counted."""
    return None if version is None else version.split("+", 1)[0]


def key(settings: dict, torch_version: str, torchvision_version: str | None, cbn_source: str | None) -> str:
    # Counts do not depend on the training mode (a case's mode is not part of its settings):
    # autocast and channels_last change no operation's shape, and compiled runs are counted eagerly
    # (bench/training_modes.py).
    return json.dumps({"settings": settings, "torch": release(torch_version), "torchvision": release(torchvision_version),
                       "cbn_source": cbn_source}, sort_keys=True)


def _path(folder: Path, suite: str) -> Path:
    return folder / f"{suite}.json"


def load(folder: Path, suite: str) -> dict[str, dict]:
    """key -> stored entry (metrics, where and when counted); empty when nothing is stored."""
    path = _path(folder, suite)
    if not path.exists():
        return {}
    data = read_json(path, "counts file")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        raise ResultsFileError(f"{path}: not a {SCHEMA} v{SCHEMA_VERSION} file; "
                               "delete it and rerun `python -m bench counts`")
    return {key(e["settings"], e["torch"], e["torchvision"], e.get("cbn_source")): e for e in data["entries"]}


def save(folder: Path, suite: str, measured: list[tuple[dict, dict]], torch_version: str,
         torchvision_version: str | None, cbn_source: str | None, device_name: str) -> Path:
    """Add (settings, metrics) pairs to the suite's store (settings in JSON form), replacing entries
    of the same key."""
    entries = load(folder, suite)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    for settings, metrics in measured:
        entries[key(settings, torch_version, torchvision_version, cbn_source)] = {
            "settings": settings, "torch": release(torch_version), "torchvision": release(torchvision_version),
            "cbn_source": cbn_source, "metrics": metrics, "counted_on": device_name, "date_utc": date,
        }
    path = _path(folder, suite)
    ordered = sorted(entries.values(), key=lambda e: json.dumps(e["settings"], sort_keys=True))
    data = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "entries": ordered}
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def note(entry: dict) -> str:
    return (f"counts ({', '.join(sorted(entry['metrics']))}) reused from results/counts, counted on {entry['counted_on']} "
            f"on {entry['date_utc'][:10]} with torch {entry['torch']}, torchvision {entry['torchvision']}, "
            f"cbn source {entry.get('cbn_source')}, same settings")
