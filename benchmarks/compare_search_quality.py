"""Paired comparison of two ``search_quality.py`` result files (issue 15: a strategy is better only if it
wins at equal budget over several families, on data the search never saw).

    python benchmarks/compare_search_quality.py A.json B.json [--a-strategy NAME] [--b-strategy NAME]

Each side may be several result files, comma-separated (``A1.json,A2.json``): their rows together (a
campaign in two files of one side must have the same test mean there). Campaigns are paired by (vendor,
family, budget, seed), and by strategy too unless each side names (or holds) one strategy; the vendor is the
first word of the file's ``meta.machine`` (``AMD``, ``Intel``; ``compare_search_quality.vendor``), because a
pinned seed trains other weights on the other vendor's CPUs (docs/zoo.md), so both vendors' files pool on
one side. Prints the mean of the paired test-mean differences B - A with its 95 % Student-t interval, how
many campaigns got better or worse, the ratio of item evaluations, issue 15's targets counted per campaign
on each side, and every campaign whose test mean changed. Exit 2 with one line on a missing or unreadable
file, or when no campaign pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_quality import t_interval, target_flags  # noqa: E402

Key = tuple[str, str, int, int, str]  # vendor, family, budget, seed, strategy
Pair = tuple[Key, dict[str, Any], dict[str, Any]]  # A's key, A's row, B's row


def fail(message: str) -> NoReturn:
    print(f"compare_search_quality: {message}", file=sys.stderr)
    raise SystemExit(2)


def vendor(meta: dict[str, Any]) -> str:
    """The CPU vendor a result file was measured on: ``AMD``, ``Intel`` or "" (the first word of
    ``meta.machine``, or of its first run's for files merged from several runs; ``Intel(R)`` read as
    ``Intel``)."""
    runs = meta.get("runs") or [{}]
    words = str(meta.get("machine") or runs[0].get("machine", "")).split()
    return words[0].removesuffix("(R)") if words else ""


def campaigns(paths: str, strategy: str | None) -> dict[Key, dict[str, Any]]:
    """(vendor, family, budget, seed, strategy) -> row of the comma-separated result files ``paths``
    (``strategy``: only that one's rows)."""
    out: dict[Key, dict[str, Any]] = {}
    for path in paths.split(","):
        try:
            data = json.loads(Path(path).read_text())
            cpu = vendor(data.get("meta", {}))
            keyed = {(cpu, r["family"], r["budget"], r["seed"], r["strategy"]): r for r in data["rows"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            fail(f"{path}: not a search_quality.py result file ({exc.__class__.__name__}: {exc})")
        for key, row in keyed.items():
            if key in out and out[key]["test_mean"] != row["test_mean"]:
                fail(f"{path}: campaign {key} is in an earlier file of the same side with another test mean")
            out[key] = row
    return {k: r for k, r in out.items() if strategy is None or k[4] == strategy}


def pairs(a: dict[Key, dict[str, Any]], b: dict[Key, dict[str, Any]]) -> list[Pair]:
    """Keys and rows of ``a`` and ``b`` for the same campaign: same vendor, family, budget and seed, and
    the same strategy unless each side holds one strategy (then the two strategies are what is compared)."""
    one = len({k[4] for k in a}) == 1 and len({k[4] for k in b}) == 1

    def key(k: Key) -> tuple[Any, ...]:
        return k[:4] if one else k

    by_key = {key(k): r for k, r in b.items()}
    return [(k, r, by_key[key(k)]) for k, r in sorted(a.items()) if key(k) in by_key]


def target_counts(rows: list[dict[str, Any]]) -> str:
    """Issue 15's targets (``search_quality.target_flags``), counted per campaign."""
    flags = [target_flags(r) for r in rows]

    def count(name: str) -> tuple[int, int]:
        known = [f[name] for f in flags if f[name] is not None]
        return sum(bool(x) for x in known), len(known)

    (share, _), (above, n_above), (never, n_never), (cope, _), (reached, n_reached) = map(
        count, ("share", "above", "not_below", "copeland", "copeland_reached")
    )
    n = len(rows)
    return (
        f">= 95 % of the recipe {share}/{n}; above the best donor where the recipe is {above}/{n_above}; "
        f"never below it elsewhere {never}/{n_never}; held-out Copeland against every donor {cope}/{n} "
        f"({reached}/{n_reached} where the ground-truth recipe beats every donor too)"
    )


def report(matched: list[Pair], names: tuple[str, str]) -> str:
    diffs = [b["test_mean"] - a["test_mean"] for _, a, b in matched]
    mean, half = t_interval(diffs)
    items = sum(b["items"] for _, _, b in matched) / max(1, sum(a["items"] for _, a, _ in matched))
    lines = [
        f"{len(matched)} campaigns paired; test mean B - A {mean:+.4f} ± {half:.4f} (95 % t); "
        f"better in {sum(d > 1e-9 for d in diffs)}, worse in {sum(d < -1e-9 for d in diffs)}; "
        f"item evaluations B / A {items:.2f}",
        f"A ({names[0]}): {target_counts([a for _, a, _ in matched])}",
        f"B ({names[1]}): {target_counts([b for _, _, b in matched])}",
    ]
    for (k, a, b), d in zip(matched, diffs, strict=True):
        if abs(d) > 1e-9:
            where = f"{k[0]} {a['family']}" if k[0] else a["family"]
            lines.append(
                f"  {where} budget {a['budget']} seed {a['seed']}: {a['test_mean']:.3f} -> "
                f"{b['test_mean']:.3f} (best donor {a['best_single_test_mean']:.3f}, "
                f"recipe {a['ground_truth_test_mean']:.3f})"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="result file(s) A, comma-separated (the reference)")
    parser.add_argument("b", help="result file(s) B, comma-separated")
    parser.add_argument("--a-strategy", default=None, help="only A's rows of this strategy")
    parser.add_argument("--b-strategy", default=None, help="only B's rows of this strategy")
    args = parser.parse_args()
    a, b = campaigns(args.a, args.a_strategy), campaigns(args.b, args.b_strategy)
    matched = pairs(a, b)
    if not matched:
        fail("no campaign of A has a twin in B (same vendor, family, budget and seed, and strategy)")
    names = (
        args.a_strategy or ",".join(sorted({k[4] for k in a})),
        args.b_strategy or ",".join(sorted({k[4] for k in b})),
    )
    print(report(matched, names))


if __name__ == "__main__":
    main()
