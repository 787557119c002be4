"""The sealed test part's report: search against test figures, with the drop's confidence interval.

``objectives[].test: FRACTION`` sets aside items that search and selection never read
(``evaluate.datasets.split_examples``); ``export best`` scores them once. A drop from search to test
larger than its interval means the search overfitted its items: the report warns. Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from olmopt.confidence import PROPORTION_METRICS, difference_interval, is_share


def sealed_test_report(
    search: Mapping[str, float],
    test: Mapping[str, float],
    directions: Mapping[str, str],
    metric_of: Mapping[str, str],
    items: Mapping[str, tuple[int, int]],
    level: float = 0.95,
) -> dict[str, Any]:
    """``{"level", "objectives": {name: {search, test, items, drop, interval, significant}}, "warnings"}``.

    ``items`` maps an objective to its (search, test) item counts. ``drop`` is how much worse the test
    figure is (signed by direction: positive = worse on test). For accuracy-like objectives
    ``interval`` is the drop's Newcombe interval and ``significant`` whether it excludes 0; other
    objectives have no interval (per-item scores are not kept) and ``significant`` is None.
    """
    rows: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for name in sorted(test):
        s, t = search[name], test[name]
        sign = 1.0 if directions[name] == "maximize" else -1.0
        n_search, n_test = items.get(name, (0, 0))
        row: dict[str, Any] = {"search": s, "test": t, "items": n_test, "drop": sign * (s - t)}
        row["interval"], row["significant"] = None, None
        shares = is_share(s) and is_share(t) and metric_of.get(name) in PROPORTION_METRICS
        if shares and n_search > 0 and n_test > 0:
            low, high = difference_interval(s, n_search, t, n_test, level)
            row["interval"] = [low, high]
            row["significant"] = not low <= 0.0 <= high
            if row["significant"] and row["drop"] > 0:
                warnings.append(
                    f"{name}: {s:.4g} on search but {t:.4g} on the sealed test ({n_test} items), a drop "
                    f"outside its {level:.0%} interval [{low:.3g}, {high:.3g}]: "
                    "the search overfitted its items"
                )
        rows[name] = row
    return {"level": level, "objectives": rows, "warnings": warnings}


def card_section(report: Mapping[str, Any]) -> list[str]:
    """The model card's "Sealed test" section (markdown lines)."""
    level = f"{report['level']:.0%}"
    lines = [
        "## Sealed test",
        "",
        "Items that neither the search nor the selection ever read, scored once at export. `drop` is how "
        f"much worse the test figure is than the search figure; its {level} interval (accuracy-like "
        "objectives) says whether the drop is more than evaluation noise.",
        "",
        f"| objective | search | test | test items | drop | {level} interval | significant |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["objectives"].items():
        interval = "-" if row["interval"] is None else f"[{row['interval'][0]:.3g}, {row['interval'][1]:.3g}]"
        significant = "-" if row["significant"] is None else ("yes" if row["significant"] else "no")
        lines.append(
            f"| {name} | {row['search']:.4g} | {row['test']:.4g} | {row['items']} | {row['drop']:.4g} "
            f"| {interval} | {significant} |"
        )
    lines.append("")
    lines += [f"> **Warning:** {w}" for w in report["warnings"]]
    return [*lines, ""] if report["warnings"] else lines
