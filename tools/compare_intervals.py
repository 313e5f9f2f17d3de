"""Each timed ratio to BN in a results file by the old method (each side's median bootstrapped on its
own, every sample independent: bench.stats.ratio_of_medians) and by the one the suites use now
(paired by round: suites.ratios.paired), to show what pairing changes on the same samples.

    python tools/compare_intervals.py results/baselines/cpu/quick.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import results  # noqa: E402
from bench.stats import ratio_of_medians  # noqa: E402
from suites.ratios import TIMED, paired  # noqa: E402


def main(path: str) -> None:
    run = results.load(path)
    for suite in run.suites:
        groups: dict[str, list[results.CaseResult]] = {}
        for case in run.cases_of(suite):
            if case.status == "ok":
                groups.setdefault(case.settings.get("model", ""), []).append(case)
        for group in groups.values():
            bn = next((c for c in group if c.case.split("/")[-1] == "bn"), None)
            for case in [c for c in group if c is not bn] if bn else []:
                for metric, (_, label) in ((m, t) for m, t in TIMED.items() if m in case.metrics):
                    old = ratio_of_medians(bn.metrics[metric].samples, case.metrics[metric].samples)
                    new = paired(bn, case, metric)
                    print(f"{suite:9s} {case.case:22s} {label:17s} old {old.median:.3f} [{old.ci_low:.3f}, {old.ci_high:.3f}]"
                          f"   paired {new.median:.3f} [{new.ci_low:.3f}, {new.ci_high:.3f}] over {new.n} rounds")


if __name__ == "__main__":
    main(sys.argv[1])
