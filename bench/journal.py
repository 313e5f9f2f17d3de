"""An append-only journal of a run's finished cases, beside where its results file will go.

Each group of cases is appended (one JSON line per case, flushed and fsynced) as soon as it
finishes, so neither a failing final write nor a killed runner loses a finished case. The run
removes its journal once the results file is written; a journal left by a dead run becomes a
results file with `python -m bench recover JOURNAL`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.results import CaseResult, ResultsFileError, case_from_json, case_to_json

SCHEMA = "cbn-bench/journal"
SCHEMA_VERSION = 1


def path_for(folder: Path, stem: str) -> Path:
    return folder / f".{stem}.journal.jsonl"


def start(path: Path, header: dict) -> Path:
    """Create the journal with its header: what the run is (profile, device, suites, environment)."""
    _append_lines(path, [{"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **header}], mode="x")
    return path


def append(path: Path, cases: list[CaseResult]) -> None:
    _append_lines(path, [case_to_json(c) for c in cases], mode="a")


def read(path: Path) -> tuple[dict, list[CaseResult]]:
    """The header and the finished cases (a torn last line, from a kill mid-write, is dropped)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ResultsFileError(f"{path}: no such journal") from None
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("schema") != SCHEMA or header.get("schema_version") != SCHEMA_VERSION:
        raise ResultsFileError(f"{path}: not a {SCHEMA} v{SCHEMA_VERSION} journal")
    cases = []
    for number, line in enumerate(lines[1:], 2):
        try:
            cases.append(case_from_json(json.loads(line)))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the write a kill interrupted
            raise ResultsFileError(f"{path}:{number}: not a JSON line") from None
    return header, cases


def _append_lines(path: Path, records: list[dict], mode: str) -> None:
    with path.open(mode) as f:
        for record in records:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
