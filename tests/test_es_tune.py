"""The "ES sigma" decision: plan, scoring, choice of settings, and its effect on the ES stages."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import load_file

from olmopt.cli import main
from olmopt.config import load_study_file
from olmopt.errors import InputError
from olmopt.methods.es import maths as es_ops
from olmopt.search.campaign import Campaign
from olmopt.search.kinds import es_tune

sys.path.insert(0, str(Path(__file__).parent))
from _models import damaged_copy  # noqa: E402

torch.set_num_threads(1)
OBJECTIVES = Path(__file__).resolve().parents[1] / "objectives"
UNIT = "model.layers.0.self_attn.v_proj"


def test_unit_kind() -> None:
    assert es_tune.unit_kind("model.layers.3.mlp.down_proj") == "mlp.down_proj"
    assert es_tune.unit_kind("model.layers.12.self_attn.q_proj") == "self_attn.q_proj"
    assert es_tune.unit_kind("model.embed_tokens") == "model.embed_tokens"


def test_gain_is_direction_signed_mean_relative_change() -> None:
    directions = {"acc": "maximize", "ppl": "minimize"}
    # acc 0.5 -> 0.6: +20 %; ppl 10 -> 9: -10 % (an improvement): mean (0.2 + 0.1) / 2 = 0.15
    assert es_tune.gain({"acc": 0.5, "ppl": 10.0}, {"acc": 0.6, "ppl": 9.0}, directions) == pytest.approx(
        0.15
    )
    # worse perplexity counts against: (0.2 - 0.1) / 2
    assert es_tune.gain({"acc": 0.5, "ppl": 10.0}, {"acc": 0.6, "ppl": 11.0}, directions) == pytest.approx(
        0.05
    )
    assert es_tune.gain({"acc": 0.5, "ppl": 10.0}, {"acc": 0.5, "ppl": 10.0}, directions) == 0.0


def _tune_trial(
    number: int, sigma: float, generations: int, improvement: float, evaluations: int
) -> optuna.trial.FrozenTrial:
    t = optuna.trial.create_trial(
        params={"sigma": sigma, "generations": generations},
        distributions={
            "sigma": optuna.distributions.FloatDistribution(0.001, 1.0, log=True),
            "generations": optuna.distributions.IntDistribution(1, 3),
        },
        values=[0.0],
        user_attrs={
            "es.improvement": improvement,
            "es.evaluations": evaluations,
            "es.gain_per_evaluation": improvement / evaluations,
        },
    )
    t.number = number
    return t


def test_best_settings_maximises_gain_per_evaluation() -> None:
    configured = {"sigma": 0.05, "generations": 2}
    trials = {
        "configured": _tune_trial(0, 0.05, 2, 0.10, 32),  # 0.003125 per evaluation
        "#1": _tune_trial(1, 0.20, 1, 0.08, 16),  # 0.005: more per evaluation, less in total
        "#2": _tune_trial(2, 0.01, 3, 0.12, 48),  # 0.0025
        "#3": _tune_trial(3, 0.30, 1, 0.08, 16),  # ties #1 on both: the earlier trial wins
    }
    best = es_tune.best_settings(trials, "svd", "mlp.down_proj", "model.layers.0.mlp.down_proj", configured)
    assert (best["sigma"], best["generations"], best["trial"]) == (0.20, 1, 1)
    assert best["gain_per_evaluation"] == pytest.approx(0.005)
    # nothing improved: the configured settings stay
    flat = {"a": _tune_trial(0, 0.2, 1, 0.0, 16), "b": _tune_trial(1, 0.3, 2, -0.1, 32)}
    kept = es_tune.best_settings(flat, "norm", "mlp.up_proj", "u", configured)
    assert (kept["sigma"], kept["generations"], kept["trial"]) == (0.05, 2, None)


def _pool_and_objectives(model: Path) -> str:
    return (
        f"pool: {{models: [{model}]}}\nobjectives:\n"
        f"  - {{dataset: {OBJECTIVES / 'add.json'}, metric: perplexity, name: add, samples: 16, "
        "held_out: 0}\n"
        f"  - {{dataset: {OBJECTIVES / 'rev.json'}, metric: perplexity, name: rev, samples: 16, "
        "held_out: 0}\n"
    )


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ("{sigma: [0.1, 0.01]}", "decisions.es.norm.tune.sigma"),
        ("{sigma: [0, 0.1]}", "decisions.es.norm.tune.sigma"),
        ("{generations: [0, 1]}", "decisions.es.norm.tune.generations"),
        ("{generations: [1, 5]}", "more than generations"),
        ("{trials: 0}", "decisions.es.norm.tune.trials"),
    ],
)
def test_bad_tune_config_is_one_line_error(tiny_zoo: Path, tmp_path: Path, tune: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n" + _pool_and_objectives(tiny_zoo / "base")
        + f"decisions: {{layers: {{mode: off}}, es: {{norm: {{generations: 2, units: [{UNIT}], tune: "
          f"{tune}}}}}}}\n"
    )  # fmt: skip
    with pytest.raises(InputError, match=message) as info:
        load_study_file(path)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_sigma_search_repairs_and_steers_the_es_stages(tiny_zoo: Path, tmp_path: Path) -> None:
    """Damaged v_proj row norms; the sigma search picks settings that improve; the ES stages use them."""
    damaged = tmp_path / "damaged"
    state = damaged_copy(tiny_zoo / "base", damaged, UNIT)
    w = state[UNIT + ".weight"]
    study = tmp_path / "tune.yaml"
    study.write_text(
        "name: tune\n" + _pool_and_objectives(damaged)
        + "decisions: {layers: {mode: off}, es: {norm: {generations: 2, sigma: 0.001, "
        f"units: [{UNIT}], tune: {{trials: 3, sigma: [0.001, 0.3]}}}}}}}}\n"
    )  # fmt: skip
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    campaign = Campaign.load("tune", url)
    assert [s.key for s in campaign.plan] == [
        "000-base",
        "001-es-tune-norm-self_attn.v_proj",
        f"002-es-norm-{UNIT}@1",
        f"003-es-norm-{UNIT}@2",
    ]
    assert main(["study", "run", "tune", "--storage", url, "--quiet"]) == 0
    decisions = campaign.decisions()
    base = decisions["000-base"]
    tuning = decisions["001-es-tune-norm-self_attn.v_proj"]
    assert tuning.recipe == base.recipe and tuning.metrics == base.metrics  # tuning explores only
    assert len(tuning.candidates) == 3 and "configured" in tuning.candidates
    chosen = tuning.details["es_tune"]
    # the configured sigma (0.001) barely moves the damaged norms; a larger one repairs more per evaluation
    assert chosen["trial"] is not None and chosen["sigma"] > 0.001 and chosen["gain_per_evaluation"] > 0
    tune_study = campaign.existing_stage_study(campaign.plan[1])
    assert tune_study is not None
    for t in tune_study.get_trials():
        assert 0.001 <= t.params["sigma"] <= 0.3 and 1 <= t.params["generations"] <= 2
        per_eval = t.user_attrs["es.improvement"] / t.user_attrs["es.evaluations"]
        assert t.user_attrs["es.gain_per_evaluation"] == pytest.approx(per_eval)
        lam = es_ops.es_population_size(w.shape[0])
        assert t.user_attrs["es.evaluations"] == lam * t.params["generations"]
    # the main ES run starts from the tuned sigma and stops after the tuned number of generations
    es1 = campaign.existing_stage_study(campaign.plan[2])
    assert es1 is not None
    sigmas = {t.params["sigma"] for t in es1.get_trials() if t.params.get("offspring", -1) >= 0}
    assert len(sigmas) == 1 and sigmas.pop() == pytest.approx(chosen["sigma"])
    second = decisions[campaign.plan[3].key]
    if chosen["generations"] == 1:
        assert second.candidates == {} and second.winner == "incumbent"
    else:
        assert len(second.candidates) == es_ops.es_population_size(w.shape[0]) + 1
    final = decisions[campaign.plan[-1].key]
    assert final.metrics["add"] <= base.metrics["add"] and final.metrics["rev"] <= base.metrics["rev"]
    assert all(math.isfinite(v) for v in final.metrics.values())
    # export replays the steps: the exported tensor equals the ES replay of the final Recipe
    out = tmp_path / "out"
    assert (
        main(["export", "best", "tune", "--storage", url, "--out", str(out), "--no-compare", "--quiet"]) == 0
    )
    replayed = state[UNIT + ".weight"].float()
    for step in final.recipe.es:
        replayed = es_ops.norm_es_step(replayed, step.sigma, step.seed)
    assert torch.equal(load_file(out / "model.safetensors")[UNIT + ".weight"], replayed)
