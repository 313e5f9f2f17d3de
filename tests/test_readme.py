"""The README's two set-up commands are the ones CI and users run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m pip install") and "nox -s" in line]


def test_readme_has_one_bench_and_one_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("nox -s bench") and commands[1].endswith("nox -s tests")


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_ci_runs_the_linters_and_the_gate_after_the_tests():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    tests_line = ci_lines.index(readme_commands()[1])
    assert ci_lines[tests_line + 1:] == ["python3 -m nox -s lint", "python3 -m nox -s gate"]
