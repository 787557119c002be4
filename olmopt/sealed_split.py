"""The sealed test part's report: search against test figures, with the drop's confidence interval.

``objectives[].test: FRACTION`` sets aside items that search and selection never read
(``evaluate.datasets.split_examples``); ``export best`` scores them once. A drop from search to test
larger than its interval means the search overfitted its items: the report warns. Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from olmopt.bootstrap import unpaired_interval
from olmopt.confidence import PROPORTION_METRICS, difference_interval, is_share

ItemValues = tuple[Mapping[int, float], Mapping[int, float]]  # (search, test): item -> value


def sealed_test_report(
    search: Mapping[str, float],
    test: Mapping[str, float],
    directions: Mapping[str, str],
    metric_of: Mapping[str, str],
    items: Mapping[str, tuple[int, int]],
    level: float = 0.95,
    per_item: Mapping[str, ItemValues] | None = None,
    tokens: Mapping[str, tuple[Mapping[int, int], Mapping[int, int]]] | None = None,
) -> dict[str, Any]:
    """``{"level", "objectives": {name: {search, test, items, drop, interval, significant}}, "warnings"}``.

    ``items`` maps an objective to its (search, test) item counts. ``drop`` is how much worse the test
    figure is (signed by direction: positive = worse on test) and ``interval`` the drop's interval:
    Newcombe's for accuracy-like objectives; for other objectives (losses, perplexity) a bootstrap
    interval of the two parts resampled independently (``bootstrap.unpaired_interval``), from
    ``per_item`` (objective -> (search, test) per-item values; perplexity also needs ``tokens``: per-item
    answer tokens). ``significant``: whether the interval excludes 0; None without an interval.
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
        interval: tuple[float, float] | None = None
        if shares and n_search > 0 and n_test > 0:
            interval = difference_interval(s, n_search, t, n_test, level)
        elif per_item is not None and name in per_item:
            pair = (tokens or {}).get(name) if metric_of.get(name) == "perplexity" else None
            if metric_of.get(name) != "perplexity" or pair is not None:
                interval = unpaired_interval(name, *per_item[name], level, pair)
        if interval is not None:
            low, high = sorted((sign * interval[0], sign * interval[1]))  # the drop's: positive = worse
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
        f"much worse the test figure is than the search figure; its {level} interval (Newcombe's for "
        "accuracy-like objectives, a bootstrap of both parts' items for the others) says whether the "
        "drop is more than evaluation noise.",
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
