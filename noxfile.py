"""Sessions: tests (the default), lint, bench, gate, micro, baseline, lock. Arguments after `--` reach the tool
each session runs."""

from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = "requirements/constraints.txt"


def install_project(session: nox.Session, extras: str = "") -> None:
    """Install the project with the pinned dependency set (so a new upstream release cannot break CI)."""
    session.install("-c", CONSTRAINTS, "-e", f".[{extras}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the unit tests on CPU (a few minutes on 2 cores)."""
    install_project(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """ruff on everything, mypy on cbn/ and bench/ (with torch's own types; pyproject.toml configures both)."""
    install_project(session, "lint")
    session.run("ruff", "check", ".")
    session.run("mypy")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Run the benchmark suites on the best available device; results go under results/."""
    install_project(session)
    session.run("python", "-m", "bench", *session.posargs)


@nox.session(default=False)
def gate(session: nox.Session) -> None:
    """Measure the quick CPU suites and the micro-benchmarks and judge them against results/baselines/
    under results/thresholds.toml: exit 1 on a regression (what CI runs after the tests)."""
    install_project(session, "test")  # the micro-benchmarks need pytest-benchmark
    session.run("python", "-m", "bench", "gate", *session.posargs)


@nox.session(default=False)
def micro(session: nox.Session) -> None:
    """Run the pytest-benchmark layer micro-benchmarks; their JSON goes under results/runs/."""
    install_project(session, "test")
    session.run("python", "-m", "bench", "micro", *session.posargs)


@nox.session(default=False)
def baseline(session: nox.Session) -> None:
    """Re-measure the gate's baselines into results/baselines/<device class>/ (review, then commit)."""
    install_project(session, "test")
    session.run("python", "-m", "bench", "baseline", *session.posargs)


@nox.session(default=False, reuse_venv=False)
def lock(session: nox.Session) -> None:
    """Resolve the newest versions pyproject.toml allows and rewrite requirements/constraints.txt."""
    session.install("-e", ".[test,dev,lint]")
    frozen = session.run("python", "-m", "pip", "freeze", "--exclude-editable", silent=True)
    header = Path(CONSTRAINTS).read_text().splitlines()[:2]
    Path(CONSTRAINTS).write_text("\n".join([*header, frozen.strip()]) + "\n")
    session.log(f"wrote {CONSTRAINTS}; run the tests, then commit it")
