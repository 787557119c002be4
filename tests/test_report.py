"""``olmopt report``: the HTML page and its PNG plots, and the donor map for model cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from _models import make_family, write_addition_data
from PIL import Image

from olmopt.bootstrap import PairedBootstrap
from olmopt.cli import main
from olmopt.confidence import difference_interval
from olmopt.evaluate.item_scores import unpack
from olmopt.recipe import EsStep, Recipe
from olmopt.report import add_donor_map, donor_map_png, plots
from olmopt.search.annotate import campaign_report_data
from olmopt.search.campaign import Campaign

NAME = "rep"
L = "model.layers"
UNITS = [
    "model.embed_tokens",
    *[f"{L}.{i}.{u}" for i in range(3) for u in ("self_attn.q_proj", "mlp.up_proj")],
    "model.norm",
    "lm_head",
]


def _study(tmp: Path, name: str, decisions: dict[str, Any]) -> Path:
    fam = make_family(tmp, ["a", "b", "c"], layers=2)
    write_addition_data(tmp / "add.json")
    objectives = [
        {"dataset": str(tmp / "add.json"), "metric": "token_accuracy", "name": "acc"},
        {"dataset": str(tmp / "add.json"), "metric": "perplexity", "name": "ppl"},
    ]
    study = {
        "name": name,
        "pool": {"models": [str(fam[m]) for m in "abc"]},
        "objectives": objectives,
        "decisions": decisions,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """base (auto), a joint layer stage of 6 trials, then a greedy unit stage: finished."""
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp}/s.db"
    decisions = {
        "base": {"mode": "auto"},
        "layers": {"mode": "joint", "n_trials": 6},
        "tensors": {"mode": "greedy", "only": [1]},
    }
    path = _study(tmp, NAME, decisions)
    assert main(["study", "create", str(path), "--storage", url, "--json"]) == 0
    assert main(["study", "run", NAME, "--storage", url, "--quiet"]) == 0
    return tmp, url


def _size(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _colours(path: Path) -> set[tuple[int, int, int]]:
    with Image.open(path) as image:
        return {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20) or []}


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_report_writes_page_and_plots_of_the_expected_size(
    campaign: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, url = campaign
    out = tmp / "report"
    capsys.readouterr()
    assert main(["report", NAME, "--storage", url, "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finished"] is True and result["index"] == str(out / "index.html")
    assert set(result["plots"]) == {"donor_map", "metrics", "pareto_001-joint-layers"}
    assert _size(result["plots"]["donor_map"]) == plots.donor_map_size(2) == (960, 480)
    assert _size(result["plots"]["metrics"]) == plots.metrics_size(2) == (960, 600)
    assert _size(result["plots"]["pareto_001-joint-layers"]) == plots.PARETO_SIZE
    page = (out / "index.html").read_text()
    for png in result["plots"].values():
        assert f'src="{Path(png).name}"' in page  # relative: the directory is self-contained
    data = campaign_report_data(NAME, url)
    for stage in data["stages"]:
        assert stage["key"] in page
    assert "&quot;units&quot;" in page and "model.layers.1." in page  # the final Recipe, unit swaps included
    joint = optuna.load_study(study_name=f"{NAME}/001-joint-layers", storage=url)
    complete = joint.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sum("reused" not in t.user_attrs for t in complete) == 6  # the budget counts evaluations
    points = data["stages"][1]["points"]
    assert len(points) == len(complete) and any(p["pareto"] for p in points)


def test_report_embeds_images_on_request(campaign: tuple[Path, str]) -> None:
    tmp, url = campaign
    out = tmp / "embedded"
    assert main(["report", NAME, "--storage", url, "--out", str(out), "--embed", "--quiet"]) == 0
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and 'src="donor_map.png"' not in page


def test_report_of_a_campaign_that_has_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    assert (
        main(
            [
                "study",
                "create",
                str(_study(tmp_path, "fresh", {"layers": {"mode": "greedy"}})),
                "--storage",
                url,
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["report", "fresh", "--storage", url, "--out", str(tmp_path / "r")]) == 0
    assert "0 plots" in capsys.readouterr().out
    page = (tmp_path / "r" / "index.html").read_text()
    assert "0 of 3 stages decided" in page and "pending" in page
    assert main(["report", "nope", "--storage", url, "--out", str(tmp_path / "r")]) == 2


def test_donor_map_colours_every_donor_and_marks_es(tmp_path: Path) -> None:
    recipe = Recipe(base="/m/a", boundary="/m/c", layers={1: "/m/b"}, units={f"{L}.2.mlp.up_proj": "/m/c"})
    assert plots.unit_donor(recipe, f"{L}.0.mlp.up_proj") == "/m/a"
    assert plots.unit_donor(recipe, f"{L}.1.mlp.up_proj") == "/m/b"
    assert plots.unit_donor(recipe, f"{L}.2.mlp.up_proj") == "/m/c"
    assert plots.unit_donor(recipe, "lm_head") == "/m/c"
    png = donor_map_png(recipe, UNITS, 3, tmp_path / "map.png")
    assert _size(png) == plots.donor_map_size(3)
    colours = _colours(png)
    assert {_rgb(c) for c in plots.PALETTE[:3]} <= colours  # a, b and c all supply something
    assert _rgb(plots.PALETTE[3]) not in colours
    only_base = donor_map_png(Recipe(base="/m/a"), UNITS, 3, tmp_path / "base.png")
    assert _rgb(plots.PALETTE[0]) in _colours(only_base) and _rgb(plots.PALETTE[1]) not in _colours(only_base)
    es = Recipe(base="/m/a", es=(EsStep(unit=f"{L}.0.mlp.up_proj", kind="svd", sigma=0.1, seed=3),))
    assert _size(donor_map_png(es, UNITS, 3, tmp_path / "es.png")) == plots.donor_map_size(3)
    assert _size(donor_map_png(Recipe(base="/m/a", layers={0: "/m/b"}), [], 40, tmp_path / "deep.png")) == (
        960,
        1160,
    )


def test_add_donor_map_to_an_exported_model_card(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# merged\n")
    recipe = Recipe(base="/m/a", layers={1: "/m/b"})
    add_donor_map(tmp_path, recipe, UNITS, 3)
    add_donor_map(tmp_path, recipe, UNITS, 3)  # idempotent
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# merged\n") and card.count("![donor map](donor_map.png)") == 1
    assert _size(tmp_path / "donor_map.png") == plots.donor_map_size(3)


def test_es_progress_and_single_objective_plots(tmp_path: Path) -> None:
    def stage(key: str, kind: str, values: list[float], chosen: int) -> dict[str, Any]:
        candidates = {
            f"o{i}": {"metrics": {"loss": v}, "feasible": True, "trial": i} for i, v in enumerate(values)
        }
        points = [
            {"number": i, "values": {"loss": v}, "feasible": True, "pareto": False, "label": f"o{i}"}
            for i, v in enumerate(values)
        ]
        decision = {
            "winner": f"o{chosen}",
            "trial": chosen,
            "metrics": {"loss": values[chosen]},
            "held_out": {},
            "candidates": candidates,
        }
        return {
            "key": key,
            "kind": kind,
            "target": "",
            "state": "decided",
            "decision": decision,
            "points": points,
        }

    es = [stage(f"00{g}-es-svd-u@{g}", "es-svd", [3.0 - g, 2.5 - g, 4.0], 1) for g in range(3)]
    assert _size(plots.es_png(es, {"loss": "minimize"}, tmp_path / "es.png")) == plots.metrics_size(1)
    joint = stage("001-joint-layers", "joint-layers", [3.0, 1.0, 2.0, 0.5], 3)
    assert _size(plots.pareto_png(joint, {"loss": "minimize"}, tmp_path / "p.png")) == plots.PARETO_SIZE
    assert _rgb("#edc948") in _colours(tmp_path / "p.png")  # the selected trial's star


def test_report_shows_which_differences_are_significant(campaign: tuple[Path, str]) -> None:
    """Each decided stage's runner-up against the winner: accuracy by Newcombe's interval, perplexity by
    the paired bootstrap of its items (the runner passes the answer tokens), the verdict from the interval."""
    tmp, url = campaign
    out = tmp / "significance"
    assert main(["report", NAME, "--storage", url, "--out", str(out), "--quiet"]) == 0
    page = (out / "index.html").read_text()
    assert "<h2>Significant differences</h2>" in page
    for stage in campaign_report_data(NAME, url)["stages"]:
        d = stage["decision"]
        row = d["intervals"][d["runner_up"]]
        assert row["acc"]["rule"] == "newcombe" and row["ppl"]["rule"] == "bootstrap"
        low, high = row["ppl"]["interval"]
        assert (row["ppl"]["verdict"] == "tie") == (low <= 0 <= high)
        assert f"<td>{stage['key']}</td><td>{plots.short_name(d['runner_up'])}</td>" in page
        assert f"<td>[{low:.4g}, {high:.4g}]</td><td>bootstrap</td>" in page


@pytest.fixture(scope="module")
def zoo_campaign(tiny_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished campaign on the tiny zoo: fixed base, greedy layers 0 and 1, scored by an accuracy, a
    bigram loss and a perplexity (60 items each)."""
    from tests.test_study import REPO, study_file

    tmp = tmp_path_factory.mktemp("zoo_significance")
    url = f"sqlite:///{tmp}/s.db"
    path = study_file(tmp, tiny_zoo, "sig", layers={"mode": "greedy", "only": [0, 1]})
    data = yaml.safe_load(path.read_text())
    data["objectives"] = [
        {"name": n, "dataset": str(REPO / f"objectives/{d}.json"), "metric": m, "samples": 60}
        for n, d, m in (
            ("add", "add", "token_accuracy"),
            ("loss", "rev", "bigram_loss"),
            ("ppl", "fact", "perplexity"),
        )
    ]
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "sig", "--storage", url, "--quiet"]) == 0
    return tmp, url


def test_report_of_a_zoo_campaign_shows_intervals_computed_from_the_trials_items(
    zoo_campaign: tuple[Path, str],
) -> None:
    """The HTML table per stage: the runner-up against the winner, its interval and verdict. Checked by
    hand against the trials: Newcombe's interval of the two accuracies on 60 items, and the paired
    bootstrap of the two trials' stored per-item bigram losses (seeded by the objective and the items)."""
    tmp, url = zoo_campaign
    out = tmp / "report"
    assert main(["report", "sig", "--storage", url, "--out", str(out), "--quiet"]) == 0
    page = (out / "index.html").read_text()
    assert "<h2>Significant differences</h2>" in page
    checked = 0
    decisions = Campaign.load("sig", url).decisions()
    for stage in campaign_report_data("sig", url)["stages"]:
        d = stage["decision"]
        winner, runner = d["winner"], d["runner_up"]
        if not runner:  # the fixed base: one candidate
            continue
        row = d["intervals"][runner]
        assert [row[n]["rule"] for n in ("add", "loss", "ppl")] == ["newcombe", "bootstrap", "bootstrap"]
        metrics = {label: c["metrics"] for label, c in d["candidates"].items()}
        newcombe = difference_interval(metrics[runner]["add"], 60, metrics[winner]["add"], 60)
        assert row["add"]["interval"] == pytest.approx(list(newcombe))
        for n in ("add", "loss", "ppl"):
            low, high = row[n]["interval"]
            assert (row[n]["verdict"] == "tie") == (low <= 0 <= high)
            diff = metrics[runner][n] - metrics[winner][n]
            assert f'<td>{n}</td><td class="num">{diff:.4f}</td><td>[{low:.4g}, {high:.4g}]</td>' in page
        study = optuna.load_study(study_name=f"sig/{stage['key']}", storage=url)
        attrs = {t.user_attrs["candidate"]: t.user_attrs for t in study.get_trials() if t.values}
        # the winner (the incumbent, its metrics reused) has the per-item values of its earlier evaluation,
        # and so has a runner-up with the same weights under another name (spec_mc holds the base's layers
        # 0-1): its trial reused that decision's metrics
        reused = attrs[runner].get("reused")
        packed = decisions[reused].items["loss"] if reused else attrs[runner]["i.loss"]
        items = {winner: unpack(decisions[stage["key"]].items["loss"]), runner: unpack(packed)}
        assert len(items[winner]) == 60 and set(items[winner]) == set(items[runner])
        boot = PairedBootstrap("loss", sorted(items[winner]))
        assert row["loss"]["interval"] == pytest.approx(list(boot.interval(items[runner], items[winner])))
        checked += 1
    assert checked == 2
