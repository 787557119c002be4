"""The sealed test part: its place in the file, its config checks, its report (hand computations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from olmopt.confidence import difference_interval
from olmopt.config import load_study_file
from olmopt.errors import InputError
from olmopt.evaluate.datasets import Example, split_examples
from olmopt.sealed_split import card_section, sealed_test_report


def _items(n: int) -> list[Example]:
    return [Example((("user", f"q{i}"),), f"a{i}") for i in range(n)]


def test_parts_are_search_then_held_out_then_test() -> None:
    items = _items(10)
    answers = {
        split: [e.answer for e in split_examples(items, 0.2, split, None, test=0.3)]  # type: ignore[arg-type]
        for split in ("search", "held_out", "test")
    }
    assert answers == {
        "search": ["a0", "a1", "a2", "a3", "a4"],
        "held_out": ["a5", "a6"],
        "test": ["a7", "a8", "a9"],
    }
    # without a test part the split is what it was: held-out = the last ceil(0.25 * 10) = 3 items
    assert [e.answer for e in split_examples(items, 0.25, "held_out", None)] == ["a7", "a8", "a9"]
    assert split_examples(items, 0.25, "test", None) == []
    assert [e.answer for e in split_examples(items, 0.0, "test", 2, test=0.5)] == ["a5", "a6"]  # samples caps


def _study(tmp_path: Path, objective: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\npool: {{models: [a, b]}}\nobjectives:\n  - {objective}\n")
    return path


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        (
            "{dataset: d.json, metric: mc_accuracy, held_out: 0.5, test: 0.5}",
            r"objectives\.0: held_out \+ test must leave items to search \(got 0\.5 \+ 0\.5\)",
        ),
        (
            "{dataset: d.json, metric: mc_accuracy, test: 1.0}",
            "objectives.0.test: Input should be less than 1",
        ),
        ("{kind: lm_eval, task: t, test: 0.2}", "test: not a key of kind lm_eval"),
    ],
)
def test_bad_test_fractions_are_one_line(tmp_path: Path, objective: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as exc:
        load_study_file(_study(tmp_path, objective))
    assert "\n" not in str(exc.value) and exc.value.exit_code == 2


def test_a_test_fraction_is_read(tmp_path: Path) -> None:
    objective = "{dataset: d.json, metric: mc_accuracy, held_out: 0.2, test: 0.3}"
    config = load_study_file(_study(tmp_path, objective))
    assert (config.objectives[0].held_out, config.objectives[0].test) == (0.2, 0.3)


def test_report_warns_when_the_drop_exceeds_its_interval() -> None:
    search = {"mc": 0.80, "fact": 0.62, "chat": 0.40}
    test = {"mc": 0.50, "fact": 0.60, "chat": 0.55}
    directions = {"mc": "maximize", "fact": "maximize", "chat": "minimize"}
    metric_of = {"mc": "mc_accuracy", "fact": "token_accuracy", "chat": "bigram_loss"}
    items = {"mc": (100, 50), "fact": (100, 50), "chat": (100, 50)}
    report = sealed_test_report(search, test, directions, metric_of, items)
    rows = report["objectives"]
    # mc: 0.80 on 100 vs 0.50 on 50, Newcombe [0.14, 0.45] excludes 0: a significant drop of 0.30
    low, high = difference_interval(0.8, 100, 0.5, 50)
    assert (round(low, 2), round(high, 2)) == (0.14, 0.45)
    assert rows["mc"] == {
        "search": 0.8,
        "test": 0.5,
        "items": 50,
        "drop": pytest.approx(0.3),
        "interval": [low, high],
        "significant": True,
    }
    assert rows["fact"]["significant"] is False and rows["fact"]["drop"] == pytest.approx(0.02)
    # a loss has no interval without per-item scores; minimised: 0.40 -> 0.55 is a drop of 0.15
    assert rows["chat"]["interval"] is None and rows["chat"]["drop"] == pytest.approx(0.15)
    assert len(report["warnings"]) == 1
    assert report["warnings"][0].startswith("mc: 0.8 on search but 0.5 on the sealed test")
    card = "\n".join(card_section(report))
    assert "| mc | 0.8 | 0.5 | 50 | 0.3 | [0.14, 0.449] | yes |" in card
    assert "| chat | 0.4 | 0.55 | 50 | 0.15 | - | - |" in card
    assert "> **Warning:** mc: 0.8 on search" in card
    # a test figure better than search is never a warning, even when significant
    better = sealed_test_report({"mc": 0.5}, {"mc": 0.8}, directions, metric_of, {"mc": (100, 50)})
    assert better["objectives"]["mc"]["significant"] is True and better["warnings"] == []


def test_search_never_reads_the_test_items(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluator spy records every item encoded; none of the test part's items may be encoded before
    ``export best``, which scores them once and reports them beside search and held-out."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _models import make_family, write_addition_data

    from olmopt.cli import main
    from olmopt.evaluate import datasets

    models = make_family(tmp_path, ["a", "b"], layers=2)
    data = write_addition_data(tmp_path / "add.json", n=20)  # test: the last 4 items, held-out the 4 before
    test_prompts = {f"{i}+{i}=" for i in range(16, 20)}
    seen: list[tuple[str, str]] = []
    original = datasets.encode

    def spy(tokenizer, examples, path):  # type: ignore[no-untyped-def]
        seen.extend((ex.messages[-1][1], "export" if exporting else "search") for ex in examples)
        return original(tokenizer, examples, path)

    exporting = False
    monkeypatch.setattr("olmopt.evaluate.engine.encode", spy)
    study = tmp_path / "sealed.yaml"
    study.write_text(
        f"name: sealed\npool: {{models: [{models['a']}, {models['b']}]}}\n"
        f"objectives:\n  - {{dataset: {data}, metric: token_accuracy, name: add, held_out: 0.2, test: 0.2}}\n"
        "decisions: {layers: {mode: greedy}, merge: {mode: joint, methods: [linear], n_trials: 3}}\n"
    )
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    assert main(["study", "run", "sealed", "--storage", url, "--quiet"]) == 0
    searched = {prompt for prompt, _ in seen}
    assert searched and not searched & test_prompts, sorted(searched & test_prompts)
    assert {f"{i}+{i}=" for i in range(16)} <= searched  # search and held-out parts were read
    exporting = True
    out = tmp_path / "out"
    assert main(["export", "best", "sealed", "--storage", url, "--out", str(out), "--quiet"]) == 0
    assert {prompt for prompt, when in seen if when == "export"} >= test_prompts
    report = json.loads((out / "merge_report.json").read_text())
    merged = report["merged"]
    assert set(merged) == {"search", "held_out", "test"} and set(merged["test"]) == {"add"}
    row = report["test"]["objectives"]["add"]
    assert (
        row["items"] == 4
        and row["test"] == merged["test"]["add"]
        and row["search"] == merged["search"]["add"]
    )
    assert report["objectives"]["add"]["test"] == 0.2
    # each stage's significance table travels with it (runner-up: Newcombe's interval of the accuracy)
    detail = [e for st in report["stages"] for row in st.get("intervals", {}).values() for e in row.values()]
    assert detail and {e["rule"] for e in detail} == {"newcombe"}
    assert "## Sealed test" in (out / "README.md").read_text()


def test_losses_get_a_bootstrap_interval_from_per_item_values() -> None:
    import math

    import numpy as np

    directions = {"chat": "minimize", "ppl": "minimize"}
    metric_of = {"chat": "bigram_loss", "ppl": "perplexity"}
    counts = {"chat": (100, 50), "ppl": (100, 50)}
    # constant per-item values: every resample gives the same figures, so the interval is the drop itself
    # (0.40 -> 0.55: 0.15 worse; perplexity exp(2 ln 3 / 2) = 3 -> exp(3 ln 4 / 3) = 4: 1.0 worse)
    per_item = {
        "chat": ({i: 0.40 for i in range(100)}, {i: 0.55 for i in range(50)}),
        "ppl": ({i: 2 * math.log(3) for i in range(100)}, {i: 3 * math.log(4) for i in range(50)}),
    }
    tokens = {"ppl": ({i: 2 for i in range(100)}, {i: 3 for i in range(50)})}
    report = sealed_test_report(
        {"chat": 0.40, "ppl": 3.0}, {"chat": 0.55, "ppl": 4.0}, directions, metric_of, counts,
        per_item=per_item, tokens=tokens,
    )  # fmt: skip
    rows = report["objectives"]
    assert rows["chat"]["interval"] == pytest.approx([0.15, 0.15]) and rows["chat"]["significant"] is True
    assert rows["ppl"]["interval"] == pytest.approx([1.0, 1.0]) and rows["ppl"]["significant"] is True
    assert [w.split(":")[0] for w in report["warnings"]] == ["chat", "ppl"]
    # perplexity without its token counts: no interval
    bare = sealed_test_report({"ppl": 3.0}, {"ppl": 4.0}, directions, metric_of, counts, per_item=per_item)
    assert bare["objectives"]["ppl"]["interval"] is None
    # noisy losses 0.02 apart: the interval holds the drop, about as wide as the normal one, not significant
    rng = np.random.default_rng(0)
    search = dict(enumerate(rng.normal(0.40, 0.1, 400).tolist()))
    test = dict(enumerate(rng.normal(0.42, 0.1, 200).tolist()))
    s, t = sum(search.values()) / 400, sum(test.values()) / 200
    noisy = sealed_test_report(
        {"chat": s},
        {"chat": t},
        directions,
        metric_of,
        {"chat": (400, 200)},
        per_item={"chat": (search, test)},
    )["objectives"]["chat"]
    low, high = noisy["interval"]
    half = 1.96 * math.sqrt(np.var(list(search.values())) / 400 + np.var(list(test.values())) / 200)
    assert low < noisy["drop"] < high and (high - low) == pytest.approx(2 * half, rel=0.1)
    assert noisy["significant"] is (not low <= 0 <= high)
    card = "\n".join(card_section(report))
    assert "| chat | 0.4 | 0.55 | 50 | 0.15 | [0.15, 0.15] | yes |" in card
