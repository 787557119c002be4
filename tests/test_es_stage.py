"""ES generations as campaign stages: plan, seeds,
acceptance, replay through export/rebuild, repair, errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from safetensors.torch import load_file

from olmopt.cli import main
from olmopt.config import load_study_file
from olmopt.errors import InputError
from olmopt.methods.es import maths as es_ops
from olmopt.patch import WorkingModel
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import EsStep, Recipe
from olmopt.search.campaign import Campaign
from olmopt.search.kinds import es as es_space
from olmopt.search.trials import RECIPE_ATTR

sys.path.insert(0, str(Path(__file__).parent))
from _models import damaged_copy, make_family, write_addition_data  # noqa: E402

torch.set_num_threads(1)

UNIT = "model.layers.1.mlp.down_proj"
UNIT0 = "model.layers.0.self_attn.q_proj"


# -- pure parts ---------------------------------------------------------------------------------------
def test_targets_and_seeds() -> None:
    assert es_space.parse_target(es_space.es_target(UNIT, 3)) == (UNIT, 3)
    for bad in ("nounit", f"{UNIT}@0", f"{UNIT}@x", "@2"):
        with pytest.raises(InputError):
            es_space.parse_target(bad)
    seeds = [es_space.offspring_seed(0, "svd", UNIT, 1, i) for i in range(30)]
    assert seeds == [es_space.offspring_seed(0, "svd", UNIT, 1, i) for i in range(30)]
    assert len(set(seeds)) == 30 and all(0 <= s < 2**53 for s in seeds)
    others = {
        es_space.offspring_seed(1, "svd", UNIT, 1, 0),
        es_space.offspring_seed(0, "norm", UNIT, 1, 0),
        es_space.offspring_seed(0, "svd", UNIT0, 1, 0),
        es_space.offspring_seed(0, "svd", UNIT, 2, 0),
    }
    assert seeds[0] not in others and len(others) == 4
    assert float(seeds[0]) == seeds[0]  # exact through Optuna's float64 param storage


DIRS = {"acc": "maximize", "ppl": "minimize"}


def test_acceptance_rules() -> None:
    parent = {"acc": 0.5, "ppl": 10.0}
    mixed = {"acc": 0.6, "ppl": 11.0}  # better on one objective, worse on the other
    better = {"acc": 0.5, "ppl": 9.0}  # better on one, equal on the other
    assert es_space.qualifies(mixed, parent, DIRS, "any")
    assert not es_space.qualifies(mixed, parent, DIRS, "pareto")
    assert es_space.qualifies(better, parent, DIRS, "pareto")
    assert not es_space.qualifies(parent, parent, DIRS, "any")
    assert not es_space.qualifies({"acc": 0.9, "ppl": math.nan}, parent, DIRS, "any")
    assert not es_space.qualifies({"acc": math.inf, "ppl": 1.0}, parent, DIRS, "any")


def _trial(number: int, values: dict[str, float], recipe: str) -> optuna.trial.FrozenTrial:
    t = optuna.trial.create_trial(values=[0.0], user_attrs={RECIPE_ATTR: recipe})
    t.number = number
    return t


def test_accept_picks_copeland_among_qualifiers_else_parent() -> None:
    rows = {
        "parent": {"acc": 0.5, "ppl": 10.0},
        "o00": {"acc": 0.6, "ppl": 11.0},  # mixed
        "o01": {"acc": 0.55, "ppl": 9.5},  # Pareto improvement
        "o02": {"acc": 0.7, "ppl": 9.0},  # dominates o01
        "o03": {"acc": 0.9, "ppl": math.nan},  # failed evaluation
        "o04": {"acc": 0.8, "ppl": 8.0},  # best, but infeasible
    }
    trials = {
        label: _trial(i, v, "parent" if label == "parent" else label)
        for i, (label, v) in enumerate(rows.items())
    }
    scores = {o: {label: v[o] for label, v in rows.items()} for o in DIRS}
    feasible = {label: label != "o04" for label in rows}
    assert es_space.accept(trials, scores, feasible, DIRS, "pareto", "parent") == "o02"
    assert es_space.accept(trials, scores, feasible, DIRS, "any", "parent") == "o02"
    only_mixed = {k: trials[k] for k in ("parent", "o00")}
    assert es_space.accept(only_mixed, scores, feasible, DIRS, "pareto", "parent") == "parent"
    assert es_space.accept(only_mixed, scores, feasible, DIRS, "any", "parent") == "o00"
    # an offspring evaluated as the parent (its step failed) never wins
    rejected = {"parent": trials["parent"], "o02": _trial(2, rows["o02"], "parent")}
    assert es_space.accept(rejected, scores, feasible, DIRS, "any", "parent") == "parent"
    assert es_space.accept({"o02": trials["o02"]}, scores, feasible, DIRS, "any", "parent") is None


# -- a small random family ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("es_family")
    models = make_family(root, ["a", "b"], layers=2)
    write_addition_data(root / "add.json", 8)
    return {"root": root, "a": models["a"], "b": models["b"], "data": root / "add.json"}


def _study_file(family: dict[str, Any], name: str, decisions: str) -> Path:
    path = family["root"] / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"pool: {{models: [{family['a']}, {family['b']}]}}\n"
        "objectives:\n"
        f"  - {{dataset: {family['data']}, metric: token_accuracy, name: acc, held_out: 0}}\n"
        f"  - {{dataset: {family['data']}, metric: perplexity, name: ppl, held_out: 0}}\n"
        f"decisions: {decisions}\n"
        "evaluation: {batch_size: 8, max_new_tokens: 4}\n"
    )
    return path


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.mark.slow
def test_es_stages_run_record_and_replay_bit_exactly(family: dict[str, Any], tmp_path: Path) -> None:
    study = _study_file(
        family,
        "es1",
        f"{{layers: {{mode: off}}, es: {{svd: {{generations: 2, units: [{UNIT}]}}, norm: {{units: "
        f"[{UNIT}]}}, acceptance: any}}}}",
    )
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    campaign = Campaign.load("es1", url)
    assert [s.key for s in campaign.plan] == [
        "000-base",
        f"001-es-svd-{UNIT}@1",
        f"002-es-svd-{UNIT}@2",
        f"003-es-norm-{UNIT}@1",
    ]
    assert main(["study", "run", "es1", "--storage", url, "--quiet"]) == 0
    decisions = campaign.decisions()
    first = decisions[campaign.plan[1].key]
    lam = es_ops.es_population_size(64)  # down_proj: [64, 128], rank 64
    assert len(first.candidates) == lam + 1 and "parent" in first.candidates
    study1 = campaign.existing_stage_study(campaign.plan[1])
    assert study1 is not None
    offspring = [t for t in study1.get_trials() if t.params.get("offspring", -1) >= 0]
    assert {t.params["seed"] for t in offspring} == {
        es_space.offspring_seed(0, "svd", UNIT, 1, i) for i in range(lam)
    }
    # sigma follows the seed's schedule: sigma0 * std(S) of the parent tensor
    base_w = ModelPool([str(family["a"])]).tensor(str(family["a"]), UNIT + ".weight").float()
    assert offspring[0].params["sigma"] == pytest.approx(es_ops.svd_initial_sigma(base_w, 0.05), rel=1e-6)
    final = decisions[campaign.plan[-1].key].recipe
    accepted = [d.winner != "parent" for d in (decisions[s.key] for s in campaign.plan[1:])]
    assert len(final.es) == sum(accepted) and all(s.unit == UNIT for s in final.es)
    if accepted[0] and accepted[1]:  # an accepted generation recomputes sigma with the 0.8 factor
        assert final.es[1].sigma != final.es[0].sigma
    # the accepted offspring's metrics are the stage's metrics, and no objective got worse than the parent
    for stage in campaign.plan[1:]:
        d = decisions[stage.key]
        assert d.metrics == d.candidates[d.winner].metrics

    out, rebuilt = tmp_path / "out", tmp_path / "rebuilt"
    assert (
        main(["export", "best", "es1", "--storage", url, "--out", str(out), "--no-compare", "--quiet"]) == 0
    )
    report = json.loads((out / "merge_report.json").read_text())
    ids = {str(family[m]): m for m in "ab"}  # the report names local models by directory name
    assert Recipe.from_dict(report["recipe"]) == final.renamed(ids)
    root = str(family["root"])
    assert (
        main(
            [
                "rebuild",
                str(out / "merge_report.json"),
                "--out",
                str(rebuilt),
                "--quiet",
                "--models-dir",
                root,
            ]
        )
        == 0
    )
    exported, again = _tensors(out), _tensors(rebuilt)
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)
    replayed = base_w.clone()
    for step in final.es:
        fn = es_ops.svd_es_step if step.kind == "svd" else es_ops.norm_es_step
        replayed = fn(replayed, step.sigma, step.seed)
    assert torch.equal(exported[UNIT + ".weight"], replayed)
    assert not final.es or not torch.equal(replayed, base_w)

    # --refine es: new stages for another unit, recorded in the storage, before/after in the report
    refined = tmp_path / "refined"
    args = ["export", "best", "es1", "--storage", url, "--out", str(refined), "--no-compare", "--quiet"]
    assert main([*args, "--refine", "es", "--es-unit", UNIT0]) == 0
    campaign = Campaign.load("es1", url)
    added = [s.key for s in campaign.plan[4:]]
    assert added == [f"004-es-svd-{UNIT0}@1", f"005-es-svd-{UNIT0}@2", f"006-es-norm-{UNIT0}@1"]
    assert campaign.is_finished()
    report = json.loads((refined / "merge_report.json").read_text())
    assert (
        report["refine"]["stages"] == added
        and report["refine"]["before"]["stage"] == "003-es-norm-" + UNIT + "@1"
    )
    assert report["refine"]["before"]["search"] == decisions[campaign.plan[3].key].metrics
    assert report["refine"]["after"]["search"] == report["merged"]["search"]
    assert [EsStep(**s) for s in report["refine"]["steps"]] == list(
        Recipe.from_dict(report["recipe"]).es[len(final.es) :]
    )
    # resumable and idempotent: running it again plans nothing new and exports the same weights
    assert main([*args, "--refine", "es", "--force"]) == 0
    assert len(Campaign.load("es1", url).plan) == 7
    assert (
        main(
            [
                "rebuild",
                str(refined / "merge_report.json"),
                "--out",
                str(tmp_path / "rb2"),
                "--quiet",
                "--models-dir",
                str(family["root"]),
            ]
        )
        == 0
    )
    a, b = _tensors(refined), _tensors(tmp_path / "rb2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_applicable_unit_keeps_the_incumbent(family: dict[str, Any], tmp_path: Path) -> None:
    norm_unit = "model.layers.0.input_layernorm"  # 1-D weight: the seed skips it
    study = _study_file(family, "es2", f"{{layers: {{mode: off}}, es: {{norm: {{units: [{norm_unit}]}}}}}}")
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    assert main(["study", "run", "es2", "--storage", url, "--quiet"]) == 0
    campaign = Campaign.load("es2", url)
    d = campaign.decisions()[campaign.plan[-1].key]
    assert d.winner == "incumbent" and d.recipe.es == ()


def test_failing_offspring_is_evaluated_as_parent_and_rejected(
    family: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_study_file(
        _study_file(family, "es3", f"{{layers: {{mode: off}}, es: {{svd: {{units: [{UNIT}]}}}}}}")
    )

    pool = ModelPool(config.pool.models)
    env = SimpleNamespace(
        config=config,
        pool=pool,
        pool_names=pool.names,
        adapter=pool.adapter,
        param_names=pool[pool.names[0]].checkpoint.keys(),
    )
    incumbent = Recipe(base=str(family["a"]))
    stage = es_space.Stage(1, "es-svd", es_space.es_target(UNIT, 1))
    space = es_space.es_space(stage, incumbent, env)  # type: ignore[arg-type]
    labels = [label for label, _ in space.enqueue]
    assert labels[0] == "parent" and len(labels) == 1 + es_ops.es_population_size(64)
    assert space.layer == 1
    bad_seed = space.enqueue[2][1]["seed"]
    real = es_ops.svd_es_step
    monkeypatch.setattr(
        es_ops,
        "svd_es_step",
        lambda W, s, seed, basis=None: None if seed == bad_seed else real(W, s, seed, basis),
    )
    study = optuna.create_study()
    decoded = {}
    for label, params in space.enqueue[:3]:
        study.enqueue_trial(params)
        trial = study.ask()
        decoded[label] = (space.decode(trial), trial)
    (_, parent), _ = decoded["parent"]
    (_, ok), _ = decoded["o00"]
    (label, failed), trial = decoded["o01"]
    assert parent == incumbent and ok.es[0].seed == space.enqueue[1][1]["seed"]
    assert label == "o01" and failed == incumbent and es_space.REJECTED_ATTR in study.trials[-1].user_attrs


def test_failed_replay_restores_the_tensor(family: dict[str, Any]) -> None:
    pool = ModelPool([str(family["a"])])
    working = WorkingModel(pool, str(family["a"]), device="cpu")
    name = UNIT + ".weight"
    before = {k: v.detach().clone() for k, v in working.params.items()}
    steps = (
        EsStep(unit=UNIT, kind="svd", sigma=0.01, seed=1),
        EsStep(unit="model.norm", kind="svd", sigma=0.01, seed=2),
    )
    with pytest.raises(InputError, match="not applicable"):
        working.apply(Recipe(base=str(family["a"]), es=steps))
    assert all(torch.equal(working.params[k], before[k]) for k in before)
    with working.patched(Recipe(base=str(family["a"]), es=steps[:1])):
        assert not torch.equal(working.params[name], before[name])
    assert torch.equal(working.params[name], before[name])


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("es", "message"),
    [
        ("{svd: {sigma: 0}}", "decisions.es.svd.sigma"),
        ("{svd: {sigma: -0.1}}", "decisions.es.svd.sigma"),
        ("{norm: {sigma: .nan}}", "decisions.es.norm.sigma"),
        ("{svd: {generations: 0}}", "decisions.es.svd.generations"),
        ("{acceptance: sometimes}", "decisions.es.acceptance"),
    ],
)
def test_bad_es_config_is_one_line_input_error(family: dict[str, Any], es: str, message: str) -> None:
    path = _study_file(family, "bad", f"{{tensors: {{mode: greedy}}, es: {es}}}")
    with pytest.raises(InputError, match=message) as info:
        load_study_file(path)
    assert "\n" not in str(info.value)


def test_es_unit_errors_at_create(
    family: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    missing = _study_file(
        family, "nounit", "{layers: {mode: off}, es: {svd: {units: [model.layers.9.mlp.nope]}}}"
    )
    assert main(["study", "create", str(missing), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    no_units = _study_file(family, "nounits", "{layers: {mode: off}, es: {svd: on}}")
    assert main(["study", "create", str(no_units), "--storage", url]) == 2
    assert "list the units" in capsys.readouterr().err


def test_es_switches_and_olm_config(family: dict[str, Any], tmp_path: Path) -> None:
    off = load_study_file(_study_file(family, "sw", "{es: {svd: off, norm: on}}"))
    assert off.decisions.es.svd is None and off.decisions.es.norm is not None
    assert off.decisions.es.norm.sigma == 0.005 and off.decisions.es.acceptance == "pareto"
    olm = tmp_path / "olm_config.yaml"
    olm.write_text(
        f"models: [{family['a']}, {family['b']}]\nbase_model_name: {family['a']}\n"
        f"dataset_dir: {family['root']}\ndataset: {{add.json: {{mode: exact_match}}}}\n"
        "es_svd: true\nes_svd_generations: 2\nes_svd_sigma: 0.05\nes_norm: false\n"
    )
    es = load_study_file(olm).decisions.es
    assert es.svd is not None and (es.svd.generations, es.svd.sigma) == (2, 0.05)
    assert es.norm is None and es.acceptance == "any"


def test_refine_rejects_bad_flags(
    family: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    study = _study_file(family, "rf", "{layers: {mode: off}}")
    assert main(["study", "create", str(study), "--storage", url]) == 0
    out = str(tmp_path / "out")
    assert main(["export", "best", "rf", "--storage", url, "--out", out, "--refine", "es"]) == 2
    assert "no decided stage" in capsys.readouterr().err
    assert main(["study", "run", "rf", "--storage", url, "--quiet"]) == 0
    assert (
        main(["export", "best", "rf", "--storage", url, "--out", out, "--refine", "es", "--trial", "0"]) == 2
    )
    assert (
        main(["export", "best", "rf", "--storage", url, "--out", out, "--refine", "es", "--no-compare"]) == 2
    )
    units = (
        "(units: lm_head, model.embed_tokens, model.norm, model.layers.N.{input_layernorm, mlp.down_proj, "
        "mlp.gate_proj, mlp.up_proj, post_attention_layernorm, self_attn.k_proj, self_attn.o_proj, "
        "self_attn.q_proj, self_attn.v_proj} with N in 0..1)"
    )
    err = capsys.readouterr().err.splitlines()[
        -1
    ]  # nothing decided per unit: say what to pass, and what is valid
    assert (
        err == f"olmopt: error: campaign 'rf' decided no tensor units: pass --es-unit UNIT to refine {units}"
    )
    bad = ["export", "best", "rf", "--storage", url, "--out", out, "--refine", "es", "--es-unit", "nope"]
    assert main(bad) == 2
    assert (
        capsys.readouterr().err
        == f"olmopt: error: --es-unit: unit 'nope' does not exist in this architecture {units}\n"
    )
    assert len(Campaign.load("rf", url).plan) == 1  # nothing was appended by the failed attempts


# -- repair on the trained tiny zoo ---------------------------------------------------------------------
@pytest.mark.slow
def test_norm_es_repairs_a_damaged_tensor(tiny_zoo: Path, tmp_path: Path) -> None:
    """Row norms of layer 0's v_proj scaled by exp(N(0, 0.7));
    two norm-ES generations (sigma 0.1) win some back."""
    unit = "model.layers.0.self_attn.v_proj"
    damaged = tmp_path / "damaged"
    damaged_copy(tiny_zoo / "base", damaged, unit)
    objectives = Path(__file__).resolve().parents[1] / "objectives"
    study = tmp_path / "repair.yaml"
    study.write_text(
        f"name: repair\npool: {{models: [{damaged}]}}\nobjectives:\n"
        f"  - {{dataset: {objectives / 'add.json'}, metric: perplexity, name: add, samples: 32}}\n"
        f"  - {{dataset: {objectives / 'rev.json'}, metric: perplexity, name: rev, samples: 32}}\n"
        "decisions: {layers: {mode: off}, es: {norm: {generations: 2, sigma: 0.1, units: "
        f"[{unit}]}}}}}}\n"
    )
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    assert main(["study", "run", "repair", "--storage", url, "--quiet"]) == 0
    campaign = Campaign.load("repair", url)
    decisions = campaign.decisions()
    before = decisions["000-base"].metrics
    after = decisions[campaign.plan[-1].key].metrics
    assert after["add"] < before["add"] and after["rev"] < before["rev"], (before, after)
    steps = decisions[campaign.plan[-1].key].recipe.es
    assert steps and [s.sigma for s in steps] == pytest.approx([0.1 * 0.9**k for k in range(len(steps))])
