"""bench/index.py: results/README.md's table of stored files, rebuilt from the files themselves."""

import json
from pathlib import Path

from bench import cli, index

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def test_the_committed_index_lists_every_stored_file_as_it_is():
    # fails when a results file is added or changed without `python -m bench index`
    readme = RESULTS / "README.md"
    assert readme.read_text() == index.rebuilt(readme, RESULTS)
    listed = {e.path for e in index.entries(RESULTS)}
    stored = {p.relative_to(RESULTS).as_posix() for folder in index.FOLDERS for p in (RESULTS / folder).rglob("*.json")}
    assert listed == stored and not [e for e in index.entries(RESULTS) if e.what.startswith("unreadable")]


def test_the_hand_written_part_is_kept_and_an_unreadable_file_says_why(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "broken.json").write_text("{not json")
    (tmp_path / "runs" / "other.json").write_text(json.dumps({"some": "thing"}))
    readme = tmp_path / "README.md"
    readme.write_text("# Stored results\n\nHow to read them.\n")
    assert cli.main(["index", "--results", str(tmp_path), "--check"]) == 1
    assert cli.main(["index", "--results", str(tmp_path)]) == 0
    text = readme.read_text()
    assert text.startswith("# Stored results\n\nHow to read them.\n\n" + index.MARKER)
    assert "| `runs/broken.json` | unreadable:" in text and "| `runs/other.json` | unreadable:" in text
    assert cli.main(["index", "--results", str(tmp_path), "--check"]) == 0
    assert cli.main(["index", "--results", str(tmp_path)]) == 0 and readme.read_text() == text  # idempotent
